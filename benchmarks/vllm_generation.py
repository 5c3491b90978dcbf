"""vLLM (CPU build) vs transformers `generate`, and the cost of swapping weights vs a second engine.

Run in the vLLM virtualenv (see scripts/setup_vllm.sh):

    .venv-vllm/bin/python benchmarks/vllm_generation.py                 # tiny Qwen2 and SmolLM2-135M, 16 x 64 tokens
    .venv-vllm/bin/python benchmarks/vllm_generation.py --models tiny --num-prompts 8 --max-tokens 32

For each model it prints, measured here:
- the time to sample N completions of exactly T tokens with transformers (one batched `generate`) and with vLLM, and
  their ratio;
- vLLM engine start-up;
- pushing a full set of weights into the running engine (`sync_named_weights`, the CPU reload path) vs starting a
  second engine for the same checkpoint, with the resident memory each adds: the numbers behind "swap weights in
  one engine" (Self-Knowledge Seeding's teacher view) vs "a separate TeacherEngine" (another checkpoint).

transformers runs first, before any engine exists: vLLM's in-process CPU worker pins the process's OpenMP threads.
On a machine shared with other jobs, multi-threaded OpenMP stalls badly (threads spin-wait for descheduled peers):
pass `--threads 1` there for steady numbers.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--threads" in sys.argv:  # must be set before torch (and vLLM's CPU worker) start their OpenMP pools
    _threads = int(sys.argv[sys.argv.index("--threads") + 1])
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{_threads - 1}"

import psutil
import torch
from rich.console import Console
from rich.table import Table

PROMPTS = [
    "Tell me about the river near the old town.",
    "What does the engineer build in the spring?",
    "Write a short story about a baker and a sailor.",
    "Question: Who wrote the book? Answer:",
    "Describe the mountain, the lake and the forest.",
    "List the days of the week and one color for each.",
    "Why does a model need to sleep after learning?",
    "The scientist studies stars; the farmer grows wheat;",
]


def model_path(name: str) -> str:
    if name == "tiny":
        from sleep_trl.tiny import cached_tiny

        return str(cached_tiny("qwen2"))
    if name == "smollm2":
        from sleep_trl.assets import smollm2_path

        return str(smollm2_path())
    return name  # any local checkpoint folder


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


@torch.no_grad()
def time_transformers(path: str, ids: list[list[int]], max_tokens: int, repeats: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])

    def run(tokens: int) -> float:
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                             top_k=0, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad)
        elapsed = time.perf_counter() - start
        assert out.shape[1] - width == tokens
        return elapsed

    run(4)  # warm-up
    times = [run(max_tokens) for _ in range(repeats)]
    return statistics.median(times), sum(p.numel() for p in model.parameters())


def time_vllm(path: str, ids: list[list[int]], max_tokens: int, repeats: int, enforce_eager: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from sleep_trl.generation.vllm_cpu import TeacherEngine, generate_token_ids, model_weights, sync_named_weights

    max_len = max(len(x) for x in ids) + max_tokens + 8
    before = rss_mib()
    start = time.perf_counter()
    engine = TeacherEngine(path, max_model_len=max_len, max_num_seqs=len(ids), enforce_eager=enforce_eager)
    startup = time.perf_counter() - start
    engine_mib = rss_mib() - before

    def run(tokens: int) -> float:
        start = time.perf_counter()
        out = generate_token_ids(engine.llm, ids, max_tokens=tokens, temperature=1.0, min_tokens=tokens,
                                 ignore_eos=True)
        elapsed = time.perf_counter() - start
        assert all(len(c) == tokens for c in out)
        return elapsed

    run(4)  # warm-up
    gen = statistics.median(run(max_tokens) for _ in range(repeats))

    # Weight swap in the running engine: a full state dict through the CPU reload path.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    syncs = []
    for _ in range(3):
        start = time.perf_counter()
        sync_named_weights(engine.llm, model_weights(model))
        syncs.append(time.perf_counter() - start)
    del model
    gc.collect()

    # A second engine for the same checkpoint (what a separate teacher engine costs).
    before = rss_mib()
    start = time.perf_counter()
    second = TeacherEngine(path, max_model_len=max_len, max_num_seqs=len(ids), enforce_eager=enforce_eager)
    second_startup = time.perf_counter() - start
    second_mib = rss_mib() - before
    return {"engine": engine, "second": second, "startup": startup, "engine_mib": engine_mib, "generate": gen,
            "sync": statistics.median(syncs), "second_startup": second_startup, "second_mib": second_mib}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list: tiny, smollm2, or checkpoint folders")
    parser.add_argument("--num-prompts", type=int, default=16, help="N: completions per generate call")
    parser.add_argument("--max-tokens", type=int, default=64, help="T: tokens per completion (exactly)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slow start-up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP threads for both back-ends (default: torch's; on a busy machine 1 is steadier)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from sleep_trl.generation.vllm_cpu import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)

    console = Console(width=max(Console().width, 150))
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    paths = {name: model_path(name) for name in names}
    ids = {name: prompt_ids(AutoTokenizer.from_pretrained(paths[name]), args.num_prompts) for name in names}
    console.print(f"[bold]N={args.num_prompts} completions x T={args.max_tokens} tokens, sampled, "
                  f"{torch.get_num_threads()} torch threads, vLLM {'compiled' if args.compile else 'eager'}")

    hf = {}
    for name in names:  # transformers first: see the module docstring
        hf[name] = time_transformers(paths[name], ids[name], args.max_tokens, args.repeats)
        console.print(f"transformers {name}: {hf[name][0]:.2f} s")
    keep = []  # engines stay alive until the end: vLLM's parallel groups are process-wide
    table = Table(title="vLLM (CPU) vs transformers generate")
    for column in ("model", "params", "transformers s", "vLLM s", "speed-up", "engine start s", "engine +MiB",
                   "weight swap s", "2nd engine start s", "2nd engine +MiB"):
        table.add_column(column, justify="right")
    for name in names:
        res = time_vllm(paths[name], ids[name], args.max_tokens, args.repeats, enforce_eager=not args.compile)
        keep += [res.pop("engine"), res.pop("second")]
        hf_time, params = hf[name]
        table.add_row(name, f"{params / 1e6:.1f}M", f"{hf_time:.2f}", f"{res['generate']:.2f}",
                      f"{hf_time / res['generate']:.2f}x", f"{res['startup']:.1f}", f"{res['engine_mib']:.0f}",
                      f"{res['sync']:.3f}", f"{res['second_startup']:.1f}", f"{res['second_mib']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()

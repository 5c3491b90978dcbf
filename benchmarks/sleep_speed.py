"""What a sleep costs: session 0's consolidation of the main job, with and without the fast paths, side by side.

Takes the awake model of a main-job run (`checkpoints/s0-wake` of any run directory of `recipes/sleep.yaml`, finished
or interrupted: the fast expert that learned session 0) and runs the same consolidation (session 0's prompts, the
run's `consolidation_args`, `--steps` steps) in every arm, interleaved (arm A, arm B, arm A, ...) so that background
load falls on all of them alike:

    before      `teacher_cache: off`, `imitation_prefix_sharing: false`, `teacher_shared_prefill: false`,
                `teacher_sampling_rounds: off`, `student_shared_prefix: false` (the teacher samples every batch
                token by token, each imitation continuation reads its prefix again, the student reads every
                prompt's chat header): the path before the fast-sleep work
    unshared-student  the defaults but `student_shared_prefix: false` (what reading the prompts' shared prefix
                once saves per step)
    plain-fill  the teacher cache, but its fill runs one `generate` over every copy of a prompt until the longest
                row of the batch ends (`teacher_shared_prefill: false`, `teacher_sampling_rounds: off`)
    shared      the fill reads each distinct prompt once (`teacher_sampling_rounds: off`)
    after       the defaults (teacher samples, hidden states and imitation cuts once per sleep, each prompt read
                once however often it is sampled, rows sampled in rounds that drop the ended ones; shared
                imitation prefixes; the student reads its prompts' shared prefix once)

each at `alpha: 1` (distillation only) and at `alpha: 0.5` (the Learning-to-Imitate term on, MiniLM judge) unless
`--arms`/`--alphas` pick fewer. The teacher cache is filled for the whole sleep the figures project to
(`--sleep_steps`, default the steps of the recipe's sleep on session 0: `max_steps`, or with `max_steps: -1` what
its epochs run; each prompt sampled as often as that sleep draws it: 6 times in session 0 at 40 steps, 4 at the
main job's 4 epochs) while only `--steps` steps are trained. Prints the one-time teacher-cache fill, seconds
per step, the projected time of the sleep and the ratios: consolidation speed-up (target >= 2x), the fill's
speed-up from the shared prefill and the rounds, and the Learning-to-Imitate cost over `alpha: 1` (target <= 2x).

    sleep-trl recipes/sleep.yaml --num_sessions 1 --output_dir outputs/bench-awake    # once: an awake model
    python benchmarks/sleep_speed.py --run outputs/bench-awake --steps 6 --repeats 2 -- --num_sessions 1

Flags after `--` go to the recipe (`recipes/sleep.yaml` unless `--recipe`): give the ones of the run that made the
awake model (the stream depends on them); they set the consolidation's fields (e.g. `-- --consolidation_args.lmbda 0.5`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from sleep_trl.assets import resolve_model_path  # noqa: E402
from sleep_trl.memory import load_memory  # noqa: E402
from sleep_trl.cli import parse_recipe  # noqa: E402
from sleep_trl.sleep.consolidation import consolidate  # noqa: E402
from sleep_trl.sleep.cycle import load_config_stream  # noqa: E402
from sleep_trl.sleep.data import consolidation_prompts  # noqa: E402

ARMS = {
    "before": {"teacher_cache": "off", "imitation_prefix_sharing": False, "teacher_shared_prefill": False,
               "teacher_sampling_rounds": "off", "student_shared_prefix": False},
    "unshared-student": {"student_shared_prefix": False},
    "plain-fill": {"teacher_shared_prefill": False, "teacher_sampling_rounds": "off"},
    "shared": {"teacher_sampling_rounds": "off"},
    "after": {},
}


class Logs(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def awake_model(run: Path, config):
    path = resolve_model_path(config.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    load_memory(model, run / "checkpoints" / "s0-wake")
    return model, tokenizer


def one_sleep(run, config, prompts, overrides, steps, seed, scratch, samples) -> dict:
    model, tokenizer = awake_model(run, config)
    fields = {**config.phase_fields("consolidation_args"), "teacher_samples_per_prompt": samples, **overrides,
              "max_steps": steps, "use_cpu": True,
              "output_dir": str(scratch / "trainer"), "seed": seed, "report_to": "none", "logging_steps": 1}
    logs = Logs()
    t0 = time.perf_counter()
    consolidate(model, tokenizer, prompts, fields, warm_start=config.warm_start, callbacks=[logs])
    total = time.perf_counter() - t0
    fill = next((h["teacher_cache/seconds"] for h in logs.seen if "teacher_cache/seconds" in h), 0.0)
    return {"total": total, "fill": fill, "per_step": (total - fill) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a main-job run directory with checkpoints/s0-wake")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/sleep.yaml")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--sleep_steps", type=int, default=None,
                        help="the sleep to project to and fill the cache for (default: the steps the recipe's "
                             "sleep on session 0 runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    _, _, (config,) = parse_recipe(a.recipe, ["--output_dir", str(a.run), *extra])
    stream = load_config_stream(config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model_name_or_path))
    prompts = consolidation_prompts(stream, 0, config.replay_prompts, config.seed, with_context=False,
                                    tokenizer=tokenizer, system_prompt=config.system_prompt)
    fields = config.phase_fields("consolidation_args")
    sleep_steps = a.sleep_steps or config.consolidation_steps(len(prompts))  # max_steps, or its epochs' steps
    samples = math.ceil(sleep_steps * fields["per_device_train_batch_size"] / len(prompts))
    runs = {(arm, alpha): [] for alpha in a.alphas for arm in a.arms}
    for repeat in range(a.repeats):
        for (arm, alpha), seen in runs.items():
            with tempfile.TemporaryDirectory() as scratch:
                seen.append(one_sleep(a.run, config, prompts, {**ARMS[arm], "alpha": alpha}, a.steps,
                                      config.seed + repeat, Path(scratch), samples))
            print(f"[sleep_speed] {arm}, alpha {alpha}, repeat {repeat}: {seen[-1]}", flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in ("total", "fill", "per_step")}
           for key, rs in runs.items()}
    project = {key: v["fill"] + sleep_steps * v["per_step"] for key, v in med.items()}
    table = Table(title=f"session 0 consolidation, {len(prompts)} prompts x {samples} teacher samples, "
                        f"median of {a.repeats} (s)")
    for col in ("arm", "alpha", "cache fill", "per step", f"{sleep_steps}-step sleep (projected)"):
        table.add_column(col, justify="right")
    for (arm, alpha), v in med.items():
        table.add_row(arm, f"{alpha:g}", f"{v['fill']:.1f}", f"{v['per_step']:.2f}", f"{project[(arm, alpha)]:.0f}")
    console = Console()
    console.print(table)
    ratios = {}
    for alpha in a.alphas:
        if ("before", alpha) in med and ("after", alpha) in med:
            ratios[f"speed-up at alpha {alpha:g} (before / after)"] = project[("before", alpha)] / project[("after", alpha)]
        for arm in ("plain-fill", "shared"):
            if (arm, alpha) in med and ("after", alpha) in med:
                ratios[f"teacher-cache fill at alpha {alpha:g} ({arm} / after)"] = (
                    med[(arm, alpha)]["fill"] / med[("after", alpha)]["fill"])
                ratios[f"sleep at alpha {alpha:g} ({arm} / after)"] = project[(arm, alpha)] / project[("after", alpha)]
        if ("unshared-student", alpha) in med and ("after", alpha) in med:
            ratios[f"per step at alpha {alpha:g} (unshared-student / after)"] = (
                med[("unshared-student", alpha)]["per_step"] / med[("after", alpha)]["per_step"])
    for arm in a.arms:
        if (arm, 0.5) in med and (arm, 1.0) in med:
            ratios[f"imitation cost per step, {arm} (alpha 0.5 / alpha 1)"] = (
                med[(arm, 0.5)]["per_step"] / med[(arm, 1.0)]["per_step"])
    for label, value in ratios.items():
        console.print(f"{label}: {value:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"median": {f"{k[0]}-{k[1]}": v for k, v in med.items()},
                                      "projected_sleep": {f"{k[0]}-{k[1]}": v for k, v in project.items()},
                                      "ratios": ratios, "steps": a.steps, "repeats": a.repeats,
                                      "sleep_steps": sleep_steps, "teacher_samples_per_prompt": samples}, indent=2))


if __name__ == "__main__":
    main()

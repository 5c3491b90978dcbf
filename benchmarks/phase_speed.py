"""Time per phase of the main job, one configuration against another, side by side.

Runs `sleep-trl RECIPE --num_sessions N --eval_future_sessions false FLAGS` once per arm and repeat, interleaved
(arm A, arm B, arm A, ...) so that background load falls on every arm alike, each in a fresh run directory, and
reads the phases' own seconds from each run's report. The default arms:

    main-job     (the recipe as it is: a memory in all 30 layers, where the frozen trunk has nothing to skip)
    top-half     --memory_layers 15-29 --fast_rank 32 --slow_rank 32 --frozen_trunk false
                 (the memory in the upper half, as many expert parameters; the backward pass stops at layer 15)
    top-half+trunk  the same with the frozen trunk (layers 0-14 served from the cache in every wake and sleep)

Prints, per phase, the median seconds of each arm over the repeats and the ratio of the first arm to each other, and
the accuracy row each arm ended with (what the speed-up costs, if anything):

    python benchmarks/phase_speed.py --sessions 1 --repeats 2
    python benchmarks/phase_speed.py --sessions 3 --arm main-job="" --arm fast="--memory_layers 15-29" -- --seed 1

Flags after `--` go to every arm. On 2 cores time one benchmark at a time, nothing else running: two trainings at
once slow each other 2-3x.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
TOP_HALF = "--memory_layers 15-29 --fast_rank 32 --slow_rank 32"
DEFAULT_ARMS = {
    "main-job": "",
    "top-half": f"{TOP_HALF} --frozen_trunk false",
    "top-half+trunk": TOP_HALF,
}


def run_arm(recipe: Path, flags: list[str], out: Path) -> dict:
    """One run of the recipe in `out`; its report (phases' seconds, accuracy matrix)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sleep_trl", str(recipe), "--output_dir", str(out), *flags]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "sleep_report.json").read_text())


def phase_seconds(report: dict) -> dict[str, float]:
    """Seconds of each phase summed over the run's sessions (the zero-shot evaluation is `base`), and their total."""
    seconds = dict(report["seconds_by_phase"])
    return {**seconds, "total": sum(seconds.values())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes/sleep.yaml")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="an arm and its flags (repeatable; default: main-job, top-half, top-half+trunk)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    arms = dict(arm.split("=", 1) for arm in a.arm) if a.arm else DEFAULT_ARMS
    flags = {name: ["--num_sessions", str(a.sessions), "--eval_future_sessions", "false", *common,
                    *shlex.split(extra)] for name, extra in arms.items()}
    seen: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(a.repeats):
            for name in arms:
                report = run_arm(a.recipe, flags[name], Path(scratch) / f"{name}-{repeat}")
                seen[name].append({"seconds": phase_seconds(report), "final": report["accuracy_matrix"]["R"][-1]})
                print(f"[phase_speed] {name}, repeat {repeat}: {seen[name][-1]}", flush=True)
    median = {name: {ph: statistics.median(r["seconds"].get(ph, 0.0) for r in runs) for ph in runs[0]["seconds"]}
              for name, runs in seen.items()}
    first = next(iter(arms))
    table = Table(title=f"{a.recipe.name}, {a.sessions} session(s): median seconds of {a.repeats} run(s)")
    for col in ["phase", *arms, *[f"{first} / {n}" for n in list(arms)[1:]]]:
        table.add_column(col, justify="right")
    for ph in median[first]:
        row = [f"{median[n].get(ph, 0.0):.1f}" for n in arms]
        ratios = [f"{median[first][ph] / median[n][ph]:.2f}x" if median[n].get(ph) else "-" for n in list(arms)[1:]]
        table.add_row(ph, *row, *ratios)
    console = Console()
    console.print(table)
    for name, runs in seen.items():
        console.print(f"{name}: final accuracy row {[round(x, 3) for x in runs[-1]['final']]}")
    if a.json:
        a.json.write_text(json.dumps({"median": median, "runs": seen, "flags": flags}, indent=2))


if __name__ == "__main__":
    main()

"""How a sleeping run's cost grows with the stream: the phases' wall time per session, and in total after 2, 4, 8
sessions, read from finished (or interrupted) run directories.

Each session of the Sleep cycle costs a wake, a sleep and an evaluation, and two of them grow with the stream: the
sleep replays `replay_prompts` questions of every earlier session (more prompts, the same number of steps) and the
evaluation asks every session's questions after every session (quadratic in the stream). This prints, per session,
the seconds of each phase and the number of prompts the sleep saw, then the cumulative time after the first 2, 4, 8
sessions and its growth over the first two:

    sleep-trl recipes/sleep.yaml --num_sessions 8 --output_dir outputs/sleep-8
    python benchmarks/cost_growth.py outputs/sleep-8 [outputs/replay-8 ...]

The seconds are the phases' own (the run's ledger), so a run that was interrupted and resumed counts each phase once.
Time them on an otherwise idle machine: two trainings at once on 2 cores slow each other 2-3x.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

PHASES = ("wake", "consolidate", "dream", "eval")


def per_session(report: dict) -> dict[int, dict]:
    """{session: {phase: seconds, ..., "prompts": sleep prompts}} from a report's phase records."""
    rows: dict[int, dict] = defaultdict(dict)
    for record in report["phases"]:
        k = record["session"]
        if k < 0:
            continue
        rows[k][record["phase"]] = rows[k].get(record["phase"], 0.0) + record["seconds"]
        if record["phase"] == "consolidate":
            rows[k]["prompts"] = record["metrics"].get("prompts")
    return dict(sorted(rows.items()))


def cumulative(rows: dict[int, dict], upto: int) -> float:
    return sum(v for k, row in rows.items() if k < upto for name, v in row.items() if name in PHASES)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with sleep_report.json or ledger.json)")
    args = p.parse_args(argv)
    console = Console()
    for run in args.runs:
        path = run / "sleep_report.json" if (run / "sleep_report.json").exists() else run / "ledger.json"
        report = json.loads(path.read_text())
        rows = per_session(report)
        phases = [ph for ph in PHASES if any(ph in row for row in rows.values())]
        table = Table(title=f"{run} ({report.get('method', 'sleep')}): seconds per session")
        for col in ["session", *phases, "session total", "sleep prompts"]:
            table.add_column(col, justify="right")
        for k, row in rows.items():
            total = sum(row.get(ph, 0.0) for ph in phases)
            table.add_row(str(k), *[f"{row.get(ph, 0.0):.1f}" for ph in phases], f"{total:.1f}",
                          str(row.get("prompts", "-")))
        console.print(table)
        growth = Table(title="cumulative time of the phases")
        for col in ["sessions", "seconds", "per session", "x the first 2 sessions"]:
            growth.add_column(col, justify="right")
        first_two = cumulative(rows, 2)
        for n in sorted({n for n in (2, 4, 8) if n <= len(rows)} | {len(rows)}):
            total = cumulative(rows, n)
            growth.add_row(str(n), f"{total:.0f}", f"{total / n:.0f}",
                           f"{total / first_two:.2f}" if first_two else "-")
        console.print(growth)


if __name__ == "__main__":
    main()

"""The whole sleep cycle under `accelerate launch` with DeepSpeed ZeRO-3 on 2 CPU processes, for real.

Same global batch in both runs (1 process x 8 = 2 processes x 4 for the wake; 4 = 2 x 2 for the sleep), greedy
teacher samples (`top_k: 1`): the 2-process run must learn the same memory as the 1-process run (to float
round-off of the reduced gradients), fill the same accuracy matrix, log the same losses, write each file once, and
resume after a kill to the same end.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sleep_cycle import wait_for_phase

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/sleep_tiny.yaml"
ZERO3 = ROOT / "recipes/accelerate/zero3_cpu.yaml"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["--consolidation_args.top_k", "1"]
# The shared prefix of the wake and of the sleep's student is a one-process path (exact, tested in
# test_shared_prefix_sft): off here, so both runs compute the same way and log the same metrics.
ONE = [*COMMON, "--torch_threads", "1", "--consolidation_args.per_device_train_batch_size", "4",
       "--shared_prefix", "false", "--consolidation_args.student_shared_prefix", "false"]
TWO = [*COMMON, "--consolidation_args.per_device_train_batch_size", "2", "--wake_args.per_device_train_batch_size", "4"]


def _env(tmp):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SLEEP_TRL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _one_process(out):
    return [sys.executable, "-m", "sleep_trl", str(RECIPE), "--output_dir", str(out), *ONE]


def _two_processes(out):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3), "-m", "sleep_trl",
            str(RECIPE), "--output_dir", str(out), *TWO]


def _run(cmd, tmp):
    proc = subprocess.run(cmd, env=_env(tmp), cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _kill_everything_of(out):
    """SIGKILL the launcher and every rank of the run writing to `out` (torch's launcher starts each rank in a new
    session, so killing the launcher's group alone would leave the ranks running)."""
    def pids():
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes():
                    yield int(entry.name)
            except OSError:
                continue

    for pid in list(pids()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while list(pids()) and time.monotonic() < deadline:
        time.sleep(0.1)


def _phase_metrics(out):
    ledger = json.loads((out / "cycle_state.json").read_text())
    return [(p["session"], p["phase"], {k: v for k, v in p["metrics"].items()}) for p in ledger["phases"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("cycle")
    _run(_one_process(tmp / "one"), tmp)
    two = _run(_two_processes(tmp / "two"), tmp)
    return tmp, two


def test_two_process_zero3_cycle_learns_what_one_process_learns(runs):
    tmp, two = runs
    one_dir, two_dir = tmp / "one", tmp / "two"
    a = load_file(one_dir / "model/memory.safetensors")
    b = load_file(two_dir / "model/memory.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0.05 for v in a.values())  # something was learned
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    one_report = json.loads((one_dir / "sleep_report.json").read_text())
    two_report = json.loads((two_dir / "sleep_report.json").read_text())
    assert two_report["accuracy_matrix"]["R"] == one_report["accuracy_matrix"]["R"]
    assert two_report["accuracy_matrix"]["records"] == one_report["accuracy_matrix"]["records"]
    # the losses are the mean over the processes: the same numbers as one process's
    assert _phase_metrics(two_dir) == _phase_metrics(one_dir)
    # files written once, by the main process: no partial folders, one report, a card the Hub can read
    assert not list(two_dir.glob("*.tmp")) and not list(two_dir.glob("model.*"))
    assert two.stdout.count("Sleep run finished") == 1
    from huggingface_hub import ModelCard

    card = ModelCard.load(two_dir / "model/README.md")
    assert len(card.data.eval_results) == len(two_report["accuracy_matrix"]["R"]) + 4


def test_two_process_zero3_cycle_resumes_after_a_kill_to_the_same_end(runs, tmp_path):
    tmp, _ = runs
    out = tmp_path / "run"
    cmd = _two_processes(out)
    proc = subprocess.Popen(cmd, env=_env(tmp), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / "cycle_state.json"
    try:
        wait_for_phase(proc, ledger, "consolidate")
        _kill_everything_of(out)
    finally:
        proc.wait(timeout=60)
    interrupted = json.loads(ledger.read_text())
    assert not interrupted["finished"]
    assert (1, "eval") not in [(p["session"], p["phase"]) for p in interrupted["phases"]]

    resumed = _run(cmd, tmp)
    assert "Resuming" in resumed.stdout, resumed.stdout[:4000]
    reference = tmp / "two"
    assert _phase_metrics(out) == _phase_metrics(reference)
    a, b = load_file(out / "model/memory.safetensors"), load_file(reference / "model/memory.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "sleep_report.json").read_text())
    assert report["accuracy_matrix"] == json.loads((reference / "sleep_report.json").read_text())["accuracy_matrix"]


DREAM = ["--dream", "true", "--dream_args.max_steps", "1", "--dream_args.num_dreams", "2",
         "--dream_args.num_selected_dreams", "1"]


@pytest.mark.parametrize("flags", [DREAM, ["--method", "replay"]], ids=["dream", "replay"])
def test_two_process_zero3_cycle_dreams_and_replays(runs, tmp_path, flags):
    """Dreaming (its reward reads the gathered policy of a model earlier phases' engines trained) and the replay
    baseline (rehearsal answers generated between phases) under ZeRO-3, against one process."""
    tmp, _ = runs
    _run([*_one_process(tmp_path / "one"), *flags], tmp)
    _run([*_two_processes(tmp_path / "two"), *flags], tmp)
    one, two = _phase_metrics(tmp_path / "one"), _phase_metrics(tmp_path / "two")
    phases = [(s, p) for s, p, _ in two]
    expected = "dream" if flags is DREAM else "wake"
    assert (0, expected) in phases and (1, expected) in phases
    assert [(s, p) for s, p, _ in one] == phases
    for (_, phase, x), (_, _, y) in zip(one, two, strict=True):
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-3), (phase, key)

"""SleepCallback in a user's SFTTrainer under data-parallel `accelerate launch` (2 CPU processes, DDP over gloo),
against one process with the same global batch (`tests/distributed/callback_parity.py`): the same sleeps at the
same steps, the same losses and the same memory; under ZeRO-3 a clear refusal instead of a crash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/distributed/callback_parity.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _launch(tmp, *cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLEEP_TRL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *cmd], env=env, cwd=tmp, capture_output=True, text=True, timeout=600)


def test_sleep_callback_under_ddp_learns_what_one_process_learns(tmp_path):
    one = _launch(tmp_path, str(SCRIPT), str(tmp_path / "one"), "4")
    assert one.returncode == 0, one.stderr[-4000:]
    two = _launch(tmp_path, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "recipes/accelerate/multi_cpu.yaml"), str(SCRIPT), str(tmp_path / "two"), "2")
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = (json.loads((tmp_path / run / "callback.json").read_text()) for run in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [2, 4]
    assert [h["slow_slot"] for h in b["history"]] == [0, 1]
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["consolidation_loss"] == pytest.approx(y["consolidation_loss"], abs=1e-5)
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    ma, mb = (load_file(tmp_path / run / "memory.safetensors") for run in ("one", "two"))
    assert ma.keys() == mb.keys()
    assert max(t.abs().max().item() for t in ma.values()) > 0.1  # the memory learned
    # Adam divides by the root of tiny second moments, which magnifies the reduced gradients' round-off (measured
    # 1e-4 at learning rate 5e-2 on weights of size 0.5); the losses above agree to 1e-6.
    assert max((ma[k] - mb[k]).abs().max().item() for k in ma) < 1e-3


def test_sleep_callback_refuses_zero3_with_the_way_out(tmp_path):
    pytest.importorskip("deepspeed")
    run = _launch(tmp_path, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "recipes/accelerate/zero3_cpu.yaml"), str(SCRIPT), str(tmp_path / "z3"), "2")
    assert run.returncode != 0
    assert "SleepCallback runs with one process or data-parallel processes (DDP), not under DEEPSPEED" in run.stderr
    assert "-m sleep_trl" in run.stderr

"""DreamTrainer under `accelerate launch` with DeepSpeed ZeRO-3 on 2 CPU processes, against one process.

`tests/distributed/dream_parity.py` runs the same dreaming (greedy dreams, a continuous tau, the same global batch:
1 x 4 against 2 x 2) in both set-ups. Under ZeRO-3 every process gathers the full policy for the dream reward
(the isolated inner loop trains a LoRA copy of the gathered weights), for tau and for writing dreams, so both runs
must score the same dreams, keep the same ones and make the same update, to float round-off of the reduced
gradients; the logged metrics are over all processes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/distributed/dream_parity.py"
ZERO3 = ROOT / "recipes/accelerate/zero3_cpu.yaml"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(cmd, tmp):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLEEP_TRL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("dream")
    one, two = tmp / "one", tmp / "two"
    _run([sys.executable, str(SCRIPT), str(one), "4"], tmp)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3), str(SCRIPT), str(two), "2"],
         tmp)
    return one, two


def test_zero3_dreaming_makes_the_same_update_as_one_process(runs):
    from sleep_trl.tiny import cached_tiny

    one, two = runs
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    initial = load_file(Path(cached_tiny("qwen2")) / "model.safetensors")
    changed = max((a[k].float() - initial[k].float()).abs().max().item() for k in a if k in initial)
    assert changed > 1e-4  # the dreams did train the policy


def test_zero3_dreaming_logs_the_same_metrics(runs):
    one, two = (json.loads((run / "dream_metrics.json").read_text()) for run in runs)
    assert one["tau_before"] == pytest.approx(two["tau_before"], abs=1e-5)
    assert one["tau_after"] == pytest.approx(two["tau_after"], abs=1e-5)
    assert len(one["logs"]) == len(two["logs"]) == 2
    for first, second in zip(one["logs"], two["logs"], strict=True):
        assert first.keys() == second.keys()
        assert 0 < first["dream/selected_fraction"] < 1 and first["rest_em/kept_fraction"] > 0
        for key in first:
            assert first[key] == pytest.approx(second[key], abs=1e-4), key

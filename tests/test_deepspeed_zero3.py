"""A real DeepSpeed ZeRO-3 run: 2 CPU processes through `accelerate launch`, the seed job, a tiny student."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_zero3_two_process_cpu_run_trains_only_the_chosen_parameters(tmp_path):
    pytest.importorskip("deepspeed")
    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Tell me about the lake number {i}."}]}) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLEEP_TRL_CACHE": str(tmp_path / "cache"), "CI": "1",
           "OMP_NUM_THREADS": "1"}
    learned = "model.layers.2.mlp.down_proj.weight"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/zero3_cpu.yaml"), "-m", "sleep_trl", str(ROOT / "recipes/seed_tiny.yaml"),
        "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "3",
        "--trainable_parameters", learned,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "'distill/loss'" in proc.stdout + proc.stderr

    import yaml

    from sleep_trl.assets import resolve_model_path

    spec = yaml.safe_load((ROOT / "recipes/seed_tiny.yaml").read_text())["model_name_or_path"]
    os.environ["SLEEP_TRL_CACHE"] = str(tmp_path / "cache")
    try:
        initial = load_file(Path(resolve_model_path(spec)) / "model.safetensors")
    finally:
        del os.environ["SLEEP_TRL_CACHE"]
    trained = load_file(out / "model.safetensors")
    assert set(trained) == set(initial)
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed == {learned}
    assert (out / "README.md").exists()

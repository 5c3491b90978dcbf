"""The README's Python snippets run as written (each in a fresh interpreter, in a scratch directory, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if b.lstrip().startswith(("from ", "import "))]
# Snippets that load the packaged SmolLM2 are slow on CPU; the tiny-model ones run in the default suite.
PARAMS = [pytest.param(b, marks=[pytest.mark.slow] if "smollm2" in b else [], id=f"block{i}")
          for i, b in enumerate(RUNNABLE)]


def test_the_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("code", PARAMS)
def test_readme_snippet_runs(code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

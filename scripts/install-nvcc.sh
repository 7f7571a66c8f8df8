#!/usr/bin/env bash
# Install nvcc 13.0 from PyPI into a virtual environment (idempotent) and print nvcc's path.
#
# Usage: scripts/install-nvcc.sh [VENV_DIR]      (default: $REPO/.venv-nvcc, git-ignored)
# Then:  export NVCC="$(scripts/install-nvcc.sh | tail -n1)"
#
# The wheels put the toolkit under site-packages/nvidia/cu13/{bin,include,nvvm,lib}; the
# moe-kernels build script finds the headers and libdevice from nvcc's location.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-nvcc}"
python="${PYTHON:-python3}"
pkgs=(nvidia-cuda-nvcc==13.0.88 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*'
      'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*')

find_nvcc() {
    local f
    for f in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc \
             "$venv"/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/nvcc; do
        if [ -x "$f" ]; then echo "$f"; return 0; fi
    done
    return 1
}

if ! nvcc_path="$(find_nvcc)" || ! "$nvcc_path" --version >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/python" ]; then
        if ! "$python" -m venv "$venv" >&2; then
            echo "install-nvcc: '$python -m venv' failed; on Debian/Ubuntu: apt-get install -y python3-venv" >&2
            rm -rf "$venv"
            exit 1
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" >&2
    nvcc_path="$(find_nvcc)" || { echo "install-nvcc: nvcc not found after install" >&2; exit 1; }
fi
"$nvcc_path" --version >&2
echo "$nvcc_path"

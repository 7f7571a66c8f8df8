#!/usr/bin/env bash
# Build the moe-cuda test and bench binaries (release, kernels required; as cuda.tar.xz) and the
# moe-wgpu test binaries and wgpu_bench (as wgpu.tar.xz) and copy them, the golden cases and
# scripts/gpu-run.sh into a staging folder that a GPU machine without a Rust toolchain can run
# from.
#
# Usage: scripts/stage-gpu.sh [STAGE_DIR]     (default: $REPO/gpu-stage)
# On the GPU machine: cd STAGE_DIR && ./gpu-run.sh [what...]   (see gpu-run.sh)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/gpu-stage}"
cd "$repo"
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
    NVCC="$(scripts/install-nvcc.sh | tail -n1)"
    export NVCC
fi
export MOE_REQUIRE_NVCC=1
cargo_q() { nice -n 10 cargo "$@" --release --message-format=json-render-diagnostics; }
# Executables cargo reports; `executables tests` keeps only test harnesses (cargo test --no-run
# also builds the examples, which are staged under their own names below).
executables() {
    python3 -c '
import json, sys
only_tests = len(sys.argv) > 1
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if only_tests and not m.get("profile", {}).get("test"):
        continue
    print(m["executable"])' "$@"
}
mkdir -p "$dest"
find "$dest" -maxdepth 1 -type f -delete  # the previous staging (files only; golden/ is replaced below)
tests="$(cargo_q test -p moe-cuda --features nccl --no-run | executables tests)"
mgb="$(cargo_q build -p moe-cuda --features nccl --example multi_gpu_bench | executables)"
bench="$(cargo_q build -p moe-cuda --example bench | executables)"
quick="$(cargo_q build -p moe-cuda --example cuda_quickstart | executables)"
# the wgpu backend's tests and bench (run on the GPU's Vulkan driver by `gpu-run.sh wgpu`)
wtests="$(cargo_q test -p moe-wgpu --no-run | executables tests)"
wbench="$(cargo_q build -p moe-wgpu --example wgpu_bench | executables)"
wbw="$(cargo_q build -p moe-wgpu --example wgpu_bandwidth | executables)"
for t in $tests; do
    cp "$t" "$dest/"
done
cp "$bench" "$dest/bench"
cp "$quick" "$dest/quickstart"
cp "$mgb" "$dest/multi_gpu_bench"
rm -rf "$dest/golden"
cp -r "$repo/golden" "$dest/golden"
cp "$repo/scripts/gpu-run.sh" "$dest/gpu-run.sh"
cp "$repo/benches/torch_anchor.py" "$dest/torch_anchor.py"
cp "$repo/benches/gpu_report.py" "$dest/gpu_report.py"
# keep the staged tree small (the device tool carries at most 64 MiB)
for f in "$dest"/*-* "$dest/bench" "$dest/quickstart" "$dest/multi_gpu_bench"; do
    [ -f "$f" ] && strip --strip-debug "$f" 2>/dev/null || true
done
# The CUDA binaries each carry the same fatbin and runtime (~7 MiB stripped, ~50 MiB in all):
# one xz tarball of them (~3.5 MiB); gpu-run.sh unpacks it in place before anything runs.
cuda_bins=()
for f in "$dest"/*; do
    [ -f "$f" ] && [ -x "$f" ] && [ "$(basename "$f")" != gpu-run.sh ] && cuda_bins+=("$(basename "$f")")
done
tar -cJf "$dest/cuda.tar.xz" -C "$dest" "${cuda_bins[@]}"
(cd "$dest" && rm -f "${cuda_bins[@]}")
# The wgpu binaries each carry wgpu and naga (~6-8 MiB stripped): one xz tarball of them all
# (~5 MiB, xz shares the common code across files); gpu-run.sh unpacks it into wgpu-bin/.
wtmp="$(mktemp -d)"
for t in $wtests; do
    strip --strip-debug -o "$wtmp/wgpu-test-$(basename "$t")" "$t"
done
strip --strip-debug -o "$wtmp/wgpu_bench" "$wbench"
strip --strip-debug -o "$wtmp/wgpu_bandwidth" "$wbw"
rm -rf "$dest/wgpu-bin"
tar -cJf "$dest/wgpu.tar.xz" -C "$wtmp" .
rm -rf "$wtmp"
ls -la "$dest"
du -sh "$dest"

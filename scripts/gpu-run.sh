#!/usr/bin/env bash
# Run the staged moe-cuda binaries on a GPU machine (from the staging folder).
# Usage: ./gpu-run.sh [conformance] [sanitize] [quickstart] [bench] [anchor] [multi_gpu]
#                    [multi_gpu_bench]                                       (default: conformance)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export MOE_GOLDEN_DIR="$here/golden"
what="${*:-conformance}"
conf="$(ls "$here"/conformance-* 2>/dev/null | grep -v '\.d$' | head -n1)"
rc=0
# cudarc loads libnccl.so, NCCL's runtime packages ship libnccl.so.2: link it under that name.
nccl_path() {
    local lib
    lib="$(find /usr/lib /usr/lib64 /usr/local /opt /root -name 'libnccl.so.2' 2>/dev/null | head -n1)"
    if [ -n "$lib" ]; then
        mkdir -p "$here/nccl-lib"
        ln -sf "$lib" "$here/nccl-lib/libnccl.so"
        export LD_LIBRARY_PATH="$here/nccl-lib:${LD_LIBRARY_PATH:-}"
        echo "NCCL: $lib"
    else
        echo "NCCL: no libnccl.so.2 found (the multi-GPU tests will skip)"
    fi
}
for w in $what; do
    case "$w" in
    conformance)
        for t in "$here"/conformance-* "$here"/parallel-*; do
            [ -x "$t" ] || continue
            echo "=== $(basename "$t")"
            "$t" --nocapture --test-threads=1 || rc=1
        done ;;
    sanitize)
        echo "=== compute-sanitizer memcheck (golden, other kernels, graph, larger shapes, wgmma shapes)"
        compute-sanitizer --tool memcheck --print-limit 20 "$conf" --test-threads=1 golden graph larger wgmma 2>&1 | tail -n 25 || rc=1
        echo "=== compute-sanitizer racecheck (golden)"
        compute-sanitizer --tool racecheck --print-limit 20 "$conf" --test-threads=1 golden 2>&1 | tail -n 25 || rc=1 ;;
    quickstart)
        echo "=== quickstart"
        ./quickstart || rc=1 ;;
    bench)
        echo "=== bench"
        # cuBLAS (for the matmul-rate ceiling) from wherever the machine has it (e.g. PyTorch's wheels)
        lib="$(find /opt /usr/local /usr/lib -name 'libcublas.so*' 2>/dev/null | head -n1)"
        [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
        timeout "${BENCH_TIMEOUT:-320}" ./bench ${BENCH_ARGS:-} --csv "${OUT:-.}/bench.csv" || rc=1 ;;
    multi_gpu)
        echo "=== multi_gpu (TP=2 / EP=2 over NCCL)"
        nccl_path
        nvidia-smi -L 2>/dev/null || true
        for t in "$here"/multi_gpu-*; do
            [ -x "$t" ] || continue
            timeout "${MULTI_GPU_TIMEOUT:-400}" "$t" --nocapture --test-threads=1 || rc=1
        done ;;
    multi_gpu_bench)
        echo "=== multi_gpu_bench"
        nccl_path
        timeout "${BENCH_TIMEOUT:-400}" ./multi_gpu_bench ${MULTI_GPU_BENCH_ARGS:-} || rc=1 ;;
    anchor)
        echo "=== torch anchor"
        PYTHONUNBUFFERED=1 timeout "${ANCHOR_TIMEOUT:-200}" python3 torch_anchor.py ${ANCHOR_ARGS:-} || rc=1 ;;
    esac
done
exit $rc

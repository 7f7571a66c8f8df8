#!/usr/bin/env bash
# Run the staged moe-cuda binaries on a GPU machine (from the staging folder).
# Usage: ./gpu-run.sh [conformance] [sanitize] [quickstart] [bench] [anchor] [report] [multi_gpu]
#                    [multi_gpu_bench] [wgpu] [wgpu_bench] [wgpu_bw] [wgpu_ab] [profile]
#
# wgpu: the moe-wgpu tests on the GPU's Vulkan driver (never llvmpipe: they must find a
# discrete adapter), then wgpu_bench; wgpu_bench: only the bench. Vulkan loader .deb files in
# ../.gl (or ./.gl) are unpacked first. `bench wgpu` in one call puts the CUDA figures next to
# the wgpu ones. Env: WGPU_BENCH_ARGS, WGPU_BENCH_TIMEOUT (280 s), WGPU_TEST_TIMEOUT (600 s),
# MOE_WGPU_REQUIRE_DEVICE_TYPE (discrete).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export MOE_GOLDEN_DIR="$here/golden"
what="${*:-conformance}"
# stage-gpu.sh packs the CUDA binaries into cuda.tar.xz (the staged tree must stay small)
untar() {
    tar -xJf "$1" -C "$2" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}
[ -f "$here/cuda.tar.xz" ] && untar "$here/cuda.tar.xz" "$here"
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
# Unpack the wgpu binaries, install the Vulkan loader, and make sure the loader sees the NVIDIA
# ICD (checked by asking wgpu_bench which adapter Vulkan gives; no vulkaninfo needed).
wgpu_ready=""
wgpu_setup() {
    [ -n "$wgpu_ready" ] && return 0
    wgpu_ready=1
    if [ -f "$here/wgpu.tar.xz" ]; then
        rm -rf "$here/wgpu-bin" && mkdir -p "$here/wgpu-bin"
        untar "$here/wgpu.tar.xz" "$here/wgpu-bin"
    fi
    local gl=""
    for d in "$here/../.gl" "$here/.gl"; do
        [ -d "$d" ] && gl="$d" && break
    done
    if [ -n "$gl" ]; then
        echo "Vulkan: unpacking $(ls "$gl"/*.deb 2>/dev/null | wc -l) .deb files from $gl"
        for f in "$gl"/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
    export WGPU_BACKEND=vulkan
    local probe="$here/wgpu-bin/wgpu_bench"
    local adapter
    adapter="$("$probe" --info 2>&1 | grep '^adapter:')"
    echo "Vulkan adapter (loader defaults): ${adapter:-none}"
    if ! echo "$adapter" | grep -q 'DiscreteGpu'; then
        local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        [ -f "$icd" ] || icd="$(find /usr/local/nvidia /usr/share/vulkan /etc/vulkan /usr/local/share/vulkan \
            -name 'nvidia_icd*.json' 2>/dev/null | head -n1)"
        if [ -n "$icd" ] && [ -f "$icd" ]; then
            export VK_DRIVER_FILES="$icd" VK_ICD_FILENAMES="$icd"
            echo "Vulkan: VK_DRIVER_FILES=$icd ($(tr -d '\n ' <"$icd" | head -c 300))"
            adapter="$("$probe" --info 2>&1 | grep '^adapter:')"
            echo "Vulkan adapter (NVIDIA ICD): ${adapter:-none}"
        else
            echo "Vulkan: no nvidia_icd.json found"
        fi
        if ! echo "$adapter" | grep -q 'DiscreteGpu'; then
            echo "Vulkan: no discrete adapter; loader and driver libraries:"
            ldconfig -p 2>/dev/null | grep -E 'libvulkan|GLX_nvidia|nvidia-glcore' | head -n 8
        fi
    fi
}
wgpu_bench_run() {
    echo "=== wgpu_bench"
    local cuda=()
    [ -f "${OUT:-.}/bench.csv" ] && cuda=(--cuda-csv "${OUT:-.}/bench.csv")
    timeout "${WGPU_BENCH_TIMEOUT:-280}" "$here/wgpu-bin/wgpu_bench" ${WGPU_BENCH_ARGS:-} \
        --csv "${OUT:-.}/wgpu_bench.csv" "${cuda[@]}" || rc=1
}
for w in $what; do
    case "$w" in
    conformance)
        for t in "$here"/conformance-* "$here"/parallel-* "$here"/edge_shapes-*; do
            [ -x "$t" ] || continue
            echo "=== $(basename "$t")"
            "$t" --nocapture --test-threads=1 || rc=1
        done ;;
    sanitize)
        echo "=== compute-sanitizer memcheck (golden, other kernels, graph, larger, decode and wgmma shapes)"
        compute-sanitizer --tool memcheck --print-limit 20 "$conf" --test-threads=1 golden graph larger decode wgmma 2>&1 | tail -n 25 || rc=1
        echo "=== compute-sanitizer racecheck (golden)"
        compute-sanitizer --tool racecheck --print-limit 20 "$conf" --test-threads=1 golden 2>&1 | tail -n 25 || rc=1
        echo "=== compute-sanitizer racecheck (decode GEMM shapes)"
        compute-sanitizer --tool racecheck --print-limit 20 "$conf" --test-threads=1 conformance_decode_shapes 2>&1 | tail -n 25 || rc=1
        echo "=== compute-sanitizer racecheck (wgmma and wgmma+TMA GEMM shapes)"
        compute-sanitizer --tool racecheck --print-limit 20 "$conf" --test-threads=1 wgmma 2>&1 | tail -n 25 || rc=1 ;;
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
    wgpu)
        wgpu_setup
        for t in "$here"/wgpu-bin/wgpu-test-*; do
            [ -x "$t" ] || continue
            echo "=== $(basename "$t")"
            MOE_WGPU_REQUIRE_ADAPTER=1 \
                MOE_WGPU_REQUIRE_DEVICE_TYPE="${MOE_WGPU_REQUIRE_DEVICE_TYPE:-discrete}" \
                timeout "${WGPU_TEST_TIMEOUT:-600}" "$t" --nocapture --test-threads=1 || rc=1
        done
        wgpu_bench_run ;;
    wgpu_bench)
        wgpu_setup
        wgpu_bench_run ;;
    profile)
        # Nsight Compute (if the machine has it) on one launch of each Hopper GEMM kernel of the
        # dense 8192^3 product (bench --dense-only): full sections, a text summary under $OUT.
        echo "=== ncu profile (dense 8192^3: TMA and clustered wgmma kernels)"
        ncu_bin="$(command -v ncu || find /usr/local /opt -name ncu -type f 2>/dev/null | head -n1)"
        if [ -z "$ncu_bin" ]; then
            echo "ncu: not found"
        else
            lib="$(find /opt /usr/local /usr/lib -name 'libcublas.so*' 2>/dev/null | head -n1)"
            [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
            for k in ${PROFILE_KERNELS:-moe_gemm_wgt_bf16 moe_gemm_wgm_bf16}; do
                timeout "${PROFILE_TIMEOUT:-200}" "$ncu_bin" --set full -k "$k" -c 1 -f \
                    -o "${OUT:-.}/prof-$k" ./bench --dense-only >/dev/null 2>&1 || rc=1
                "$ncu_bin" --import "${OUT:-.}/prof-$k.ncu-rep" --page details \
                    >"${OUT:-.}/prof-$k.txt" 2>&1 || rc=1
                grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|Registers Per|Achieved Occupancy|Stall" \
                    "${OUT:-.}/prof-$k.txt" | head -n 30
            done
        fi ;;
    wgpu_ab)
        # the wgpu bench at T = 1, 16 (bf16) under each alternative setting, for A/B against
        # the defaults (stream few-row kernel, one submission per forward)
        wgpu_setup
        for v in MOE_WGPU_GEMV_KERNEL=resident MOE_WGPU_BATCH_FORWARD=0 \
            MOE_WGPU_GEMV_STREAM_WORDS=8 MOE_WGPU_GEMV_STREAM_WORDS=32; do
            echo "### $v"
            env "$v" timeout "${WGPU_BENCH_TIMEOUT:-150}" "$here/wgpu-bin/wgpu_bench" \
                --models mixtral,qwen3,gpt-oss --tokens 1,16 --dtypes bf16 \
                --csv "${OUT:-.}/wgpu_bench-${v//=/_}.csv" || rc=1
        done ;;
    wgpu_bw)
        wgpu_setup
        echo "=== wgpu_bandwidth"
        timeout "${WGPU_BENCH_TIMEOUT:-280}" "$here/wgpu-bin/wgpu_bandwidth" ${WGPU_BW_ARGS:-} || rc=1 ;;
    anchor)
        echo "=== torch anchor"
        PYTHONUNBUFFERED=1 timeout "${ANCHOR_TIMEOUT:-200}" python3 torch_anchor.py ${ANCHOR_ARGS:-} \
            --csv "${OUT:-.}/anchor.csv" || rc=1 ;;
    report)
        echo "=== report (bench.csv + anchor.csv of this run, and the issue's bar)"
        python3 gpu_report.py "${OUT:-.}/bench.csv" "${OUT:-.}/anchor.csv" || rc=1 ;;
    esac
done
exit $rc

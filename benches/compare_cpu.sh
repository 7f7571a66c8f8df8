#!/usr/bin/env bash
# moe-cpu against PyTorch CPU eager, back to back per shape (ours, then PyTorch, same shape and
# settings), then the side-by-side table. Honors MOE_BENCH_SHAPES / _T / _DTYPES / _THREADS.
# Creates benches/.venv with torch on first use (see run_torch_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/compare-cpu
export MOE_BENCH_THREADS="${MOE_BENCH_THREADS:-2}"
mkdir -p "$out"
rm -f "$out/ours.csv" "$out/torch.csv"
cargo build --release -p moe-benches --features cpu --example report
shapes="${MOE_BENCH_SHAPES:-qwen3_30b_a3b,gpt_oss_120b,mixtral_8x7b,deepseek_v3}"
for s in ${shapes//,/ }; do
  echo "== $s: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"
  MOE_BENCH_SHAPES=$s MOE_BENCH_CSV="$out/ours.csv" ./target/release/examples/report
  MOE_BENCH_SHAPES=$s benches/run_torch_cpu.sh --csv "$out/torch-$s.csv"
done
head -1 "$out/torch-${shapes%%,*}.csv" > "$out/torch.csv"
for s in ${shapes//,/ }; do tail -n +2 "$out/torch-$s.csv" >> "$out/torch.csv"; done
python3 benches/compare.py "$out/ours.csv" "$out/torch.csv" | tee "$out/table.md"

#!/usr/bin/env bash
# moe-cpu against PyTorch CPU eager, back to back per shape (ours, then PyTorch, same shape and
# settings), MOE_COMPARE_ROUNDS times (default 2) in alternation, then the side-by-side table:
# each side's best median over the rounds, so that a slow spell of a shared machine hits both
# sides alike. Honors MOE_BENCH_SHAPES / _T / _DTYPES / _THREADS.
# Creates benches/.venv with torch on first use (see run_torch_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/compare-cpu
export MOE_BENCH_THREADS="${MOE_BENCH_THREADS:-2}"
rounds="${MOE_COMPARE_ROUNDS:-2}"
mkdir -p "$out"
rm -f "$out"/ours.csv "$out"/torch*.csv
cargo build --release -p moe-benches --features cpu --example report --example peaks
./target/release/examples/peaks | tee "$out/peaks.txt"
shapes="${MOE_BENCH_SHAPES:-qwen3_30b_a3b,gpt_oss_120b,mixtral_8x7b,deepseek_v3}"
for s in ${shapes//,/ }; do
  for r in $(seq "$rounds"); do
    echo "== $s round $r: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"
    MOE_BENCH_SHAPES=$s MOE_BENCH_CSV="$out/ours.csv" ./target/release/examples/report
    MOE_BENCH_SHAPES=$s benches/run_torch_cpu.sh --csv "$out/torch-$s-$r.csv"
  done
done
first=$(ls "$out"/torch-*-1.csv | head -1)
head -1 "$first" > "$out/torch.csv"
for f in "$out"/torch-*-*.csv; do tail -n +2 "$f" >> "$out/torch.csv"; done
python3 benches/compare.py "$out/ours.csv" "$out/torch.csv" | tee "$out/table.md"

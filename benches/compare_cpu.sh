#!/usr/bin/env bash
# moe-cpu against PyTorch CPU eager, point by point: for each shape, both sides start together
# and take turns through two named pipes (a baton), so that each point (shape, dtype, T, threads)
# is timed by moe-cpu and by PyTorch within seconds of each other and never while the other side
# runs; layer builds take turns too. MOE_COMPARE_ROUNDS times (default 2), the side that goes
# first alternating between rounds, then the side-by-side table: each side's best median over the
# rounds, and the worst of the per-round ratios (each round's PyTorch time over ours in that
# round, the two timed seconds apart). Honors MOE_BENCH_SHAPES / _T / _DTYPES / _THREADS.
# Creates benches/.venv with torch on first use (see run_torch_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/compare-cpu
export MOE_BENCH_THREADS="${MOE_BENCH_THREADS:-2}"
rounds="${MOE_COMPARE_ROUNDS:-2}"
mkdir -p "$out"
rm -f "$out"/ours*.csv "$out"/torch*.csv
cargo build --release -p moe-benches --features cpu --example report --example peaks
./target/release/examples/peaks | tee "$out/peaks.txt"
# Fresh pipes per round (a last hand-on may stay unread in one); this shell keeps both open
# read-write so that neither side's open blocks and neither write fails.
pipes() {
  exec 3>&- 4>&-
  rm -f "$out/baton.ours" "$out/baton.torch"
  mkfifo "$out/baton.ours" "$out/baton.torch"
  exec 3<>"$out/baton.ours" 4<>"$out/baton.torch"
}
shapes="${MOE_BENCH_SHAPES:-qwen3_30b_a3b,gpt_oss_120b,mixtral_8x7b,deepseek_v3}"
for s in ${shapes//,/ }; do
  for r in $(seq "$rounds"); do
    echo "== $s round $r: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"
    pipes
    MOE_BENCH_SHAPES=$s MOE_BENCH_CSV="$out/ours-$s-$r.csv" MOE_BENCH_BATON_IN="$out/baton.ours" \
      MOE_BENCH_BATON_OUT="$out/baton.torch" ./target/release/examples/report &
    ours=$!
    MOE_BENCH_SHAPES=$s MOE_BENCH_BATON_IN="$out/baton.torch" MOE_BENCH_BATON_OUT="$out/baton.ours" \
      benches/run_torch_cpu.sh --csv "$out/torch-$s-$r.csv" &
    torch=$!
    if ((r % 2)); then echo go >&3; else echo go >&4; fi
    # Either side failing would leave the other waiting for the baton: stop both. (Each wait
    # names only the side still running: bash reports a reaped pid as "no such job".)
    left=("$ours" "$torch")
    for _ in 1 2; do
      wait -n -p fin "${left[@]}" || { kill "$ours" "$torch" 2>/dev/null; echo "a side failed" >&2; exit 1; }
      if [[ $fin == "$ours" ]]; then left=("$torch"); else left=("$ours"); fi
    done
  done
done
exec 3>&- 4>&-
rm -f "$out/baton.ours" "$out/baton.torch"
# Each side's rows of all rounds in one file, with the round in a last column (compare.py
# pairs the two sides' times of the same round).
for side in ours torch; do
  first=$(ls "$out/$side"-*-1.csv | head -1)
  echo "$(head -1 "$first"),round" > "$out/$side.csv"
  for f in "$out/$side"-*-*.csv; do
    r=${f##*-}
    tail -n +2 "$f" | sed "s/\$/,${r%.csv}/" >> "$out/$side.csv"
  done
done
python3 benches/compare.py "$out/ours.csv" "$out/torch.csv" | tee "$out/table.md"

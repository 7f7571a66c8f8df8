#!/usr/bin/env python3
"""Side by side: moe-cpu whole layer (target/moe-benches-cpu.csv) against PyTorch CPU eager
(target/torch-cpu.csv, best of its two variants). Where a point was measured in several rounds
(benches/compare_cpu.sh), each side keeps its best median. Ratio = PyTorch ms / moe-cpu ms
(> 1: we are faster). The GEMM columns: % of the arithmetic peaks, the GB/s at which the expert
GEMMs read the active experts' weights, and their time as % of the hardware floor (FLOPs at the
highest arithmetic peak for the dtype, or weight bytes at the measured memory read bandwidth,
whichever takes longer). Above 100 %: part of the weights stayed in the last-level cache between
forwards (small decode working sets), or the bandwidth reading fell in a slower spell of a shared
host than the GEMM's. Where both files carry a `round` column (compare_cpu.sh), the last column is
the worst over the rounds of the ratio within one round (the two sides timed seconds apart)."""
import csv
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
ours_p = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "target", "moe-benches-cpu.csv")
torch_p = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "target", "torch-cpu.csv")
ours = {}
# Per round, where the files say (point -> round -> ms): ours, and PyTorch's best variant.
ours_r, torch_r = {}, {}
# Points without a whole-layer time (the criterion bench's quick mode times the layer at its
# first T only): nothing to set against PyTorch's layer, so left out and counted.
untimed = set()
for r in csv.DictReader(open(ours_p)):
    key = (r["shape"], r["dtype"], r["tokens"], r["threads"])
    if not r["layer_ms"]:
        untimed.add(key)
        continue
    if r.get("round"):
        ours_r.setdefault(key, {})[r["round"]] = float(r["layer_ms"])
    if key not in ours or float(r["layer_ms"]) < float(ours[key]["layer_ms"]):
        ours[key] = r
untimed -= ours.keys()
torch_rows = {}
for r in csv.DictReader(open(torch_p)):
    v = torch_rows.setdefault((r["shape"], r["dtype"], r["tokens"], r["threads"]), {})
    v[r["variant"]] = min(v.get(r["variant"], float("inf")), float(r["ms"]))
    if r.get("round"):
        w = torch_r.setdefault((r["shape"], r["dtype"], r["tokens"], r["threads"]), {})
        w[r["round"]] = min(w.get(r["round"], float("inf")), float(r["ms"]))
paired = bool(ours_r)
print("| shape | dtype | T | threads | GEMM % f32 peak | GEMM % bf16 peak | GEMM weights GB/s | GEMM % of floor "
      "| moe-cpu ms | torch hf_loop ms | torch matmul_loop ms | speed-up vs best torch |"
      + (" worst round |" if paired else ""))
print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if paired else ""))
wins = 0
every_round = 0


def round_ratios(key):
    """The per-round ratios of a point, over the rounds both sides timed."""
    o, t = ours_r.get(key, {}), torch_r.get(key, {})
    return [t[n] / o[n] for n in o if n in t]


for key, r in ours.items():
    t = torch_rows.get(key)
    if not t:
        continue
    best = min(t.values())
    ms = float(r["layer_ms"])
    wins += best > ms
    dp = r.get("gemm_pct_dpbf16_peak") or ""
    dp = f"{float(dp):.1f}" if dp else "-"
    # Columns of reports from before the memory floor was measured are absent: "-".
    gbs = f"{float(r['gemm_weight_gbs']):.1f}" if r.get("gemm_weight_gbs") else "-"
    fl = f"{float(r['gemm_pct_floor']):.1f}" if r.get("gemm_pct_floor") else "-"
    rr = round_ratios(key)
    every_round += bool(rr) and min(rr) > 1
    worst = f"{min(rr):.2f}x of {len(rr)}" if rr else "-"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {float(r['gemm_pct_peak']):.1f} | {dp} | {gbs} | {fl} | {ms:.3f} | "
          f"{t.get('hf_loop', float('nan')):.3f} | {t.get('matmul_loop', float('nan')):.3f} | {best / ms:.2f}x |"
          + (f" {worst} |" if paired else ""))
print(f"\nfaster at {wins} of {sum(1 for k in ours if k in torch_rows)} points")
if paired:
    print(f"faster in every round at {every_round} of them")
if untimed:
    print(f"{len(untimed)} points without a whole-layer time (quick mode) left out")

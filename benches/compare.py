#!/usr/bin/env python3
"""Side by side: moe-cpu whole layer (target/moe-benches-cpu.csv) against PyTorch CPU eager
(target/torch-cpu.csv, best of its two variants). Ratio = PyTorch ms / moe-cpu ms (> 1: we are
faster)."""
import csv
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
ours_p = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "target", "moe-benches-cpu.csv")
torch_p = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "target", "torch-cpu.csv")
ours = {(r["shape"], r["dtype"], r["tokens"], r["threads"]): r for r in csv.DictReader(open(ours_p))}
torch_rows = {}
for r in csv.DictReader(open(torch_p)):
    torch_rows.setdefault((r["shape"], r["dtype"], r["tokens"], r["threads"]), {})[r["variant"]] = float(r["ms"])
print(f"| shape | dtype | T | threads | GEMM % peak | moe-cpu ms | torch hf_loop ms | torch matmul_loop ms | speed-up vs best torch |")
print("|---|---|---|---|---|---|---|---|---|")
for key, r in ours.items():
    t = torch_rows.get(key)
    if not t:
        continue
    best = min(t.values())
    ms = float(r["layer_ms"])
    print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {float(r['gemm_pct_peak']):.1f} | {ms:.3f} | "
          f"{t.get('hf_loop', float('nan')):.3f} | {t.get('matmul_loop', float('nan')):.3f} | {best / ms:.2f}x |")

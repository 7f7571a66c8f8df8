#!/usr/bin/env python3
"""One table from one GPU session: the moe-cuda bench (`bench --csv`), the PyTorch anchors of
the same run (`torch_anchor.py --csv`) and the bar of the "beat the best public MoE kernels"
issue (best of vLLM's tuned Triton fused_moe, torch._grouped_mm and a per-expert cuBLAS loop,
H100 80GB HBM3, bf16, whole layer, measured 2026-11-23 by whoever filed the issue: a fixed
target, not a measurement of this run).

Usage: gpu_report.py BENCH_CSV ANCHOR_CSV
Ratios > 1 mean moe-cuda is faster.
"""
import csv
import math
import sys

BAR = {  # ms, from the issue text
    "qwen3-30b-a3b": [0.074, 0.306, 0.462, 0.581, 1.103, 3.290],
    "gpt-oss-120b": [0.119, 0.856, 2.089, 2.361, 3.282, 7.853],
    "mixtral-8x7b": [0.287, 0.987, 1.025, 1.749, 5.337, 20.88],
    "deepseek-v3": [0.368, 2.305, 5.247, 7.413, 14.61, 33.27],
}
BAR_T = [1, 16, 128, 1024, 4096, 16384]


def main():
    ours = {}
    with open(sys.argv[1]) as f:
        for r in csv.reader(f):
            if len(r) >= 7:
                ours[(r[0], int(r[1]))] = (float(r[2]), float(r[6]))
    anchor = {}
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            for r in csv.reader(f):
                if len(r) >= 5:
                    anchor[(r[0], int(r[1]), r[2])] = float(r[3])
    print("| model | T | moe-cuda ms | % of floor | grouped_mm ms | matmul loop ms | bar ms "
          "| loop / ours | bar / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    slower_than_loop, logs, at_bar = [], [], 0
    for (model, t), (ms, floor) in ours.items():
        g = anchor.get((model, t, "grouped_mm"), math.nan)
        lp = anchor.get((model, t, "matmul loop"), math.nan)
        bar = BAR.get(model, [math.nan] * 6)[BAR_T.index(t)] if t in BAR_T else math.nan
        if lp == lp and ms > lp:
            slower_than_loop.append(f"{model} T={t}")
        if bar == bar:
            logs.append(math.log(bar / ms))
            at_bar += ms <= 1.05 * bar
        print(f"| {model} | {t} | {ms:.3f} | {100 * floor / ms:.1f}% | {g:.3f} | {lp:.3f} | "
              f"{bar:.3f} | {lp / ms:.2f} | {bar / ms:.2f} |")
    print()
    print(f"points slower than the per-expert matmul loop: {len(slower_than_loop)}"
          + (f" ({', '.join(slower_than_loop)})" if slower_than_loop else ""))
    if logs:
        print(f"points within 1.05x of the bar: {at_bar}/{len(logs)}; geometric mean bar / ours: "
              f"{math.exp(sum(logs) / len(logs)):.3f} (target >= 1.3)")


if __name__ == "__main__":
    main()

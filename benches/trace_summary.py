#!/usr/bin/env python3
"""Where the threads' time went in a timeline of `examples/probe` (feature `trace`, `TRACE=`).

For each file: per GEMM (by K) the span and each thread's busy time, then the thread time by
item size (items without the steps they took on, steps, epilogues) against the time at the
per-thread FMA peak (`PEAK1`, GFLOP/s, default 172), and the gaps between a thread's records.
"""
import collections
import csv
import os
import sys

PEAK1 = float(os.environ.get("PEAK1", "172"))


def size_class(m):
    for hi, name in ((8, "1-7"), (24, "8-23"), (32, "24-31"), (48, "32-47"), (64, "48-63")):
        if m < hi:
            return name
    return "64+"


def summary(path):
    recs = [
        dict(kind=r["kind"], group=int(r["group"]), rows=int(r["rows"]), cols=int(r["cols"]),
             k=int(r["k"]), thread=int(r["thread"]), start=float(r["start"]), end=float(r["end"]))
        for r in csv.DictReader(open(path))
    ]
    print(path)
    classes = collections.defaultdict(lambda: [0.0, 0.0])
    for k in sorted({r["k"] for r in recs}):
        rr = [r for r in recs if r["k"] == k]
        t0, t1 = min(r["start"] for r in rr), max(r["end"] for r in rr)
        items = [r for r in rr if r["kind"] == "Item"]
        steps = [r for r in rr if r["kind"] == "Step"]
        busy = collections.defaultdict(float)
        for r in rr:
            nested = r["kind"] == "Step" and any(
                i["thread"] == r["thread"] and i["start"] <= r["start"] and r["end"] <= i["end"]
                for i in items)
            if not nested:
                busy[r["thread"]] += r["end"] - r["start"]
        print(f"  K={k}: span {1e3 * (t1 - t0):.1f} ms, busy per thread "
              + ", ".join(f"{1e3 * v:.1f}" for _, v in sorted(busy.items())) + " ms")
        for r in rr:
            t = r["end"] - r["start"]
            if r["kind"] == "Item":
                t -= sum(s["end"] - s["start"] for s in steps
                         if s["thread"] == r["thread"] and r["start"] <= s["start"]
                         and s["end"] <= r["end"])
                c = size_class(r["rows"])
            else:
                c = r["kind"].lower()
            classes[c][0] += t
            classes[c][1] += 2.0 * r["rows"] * r["cols"] * k
    total = sum(v[0] for v in classes.values())
    ideal = sum(v[1] for v in classes.values()) / PEAK1 / 1e9
    print(f"  {'class':8} {'thread-ms':>9} {'share':>6} {'GFLOP':>7} {'GF/s/thread':>11} "
          f"{'at peak ms':>10}")
    for c, (t, f) in sorted(classes.items()):
        rate = f"{f / t / 1e9:11.1f}" if f > 0 and t > 0 else f"{'-':>11}"
        print(f"  {c:8} {1e3 * t:9.1f} {100 * t / total:5.1f}% {f / 1e9:7.2f} {rate} "
              f"{1e3 * f / PEAK1 / 1e9:10.1f}")
    print(f"  total {1e3 * total:.1f} thread-ms, at the peak {1e3 * ideal:.1f}")
    for th in sorted({r["thread"] for r in recs}):
        iv = []
        for r in sorted((r for r in recs if r["thread"] == th), key=lambda r: r["start"]):
            if iv and r["start"] <= iv[-1][1]:
                iv[-1][1] = max(iv[-1][1], r["end"])
            else:
                iv.append([r["start"], r["end"]])
        gaps = [b[0] - a[1] for a, b in zip(iv, iv[1:])]
        print(f"  thread {th}: {len(gaps)} gaps between records, {1e3 * sum(gaps):.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        summary(p)

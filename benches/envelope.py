#!/usr/bin/env python3
"""The host's envelope for a layer's f32 expert GEMMs: the GFLOP/s that a kernel with no overhead
at all could reach on this host for the rows the router gave each expert.

`benches/replicas/streamfma.c` measures, for R rows per expert, the FLOP rate of FMAs fed from
f32 weights streamed from memory (R = 0: the plain read); `examples/probe` with `COUNTS=1` prints
a layer's rows per expert and one expert's weight elements. Each expert's weights take, per
element, the time that streamfma's median rate gives at its rows (linear in R between the
measured R, the plain read's time below the first; past the last measured R, that rate's time
per FLOP); the envelope is the layer's FLOPs over the sum. It counts the weights read once and
nothing else: no activations, no outputs, no scheduling; both threads at the same R.

    gcc -O3 -march=native -pthread benches/replicas/streamfma.c -o /tmp/streamfma
    /tmp/streamfma 5 256 2 > /tmp/sf.txt
    S=3 T=128 COUNTS=1 PEAK=0 target/release/examples/probe > /tmp/ds.txt
    python3 benches/envelope.py /tmp/sf.txt /tmp/ds.txt [--peak GFLOPS]

`--peak`: also print the envelope as % of that FMA peak (`examples/peaks`, 2 threads).
"""
import argparse
import re
import sys


def streamfma_table(text):
    """[(R, ns per weight element)] from streamfma's output, by R (median columns)."""
    pts = []
    for m in re.finditer(r"R=\s*(\d+) rows:\s*([\d.]+) GB/s best,\s*([\d.]+) median;"
                         r"\s*([\d.]+) GFLOP/s best,\s*([\d.]+) median", text):
        r, gbs, gflops = int(m[1]), float(m[3]), float(m[5])
        pts.append((r, 4.0 / gbs if r == 0 else 2.0 * r / gflops))
    if len(pts) < 2 or pts[0][0] != 0:
        sys.exit("no streamfma table (R = 0 and at least one R > 0) in the first file")
    return sorted(pts)


def ns_per_weight(pts, r):
    for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
        if r <= r1:
            return t0 + (t1 - t0) * (max(r, r0) - r0) / (r1 - r0)
    rl, tl = pts[-1]
    return tl * r / rl


def probe_counts(text):
    name = re.search(r"^(\S+) T=(\d+)$", text, re.M)
    w = re.search(r"^weights per expert: (\d+)$", text, re.M)
    rows = re.search(r"^rows per expert: \[([\d, ]*)\]$", text, re.M)
    if not (name and w and rows):
        sys.exit("no COUNTS=1 output of examples/probe in " + text[:60])
    return f"{name[1]} T={name[2]}", int(w[1]), [int(x) for x in rows[1].split(",") if x.strip()]


def envelope(pts, weights, rows):
    """(GFLOP, ms, GFLOP/s) of the expert GEMMs at the envelope."""
    flops = sum(2.0 * r * weights for r in rows if r > 0)
    ns = sum(weights * ns_per_weight(pts, r) for r in rows if r > 0)
    return flops / 1e9, ns / 1e6, flops / ns


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("streamfma")
    ap.add_argument("probe", nargs="+")
    ap.add_argument("--peak", type=float)
    a = ap.parse_args()
    pts = streamfma_table(open(a.streamfma).read())
    for p in a.probe:
        name, w, rows = probe_counts(open(p).read())
        gf, ms, rate = envelope(pts, w, rows)
        pct = f", {100 * rate / a.peak:.1f} % of {a.peak:g}" if a.peak else ""
        print(f"{name}: {len(rows)} experts, {min(rows)}-{max(rows)} rows, {gf:.2f} GFLOP, "
              f"envelope {ms:.1f} ms = {rate:.1f} GFLOP/s{pct}")


if __name__ == "__main__":
    main()

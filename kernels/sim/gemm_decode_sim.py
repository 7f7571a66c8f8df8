"""Host simulation of the index mapping of `gemm_decode` (kernels/cuda/gemm_decode.cu):
the active-expert item numbering, the row compaction (slot -1 = padding), the per-warp
interleaved K split, the cp.async chunk mapping into a warp's stage (byte offset lane * 16 +
8-row group i * 512), the swapped-operand fragment reads (weights = mma A, tokens = mma B, K
permuted identically inside a 32-wide step), mma.m16n8k16 fragment semantics as the PTX ISA
defines them, the fixed-order reduction over warps, and the epilogue's (row, feature, gate/up)
mapping; gated and ungated, K not a multiple of 32, N not a multiple of the strip, more rows
than one pass. Checks against a plain matrix product. No timing, no synchronization.
Run: python3 kernels/sim/gemm_decode_sim.py
"""
import numpy as np

WARPS, BK, CHUNK = 4, 32, 128


def mma(c, a, b):
    """c[lane][4] += A (16x16, a[lane][4] pairs) @ B (16x8, b[lane][2] pairs)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            A[g][2 * t + e] = a[lane][0][e]
            A[g + 8][2 * t + e] = a[lane][1][e]
            A[g][2 * t + 8 + e] = a[lane][2][e]
            A[g + 8][2 * t + 8 + e] = a[lane][3][e]
            B[2 * t + e][g] = b[lane][0][e]
            B[2 * t + 8 + e][g] = b[lane][1][e]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            c[lane][e] += D[g][2 * t + e]
            c[lane][2 + e] += D[g + 8][2 * t + e]


def lds128(stage, byte):
    """4 u32 words = 4 pairs of halves at a byte offset of a stage (flat array of halves)."""
    h = byte // 2
    v = stage[h:h + 8]
    return [(v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7])]


def block(p, blk, NF, out, WROWS=64):
    """One block of the kernel (WROWS weight rows: 64 wide, 32 narrow strips); p holds the
    GEMM (numpy arrays + ints)."""
    N, K, gated = p["N"], p["K"], p["gated"]
    HALF, MT = WROWS // 2, WROWS // 16
    feat = HALF if gated else WROWS
    strips = (N + feat - 1) // feat
    rank, n0 = blk // strips, (blk % strips) * feat
    if p["grouped"]:
        off = p["offsets"]
        active = [e for e in range(p["grouped"]) if off[e + 1] > off[e]]
        if rank >= len(active):
            return
        e = active[rank]
        rb, re_ = off[e], off[e + 1]
    else:
        if rank > 0:
            return
        e, rb, re_ = 0, 0, p["M"]
    W, WG = p["W"][e], (p["WG"][e] if gated else None)
    XROWS = 8 * NF
    stage_halves = (WROWS + XROWS) * BK
    ksteps = (K + BK - 1) // BK
    for c0 in range(rb, re_, CHUNK):
        rows = []  # compaction in row order: (arow, orow)
        for r in range(c0, min(c0 + CHUNK, re_)):
            if p["grouped"]:
                slot = p["slots"][r]
                if slot >= 0:
                    rows.append((slot // p["top_k"] if p["a_gather"] else r, r))
            else:
                rows.append((r, r))
        for p0 in range(0, len(rows), XROWS):
            red = np.zeros((WARPS, WROWS, XROWS))
            for warp in range(WARPS):
                nsteps = (ksteps - warp + WARPS - 1) // WARPS if warp < ksteps else 0
                acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(NF)] for _ in range(MT)]
                for j in range(nsteps):
                    k = (warp + WARPS * j) * BK
                    stage = np.full(stage_halves, np.nan)
                    for lane in range(32):
                        kc = lane % 4
                        kk = k + 8 * kc
                        for i in range(WROWS // 8):  # weight chunks
                            wr = lane // 4 + 8 * i
                            if gated:
                                col, src = n0 + wr % HALF, (WG if wr < HALF else W)
                            else:
                                col, src = n0 + wr, W
                            dst = (lane * 16 + i * 512) // 2
                            ok = kk < K and col < N
                            stage[dst:dst + 8] = src[col, kk:kk + 8] if ok else 0.0
                        for i in range(NF):  # token chunks
                            xr = p0 + lane // 4 + 8 * i
                            dst = (lane * 16 + WROWS * BK * 2 + i * 512) // 2
                            ok = kk < K and xr < len(rows)
                            stage[dst:dst + 8] = p["A"][rows[xr][0], kk:kk + 8] if ok else 0.0
                    assert not np.isnan(stage).any()
                    xf = [[lds128(stage, l * 16 + WROWS * BK * 2 + nf * 512) for l in range(32)]
                          for nf in range(NF)]
                    for mt in range(MT):
                        lo = [lds128(stage, l * 16 + 2 * mt * 512) for l in range(32)]
                        hi = [lds128(stage, l * 16 + (2 * mt + 1) * 512) for l in range(32)]
                        a0 = [[lo[l][0], hi[l][0], lo[l][1], hi[l][1]] for l in range(32)]
                        a1 = [[lo[l][2], hi[l][2], lo[l][3], hi[l][3]] for l in range(32)]
                        for nf in range(NF):
                            b0 = [[xf[nf][l][0], xf[nf][l][1]] for l in range(32)]
                            b1 = [[xf[nf][l][2], xf[nf][l][3]] for l in range(32)]
                            mma(acc[mt][nf], a0, b0)
                            mma(acc[mt][nf], a1, b1)
                for lane in range(32):
                    g, t4 = lane // 4, lane % 4
                    for mt in range(MT):
                        for nf in range(NF):
                            for h in range(2):
                                sr = mt * 16 + g + 8 * h
                                red[warp, sr, nf * 8 + 2 * t4] = acc[mt][nf][lane][2 * h]
                                red[warp, sr, nf * 8 + 2 * t4 + 1] = acc[mt][nf][lane][2 * h + 1]
            np_ = min(XROWS, len(rows) - p0)
            for o in range(feat * np_):
                f, i = o % feat, o // feat
                u = gv = 0.0
                for w in range(WARPS):  # fixed order
                    u += red[w, f + HALF if gated else f, i]
                    if gated:
                        gv += red[w, f, i]
                orow, col = rows[p0 + i][1], n0 + f
                if col >= N:
                    continue
                assert np.isnan(out[orow, col]).all(), "output written twice"
                out[orow, col] = (gv, u)


def run(grouped, gated, NF, N, K, rng, E=5, top_k=2, tokens=23, WROWS=64):
    p = {"N": N, "K": K, "gated": gated, "grouped": E if grouped else 0, "top_k": top_k,
         "a_gather": 1}
    if grouped:
        # routing with skew: expert 1 gets many rows, expert 3 none; padded to 64 rows
        ids = [[(t % 7 == 0) and 4 or 1, (t * 3 + 2) % E] for t in range(tokens)]
        ids = [[a, b if b != a else (a + 2) % E] for a, b in ids]
        ids = [[x if x != 3 else 0 for x in pair] for pair in ids]
        ids = [[a, b if b != a else (a + 1) % E if (a + 1) % E != 3 else (a + 2) % E]
               for a, b in ids]
        offsets, slots = [0], []
        for e in range(E):
            mine = [t * top_k + j for t in range(tokens) for j in range(top_k) if ids[t][j] == e]
            padded = (len(mine) + 63) // 64 * 64
            slots += mine + [-1] * (padded - len(mine))
            offsets.append(len(slots))
        p.update(offsets=offsets, slots=slots, M=len(slots))
        p["A"] = rng.standard_normal((tokens, K))
    else:
        p["M"] = tokens
        p["A"] = rng.standard_normal((tokens, K))
    G = E if grouped else 1
    p["W"] = rng.standard_normal((G, N, K))
    p["WG"] = rng.standard_normal((G, N, K))
    out = np.full((p["M"], N, 2), np.nan)
    feat = WROWS // 2 if gated else WROWS
    strips = (N + feat - 1) // feat
    groups_bound = min(E, tokens * top_k) if grouped else 1
    for blk in range(groups_bound * strips):
        block(p, blk, NF, out, WROWS)
    # reference
    for r in range(p["M"]):
        if grouped:
            e = max(i for i in range(E) if p["offsets"][i] <= r)
            slot = p["slots"][r]
            if slot < 0:
                assert np.isnan(out[r]).all(), "padding row written"
                continue
            a = p["A"][slot // top_k]
        else:
            e, a = 0, p["A"][r]
        up = p["W"][e] @ a
        np.testing.assert_allclose(out[r, :, 1], up, rtol=1e-9, atol=1e-9)
        if gated:
            np.testing.assert_allclose(out[r, :, 0], p["WG"][e] @ a, rtol=1e-9, atol=1e-9)
    return p["M"]


if __name__ == "__main__":
    rng = np.random.default_rng(7)
    for grouped, gated, NF, N, K, WR in [
        (True, True, 1, 40, 72, 64),      # K not a multiple of 32, 2 warps idle at the end
        (True, False, 2, 72, 200, 64),    # N not a multiple of 64
        (True, True, 2, 33 + 7, 264, 64),
        (False, False, 1, 24, 48, 64),    # dense, 3 passes of 8 rows
        (False, True, 4, 40, 136, 64),
        (True, True, 1, 40, 72, 32),      # narrow strips (16 gated / 32 ungated features)
        (True, False, 2, 72, 200, 32),
        (False, True, 2, 21, 104, 32),
    ]:
        m = run(grouped, gated, NF, N, K, rng, WROWS=WR)
        print(f"ok grouped={grouped} gated={gated} NF={NF} N={N} K={K} WR={WR} rows={m}")
    print("gemm_decode mapping matches the matrix product")

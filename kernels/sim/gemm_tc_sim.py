"""Host simulation of the data movement of `gemm_tc` (kernels/cuda/gemm.cu): the cp.async
chunk mapping into shared memory, ldmatrix.x4 and mma.m16n8k16 fragment semantics (as the PTX
ISA defines them), and the epilogue's (row, column, gate/up) mapping, for one 128 x 64 tile,
gated and ungated, with a K that is not a multiple of the K step and a partial last column
tile. It checks the index arithmetic against a plain matrix product; it does not model timing
or the pipeline's synchronization. Run: python3 kernels/sim/gemm_tc_sim.py
"""
import numpy as np

BM, BK, LD, STAGES = 128, 32, 40, 3


def ldmatrix_x4(smem, addr):
    """addr(lane) -> (row, col) of the 8 contiguous halves that lane names. Returns
    regs[lane][q] = (M_q[t // 4][2 (t % 4)], M_q[t // 4][2 (t % 4) + 1])."""
    mats = []
    for q in range(4):
        m = np.zeros((8, 8))
        for r in range(8):
            row, col = addr(8 * q + r)
            m[r] = smem[row, col:col + 8]
        mats.append(m)
    return [[(mats[q][t // 4][2 * (t % 4)], mats[q][t // 4][2 * (t % 4) + 1]) for q in range(4)]
            for t in range(32)]


def mma(c, a, b):
    """c[lane][4] += A (16x16 from a[lane][4] pairs) @ B (16x8 from b[lane][2] pairs)."""
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


def simulate(gated, M, N, K, n_tile, rng):
    A = rng.standard_normal((M, K))
    W = rng.standard_normal((N, K))
    WG = rng.standard_normal((N, K))
    arow = [r if r < M else -1 for r in range(BM)]  # dense tile at m0 = 0
    n0 = 64 * n_tile
    brows = 128 if gated else 64
    ni_n = 4 if gated else 2
    acc = {(w, l): np.zeros((4, ni_n, 4)) for w in range(8) for l in range(32)}
    ktiles = (K + BK - 1) // BK
    for kt in range(ktiles):
        k0 = kt * BK
        As = np.full((BM, LD), np.nan)
        Bs = np.full((brows, LD), np.nan)
        for tid in range(256):
            kc = (tid & 3) * 8
            for i in range(2):
                row = (tid >> 2) + 64 * i
                ok = k0 + kc < K and arow[row] >= 0
                As[row, kc:kc + 8] = A[arow[row], k0 + kc:k0 + kc + 8] if ok else 0.0
            for i in range(brows // 64):
                j = (tid >> 2) + 64 * i
                if gated:
                    within = j & 31
                    col = n0 + (j >> 5) * 16 + (within & 15)
                    base = W if within >= 16 else WG
                else:
                    col, base = n0 + j, W
                ok = k0 + kc < K and col < N
                Bs[j, kc:kc + 8] = base[col, k0 + kc:k0 + kc + 8] if ok else 0.0
        for warp in range(8):
            wm, wn = warp >> 2, warp & 3
            for ks in (0, 16):
                af = []
                for mi in range(4):
                    af.append(ldmatrix_x4(As, lambda l: (wm * 64 + mi * 16 + (l & 15), ks + (l >> 4) * 8)))
                bf = [None] * ni_n
                wrow = wn * 32 if gated else wn * 16
                for nj in range(ni_n // 2):
                    r = ldmatrix_x4(Bs, lambda l: (wrow + nj * 16 + (l & 7) + ((l >> 4) << 3),
                                                   ks + ((l >> 3) & 1) * 8))
                    bf[2 * nj] = [(r[l][0], r[l][1]) for l in range(32)]
                    bf[2 * nj + 1] = [(r[l][2], r[l][3]) for l in range(32)]
                for mi in range(4):
                    for ni in range(ni_n):
                        c = [acc[(warp, l)][mi][ni] for l in range(32)]
                        mma(c, af[mi], bf[ni])
    # epilogue mapping
    got_u = np.full((BM, 64), np.nan)
    got_g = np.full((BM, 64), np.nan)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        for lane in range(32):
            g, t4 = lane >> 2, lane & 3
            a = acc[(warp, lane)]
            for mi in range(4):
                for ni in range(2):
                    for h in range(2):
                        for c in range(2):
                            rl = wm * 64 + mi * 16 + g + 8 * h
                            col = wn * 16 + ni * 8 + 2 * t4 + c
                            if gated:
                                got_u[rl, col] = a[mi][ni + 2][2 * h + c]
                                got_g[rl, col] = a[mi][ni][2 * h + c]
                            else:
                                got_u[rl, col] = a[mi][ni][2 * h + c]
    ncols = min(64, N - n0)
    want_u = A @ W[n0:n0 + ncols].T
    want_g = A @ WG[n0:n0 + ncols].T
    ok = np.allclose(got_u[:M, :ncols], want_u)
    if gated:
        ok &= np.allclose(got_g[:M, :ncols], want_g)
    ok &= not np.isnan(got_u).any()
    return ok


def main():
    rng = np.random.default_rng(0)
    all_ok = True
    for gated in (False, True):
        for (M, N, K, nt) in [(128, 64, 64, 0), (100, 200, 72, 3), (128, 130, 40, 2), (7, 64, 8, 0)]:
            ok = simulate(gated, M, N, K, nt, rng)
            print(f"gemm_tc sim gated={gated!s:<5} M={M:<4} N={N:<4} K={K:<4} n_tile={nt}: {'ok' if ok else 'MISMATCH'}")
            all_ok &= ok
    raise SystemExit(0 if all_ok else 1)


if __name__ == "__main__":
    main()

"""Host simulation of the index arithmetic of `moe_gemm_wg_*` (kernels/cuda/gemm_sm90.cu).

What it checks (each against the PTX ISA's documented layouts, as written down here; it does
not model timing, and it cannot prove the hardware reads what the ISA text says):

1. Descriptor fields: `wg_desc` packs start address >> 4 into bits 0-13, LBO (unused for a
   K-major 128B-swizzled operand, set to 1) into bits 16-29, SBO = 1024 B >> 4 = 64 into bits
   32-45, base offset 0 (bits 49-51) and swizzle mode 1 = 128B into bits 62-63.
2. Shared-memory placement: the producer thread mapping (chunk c = pt & 7, rows pt >> 3 +
   16 i) covers every 16-byte chunk of the A (128 rows) and B (256 rows) tiles exactly once,
   at byte r * 128 + ((c ^ (r % 8)) << 4) of a 1024-byte aligned tile.
3. Operand read model of wgmma for K-major, 128B swizzle: element (row m, k) of the 64 x 16
   (A) or 256 x 16 (B) slice named by a descriptor with start address S is at the linear
   address S + (m // 8) * SBO + (m % 8) * 128 + 2 k, and the 128B swizzle XORs address bits
   4-6 with bits 7-9 (Swizzle<3,4,3> on byte addresses). The K slice kk of a 64-wide K step is
   read by advancing the start address by 32 kk bytes (descriptor + 2 kk). Reading through this
   model must return exactly the A / B elements the producer stored.
4. Accumulator fragment of wgmma.m64nNk16 (f32): thread t of the warpgroup (warp w = t // 32,
   lane l) holds d[4 j + 2 h + c] = D[16 w + l // 4 + 8 h][8 j + 2 (l % 4) + c]. The
   epilogue mapping (rows, columns, gated: gate = j, up = j + 16) must reproduce C = A W^T
   (gated: the gate and up products of the same output columns).
5. The tile schedule (groups of 16 M tiles, M fastest) visits every (M tile, N tile) exactly
   once and finds the right expert; tiles never straddle experts when offsets are multiples
   of 128.
6. The producer / consumer mbarrier protocol (4 stages, full: 128 arrivals, empty: 8, the
   producer's LAG = 2 signalling, parity waits) under random interleavings: no deadlock, the
   consumer reads a stage only after all its copies landed and the producer overwrites a
   stage only after both consumer warpgroups released it.

Run: python3 kernels/sim/gemm_wg_sim.py
"""
import random

import numpy as np

BM, BROWS, BK, STAGES, LAG = 128, 256, 64, 4, 2
A_BYTES, B_BYTES = BM * BK * 2, BROWS * BK * 2
GROUP_M = 16


# ---------------------------------------------------------------- 1. descriptor
def wg_desc(addr):  # mirrors wg_desc() of gemm_sm90.cu
    d = (addr & 0x3FFFF) >> 4
    d |= 1 << 16
    d |= (1024 >> 4) << 32
    d |= 1 << 62
    return d


def decode_desc(d):
    return {
        "start": (d & 0x3FFF) << 4,
        "lbo": ((d >> 16) & 0x3FFF) << 4,
        "sbo": ((d >> 32) & 0x3FFF) << 4,
        "base_offset": (d >> 49) & 7,
        "swizzle": (d >> 62) & 3,
    }


def check_descriptor():
    for addr in [0x400, 0x4400, 0x30400, 227 * 1024 - 1024]:
        for kk in range(4):
            d = wg_desc(addr) + 2 * kk
            f = decode_desc(d)
            assert f["start"] == addr + 32 * kk, (hex(addr), kk, f)
            assert f["lbo"] == 16 and f["sbo"] == 1024, f
            assert f["base_offset"] == 0 and f["swizzle"] == 1, f
    print("descriptor fields: ok")


# ---------------------------------------------------------------- 2./3. smem placement + reads
def swz(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def producer_chunks(rows):
    """(thread, row, chunk, byte offset) of every 16-byte copy of one tile of `rows` rows."""
    out = []
    for pt in range(128):
        c, rb = pt & 7, pt >> 3
        sw = (c ^ (rb & 7)) << 4
        for i in range(rows // 16):
            r = rb + 16 * i
            out.append((pt, r, c, r * 128 + sw))
    return out


def store_tile(smem, base, tile):
    """Store a rows x 64 tile (values) at `base` the way the producer does."""
    rows = tile.shape[0]
    seen = set()
    for _, r, c, off in producer_chunks(rows):
        assert (r, c) not in seen
        seen.add((r, c))
        for e in range(8):
            smem[(base + off) // 2 + e] = tile[r, 8 * c + e]
    assert len(seen) == rows * 8, "every chunk exactly once"


def wgmma_read(smem, desc, rows):
    """The rows x 16 operand slice a descriptor names (K-major, 128B swizzle)."""
    f = decode_desc(desc)
    assert f["swizzle"] == 1
    out = np.zeros((rows, 16))
    for m in range(rows):
        for k in range(16):
            lin = f["start"] + (m // 8) * f["sbo"] + (m % 8) * 128 + 2 * k
            out[m, k] = smem[swz(lin) // 2]
    return out


# ---------------------------------------------------------------- 4. fragment + epilogue
def frag(D, n):
    """d[t][i] of wgmma.m64nNk16 f32 accumulators (ISA layout)."""
    d = np.zeros((128, n // 2))
    for t in range(128):
        w, l = t // 32, t % 32
        for j in range(n // 8):
            for h in range(2):
                for c in range(2):
                    d[t][4 * j + 2 * h + c] = D[16 * w + l // 4 + 8 * h][8 * j + 2 * (l % 4) + c]
    return d


def simulate_tile(gated, K, n_valid, rng, pad_rows):
    A = rng.standard_normal((BM, K))
    A[sorted(pad_rows)] = 0.0  # padding rows are zero-filled (src-size 0)
    if gated:
        Wg = rng.standard_normal((128, K))
        Wu = rng.standard_normal((128, K))
        Wg[n_valid:] = 0.0
        Wu[n_valid:] = 0.0
        B = np.concatenate([Wg, Wu])  # staged rows: 128 gate then 128 up
    else:
        Wu = rng.standard_normal((256, K))
        Wu[n_valid:] = 0.0
        B = Wu
    base = 3 * (A_BYTES + B_BYTES) + 1024  # stage 3 of a ring starting at 1024
    acc = [np.zeros((64, 256)) for _ in range(2)]
    for kt in range(K // BK):
        smem = np.full(300 * 1024 // 2, np.nan)
        store_tile(smem, base, A[:, kt * BK:(kt + 1) * BK])
        store_tile(smem, base + A_BYTES, B[:, kt * BK:(kt + 1) * BK])
        for wg in range(2):
            da, db = wg_desc(base + wg * 64 * 128), wg_desc(base + A_BYTES)
            for kk in range(4):
                a = wgmma_read(smem, da + 2 * kk, 64)
                b = wgmma_read(smem, db + 2 * kk, 256)
                assert not np.isnan(a).any() and not np.isnan(b).any()
                acc[wg] += a @ b.T
    # epilogue mapping of the kernel
    out = np.full((BM, 256), np.nan)
    for wg in range(2):
        d = frag(acc[wg], 256)
        for t in range(128):
            warp, lane = t // 32, t % 32
            for h in range(2):
                rl = wg * 64 + warp * 16 + lane // 4 + 8 * h
                if rl in pad_rows:
                    continue
                for j in range(16 if gated else 32):
                    for c in range(2):
                        col = 8 * j + 2 * (lane & 3) + c
                        if col >= n_valid:
                            continue
                        if gated:
                            g = d[t][4 * j + 2 * h + c]
                            u = d[t][4 * (j + 16) + 2 * h + c]
                            assert np.isnan(out[rl, col])
                            out[rl, col] = g
                            out[rl, 128 + col] = u
                        else:
                            assert np.isnan(out[rl, col])
                            out[rl, col] = d[t][4 * j + 2 * h + c]
    ref = A @ B.T
    valid_rows = [r for r in range(BM) if r not in pad_rows]
    cols = list(range(n_valid)) + ([128 + c for c in range(n_valid)] if gated else [])
    got = out[np.ix_(valid_rows, cols)]
    want = ref[np.ix_(valid_rows, cols)]
    assert not np.isnan(got).any(), "an output was not written"
    assert np.allclose(got, want, rtol=1e-9, atol=1e-9), np.abs(got - want).max()


def check_tiles():
    rng = np.random.default_rng(7)
    simulate_tile(False, 128, 256, rng, {3, 64, 127})
    simulate_tile(False, 64, 200, rng, set())
    simulate_tile(True, 128, 128, rng, {0, 77})
    simulate_tile(True, 64, 72, rng, set(range(100, 128)))
    print("smem placement, wgmma operand reads, fragment and epilogue mapping: ok")


# ---------------------------------------------------------------- 5. tile schedule
def wg_tile(t, mt, nt, bn, offsets):
    per_group = GROUP_M * nt
    group = t // per_group
    first = group * GROUP_M
    gsz = min(GROUP_M, mt - first)
    r = t - group * per_group
    m0 = (first + r % gsz) * BM
    n0 = (r // gsz) * bn
    e = max(i for i in range(len(offsets) - 1) if offsets[i] <= m0)
    return e, m0, n0


def check_schedule():
    rnd = random.Random(3)
    for _ in range(200):
        E = rnd.randint(1, 12)
        counts = [rnd.choice([0, 0, rnd.randint(1, 700), rnd.randint(1, 5000)]) for _ in range(E)]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + (c + 127) // 128 * 128)
        N = rnd.randint(1, 3000)
        gated = rnd.random() < 0.5
        bn = 128 if gated else 256
        mt, nt = (offsets[-1] + BM - 1) // BM, (N + bn - 1) // bn
        seen = set()
        grid = rnd.randint(1, 140)
        for b in range(grid):
            for t in range(b, mt * nt, grid):
                e, m0, n0 = wg_tile(t, mt, nt, bn, offsets)
                assert (m0, n0) not in seen
                seen.add((m0, n0))
                assert offsets[e] <= m0 and m0 + BM <= offsets[e + 1], "tile straddles experts"
                assert n0 < N
        assert len(seen) == mt * nt
    print("tile schedule: ok")


# ---------------------------------------------------------------- 6. pipeline protocol
class Bar:
    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):  # try_wait.parity: the phase with this parity has completed
        return (self.phase & 1) != parity


def check_pipeline():
    rnd = random.Random(11)
    for trial in range(300):
        n_steps = rnd.randint(0, 40)
        full = [Bar(128) for _ in range(STAGES)]
        empty = [Bar(8) for _ in range(STAGES)]
        # stage content: (step written, landed?) per slot
        slot = [None] * STAGES
        # producer: 128 threads in lockstep (modelled as one), issuing step `it`
        prod = {"it": 0, "landed": [], "pending": [], "signalled": 0, "state": "wait"}
        cons = [{"it": 0, "state": "wait", "reads": 0} for _ in range(2)]
        read_count = {}
        steps = 0
        while True:
            steps += 1
            assert steps < 100000, "deadlock"
            actors = []
            if prod["state"] != "done":
                actors.append("p")
            if prod["pending"]:
                actors.append("land")
            for i in range(2):
                if cons[i]["it"] < n_steps:
                    actors.append(i)
            if not actors:
                break
            a = rnd.choice(actors)
            if a == "land":  # the oldest outstanding cp.async group completes
                j = prod["pending"].pop(0)
                slot[j % STAGES] = (j, True)
                prod["landed"].append(j)
            elif a == "p":
                it = prod["it"]
                if it < n_steps:
                    s = it % STAGES
                    if not empty[s].done(((it // STAGES) & 1) ^ 1):
                        continue
                    # both consumer warpgroups must be done with the previous use of the slot
                    if slot[s] is not None:
                        assert read_count.get(slot[s][0], 0) == 2, "overwrote a stage in use"
                    slot[s] = (it, False)
                    prod["pending"].append(it)
                    prod["it"] += 1
                    if prod["it"] - 1 >= LAG:
                        j = prod["it"] - 1 - LAG
                        if len(prod["pending"]) > LAG:  # cp.async.wait_group LAG blocks
                            while len(prod["pending"]) > LAG:
                                k = prod["pending"].pop(0)
                                slot[k % STAGES] = (k, True)
                        for _ in range(128):
                            full[j % STAGES].arrive()
                        prod["signalled"] += 1
                else:  # drain: wait_group 0, signal the rest
                    while prod["pending"]:
                        k = prod["pending"].pop(0)
                        slot[k % STAGES] = (k, True)
                    it = prod["it"]
                    for j in range(max(0, it - LAG), it):
                        for _ in range(128):
                            full[j % STAGES].arrive()
                        prod["signalled"] += 1
                    prod["state"] = "done"
            else:
                c = cons[a]
                it = c["it"]
                s = it % STAGES
                if not full[s].done((it // STAGES) & 1):
                    continue
                assert slot[s] == (it, True), f"consumer read stage {it} but slot holds {slot[s]}"
                read_count[it] = read_count.get(it, 0) + 1
                for _ in range(4):  # one arrival per consumer warp
                    empty[s].arrive()
                c["it"] += 1
        assert prod["signalled"] == n_steps, (prod["signalled"], n_steps)
        assert all(read_count.get(j, 0) == 2 for j in range(n_steps))
    print("pipeline protocol (stages, phases, LAG signalling): ok")


if __name__ == "__main__":
    check_descriptor()
    check_schedule()
    check_pipeline()
    check_tiles()
    print("gemm_wg_sim: all checks passed")

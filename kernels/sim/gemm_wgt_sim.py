"""Host simulation of what `moe_gemm_wgt_*` (kernels/cuda/gemm_sm90_tma.cu) changes relative to
`moe_gemm_wg_*` (checked by gemm_wg_sim.py, whose models it reuses):

1. TMA placement: a box of `rows` x 64 16-bit elements written with CU_TENSOR_MAP_SWIZZLE_128B
   to a 1024-byte aligned destination puts element (r, k) at the byte address
   swz(dst + r * 128 + 2 k) (the 128B swizzle XORs address bits 4-6 with bits 7-9, as
   documented for cp.async.bulk.tensor / cuTensorMapEncodeTiled). This must equal, byte for
   byte, the placement of the cp.async producer of gemm_sm90.cu (chunk c of row r at
   r * 128 + ((c ^ (r % 8)) << 4)), including the second box of a stage at + 16384 bytes
   (staged rows 128..255) and the A box; rows of the box past the tensor's N (or M) extent
   read as zero. Through the wgmma operand read model the consumers then see the same
   operands, so the whole tile (fragment + epilogue) equals C = A W^T.
2. The mbarrier protocol with TMA: `full[s]` initialised to 1 (A by TMA) or 129 (A by
   cp.async) arrivals; thread 0 arrives with expect_tx(stage bytes) before issuing the loads,
   whose completions (in any order, at any later time) decrement the transaction count; the
   producer's other arrivals follow the LAG = 2 cp.async scheme. Consumers keep one K step of
   wgmma in flight and release stage kt - 1 after issuing kt (wait_group 1), the last stage of
   a tile after wait_group 0. Under random interleavings: no deadlock, a consumer issues a
   stage only after every byte landed, the producer rewrites a stage only after both consumer
   warpgroups' wgmmas reading it completed, and a phase never completes with bytes pending.
3. The paired epilogue store: columns (col, col + 1) with col = n0 + 8 j + 2 (lane % 4) are
   adjacent accumulators d[4 j + 2 h], d[4 j + 2 h + 1]; col is even, so one 32-bit store at
   element offset r N + col is aligned whenever N is even and the output base is 4-byte
   aligned, and covers exactly the two outputs.

Run: python3 kernels/sim/gemm_wgt_sim.py
"""
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_wg_sim as wg  # noqa: E402

BOX_ROWS = 128


def tma_store(smem, dst, tensor, r0, k0, rows, extent):
    """A TMA box load of `rows` x 64 from `tensor` (rows r0.., K k0..) with 128B swizzle."""
    assert dst % 1024 == 0
    for r in range(rows):
        for k in range(64):
            v = tensor[r0 + r, k0 + k] if r0 + r < extent else 0.0
            smem[wg.swz(dst + r * 128 + 2 * k) // 2] = v


def check_placement():
    rng = np.random.default_rng(5)
    for rows in (128, 256):
        tile = rng.standard_normal((rows, 64))
        a = np.full(64 * 1024, np.nan)
        b = np.full(64 * 1024, np.nan)
        base = 2048
        wg.store_tile(a, base, tile)  # cp.async producer placement
        tma_store(b, base, tile, 0, 0, min(rows, BOX_ROWS), rows)
        if rows == 256:  # second box of the stage: staged rows 128..255
            tma_store(b, base + BOX_ROWS * 128, tile, BOX_ROWS, 0, BOX_ROWS, rows)
        assert np.array_equal(np.isnan(a), np.isnan(b)), "different bytes written"
        m = ~np.isnan(a)
        assert np.array_equal(a[m], b[m]), "TMA and cp.async placements differ"
    print("TMA 128B-swizzle placement == cp.async placement: ok")


def simulate_tile(gated, K, N, n0, M, m0, a_tma, rng):
    """One tile through the TMA copy path, the wgmma read model and the epilogue mapping."""
    A = rng.standard_normal((M, K))
    Wu = rng.standard_normal((N, K))
    Wg = rng.standard_normal((N, K))
    sa, sb = 1024, 1024 + wg.A_BYTES
    acc = [np.zeros((64, 256)) for _ in range(2)]
    for kt in range(K // wg.BK):
        smem = np.full(200 * 1024 // 2, np.nan)
        k0 = kt * wg.BK
        if a_tma:
            tma_store(smem, sa, A, m0, k0, BOX_ROWS, M)
        else:  # gathered rows (identity gather here), zero-filled past M
            tile = np.zeros((128, 64))
            for r in range(128):
                if m0 + r < M:
                    tile[r] = A[m0 + r, k0:k0 + 64]
            wg.store_tile(smem, sa, tile)
        if gated:
            tma_store(smem, sb, Wg, n0, k0, BOX_ROWS, N)
            tma_store(smem, sb + wg.B_BYTES // 2, Wu, n0, k0, BOX_ROWS, N)
        else:
            tma_store(smem, sb, Wu, n0, k0, BOX_ROWS, N)
            tma_store(smem, sb + wg.B_BYTES // 2, Wu, n0 + BOX_ROWS, k0, BOX_ROWS, N)
        for g in range(2):
            da, db = wg.wg_desc(sa + g * 64 * 128), wg.wg_desc(sb)
            for kk in range(4):
                a = wg.wgmma_read(smem, da + 2 * kk, 64)
                b = wg.wgmma_read(smem, db + 2 * kk, 256)
                assert not np.isnan(a).any() and not np.isnan(b).any()
                acc[g] += a @ b.T
    # epilogue of gemm_sm90_tma.cu: pairs (col, col + 1)
    out = {}
    for g in range(2):
        d = wg.frag(acc[g], 256)
        for t in range(128):
            warp, lane = t // 32, t % 32
            for h in range(2):
                r = m0 + g * 64 + warp * 16 + lane // 4 + 8 * h
                if r >= M:
                    continue
                for j in range(16 if gated else 32):
                    col = n0 + 8 * j + 2 * (lane & 3)
                    assert col % 2 == 0
                    if col >= N:
                        continue
                    for c in range(2):
                        if col + c >= N:
                            continue
                        if gated:
                            v = (d[t][4 * j + 2 * h + c], d[t][4 * (j + 16) + 2 * h + c])
                        else:
                            v = d[t][4 * j + 2 * h + c]
                        assert (r, col + c) not in out
                        out[(r, col + c)] = v
    bn = 128 if gated else 256
    for r in range(m0, min(m0 + 128, M)):
        for col in range(n0, min(n0 + bn, N)):
            got = out.pop((r, col))
            if gated:
                want = (A[r] @ Wg[col], A[r] @ Wu[col])
                assert np.allclose(got, want, rtol=1e-9, atol=1e-9)
            else:
                assert np.isclose(got, A[r] @ Wu[col], rtol=1e-9, atol=1e-9)
    assert not out, "outputs outside the tile"


def check_tiles():
    rng = np.random.default_rng(9)
    simulate_tile(False, 128, 300, 256, 200, 128, True, rng)  # partial N and M tile, A by TMA
    simulate_tile(False, 64, 512, 0, 128, 0, False, rng)
    simulate_tile(True, 128, 200, 128, 140, 0, False, rng)  # gated, partial N (72 columns)
    simulate_tile(True, 64, 128, 0, 77, 0, True, rng)
    print("TMA tiles (A by TMA / cp.async, gated / ungated, partial tiles) -> epilogue: ok")


class TxBar:
    """An mbarrier with a pending-arrival count and a transaction count."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, expect=0):
        self.tx += expect
        self.pending -= 1
        assert self.pending >= 0
        self._maybe_complete()

    def complete_tx(self, n):
        self.tx -= n
        self._maybe_complete()

    def done(self, parity):
        return (self.phase & 1) != parity


def check_pipeline():
    rnd = random.Random(13)
    STAGES, LAG = wg.STAGES, wg.LAG
    for trial in range(400):
        a_tma = rnd.random() < 0.5
        ktiles = rnd.randint(1, 9)
        tiles = rnd.randint(0, 5)
        n_steps = ktiles * tiles
        full = [TxBar(1 if a_tma else 129) for _ in range(STAGES)]
        empty = [wg.Bar(8) for _ in range(STAGES)]
        tma_bytes = 3 if a_tma else 2  # boxes per stage (units of 16 KB)
        landed = {}  # step -> boxes / cp.async groups landed
        in_stage = [None] * STAGES
        tma_pending = []  # (step, stage) boxes in flight
        cp_pending = []  # cp.async groups in flight (steps), oldest first
        prod = {"it": 0, "done": False}
        # consumer: it = next step to issue; inflight = steps issued and not yet released
        cons = [{"it": 0, "inflight": [], "reading": set()} for _ in range(2)]
        reads_done = {}
        guard = 0
        while True:
            guard += 1
            assert guard < 200000, "deadlock"
            actors = []
            if not prod["done"]:
                actors.append("p")
            if tma_pending:
                actors.append("tma")
            if cp_pending:
                actors.append("cp")
            for i in range(2):
                if cons[i]["it"] < n_steps or cons[i]["inflight"]:
                    actors.append(i)
            if not actors:
                break
            a = rnd.choice(actors)
            if a == "tma":
                j, s = tma_pending.pop(rnd.randrange(len(tma_pending)))
                landed[j] = landed.get(j, 0) + 1
                full[s].complete_tx(1)
            elif a == "cp":
                j = cp_pending.pop(0)
                landed[j] = landed.get(j, 0) + 1
            elif a == "p":
                it = prod["it"]
                if it < n_steps:
                    s = it % STAGES
                    if not empty[s].done(((it // STAGES) & 1) ^ 1):
                        continue
                    if in_stage[s] is not None:
                        assert reads_done.get(in_stage[s], 0) == 2, "overwrote a stage in use"
                    in_stage[s] = it
                    full[s].arrive(expect=tma_bytes)  # thread 0: arrive.expect_tx
                    for _ in range(tma_bytes):
                        tma_pending.append((it, s))
                    if not a_tma:
                        cp_pending.append(it)
                        if it >= LAG:
                            while len(cp_pending) > LAG:  # cp.async.wait_group LAG
                                j = cp_pending.pop(0)
                                landed[j] = landed.get(j, 0) + 1
                            for _ in range(128):
                                full[(it - LAG) % STAGES].arrive()
                    prod["it"] += 1
                else:
                    if not a_tma:
                        while cp_pending:
                            j = cp_pending.pop(0)
                            landed[j] = landed.get(j, 0) + 1
                        for j in range(max(0, it - LAG), it):
                            for _ in range(128):
                                full[j % STAGES].arrive()
                    prod["done"] = True
            else:
                c = cons[a]
                it = c["it"]
                last_of_tile = it > 0 and it % ktiles == 0
                if c["inflight"] and (it >= n_steps or last_of_tile):
                    # end of a tile: wait_group 0, release the last stage
                    j = c["inflight"].pop(0)
                    assert not c["inflight"]
                    reads_done[j] = reads_done.get(j, 0) + 1
                    for _ in range(4):
                        empty[j % STAGES].arrive()
                    if it >= n_steps:
                        continue
                    # (the epilogue would run here; the next tile's first step follows)
                    continue
                s = it % STAGES
                if not full[s].done((it // STAGES) & 1):
                    continue
                want = 3 if a_tma else 3  # 2 B boxes + (A box | A cp.async group)
                assert landed.get(it, 0) == want, f"issued step {it} before its bytes landed"
                c["inflight"].append(it)
                c["it"] += 1
                if len(c["inflight"]) == 2:  # wait_group 1: the older step is done
                    j = c["inflight"].pop(0)
                    reads_done[j] = reads_done.get(j, 0) + 1
                    for _ in range(4):
                        empty[j % STAGES].arrive()
        assert all(reads_done.get(j, 0) == 2 for j in range(n_steps)), "a stage was not consumed"
        assert not tma_pending and not cp_pending
    print("pipeline protocol (expect_tx, TMA completions in any order, wait_group 1 release): ok")


def check_pairs():
    for N in (128, 130, 200, 1088, 4096):
        for n0 in range(0, N, 256):
            for j in range(32):
                for lane in range(32):
                    col = n0 + 8 * j + 2 * (lane & 3)
                    assert col % 2 == 0
                    if N % 2 == 0:
                        for r in (0, 1, 7):
                            assert ((r * N + col) * 2) % 4 == 0  # 32-bit store aligned
    print("paired epilogue stores aligned: ok")


if __name__ == "__main__":
    check_placement()
    check_pairs()
    check_pipeline()
    check_tiles()
    print("gemm_wgt_sim: all checks passed")

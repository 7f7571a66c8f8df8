// gemm_sm90_tma.cu: the Hopper (sm_90a) grouped GEMM on wgmma with the weights (B) loaded by
//   the Tensor Memory Accelerator. Same GemmParams, semantics, tiles, tile schedule and shared
//   memory ring as gemm_sm90.cu (whose helpers it uses); the differences:
//
// Copies: B (the weight rows of a K step: 256 staged rows x 64 K) arrives through two TMA
//        loads (`cp.async.bulk.tensor.3d`, box 64 K x 128 rows x 1 expert, 16 KB each) over a
//        3D tensor map [E, N, K] (dims innermost first: K, N, E) encoded on the host
//        (launch.rs `TmaMap`) with 128-byte swizzle, which places 16-byte chunk c of row r at
//        chunk c ^ (r % 8) of a 1024-byte-aligned tile: exactly the layout the wgmma
//        descriptors (wg_desc) read. Rows past N (the tail N tile) are zero-filled by the TMA
//        (the map's N extent), as the cp.async path zero-filled them. Gated: gate rows
//        n0 .. n0 + 127 to staged rows 0 .. 127 (gate map), up rows to 128 .. 255 (up map);
//        ungated: up rows n0 .. n0 + 255 (two boxes of the up map).
//        A: if the host passes `a_tma` (the A rows of a tile are rows m0 .. m0 + 127 of A, i.e.
//        a dense GEMM or a grouped GEMM without gather: GEMM2), a 2D map [M, K] and one more
//        TMA box (64 K x 128 rows; rows past M zero-filled; padding rows of an expert block
//        load whatever the intermediate buffer holds there: each output row depends only on
//        its own A row and padding rows are never written). Otherwise (GEMM1: rows gathered
//        through sorted_slots) the 128 producer threads gather A with cp.async as in
//        gemm_sm90.cu (8 x 16 bytes per thread per K step instead of 24).
// Barriers: `full[s]` counts 1 arrival (thread 0's mbarrier.arrive.expect_tx with the stage's
//        TMA bytes) + 128 (cp.async path only: each producer thread's
//        cp.async.mbarrier.arrive.noinc, which arrives when that thread's copies have landed,
//        so the producer never waits on its own copies and runs the whole ring ahead; the
//        consumers then fence the async proxy before their wgmma reads the gathered A); the TMA
//        loads complete the transaction count. `empty[s]`: 8 consumer warps per CTA writing
//        into the ring (8, or 16 in a cluster).
// Consumers: as gemm_sm90.cu, but one K step of wgmma stays in flight: after issuing K step kt
//        a consumer waits with wgmma.wait_group 1 (K step kt - 1 done) and only then releases
//        kt - 1's stage, so the tensor cores are not idle between K steps.
// Clusters (`moe_gemm_wgm_*`, compile-time cluster of 2 CTAs, CS = 2 below): the two CTAs of
//        a cluster take M tiles 2 j and 2 j + 1 of the same N tile. When both have rows of the
//        same expert, each CTA loads one half of the 256 staged B rows and multicasts it to
//        both (`.multicast::cluster`, mask 0b11): a third less shared-memory fill per CTA.
//        Otherwise (a pair straddling two experts, an odd tile count) each loads its own B.
//        Consumers release a stage to both CTAs' `empty` barriers (the peer may multicast into
//        this ring), so the two stay in step; cluster barriers at start (barrier init visible
//        to the peer) and end (no CTA exits while its peer may still arrive on its barriers).
//        Measured slower than the unclustered kernel on an H100 (run 8: dense 8192^3 326 vs
//        432 TFLOP/s); opt-in only (GemmTuning::wgmma_multicast).
// Epilogue: as gemm_sm90.cu, with the two adjacent columns of a thread written by one 32-bit
//        (16-bit types) or 64-bit (f32 out) store where aligned.
// (included by all.cu after gemm_sm90.cu)

#define WGT_TMA_BOX_ROWS 128

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) MoeTmaMap {
    unsigned long long v[16];
};

#ifdef MOE_WG_ENABLED

MOE_DEVICE void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile(
        "{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(
            smem_u32(bar)),
        "r"(bytes)
        : "memory");
}

MOE_DEVICE void tma_load_3d(uint32_t dst, const MoeTmaMap* map, int c0, int c1, int c2, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}

MOE_DEVICE void tma_load_2d(uint32_t dst, const MoeTmaMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}

MOE_DEVICE void tma_prefetch_map(const MoeTmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

MOE_DEVICE void wg_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }

MOE_DEVICE void tma_load_3d_mc(uint32_t dst, const MoeTmaMap* map, int c0, int c1, int c2, uint64_t* bar,
                               uint16_t cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)), "h"(cta_mask)
        : "memory");
}

// An arrival on `bar` once every cp.async this thread issued so far has landed (counted among
// the barrier's expected arrivals: .noinc).
MOE_DEVICE void cp_async_arrive_noinc(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

MOE_DEVICE uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

// All non-exited threads of the cluster (release / acquire).
MOE_DEVICE void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// One arrival on the mbarrier at the same shared-memory offset as `bar` in CTA `cta` of the
// cluster. Default semantics (release at CTA scope): the arrival only has to follow the
// consumer's wgmma reads of the stage, which wgmma.wait_group has already completed; the
// peer's producer then overwrites the stage with TMA. (Run 8 measured this kernel with
// release.cluster here and acquire.cluster in the producer's wait, 25 % slower than the
// unclustered kernel; this weaker form is not yet measured.)
MOE_DEVICE void mbar_arrive_remote(uint64_t* bar, uint32_t cta) {
    asm volatile(
        "{\n .reg .b32 ra;\n mapa.shared::cluster.u32 ra, %0, %1;\n"
        " mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(smem_u32(bar)),
        "r"(cta)
        : "memory");
}

// ---- schedule: wg_unit_tile of gemm_sm90.cu. Cluster c runs units c, c + clusters, ...
// (both CTAs of a cluster the same units, so their stage sequences stay in step). A tile past
// the rows (odd tile count) still runs its K steps (zero-filled or unused A, real B) but
// writes nothing.

// ---- producer: warpgroup 0 (thread 0 issues the TMA loads; all 128 gather A unless a_tma)
template <typename T, bool GATED, int CS>
MOE_DEVICE void wgt_producer(const GemmParams& p, int a_tma, const MoeTmaMap* tm_a,
                             const MoeTmaMap* tm_up, const MoeTmaMap* tm_gate, unsigned char* smem,
                             uint64_t* full, uint64_t* empty, uint32_t rank) {
    const int pt = threadIdx.x;  // 0..127
    if (a_tma && pt != 0) return;
    const int c = pt & 7;
    const int rb = pt >> 3;
    const uint32_t sw = (uint32_t)((c ^ (rb & 7)) << 4);
    const uint32_t sbase = smem_u32(smem);
    const int K = p.K;
    const int ktiles = K / WG_BK;
    const T* A = (const T*)p.a;
    const uint32_t tx_bytes = WG_B_BYTES + (a_tma ? WG_A_BYTES : 0);
    if (pt == 0) {
        tma_prefetch_map(tm_up);
        if (GATED) tma_prefetch_map(tm_gate);
        if (a_tma) tma_prefetch_map(tm_a);
    }
    int mt, nt;
    wg_counts(p, mt, nt);
    const int sets = (mt + CS - 1) / CS;
    const int units = sets * nt;
    uint32_t it = 0;
    for (int u = blockIdx.x / CS; u < units; u += gridDim.x / CS) {
        const WgTile w = wg_unit_tile<CS>(p, u, sets, nt, rank);
        // B shared with the peer CTA (each loads one half, multicast to both) when both tiles
        // have rows of the same expert; otherwise each CTA loads its whole B.
        bool mc = false;
        if (CS > 1) {
            const WgTile o = wg_unit_tile<CS>(p, u, sets, nt, rank ^ 1);
            mc = w.m0 < w.rows_end && o.m0 < o.rows_end && w.expert == o.expert;
        }
        int a_row[8];
        if (!a_tma) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                int slot;
                a_row[i] = (int)wg_arow(p, w, w.m0 + rb + 16 * i, slot);
            }
        }
        // A box rows (a_tma: M >= 128; a tile at or past M, which has no rows, loads the last
        // full box instead, never used; a partial last tile reads past M: zero-filled)
        const int am0 = w.m0 < p.M ? w.m0 : p.M - WG_BM;
        for (int kt = 0; kt < ktiles; ++kt, ++it) {
            const uint32_t s = it % WG_STAGES;
            const uint32_t parity = ((it / WG_STAGES) & 1) ^ 1;
            mbar_wait(&empty[s], parity);
            const uint32_t sa = sbase + s * WG_STAGE_BYTES;
            const uint32_t sb = sa + WG_A_BYTES;
            const int k0 = kt * WG_BK;
            if (pt == 0) {
                mbar_arrive_expect_tx(&full[s], tx_bytes);
                if (CS > 1 && mc) {
                    // half `rank` of the staged rows, into both CTAs (same offsets; each CTA's
                    // full[s] counts the bytes that land in its own ring)
                    const MoeTmaMap* map = GATED ? (rank == 0 ? tm_gate : tm_up) : tm_up;
                    const int row = GATED ? w.n0 : w.n0 + (int)rank * WGT_TMA_BOX_ROWS;
                    tma_load_3d_mc(sb + rank * (WG_B_BYTES / 2), map, k0, row, w.expert, &full[s],
                                   (uint16_t)((1u << CS) - 1));
                } else if (GATED) {
                    tma_load_3d(sb, tm_gate, k0, w.n0, w.expert, &full[s]);
                    tma_load_3d(sb + WG_B_BYTES / 2, tm_up, k0, w.n0, w.expert, &full[s]);
                } else {
                    tma_load_3d(sb, tm_up, k0, w.n0, w.expert, &full[s]);
                    tma_load_3d(sb + WG_B_BYTES / 2, tm_up, k0, w.n0 + WGT_TMA_BOX_ROWS, w.expert, &full[s]);
                }
                if (a_tma) tma_load_2d(sa, tm_a, k0, am0, &full[s]);
            }
            if (!a_tma) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const bool v = a_row[i] >= 0;
                    const uint32_t dst = sa + (uint32_t)(rb + 16 * i) * 128 + sw;
                    const void* src = v ? (const void*)(A + (size_t)a_row[i] * K + k0 + c * 8) : (const void*)A;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                                 "r"(v ? 16 : 0)
                                 : "memory");
                }
                // this thread's arrival on the stage's full barrier comes when its copies have
                // landed: no wait here, so the producer runs up to WG_STAGES stages ahead
                cp_async_arrive_noinc(&full[s]);
            }
        }
    }
}

// Writes outputs (r, col) and (r, col + 1) (col even); one vector store where the two are in
// bounds, the output is written (not accumulated) and the address is aligned.
template <typename T>
MOE_DEVICE void epi_write2(const GemmParams& p, int r, int col, float y0, float y1) {
    if (col + 1 < p.N && !p.accumulate && (p.N & 1) == 0) {
        const size_t o = (size_t)r * p.N + col;  // even: N and col are even
        if (p.out_f32) {
            float* out = (float*)p.out + o;
            if ((reinterpret_cast<uintptr_t>(out) & 7) == 0) {
                *reinterpret_cast<float2*>(out) = make_float2(y0, y1);
                return;
            }
        } else {
            T* out = (T*)p.out + o;
            if ((reinterpret_cast<uintptr_t>(out) & 3) == 0) {
                T v[2] = {from_f32<T>(y0), from_f32<T>(y1)};
                *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(v);
                return;
            }
        }
    }
    if (col < p.N) epi_write<T>(p, r, col, y0);
    if (col + 1 < p.N) epi_write<T>(p, r, col + 1, y1);
}

// ---- consumers: warpgroups 1 and 2
template <typename T, bool GATED, int CS>
MOE_DEVICE void wgt_consumer(const GemmParams& p, int a_tma, unsigned char* smem, uint64_t* full,
                             uint64_t* empty, uint32_t rank) {
    const int wg = (threadIdx.x >> 7) - 1;
    const int ct = threadIdx.x & 127;
    const int warp = ct >> 5, lane = ct & 31;
    const uint32_t sbase = smem_u32(smem);
    const int ktiles = p.K / WG_BK;
    int mt, nt;
    wg_counts(p, mt, nt);
    const int sets = (mt + CS - 1) / CS;
    const int units = sets * nt;
    uint32_t it = 0;
    float acc[128];
    // a stage is released to this CTA's producer and (CS = 2) to the peer's, which may
    // multicast into this CTA's ring
    auto release = [&](uint32_t s) {
        __syncwarp();
        if (lane == 0) {
            mbar_arrive(&empty[s]);
            if (CS > 1) mbar_arrive_remote(&empty[s], rank ^ 1);
        }
    };
    for (int u = blockIdx.x / CS; u < units; u += gridDim.x / CS) {
        const WgTile w = wg_unit_tile<CS>(p, u, sets, nt, rank);
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
        for (int kt = 0; kt < ktiles; ++kt, ++it) {
            const uint32_t s = it % WG_STAGES;
            mbar_wait(&full[s], (it / WG_STAGES) & 1);
            // A gathered by the producers' cp.async (generic proxy): make it visible to wgmma
            if (!a_tma) fence_proxy_async();
            const uint32_t sa = sbase + s * WG_STAGE_BYTES + wg * (64 * 128);
            const uint32_t sb = sbase + s * WG_STAGE_BYTES + WG_A_BYTES;
            const uint64_t da = wg_desc(sa), db = wg_desc(sb);
            wg_fence_acc(acc);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < WG_BK / 16; ++kk) {
                wg_mma_m64n256k16<T>(acc, da + 2 * kk, db + 2 * kk);
            }
            wg_commit();
            // K step kt - 1's wgmmas are done (kt's may still run): release its stage
            wg_wait1();
            wg_fence_acc(acc);
            if (kt > 0) release((it - 1) % WG_STAGES);
        }
        wg_wait0();
        wg_fence_acc(acc);
        if (ktiles > 0) release((it - 1) % WG_STAGES);
        // epilogue (fragment mapping as gemm_sm90.cu): accumulator 4 j + 2 h + c holds row
        // 16 warp + lane / 4 + 8 h, column 8 j + 2 (lane % 4) + c of this warpgroup's block.
        const size_t bstride = (size_t)w.expert * p.N;
        const T* bias_up = p.bias_up ? (const T*)p.bias_up + bstride : nullptr;
        const T* bias_gate = p.bias_gate ? (const T*)p.bias_gate + bstride : nullptr;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = w.m0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
            int slot;
            const long long ar = wg_arow(p, w, r, slot);
            if (ar < 0) continue;
            const float rw = p.row_weights ? p.row_weights[slot] : 1.0f;
            if (GATED) {
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    const int col = w.n0 + 8 * j + 2 * (lane & 3);
                    if (col >= p.N) continue;
                    const float y0 = epi_value<T, true>(p, rw, col, acc[4 * j + 2 * h],
                                                        acc[4 * (j + 16) + 2 * h], bias_up, bias_gate);
                    const float y1 = col + 1 < p.N
                                         ? epi_value<T, true>(p, rw, col + 1, acc[4 * j + 2 * h + 1],
                                                              acc[4 * (j + 16) + 2 * h + 1], bias_up, bias_gate)
                                         : 0.0f;
                    epi_write2<T>(p, r, col, y0, y1);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 32; ++j) {
                    const int col = w.n0 + 8 * j + 2 * (lane & 3);
                    if (col >= p.N) continue;
                    const float y0 = epi_value<T, true>(p, rw, col, 0.0f, acc[4 * j + 2 * h], bias_up, bias_gate);
                    const float y1 = col + 1 < p.N ? epi_value<T, true>(p, rw, col + 1, 0.0f,
                                                                         acc[4 * j + 2 * h + 1], bias_up, bias_gate)
                                                   : 0.0f;
                    epi_write2<T>(p, r, col, y0, y1);
                }
            }
        }
    }
}

template <typename T, bool GATED, int CS>
MOE_DEVICE void gemm_wgt(const GemmParams& p, int a_tma, const MoeTmaMap* tm_a, const MoeTmaMap* tm_up,
                         const MoeTmaMap* tm_gate) {
    extern __shared__ __align__(1024) unsigned char wg_dsmem[];
    __shared__ __align__(8) uint64_t full[WG_STAGES], empty[WG_STAGES];
    unsigned char* smem = wg_dsmem + ((1024 - (smem_u32(wg_dsmem) & 1023)) & 1023);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(&full[s], a_tma ? 1 : 129);
            mbar_init(&empty[s], 8 * CS);  // the consumer warps of every CTA that writes here
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    const uint32_t rank = CS > 1 ? cluster_rank() : 0;
    // the peer's barriers must be initialized before its first remote arrival or multicast
    if (CS > 1) cluster_sync(); else __syncthreads();
    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
        wgt_producer<T, GATED, CS>(p, a_tma, tm_a, tm_up, tm_gate, smem, full, empty, rank);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
        wgt_consumer<T, GATED, CS>(p, a_tma, smem, full, empty, rank);
    }
    // no CTA leaves while its peer may still arrive on its barriers
    if (CS > 1) cluster_sync();
}

#endif  // MOE_WG_ENABLED

#ifdef MOE_WG_ENABLED
#define MOE_WGT_BODY(T, G, CS) gemm_wgt<T, G, CS>(p, a_tma, &tm_a, &tm_up, &tm_gate)
#else
#define MOE_WGT_BODY(T, G, CS) (void)p, (void)a_tma, (void)tm_a, (void)tm_up, (void)tm_gate
#endif

// Entry points (ungated / gated per 16-bit type; `wgm`: clusters of two CTAs sharing B by TMA
// multicast, grid a multiple of 2). tm_up / tm_gate: 3D maps over w_up / w_gate ([E, N, K],
// box 64 x 128 x 1, 128B swizzle); tm_a: 2D map over A ([M, K], box 64 x 128), read only when
// a_tma != 0 (then A must not be gathered: p.a_gather == 0, and M >= 128).
// (compute capability < 9.0 has no clusters; the stubs compiled there are never launched)
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define MOE_CLUSTER2 __cluster_dims__(2, 1, 1)
#else
#define MOE_CLUSTER2
#endif
#define MOE_WGT_PARAMS                                                                            \
    const __grid_constant__ GemmParams p, const int a_tma, const __grid_constant__ MoeTmaMap tm_a, \
        const __grid_constant__ MoeTmaMap tm_up, const __grid_constant__ MoeTmaMap tm_gate
#define MOE_GEMM_WGT(SUF, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_gemm_wgt_##SUF(MOE_WGT_PARAMS) { \
        MOE_WGT_BODY(T, false, 1);                                                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                   \
        moe_gemm_wgt_gated_##SUF(MOE_WGT_PARAMS) {                                                \
        MOE_WGT_BODY(T, true, 1);                                                                 \
    }                                                                                             \
    extern "C" __global__ void MOE_CLUSTER2 __launch_bounds__(WG_THREADS, 1)                        \
        moe_gemm_wgm_##SUF(MOE_WGT_PARAMS) {                                                      \
        MOE_WGT_BODY(T, false, 2);                                                                \
    }                                                                                             \
    extern "C" __global__ void MOE_CLUSTER2 __launch_bounds__(WG_THREADS, 1)                        \
        moe_gemm_wgm_gated_##SUF(MOE_WGT_PARAMS) {                                                \
        MOE_WGT_BODY(T, true, 2);                                                                 \
    }
MOE_GEMM_WGT(bf16, __nv_bfloat16)
MOE_GEMM_WGT(f16, __half)

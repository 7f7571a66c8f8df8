// gemm_decode.cu: the memory-bound (decode) GEMM for few rows per expert: every weight byte is
// streamed from HBM once per row pass, with deep per-warp cp.async pipelines, and multiplied
// on the tensor cores with the operands swapped (weights = the MMA's M operand).
//
//   C[r, n] = epilogue( sum_k A[arow(r), k] * W_e[n, k] )   (the semantics of gemm.cu; its
//   GemmParams, setup of row weights and its epilogue `epi_store` are reused as they are)
//
// Swap-AB: mma.sync.m16n8k16 with A := 16 weight rows (output features) x 16 k and
//        B := 16 k x 8 token rows, so D is 16 features x 8 rows. The K order inside one 32-wide
//        K step is permuted identically for both operands (a reduction does not care): thread
//        (g = lane / 4, t = lane % 4) loads 16 bytes = k0 + 8t .. 8t + 7 of weight rows g and
//        g + 8 and of token row g; pairs (0,1),(2,3) feed the first mma (virtual k 2t / 2t + 8),
//        pairs (4,5),(6,7) the second. So every fragment is one 16-byte shared-memory read and
//        shared memory holds each row's 32-element K step contiguously (64 B: conflict-free).
// Work:  one block (4 warps) per (active expert, feature strip): WR = 64 output features
//        (gated: 32 features, the gate and up rows of the same features, staged as 64 weight
//        rows, so the epilogue has both); the narrow kernels (`dec{1,2}n`, WR = 32) take half
//        as many features, for grids with few blocks per SM (the host's decode_narrow).
//        Items are numbered active-expert-major; block b takes item b: it finds the
//        (b / strips)-th expert with rows by a scan of expert_offsets (ballots, fixed
//        order) and exits at once (no weight read) when there is none. The
//        grid is the host's upper bound min(E, T K) x strips; dense GEMMs are one group.
// K:     split across the 4 warps, interleaved by 32-wide K steps (warp w takes steps w, w + 4,
//        ...); each warp runs its own STAGES-deep cp.async pipeline (WR x 64 bytes of
//        weights per stage, L2::256B prefetch hint, no block barrier in the K loop). The
//        warps' partial tiles are summed in shared memory in warp order 0, 1, 2, 3
//        (deterministic, no atomics) by the epilogue threads.
// Rows:  the expert's rows are compacted (slot >= 0) 128 at a time into shared memory, then
//        processed in passes of 8 * NF rows (NF n8 fragments); more rows than 8 * NF cost
//        another pass over the weights (correct for any count, meant for few). The first
//        pass's weight prologue is issued before the rows are read, hiding that latency.
// Needs: 16-bit types, K % 8 == 0, 16-byte aligned A and W (vec_a && vec_w; the host checks).
#include "gemm.cu"  // GemmParams, TileRowsT, epi_store, mma16816, cp_async16 (guarded)

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_BK 32           // K per step (elements)
#define DEC_ROWCHUNK 128    // rows compacted at a time (= threads)

// WR: weight rows per block (and per warp stage): 64 (wide strips) or 32 (narrow strips: twice
// the blocks for shapes with few items, e.g. Mixtral's 2 to 8 experts; 4 blocks per SM).
template <int NF, int WR> struct DecCfg {
    static constexpr int STAGES = WR == 32 ? (NF == 1 ? 5 : 4) : (NF >= 8 ? 3 : 4);
    static constexpr int XROWS = 8 * NF;
    static constexpr int MT = WR / 16;                          // m16 tiles per warp
    static constexpr int STAGE_ELEMS = (WR + XROWS) * DEC_BK;   // per warp
    static constexpr int SMEM_BYTES = DEC_WARPS * STAGES * STAGE_ELEMS * 2;
    static constexpr int RED_BYTES = DEC_WARPS * WR * XROWS * 4;
    static_assert(RED_BYTES <= SMEM_BYTES, "reduction tile must fit the pipeline buffers");
};

MOE_DEVICE void cp_async16_s(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// Weights: the same copy with an L2 prefetch hint of 256 bytes. The 4 warps of a block read
// the 4 consecutive 64-byte pieces of a row's 256-byte block in their K steps j (warp w:
// piece w), but they drift apart over a long K loop (no block barrier), so without the hint
// HBM sees scattered 64-byte requests; with it, the first request of a 256-byte block fetches
// all of it into L2 and the other three warps hit there (full-burst DRAM reads).
MOE_DEVICE void cp_async16_w(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(n));
}

MOE_DEVICE uint4 lds128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}

MOE_DEVICE unsigned lanemask_lt() {
    unsigned m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}

// Block-wide stable compaction step (DEC_THREADS threads): returns this thread's rank among
// the flagged threads (-1 if not flagged) and the block's count in *total. Two barriers.
MOE_DEVICE int dec_rank(bool flag, int* wcount, int* total) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned m = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) wcount[warp] = __popc(m);
    __syncthreads();
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) {
        const int c = wcount[w];
        before += w < warp ? c : 0;
        sum += c;
    }
    __syncthreads();  // wcount may be rewritten by the next call
    *total = sum;
    return flag ? before + __popc(m & lanemask_lt()) : -1;
}

template <typename T, int NF, int WR>
MOE_DEVICE void gemm_decode(const GemmParams& p) {
    using C = DecCfg<NF, WR>;
    constexpr int MT = C::MT, HALF = WR / 2;
    constexpr int S = C::STAGES;
    extern __shared__ __align__(16) unsigned char dsmem[];
    __shared__ TileRowsT<DEC_ROWCHUNK> tr;
    __shared__ int s_wcount[DEC_WARPS];
    __shared__ int s_expert;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool gated = p.gated != 0;
    const int feat = gated ? HALF : WR;  // output features per block
    const int strips = (p.N + feat - 1) / feat;
    const int rank = blockIdx.x / strips;   // which group with rows
    const int n0 = (blockIdx.x % strips) * feat;

    // ---- the rank-th expert with rows (dense: the one group)
    int expert = 0, row_begin = 0, row_end = p.M;
    if (!p.grouped && rank > 0) return;
    if (p.grouped) {
        if (tid == 0) s_expert = -1;
        int seen = 0;
        for (int base = 0; base < p.grouped; base += DEC_THREADS) {
            const int e = base + tid;
            const bool act = e < p.grouped && p.expert_offsets[e + 1] > p.expert_offsets[e];
            int total;
            const int r = dec_rank(act, s_wcount, &total);  // barriers also publish s_expert = -1
            if (r >= 0 && seen + r == rank) s_expert = e;
            seen += total;
            if (seen > rank) break;  // uniform
        }
        __syncthreads();
        expert = s_expert;
        if (expert < 0) return;  // fewer groups with rows than the grid's bound
        row_begin = p.expert_offsets[expert];
        row_end = p.expert_offsets[expert + 1];
    }
    const int K = p.K;
    const size_t wstride = (size_t)p.N * K;
    const T* A = (const T*)p.a;
    const T* W = (const T*)p.w_up + expert * wstride;
    const T* WG = gated ? (const T*)p.w_gate + expert * wstride : nullptr;
    const T* bias_up = p.bias_up ? (const T*)p.bias_up + (size_t)expert * p.N : nullptr;
    const T* bias_gate = p.bias_gate ? (const T*)p.bias_gate + (size_t)expert * p.N : nullptr;

    // ---- this lane's copy sources. Weight chunk i (of WR / 8): staged row lane / 4 + 8 i,
    //      16-byte chunk kc = lane % 4 of the K step. Gated: staged rows 0 .. WR/2 - 1 are
    //      gate rows, WR/2 .. WR - 1 the up rows of the same features.
    const int kc = lane & 3;
    // chunk i reads base (i < MT ? wb0 : wb1) + (i % MT) * 8 K; valid when bit i of wmask
    const T* wb0;
    const T* wb1;
    unsigned wmask = 0;
    {
        const int r0 = n0 + (lane >> 2);
        wb0 = (gated ? WG : W) + (size_t)r0 * K + 8 * kc;
        wb1 = gated ? W + (size_t)r0 * K + 8 * kc : wb0 + (size_t)HALF * K;
#pragma unroll
        for (int i = 0; i < WR / 8; ++i) {
            const int col = gated ? r0 + 8 * (i % MT) : r0 + 8 * i;
            wmask |= (col < p.N ? 1u : 0u) << i;
        }
    }
    const size_t k8 = (size_t)8 * K;
    const int ksteps = (K + DEC_BK - 1) / DEC_BK;
    const int nsteps = warp < ksteps ? (ksteps - warp + DEC_WARPS - 1) / DEC_WARPS : 0;
    // Shared-memory addresses: this warp's stages, then lane * 16 bytes, which is both the
    // cp.async destination of chunk (row lane / 4, kc) and the fragment read of (g, t4).
    constexpr uint32_t STAGE_B = C::STAGE_ELEMS * 2, XOFF_B = WR * DEC_BK * 2;
    constexpr uint32_t ROW8_B = 8 * DEC_BK * 2;  // 8 staged rows
    const uint32_t lane_s = smem_u32(dsmem) + warp * S * STAGE_B + lane * 16;
    auto load_w = [&](int j) {  // K step j of this warp into stage j % S
        const int k = (warp + DEC_WARPS * j) * DEC_BK;
        const uint32_t dst = lane_s + (j % S) * STAGE_B;
        const bool kin = k + 8 * kc < K;
#pragma unroll
        for (int i = 0; i < WR / 8; ++i) {
            const bool v = kin && ((wmask >> i) & 1u);
            const T* src = (i < MT ? wb0 : wb1) + (i % MT) * k8 + k;
            cp_async16_w(dst + i * ROW8_B, v ? src : W, v);
        }
    };
    // token row of x fragment i (-1: none); 32-bit, so NF = 8 stays within 255 registers
    int xrow[NF];
    const T* a_lane = A + 8 * kc;
    auto load_x = [&](int j) {
        const int k = (warp + DEC_WARPS * j) * DEC_BK;
        const uint32_t dst = lane_s + (j % S) * STAGE_B + XOFF_B;
        const bool kin = k + 8 * kc < K;
#pragma unroll
        for (int i = 0; i < NF; ++i) {
            const bool v = kin && xrow[i] >= 0;
            cp_async16_s(dst + i * ROW8_B, v ? a_lane + (long long)xrow[i] * K + k : A, v);
        }
    };
    auto w_prologue = [&]() {
#pragma unroll
        for (int j = 0; j < S - 1; ++j) {
            if (j < nsteps) load_w(j);
            cp_async_commit();
        }
    };

    w_prologue();  // weights do not depend on the rows: start streaming now
    bool w_issued = true;
    float* red = reinterpret_cast<float*>(dsmem);  // [warp][WR staged rows][8 NF] after the loop

    for (int c0 = row_begin; c0 < row_end; c0 += DEC_ROWCHUNK) {
        // ---- compact this chunk's real rows (slot >= 0) into tr, in row order
        {
            const int r = c0 + tid;
            long long arow = -1;
            float rw = 1.0f;
            bool valid = false;
            if (r < row_end) {
                if (p.grouped) {
                    const int slot = p.sorted_slots[r];
                    if (slot >= 0) {
                        valid = true;
                        arow = p.a_gather ? slot / p.top_k : r;
                        rw = p.row_weights ? p.row_weights[slot] : 1.0f;
                    }
                } else {
                    valid = true;
                    arow = r;
                    rw = p.row_weights ? p.row_weights[r] : 1.0f;
                }
            }
            int nv;
            const int idx = dec_rank(valid, s_wcount, &nv);
            if (idx >= 0) {
                tr.arow[idx] = arow;
                tr.rw[idx] = rw;
                tr.orow[idx] = r;
            }
            __syncthreads();
            if (nv == 0) continue;  // uniform; the weight prologue (if any) stays issued
            for (int p0 = 0; p0 < nv; p0 += C::XROWS) {
                if (!w_issued) w_prologue();
                w_issued = false;
#pragma unroll
                for (int i = 0; i < NF; ++i) {
                    const int xr = p0 + (lane >> 2) + 8 * i;
                    xrow[i] = xr < nv ? (int)tr.arow[xr] : -1;
                }
                for (int j = 0; j < S - 1 && j < nsteps; ++j) load_x(j);
                cp_async_commit();

                float acc[MT][NF][4];
#pragma unroll
                for (int a = 0; a < MT; ++a)
#pragma unroll
                    for (int b = 0; b < NF; ++b)
#pragma unroll
                        for (int q = 0; q < 4; ++q) acc[a][b][q] = 0.0f;

                const int g = lane >> 2, t4 = lane & 3;
#pragma unroll 1
                for (int j = 0; j < nsteps; ++j) {
                    if (j == 0) cp_async_wait<0>(); else cp_async_wait<S - 2>();
                    __syncwarp();
                    {
                        const int nj = j + S - 1;  // refill the stage read in step j - 1
                        if (nj < nsteps) { load_w(nj); load_x(nj); }
                        cp_async_commit();
                    }
                    const uint32_t st = lane_s + (j % S) * STAGE_B;
                    uint4 xf[NF];
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf) xf[nf] = lds128(st + XOFF_B + nf * ROW8_B);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const uint4 lo = lds128(st + (2 * mt) * ROW8_B);      // rows mt*16 + g
                        const uint4 hi = lds128(st + (2 * mt + 1) * ROW8_B);  // rows + 8
                        const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
                        const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
                        for (int nf = 0; nf < NF; ++nf) {
                            const uint32_t b0[2] = {xf[nf].x, xf[nf].y};
                            const uint32_t b1[2] = {xf[nf].z, xf[nf].w};
                            mma16816<T>(acc[mt][nf], a0, b0);
                            mma16816<T>(acc[mt][nf], a1, b1);
                        }
                    }
                }
                cp_async_wait<0>();
                __syncthreads();  // every warp is done with its stages: reuse them as red
                // red[warp][staged row][pass row]: D of (mt, nf) is rows mt*16 + g (+8),
                // pass rows nf*8 + 2 t4 (+1)
                float* rw_ = red + warp * WR * C::XROWS;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int sr = mt * 16 + g + 8 * h;
                            *reinterpret_cast<float2*>(&rw_[sr * C::XROWS + nf * 8 + 2 * t4]) =
                                make_float2(acc[mt][nf][2 * h], acc[mt][nf][2 * h + 1]);
                        }
                __syncthreads();
                const int np = min(C::XROWS, nv - p0);
#pragma unroll 1
                for (int o = tid; o < feat * np; o += DEC_THREADS) {
                    const int f = o % feat, i = o / feat;
                    float u = 0.0f, gv = 0.0f;
                    const int ur = gated ? f + HALF : f;
#pragma unroll
                    for (int w = 0; w < DEC_WARPS; ++w) {  // fixed order: deterministic
                        const float* rr = red + w * WR * C::XROWS;
                        u += rr[ur * C::XROWS + i];
                        if (gated) gv += rr[f * C::XROWS + i];
                    }
                    epi_store<T, DEC_ROWCHUNK>(p, tr, p0 + i, n0 + f, gv, u, bias_up, bias_gate);
                }
                __syncthreads();  // red and tr are rewritten by the next pass / chunk
            }
        }
    }
    cp_async_wait<0>();  // an unused weight prologue (chunk with no rows) must land first
}

// Wide strips (64 weight rows per block): 2 blocks per SM. Narrow strips (32 rows; NF 1 and 2,
// chosen by the host when the wide grid has few blocks per SM): 4 blocks per SM.
#define MOE_GEMM_DEC(NF, SUF, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 2)                                  \
        moe_gemm_dec##NF##_##SUF(const GemmParams p) {                                            \
        gemm_decode<T, NF, 64>(p);                                                                \
    }
#define MOE_GEMM_DEC_NARROW(NF, SUF, T)                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 4)                                  \
        moe_gemm_dec##NF##n_##SUF(const GemmParams p) {                                           \
        gemm_decode<T, NF, 32>(p);                                                                \
    }
MOE_GEMM_DEC(1, bf16, __nv_bfloat16)
MOE_GEMM_DEC(2, bf16, __nv_bfloat16)
MOE_GEMM_DEC(4, bf16, __nv_bfloat16)
MOE_GEMM_DEC(8, bf16, __nv_bfloat16)
MOE_GEMM_DEC(1, f16, __half)
MOE_GEMM_DEC(2, f16, __half)
MOE_GEMM_DEC(4, f16, __half)
MOE_GEMM_DEC(8, f16, __half)
MOE_GEMM_DEC_NARROW(1, bf16, __nv_bfloat16)
MOE_GEMM_DEC_NARROW(2, bf16, __nv_bfloat16)
MOE_GEMM_DEC_NARROW(1, f16, __half)
MOE_GEMM_DEC_NARROW(2, f16, __half)

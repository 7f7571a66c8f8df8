// gemv.cu: dense GEMMs with few rows (router logits, latent fc1/fc2, the shared expert's up
// and down projections at decode sizes). The tiled kernels of gemm.cu give such a product only
// ceil(M / 64) x ceil(N / 64) blocks, each walking all of K alone, which leaves the GPU idle
// (e.g. 2 blocks for a 128-expert router); here every output column gets its own warp.
//
//   C[r, n] = epilogue( sum_k A[r, k] * W[n, k] )   for r < M <= GEMV_MR, dense only
//
// Grid:  (ceil(N / 4), ceil(M / GEMV_MR)); 128 threads = 4 warps, warp w owns column
//        n = 4 * blockIdx.x + w (for a gated product both the gate and the up row of n).
// Loop:  each lane takes 8 consecutive K elements per step (one 16-byte load of W and of
//        each A row when the host says vec_a / vec_w), 256 K elements per warp step, the
//        weight loads of 4 steps (gated 2) issued before their products; plain
//        bounds-checked scalar loads otherwise (f32, odd K, unaligned views).
// Reduce: butterfly shuffles in a fixed order (deterministic); lane r applies the shared
//        epilogue (epi_store of gemm.cu: bias, activation, row scale, scale, accumulate).
// Assumptions: p.grouped == 0 (the host dispatches grouped products elsewhere).

#define GEMV_MR 16
#define GEMV_WARPS 4

template <typename T>
MOE_DEVICE void load8(const T* src, float* dst) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = to_f32(h[i]);
}

template <typename T, bool GATED>
MOE_DEVICE void gemv(const GemmParams& p) {
    __shared__ TileRowsT<GEMV_MR> tr;
    const int m0 = blockIdx.y * GEMV_MR;
    setup_rows<GEMV_MR>(p, tr, m0);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col = blockIdx.x * GEMV_WARPS + warp;
    if (col >= p.N) return;
    const int K = p.K;
    const int rows = min(GEMV_MR, p.M - m0);
    const T* A = (const T*)p.a + (size_t)m0 * K;
    const T* W = (const T*)p.w_up + (size_t)col * K;
    const T* WG = GATED ? (const T*)p.w_gate + (size_t)col * K : nullptr;
    float u[GEMV_MR], g[GEMV_MR];
#pragma unroll
    for (int r = 0; r < GEMV_MR; ++r) u[r] = g[r] = 0.0f;
    if (p.vec_a && p.vec_w) {
        // U warp steps per iteration, their weight loads issued first: a warp otherwise has
        // one 512-byte load in flight and waits a full memory latency per 256 K elements
        // (the T = 1 router logits: K = 2048..4096, 8..16 dependent round trips).
        constexpr int U = GATED ? 2 : 4;
        for (int k0 = lane * 8; k0 < K; k0 += 256 * U) {
            uint4 wv[U], gw[U];
#pragma unroll
            for (int s = 0; s < U; ++s) {
                const int k = k0 + 256 * s;
                const bool in = k < K;
                wv[s] = in ? __ldg(reinterpret_cast<const uint4*>(W + k)) : make_uint4(0, 0, 0, 0);
                if (GATED)
                    gw[s] = in ? __ldg(reinterpret_cast<const uint4*>(WG + k)) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int s = 0; s < U; ++s) {
                const int k = k0 + 256 * s;
                if (k >= K) break;  // uniform per lane; later steps are out of range too
                float w[8], wg[8], a[8];
                const T* hw = reinterpret_cast<const T*>(&wv[s]);
                const T* hg = reinterpret_cast<const T*>(&gw[s]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    w[i] = to_f32(hw[i]);
                    if (GATED) wg[i] = to_f32(hg[i]);
                }
#pragma unroll
                for (int r = 0; r < GEMV_MR; ++r) {
                    if (r < rows) {
                        load8(A + (size_t)r * K + k, a);
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            u[r] = fmaf(a[i], w[i], u[r]);
                            if (GATED) g[r] = fmaf(a[i], wg[i], g[r]);
                        }
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float w = to_f32(W[k]);
            const float wg = GATED ? to_f32(WG[k]) : 0.0f;
#pragma unroll
            for (int r = 0; r < GEMV_MR; ++r) {
                if (r < rows) {
                    const float a = to_f32(A[(size_t)r * K + k]);
                    u[r] = fmaf(a, w, u[r]);
                    if (GATED) g[r] = fmaf(a, wg, g[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MR; ++r) {
        u[r] = warp_sum(u[r]);
        if (GATED) g[r] = warp_sum(g[r]);
    }
    const T* bias_up = (const T*)p.bias_up;
    const T* bias_gate = (const T*)p.bias_gate;
#pragma unroll
    for (int r = 0; r < GEMV_MR; ++r)
        if (lane == r && r < rows) epi_store<T, GEMV_MR>(p, tr, r, col, g[r], u[r], bias_up, bias_gate);
}

#define MOE_GEMV(SUF, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) moe_gemv_##SUF(const GemmParams p) { \
        if (p.gated) gemv<T, true>(p); else gemv<T, false>(p);                                   \
    }
MOE_GEMV(f32, float)
MOE_GEMV(f16, __half)
MOE_GEMV(bf16, __nv_bfloat16)

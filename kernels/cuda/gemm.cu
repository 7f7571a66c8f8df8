// gemm.cu: one GEMM kernel family for every matrix product of the layer:
//   router logits (f32 out), dense linear (latent fc1/fc2, shared down: bias, row scale,
//   scale, accumulate), dense MLP up (shared expert: gated/ungated activation epilogue), and
//   the grouped expert GEMMs (GEMM1 with the activation fused into its epilogue and the
//   routing weight optionally applied to the pre-activations; GEMM2 with the routing weight
//   fused into its epilogue).
//
//   C[r, n] = epilogue( sum_k A[arow(r), k] * W_e[n, k] )      (W is [N, K] like nn.Linear)
//
// Grid:  (ceil(M / 64), ceil(N / 64)); 128 threads (4 warps). For a grouped GEMM, M is the
//        plan's row capacity; a tile whose first row is past expert_offsets[E] exits, else its
//        expert e is found by binary search (expert blocks are padded to a multiple of 64
//        rows, so a tile never straddles two experts).
// Tile:  64 x 64 outputs, K step 32 (bf16/f16, tensor cores) or 16 (f32, SIMT), double
//        buffered in shared memory, the next K step staged in registers while the current one
//        is multiplied. Rows of A are gathered through sorted_slots (token = slot / top_k).
// Warp:  bf16/f16: warp (wm, wn) in a 2 x 2 layout owns a 32 x 32 sub-tile: 2 x 4
//        mma.sync.m16n8k16 (f32 accumulate) per 16-wide K step, fragments read from padded
//        shared memory (row stride 40 halves: conflict-free 32-bit reads). A gated GEMM keeps
//        a second accumulator set for the gate projection. f32: each thread owns 8 x 4 outputs
//        of plain FMA (no tf32, so f32 keeps full precision).
// Assumptions: A, W, biases in the element type; 16-byte vector loads only when the host says
//        K % 8 == 0 and the base pointers are 16-byte aligned (vec_a / vec_w), otherwise
//        scalar loads with bounds checks. Padding rows (slot -1) are neither read nor written.
#pragma once
#include "common.cuh"

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_THREADS 128

struct GemmParams {
    const void* a;
    const void* w_up;
    const void* w_gate;        // nullable (gated only)
    const void* bias_up;       // nullable
    const void* bias_gate;     // nullable
    const int* expert_offsets; // grouped only
    const int* sorted_slots;   // grouped only
    const float* row_weights;  // grouped: [T K] by slot; dense: [M] by row; nullable
    void* out;
    int M, N, K;
    int grouped;      // local experts; 0 = dense
    int top_k;
    int a_gather;     // A row = token of the row's slot (grouped GEMM1)
    int weight_mode;  // 0 none, 1 on the pre-activations, 2 on the output
    int epilogue;     // 0 linear, 1 MLP activation
    int gated;
    int act;
    float alpha, limit, scale;
    int accumulate;
    int out_f32;
    int vec_a, vec_w;
};

template <int BM>
struct TileRowsT {
    long long arow[BM];  // A row index, -1 for a padding row
    float rw[BM];
    int orow[BM];        // output row, -1 to skip
};
typedef TileRowsT<GEMM_BM> TileRows;

// Sets up the tile's rows; returns the expert (or -1 when the tile is past the last row).
template <int BM>
MOE_DEVICE int setup_rows(const GemmParams& p, TileRowsT<BM>& tr, int m0) {
    int expert = 0;
    if (p.grouped) {
        const int total = p.expert_offsets[p.grouped];
        if (m0 >= total) return -1;
        int lo = 0, hi = p.grouped - 1;  // largest e with offsets[e] <= m0
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (p.expert_offsets[mid] <= m0) lo = mid; else hi = mid - 1;
        }
        expert = lo;
    }
    for (int i = threadIdx.x; i < BM; i += blockDim.x) {
        const int r = m0 + i;
        long long arow = -1;
        float rw = 1.0f;
        int orow = -1;
        if (p.grouped) {
            const int end = p.expert_offsets[expert + 1];
            const int slot = r < end ? p.sorted_slots[r] : -1;
            if (slot >= 0) {
                arow = p.a_gather ? slot / p.top_k : r;
                rw = p.row_weights ? p.row_weights[slot] : 1.0f;
                orow = r;
            }
        } else if (r < p.M) {
            arow = r;
            rw = p.row_weights ? p.row_weights[r] : 1.0f;
            orow = r;
        }
        tr.arow[i] = arow;
        tr.rw[i] = rw;
        tr.orow[i] = orow;
    }
    return expert;
}

// The epilogue value of one output (row weight rw, column col, gate / up accumulators); shared
// by every GEMM kernel (also gemm_sm90.cu, with NOCALL = true: no out-of-line division).
template <typename T, bool NOCALL = false>
MOE_DEVICE float epi_value(const GemmParams& p, float rw, int col, float g, float u,
                           const T* bias_up, const T* bias_gate) {
    float y;
    if (p.epilogue == 1) {
        const float s = p.weight_mode == 1 ? rw : 1.0f;
        const float up = u * s + (bias_up ? to_f32(bias_up[col]) : 0.0f);
        if (p.gated) {
            const float gt = g * s + (bias_gate ? to_f32(bias_gate[col]) : 0.0f);
            y = gated_act_t<NOCALL>(p.act, gt, up, p.alpha, p.limit);
        } else {
            y = activate_t<NOCALL>(p.act, up, p.alpha, p.limit);
        }
    } else {
        y = u + (bias_up ? to_f32(bias_up[col]) : 0.0f);
        if (p.weight_mode == 2) y *= rw;
        y *= p.scale;
    }
    return y;
}

// Writes (or accumulates into) output element (r, col).
template <typename T>
MOE_DEVICE void epi_write(const GemmParams& p, int r, int col, float y) {
    const size_t o = (size_t)r * p.N + col;
    if (p.out_f32) {
        float* out = (float*)p.out;
        if (p.accumulate) y += out[o];
        out[o] = y;
    } else {
        T* out = (T*)p.out;
        if (p.accumulate) y += to_f32(out[o]);
        out[o] = from_f32<T>(y);
    }
}

template <typename T, int BM>
MOE_DEVICE void epi_store(const GemmParams& p, const TileRowsT<BM>& tr, int rl, int col, float g,
                          float u, const T* bias_up, const T* bias_gate) {
    const int r = tr.orow[rl];
    if (r < 0 || col >= p.N) return;
    epi_write<T>(p, r, col, epi_value<T>(p, tr.rw[rl], col, g, u, bias_up, bias_gate));
}

// ------------------------------------------------------------------ tensor-core path (16-bit)

#define MMA_BK 32
#define MMA_LD 40  // padded row stride in halves

template <typename T> MOE_DEVICE void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <> MOE_DEVICE void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> MOE_DEVICE void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Loads 8 consecutive elements (k0 .. k0 + 7) of a row, zero outside [0, K) or for row < 0.
template <typename T>
MOE_DEVICE uint4 load8(const T* base, long long row, int k0, int K, bool vec) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < 0 || k0 >= K) return v;
    const T* ptr = base + row * (long long)K + k0;
    if (vec) return *reinterpret_cast<const uint4*>(ptr);
    T tmp[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) tmp[j] = (k0 + j < K) ? ptr[j] : from_f32<T>(0.0f);
    return *reinterpret_cast<uint4*>(tmp);
}

template <typename T>
MOE_DEVICE void gemm_mma(const GemmParams& p) {
    __shared__ __align__(16) T As[2][GEMM_BM][MMA_LD];
    __shared__ __align__(16) T Bs[2][GEMM_BN][MMA_LD];
    __shared__ __align__(16) T Gs[2][GEMM_BN][MMA_LD];
    __shared__ TileRows tr;
    const int m0 = blockIdx.x * GEMM_BM, n0 = blockIdx.y * GEMM_BN;
    const int expert = setup_rows<GEMM_BM>(p, tr, m0);
    if (expert < 0) return;
    __syncthreads();
    const size_t wstride = (size_t)p.N * p.K;
    const T* A = (const T*)p.a;
    const T* W = (const T*)p.w_up + expert * wstride;
    const T* WG = p.gated ? (const T*)p.w_gate + expert * wstride : nullptr;
    const T* bias_up = p.bias_up ? (const T*)p.bias_up + (size_t)expert * p.N : nullptr;
    const T* bias_gate = p.bias_gate ? (const T*)p.bias_gate + (size_t)expert * p.N : nullptr;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t4 = lane & 3;
    const bool gated = p.gated != 0;
    // this thread's load rows (2 vectors of 8 per operand)
    long long a_row[2], b_row[2];
    int lrow[2];
    const int lcol = (tid & 3) * 8;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        lrow[i] = (tid >> 2) + 32 * i;
        a_row[i] = tr.arow[lrow[i]];
        b_row[i] = (n0 + lrow[i] < p.N) ? (long long)(n0 + lrow[i]) : -1;
    }
    float acc[2][4][4], accg[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) { acc[i][j][c] = 0.0f; accg[i][j][c] = 0.0f; }

    uint4 ra[2], rb[2], rg[2];
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            ra[i] = load8(A, a_row[i], k0 + lcol, p.K, p.vec_a);
            rb[i] = load8(W, b_row[i], k0 + lcol, p.K, p.vec_w);
            if (gated) rg[i] = load8(WG, b_row[i], k0 + lcol, p.K, p.vec_w);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            *reinterpret_cast<uint4*>(&As[buf][lrow[i]][lcol]) = ra[i];
            *reinterpret_cast<uint4*>(&Bs[buf][lrow[i]][lcol]) = rb[i];
            if (gated) *reinterpret_cast<uint4*>(&Gs[buf][lrow[i]][lcol]) = rg[i];
        }
    };
    const int ktiles = (p.K + MMA_BK - 1) / MMA_BK;
    load(0);
    store(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ktiles) load((kt + 1) * MMA_BK);
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += 16) {
            uint32_t af[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm * 32 + mi * 16 + g;
                af[mi][0] = *reinterpret_cast<const uint32_t*>(&As[buf][r][ks + 2 * t4]);
                af[mi][1] = *reinterpret_cast<const uint32_t*>(&As[buf][r + 8][ks + 2 * t4]);
                af[mi][2] = *reinterpret_cast<const uint32_t*>(&As[buf][r][ks + 2 * t4 + 8]);
                af[mi][3] = *reinterpret_cast<const uint32_t*>(&As[buf][r + 8][ks + 2 * t4 + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int c = wn * 32 + ni * 8 + g;
                uint32_t bf[2];
                bf[0] = *reinterpret_cast<const uint32_t*>(&Bs[buf][c][ks + 2 * t4]);
                bf[1] = *reinterpret_cast<const uint32_t*>(&Bs[buf][c][ks + 2 * t4 + 8]);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) mma16816<T>(acc[mi][ni], af[mi], bf);
                if (gated) {
                    bf[0] = *reinterpret_cast<const uint32_t*>(&Gs[buf][c][ks + 2 * t4]);
                    bf[1] = *reinterpret_cast<const uint32_t*>(&Gs[buf][c][ks + 2 * t4 + 8]);
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) mma16816<T>(accg[mi][ni], af[mi], bf);
                }
            }
        }
        if (kt + 1 < ktiles) {
            store(buf ^ 1);  // the other buffer was last read before the previous barrier
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int rl = wm * 32 + mi * 16 + g + 8 * h;
                    const int col = n0 + wn * 32 + ni * 8 + 2 * t4 + c;
                    epi_store<T, GEMM_BM>(p, tr, rl, col, accg[mi][ni][2 * h + c], acc[mi][ni][2 * h + c],
                                 bias_up, bias_gate);
                }
}

// ------------------------------------------------------------------ SIMT path (f32)

#define SIMT_BK 16
#define SIMT_LD 68

MOE_DEVICE void gemm_simt_f32(const GemmParams& p) {
    __shared__ float As[2][SIMT_BK][SIMT_LD];
    __shared__ float Bs[2][SIMT_BK][SIMT_LD];
    __shared__ float Gs[2][SIMT_BK][SIMT_LD];
    __shared__ TileRows tr;
    const int m0 = blockIdx.x * GEMM_BM, n0 = blockIdx.y * GEMM_BN;
    const int expert = setup_rows<GEMM_BM>(p, tr, m0);
    if (expert < 0) return;
    __syncthreads();
    const size_t wstride = (size_t)p.N * p.K;
    const float* A = (const float*)p.a;
    const float* W = (const float*)p.w_up + expert * wstride;
    const float* WG = p.gated ? (const float*)p.w_gate + expert * wstride : nullptr;
    const float* bias_up = p.bias_up ? (const float*)p.bias_up + (size_t)expert * p.N : nullptr;
    const float* bias_gate =
        p.bias_gate ? (const float*)p.bias_gate + (size_t)expert * p.N : nullptr;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const bool gated = p.gated != 0;
    // loads: element idx = tid + 128 i, row = idx / 16, k = idx % 16
    const int lk = tid & 15;
    long long a_row[8], b_row[8];
    int lrow[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        lrow[i] = (tid >> 4) + 8 * i;
        a_row[i] = tr.arow[lrow[i]];
        b_row[i] = (n0 + lrow[i] < p.N) ? (long long)(n0 + lrow[i]) : -1;
    }
    float acc[8][4], accg[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) { acc[i][j] = 0.0f; accg[i][j] = 0.0f; }
    float ra[8], rb[8], rg[8];
    auto load = [&](int k0) {
        const int k = k0 + lk;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            ra[i] = (a_row[i] >= 0 && k < p.K) ? A[a_row[i] * p.K + k] : 0.0f;
            rb[i] = (b_row[i] >= 0 && k < p.K) ? W[b_row[i] * p.K + k] : 0.0f;
            if (gated) rg[i] = (b_row[i] >= 0 && k < p.K) ? WG[b_row[i] * p.K + k] : 0.0f;
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            As[buf][lk][lrow[i]] = ra[i];
            Bs[buf][lk][lrow[i]] = rb[i];
            if (gated) Gs[buf][lk][lrow[i]] = rg[i];
        }
    };
    const int ktiles = (p.K + SIMT_BK - 1) / SIMT_BK;
    load(0);
    store(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ktiles) load((kt + 1) * SIMT_BK);
#pragma unroll
        for (int k = 0; k < SIMT_BK; ++k) {
            float a[8], b[4], bg[4];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = As[buf][k][ty * 8 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[buf][k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            if (gated) {
#pragma unroll
                for (int j = 0; j < 4; ++j) bg[j] = Gs[buf][k][tx * 4 + j];
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) accg[i][j] = fmaf(a[i], bg[j], accg[i][j]);
            }
        }
        if (kt + 1 < ktiles) store(buf ^ 1);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
            epi_store<float, GEMM_BM>(p, tr, ty * 8 + i, n0 + tx * 4 + j, accg[i][j], acc[i][j], bias_up,
                             bias_gate);
}

// ------------------------------------------------------------------ pipelined tensor-core path
//
// The fast path for 16-bit types when K % 8 == 0 and the operands are 16-byte aligned:
// Grid:  (ceil(M / 128), ceil(N / 64)); 256 threads (8 warps, 2 x 4).
// Tile:  128 rows x 64 output columns, K step 32, 3-stage cp.async pipeline in dynamic shared
//        memory (rows padded to 40 halves: conflict-free ldmatrix). A gated GEMM stages 128 B
//        rows per K step: for warp column wn, 16 gate rows then the 16 up rows of the same 16
//        output columns, so each thread holds gate and up of the same outputs in registers.
// Warp:  64 x 32 (gated: 64 x 16 outputs, gate and up) of mma.sync.m16n8k16, fragments loaded
//        with ldmatrix.x4; the epilogue is the shared one above.
// Rows of expert blocks must be padded to a multiple of 128 (the plan's row_align).
#define TC_BM 128
#define TC_BK 32
#define TC_LD 40
#define TC_STAGES 3
#define TC_THREADS 256

MOE_DEVICE uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

MOE_DEVICE void cp_async16(void* dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(n));
}
MOE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> MOE_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

MOE_DEVICE void ldmatrix_x4(uint32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

template <typename T, bool GATED>
MOE_DEVICE void gemm_tc(const GemmParams& p) {
    constexpr int BROWS = GATED ? 128 : 64;  // staged B rows per K step
    constexpr int NI = GATED ? 4 : 2;        // n8 tiles per warp (gated: 2 gate + 2 up)
    extern __shared__ __align__(16) unsigned char dsmem[];
    T* As = reinterpret_cast<T*>(dsmem);                       // [STAGES][128][40]
    T* Bs = As + TC_STAGES * TC_BM * TC_LD;                     // [STAGES][BROWS][40]
    __shared__ TileRowsT<TC_BM> tr;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * 64;
    const int expert = setup_rows<TC_BM>(p, tr, m0);
    if (expert < 0) return;
    __syncthreads();
    const size_t wstride = (size_t)p.N * p.K;
    const T* A = (const T*)p.a;
    const T* W = (const T*)p.w_up + expert * wstride;
    const T* WG = GATED ? (const T*)p.w_gate + expert * wstride : nullptr;
    const T* bias_up = p.bias_up ? (const T*)p.bias_up + (size_t)expert * p.N : nullptr;
    const T* bias_gate = p.bias_gate ? (const T*)p.bias_gate + (size_t)expert * p.N : nullptr;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
    const int K = p.K;

    // this thread's copy sources: A chunks (2), B chunks (BROWS / 64)
    const int kc = (tid & 3) * 8;
    const T* a_src[2];
    int a_dst[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = (tid >> 2) + 64 * i;
        const long long ar = tr.arow[row];
        a_src[i] = ar >= 0 ? A + ar * (long long)K : nullptr;
        a_dst[i] = row * TC_LD + kc;
    }
    constexpr int BCH = BROWS / 64;
    const T* b_src[BCH];
    int b_dst[BCH];
#pragma unroll
    for (int i = 0; i < BCH; ++i) {
        const int j = (tid >> 2) + 64 * i;  // staged B row
        int col;
        const T* base;
        if (GATED) {
            const int within = j & 31;
            col = n0 + (j >> 5) * 16 + (within & 15);
            base = within >= 16 ? W : WG;
        } else {
            col = n0 + j;
            base = W;
        }
        b_src[i] = col < p.N ? base + (long long)col * K : nullptr;
        b_dst[i] = j * TC_LD + kc;
    }
    auto load = [&](int stage, int k0) {
        T* as = As + stage * TC_BM * TC_LD;
        T* bs = Bs + stage * BROWS * TC_LD;
        const bool kin = k0 + kc < K;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const bool v = kin && a_src[i] != nullptr;
            cp_async16(as + a_dst[i], v ? a_src[i] + k0 + kc : A, v);
        }
#pragma unroll
        for (int i = 0; i < BCH; ++i) {
            const bool v = kin && b_src[i] != nullptr;
            cp_async16(bs + b_dst[i], v ? b_src[i] + k0 + kc : W, v);
        }
    };

    float acc[4][NI][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    const int ktiles = (K + TC_BK - 1) / TC_BK;
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles) load(s, s * TC_BK);
        cp_async_commit();
    }
    // ldmatrix lane addressing
    const int a_lrow = lane & 15, a_lcol = (lane >> 4) * 8;
    const int b_lrow = (lane & 7) + ((lane >> 4) << 3), b_lcol = ((lane >> 3) & 1) * 8;
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + TC_STAGES - 1;
            if (nk < ktiles) load(nk % TC_STAGES, nk * TC_BK);
            cp_async_commit();
        }
        const T* as = As + (kt % TC_STAGES) * TC_BM * TC_LD;
        const T* bs = Bs + (kt % TC_STAGES) * BROWS * TC_LD;
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            uint32_t af[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
                ldmatrix_x4(af[mi], as + (wm * 64 + mi * 16 + a_lrow) * TC_LD + ks + a_lcol);
            uint32_t bf[NI][2];
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                uint32_t r[4];
                const int wrow = GATED ? wn * 32 : wn * 16;
                ldmatrix_x4(r, bs + (wrow + nj * 16 + b_lrow) * TC_LD + ks + b_lcol);
                bf[2 * nj][0] = r[0];
                bf[2 * nj][1] = r[1];
                bf[2 * nj + 1][0] = r[2];
                bf[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int rl = wm * 64 + mi * 16 + g + 8 * h;
                    const int col = n0 + wn * 16 + ni * 8 + 2 * t4 + c;
                    const float u = GATED ? acc[mi][ni + 2][2 * h + c] : acc[mi][ni][2 * h + c];
                    const float gv = GATED ? acc[mi][ni][2 * h + c] : 0.0f;
                    epi_store<T, TC_BM>(p, tr, rl, col, gv, u, bias_up, bias_gate);
                }
}

#define MOE_GEMM_TC(SUF, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) moe_gemm_tc_##SUF(const GemmParams p) { \
        gemm_tc<T, false>(p);                                                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                     \
        moe_gemm_tc_gated_##SUF(const GemmParams p) {                                            \
        gemm_tc<T, true>(p);                                                                     \
    }                                                                                            \
    /* the same, capped at 128 registers for two blocks per SM (some spills) */                  \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)                                  \
        moe_gemm_tc_gated2_##SUF(const GemmParams p) {                                           \
        gemm_tc<T, true>(p);                                                                     \
    }
MOE_GEMM_TC(bf16, __nv_bfloat16)
MOE_GEMM_TC(f16, __half)

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) moe_gemm_bf16(const GemmParams p) {
    gemm_mma<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) moe_gemm_f16(const GemmParams p) {
    gemm_mma<__half>(p);
}
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) moe_gemm_f32(const GemmParams p) {
    gemm_simt_f32(p);
}

// gemm_sm90.cu: the Hopper (sm_90a) grouped GEMM on wgmma, for the compute-bound regime.
//
//   Same GemmParams and semantics as gemm.cu (grouped over expert_offsets, A rows gathered
//   through sorted_slots, W [E, N, K] row-major, the shared epilogue epi_value / epi_write).
//
// Eligibility (checked by the host, moe-cuda/src/lib.rs `wgmma_ok`): bf16 or f16, K % 64 == 0,
//        A and W (and w_gate) 16-byte aligned, N >= 128, a device of compute capability 9.0,
//        and for a grouped GEMM expert blocks padded to a multiple of 128 rows (the plan's
//        row_align). Everything else falls back to the kernels of gemm.cu.
// Grid:  persistent, gridDim.x <= #SMs blocks of 384 threads (3 warpgroups), 1 block per SM.
//        The tile list is derived on the device: M tiles = ceil(rows / 128) with rows =
//        expert_offsets[E] (grouped) or M (dense), N tiles = ceil(N / BN) with BN = 256
//        (ungated) or 128 (gated: 128 gate + 128 up columns = 256 staged B rows). Tiles are
//        ordered in groups of 16 M tiles (all N tiles of a group, M fastest) for L2 reuse;
//        block b takes tiles b, b + gridDim.x, ... The expert of a tile is found by binary
//        search (a tile never straddles two experts).
// Roles: warpgroup 0 = producer (setmaxnreg 72): gathers the A tile (128 rows x 64 K) and the
//        B tile (256 rows x 64 K) of each K step with cp.async (16-byte chunks, zero-filled for
//        padding rows and columns past N) into a 4-stage ring, placing each chunk at its
//        128-byte-swizzled position; when a stage's copies have landed (cp.async.wait_group)
//        each producer thread fences (fence.proxy.async: the generic-proxy writes become
//        visible to wgmma) and arrives on the stage's `full` mbarrier (128 arrivals).
//        Warpgroups 1 and 2 = consumers (setmaxnreg 216): each owns 64 rows of the tile and
//        all 256 staged columns; per K step it waits on `full`, issues 4 wgmma.m64n256k16
//        (f32 accumulate, A and B from shared memory through 128B-swizzle descriptors), waits
//        for them (wgmma.wait_group 0) and releases the stage (`empty` mbarrier, one arrival
//        per consumer warp: 8). After the last K step of a tile the consumer runs the epilogue
//        straight from its 128 accumulator registers while the producer already fills the
//        ring with the next tile.
// Shared memory: 4 x (16 KB A + 32 KB B) + 1 KB alignment = 197632 bytes dynamic (+ the
//        mbarriers). ptxas (nvcc 13.0, sm_90a): 168 registers at entry, 0 spills in the
//        consumers, 0 (ungated) / 28 bytes (gated, producer only) spilled; 4 HGMMA.64x256x16
//        back to back per K step with one WARPGROUP.DEPBAR, no CALL.
// (included by all.cu after gemm.cu, whose GemmParams, epi_value, epi_write, cp.async helpers it uses)

#define WG_BM 128
#define WG_BROWS 256  // staged B rows per K step
#define WG_BK 64
#define WG_STAGES 4
#define WG_LAG 2      // producer signals a stage after the copies of WG_LAG later stages are issued
#define WG_THREADS 384
#define WG_GROUP_M 16
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES (WG_BROWS * WG_BK * 2)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)
#define WG_SMEM_BYTES (WG_STAGES * WG_STAGE_BYTES + 1024)

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_WG_ENABLED 1
#endif

#ifdef MOE_WG_ENABLED

// ---- tile schedule (identical in producer and consumers)
struct WgTile {
    int expert, m0, n0, rows_end;  // rows_end: end of the expert's block (grouped) or M
};

MOE_DEVICE int wg_bn(const GemmParams& p) { return p.gated ? 128 : 256; }

MOE_DEVICE void wg_counts(const GemmParams& p, int& mt, int& nt) {
    const int rows = p.grouped ? p.expert_offsets[p.grouped] : p.M;
    mt = (rows + WG_BM - 1) / WG_BM;
    const int bn = wg_bn(p);
    nt = (p.N + bn - 1) / bn;
}

// The tile at rows m0.. and columns n0..: its expert (binary search over the expert offsets;
// for m0 at or past the last expert's end, the last expert with an empty row range).
MOE_DEVICE WgTile wg_tile_at(const GemmParams& p, int m0, int n0) {
    WgTile w;
    w.m0 = m0;
    w.n0 = n0;
    w.expert = 0;
    w.rows_end = p.M;
    if (p.grouped) {
        int lo = 0, hi = p.grouped - 1;  // largest e with offsets[e] <= m0
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (p.expert_offsets[mid] <= w.m0) lo = mid; else hi = mid - 1;
        }
        w.expert = lo;
        w.rows_end = p.expert_offsets[lo + 1];
    }
    return w;
}

// Unit u of a schedule for clusters of CS CTAs: (set of CS consecutive M tiles, N tile) in
// groups of WG_GROUP_M / CS sets (all N tiles of a group, sets fastest); the CTA of cluster
// rank r takes M tile CS set + r. CS = 1 is the tile order of this kernel: groups of
// WG_GROUP_M M tiles, M fastest, for L2 reuse (gemm_sm90_tma.cu's clusters use CS = 2).
template <int CS>
MOE_DEVICE WgTile wg_unit_tile(const GemmParams& p, int u, int sets, int nt, uint32_t rank) {
    const int gm = WG_GROUP_M / CS;
    const int per_group = gm * nt;
    const int group = u / per_group;
    const int first = group * gm;
    const int gsz = min(gm, sets - first);
    const int r = u - group * per_group;
    return wg_tile_at(p, (CS * (first + r % gsz) + (int)rank) * WG_BM, (r / gsz) * wg_bn(p));
}

// Tile t of this kernel's schedule.
MOE_DEVICE WgTile wg_tile(const GemmParams& p, int t, int mt, int nt) {
    return wg_unit_tile<1>(p, t, mt, nt, 0);
}

// A row of output row r (grouped: the slot's token or r; -1 for a padding row).
MOE_DEVICE long long wg_arow(const GemmParams& p, const WgTile& w, int r, int& slot) {
    slot = -1;
    if (r >= w.rows_end) return -1;
    if (!p.grouped) { slot = r; return r; }
    slot = p.sorted_slots[r];
    if (slot < 0) return -1;
    return p.a_gather ? slot / p.top_k : r;
}

// ---- barriers and async primitives
MOE_DEVICE void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
MOE_DEVICE void mbar_arrive(uint64_t* bar) {
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.release.cta.shared::cta.b64 st, [%0];\n}\n" ::"r"(
                     smem_u32(bar))
                 : "memory");
}
MOE_DEVICE void mbar_wait(uint64_t* bar, uint32_t parity) {
    const uint32_t a = smem_u32(bar);
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity)
            : "memory");
    }
}
MOE_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

MOE_DEVICE void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
MOE_DEVICE void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
MOE_DEVICE void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma.
MOE_DEVICE void wg_fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major tile with 128-byte swizzle: rows of 64 16-bit elements (128 B)
// stored contiguously, 8-row groups 1024 B apart (SBO), the 16-byte chunk c of row r at chunk
// c ^ (r % 8). The tile must start 1024-byte aligned. LBO is unused for this layout (1).
MOE_DEVICE uint64_t wg_desc(uint32_t smem_addr) {
    uint64_t d = 0;
    d |= (uint64_t)((smem_addr & 0x3FFFF) >> 4);  // start address, bits 0-13
    d |= (uint64_t)1 << 16;                        // leading byte offset (unused), bits 16-29
    d |= (uint64_t)(1024 >> 4) << 32;              // stride byte offset, bits 32-45
    d |= (uint64_t)1 << 62;                        // swizzle mode 1 = 128B, bits 62-63
    return d;
}

template <typename T> MOE_DEVICE void wg_mma_m64n256k16(float* d, uint64_t da, uint64_t db);
// one wgmma.m64n256k16 (A and B from shared memory), per 16-bit input type
#define MOE_WG_MMA_M64N256K16(T, PTX_TYPES)                                                       \
    template <> MOE_DEVICE void wg_mma_m64n256k16<T>(float* d, uint64_t da, uint64_t db) {      \
        asm volatile( \
            "{\n" \
            ".reg .pred p;\n" \
            "setp.ne.b32 p, %130, 0;\n" \
            "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX_TYPES " " \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
            "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
            "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
            "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
            "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
            "%128, %129, p, 1, 1, 0, 0;\n" \
            "}\n" \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
              "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
              "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
              "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
              "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
              "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
              "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
              "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
              "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
            : "l"(da), "l"(db), "r"(1) \
            : "memory"); \
    }
MOE_WG_MMA_M64N256K16(__nv_bfloat16, "bf16.bf16")
MOE_WG_MMA_M64N256K16(__half, "f16.f16")

// ---- producer: warpgroup 0
template <typename T, bool GATED>
MOE_DEVICE void wg_producer(const GemmParams& p, unsigned char* smem, uint64_t* full,
                            uint64_t* empty) {
    const int pt = threadIdx.x;        // 0..127
    const int c = pt & 7;              // 16-byte chunk of a 128-byte row
    const int rb = pt >> 3;            // first row (0..15), then +16
    const uint32_t sw = (uint32_t)((c ^ (rb & 7)) << 4);  // swizzled chunk offset (rows rb + 16 i)
    const uint32_t sbase = smem_u32(smem);
    const int K = p.K;
    const int ktiles = K / WG_BK;
    const T* A = (const T*)p.a;
    int mt, nt;
    wg_counts(p, mt, nt);
    const int total = mt * nt;
    uint32_t it = 0;  // stages issued
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const WgTile w = wg_tile(p, t, mt, nt);
        // A rows of this thread (rows rb + 16 i of the tile), -1 = padding (zero-filled)
        int a_row[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int slot;
            a_row[i] = (int)wg_arow(p, w, w.m0 + rb + 16 * i, slot);
        }
        // staged B row j = rb + 16 i: gated: i < 8 gate column n0 + j, else up column
        // n0 + j - 128; ungated: up column n0 + j. Row j + 16 lies 16 K elements further.
        const size_t wstride = (size_t)p.N * K;
        const T* wu = (const T*)p.w_up + w.expert * wstride;
        const T* b_up = wu + (size_t)(w.n0 + rb) * K + c * 8;
        const T* b_gate = GATED ? (const T*)p.w_gate + w.expert * wstride + (size_t)(w.n0 + rb) * K + c * 8 : b_up;
        uint32_t bmask = 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int j = rb + 16 * i;
            const int col = GATED ? w.n0 + (j & 127) : w.n0 + j;
            if (col < p.N) bmask |= 1u << i;
        }
        const size_t step16 = (size_t)16 * K;  // elements between rows j and j + 16
        for (int kt = 0; kt < ktiles; ++kt, ++it) {
            const uint32_t s = it % WG_STAGES;
            mbar_wait(&empty[s], ((it / WG_STAGES) & 1) ^ 1);
            const uint32_t sa = sbase + s * WG_STAGE_BYTES;
            const uint32_t sb = sa + WG_A_BYTES;
            const int k0 = kt * WG_BK;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const bool v = a_row[i] >= 0;
                const uint32_t dst = sa + (uint32_t)(rb + 16 * i) * 128 + sw;
                const void* src = v ? (const void*)(A + (size_t)a_row[i] * K + k0 + c * 8) : (const void*)A;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                             "r"(v ? 16 : 0)
                             : "memory");
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const bool v = (bmask >> i) & 1;
                const T* base = (GATED && i < 8) ? b_gate + i * step16 : b_up + (GATED ? i - 8 : i) * step16;
                const uint32_t dst = sb + (uint32_t)(rb + 16 * i) * 128 + sw;
                const void* src = v ? (const void*)(base + k0) : (const void*)wu;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                             "r"(v ? 16 : 0)
                             : "memory");
            }
            cp_async_commit();
            if (it >= WG_LAG) {
                // the copies of stage it - WG_LAG have landed: publish them to the async proxy
                cp_async_wait<WG_LAG>();
                fence_proxy_async();
                mbar_arrive(&full[(it - WG_LAG) % WG_STAGES]);
            }
        }
    }
    cp_async_wait<0>();
    fence_proxy_async();
    for (uint32_t j = it >= WG_LAG ? it - WG_LAG : 0; j < it; ++j) {
        mbar_arrive(&full[j % WG_STAGES]);
    }
}

// ---- consumers: warpgroups 1 and 2
template <typename T, bool GATED>
MOE_DEVICE void wg_consumer(const GemmParams& p, unsigned char* smem, uint64_t* full,
                            uint64_t* empty) {
    const int wg = (threadIdx.x >> 7) - 1;  // 0 or 1: rows 64 wg .. 64 wg + 63 of the tile
    const int ct = threadIdx.x & 127;
    const int warp = ct >> 5, lane = ct & 31;
    const uint32_t sbase = smem_u32(smem);
    const int ktiles = p.K / WG_BK;
    int mt, nt;
    wg_counts(p, mt, nt);
    const int total = mt * nt;
    uint32_t it = 0;
    float acc[128];
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const WgTile w = wg_tile(p, t, mt, nt);
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
        for (int kt = 0; kt < ktiles; ++kt, ++it) {
            const uint32_t s = it % WG_STAGES;
            mbar_wait(&full[s], (it / WG_STAGES) & 1);
            const uint32_t sa = sbase + s * WG_STAGE_BYTES + wg * (64 * 128);
            const uint32_t sb = sbase + s * WG_STAGE_BYTES + WG_A_BYTES;
            const uint64_t da = wg_desc(sa), db = wg_desc(sb);
            wg_fence_acc(acc);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < WG_BK / 16; ++kk) {
                // a 16-wide K slice starts 32 bytes further inside the swizzled 128-byte rows
                wg_mma_m64n256k16<T>(acc, da + 2 * kk, db + 2 * kk);
            }
            wg_commit();
            wg_wait0();
            wg_fence_acc(acc);
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[s]);
        }
        // epilogue: accumulator i = 4 j + 2 h + c holds row 16 warp + lane / 4 + 8 h,
        // column 8 j + 2 (lane % 4) + c of this warpgroup's 64 x 256 block.
        const size_t bstride = (size_t)w.expert * p.N;
        const T* bias_up = p.bias_up ? (const T*)p.bias_up + bstride : nullptr;
        const T* bias_gate = p.bias_gate ? (const T*)p.bias_gate + bstride : nullptr;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = w.m0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
            int slot;
            const long long ar = wg_arow(p, w, r, slot);
            if (ar < 0) continue;  // padding row: never written
            const float rw = p.row_weights ? p.row_weights[slot] : 1.0f;
            if (GATED) {
#pragma unroll
                for (int j = 0; j < 16; ++j)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int col = w.n0 + 8 * j + 2 * (lane & 3) + c;
                        if (col < p.N) {
                            const float g = acc[4 * j + 2 * h + c];
                            const float u = acc[4 * (j + 16) + 2 * h + c];
                            epi_write<T>(p, r, col, epi_value<T, true>(p, rw, col, g, u, bias_up, bias_gate));
                        }
                    }
            } else {
#pragma unroll
                for (int j = 0; j < 32; ++j)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int col = w.n0 + 8 * j + 2 * (lane & 3) + c;
                        if (col < p.N) {
                            const float u = acc[4 * j + 2 * h + c];
                            epi_write<T>(p, r, col, epi_value<T, true>(p, rw, col, 0.0f, u, bias_up, bias_gate));
                        }
                    }
            }
        }
    }
}

template <typename T, bool GATED>
MOE_DEVICE void gemm_wg(const GemmParams& p) {
    extern __shared__ __align__(1024) unsigned char wg_dsmem[];
    __shared__ __align__(8) uint64_t full[WG_STAGES], empty[WG_STAGES];
    // 1024-byte alignment of the ring (the 128B swizzle pattern repeats every 1024 bytes)
    unsigned char* smem = wg_dsmem + ((1024 - (smem_u32(wg_dsmem) & 1023)) & 1023);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < WG_STAGES; ++s) {
            mbar_init(&full[s], 128);
            mbar_init(&empty[s], 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // Register budget: the block is launched with 168 registers x 384 threads = 64512; the
    // consumers' increase only succeeds (else it spins) while 72 x 128 + 216 x 256 <= 64512.
    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
        wg_producer<T, GATED>(p, smem, full, empty);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
        wg_consumer<T, GATED>(p, smem, full, empty);
    }
}

#endif  // MOE_WG_ENABLED

#ifdef MOE_WG_ENABLED
#define MOE_WG_BODY(T, G) gemm_wg<T, G>(p)
#else
#define MOE_WG_BODY(T, G) (void)p  /* sm_80 / compute_80: never launched (host checks CC 9.0) */
#endif

// Entry points: ungated (256 output columns per tile) and gated (128 gate + 128 up columns;
// p.gated must be 1) per 16-bit type.
#define MOE_GEMM_WG(SUF, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                   \
        moe_gemm_wg_##SUF(const __grid_constant__ GemmParams p) {                                 \
        MOE_WG_BODY(T, false);                                                                    \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                   \
        moe_gemm_wg_gated_##SUF(const __grid_constant__ GemmParams p) {                           \
        MOE_WG_BODY(T, true);                                                                     \
    }
MOE_GEMM_WG(bf16, __nv_bfloat16)
MOE_GEMM_WG(f16, __half)

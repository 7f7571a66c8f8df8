// permute.cu: device-side counts, padded offsets and the stable scatter of slots into
// expert-sorted rows (no host synchronization).
//
// Grid:  one block of 32 * W threads, W = min(32, (12288 - 2 E - 2) / E) warps so that the
//        per-warp counters (W x E ints) and the offsets fit in 48 KB of shared memory.
// Tile:  warp w owns the contiguous slot range [w n / W, (w + 1) n / W) of the n = T K slots
//        and walks it 32 slots at a time.
// Warp:  pass A counts its slots per local expert (__match_any_sync groups the lanes of one
//        expert; the lowest lane adds the group's size, so no atomics). After a barrier, the
//        block turns the counters into per-warp bases and computes every expert's padded
//        offset (each block of rows rounded up to `row_align`). Pass B walks the same range
//        again and writes each slot to row = offset[e] + base[w][e] + rank within the group,
//        so rows within an expert are in ascending slot order (deterministic).
// Assumptions: ids outside [0, E) and experts mapped to -1 (or out of range) by the expert
//        map get no row (slot_rows = -1). Padding rows get sorted_slots = -1.
#include "common.cuh"

struct PermuteParams {
    const int* topk_ids;    // [n]
    const int* expert_map;  // [E] global -> local, nullable
    int* expert_offsets;    // [E_local + 1]
    int* expert_cursor;     // [E_local]
    int* sorted_slots;      // [rows capacity]
    int* slot_rows;         // [n]
    int n;                  // T * K
    int experts;            // E (global)
    int local_experts;      // E_local
    int row_align;
};

#define PERMUTE_SMEM_INTS 12288

MOE_DEVICE int local_expert(const PermuteParams& p, int s) {
    int id = p.topk_ids[s];
    if (id < 0 || id >= p.experts) return -1;
    int le = p.expert_map ? p.expert_map[id] : id;
    return (le >= 0 && le < p.local_experts) ? le : -1;
}

extern "C" __global__ void __launch_bounds__(1024) moe_permute(const PermuteParams p) {
    __shared__ int smem[PERMUTE_SMEM_INTS];
    const int EL = p.local_experts;
    const int W = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int* cnt = smem;               // [W][EL]
    int* off = smem + W * EL;      // [EL + 1]
    for (int i = threadIdx.x; i < W * EL; i += blockDim.x) cnt[i] = 0;
    __syncthreads();
    const long long lo = (long long)p.n * warp / W, hi = (long long)p.n * (warp + 1) / W;
    const unsigned lt_mask = (1u << lane) - 1u;
    // pass A: count
    for (long long base = lo; base < hi; base += 32) {
        long long s = base + lane;
        int le = s < hi ? local_expert(p, (int)s) : -1;
        unsigned peers = __match_any_sync(0xffffffffu, le);
        if (le >= 0 && (peers & lt_mask) == 0) cnt[warp * EL + le] += __popc(peers);
        // the next iteration's leader of the same expert may be another lane: order the
        // shared-memory update before its read (match_any_sync is no memory barrier)
        __syncwarp();
    }
    __syncthreads();
    // per-warp bases within each expert; padded sizes into off[e]
    for (int e = threadIdx.x; e < EL; e += blockDim.x) {
        int run = 0;
        for (int w = 0; w < W; ++w) {
            int c = cnt[w * EL + e];
            cnt[w * EL + e] = run;
            run += c;
        }
        off[e] = run;  // real count for now
    }
    __syncthreads();
    // exclusive scan of the padded sizes (warp 0; lanes own contiguous chunks)
    if (warp == 0) {
        const int A = p.row_align;
        const int chunk = (EL + 31) / 32;
        const int b = lane * chunk, e_end = min(EL, b + chunk);
        int local = 0;
        for (int e = b; e < e_end; ++e) local += (off[e] + A - 1) / A * A;
        int incl = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        int run = incl - local;
        for (int e = b; e < e_end; ++e) {
            int c = off[e];
            int padded = (c + A - 1) / A * A;
            off[e] = run;
            p.expert_offsets[e] = run;
            p.expert_cursor[e] = run + c;  // end of the real rows
            for (int r = run + c; r < run + padded; ++r) p.sorted_slots[r] = -1;
            run += padded;
        }
        if (lane == 31) { off[EL] = run; p.expert_offsets[EL] = run; }
    }
    __syncthreads();
    // pass B: scatter
    for (long long base = lo; base < hi; base += 32) {
        long long s = base + lane;
        bool in = s < hi;
        int le = in ? local_expert(p, (int)s) : -1;
        unsigned peers = __match_any_sync(0xffffffffu, le);
        if (in) {
            if (le >= 0) {
                int row = off[le] + cnt[warp * EL + le] + __popc(peers & lt_mask);
                p.sorted_slots[row] = (int)s;
                p.slot_rows[s] = row;
            } else {
                p.slot_rows[s] = -1;
            }
        }
        __syncwarp();
        if (le >= 0 && (peers & lt_mask) == 0) cnt[warp * EL + le] += __popc(peers);
        __syncwarp();
    }
}

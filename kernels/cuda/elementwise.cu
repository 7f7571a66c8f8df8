// elementwise.cu: the combine (fixed-order weighted sum of expert rows back into tokens), the
// shared expert's sigmoid gate, and the element-wise add of two partial sums.
//
// combine:      grid (T), 256 threads; thread j sums columns j, j + 256, ... of token t over
//               its K slots in slot order, in f32, and rounds once (deterministic: no atomics).
//               Slots without a row (slot_rows = -1: empty or not local) are skipped.
// sigmoid_gate: grid ceil(T / 4), 128 threads; one warp per token: lanes stride over H, f32
//               partial dot products, butterfly sum, sigmoid.
// add_assign:   grid-stride loop over n elements; f32 sum, rounded once.
// Assumptions: element types float / __half / __nv_bfloat16 (suffix f32 / f16 / bf16).
#include "common.cuh"

template <typename T>
MOE_DEVICE void combine(const T* expert_out, const int* slot_rows, T* out, int width, int top_k,
                        float scale) {
    const int t = blockIdx.x;
    const int* rows = slot_rows + (size_t)t * top_k;
    for (int col = threadIdx.x; col < width; col += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < top_k; ++k) {
            const int r = rows[k];
            if (r >= 0) acc += to_f32(expert_out[(size_t)r * width + col]);
        }
        out[(size_t)t * width + col] = from_f32<T>(acc * scale);
    }
}

template <typename T>
MOE_DEVICE void sigmoid_gate(const T* x, const T* w, float* gate, int tokens, int hidden) {
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (t >= tokens) return;
    float acc = 0.0f;
    for (int h = lane; h < hidden; h += 32) acc += to_f32(x[(size_t)t * hidden + h]) * to_f32(w[h]);
    acc = warp_sum(acc);
    if (lane == 0) gate[t] = sigmoidf_(acc);
}

template <typename T>
MOE_DEVICE void add_assign(T* dst, const T* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] = from_f32<T>(to_f32(dst[i]) + to_f32(src[i]));
}

#define MOE_ELEMENTWISE(SUF, T)                                                                  \
    extern "C" __global__ void moe_combine_##SUF(const T* expert_out, const int* slot_rows,      \
                                                 T* out, int width, int top_k, float scale) {    \
        combine<T>(expert_out, slot_rows, out, width, top_k, scale);                             \
    }                                                                                            \
    extern "C" __global__ void moe_sigmoid_gate_##SUF(const T* x, const T* w, float* gate,       \
                                                      int tokens, int hidden) {                  \
        sigmoid_gate<T>(x, w, gate, tokens, hidden);                                             \
    }                                                                                            \
    extern "C" __global__ void moe_add_assign_##SUF(T* dst, const T* src, long long n) {         \
        add_assign<T>(dst, src, n);                                                              \
    }

MOE_ELEMENTWISE(f32, float)
MOE_ELEMENTWISE(f16, __half)
MOE_ELEMENTWISE(bf16, __nv_bfloat16)

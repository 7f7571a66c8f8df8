// common.cuh: element types and scalar helpers shared by every kernel of moe-kernels.
//
// Storage types are float, __half and __nv_bfloat16; all arithmetic and accumulation is f32.
// The scalar rules (activations, sigmoid, NaN handling) mirror moe-core/src/math.rs exactly:
// `fmaxf`/`fminf` ignore a NaN operand like Rust's `f32::max`/`min`.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define MOE_DEVICE __device__ __forceinline__

// Activation codes (moe_core::Activation).
#define ACT_SILU 0
#define ACT_GELU 1
#define ACT_GELU_TANH 2
#define ACT_RELU2 3
#define ACT_SWIGLU_OAI 4

template <typename T> MOE_DEVICE float to_f32(T v);
template <> MOE_DEVICE float to_f32<float>(float v) { return v; }
template <> MOE_DEVICE float to_f32<__half>(__half v) { return __half2float(v); }
template <> MOE_DEVICE float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> MOE_DEVICE T from_f32(float v);
template <> MOE_DEVICE float from_f32<float>(float v) { return v; }
template <> MOE_DEVICE __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> MOE_DEVICE __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

MOE_DEVICE float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// sigmoid(x) without a call: IEEE division has an out-of-line slow path (a CALL in SASS),
// which the wgmma GEMM's epilogue cannot afford while 128 accumulators are live. Approximate
// reciprocal plus one Newton step (within about 1 ulp of 1 / d; d = inf gives 0 like 1 / inf).
MOE_DEVICE float sigmoid_nocall(float x) {
    const float d = 1.0f + expf(-x);
    float r = __fdividef(1.0f, d);
    if (d < 1e30f) r = fmaf(r, fmaf(-d, r, 1.0f), r);
    return r;
}

template <bool NOCALL> MOE_DEVICE float sigmoid_t(float x) {
    return NOCALL ? sigmoid_nocall(x) : sigmoidf_(x);
}

// swiglu_oai(gate, up) (math::gated for SwigluOai).
template <bool NOCALL>
MOE_DEVICE float swiglu_oai_t(float gate, float up, float alpha, float limit) {
    float g = fminf(gate, limit);
    float u = fminf(fmaxf(up, -limit), limit);
    return (u + 1.0f) * g * sigmoid_t<NOCALL>(alpha * g);
}

// The activation of an ungated MLP (math::activate). (No mutual recursion with gated_act_t,
// so both always inline.)
template <bool NOCALL> MOE_DEVICE float activate_t(int act, float x, float alpha, float limit) {
    switch (act) {
    case ACT_SILU: return x * sigmoid_t<NOCALL>(x);
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case ACT_GELU_TANH: {
        const float c = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    case ACT_RELU2: { float r = fmaxf(x, 0.0f); return r * r; }
    default: return swiglu_oai_t<NOCALL>(x, x, alpha, limit);
    }
}

// h = f(gate, up) of a gated MLP (math::gated). NOCALL: sigmoid_nocall (see above).
template <bool NOCALL>
MOE_DEVICE float gated_act_t(int act, float gate, float up, float alpha, float limit) {
    if (act == ACT_SWIGLU_OAI) return swiglu_oai_t<NOCALL>(gate, up, alpha, limit);
    return activate_t<NOCALL>(act, gate, alpha, limit) * up;
}

MOE_DEVICE float gated_act(int act, float gate, float up, float alpha, float limit) {
    return gated_act_t<false>(act, gate, up, alpha, limit);
}
MOE_DEVICE float activate(int act, float x, float alpha, float limit) {
    return activate_t<false>(act, x, alpha, limit);
}

// (value, index) argmax rule of math::argmax_no_nan: NaN never wins, larger wins, lower index
// wins a tie. `idx < 0` means "nothing".
MOE_DEVICE bool better(float v, int i, float bv, int bi) {
    if (isnan(v) || i < 0) return false;
    if (bi < 0 || isnan(bv)) return true;
    if (v > bv) return true;
    if (bv > v) return false;
    return i < bi;
}

MOE_DEVICE void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

MOE_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

MOE_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

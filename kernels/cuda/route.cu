// route.cu: the fused router (scoring, selection bias, group-limited top-k, weights, top-k
// reduce, routed scale) for every recipe of moe_core::RouterConfig.
//
// Grid:  ceil(T / 4) blocks of 128 threads; one warp routes one token.
// Tile:  each warp owns 5 x 512 words of shared memory (scores, selection values, group
//        scores, chosen ids, weights), so E <= 512 (MOE_ROUTE_MAX_E); the host checks it.
// Warp:  lanes stride over the experts for scoring and masking; every argmax is a warp
//        butterfly over (value, index) pairs with the rule of math::argmax_no_nan (NaN never
//        selected, lower index wins a tie), so all lanes agree on each choice.
// Assumptions: logits are f32 [T, E]; the selection bias (optional) is f32 [E]; the
//        top-k reduce is one of none / sum+eps / clamp_min / pnorm (a user-supplied reduce is
//        rejected on the host). Slots beyond the valid choices get id -1 and weight 0.
#include "common.cuh"

#define MOE_ROUTE_MAX_E 512
#define ROUTE_WARPS 4

struct RouteParams {
    const float* logits;
    const float* sel_bias;  // nullable
    int* topk_ids;
    float* topk_weights;
    int tokens, experts, top_k;
    int scoring;      // 0 softmax, 1 sigmoid, 2 none
    int n_group;      // 0: no groups
    int topk_group;
    int group_score;  // 0 top2_sum, 1 max
    int weight_src;   // 0 scores, 1 softmax_topk_logits, 2 sigmoid_topk_logits
    int reduce_kind;  // 0 none, 1 sum (+eps), 2 clamp_min, 3 pnorm
    float reduce_param;
    float scale;      // routed scale placed on the weights (1 otherwise)
};

extern "C" __global__ void __launch_bounds__(32 * ROUTE_WARPS)
moe_route(const RouteParams p) {
    __shared__ float s_scores[ROUTE_WARPS][MOE_ROUTE_MAX_E];
    __shared__ float s_sel[ROUTE_WARPS][MOE_ROUTE_MAX_E];
    __shared__ float s_group[ROUTE_WARPS][MOE_ROUTE_MAX_E];
    __shared__ int s_ids[ROUTE_WARPS][MOE_ROUTE_MAX_E];
    __shared__ float s_w[ROUTE_WARPS][MOE_ROUTE_MAX_E];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= p.tokens) return;  // whole warp leaves together
    const int E = p.experts, K = p.top_k;
    const float* lg = p.logits + (size_t)t * E;
    float* scores = s_scores[warp];
    float* sel = s_sel[warp];
    float* gs = s_group[warp];
    int* ids = s_ids[warp];
    float* w = s_w[warp];

    // 1. scoring (math::score)
    if (p.scoring == 0) {
        float m = -INFINITY;
        bool any_nan = false;
        for (int e = lane; e < E; e += 32) {
            float l = lg[e];
            m = fmaxf(m, l);
            any_nan |= isnan(l);
        }
        m = warp_max(m);
        any_nan = __any_sync(0xffffffffu, any_nan);
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            float s = expf(lg[e] - m);
            scores[e] = s;
            sum += s;
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) scores[e] = any_nan ? NAN : scores[e] / sum;
    } else if (p.scoring == 1) {
        for (int e = lane; e < E; e += 32) scores[e] = sigmoidf_(lg[e]);
    } else {
        for (int e = lane; e < E; e += 32) scores[e] = lg[e];
    }
    // 2. selection values
    for (int e = lane; e < E; e += 32) sel[e] = scores[e] + (p.sel_bias ? p.sel_bias[e] : 0.0f);
    __syncwarp();

    // 3. group-limited selection
    if (p.n_group > 0) {
        const int G = p.n_group, per = E / G;
        for (int g = lane; g < G; g += 32) {
            const float* v = sel + g * per;
            float out;
            if (p.group_score == 1) {
                out = NAN;
                for (int i = 0; i < per; ++i)
                    if (!isnan(v[i])) out = isnan(out) ? v[i] : fmaxf(out, v[i]);
            } else {
                bool ha = false, hb = false;
                float a = 0.0f, b = 0.0f;
                for (int i = 0; i < per; ++i) {
                    float x = v[i];
                    if (isnan(x)) continue;
                    if (!ha || x > a) { b = a; hb = ha; a = x; ha = true; }
                    else if (!hb || x > b) { b = x; hb = true; }
                }
                out = (ha && hb) ? a + b : (ha ? a : NAN);
            }
            gs[g] = out;
        }
        __syncwarp();
        for (int r = 0; r < p.topk_group; ++r) {
            float bv = NAN;
            int bi = -1;
            for (int g = lane; g < G; g += 32)
                if (better(gs[g], g, bv, bi)) { bv = gs[g]; bi = g; }
            warp_argmax(bv, bi);
            if (bi < 0) break;
            __syncwarp();
            if (lane == 0) gs[bi] = NAN;
            __syncwarp();
        }
        for (int e = lane; e < E; e += 32)
            if (!isnan(gs[e / per])) sel[e] = NAN;
        __syncwarp();
    }

    // 4. top-k (math::select_topk)
    int valid = 0;
    for (int j = 0; j < K; ++j) {
        float bv = NAN;
        int bi = -1;
        for (int e = lane; e < E; e += 32)
            if (better(sel[e], e, bv, bi)) { bv = sel[e]; bi = e; }
        warp_argmax(bv, bi);
        __syncwarp();
        if (lane == 0) {
            ids[j] = bi;
            if (bi >= 0) sel[bi] = NAN;
        }
        __syncwarp();
        if (bi >= 0) valid = j + 1;
    }

    // 5. weights (math::weights_for_ids)
    if (p.weight_src == 1) {
        float m = -INFINITY;
        for (int j = lane; j < valid; j += 32) m = fmaxf(m, lg[ids[j]]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < valid; j += 32) {
            float x = expf(lg[ids[j]] - m);
            w[j] = x;
            sum += x;
        }
        sum = warp_sum(sum);
        for (int j = lane; j < valid; j += 32) w[j] = w[j] / sum;
    } else {
        for (int j = lane; j < valid; j += 32)
            w[j] = p.weight_src == 0 ? scores[ids[j]] : sigmoidf_(lg[ids[j]]);
    }
    __syncwarp();
    // top-k reduce (math::reduce_weights)
    if (p.reduce_kind != 0) {
        float acc = 0.0f;
        for (int j = lane; j < valid; j += 32)
            acc += p.reduce_kind == 3 ? powf(fabsf(w[j]), p.reduce_param) : w[j];
        acc = warp_sum(acc);
        float div;
        if (p.reduce_kind == 1) div = acc + p.reduce_param;
        else if (p.reduce_kind == 2) div = fmaxf(acc, p.reduce_param);
        else div = powf(acc, 1.0f / p.reduce_param);
        for (int j = lane; j < valid; j += 32) w[j] = w[j] / div;
        __syncwarp();
    }
    int* out_ids = p.topk_ids + (size_t)t * K;
    float* out_w = p.topk_weights + (size_t)t * K;
    for (int j = lane; j < K; j += 32) {
        bool ok = j < valid;
        out_ids[j] = ok ? ids[j] : -1;
        out_w[j] = ok ? (p.scale != 1.0f ? w[j] * p.scale : w[j]) : 0.0f;
    }
}

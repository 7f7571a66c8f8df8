// Grouped GEMM 1 with the activation fused (also the dense MLP's first half, `dense` = 1):
//   hidden[row, n] = act(s * (gate_e[n] . x[t]) + bg[e, n], s * (up_e[n] . x[t]) + bu[e, n])
// for each row of expert e = workgroup_id.z holding slot t * K + k; s is the routing weight
// of the slot when it is applied on the input, else 1. Padding rows (slot -1) are skipped.
// Tiled through workgroup memory: a 16-row x 64-column output tile (each invocation holds a
// 1 x 4 strip in registers), K tile 16; the workgroup walks its expert's row tiles with a grid
// stride. Accumulation is f32 in ascending k.
// Activations: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu2, 4 swiglu_oai (alpha, limit).

struct Params {
    d: u32,
    n: u32,
    topk: u32,
    tokens: u32,
    ox: u32,
    og: u32,
    ou: u32,
    obg: u32,
    obu: u32,
    ooff: u32,
    osort: u32,
    otw: u32,
    oh: u32,
    gated: u32,
    has_b: u32,
    on_input: u32,
    act: u32,
    dense: u32,
    alpha: f32,
    limit: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 x E ro
//@bind 2 wgate E ro
//@bind 3 wup E ro
//@bind 4 bgate E ro
//@bind 5 bup E ro
@group(0) @binding(6) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(7) var<storage, read_write> sorted_slots: array<i32>;
@group(0) @binding(8) var<storage, read_write> tw: array<f32>;
//@bind 9 hidden E rw

const TS: u32 = 16u;
const TN: u32 = 64u;
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tg: array<array<f32, 16>, 64>;
var<workgroup> tu: array<array<f32, 16>, 64>;
var<workgroup> wstart: u32;
var<workgroup> wend: u32;

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let e = wg.z;
    if (lid.x == 0u && lid.y == 0u) {
        if (p.dense != 0u) {
            wstart = 0u;
            wend = p.tokens;
        } else {
            wstart = u32(offsets[p.ooff + e]);
            wend = u32(offsets[p.ooff + e + 1u]);
        }
    }
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    let col0 = wg.x * TN;
    let wbase = e * p.n * p.d;
    let tiles = (p.d + TS - 1u) / TS;
    for (var m0 = start + wg.y * TS; m0 < end; m0 += nwg.y * TS) {
        let row = m0 + lid.y;
        var slot = -1;
        if (row < end) {
            if (p.dense != 0u) {
                slot = i32(row);
            } else {
                slot = sorted_slots[p.osort + row];
            }
        }
        var tok = 0u;
        var s = 1.0;
        if (slot >= 0) {
            tok = u32(slot) / p.topk;
            if (p.on_input != 0u) {
                s = tw[p.otw + u32(slot)];
            }
        }
        var accg = vec4<f32>(0.0);
        var accu = vec4<f32>(0.0);
        for (var kt = 0u; kt < tiles; kt++) {
            let kk = kt * TS + lid.x;
            var a = 0.0;
            if (slot >= 0 && kk < p.d) {
                a = ld_x(p.ox + tok * p.d + kk);
            }
            ta[lid.y][lid.x] = a;
            for (var j = 0u; j < 4u; j++) {
                let bc = lid.y + 16u * j;
                let bcol = col0 + bc;
                var gv = 0.0;
                var uv = 0.0;
                if (bcol < p.n && kk < p.d) {
                    let wi = wbase + bcol * p.d + kk;
                    uv = ld_wup(p.ou + wi);
                    if (p.gated != 0u) {
                        gv = ld_wgate(p.og + wi);
                    }
                }
                tg[bc][lid.x] = gv;
                tu[bc][lid.x] = uv;
            }
            workgroupBarrier();
            for (var i = 0u; i < TS; i++) {
                let av = ta[lid.y][i];
                accg += av * vec4<f32>(tg[lid.x][i], tg[lid.x + 16u][i], tg[lid.x + 32u][i], tg[lid.x + 48u][i]);
                accu += av * vec4<f32>(tu[lid.x][i], tu[lid.x + 16u][i], tu[lid.x + 32u][i], tu[lid.x + 48u][i]);
            }
            workgroupBarrier();
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if (slot >= 0 && col < p.n) {
                var g = s * accg[j];
                var u = s * accu[j];
                if (p.has_b != 0u) {
                    u += ld_bup(p.obu + e * p.n + col);
                    if (p.gated != 0u) {
                        g += ld_bgate(p.obg + e * p.n + col);
                    }
                }
                st_hidden(p.oh + row * p.n + col, hidden_of(g, u));
            }
        }
    }
}

// Decode variant, for few rows per expert: a workgroup of DW invocations computes DF
// features (the gate row and the up row of each) of expert e = workgroup_id.z for every row
// of the expert, DR rows per pass over the weights. K is split across the invocations (two
// elements per invocation and step, consecutive invocations on consecutive elements); the
// partial sums are reduced in workgroup memory in a fixed tree order (deterministic).
const DW: u32 = 64u;
const DF: u32 = 2u;
const DR: u32 = 4u;
var<workgroup> red: array<array<f32, 64>, 16>;

@compute @workgroup_size(64, 1, 1)
fn decode(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let e = wg.z;
    let l = lid.x;
    if (l == 0u) {
        if (p.dense != 0u) {
            wstart = 0u;
            wend = p.tokens;
        } else {
            wstart = u32(offsets[p.ooff + e]);
            wend = u32(offsets[p.ooff + e + 1u]);
        }
    }
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    let f0 = wg.x * DF;
    let wbase = e * p.n * p.d;
    for (var m0 = start; m0 < end; m0 += DR) {
        var slots: array<i32, 4>;
        var toks: array<u32, 4>;
        var sc: array<f32, 4>;
        for (var r = 0u; r < DR; r++) {
            let row = m0 + r;
            var slot = -1;
            if (row < end) {
                if (p.dense != 0u) {
                    slot = i32(row);
                } else {
                    slot = sorted_slots[p.osort + row];
                }
            }
            var tok = 0u;
            var s = 1.0;
            if (slot >= 0) {
                tok = u32(slot) / p.topk;
                if (p.on_input != 0u) {
                    s = tw[p.otw + u32(slot)];
                }
            }
            slots[r] = slot;
            toks[r] = tok;
            sc[r] = s;
        }
        // acc[(r * DF + f) * 2 + 0] gate, + 1 up.
        var acc: array<vec2<f32>, 16>;
        for (var k = 2u * l; k < p.d; k += 2u * DW) {
            let pair = k + 1u < p.d;
            var wgv: array<vec2<f32>, 2>;
            var wuv: array<vec2<f32>, 2>;
            for (var f = 0u; f < DF; f++) {
                let n = f0 + f;
                var gv = vec2<f32>(0.0);
                var uv = vec2<f32>(0.0);
                if (n < p.n) {
                    let wi = wbase + n * p.d + k;
                    if (pair) {
                        uv = ld2_wup(p.ou + wi);
                        if (p.gated != 0u) {
                            gv = ld2_wgate(p.og + wi);
                        }
                    } else {
                        uv = vec2<f32>(ld_wup(p.ou + wi), 0.0);
                        if (p.gated != 0u) {
                            gv = vec2<f32>(ld_wgate(p.og + wi), 0.0);
                        }
                    }
                }
                wgv[f] = gv;
                wuv[f] = uv;
            }
            for (var r = 0u; r < DR; r++) {
                if (slots[r] >= 0) {
                    let xi = p.ox + toks[r] * p.d + k;
                    var a = vec2<f32>(0.0);
                    if (pair) {
                        a = ld2_x(xi);
                    } else {
                        a = vec2<f32>(ld_x(xi), 0.0);
                    }
                    for (var f = 0u; f < DF; f++) {
                        let j = (r * DF + f) * 2u;
                        acc[j] += a * wgv[f];
                        acc[j + 1u] += a * wuv[f];
                    }
                }
            }
        }
        for (var j = 0u; j < 16u; j++) {
            red[j][l] = acc[j].x + acc[j].y;
        }
        workgroupBarrier();
        for (var h = DW / 2u; h > 0u; h >>= 1u) {
            if (l < h) {
                for (var j = 0u; j < 16u; j++) {
                    red[j][l] += red[j][l + h];
                }
            }
            workgroupBarrier();
        }
        if (l < DR * DF) {
            let r = l / DF;
            let n = f0 + l % DF;
            let row = m0 + r;
            if (slots[r] >= 0 && n < p.n) {
                var g = sc[r] * red[l * 2u][0];
                var u = sc[r] * red[l * 2u + 1u][0];
                if (p.has_b != 0u) {
                    u += ld_bup(p.obu + e * p.n + n);
                    if (p.gated != 0u) {
                        g += ld_bgate(p.obg + e * p.n + n);
                    }
                }
                st_hidden(p.oh + row * p.n + n, hidden_of(g, u));
            }
        }
        workgroupBarrier();
    }
}

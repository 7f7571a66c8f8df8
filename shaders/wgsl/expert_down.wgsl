// Grouped GEMM 2 with the routing weight fused:
//   out[row, o] = w * (down_e[o] . hidden[row] + bd[e, o])
// for each row of expert e = workgroup_id.z holding slot s; w = routing weight of s (or 1).
// Padding rows are left untouched. Tiled as expert_up (16 x 64 tile, 1 x 4 per invocation,
// K tile 16, f32 accumulate in ascending i, rounded once).

struct Params {
    i: u32,
    d: u32,
    oh: u32,
    ow: u32,
    ob: u32,
    ooff: u32,
    osort: u32,
    otw: u32,
    oo: u32,
    has_w: u32,
    has_b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 hidden E ro
//@bind 2 wdown E ro
//@bind 3 bdown E ro
@group(0) @binding(4) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(5) var<storage, read_write> sorted_slots: array<i32>;
@group(0) @binding(6) var<storage, read_write> tw: array<f32>;
//@bind 7 out E rw

const TS: u32 = 16u;
const TN: u32 = 64u;
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 64>;
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
        wstart = u32(offsets[p.ooff + e]);
        wend = u32(offsets[p.ooff + e + 1u]);
    }
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    let col0 = wg.x * TN;
    let wbase = e * p.d * p.i;
    let tiles = (p.i + TS - 1u) / TS;
    for (var m0 = start + wg.y * TS; m0 < end; m0 += nwg.y * TS) {
        let row = m0 + lid.y;
        var slot = -1;
        if (row < end) {
            slot = sorted_slots[p.osort + row];
        }
        var acc = vec4<f32>(0.0);
        for (var kt = 0u; kt < tiles; kt++) {
            let kk = kt * TS + lid.x;
            var a = 0.0;
            if (slot >= 0 && kk < p.i) {
                a = ld_hidden(p.oh + row * p.i + kk);
            }
            ta[lid.y][lid.x] = a;
            for (var j = 0u; j < 4u; j++) {
                let bc = lid.y + 16u * j;
                let bcol = col0 + bc;
                var bv = 0.0;
                if (bcol < p.d && kk < p.i) {
                    bv = ld_wdown(p.ow + wbase + bcol * p.i + kk);
                }
                tb[bc][lid.x] = bv;
            }
            workgroupBarrier();
            for (var k = 0u; k < TS; k++) {
                acc += ta[lid.y][k] * vec4<f32>(tb[lid.x][k], tb[lid.x + 16u][k], tb[lid.x + 32u][k], tb[lid.x + 48u][k]);
            }
            workgroupBarrier();
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if (slot >= 0 && col < p.d) {
                var v = acc[j];
                if (p.has_b != 0u) {
                    v += ld_bdown(p.ob + e * p.d + col);
                }
                if (p.has_w != 0u) {
                    v *= tw[p.otw + u32(slot)];
                }
                st_out(p.oo + row * p.d + col, v);
            }
        }
    }
}

// Decode variant, for few rows per expert: a workgroup of DW invocations computes DC output
// columns of expert e = workgroup_id.z for every row of the expert, DR rows per pass over the
// weights. K is split across the invocations (two elements per invocation and step); the
// partial sums are reduced in workgroup memory in a fixed tree order (deterministic).
const DW: u32 = 64u;
const DC: u32 = 4u;
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
        wstart = u32(offsets[p.ooff + e]);
        wend = u32(offsets[p.ooff + e + 1u]);
    }
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    let c0 = wg.x * DC;
    let wbase = e * p.d * p.i;
    for (var m0 = start; m0 < end; m0 += DR) {
        var slots: array<i32, 4>;
        for (var r = 0u; r < DR; r++) {
            let row = m0 + r;
            var slot = -1;
            if (row < end) {
                slot = sorted_slots[p.osort + row];
            }
            slots[r] = slot;
        }
        // acc[r * DC + c].
        var acc: array<vec2<f32>, 16>;
        for (var k = 2u * l; k < p.i; k += 2u * DW) {
            let pair = k + 1u < p.i;
            var wv: array<vec2<f32>, 4>;
            for (var c = 0u; c < DC; c++) {
                let o = c0 + c;
                var v = vec2<f32>(0.0);
                if (o < p.d) {
                    let wi = p.ow + wbase + o * p.i + k;
                    if (pair) {
                        v = ld2_wdown(wi);
                    } else {
                        v = vec2<f32>(ld_wdown(wi), 0.0);
                    }
                }
                wv[c] = v;
            }
            for (var r = 0u; r < DR; r++) {
                if (slots[r] >= 0) {
                    let hi = p.oh + (m0 + r) * p.i + k;
                    var a = vec2<f32>(0.0);
                    if (pair) {
                        a = ld2_hidden(hi);
                    } else {
                        a = vec2<f32>(ld_hidden(hi), 0.0);
                    }
                    for (var c = 0u; c < DC; c++) {
                        acc[r * DC + c] += a * wv[c];
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
        if (l < DR * DC) {
            let r = l / DC;
            let o = c0 + l % DC;
            let row = m0 + r;
            if (slots[r] >= 0 && o < p.d) {
                var v = red[l][0];
                if (p.has_b != 0u) {
                    v += ld_bdown(p.ob + e * p.d + o);
                }
                if (p.has_w != 0u) {
                    v *= tw[p.otw + u32(slots[r])];
                }
                st_out(p.oo + row * p.d + o, v);
            }
        }
        workgroupBarrier();
    }
}

// Dense linear, tiled through workgroup memory (16 x 64 output tile, 1 x 4 per invocation,
// K tile 16):
//   y[t, o] = epi(scale * rs[t] * (sum_i x[t, i] w[o, i] + b[o]))  (+ y[t, o] when accumulating)
// Accumulated in f32 in ascending i; the result is rounded once to the output type `O`.
// `epi` is the identity (0) or a sigmoid (1, the shared expert's gate).
// Every binding is read_write: views of one buffer may be bound together in one dispatch.

struct Params {
    t: u32,
    k: u32,
    n: u32,
    ox: u32,
    ow: u32,
    ob: u32,
    ors: u32,
    oy: u32,
    has_b: u32,
    has_rs: u32,
    acc: u32,
    epi: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 x E ro
//@bind 2 w E ro
//@bind 3 b E ro
@group(0) @binding(4) var<storage, read_write> rs: array<f32>;
//@bind 5 y O rw

const TS: u32 = 16u;
const TN: u32 = 64u;
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 64>;

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let col0 = wg.x * TN;
    let tiles = (p.k + TS - 1u) / TS;
    // Row tiles with a grid stride (more than 65535 row tiles fit in one dispatch).
    for (var m0 = wg.y * TS; m0 < p.t; m0 += nwg.y * TS) {
        let row = m0 + lid.y;
        var acc = vec4<f32>(0.0);
        for (var kt = 0u; kt < tiles; kt++) {
            let kk = kt * TS + lid.x;
            var a = 0.0;
            if (row < p.t && kk < p.k) {
                a = ld_x(p.ox + row * p.k + kk);
            }
            ta[lid.y][lid.x] = a;
            for (var j = 0u; j < 4u; j++) {
                let bc = lid.y + 16u * j;
                let bcol = col0 + bc;
                var bv = 0.0;
                if (bcol < p.n && kk < p.k) {
                    bv = ld_w(p.ow + bcol * p.k + kk);
                }
                tb[bc][lid.x] = bv;
            }
            workgroupBarrier();
            for (var i = 0u; i < TS; i++) {
                acc += ta[lid.y][i] * vec4<f32>(tb[lid.x][i], tb[lid.x + 16u][i], tb[lid.x + 32u][i], tb[lid.x + 48u][i]);
            }
            workgroupBarrier();
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x + 16u * j;
            if (row < p.t && col < p.n) {
                var v = acc[j];
                if (p.has_b != 0u) {
                    v += ld_b(p.ob + col);
                }
                if (p.has_rs != 0u) {
                    v *= rs[p.ors + row];
                }
                v *= p.scale;
                if (p.epi == 1u) {
                    v = 1.0 / (1.0 + exp(-v));
                }
                let at = p.oy + row * p.n + col;
                if (p.acc != 0u) {
                    v += ld_y(at);
                }
                st_y(at, v);
            }
        }
    }
}

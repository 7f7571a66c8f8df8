// Few-row GEMM ("gemv"): for each row of a block of rows,
//   y[row, n] = epilogue(sum_k W[e, n, k] * x[src(row), k])
// with the weight rows held in registers and applied to every row of the block, so that each
// weight byte is read from memory once per dispatch (when K fits one segment; see below).
// Three modes share the kernel:
//   0 linear:      rows = tokens, src(row) = row; epilogue: + b[n], * rs[row], * scale,
//                  sigmoid (epi = 1), + y (acc = 1). Output type O.
//   1 expert up:   rows of expert e = workgroup_id.z (or all tokens when dense); src(row) = the
//                  token of the row's slot; gated (wb = gate) with the activation fused and the
//                  routing weight applied on the input (has_tw). Padding rows are skipped.
//   2 expert down: rows of expert e; src(row) = row (the hidden row); epilogue: + b[e, n],
//                  * routing weight of the slot (has_tw). Padding rows are left untouched.
// Layout: a workgroup of 256 invocations is 256 / LANES groups of LANES lanes; a group computes
// one output feature n. Weights and activations are read as vec4<u32> words (VE elements each:
// 8 for f16/bf16, 4 for f32; the host checks that K and every view offset are multiples of VE),
// lane l of a group reading words l, l + LANES, ... of the row: consecutive lanes read
// consecutive 16-byte words. A lane holds S words of each weight row (a K segment of
// LANES * S words); K longer than one segment loops over segments (then weights are re-read per
// block of R rows). The per-lane partial sums of a block of R rows are reduced over the group in
// workgroup memory in a fixed tree order (deterministic). Accumulation is f32.

struct Params {
    k: u32,
    n: u32,
    mode: u32,
    topk: u32,
    rows: u32,
    dense: u32,
    ox: u32,
    owa: u32,
    owb: u32,
    oba: u32,
    obb: u32,
    ooff: u32,
    osort: u32,
    otw: u32,
    ors: u32,
    oy: u32,
    gated: u32,
    has_b: u32,
    has_tw: u32,
    has_rs: u32,
    acc: u32,
    epi: u32,
    act: u32,
    nx: u32,
    scale: f32,
    alpha: f32,
    limit: f32,
    // 0: workgroup z is the expert. Otherwise the local expert count: the grid has fewer z
    // workgroups than experts (at most tokens * top_k experts have rows) and z is the rank of
    // the expert among those with rows (found by a scan of the offsets; workgroups past the
    // last such expert exit).
    compact: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 x V ro
//@bind 2 wa V ro
//@bind 3 wb V ro
//@bind 4 ba E ro
//@bind 5 bb E ro
@group(0) @binding(6) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(7) var<storage, read_write> sorted_slots: array<i32>;
@group(0) @binding(8) var<storage, read_write> tw: array<f32>;
@group(0) @binding(9) var<storage, read_write> rs: array<f32>;
//@bind 10 y O rw

// Lanes per output feature (a power of two, 32 to 256 for `main`, 16 to 256 for `stream`,
// chosen by the host from K).
override LANES: u32 = 64u;
const WG: u32 = 256u;
// Words of each weight row a lane holds (one K segment is LANES * S words).
const S: u32 = 4u;
// Rows per block.
const R: u32 = 4u;
var<workgroup> red: array<array<f32, 256>, 8>;
var<workgroup> wstart: u32;
var<workgroup> wend: u32;
var<workgroup> wexp: u32;
var<workgroup> scan: array<u32, 256>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let l = lid.x;
    let rows_of_expert = p.mode == 2u || (p.mode == 1u && p.dense == 0u);
    if (rows_of_expert && p.compact != 0u) {
        // The wg.z-th expert (in expert order) with rows: each invocation counts the experts
        // with rows in its chunk of the offsets, an inclusive scan of the counts, and the
        // invocation whose chunk holds rank wg.z writes that expert and its rows.
        let ne = p.compact;
        let per = (ne + WG - 1u) / WG;
        let lo = min(l * per, ne);
        let hi = min(lo + per, ne);
        if (l == 0u) {
            wexp = 0u;
            wstart = 0u;
            wend = 0u;
        }
        var c = 0u;
        for (var i = lo; i < hi; i++) {
            if (offsets[p.ooff + i + 1u] > offsets[p.ooff + i]) {
                c += 1u;
            }
        }
        scan[l] = c;
        workgroupBarrier();
        for (var h = 1u; h < WG; h <<= 1u) {
            var v = scan[l];
            if (l >= h) {
                v += scan[l - h];
            }
            workgroupBarrier();
            scan[l] = v;
            workgroupBarrier();
        }
        let incl = scan[l];
        var rank = incl - c;
        if (wg.z >= rank && wg.z < incl) {
            for (var i = lo; i < hi; i++) {
                let a = offsets[p.ooff + i];
                let b = offsets[p.ooff + i + 1u];
                if (b > a) {
                    if (rank == wg.z) {
                        wexp = i;
                        wstart = u32(a);
                        wend = u32(b);
                    }
                    rank += 1u;
                }
            }
        }
    } else if (l == 0u) {
        wexp = wg.z;
        if (rows_of_expert) {
            wstart = u32(offsets[p.ooff + wg.z]);
            wend = u32(offsets[p.ooff + wg.z + 1u]);
        } else {
            wstart = 0u;
            wend = p.rows;
        }
    }
    let e = workgroupUniformLoad(&wexp);
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    if (start >= end) {
        return;
    }
    let groups = WG / LANES;
    let g = l / LANES;
    let lane = l % LANES;
    let n = (wg.y * p.nx + wg.x) * groups + g;
    let live = n < p.n;
    let kv = p.k / VE;
    let seg_words = LANES * S;
    let nseg = (kv + seg_words - 1u) / seg_words;
    let wrow = p.owa / VE + (e * p.n + n) * kv;
    let grow = p.owb / VE + (e * p.n + n) * kv;
    let x0 = p.ox / VE;
    var wa_r: array<vec4<u32>, 4>;
    var wb_r: array<vec4<u32>, 4>;
    for (var m0 = start; m0 < end; m0 += R) {
        var ok: array<bool, 4>;
        var src: array<u32, 4>;
        var slots: array<i32, 4>;
        var sc: array<f32, 4>;
        for (var r = 0u; r < R; r++) {
            let row = m0 + r;
            var slot = -1;
            var s = 1.0;
            var xr = row;
            if (row < end) {
                if (rows_of_expert) {
                    slot = sorted_slots[p.osort + row];
                } else {
                    slot = i32(row);
                }
                if (p.mode == 1u && slot >= 0) {
                    if (p.dense == 0u) {
                        xr = u32(slot) / p.topk;
                    }
                    if (p.has_tw != 0u) {
                        s = tw[p.otw + u32(slot)];
                    }
                }
            }
            ok[r] = slot >= 0;
            src[r] = x0 + xr * kv;
            slots[r] = slot;
            sc[r] = s;
        }
        var acc_a: array<f32, 4>;
        var acc_b: array<f32, 4>;
        for (var seg = 0u; seg < nseg; seg++) {
            if (nseg > 1u || m0 == start) {
                for (var s = 0u; s < S; s++) {
                    let q = seg * seg_words + s * LANES + lane;
                    var va = vec4<u32>(0u);
                    var vb = vec4<u32>(0u);
                    if (live && q < kv) {
                        va = wa[wrow + q];
                        if (p.gated != 0u) {
                            vb = wb[grow + q];
                        }
                    }
                    wa_r[s] = va;
                    wb_r[s] = vb;
                }
            }
            for (var s = 0u; s < S; s++) {
                let q = seg * seg_words + s * LANES + lane;
                if (!live || q >= kv) {
                    continue;
                }
                let a0 = moe_lo(wa_r[s]);
                let b0 = moe_lo(wb_r[s]);
                var a1 = vec4<f32>(0.0);
                var b1 = vec4<f32>(0.0);
                if (VE == 8u) {
                    a1 = moe_hi(wa_r[s]);
                    b1 = moe_hi(wb_r[s]);
                }
                for (var r = 0u; r < R; r++) {
                    if (ok[r]) {
                        let xv = x[src[r] + q];
                        let y0 = moe_lo(xv);
                        var d = dot(a0, y0);
                        var dg = dot(b0, y0);
                        if (VE == 8u) {
                            let y1 = moe_hi(xv);
                            d += dot(a1, y1);
                            dg += dot(b1, y1);
                        }
                        acc_a[r] += d;
                        acc_b[r] += dg;
                    }
                }
            }
        }
        for (var r = 0u; r < R; r++) {
            red[2u * r][l] = acc_a[r];
            red[2u * r + 1u][l] = acc_b[r];
        }
        workgroupBarrier();
        for (var h = LANES / 2u; h > 0u; h >>= 1u) {
            if (lane < h) {
                for (var j = 0u; j < 2u * R; j++) {
                    red[j][l] += red[j][l + h];
                }
            }
            workgroupBarrier();
        }
        if (lane < R && live) {
            let r = lane;
            let row = m0 + r;
            if (ok[r]) {
                let va = red[2u * r][g * LANES];
                let vb = red[2u * r + 1u][g * LANES];
                if (p.mode == 0u) {
                    var v = va;
                    if (p.has_b != 0u) {
                        v += ld_ba(p.oba + n);
                    }
                    if (p.has_rs != 0u) {
                        v *= rs[p.ors + row];
                    }
                    v *= p.scale;
                    if (p.epi == 1u) {
                        v = 1.0 / (1.0 + exp(-v));
                    }
                    let at = p.oy + row * p.n + n;
                    if (p.acc != 0u) {
                        v += ld_y(at);
                    }
                    st_y(at, v);
                } else if (p.mode == 1u) {
                    var gv = sc[r] * vb;
                    var uv = sc[r] * va;
                    if (p.has_b != 0u) {
                        uv += ld_ba(p.oba + e * p.n + n);
                        if (p.gated != 0u) {
                            gv += ld_bb(p.obb + e * p.n + n);
                        }
                    }
                    st_y(p.oy + row * p.n + n, hidden_of(gv, uv));
                } else {
                    var v = va;
                    if (p.has_b != 0u) {
                        v += ld_ba(p.oba + e * p.n + n);
                    }
                    if (p.has_tw != 0u) {
                        v *= tw[p.otw + u32(slots[r])];
                    }
                    st_y(p.oy + row * p.n + n, v);
                }
            }
        }
        workgroupBarrier();
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point `stream`: the same GEMM, parameters, bindings and epilogues as `main`, organised
// to stream the weights at the device's read rate (what reached 2.9 TB/s on the H100 through
// Vulkan: many independent 16-byte loads, consecutive invocations reading consecutive words,
// little work per byte, no long phases without loads in flight).
// * A group of LANES lanes (16..256, from K: about 16 words per lane) computes one output
//   feature n for a block of RB rows (RB = 1, 4 or 8, a pipeline constant chosen by the host).
//   Lane l reads words l, l + LANES, ... of the weight row: each load instruction of a group
//   covers LANES consecutive 16-byte words (256 B for 16 lanes, 512 B for 32).
// * The K loop takes U = 4 words of each weight row per step, loaded unconditionally (indices
//   clamped to the row; a clamped word's contribution is dropped by a select), so a lane has
//   4 (8 when gated) independent 16-byte weight loads in flight per step; nothing is held
//   across steps but the RB (2 RB) f32 accumulators.
// * One fixed-order tree reduction over the group's lanes per block of RB rows (not per K
//   segment), in workgroup memory: deterministic, as `main`.
// * Rows of a block with no slot (padding) cost no loads; a block of more than RB rows makes
//   more passes over the weights (from cache when the workgroup's rows fit).
// * The expert lookup of the compacted grid (compact != 0) scans only as many scan steps as
//   the local experts need (3 for 8 experts), not 8 x 2 barriers.

override RB: u32 = 4u;
const U: u32 = 4u;
// 2 * 8 rows x 256 lanes.
var<workgroup> sred: array<f32, 4096>;

// The slot of row `row` of a block ending at `end` (-1: padding or past the end).
fn slot_of(row: u32, end: u32, rows_of_expert: bool) -> i32 {
    if (row >= end) {
        return -1;
    }
    if (rows_of_expert) {
        return sorted_slots[p.osort + row];
    }
    return i32(row);
}

// The routing weight applied on the input of expert up for `slot` (1 otherwise).
fn in_scale(slot: i32) -> f32 {
    if (p.mode == 1u && slot >= 0 && p.has_tw != 0u) {
        return tw[p.otw + u32(slot)];
    }
    return 1.0;
}

// Dot product of the VE elements of weight word w and activation word v (f32 arithmetic).
fn wdot(w: vec4<u32>, v: vec4<u32>) -> f32 {
    var d = dot(moe_lo(w), moe_lo(v));
    if (VE == 8u) {
        d += dot(moe_hi(w), moe_hi(v));
    }
    return d;
}

@compute @workgroup_size(256, 1, 1)
fn stream(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let l = lid.x;
    let rows_of_expert = p.mode == 2u || (p.mode == 1u && p.dense == 0u);
    if (rows_of_expert && p.compact != 0u) {
        // As in `main`, with the scan bounded by the invocations that hold experts.
        let ne = p.compact;
        let per = (ne + WG - 1u) / WG;
        let used = (ne + per - 1u) / per;
        let lo = min(l * per, ne);
        let hi = min(lo + per, ne);
        if (l == 0u) {
            wexp = 0u;
            wstart = 0u;
            wend = 0u;
        }
        var c = 0u;
        for (var i = lo; i < hi; i++) {
            if (offsets[p.ooff + i + 1u] > offsets[p.ooff + i]) {
                c += 1u;
            }
        }
        scan[l] = c;
        workgroupBarrier();
        for (var h = 1u; h < used; h <<= 1u) {
            var v = scan[l];
            if (l >= h) {
                v += scan[l - h];
            }
            workgroupBarrier();
            scan[l] = v;
            workgroupBarrier();
        }
        let incl = scan[l];
        var rank = incl - c;
        if (l < used && wg.z >= rank && wg.z < incl) {
            for (var i = lo; i < hi; i++) {
                let a = offsets[p.ooff + i];
                let b = offsets[p.ooff + i + 1u];
                if (b > a) {
                    if (rank == wg.z) {
                        wexp = i;
                        wstart = u32(a);
                        wend = u32(b);
                    }
                    rank += 1u;
                }
            }
        }
    } else if (l == 0u) {
        wexp = wg.z;
        if (rows_of_expert) {
            wstart = u32(offsets[p.ooff + wg.z]);
            wend = u32(offsets[p.ooff + wg.z + 1u]);
        } else {
            wstart = 0u;
            wend = p.rows;
        }
    }
    let e = workgroupUniformLoad(&wexp);
    let start = workgroupUniformLoad(&wstart);
    let end = workgroupUniformLoad(&wend);
    if (start >= end) {
        return;
    }
    let groups = WG / LANES;
    let g = l / LANES;
    let lane = l % LANES;
    let n = (wg.y * p.nx + wg.x) * groups + g;
    let live = n < p.n;
    let gated = p.gated != 0u;
    let kv = p.k / VE;
    let last = kv - 1u;
    let wrow = p.owa / VE + (e * p.n + n) * kv;
    let grow = p.owb / VE + (e * p.n + n) * kv;
    let x0 = p.ox / VE;
    let nj = select(RB, 2u * RB, gated);
    for (var m0 = start; m0 < end; m0 += RB) {
        // Indexed only by the (unrolled) row loops, so that they can live in registers; the
        // epilogue (row = lane) recomputes its row's slot instead of indexing these.
        var ok: array<bool, 8>;
        var src: array<u32, 8>;
        var acc_a: array<f32, 8>;
        var acc_b: array<f32, 8>;
        var any = false;
        for (var r = 0u; r < RB; r++) {
            let row = m0 + r;
            let slot = slot_of(row, end, rows_of_expert);
            var xr = row;
            if (p.mode == 1u && p.dense == 0u && slot >= 0) {
                xr = u32(slot) / p.topk;
            }
            ok[r] = slot >= 0;
            any = any || slot >= 0;
            src[r] = x0 + xr * kv;
            acc_a[r] = 0.0;
            acc_b[r] = 0.0;
        }
        if (live && any) {
            for (var q0 = lane; q0 < kv; q0 += U * LANES) {
                let q1 = q0 + LANES;
                let q2 = q0 + 2u * LANES;
                let q3 = q0 + 3u * LANES;
                let i1 = min(q1, last);
                let i2 = min(q2, last);
                let i3 = min(q3, last);
                let a0 = wa[wrow + q0];
                let a1 = wa[wrow + i1];
                let a2 = wa[wrow + i2];
                let a3 = wa[wrow + i3];
                var b0 = vec4<u32>(0u);
                var b1 = vec4<u32>(0u);
                var b2 = vec4<u32>(0u);
                var b3 = vec4<u32>(0u);
                if (gated) {
                    b0 = wb[grow + q0];
                    b1 = wb[grow + i1];
                    b2 = wb[grow + i2];
                    b3 = wb[grow + i3];
                }
                for (var r = 0u; r < RB; r++) {
                    if (ok[r]) {
                        let x0w = x[src[r] + q0];
                        let x1w = x[src[r] + i1];
                        let x2w = x[src[r] + i2];
                        let x3w = x[src[r] + i3];
                        var da = wdot(a0, x0w);
                        da += select(0.0, wdot(a1, x1w), q1 < kv);
                        da += select(0.0, wdot(a2, x2w), q2 < kv);
                        da += select(0.0, wdot(a3, x3w), q3 < kv);
                        acc_a[r] += da;
                        if (gated) {
                            var db = wdot(b0, x0w);
                            db += select(0.0, wdot(b1, x1w), q1 < kv);
                            db += select(0.0, wdot(b2, x2w), q2 < kv);
                            db += select(0.0, wdot(b3, x3w), q3 < kv);
                            acc_b[r] += db;
                        }
                    }
                }
            }
        }
        for (var r = 0u; r < RB; r++) {
            sred[r * WG + l] = acc_a[r];
            if (gated) {
                sred[(RB + r) * WG + l] = acc_b[r];
            }
        }
        workgroupBarrier();
        for (var h = LANES / 2u; h > 0u; h >>= 1u) {
            if (lane < h) {
                for (var j = 0u; j < nj; j++) {
                    sred[j * WG + l] += sred[j * WG + l + h];
                }
            }
            workgroupBarrier();
        }
        if (lane < RB && live) {
            let r = lane;
            let row = m0 + r;
            let slot = slot_of(row, end, rows_of_expert);
            if (slot >= 0) {
                let sc = in_scale(slot);
                let va = sred[r * WG + g * LANES];
                var vb = 0.0;
                if (gated) {
                    vb = sred[(RB + r) * WG + g * LANES];
                }
                if (p.mode == 0u) {
                    var v = va;
                    if (p.has_b != 0u) {
                        v += ld_ba(p.oba + n);
                    }
                    if (p.has_rs != 0u) {
                        v *= rs[p.ors + row];
                    }
                    v *= p.scale;
                    if (p.epi == 1u) {
                        v = 1.0 / (1.0 + exp(-v));
                    }
                    let at = p.oy + row * p.n + n;
                    if (p.acc != 0u) {
                        v += ld_y(at);
                    }
                    st_y(at, v);
                } else if (p.mode == 1u) {
                    var gv = sc * vb;
                    var uv = sc * va;
                    if (p.has_b != 0u) {
                        uv += ld_ba(p.oba + e * p.n + n);
                        if (gated) {
                            gv += ld_bb(p.obb + e * p.n + n);
                        }
                    }
                    st_y(p.oy + row * p.n + n, hidden_of(gv, uv));
                } else {
                    var v = va;
                    if (p.has_b != 0u) {
                        v += ld_ba(p.oba + e * p.n + n);
                    }
                    if (p.has_tw != 0u) {
                        v *= tw[p.otw + u32(slot)];
                    }
                    st_y(p.oy + row * p.n + n, v);
                }
            }
        }
        workgroupBarrier();
    }
}

// Routing, one invocation per token, following moe_core::math exactly:
// scoring (softmax / sigmoid / none) -> selection values (+ selection bias) -> group-limited
// mask (top2_sum / max group scores) -> top-k (ties: lower index wins; NaN never selected;
// slots with no valid expert get id -1 and weight 0) -> weight source (scores /
// softmax_topk_logits / sigmoid_topk_logits) -> top-k reduce (none / sum+eps / clamp_min /
// pnorm) -> routed scale on the weights.
//
// The selection is stateless: slot j takes the best (value desc, index asc) expert that comes
// strictly after slot j-1's in that total order, so no per-expert scratch is needed. NaN is
// detected on the bits (WGSL may assume finite math), and group scores are kept in a private
// array (up to 256 groups).

struct Params {
    t: u32,
    e: u32,
    k: u32,
    ol: u32,
    osb: u32,
    oid: u32,
    ow: u32,
    scoring: u32,
    has_sb: u32,
    n_group: u32,
    topk_group: u32,
    gscore: u32,
    wsrc: u32,
    reduce: u32,
    rparam: f32,
    wscale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> sbias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<i32>;
@group(0) @binding(4) var<storage, read_write> wts: array<f32>;

const SOFTMAX: u32 = 0u;
const SIGMOID: u32 = 1u;
const W_SCORES: u32 = 0u;
const W_SOFTMAX: u32 = 1u;
const R_NONE: u32 = 0u;
const R_SUM: u32 = 1u;
const R_CLAMP: u32 = 2u;
const R_PNORM: u32 = 3u;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

fn is_inf(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) == 0x7f800000u;
}

fn sigm(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Softmax statistics of a token: max and sum of exp(l - max); `ok` false when the softmax is
// undefined (a NaN logit, or an infinite max).
struct Soft {
    m: f32,
    s: f32,
    ok: bool,
}

struct Val {
    v: f32,
    ok: bool,
}

fn logit(tok: u32, e: u32) -> f32 {
    return logits[p.ol + tok * p.e + e];
}

fn softmax_stats(tok: u32) -> Soft {
    var r: Soft;
    r.ok = true;
    r.m = logit(tok, 0u);
    for (var e = 0u; e < p.e; e++) {
        let l = logit(tok, e);
        if (is_nan(l)) {
            r.ok = false;
        } else if (l > r.m || is_nan(r.m)) {
            r.m = l;
        }
    }
    if (is_inf(r.m)) {
        r.ok = false;
    }
    r.s = 0.0;
    if (r.ok) {
        for (var e = 0u; e < p.e; e++) {
            r.s += exp(logit(tok, e) - r.m);
        }
    }
    return r;
}

fn score(tok: u32, e: u32, st: Soft) -> Val {
    let l = logit(tok, e);
    var r: Val;
    if (p.scoring == SOFTMAX) {
        r.v = exp(l - st.m) / st.s;
        r.ok = st.ok;
    } else if (p.scoring == SIGMOID) {
        r.v = sigm(l);
        r.ok = !is_nan(l);
    } else {
        r.v = l;
        r.ok = !is_nan(l);
    }
    return r;
}

fn selection(tok: u32, e: u32, st: Soft) -> Val {
    var r = score(tok, e, st);
    if (p.has_sb != 0u) {
        r.v += sbias[p.osb + e];
    }
    r.ok = r.ok && !is_nan(r.v);
    return r;
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // Tokens with a grid stride (more than 65535 workgroups of tokens fit in one dispatch).
    for (var tok = gid.x; tok < p.t; tok += nwg.x * 64u) {
        route_token(tok);
    }
}

fn route_token(tok: u32) {
    var st: Soft;
    st.ok = true;
    st.m = 0.0;
    st.s = 1.0;
    if (p.scoring == SOFTMAX) {
        st = softmax_stats(tok);
    }

    // Group-limited selection: allowed[g] for the topk_group best groups.
    var gsv: array<f32, 256>;
    var gok: array<bool, 256>;
    var allowed: array<bool, 256>;
    var per = p.e;
    if (p.n_group > 0u) {
        per = p.e / p.n_group;
        for (var g = 0u; g < p.n_group; g++) {
            var a = 0.0;
            var b = 0.0;
            var na = 0u;
            for (var i = 0u; i < per; i++) {
                let s = selection(tok, g * per + i, st);
                if (!s.ok) {
                    continue;
                }
                if (na == 0u || s.v > a) {
                    b = a;
                    if (na > 0u) {
                        na = 2u;
                    } else {
                        na = 1u;
                    }
                    a = s.v;
                } else if (na == 1u || s.v > b) {
                    b = s.v;
                    na = 2u;
                }
            }
            var v = a;
            if (p.gscore == 0u && na == 2u) {
                v = a + b;
            }
            gsv[g] = v;
            gok[g] = na > 0u && !is_nan(v);
        }
        for (var g = 0u; g < p.n_group; g++) {
            var better = 0u;
            if (gok[g]) {
                for (var h = 0u; h < p.n_group; h++) {
                    if (gok[h] && (gsv[h] > gsv[g] || (gsv[h] == gsv[g] && h < g))) {
                        better++;
                    }
                }
            }
            allowed[g] = gok[g] && better < p.topk_group;
        }
    }

    // Top-k selection in the total order (value desc, index asc).
    let base = tok * p.k;
    var pv = 0.0;
    var pid = -1;
    var nv = 0u;
    for (var j = 0u; j < p.k; j++) {
        var bid = -1;
        var bv = 0.0;
        if (j == 0u || pid >= 0) {
            for (var e = 0u; e < p.e; e++) {
                if (p.n_group > 0u && !allowed[e / per]) {
                    continue;
                }
                let s = selection(tok, e, st);
                if (!s.ok) {
                    continue;
                }
                if (pid >= 0 && !(s.v < pv || (s.v == pv && i32(e) > pid))) {
                    continue;
                }
                if (bid < 0 || s.v > bv) {
                    bid = i32(e);
                    bv = s.v;
                }
            }
        }
        ids[p.oid + base + j] = bid;
        wts[p.ow + base + j] = 0.0;
        pid = bid;
        pv = bv;
        if (bid >= 0) {
            nv++;
        }
    }

    token_weights(tok, nv, st);
}

// The weights of token `tok`'s `nv` valid slots (they come first; ids already written):
// weight source, top-k reduce, routed scale.
fn token_weights(tok: u32, nv: u32, st: Soft) {
    let base = tok * p.k;
    var m = 0.0;
    for (var j = 0u; j < nv; j++) {
        let id = u32(ids[p.oid + base + j]);
        let l = logit(tok, id);
        if (j == 0u || l > m) {
            m = l;
        }
    }
    var sum = 0.0;
    for (var j = 0u; j < nv; j++) {
        let id = u32(ids[p.oid + base + j]);
        var w = 0.0;
        if (p.wsrc == W_SCORES) {
            w = score(tok, id, st).v;
        } else if (p.wsrc == W_SOFTMAX) {
            w = exp(logit(tok, id) - m);
            sum += w;
        } else {
            w = sigm(logit(tok, id));
        }
        wts[p.ow + base + j] = w;
    }
    if (p.wsrc == W_SOFTMAX) {
        for (var j = 0u; j < nv; j++) {
            wts[p.ow + base + j] = wts[p.ow + base + j] / sum;
        }
    }

    // Top-k reduce.
    if (p.reduce != R_NONE && nv > 0u) {
        var div = 0.0;
        if (p.reduce == R_PNORM) {
            for (var j = 0u; j < nv; j++) {
                let a = abs(wts[p.ow + base + j]);
                if (a > 0.0) {
                    div += pow(a, p.rparam);
                }
            }
            if (div > 0.0) {
                div = pow(div, 1.0 / p.rparam);
            }
        } else {
            for (var j = 0u; j < nv; j++) {
                div += wts[p.ow + base + j];
            }
            if (p.reduce == R_SUM) {
                div += p.rparam;
            } else {
                div = max(div, p.rparam);
            }
        }
        for (var j = 0u; j < nv; j++) {
            wts[p.ow + base + j] = wts[p.ow + base + j] / div;
        }
    }
    if (p.wscale != 1.0) {
        for (var j = 0u; j < nv; j++) {
            wts[p.ow + base + j] = wts[p.ow + base + j] * p.wscale;
        }
    }
}

// The same routing with one workgroup of RW invocations per token (experts <= RMAX): the
// logits are staged in workgroup memory; the softmax statistics are summed by invocation 0
// in ascending expert order (the bits of `main`); the selection values are computed in
// parallel; group scores per group in parallel; each top-k slot is a workgroup arg-max in the
// total order (value desc, index asc) over the experts strictly after the previous slot's.
// The weights of the chosen slots are then computed by invocation 0 as in `main`.
const RW: u32 = 64u;
const RMAX: u32 = 1024u;
var<workgroup> wl: array<f32, 1024>;
var<workgroup> wsel: array<f32, 1024>;
var<workgroup> wok: array<u32, 1024>;
var<workgroup> wgs: array<f32, 256>;
var<workgroup> wgok: array<u32, 256>;
var<workgroup> wallow: array<u32, 256>;
var<workgroup> rv: array<f32, 64>;
var<workgroup> ri: array<i32, 64>;
var<workgroup> wst: Soft;
var<workgroup> wpid: i32;
var<workgroup> wpv: f32;
var<workgroup> wnv: u32;

fn sel_stats(st: Soft, tok: u32, e: u32) -> Val {
    let l = wl[e];
    var r: Val;
    if (p.scoring == SOFTMAX) {
        r.v = exp(l - st.m) / st.s;
        r.ok = st.ok;
    } else if (p.scoring == SIGMOID) {
        r.v = sigm(l);
        r.ok = !is_nan(l);
    } else {
        r.v = l;
        r.ok = !is_nan(l);
    }
    if (p.has_sb != 0u) {
        r.v += sbias[p.osb + e];
    }
    r.ok = r.ok && !is_nan(r.v);
    return r;
}

@compute @workgroup_size(64, 1, 1)
fn wg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let l = lid.x;
    for (var tok = wid.x; tok < p.t; tok += nwg.x) {
        for (var e = l; e < p.e; e += RW) {
            wl[e] = logit(tok, e);
        }
        workgroupBarrier();
        if (l == 0u) {
            var r: Soft;
            r.ok = true;
            r.m = 0.0;
            r.s = 1.0;
            if (p.scoring == SOFTMAX) {
                r.m = wl[0];
                for (var e = 0u; e < p.e; e++) {
                    let v = wl[e];
                    if (is_nan(v)) {
                        r.ok = false;
                    } else if (v > r.m || is_nan(r.m)) {
                        r.m = v;
                    }
                }
                if (is_inf(r.m)) {
                    r.ok = false;
                }
                r.s = 0.0;
                if (r.ok) {
                    for (var e = 0u; e < p.e; e++) {
                        r.s += exp(wl[e] - r.m);
                    }
                }
            }
            wst = r;
            wpid = -1;
            wpv = 0.0;
            wnv = 0u;
        }
        workgroupBarrier();
        let st = wst;
        for (var e = l; e < p.e; e += RW) {
            let v = sel_stats(st, tok, e);
            wsel[e] = v.v;
            wok[e] = u32(v.ok);
        }
        workgroupBarrier();
        var per = p.e;
        if (p.n_group > 0u) {
            per = p.e / p.n_group;
            for (var g = l; g < p.n_group; g += RW) {
                var a = 0.0;
                var b = 0.0;
                var na = 0u;
                for (var i = 0u; i < per; i++) {
                    let e = g * per + i;
                    if (wok[e] == 0u) {
                        continue;
                    }
                    let v = wsel[e];
                    if (na == 0u || v > a) {
                        b = a;
                        if (na > 0u) {
                            na = 2u;
                        } else {
                            na = 1u;
                        }
                        a = v;
                    } else if (na == 1u || v > b) {
                        b = v;
                        na = 2u;
                    }
                }
                var v = a;
                if (p.gscore == 0u && na == 2u) {
                    v = a + b;
                }
                wgs[g] = v;
                wgok[g] = u32(na > 0u && !is_nan(v));
            }
            workgroupBarrier();
            for (var g = l; g < p.n_group; g += RW) {
                var better = 0u;
                if (wgok[g] != 0u) {
                    for (var h = 0u; h < p.n_group; h++) {
                        if (wgok[h] != 0u && (wgs[h] > wgs[g] || (wgs[h] == wgs[g] && h < g))) {
                            better++;
                        }
                    }
                }
                wallow[g] = u32(wgok[g] != 0u && better < p.topk_group);
            }
            workgroupBarrier();
        }
        let base = tok * p.k;
        for (var j = 0u; j < p.k; j++) {
            let pid = wpid;
            let pv = wpv;
            var bid = -1;
            var bv = 0.0;
            if (j == 0u || pid >= 0) {
                for (var e = l; e < p.e; e += RW) {
                    if (wok[e] == 0u || (p.n_group > 0u && wallow[e / per] == 0u)) {
                        continue;
                    }
                    let v = wsel[e];
                    if (pid >= 0 && !(v < pv || (v == pv && i32(e) > pid))) {
                        continue;
                    }
                    if (bid < 0 || v > bv) {
                        bid = i32(e);
                        bv = v;
                    }
                }
            }
            rv[l] = bv;
            ri[l] = bid;
            workgroupBarrier();
            for (var h = RW / 2u; h > 0u; h >>= 1u) {
                if (l < h) {
                    let oi = ri[l + h];
                    let ov = rv[l + h];
                    let mi = ri[l];
                    if (oi >= 0 && (mi < 0 || ov > rv[l] || (ov == rv[l] && oi < mi))) {
                        ri[l] = oi;
                        rv[l] = ov;
                    }
                }
                workgroupBarrier();
            }
            if (l == 0u) {
                let id = ri[0];
                ids[p.oid + base + j] = id;
                wts[p.ow + base + j] = 0.0;
                wpid = id;
                wpv = rv[0];
                if (id >= 0) {
                    wnv += 1u;
                }
            }
            workgroupBarrier();
        }
        if (l == 0u) {
            // `st` from logits in global memory: the same values as the staged ones.
            token_weights(tok, wnv, st);
        }
        workgroupBarrier();
    }
}

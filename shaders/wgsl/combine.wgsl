// Combine: out[t, o] = scale * sum_k expert_out[slot_rows[t, k], o] over the slots with a row,
// summed in f32 in slot order (deterministic: one invocation per output element), rounded once.

struct Params {
    t: u32,
    k: u32,
    width: u32,
    oeo: u32,
    osr: u32,
    oo: u32,
    nx: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 eo E ro
@group(0) @binding(2) var<storage, read_write> slot_rows: array<i32>;
//@bind 3 out E rw

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = (wg.y * p.nx + wg.x) * 256u + lid.x;
    if (idx >= p.t * p.width) {
        return;
    }
    let t = idx / p.width;
    let o = idx % p.width;
    var acc = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let r = slot_rows[p.osr + t * p.k + j];
        if (r >= 0) {
            acc += ld_eo(p.oeo + u32(r) * p.width + o);
        }
    }
    st_out(p.oo + idx, p.scale * acc);
}

// dst[i] += src[i], summed in f32 and rounded once.

struct Params {
    n: u32,
    od: u32,
    os: u32,
    nx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
//@bind 1 dst E rw
//@bind 2 src E ro

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.y * p.nx + wg.x) * 256u + lid.x;
    if (i >= p.n) {
        return;
    }
    st_dst(p.od + i, ld_dst(p.od + i) + ld_src(p.os + i));
}

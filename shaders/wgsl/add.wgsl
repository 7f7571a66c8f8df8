// dst[i] += src[i], summed in f32 and rounded once.

struct Params {
    n: u32,
    od: u32,
    os: u32,
    nx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<E>;
@group(0) @binding(2) var<storage, read_write> src: array<E>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.y * p.nx + wg.x) * 256u + lid.x;
    if (i >= p.n) {
        return;
    }
    dst[p.od + i] = E(f32(dst[p.od + i]) + f32(src[p.os + i]));
}

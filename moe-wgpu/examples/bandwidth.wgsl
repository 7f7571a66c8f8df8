// Bandwidth kernels of the `wgpu_bandwidth` probe and of `wgpu_bench`'s floor (which uses
// `read1` only): `read1` stores only into the first 64 words of `dst` (1 KiB), and only when a
// word matches a constant (never, for the contents the examples write), so the compiler keeps
// the loads; `read4` and `copy1` need `dst` as long as `src`.
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

// one vec4 per invocation, 2D grid of 256-wide workgroups
@compute @workgroup_size(256)
fn copy1(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let i = g.x + g.y * n.x * 256u;
    if (i < arrayLength(&src)) {
        dst[i] = src[i];
    }
}

@compute @workgroup_size(256)
fn read1(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let i = g.x + g.y * n.x * 256u;
    if (i < arrayLength(&src)) {
        let v = src[i];
        if (v.x == 0x9e3779b9u && v.y == 0x7f4a7c15u) {
            dst[i & 63u] = v;
        }
    }
}

// grid-stride, 4 independent loads in flight per iteration
@compute @workgroup_size(256)
fn read4(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let total = n.x * 256u;
    let len = arrayLength(&src);
    var acc = vec4<u32>(0u);
    var i = g.x;
    loop {
        if (i + 3u * total >= len) { break; }
        acc = acc ^ src[i] ^ src[i + total] ^ src[i + 2u * total] ^ src[i + 3u * total];
        i = i + 4u * total;
    }
    loop {
        if (i >= len) { break; }
        acc = acc ^ src[i];
        i = i + total;
    }
    if (acc.x == 0x9e3779b9u && acc.y == 0x7f4a7c15u) {
        dst[g.x & 1023u] = acc;
    }
}

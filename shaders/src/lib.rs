//! # moe-shaders
//!
//! The WGSL of every stage of an MoE layer, as static strings (`include_str!` of
//! `shaders/wgsl/*.wgsl`). Each body is written against two type aliases that the host
//! prepends with [`compose`]:
//!
//! * `E`: the storage element of activations and weights (see [`Storage`]: `f32`; `f16` with
//!   `enable f16;` when the adapter has `SHADER_F16`; `f16` or `bf16` packed two to a `u32`);
//! * `O`: the output element of [`LINEAR`] (`f32` for the router logits and the shared gate,
//!   `E` otherwise).
//!
//! Element-typed bindings are written as `//@bind BINDING NAME E|O ro|rw` lines in the bodies;
//! [`compose`] replaces each with the declaration and `ld_NAME(i) -> f32` /
//! `st_NAME(i, v: f32)` accessors for the chosen storage type. `//@bind BINDING NAME V ro`
//! declares an `array<vec4<u32>>` of raw 16-byte words of `E` (with `VE`, `moe_lo`, `moe_hi`).
//!
//! Arithmetic and accumulation are `f32` everywhere; results are rounded once to the storage
//! type. Every storage binding is `read_write` so that several views of one buffer may be bound
//! in one dispatch (wgpu forbids mixing read-only and read-write uses of one buffer). Binding 0
//! is always the stage's uniform parameter block; each storage view comes with an element
//! offset in it, so views need not start at a binding-aligned address.
#![deny(missing_docs)]

/// Dense linear `y = epi(scale * rs * (x W^T + b))`, optionally accumulated into `y`
/// (router logits, latent fc1/fc2, shared expert down, sigmoid gate). Entry point `main`.
pub const LINEAR: &str = include_str!("../wgsl/linear.wgsl");
/// Routing in all modes (scoring, selection bias, group-limited top-k, weight source, top-k
/// reduce, routed scale on the weights). Entry points `main` (one invocation per token) and
/// `wg` (one workgroup of [`ROUTE_GROUP`] invocations per token, up to
/// [`ROUTE_WG_EXPERTS`] experts; the same results).
pub const ROUTE: &str = include_str!("../wgsl/route.wgsl");
/// Permute: entry points `count`, `offsets_main`, `scatter` (run in that order).
pub const PERMUTE: &str = include_str!("../wgsl/permute.wgsl");
/// Grouped GEMM 1 with the activation fused (and the dense MLP's up half). Entry points
/// `main` (tiled) and `decode` (few rows per expert: K split across a workgroup of
/// [`DECODE_GROUP`] invocations, [`DECODE_UP_FEATURES`] features per workgroup).
pub const EXPERT_UP: &str =
    concat!(include_str!("../wgsl/act.wgsl"), include_str!("../wgsl/expert_up.wgsl"));
/// Grouped GEMM 2 with the routing weight fused. Entry points `main` (tiled) and `decode`
/// ([`DECODE_DOWN_COLUMNS`] output columns per workgroup).
pub const EXPERT_DOWN: &str = include_str!("../wgsl/expert_down.wgsl");
/// Few-row GEMM (linear, expert up with the activation, expert down with the routing weight;
/// see the file's header). Entry points `stream` (weights streamed through the K loop, 4 words
/// per lane per step, one reduction per block of `RB` rows; the pipeline constant `RB` is 1, 4
/// or 8) and `main` (weights held in registers per K segment and applied to blocks of 4 rows);
/// the pipeline constant `LANES` (a power of two, 16..=256 for `stream`, 32..=256 for `main`)
/// sets the lanes per output feature.
/// Weights and activations are bound as `vec4<u32>` words: K and every view offset must be
/// multiples of [`gemv_elements_per_word`].
pub const GEMV: &str = concat!(include_str!("../wgsl/act.wgsl"), include_str!("../wgsl/gemv.wgsl"));
/// Deterministic combine in slot order. Entry point `main`.
pub const COMBINE: &str = include_str!("../wgsl/combine.wgsl");
/// Element-wise `dst += src`. Entry point `main`.
pub const ADD: &str = include_str!("../wgsl/add.wgsl");

/// Every shader body with its name and entry points.
pub const ALL: [(&str, &str, &[&str]); 8] = [
    ("linear", LINEAR, &["main"]),
    ("route", ROUTE, &["main", "wg"]),
    ("permute", PERMUTE, &["count", "offsets_main", "scatter"]),
    ("expert_up", EXPERT_UP, &["main", "decode"]),
    ("expert_down", EXPERT_DOWN, &["main", "decode"]),
    ("combine", COMBINE, &["main"]),
    ("add", ADD, &["main"]),
    ("gemv", GEMV, &["main", "stream"]),
];

/// Invocations per workgroup of [`GEMV`].
pub const GEMV_GROUP: u32 = 256;
/// Words (`vec4<u32>`) of each weight row a [`GEMV`] lane holds: one K segment is
/// `LANES * GEMV_WORDS` words.
pub const GEMV_WORDS: u32 = 4;
/// Rows per block of [`GEMV`]'s `main` (one reduction per block).
pub const GEMV_ROWS: u32 = 4;
/// Words (`vec4<u32>`) of each weight row a lane of [`GEMV`]'s `stream` reads, about: the
/// host picks `LANES` as the power of two (16..=256) nearest above `K / 8 / GEMV_STREAM_WORDS`
/// (bf16/f16; `K / 4` words for f32).
pub const GEMV_STREAM_WORDS: u32 = 16;

/// Elements per 16-byte word of storage type `s` in [`GEMV`] (8 for f16 and bf16, 4 for f32).
pub fn gemv_elements_per_word(s: Storage) -> u32 {
    match s {
        Storage::F32 => 4,
        Storage::F16 | Storage::F16Packed | Storage::BF16 => 8,
    }
}

/// Rows of the GEMMs' output tile (one workgroup), and their K tile.
pub const TILE: u32 = 16;
/// Columns of the GEMMs' output tile (each invocation holds 4 of them in registers).
pub const TILE_N: u32 = 64;
/// Invocations per workgroup of the decode variants of the expert GEMMs (K is split across
/// them, two elements per invocation and step).
pub const DECODE_GROUP: u32 = 64;
/// Rows of an expert the decode variants apply to each loaded weight chunk (one pass).
pub const DECODE_ROWS: u32 = 4;
/// Intermediate features (a gate row and an up row each) per workgroup of `expert_up`'s
/// `decode`.
pub const DECODE_UP_FEATURES: u32 = 2;
/// Output columns per workgroup of `expert_down`'s `decode`.
pub const DECODE_DOWN_COLUMNS: u32 = 4;
/// Invocations per workgroup of the element-wise shaders (combine, add) and of permute.
pub const GROUP: u32 = 256;
/// Invocations per workgroup of the route shader (one token each).
pub const ROUTE_GROUP: u32 = 64;
/// The most experts the route shader's `wg` entry point holds in workgroup memory.
pub const ROUTE_WG_EXPERTS: u32 = 1024;
/// The most expert groups the route shader supports.
pub const MAX_GROUPS: u32 = 256;

/// A storage type a shader can be instantiated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// `f32`.
    F32,
    /// `f16` as a WGSL type (needs the `SHADER_F16` feature).
    F16,
    /// `f16` packed two to a `u32`, converted with integer arithmetic in the shader (round to
    /// nearest even; no feature needed).
    F16Packed,
    /// `bf16` packed two to a `u32`: widened by a shift, rounded to nearest even in the shader.
    BF16,
}

impl Storage {
    fn alias(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::F16Packed | Storage::BF16 => "u32",
        }
    }
}

/// Helpers of the packed storage types, prepended once to a module that uses them.
const PACKED_HELPERS: &str = "
fn moe_bf16_bits(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return ((u >> 16u) | 0x40u) & 0xffffu;
    }
    return ((u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u) & 0xffffu;
}
fn moe_f16_bits(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    let s = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return s | 0x7e00u;
    }
    if (a >= 0x477ff000u) {
        return s | 0x7c00u;
    }
    if (a >= 0x38800000u) {
        let r = a - 0x38000000u;
        return s | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
    }
    let f = bitcast<f32>(a) * 16777216.0;
    let fl = floor(f);
    let d = f - fl;
    var q = u32(fl);
    if (d > 0.5 || (d == 0.5 && (q & 1u) == 1u)) {
        q += 1u;
    }
    return s | q;
}
fn moe_half_of(word: u32, i: u32) -> u32 {
    return (word >> ((i & 1u) * 16u)) & 0xffffu;
}
fn moe_widen_bf16(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}
fn moe_widen_f16(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}
";

/// The declaration and accessors `ld_NAME(i) -> f32` (and `st_NAME(i, v: f32)` when `rw`,
/// `ld2_NAME(i) -> vec2<f32>`, elements `i` and `i + 1`, when `ro`) of one storage binding of
/// element type `ty`.
fn binding(out: &mut String, b: &str, name: &str, ty: Storage, rw: bool) {
    use core::fmt::Write;
    let decl = |out: &mut String, elem: &str| {
        let _ = writeln!(
            out,
            "@group(0) @binding({b}) var<storage, read_write> {name}: array<{elem}>;"
        );
    };
    match ty {
        Storage::F32 | Storage::F16 => {
            let t = ty.alias();
            decl(out, t);
            let _ = writeln!(out, "fn ld_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}");
            if !rw {
                let _ = writeln!(
                    out,
                    "fn ld2_{name}(i: u32) -> vec2<f32> {{ return vec2<f32>(f32({name}[i]), f32({name}[i + 1u])); }}"
                );
            }
            if rw {
                let _ = writeln!(out, "fn st_{name}(i: u32, v: f32) {{ {name}[i] = {t}(v); }}");
            }
        }
        Storage::F16Packed | Storage::BF16 => {
            let (widen, bits) = if ty == Storage::BF16 {
                ("moe_widen_bf16", "moe_bf16_bits")
            } else {
                ("moe_widen_f16", "moe_f16_bits")
            };
            if rw {
                // Two invocations may write the two halves of one word: clear and set only
                // this element's half, atomically (the other half is left untouched).
                decl(out, "atomic<u32>");
                let _ = writeln!(
                    out,
                    "fn ld_{name}(i: u32) -> f32 {{ return {widen}(moe_half_of(atomicLoad(&{name}[i >> 1u]), i)); }}"
                );
                let _ = writeln!(
                    out,
                    "fn st_{name}(i: u32, v: f32) {{ let sh = (i & 1u) * 16u; atomicAnd(&{name}[i >> 1u], ~(0xffffu << sh)); atomicOr(&{name}[i >> 1u], {bits}(v) << sh); }}"
                );
            } else {
                decl(out, "u32");
                let _ = writeln!(
                    out,
                    "fn ld_{name}(i: u32) -> f32 {{ return {widen}(moe_half_of({name}[i >> 1u], i)); }}"
                );
                // Elements i and i + 1: one word load when i is even.
                let _ = writeln!(
                    out,
                    "fn ld2_{name}(i: u32) -> vec2<f32> {{ if ((i & 1u) == 0u) {{ let w = {name}[i >> 1u]; return vec2<f32>({widen}(w & 0xffffu), {widen}(w >> 16u)); }} return vec2<f32>(ld_{name}(i), ld_{name}(i + 1u)); }}"
                );
            }
        }
    }
}

/// `VE` (elements per 16-byte word) and `moe_lo` / `moe_hi` (elements 0..4 and 4..8 of a word,
/// widened to f32) for the `vec4<u32>` word bindings (`//@bind B NAME V ro`) of storage `elem`.
fn word_helpers(elem: Storage) -> &'static str {
    match elem {
        Storage::F32 => {
            "const VE: u32 = 4u;
fn moe_lo(v: vec4<u32>) -> vec4<f32> { return bitcast<vec4<f32>>(v); }
fn moe_hi(v: vec4<u32>) -> vec4<f32> { return vec4<f32>(0.0); }
"
        }
        Storage::BF16 => {
            "const VE: u32 = 8u;
fn moe_lo(v: vec4<u32>) -> vec4<f32> { return bitcast<vec4<f32>>(vec4<u32>(v.x << 16u, v.x & 0xffff0000u, v.y << 16u, v.y & 0xffff0000u)); }
fn moe_hi(v: vec4<u32>) -> vec4<f32> { return bitcast<vec4<f32>>(vec4<u32>(v.z << 16u, v.z & 0xffff0000u, v.w << 16u, v.w & 0xffff0000u)); }
"
        }
        Storage::F16 => {
            "const VE: u32 = 8u;
fn moe_h2(w: u32) -> vec2<f32> { return unpack2x16float(w); }
fn moe_lo(v: vec4<u32>) -> vec4<f32> { return vec4<f32>(moe_h2(v.x), moe_h2(v.y)); }
fn moe_hi(v: vec4<u32>) -> vec4<f32> { return vec4<f32>(moe_h2(v.z), moe_h2(v.w)); }
"
        }
        Storage::F16Packed => {
            "const VE: u32 = 8u;
fn moe_h2(w: u32) -> vec2<f32> { return vec2<f32>(moe_widen_f16(w & 0xffffu), moe_widen_f16(w >> 16u)); }
fn moe_lo(v: vec4<u32>) -> vec4<f32> { return vec4<f32>(moe_h2(v.x), moe_h2(v.y)); }
fn moe_hi(v: vec4<u32>) -> vec4<f32> { return vec4<f32>(moe_h2(v.z), moe_h2(v.w)); }
"
        }
    }
}

/// The full WGSL module of `body` with element type `elem` and linear output type `out`:
/// the aliases `E`, `O`, and every `//@bind BINDING NAME E|O ro|rw` line of the body replaced
/// by the binding's declaration and its `ld_NAME` / `st_NAME` accessors (f32 in and out).
pub fn compose(body: &str, elem: Storage, out: Storage) -> String {
    let mut s = String::with_capacity(body.len() * 2);
    if elem == Storage::F16 || out == Storage::F16 {
        s.push_str("enable f16;\n");
    }
    s.push_str("alias E = ");
    s.push_str(elem.alias());
    s.push_str(";\nalias O = ");
    s.push_str(out.alias());
    s.push_str(";\n");
    let packed = |t: Storage| matches!(t, Storage::F16Packed | Storage::BF16);
    if packed(elem) || packed(out) {
        s.push_str(PACKED_HELPERS);
    }
    let mut words = false;
    for line in body.lines() {
        let mut f = line.split_whitespace();
        if f.next() == Some("//@bind") {
            let (b, name, ty, mode) = (f.next(), f.next(), f.next(), f.next());
            if let (Some(b), Some(name), Some(ty), Some(mode)) = (b, name, ty, mode) {
                if ty == "V" {
                    use core::fmt::Write;
                    if !words {
                        words = true;
                        s.push_str(word_helpers(elem));
                    }
                    let _ = writeln!(
                        s,
                        "@group(0) @binding({b}) var<storage, read_write> {name}: array<vec4<u32>>;"
                    );
                    continue;
                }
                let t = if ty == "O" { out } else { elem };
                binding(&mut s, b, name, t, mode == "rw");
                continue;
            }
        }
        s.push_str(line);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(name: &str, src: &str, entries: &[&str]) {
        let module = match naga::front::wgsl::parse_str(src) {
            Ok(m) => m,
            Err(e) => panic!("{name}: parse error:\n{}", e.emit_to_string(src)),
        };
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16
                | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        );
        if let Err(e) = v.validate(&module) {
            panic!("{name}: validation error:\n{}", e.emit_to_string(src));
        }
        for ep in entries {
            assert!(
                module.entry_points.iter().any(|e| e.name == *ep),
                "{name}: entry point {ep} missing"
            );
        }
    }

    #[test]
    fn every_shader_validates_in_f32_and_f16() {
        for (name, body, entries) in ALL {
            for (elem, out) in [
                (Storage::F32, Storage::F32),
                (Storage::F16, Storage::F16),
                (Storage::F16, Storage::F32),
                (Storage::F16Packed, Storage::F16Packed),
                (Storage::F16Packed, Storage::F32),
                (Storage::BF16, Storage::BF16),
                (Storage::BF16, Storage::F32),
            ] {
                validate(&format!("{name} {elem:?}/{out:?}"), &compose(body, elem, out), entries);
            }
        }
    }
}

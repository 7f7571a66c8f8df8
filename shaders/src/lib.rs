//! # moe-shaders
//!
//! The WGSL of every stage of an MoE layer, as static strings (`include_str!` of
//! `shaders/wgsl/*.wgsl`). Each body is written against two type aliases that the host
//! prepends with [`compose`]:
//!
//! * `E`: the storage element of activations and weights (`f32`, or `f16` with `enable f16;`
//!   when the adapter has `SHADER_F16`);
//! * `O`: the output element of [`LINEAR`] (`f32` for the router logits and the shared gate,
//!   `E` otherwise).
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
/// reduce, routed scale on the weights). Entry point `main`.
pub const ROUTE: &str = include_str!("../wgsl/route.wgsl");
/// Permute: entry points `count`, `offsets_main`, `scatter` (run in that order).
pub const PERMUTE: &str = include_str!("../wgsl/permute.wgsl");
/// Grouped GEMM 1 with the activation fused (and the dense MLP's up half). Entry point `main`.
pub const EXPERT_UP: &str = include_str!("../wgsl/expert_up.wgsl");
/// Grouped GEMM 2 with the routing weight fused. Entry point `main`.
pub const EXPERT_DOWN: &str = include_str!("../wgsl/expert_down.wgsl");
/// Deterministic combine in slot order. Entry point `main`.
pub const COMBINE: &str = include_str!("../wgsl/combine.wgsl");
/// Element-wise `dst += src`. Entry point `main`.
pub const ADD: &str = include_str!("../wgsl/add.wgsl");

/// Every shader body with its name and entry points.
pub const ALL: [(&str, &str, &[&str]); 7] = [
    ("linear", LINEAR, &["main"]),
    ("route", ROUTE, &["main"]),
    ("permute", PERMUTE, &["count", "offsets_main", "scatter"]),
    ("expert_up", EXPERT_UP, &["main"]),
    ("expert_down", EXPERT_DOWN, &["main"]),
    ("combine", COMBINE, &["main"]),
    ("add", ADD, &["main"]),
];

/// Side of the square output tile of the GEMMs (rows and columns per workgroup).
pub const TILE: u32 = 16;
/// Invocations per workgroup of the element-wise shaders (combine, add) and of permute.
pub const GROUP: u32 = 256;
/// Invocations per workgroup of the route shader (one token each).
pub const ROUTE_GROUP: u32 = 64;
/// The most expert groups the route shader supports.
pub const MAX_GROUPS: u32 = 256;

/// A storage type a shader can be instantiated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// `f32`.
    F32,
    /// `f16` (needs the `SHADER_F16` feature).
    F16,
}

impl Storage {
    fn wgsl(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
        }
    }
}

/// The full WGSL module of `body` with element type `elem` and linear output type `out`.
pub fn compose(body: &str, elem: Storage, out: Storage) -> String {
    let mut s = String::with_capacity(body.len() + 64);
    if elem == Storage::F16 || out == Storage::F16 {
        s.push_str("enable f16;\n");
    }
    s.push_str("alias E = ");
    s.push_str(elem.wgsl());
    s.push_str(";\nalias O = ");
    s.push_str(out.wgsl());
    s.push_str(";\n");
    s.push_str(body);
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
            naga::valid::Capabilities::SHADER_FLOAT16,
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
            ] {
                validate(&format!("{name} {elem:?}/{out:?}"), &compose(body, elem, out), entries);
            }
        }
    }
}

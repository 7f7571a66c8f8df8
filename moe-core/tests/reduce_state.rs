//! The positive counterparts of the `compile_fail` examples in `moe_core::reduce`: the same
//! code without the forbidden line compiles, so those examples fail for the stated reason.

use moe_core::reduce::*;

#[allow(dead_code)]
fn once<'o, B: moe_core::Backend + moe_core::MoeStages<f32>, C: Collective<B, f32>>(
    b: &B,
    c: &C,
    p: Partial<'o, B, f32>,
) {
    let r = p.reduce(b, c).unwrap();
    let _ = r.all_reduces();
}

#[allow(dead_code)]
fn mix<'o, B: moe_core::Backend + moe_core::MoeStages<f32>, C: Collective<B, f32>>(
    b: &B,
    c: &C,
    mut p: Partial<'o, B, f32>,
    q: Partial<'o, B, f32>,
) {
    p.merge(b, q).unwrap();
    let _r = p.reduce(b, c).unwrap();
}

#[test]
fn the_valid_uses_compile() {}

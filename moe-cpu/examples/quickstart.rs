//! CPU quickstart: load a golden MoE block (DeepSeek-V3 by default; pass another case name or
//! set `MOE_GOLDEN_DIR`), route and compute it on the CPU backend in f32 and bf16, and print the
//! routing, the expert load and the error against the golden output.
//!
//! `cargo run --release -p moe-cpu --example quickstart [CASE]`

use moe_core::conformance::{ElementWeights, golden_dir, load_case, rel_err};
use moe_core::*;
use moe_cpu::Cpu;
use std::time::Instant;

fn run<T: Element>(
    case: &moe_core::conformance::Case,
) -> Result<(Vec<i32>, Vec<f32>, Vec<f64>, f64)>
where
    Cpu: MoeStages<T>,
{
    let c = &case.config;
    let (t, h, k) = (case.tokens, c.hidden, c.top_k);
    // The plan validates the config and sizes the workspace; the forward never allocates.
    let plan = MoePlan::new(c, t)?;
    let weights = ElementWeights::<T>::from_host(&case.weights);
    let x: Vec<T> = case.x.iter().map(|&v| T::from_f64(v)).collect();
    let mut out = vec![T::from_f32(f32::NAN); t * h];
    let mut ws = vec![0u8; plan.workspace_bytes(T::DTYPE)?];
    let start = Instant::now();
    let reduced = forward(
        &Cpu::new(),
        &plan,
        &weights.views::<Cpu>(),
        t,
        &x[..],
        &mut out[..],
        &mut ws[..],
        &SingleRank,
    )?;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(reduced.all_reduces(), 0);
    // The routing lives in the workspace regions the plan laid out.
    let layout = plan.layout(T::DTYPE)?;
    let base = ws.as_ptr().align_offset(REGION_ALIGN);
    let ids: Vec<i32> =
        bytemuck::cast_slice(&ws[base + layout.topk_ids.offset..][..4 * t * k]).to_vec();
    let w: Vec<f32> =
        bytemuck::cast_slice(&ws[base + layout.topk_weights.offset..][..4 * t * k]).to_vec();
    Ok((ids, w, out.iter().map(|v| v.to_f64()).collect(), secs))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "deepseek_v3".into());
    let path = golden_dir().join(format!("{name}.json"));
    let case = load_case(&path)?;
    let c = &case.config;
    println!("moe-kernels CPU quickstart: {} ({})", case.name, path.display());
    println!(
        "  tokens {}  hidden {}  experts {}  top_k {}  intermediate {}  scoring {:?}  groups {:?}",
        case.tokens,
        c.hidden,
        c.experts,
        c.top_k,
        c.expert.mlp.intermediate,
        c.router.scoring,
        c.router.groups
    );
    println!(
        "  reduce {:?}  scale {}  activation {:?}  shared {}  latent {}",
        c.router.reduce,
        c.router.scale.factor,
        c.expert.mlp.activation,
        c.shared
            .map_or("none".to_string(), |s| format!("I={} gate={:?}", s.mlp.intermediate, s.gate)),
        c.latent.map_or("none".to_string(), |l| format!("L={}", l.size)),
    );
    println!(
        "  instruction set {:?} (chosen at run time; MOE_CPU_ISA caps it)",
        moe_cpu::Isa::detect()
    );
    let (ids, w, out, secs) = run::<f32>(&case)?;
    let k = c.top_k;
    println!("\nrouting (f32), first tokens: expert:weight (weights include the routed scale)");
    for t in 0..case.tokens.min(6) {
        let slots: Vec<String> = (0..k)
            .map(|j| format!("{}:{:.4}", ids[t * k + j], w[t * k + j] as f64 * c.output_scale()))
            .collect();
        println!("  token {t:>2}: {}", slots.join("  "));
    }
    let mut load = vec![0usize; c.experts];
    ids.iter().filter(|&&i| i >= 0).for_each(|&i| load[i as usize] += 1);
    println!("\nexpert load (tokens per expert): {load:?}");
    let same = (0..case.tokens)
        .filter(|&t| {
            let mut a = ids[t * k..(t + 1) * k].to_vec();
            let mut b = case.expected.topk_ids[t * k..(t + 1) * k].to_vec();
            a.sort();
            b.sort();
            a == b
        })
        .count();
    println!("routing agrees with the golden block on {same}/{} tokens", case.tokens);
    println!("\n  dtype  rel. error vs golden output   forward time");
    println!(
        "  f32    {:.3e}                      {:.3} ms",
        rel_err(&out, &case.expected.out),
        secs * 1e3
    );
    let (_, _, out16, secs16) = run::<half::bf16>(&case)?;
    println!(
        "  bf16   {:.3e}                      {:.3} ms",
        rel_err(&out16, &case.expected.out),
        secs16 * 1e3
    );
    let (_, _, outh, secsh) = run::<half::f16>(&case)?;
    println!(
        "  f16    {:.3e}                      {:.3} ms",
        rel_err(&outh, &case.expected.out),
        secsh * 1e3
    );
    Ok(())
}

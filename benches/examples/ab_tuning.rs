//! Interleaved A/B of kernel tunings ([`moe_cpu::Tuning`]) inside the layer: for each selected
//! shape, dtype and T, `ROUNDS` rounds (default 3) each time the two expert GEMMs once per
//! tuning, in turn, then the best time of each. On a shared host, where a slow spell can last
//! seconds, only such alternation in one process compares kernels fairly.
//!
//! `VARIANTS` (default `intel;amd`): variants separated by `;`, each a `Tuning::from_name` name
//! (`intel`, `amd`, `allwb`, `detect`) or fields
//! `wb=LO-HI,dr=ROWS,pf=0|1,dp=ROWS,dw=LO-HI,wn=0|1,wh=0|1,wp=0|1,sp=0|1,ss=N,wd=ROWS,isa=NAME`
//! over the detected tuning and instruction set (`Tuning`'s `wb_rows`, `direct_rows`,
//! `inplace_prefetch`, `dpbf16_rows`, `dpwb_rows`, `wb_narrow`, `wb_half`, `wb_prefetch`,
//! `seq_prefetch`, `seq_streams`, `wb_dot_rows`, `wb_fuse`, `overlap_rows`; `isa=avx512`: that
//! instruction set's kernels). `SHAPES` (name
//! prefixes), `TS`, `DTS` (`f32`, `bf16`, `f16`), `NT` (threads, default 2).
//!
//! Each line also gives, per variant, the median over the rounds of its rate divided by the
//! FMA peak of the pool's threads measured just before it (a slow spell of the host lowers
//! both), and for every variant after the first the median over the rounds of its time divided
//! by the first variant's time in the same round (each round starts one variant later).
//! `CHECK=1` prints a checksum of the workspace (the stages' outputs) after each run: variants
//! that must give the same bits (a blocking change that keeps the summation order) print the
//! same value.
//!
//! `VARIANTS='intel;wb=8-64' SHAPES=mixtral TS=128 cargo run --release -p moe-benches
//! --features cpu --example ab_tuning`
use moe_benches::*;
use moe_core::{Element, MoeStages};
use moe_cpu::{Cpu, Kernels, Tuning};
use std::time::Instant;

fn list(var: &str, d: &str, sep: char) -> Vec<String> {
    env_list(var, sep).unwrap_or_else(|| d.split(sep).map(str::to_string).collect())
}

fn variant(spec: &str) -> Cpu {
    let (t, isa) = parse_variant(spec).unwrap_or_else(|e| {
        eprintln!("VARIANTS: {e}");
        std::process::exit(2)
    });
    Cpu::parallel().with_tuning(t).with_kernels(isa.map_or(Kernels::Auto, Kernels::Isa))
}

fn run<T: Element>(sh: &Shape, tokens: &[usize], variants: &[(String, Cpu)], rounds: usize)
where
    Cpu: MoeStages<T>,
{
    let nt = std::env::var("NT").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let tmax = *tokens.iter().max().unwrap_or(&1);
    let mut layer = Layer::<T>::new(&sh.config, tmax, 7).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(nt).build().unwrap();
    for &t in tokens {
        layer.retoken(t, 7).unwrap();
        pool.install(|| layer.forward(&Cpu::parallel()).unwrap());
        let mut ratios = vec![vec![]; variants.len()];
        let check = std::env::var_os("CHECK").is_some();
        let gf = expert_flops(&sh.config, t) / 1e6;
        let mut times = vec![vec![]; variants.len()];
        for round in 0..rounds {
            // Each round starts one variant later, so that none always runs first.
            for v in (0..variants.len()).map(|i| (i + round) % variants.len()) {
                let cpu = &variants[v].1;
                let peak: f64 = pool
                    .broadcast(|_| moe_benches::peak::fma_peak_gflops_here(3_000_000).0)
                    .iter()
                    .sum();
                let t0 = Instant::now();
                pool.install(|| {
                    layer.stage(cpu, Stage::ExpertUp).unwrap();
                    layer.stage(cpu, Stage::ExpertDown).unwrap();
                });
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                if check {
                    let h = layer
                        .ws
                        .iter()
                        .fold(0u64, |h, &b| h.wrapping_mul(0x100000001b3) ^ b as u64);
                    println!("variant {v} checksum {h:016x}");
                }
                times[v].push(ms);
                ratios[v].push(gf / ms / peak);
            }
        }
        let s: Vec<String> = variants
            .iter()
            .zip(&mut ratios)
            .enumerate()
            .map(|(v, ((name, _), r))| {
                r.sort_by(f64::total_cmp);
                let b = times[v].iter().copied().fold(f64::MAX, f64::min);
                let vs_first = if v == 0 {
                    String::new()
                } else {
                    // Time over the first variant's in the same round, median over the rounds:
                    // a slow spell that spans a round hits both sides of its pair.
                    let mut paired: Vec<f64> =
                        times[v].iter().zip(&times[0]).map(|(t, t0)| t / t0).collect();
                    paired.sort_by(f64::total_cmp);
                    format!(
                        ", {:.3}x the first's time (median of {} rounds, {:.3}-{:.3})",
                        paired[paired.len() / 2],
                        paired.len(),
                        paired[0],
                        paired[paired.len() - 1]
                    )
                };
                format!(
                    "{name}: {b:.1} ms ({:.0} GFLOP/s, median {:.0} % of the peak just \
                     before{vs_first})",
                    gf / b,
                    100.0 * r[r.len() / 2]
                )
            })
            .collect();
        println!("{} {} T={t} expert GEMMs: {}", sh.name, T::DTYPE.name(), s.join(" | "));
    }
}

fn main() {
    let shapes = list("SHAPES", "qwen3,gpt,mixtral,deepseek", ',');
    let tokens: Vec<usize> =
        list("TS", "128,1024", ',').iter().filter_map(|s| s.parse().ok()).collect();
    let rounds = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let variants: Vec<(String, Cpu)> =
        list("VARIANTS", "intel;amd", ';').iter().map(|v| (v.clone(), variant(v))).collect();
    let dts = list("DTS", "f32", ',');
    println!("isa {:?}, detected tuning {:?}", moe_cpu::Isa::detect(), Tuning::detect());
    for sh in canonical() {
        if !shapes.iter().any(|p| sh.name.starts_with(p.as_str())) {
            continue;
        }
        for d in &dts {
            match d.as_str() {
                "f32" => run::<f32>(&sh, &tokens, &variants, rounds),
                "bf16" => run::<half::bf16>(&sh, &tokens, &variants, rounds),
                _ => run::<half::f16>(&sh, &tokens, &variants, rounds),
            }
        }
    }
}

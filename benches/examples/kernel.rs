//! Microkernel throughput with data in cache (the FMA peak per second of this thread's CPU time,
//! read from /proc/thread-self/schedstat).
//!
//! On a shared host the core's throughput itself swings (a neighbour on the sibling hardware
//! thread, frequency changes), so the work item and the FMA chain peak are timed in alternation,
//! `ROUNDS` short bursts each (default 15), and each burst of the item is set against the peak
//! burst just before it; the line gives the median and best of those ratios.
//!
//! `TUNING` (`intel`, `amd`; default the detected one) picks the kernels by row count.
//!
//! `M=128 N=192 K=1024 ISA=avx512 DT=f32 cargo run --release -p moe-benches --features cpu
//! --example kernel`
use moe_cpu::{__bench::block_seconds, Isa, Tuning};

fn cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (m, n, k) = (env("M", 128), env("N", 96), env("K", 1024));
    let rounds = env("ROUNDS", 15).max(1);
    // About 20 ms per burst of the item at 100 GFLOP/s.
    let per = 2.0 * (m * n * k) as f64;
    let reps = env("REPS", (2e9 / per).ceil().max(1.0) as usize);
    let peak_iters = 4_000_000u64;
    let tuning = match std::env::var("TUNING").as_deref() {
        Ok("amd") => Tuning::AMD,
        Ok("intel") => Tuning::INTEL,
        _ => Tuning::detect(),
    };
    let only = std::env::var("ISA").unwrap_or_default().to_lowercase();
    let dts = std::env::var("DT").unwrap_or_default();
    for isa in Isa::all_available() {
        if !only.is_empty() && format!("{isa:?}").to_lowercase() != only {
            continue;
        }
        for bf in [false, true] {
            if !dts.is_empty() && dts != if bf { "bf16" } else { "f32" } {
                continue;
            }
            let item = || {
                if bf {
                    block_seconds::<half::bf16>(isa, tuning, m, n, k, reps)
                } else {
                    block_seconds::<f32>(isa, tuning, m, n, k, reps)
                }
            };
            let mut ratios = vec![];
            let mut best_g = 0f64;
            for _ in 0..rounds {
                let peak = {
                    let c0 = cpu_ns();
                    let w0 = std::time::Instant::now();
                    let (g, _) = moe_benches::peak::fma_peak_gflops_here(peak_iters);
                    g * w0.elapsed().as_secs_f64() * 1e9 / (cpu_ns() - c0)
                };
                // Timed by block_seconds itself: its reps after one warm-up run of the item.
                let g = per * reps as f64 / item() / 1e9;
                best_g = best_g.max(g);
                ratios.push(g / peak);
            }
            ratios.sort_by(f64::total_cmp);
            let d = if bf { "bf16" } else { "f32" };
            println!(
                "{isa:?} {d} m={m} n={n} k={k}: {best_g:.1} GFLOP/s best; of the peak \
                 just before: median {:.0}%, best {:.0}% ({rounds} rounds)",
                100.0 * ratios[ratios.len() / 2],
                100.0 * ratios[ratios.len() - 1]
            );
        }
    }
}

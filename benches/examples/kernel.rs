//! Microkernel throughput with data in cache, per second of this thread's CPU time (read from
//! /proc/thread-self/schedstat, so that other processes on the machine do not skew it).
use moe_cpu::{__bench::block_seconds, Isa};
use std::time::Instant;

fn cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (m, n, k, reps) = (env("M", 128), env("N", 96), env("K", 1024), env("REPS", 200));
    let c0 = cpu_ns();
    let w0 = Instant::now();
    let (peak_wall, _) = moe_benches::peak::fma_peak_gflops(1);
    let _ = (c0, w0, peak_wall);
    // Peak per CPU second: one chain run on this thread.
    let c0 = cpu_ns();
    let w0 = Instant::now();
    let (g, _) = moe_benches::peak::fma_peak_gflops_here(20_000_000);
    let peak = g * w0.elapsed().as_secs_f64() * 1e9 / (cpu_ns() - c0);
    println!("peak per CPU second: {peak:.1} GFLOP/s (wall {g:.1})");
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
            let c0 = cpu_ns();
            let s = if bf {
                block_seconds::<half::bf16>(isa, m, n, k, reps)
            } else {
                block_seconds::<f32>(isa, m, n, k, reps)
            };
            let cpu = (cpu_ns() - c0) / 1e9;
            let _ = s;
            let g = 2.0 * (m * n * k * reps) as f64 / cpu / 1e9;
            let d = if bf { "bf16" } else { "f32" };
            println!(
                "{isa:?} {d} m={m} n={n} k={k}: {g:.1} GFLOP/s per CPU s = {:.0}% of peak",
                100.0 * g / peak
            );
        }
    }
}

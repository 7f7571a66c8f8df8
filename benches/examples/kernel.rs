//! Microkernel throughput with data in cache.
use moe_cpu::{__bench::block_seconds, Isa};
fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (m, n, k, reps) = (env("M", 128), env("N", 96), env("K", 1024), env("REPS", 200));
    let (peak, _) = moe_benches::peak::fma_peak_gflops(1);
    for isa in Isa::all_available() {
        let s = block_seconds::<f32>(isa, m, n, k, reps);
        let g = 2.0 * (m * n * k * reps) as f64 / s / 1e9;
        println!(
            "{isa:?} f32 m={m} n={n} k={k}: {g:.1} GFLOP/s = {:.0}% of 1-thread peak {peak:.0}",
            100.0 * g / peak
        );
        let s = block_seconds::<half::bf16>(isa, m, n, k, reps);
        let g = 2.0 * (m * n * k * reps) as f64 / s / 1e9;
        println!("{isa:?} bf16 m={m} n={n} k={k}: {g:.1} GFLOP/s = {:.0}%", 100.0 * g / peak);
    }
}

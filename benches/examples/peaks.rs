//! This machine's arithmetic peaks on 1 and 2 threads: f32 FMA chains and, where the CPU has
//! AVX512-BF16, `vdpbf16ps` chains (the ceiling of the bf16 kernels of `Isa::Avx512Bf16`).
//!
//! `cargo run --release -p moe-benches --features cpu --example peaks`
fn main() {
    for t in [1, 2] {
        let (f, isa) = moe_benches::peak::fma_peak_gflops(t);
        let bf = moe_benches::peak::dpbf16_peak_gflops(t)
            .map_or("no AVX512-BF16".to_string(), |g| format!("{g:.1} GFLOP/s"));
        println!("threads {t}: f32 FMA ({isa}) {f:.1} GFLOP/s, bf16 vdpbf16ps {bf}");
    }
}

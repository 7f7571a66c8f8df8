//! This machine's arithmetic peaks on 1 and 2 threads: f32 FMA chains and, where the CPU has
//! AVX512-BF16, `vdpbf16ps` chains (the ceiling of the bf16 kernels of `Isa::Avx512Bf16`); and
//! its memory read bandwidth (the floor of GEMMs that stream their weights once).
//!
//! `cargo run --release -p moe-benches --features cpu --example peaks`
fn main() {
    for t in [1, 2] {
        let p = moe_benches::peak::Peaks::measure(t);
        let bf = p.dpbf16.map_or("no AVX512-BF16".to_string(), |g| format!("{g:.1} GFLOP/s"));
        println!(
            "threads {t}: f32 FMA ({}) {:.1} GFLOP/s, bf16 vdpbf16ps {bf}, memory read {:.1} GB/s",
            p.isa, p.fma, p.read_gbs
        );
    }
}

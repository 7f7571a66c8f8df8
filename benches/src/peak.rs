//! This machine's f32 FMA peak: independent FMA chains in registers, widest vectors available.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512(iters: u64) -> f32 {
    use core::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); 16];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chains_avx2(iters: u64) -> f32 {
    use core::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut r = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    // SAFETY: `r` holds 8 floats.
    unsafe { _mm256_storeu_ps(r.as_mut_ptr(), s) };
    r.iter().sum()
}

/// FLOPs per iteration of the widest chain kernel, and the kernel.
fn kernel() -> (f64, &'static str, fn(u64) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return (16.0 * 16.0 * 2.0, "avx512", |n| unsafe { chains_avx512(n) });
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return (12.0 * 8.0 * 2.0, "avx2", |n| unsafe { chains_avx2(n) });
        }
    }
    (8.0 * 2.0, "scalar", |n| {
        let mut acc = [1f32; 8];
        for _ in 0..n {
            for v in acc.iter_mut() {
                *v = v.mul_add(0.999_999, 1e-7);
            }
        }
        acc.iter().sum()
    })
}

/// The f32 FMA peak in GFLOP/s with `threads` threads running at once (best of 5 runs of about
/// 0.2 s), and the instruction set used.
pub fn fma_peak_gflops(threads: usize) -> (f64, &'static str) {
    let (flops, name, f) = kernel();
    let iters = 20_000_000u64;
    (best_rate(threads, flops * iters as f64, || f(std::hint::black_box(iters))), name)
}

/// GFLOP/s of `threads` threads each running `run` (`flops` per run) at once: the best of 5.
fn best_rate(threads: usize, flops: f64, run: impl Fn() -> f32 + Sync) -> f64 {
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(run()));
            }
        });
        best = best.max(flops * threads as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One run of the widest chain kernel on the calling thread: GFLOP/s (wall) and the ISA.
pub fn fma_peak_gflops_here(iters: u64) -> (f64, &'static str) {
    let (flops, name, f) = kernel();
    let t0 = Instant::now();
    std::hint::black_box(f(std::hint::black_box(iters)));
    (flops * iters as f64 / t0.elapsed().as_secs_f64() / 1e9, name)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn chains_dpbf16(iters: u64) -> f32 {
    use core::arch::x86_64::*;
    // SAFETY: `__m512i` and `__m512bh` are 64-byte vectors of plain bits.
    let bh = |v: __m512i| unsafe { core::mem::transmute::<__m512i, __m512bh>(v) };
    let a = bh(_mm512_set1_epi32(0x3f80_3f80));
    let b = bh(_mm512_set1_epi32(0x3380_3380));
    let mut acc = [_mm512_set1_ps(1.0); 16];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

/// This machine's bf16 dot-product peak (`vdpbf16ps`, 64 FLOPs per instruction) in GFLOP/s
/// with `threads` threads at once (best of 5 runs), or `None` without AVX512-BF16.
pub fn dpbf16_peak_gflops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f") {
        let iters = 20_000_000u64;
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
        let run = || unsafe { chains_dpbf16(std::hint::black_box(iters)) };
        return Some(best_rate(threads, 16.0 * 64.0 * iters as f64, run));
    }
    let _ = threads;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(v: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let chunks = v.chunks_exact(128);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 128 floats, so lanes 16 j .. 16 j + 16 are in it.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * j)) });
        }
    }
    let mut s = _mm512_setzero_ps();
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    _mm512_reduce_add_ps(s) + tail
}

/// One pass over `v` that reads every element (a sum, so nothing is optimized away).
fn read_pass(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { sum_avx512(v) };
    }
    let mut acc = [0f32; 16];
    for c in v.chunks(16) {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum()
}

/// This machine's memory read bandwidth in GB/s with `threads` threads at once: each thread
/// sums its own `mib_per_thread` MiB buffer (far larger than the last-level cache), best of 10
/// passes (one sequential stream per thread; 2-8 streams side by side read no faster on Zen 4).
/// The floor of a GEMM that streams its weights once. On a shared host it moves with the
/// neighbours' traffic (24-44 GB/s within minutes on a 2-vCPU Zen 4 guest).
pub fn read_bandwidth_gbs(threads: usize, mib_per_thread: usize) -> f64 {
    let n = mib_per_thread << 18;
    let bufs: Vec<Vec<f32>> = (0..threads).map(|i| vec![1.0 + i as f32; n]).collect();
    let mut best = 0f64;
    for _ in 0..10 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for b in &bufs {
                s.spawn(|| std::hint::black_box(read_pass(std::hint::black_box(b))));
            }
        });
        best = best.max((threads * n * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// This machine's ceilings for `threads` threads running at once, measured together.
#[derive(Clone, Copy, Debug)]
pub struct Peaks {
    /// Threads.
    pub threads: usize,
    /// f32 FMA peak, GFLOP/s.
    pub fma: f64,
    /// The instruction set of the FMA chains.
    pub isa: &'static str,
    /// `vdpbf16ps` peak, GFLOP/s, where the CPU has AVX512-BF16.
    pub dpbf16: Option<f64>,
    /// Memory read bandwidth, GB/s.
    pub read_gbs: f64,
}

impl Peaks {
    /// Measure them (about 3 s).
    pub fn measure(threads: usize) -> Peaks {
        let (fma, isa) = fma_peak_gflops(threads);
        Peaks {
            threads,
            fma,
            isa,
            dpbf16: dpbf16_peak_gflops(threads),
            read_gbs: read_bandwidth_gbs(threads, 256),
        }
    }

    /// The highest arithmetic peak measured for an element type (`bf16`: the larger of the
    /// FMA and `vdpbf16ps` peaks; AMX tiles are not measured), GFLOP/s.
    pub fn arith(&self, bf16: bool) -> f64 {
        self.dpbf16.filter(|_| bf16).map_or(self.fma, |d| d.max(self.fma))
    }

    /// The hardware floor of a computation of `flops` FLOPs that must read `bytes` from
    /// memory, in ms: the larger of the two at the highest arithmetic peak and at the read
    /// bandwidth.
    pub fn floor_ms(&self, flops: f64, bytes: f64, bf16: bool) -> f64 {
        (flops / self.arith(bf16)).max(bytes / self.read_gbs) / 1e6
    }
}

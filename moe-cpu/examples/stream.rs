//! The memory-streaming ceiling of this machine: a plain sum over a large buffer (default
//! 1.4 GB of f32, `MOE_STREAM_MB`), split into one contiguous range per thread, for 1 and 2
//! threads (`MOE_STREAM_THREADS`). Median of 5 passes after a warm-up. Prints GB/s.

use rayon::prelude::*;
use std::time::Instant;

/// Sum of `v` with eight independent vector accumulators.
fn sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { sum512(v) };
    }
    v.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum512(v: &[f32]) -> f32 {
    use core::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let chunks = v.len() / 128;
    let p = v.as_ptr();
    for c in 0..chunks {
        for (u, a) in acc.iter_mut().enumerate() {
            // SAFETY: chunk c lies in `v` (c < len / 128), 16 floats at c * 128 + 16 u.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(p.add(c * 128 + u * 16)) });
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += _mm512_reduce_add_ps(a);
    }
    s + v[chunks * 128..].iter().sum::<f32>()
}

fn main() {
    let mb: usize =
        std::env::var("MOE_STREAM_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(1410);
    let threads: Vec<usize> = std::env::var("MOE_STREAM_THREADS")
        .map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or(vec![1, 2]);
    let n = mb * 1_000_000 / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let per = n.div_ceil(t);
        let mut times = Vec::new();
        for rep in 0..6 {
            let t0 = Instant::now();
            let s: f32 = pool.install(|| buf.par_chunks(per).map(sum).sum());
            let dt = t0.elapsed().as_secs_f64();
            std::hint::black_box(s);
            if rep > 0 {
                times.push(dt);
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        println!(
            "threads {t}: {:.1} ms per pass, {:.1} GB/s (best {:.1})",
            med * 1e3,
            (n * 4) as f64 / med / 1e9,
            (n * 4) as f64 / times[0] / 1e9
        );
    }
}

//! Microkernel throughput with data in cache (the FMA peak per second of this thread's CPU time,
//! read from /proc/thread-self/schedstat).
//!
//! On a shared host the core's throughput itself swings (a neighbour on the sibling hardware
//! thread, frequency changes), and one process can run the same kernel 1.5x faster than the
//! next (cache placement of its buffers), so every variant (instruction set × dtype × tuning)
//! runs in one process, in alternation with the FMA chain peak, `ROUNDS` short bursts each
//! (default 15): each burst is set against the peak burst just before the round; the line gives
//! the best rate and the median and best of those ratios.
//!
//! `ISA` (default: all of this machine's), `DT` (`f32`, `bf16`; default both), `TUNING`
//! (`;`-separated tunings: names `intel`, `amd`, `allwb`, `detect` or fields such as
//! `wb=8-128,dr=7`, as `moe_benches::parse_variant` reads them; default `detect`; an unknown
//! name or field is an error).
//!
//! `M=128 N=192 K=1024 ISA=avx512 DT=f32 TUNING='intel;amd' cargo run --release -p moe-benches
//! --features cpu --example kernel`
use moe_cpu::{__bench::block_seconds, Isa, Tuning};

fn cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}

fn main() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (m, n, k) = (env("M", 128), env("N", 96), env("K", 1024));
    let rounds = env("ROUNDS", 15).max(1);
    // About 10 ms per burst of the item at 100 GFLOP/s.
    let per = 2.0 * (m * n * k) as f64;
    let reps = env("REPS", (1e9 / per).ceil().max(1.0) as usize);
    let only = std::env::var("ISA").unwrap_or_default().to_lowercase();
    let dts = std::env::var("DT").unwrap_or_default();
    // `;`-separated specs of `moe_benches::parse_variant` (names or `wb=..,dr=..` fields); an
    // instruction set is chosen with `ISA`, not here.
    let tunings: Vec<(String, Tuning)> = moe_benches::env_list("TUNING", ';')
        .unwrap_or(vec!["detect".into()])
        .into_iter()
        .map(|t| match moe_benches::parse_variant(&t) {
            Ok((tu, None)) => (t, tu),
            Ok((_, Some(_))) => fail(&format!("TUNING {t:?}: choose the instruction set with ISA")),
            Err(e) => fail(&format!("TUNING: {e}")),
        })
        .collect();
    let mut variants = vec![];
    for isa in Isa::all_available() {
        if !only.is_empty() && format!("{isa:?}").to_lowercase() != only {
            continue;
        }
        for bf in [false, true] {
            if !dts.is_empty() && dts != if bf { "bf16" } else { "f32" } {
                continue;
            }
            for (name, tu) in &tunings {
                variants.push((isa, bf, name.clone(), *tu));
            }
        }
    }
    let mut ratios = vec![vec![]; variants.len()];
    let mut best = vec![0f64; variants.len()];
    for _ in 0..rounds {
        let peak = {
            let c0 = cpu_ns();
            let w0 = std::time::Instant::now();
            let (g, _) = moe_benches::peak::fma_peak_gflops_here(4_000_000);
            g * w0.elapsed().as_secs_f64() * 1e9 / (cpu_ns() - c0)
        };
        for (v, &(isa, bf, _, tu)) in variants.iter().enumerate() {
            // Timed by block_seconds itself: its reps after one warm-up run of the item.
            let s = if bf {
                block_seconds::<half::bf16>(isa, tu, m, n, k, reps)
            } else {
                block_seconds::<f32>(isa, tu, m, n, k, reps)
            };
            let g = per * reps as f64 / s / 1e9;
            best[v] = best[v].max(g);
            ratios[v].push(g / peak);
        }
    }
    for (v, (isa, bf, name, _)) in variants.iter().enumerate() {
        let r = &mut ratios[v];
        r.sort_by(f64::total_cmp);
        let d = if *bf { "bf16" } else { "f32" };
        println!(
            "{isa:?} {d} {name} m={m} n={n} k={k}: {:.1} GFLOP/s best; of the peak just before: \
             median {:.0}%, best {:.0}% ({rounds} rounds)",
            best[v],
            100.0 * r[r.len() / 2],
            100.0 * r[r.len() - 1]
        );
    }
}

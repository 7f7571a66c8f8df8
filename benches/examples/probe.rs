//! Quick look at one shape: `cargo run --release -p moe-benches --features cpu --example probe`.
//!
//! `S` (shape index in `canonical()`), `T`, `DT` (`f32`, `bf16`), `TH` (thread counts 1..=TH),
//! `REP`, `PEAK` (measure the FMA peak for 1..=PEAK threads); `COUNTS=1` only prints the rows
//! the router gives each expert (the work items' row counts), as routed and sorted, and the
//! weight elements of one expert (what `benches/envelope.py` reads).
//!
//! With the feature `trace`, `TRACE=PREFIX` also writes, for each thread count and each of `REP`
//! runs of the two expert GEMMs, the CPU backend's work-item timeline (`moe_cpu::trace`) to
//! `PREFIX{threads}_{run}.csv`; `python3 benches/trace_summary.py FILE...` says where the
//! threads' time went, by item size:
//! `TRACE=/tmp/tr S=3 T=128 TH=2 PEAK=0 cargo run --release -p moe-benches --features trace
//! --example probe`
use moe_benches::*;
use moe_core::{Element, MoeStages};
use moe_cpu::Cpu;
use std::time::Instant;

/// Process CPU seconds (user + system) from /proc/self/stat.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (t(11) + t(12)) / 100.0
}

fn main() {
    let t: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let which: usize = std::env::var("S").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let sh = if which == 99 {
        let mut c = canonical()[0];
        c.config.hidden = env("H", 2048);
        c.config.experts = env("E", 1);
        c.config.top_k = env("K", 1);
        c.config.expert.mlp.intermediate = env("I", 768);
        c
    } else {
        canonical()[which]
    };
    for th in [1usize, 2].into_iter().take(env("PEAK", 2)) {
        let (p, isa) = peak::fma_peak_gflops(th);
        println!("peak {th} threads: {p:.1} GFLOP/s ({isa})");
    }
    match std::env::var("DT").as_deref() {
        Ok("bf16") => body::<half::bf16>(&sh, t, &env),
        _ => body::<f32>(&sh, t, &env),
    }
}

fn body<T: Element>(sh: &Shape, t: usize, env: &(dyn Fn(&str, usize) -> usize + Sync))
where
    Cpu: MoeStages<T>,
{
    let mut l = Layer::<T>::new(&sh.config, t, 1).unwrap();
    if env("COUNTS", 0) == 1 {
        // The permute stage's `expert_offsets` (first row of each expert, then the total).
        l.forward(&Cpu::parallel()).unwrap();
        let lay = l.plan.layout(T::DTYPE).unwrap();
        let base = l.ws.as_ptr().align_offset(moe_core::REGION_ALIGN);
        let o = &l.ws[base + lay.expert_offsets.offset..][..4 * lay.expert_offsets.len];
        let o: Vec<i32> = o.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        let mut c: Vec<i32> = o.windows(2).map(|w| w[1] - w[0]).collect();
        println!("{} T={t}", sh.name);
        println!("weights per expert: {}", expert_weights(&sh.config));
        println!("rows per expert: {c:?}");
        c.sort();
        println!("sorted: {c:?}");
        return;
    }
    for th in [1usize, 2].into_iter().take(env("TH", 2)) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(th).build().unwrap();
        let cpu = Cpu::parallel();
        pool.install(|| {
            l.forward(&cpu).unwrap();
            for st in l.stages() {
                let mut best = f64::MAX;
                for _ in 0..env("REP", 3) {
                    let t0 = Instant::now();
                    l.stage(&cpu, st).unwrap();
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                println!("{} T={t} th={th} {:>14}: {:.3} ms", sh.name, st.name(), best * 1e3);
            }
            #[cfg(feature = "trace")]
            if let Ok(prefix) = std::env::var("TRACE") {
                for rep in 0..env("REP", 3) {
                    moe_cpu::trace::start();
                    l.stage(&cpu, Stage::ExpertUp).unwrap();
                    l.stage(&cpu, Stage::ExpertDown).unwrap();
                    let mut f = String::from("kind,group,rows,cols,k,thread,start,end\n");
                    for r in moe_cpu::trace::stop() {
                        f += &format!(
                            "{:?},{},{},{},{},{},{:.7},{:.7}\n",
                            r.kind, r.group, r.rows, r.cols, r.k, r.thread, r.start, r.end
                        );
                    }
                    let path = format!("{prefix}{th}_{rep}.csv");
                    std::fs::write(&path, f).unwrap_or_else(|e| panic!("{path}: {e}"));
                    println!("timeline: {path}");
                }
            }
            let mut best = f64::MAX;
            let c0 = cpu_s();
            let reps = env("REP", 3);
            for _ in 0..reps {
                let t0 = Instant::now();
                l.stage(&cpu, Stage::ExpertUp).unwrap();
                l.stage(&cpu, Stage::ExpertDown).unwrap();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let f = expert_flops(&sh.config, t);
            let cpu_per = (cpu_s() - c0) / reps as f64;
            println!(
                "expert GEMMs per CPU second: {:.1} GFLOP/s ({cpu_per:.3} CPU s each)",
                f / cpu_per / 1e9
            );
            println!("expert GEMMs: {:.3} ms = {:.1} GFLOP/s", best * 1e3, f / best / 1e9);
            let t0 = Instant::now();
            l.forward(&cpu).unwrap();
            println!("layer: {:.3} ms", t0.elapsed().as_secs_f64() * 1e3);
        });
    }
}

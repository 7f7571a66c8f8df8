//! CPU benches: this machine's FMA peak and memory read bandwidth (1 and 2 threads), then for
//! each canonical shape, element type (f32, bf16) and token count: every stage, the two expert
//! GEMMs (with their share of the FMA peak, for bf16 also of the `vdpbf16ps` peak where the CPU
//! has AVX512-BF16, the GB/s at which they read the active experts' weights, and their time as
//! % of the hardware floor: FLOPs at the highest arithmetic peak or weight bytes at the read
//! bandwidth, whichever takes longer) and the whole layer, with 1 and 2 threads.
//!
//! `cargo bench -p moe-benches --features cpu`; `MOE_BENCH_QUICK=1` for a run of a few minutes
//! (T in {1, 128}, 2 threads, per-stage and whole-layer benches at T = 1 only, the expert GEMMs
//! at both, shorter measurement). Narrow a run with `MOE_BENCH_SHAPES=qwen,mixtral`,
//! `MOE_BENCH_T=1,128`, `MOE_BENCH_DTYPES=f32`, `MOE_BENCH_THREADS=2`,
//! `MOE_BENCH_STAGES=0` (a value that names nothing, such as an unknown dtype, stops the bench
//! with a message: [`moe_benches::Selection`]). The layer and GEMM figures are also written as
//! CSV to `target/moe-benches-cpu.csv` (or `MOE_BENCH_CSV`), for `benches/compare.py`.

use criterion::{Criterion, SamplingMode};
use moe_benches::*;
use moe_core::{Element, MoeStages};
use moe_cpu::Cpu;
use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

struct Opts {
    quick: bool,
    sel: Selection,
    stages: bool,
}

fn opts() -> Opts {
    let quick = std::env::var("MOE_BENCH_QUICK").is_ok_and(|v| v != "0");
    let (tokens, threads): (&[usize], &[usize]) =
        if quick { (&[1, 128], &[2]) } else { (&[1, 16, 128, 1024], &[1, 2]) };
    let sel = Selection::from_env(tokens, threads, &["f32", "bf16"]).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    Opts { quick, sel, stages: std::env::var("MOE_BENCH_STAGES").map_or(true, |v| v != "0") }
}

/// Median and minimum seconds per iteration seen by a bench.
#[derive(Default)]
struct Seen(Vec<f64>);

impl Seen {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn timed(seen: &RefCell<Seen>, iters: u64, mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        f();
        let d = t0.elapsed();
        seen.borrow_mut().0.push(d.as_secs_f64());
        total += d;
    }
    total
}

#[allow(clippy::too_many_arguments)]
fn bench_shape<T: Element>(
    c: &mut Criterion,
    o: &Opts,
    sh: &Shape,
    dtype: &str,
    peaks: &[peak::Peaks],
    csv: &mut dyn Write,
) where
    Cpu: MoeStages<T>,
{
    let tmax = *o.sel.tokens.iter().max().unwrap_or(&1);
    let t_build = Instant::now();
    let mut layer = match Layer::<T>::new(&sh.config, tmax, 7) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", sh.name);
            return;
        }
    };
    eprintln!("{} {dtype}: weights ready in {:.1} s", sh.name, t_build.elapsed().as_secs_f64());
    for &t in &o.sel.tokens {
        layer.retoken(t, 7).unwrap();
        for &th in &o.sel.threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(th).build().unwrap();
            let cpu = Cpu::parallel();
            let pk = peaks
                .iter()
                .find(|p| p.threads == th)
                .copied()
                .unwrap_or_else(|| peak::Peaks::measure(th));
            pool.install(|| layer.forward(&cpu).unwrap());
            let id = format!("{}/{dtype}/T{t}/th{th}", sh.name);
            let mut g = c.benchmark_group(format!("cpu/{id}"));
            g.sampling_mode(SamplingMode::Flat);
            if o.stages && !(o.quick && t != o.sel.tokens[0]) {
                for st in layer.stages() {
                    g.bench_function(st.name(), |b| {
                        b.iter(|| pool.install(|| layer.stage(&cpu, st).unwrap()))
                    });
                }
            }
            let gemm = RefCell::new(Seen::default());
            g.bench_function("expert_gemms", |b| {
                b.iter_custom(|n| {
                    timed(&gemm, n, || {
                        pool.install(|| {
                            layer.stage(&cpu, Stage::ExpertUp).unwrap();
                            layer.stage(&cpu, Stage::ExpertDown).unwrap();
                        })
                    })
                })
            });
            // Quick mode: the whole layer at the first T only (at T = 128 the big shapes take
            // about a second per forward, and criterion takes at least ten samples).
            let whole = RefCell::new(Seen::default());
            if !(o.quick && t != o.sel.tokens[0]) {
                g.bench_function("layer", |b| {
                    b.iter_custom(|n| {
                        timed(&whole, n, || pool.install(|| layer.forward(&cpu).unwrap()))
                    })
                });
            }
            g.finish();
            let (gm, lm) = (gemm.borrow().median(), whole.borrow().median());
            let fig = GemmFigures::new(&mut layer, &pk, gm * 1e3).unwrap();
            let dp = pk.dpbf16.zip(fig.pct_dpbf16).map_or(String::new(), |(p, pct)| {
                format!(", {pct:.1}% of the {th}-thread vdpbf16ps peak ({p:.0})")
            });
            // None: the layer bench did not run (quick mode, T after the first).
            let lm = (!whole.borrow().0.is_empty()).then_some(lm * 1e3);
            let layer_txt =
                lm.map_or("layer not run (quick mode)".to_string(), |v| format!("layer {v:.3} ms"));
            println!(
                "RESULT {id}: expert GEMMs {:.3} ms = {:.1} GFLOP/s = {:.1}% of the {th}-thread FMA peak ({:.0}){dp}, weights read at {:.1} GB/s ({:.1} measured), {:.1}% of the hardware floor; {layer_txt}",
                gm * 1e3,
                fig.gflops,
                fig.pct_fma,
                pk.fma,
                fig.weight_gbs,
                pk.read_gbs,
                fig.pct_floor,
            );
            let layer_csv = lm.map_or(String::new(), |v| format!("{v:.6}"));
            let _ = writeln!(
                csv,
                "{},{dtype},{t},{th},{layer_csv},{:.6},{}",
                sh.name,
                gm * 1e3,
                fig.csv(&pk)
            );
        }
    }
}

fn main() {
    let o = opts();
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    c = if o.quick {
        c.warm_up_time(Duration::from_millis(100)).measurement_time(Duration::from_millis(300))
    } else {
        c.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
    };
    let mut peaks = vec![];
    for th in [1usize, 2] {
        let p = peak::Peaks::measure(th);
        println!("PEAK f32 FMA, {th} thread(s): {:.1} GFLOP/s ({})", p.fma, p.isa);
        if let Some(d) = p.dpbf16 {
            println!("PEAK bf16 vdpbf16ps, {th} thread(s): {d:.1} GFLOP/s");
        }
        println!("PEAK memory read, {th} thread(s): {:.1} GB/s", p.read_gbs);
        peaks.push(p);
    }
    println!("ISA used by the kernels: {:?}", moe_cpu::Isa::detect());
    let path = std::env::var("MOE_BENCH_CSV").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/moe-benches-cpu.csv").to_string()
    });
    let mut csv = std::fs::File::create(&path).map(std::io::BufWriter::new).ok();
    let mut sink = std::io::sink();
    let out: &mut dyn Write = match csv.as_mut() {
        Some(f) => f,
        None => &mut sink,
    };
    let _ = writeln!(out, "{CSV_HEADER}");
    for sh in &o.sel.shapes {
        for d in &o.sel.dtypes {
            match d.as_str() {
                "f32" => bench_shape::<f32>(&mut c, &o, sh, "f32", &peaks, out),
                "bf16" => bench_shape::<half::bf16>(&mut c, &o, sh, "bf16", &peaks, out),
                _ => bench_shape::<half::f16>(&mut c, &o, sh, "f16", &peaks, out),
            }
            let _ = out.flush();
        }
    }
    c.final_summary();
    println!("CSV: {path}");
}

//! The numbers of the report, timed like `benches/torch_cpu.py` (one warm-up run, then at least
//! 3 runs and about 2 s, median): for each selected shape, dtype, T and thread count, the two
//! expert GEMMs (GFLOP/s and % of the FMA peak measured just before; for bf16 on a CPU with
//! AVX512-BF16 also % of the `vdpbf16ps` peak, the ceiling of those kernels), the GB/s at which
//! they read the active experts' weights, and their time as % of the hardware floor (the larger
//! of the FLOPs at the highest arithmetic peak for the dtype and the weight bytes at the memory
//! read bandwidth, both measured just before), and the whole layer.
//! Same environment variables as the criterion bench; CSV on stdout (and `MOE_BENCH_CSV`).
//!
//! With `MOE_BENCH_BATON_IN` and `MOE_BENCH_BATON_OUT` (two named pipes, set by
//! `benches/compare_cpu.sh`) it takes turns with `benches/torch_cpu.py`: each layer build and
//! each timed point waits for a line on the first pipe and hands one on through the second when
//! done, so the two sides never run at once and time each point within seconds of each other.
//!
//! `cargo run --release -p moe-benches --features cpu --example report`
use moe_benches::*;
use moe_core::{Element, MoeStages};
use moe_cpu::Cpu;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::time::Instant;

/// Turn-taking with the PyTorch side of a compare run (see the module docs); does nothing when
/// the two variables are unset.
struct Baton {
    rx: Option<BufReader<File>>,
    tx: Option<File>,
}

impl Baton {
    fn from_env() -> Baton {
        let open = |var: &str, write: bool| {
            let p = std::env::var(var).ok()?;
            match std::fs::OpenOptions::new().read(!write).write(write).open(&p) {
                Ok(f) => Some(f),
                Err(e) => fail(&format!("{var}={p}: {e}")),
            }
        };
        Baton {
            rx: open("MOE_BENCH_BATON_IN", false).map(BufReader::new),
            tx: open("MOE_BENCH_BATON_OUT", true),
        }
    }

    /// Runs `f` on this side's turn: waits for the baton first, hands it on after.
    fn hold<R>(&mut self, f: impl FnOnce() -> R) -> R {
        if let Some(rx) = self.rx.as_mut() {
            let mut line = String::new();
            match rx.read_line(&mut line) {
                Ok(0) => fail("the baton pipe closed"),
                Ok(_) => {}
                Err(e) => fail(&format!("reading the baton: {e}")),
            }
        }
        let r = f();
        if let Some(tx) = self.tx.as_mut()
            && let Err(e) = writeln!(tx, "go").and_then(|_| tx.flush())
        {
            fail(&format!("handing the baton on: {e}"));
        }
        r
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("report: {msg}");
    std::process::exit(1)
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    f();
    if t0.elapsed().as_secs_f64() > 5.0 {
        let t0 = Instant::now();
        f();
        return t0.elapsed().as_secs_f64() * 1e3;
    }
    let mut v = vec![];
    let start = Instant::now();
    while v.len() < 3 || (start.elapsed().as_secs_f64() < 2.0 && v.len() < 15) {
        let t0 = Instant::now();
        f();
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run<T: Element>(
    sh: &Shape,
    d: &str,
    tokens: &[usize],
    threads: &[usize],
    out: &mut dyn Write,
    baton: &mut Baton,
) where
    Cpu: MoeStages<T>,
{
    let tmax = *tokens.iter().max().unwrap_or(&1);
    let mut layer = baton.hold(|| Layer::<T>::new(&sh.config, tmax, 7).unwrap());
    for &t in tokens {
        for &th in threads {
            baton.hold(|| {
                layer.retoken(t, 7).unwrap();
                let pool = rayon::ThreadPoolBuilder::new().num_threads(th).build().unwrap();
                let pk = peak::Peaks::measure(th);
                let cpu = Cpu::parallel();
                let (gm, lm) = pool.install(|| {
                    layer.forward(&cpu).unwrap();
                    let gm = median_ms(|| {
                        layer.stage(&cpu, Stage::ExpertUp).unwrap();
                        layer.stage(&cpu, Stage::ExpertDown).unwrap();
                    });
                    let lm = median_ms(|| layer.forward(&cpu).unwrap());
                    (gm, lm)
                });
                let fig = GemmFigures::new(&mut layer, &pk, gm).unwrap();
                let row = format!("{},{d},{t},{th},{lm:.4},{gm:.4},{}", sh.name, fig.csv(&pk));
                println!("{row}");
                let _ = writeln!(out, "{row}");
                let _ = out.flush();
            });
        }
    }
}

fn main() {
    // Checked before the first point, so that a typo fails here (and, under `compare_cpu.sh`,
    // stops the PyTorch side, which checks the same) instead of running something else.
    let sel = Selection::from_env(&[1, 16, 128, 1024], &[2], &["f32", "bf16"])
        .unwrap_or_else(|e| fail(&e));
    let (tokens, threads) = (&sel.tokens, &sel.threads);
    let path = std::env::var("MOE_BENCH_CSV").ok();
    let mut file = path.as_ref().and_then(|p| {
        let new = !std::path::Path::new(p).exists();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).ok()?;
        if new {
            let _ = writeln!(f, "{CSV_HEADER}");
        }
        Some(f)
    });
    let mut sink = std::io::sink();
    let out: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut sink,
    };
    let mut baton = Baton::from_env();
    println!("{CSV_HEADER}");
    for sh in &sel.shapes {
        for d in &sel.dtypes {
            match d.as_str() {
                "f32" => run::<f32>(sh, d, tokens, threads, out, &mut baton),
                "bf16" => run::<half::bf16>(sh, d, tokens, threads, out, &mut baton),
                _ => run::<half::f16>(sh, d, tokens, threads, out, &mut baton),
            }
        }
    }
}

//! The AMX-BF16 path forced on ([`Isa::Amx`]): the expert GEMM stages against a float64
//! computation in this file, on shapes with K tails (not multiples of the 32-wide k-step or of
//! the 512 K block), N tails (not multiples of the 16-row tile or of the 192-column block), row
//! tails (experts whose row counts are not multiples of 16, more than one 256-row block), experts
//! with no rows and experts right at the AMX row threshold; bitwise the same for 1, 2 and 3
//! threads. Skipped (with a message) on machines without AMX-BF16; the fallback is tested too.

use moe_core::backend::{ExpertRows, MlpWeights, MoeStages, PermuteBuffers};
use moe_core::conformance::{Rng, rel_err};
use moe_core::*;
use moe_cpu::{Cpu, Isa, Kernels, Threads};

type Bf = half::bf16;

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

fn bf(r: &mut Rng, n: usize, s: f64) -> Vec<Bf> {
    r.tensor(n, s).into_iter().map(Bf::from_f64).collect()
}

/// The outputs of `expert_up` (hidden rows) and `expert_down` (expert rows) for one shape,
/// with `rows_of[e]` tokens routed to expert `e` (0 allowed).
struct Run {
    hidden: Vec<Bf>,
    out: Vec<Bf>,
}

struct Shape {
    h: usize,
    inter: usize,
    rows_of: Vec<usize>,
}

struct Data {
    plan: MoePlan,
    tokens: usize,
    x: Vec<Bf>,
    gate: Vec<Bf>,
    up: Vec<Bf>,
    down: Vec<Bf>,
    weights: Vec<f32>,
    offs: Vec<i32>,
    sorted: Vec<i32>,
}

fn setup(s: &Shape, seed: u64) -> Data {
    let e = s.rows_of.len();
    let tokens: usize = s.rows_of.iter().sum();
    let c = MoeConfig {
        hidden: s.h,
        experts: e,
        top_k: 1,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: s.inter,
                gated: true,
                activation: Activation::Silu,
                bias: false,
            },
            apply_weight_on_input: false,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    let plan = MoePlan::new(&c, tokens).unwrap();
    let mut r = Rng::new(seed);
    let x = bf(&mut r, tokens * s.h, 1.0);
    let (si, so) = (1.0 / (s.h as f64).sqrt(), 1.0 / (s.inter as f64).sqrt());
    let gate = bf(&mut r, e * s.inter * s.h, si);
    let up = bf(&mut r, e * s.inter * s.h, si);
    let down = bf(&mut r, e * s.h * s.inter, so);
    let weights: Vec<f32> = (0..tokens).map(|_| r.uniform() as f32).collect();
    // Tokens interleaved over the experts (so that an expert's rows are not consecutive tokens).
    let mut ids = vec![];
    let mut left = s.rows_of.clone();
    while ids.len() < tokens {
        for (ex, l) in left.iter_mut().enumerate() {
            if *l > 0 {
                ids.push(ex as i32);
                *l -= 1;
            }
        }
    }
    let rows = plan.rows_capacity(tokens);
    let (mut offs, mut cur, mut sorted, mut slot_rows) =
        (vec![0i32; e + 1], vec![0i32; e], vec![0i32; rows], vec![0i32; tokens]);
    MoeStages::<Bf>::permute(
        &Cpu::portable(),
        &plan,
        tokens,
        &ids,
        None,
        PermuteBuffers {
            expert_offsets: &mut offs,
            expert_cursor: &mut cur,
            sorted_slots: &mut sorted,
            slot_rows: &mut slot_rows,
        },
    )
    .unwrap();
    Data { plan, tokens, x, gate, up, down, weights, offs, sorted }
}

fn run(cpu: &Cpu, s: &Shape, d: &Data) -> Run {
    let w = MlpWeights::<Cpu, Bf> {
        gate: Some(&d.gate),
        up: &d.up,
        down: &d.down,
        gate_bias: None,
        up_bias: None,
        down_bias: None,
    };
    let er = |wt: bool| ExpertRows::<Cpu> {
        expert_offsets: &d.offs,
        sorted_slots: &d.sorted,
        weights: wt.then_some(&d.weights[..]),
    };
    let rows = d.plan.rows_capacity(d.tokens);
    let poison = Bf::from_f32(7.0);
    let mut hidden = vec![poison; rows * s.inter];
    cpu.expert_up(&d.plan, d.tokens, &d.x, &w, er(false), &mut hidden).unwrap();
    let mut out = vec![poison; rows * s.h];
    cpu.expert_down(&d.plan, d.tokens, &hidden, &w, er(true), &mut out).unwrap();
    Run { hidden, out }
}

/// Relative-norm errors of both stages against float64 (expert_down from the path's own hidden
/// rows, so that each stage is measured alone).
fn errors(s: &Shape, d: &Data, got: &Run) -> (f64, f64) {
    let (h, inter) = (s.h, s.inter);
    let f = |v: Bf| v.to_f64();
    let (mut hr, mut hg, mut or, mut og) = (vec![], vec![], vec![], vec![]);
    for e in 0..s.rows_of.len() {
        for row in d.offs[e] as usize..d.offs[e + 1] as usize {
            let Ok(slot) = usize::try_from(d.sorted[row]) else { continue };
            let t = slot;
            for i in 0..inter {
                let wr = (e * inter + i) * h;
                let (mut g, mut u) = (0.0, 0.0);
                for c in 0..h {
                    let xv = f(d.x[t * h + c]);
                    g += xv * f(d.gate[wr + c]);
                    u += xv * f(d.up[wr + c]);
                }
                hr.push(silu(g) * u);
                hg.push(f(got.hidden[row * inter + i]));
            }
            for j in 0..h {
                let wr = (e * h + j) * inter;
                let mut acc = 0.0;
                for i in 0..inter {
                    acc += f(got.hidden[row * inter + i]) * f(d.down[wr + i]);
                }
                or.push(d.weights[slot] as f64 * acc);
                og.push(f(got.out[row * h + j]));
            }
        }
    }
    (rel_err(&hg, &hr), rel_err(&og, &or))
}

fn shapes() -> Vec<Shape> {
    vec![
        // K tail (531 = 16 * 32 + 19 in the K block after 512), N tails (37 columns; 531 =
        // 2 * 192 + 147), empty experts 1 and 3, row counts 6 (threshold), 5 (below), 23, 40.
        Shape { h: 531, inter: 37, rows_of: vec![23, 0, 6, 0, 40, 5] },
        // Three K blocks (512, 512, 76), N tail 200 = 192 + 8, 300 rows (two row blocks).
        Shape { h: 1100, inter: 200, rows_of: vec![300, 17, 0] },
        // Exact multiples everywhere.
        Shape { h: 64, inter: 96, rows_of: vec![32, 16, 48, 0] },
        // Weight tiles read in place (at most 128 rows, K a multiple of 32): an odd number of
        // full n-tiles (5, the last one alone), an odd number of k-steps (3), odd m-tile
        // counts (2 and 7 tiles); the down stage (K = 80) packs them instead.
        Shape { h: 96, inter: 80, rows_of: vec![20, 100, 7] },
        // Tiny K (1 < 32) and N (1).
        Shape { h: 1, inter: 1, rows_of: vec![7, 0, 9] },
        // The longer K block of items whose tiles are all read in place (whole n-tiles, K a
        // multiple of 32): in the up stage 16 rows take 8192 + 64, 30 rows 4096 + 4096 + 64,
        // 120 rows eight blocks of 1024 and 64 (5 rows stay below the AMX threshold).
        Shape { h: 8256, inter: 48, rows_of: vec![5, 16, 30, 0, 120] },
        // The same in the down stage (K = 8224: 8192 + 32 for 16 rows, 3 × 2720 + 64 for 40).
        Shape { h: 176, inter: 8224, rows_of: vec![16, 40] },
    ]
}

#[test]
fn amx_expert_gemms_match_f64_and_are_thread_count_invariant() {
    if !Isa::Amx.available() {
        println!("AMX-BF16 not available here (CPU, OS tile state or permission): skipped");
        return;
    }
    for (n, s) in shapes().iter().enumerate() {
        let d = setup(s, 40 + n as u64);
        let single = Cpu::new().with_kernels(Kernels::Isa(Isa::Amx));
        let one = run(&single, s, &d);
        let (eu, ed) = errors(s, &d, &one);
        println!(
            "amx h={} i={} rows={:?}: expert_up {eu:.3e}, expert_down {ed:.3e}",
            s.h, s.inter, s.rows_of
        );
        assert!(eu <= 2e-2 && ed <= 2e-2, "shape {n}: {eu:e} {ed:e}");
        // The AVX-512 path on the same data, for comparison (same tolerance).
        let avx = run(&Cpu::new().with_kernels(Kernels::Isa(Isa::Avx512)), s, &d);
        let (au, ad) = errors(s, &d, &avx);
        let differ = avx.hidden != one.hidden || avx.out != one.out;
        println!(
            "  avx512 (fallback): expert_up {au:.3e}, expert_down {ad:.3e}; bits differ from amx: {differ}"
        );
        assert!(au <= 2e-2 && ad <= 2e-2, "shape {n} avx512: {au:e} {ad:e}");
        let par = Cpu::new().with_kernels(Kernels::Isa(Isa::Amx)).with_threads(Threads::Rayon);
        for th in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(th).build().unwrap();
            let got = pool.install(|| run(&par, s, &d));
            assert!(
                got.hidden == one.hidden && got.out == one.out,
                "shape {n}: {th} threads differ from one"
            );
        }
    }
}

#[test]
fn amx_fallback_is_explicit() {
    // Auto picks AMX exactly when it is available; otherwise the best other set runs, and
    // asking for AMX on a machine without it gives the portable path (`Cpu::isa` is None).
    let auto = Cpu::new().isa();
    if Isa::Amx.available() {
        assert_eq!(auto, Some(Isa::Amx));
    } else {
        assert_ne!(auto, Some(Isa::Amx));
        assert_eq!(Cpu::new().with_kernels(Kernels::Isa(Isa::Amx)).isa(), None);
    }
}

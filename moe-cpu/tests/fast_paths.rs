//! The blocked SIMD paths against the portable scalar path (the reference), stage by stage on
//! shapes that hit every edge of the blocking, for every instruction set this machine has; the
//! conformance suite on each of them; and bitwise determinism across thread counts.

use moe_core::backend::{ExpertRows, MlpWeights, MoeStages, PermuteBuffers};
use moe_core::conformance::{
    ElementWeights, Force, HostRunner, Rng, golden_dir, load_dir, random_case, rel_err,
    run_golden_suite,
};
use moe_core::*;
use moe_cpu::{Cpu, Isa, Kernels, Threads, Tuning};

/// The tunings worth running with `isa`: the detected one, and on AVX-512 (where the tuning
/// picks kernels) also the other vendor's, one that sends every item it can to the
/// weight-broadcast kernels and one that sends none (the packed kernels, which no vendor's
/// tuning gives items of 8 or more rows).
fn tunings(isa: Isa) -> Vec<Tuning> {
    let mut v = vec![Tuning::detect()];
    if matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx) {
        let no_wb = Tuning { wb_rows: (0, 0), dpwb_rows: (0, 0), ..Tuning::INTEL };
        for t in [Tuning::INTEL, Tuning::AMD, Tuning::ALL_WB, no_wb] {
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }
    v
}

fn backends() -> Vec<(String, Cpu)> {
    let mut v = vec![];
    for isa in Isa::all_available() {
        for tu in tunings(isa) {
            for th in [Threads::Single, Threads::Rayon] {
                v.push((
                    format!("{isa:?}/{th:?}/{tu:?}"),
                    Cpu::new().with_kernels(Kernels::Isa(isa)).with_threads(th).with_tuning(tu),
                ));
            }
        }
    }
    v
}

fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 2e-6,
        _ => 4.0 * d.epsilon(),
    }
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn elems<T: Element>(r: &mut Rng, n: usize, s: f64) -> Vec<T> {
    r.tensor(n, s).into_iter().map(T::from_f64).collect()
}

struct Mlp<T> {
    gate: Vec<T>,
    up: Vec<T>,
    down: Vec<T>,
    gb: Vec<T>,
    ub: Vec<T>,
    db: Vec<T>,
}

impl<T: Element> Mlp<T> {
    fn views(&self, bias: bool) -> MlpWeights<'_, Cpu, T> {
        MlpWeights {
            gate: Some(&self.gate),
            up: &self.up,
            down: &self.down,
            gate_bias: bias.then_some(&self.gb[..]),
            up_bias: bias.then_some(&self.ub[..]),
            down_bias: bias.then_some(&self.db[..]),
        }
    }
}

/// Every GEMM stage of `fast` against the portable path on one shape.
#[allow(clippy::too_many_arguments)]
fn stages_match<T: Element>(
    name: &str,
    fast: &Cpu,
    h: usize,
    inter: usize,
    e: usize,
    k: usize,
    tokens: usize,
    row_align: usize,
    bias: bool,
    on_input: bool,
    seed: u64,
) where
    Cpu: MoeStages<T>,
{
    let reference = Cpu::portable();
    let mut r = Rng::new(seed);
    let mut c = MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: MlpConfig { intermediate: inter, gated: true, activation: Activation::Silu, bias },
            apply_weight_on_input: on_input,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    };
    if on_input {
        c.top_k = 1;
    }
    let k = c.top_k;
    let plan = MoePlan::with_row_align(&c, tokens, row_align).unwrap();
    let x: Vec<T> = elems(&mut r, tokens * h, 1.0);
    let (si, so) = (1.0 / (h as f64).sqrt(), 1.0 / (inter as f64).sqrt());
    let m = Mlp::<T> {
        gate: elems(&mut r, e * inter * h, si),
        up: elems(&mut r, e * inter * h, si),
        down: elems(&mut r, e * h * inter, so),
        gb: elems(&mut r, e * inter, 0.1),
        ub: elems(&mut r, e * inter, 0.1),
        db: elems(&mut r, e * h, 0.1),
    };
    let w = m.views(bias);
    // Random routing, with some empty (-1) slots.
    let ids: Vec<i32> = (0..tokens * k)
        .map(|s| if s % 11 == 5 { -1 } else { ((s * 7 + r.range(0, e)) % e) as i32 })
        .collect();
    let weights: Vec<f32> = (0..tokens * k).map(|_| r.uniform() as f32).collect();
    let rows = plan.rows_capacity(tokens);
    let (mut offs, mut cur, mut sorted, mut slot_rows) =
        (vec![0i32; e + 1], vec![0i32; e], vec![0i32; rows], vec![0i32; tokens * k]);
    MoeStages::<T>::permute(
        &reference,
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
    let er = |wt: bool| ExpertRows::<Cpu> {
        expert_offsets: &offs,
        sorted_slots: &sorted,
        weights: wt.then_some(&weights[..]),
    };
    let what = format!(
        "{name} {} h={h} i={inter} e={e} k={k} t={tokens} align={row_align}",
        T::DTYPE.name()
    );
    let check = |stage: &str, a: &[T], b: &[T]| {
        let err = rel_err(&f64s(a), &f64s(b));
        assert!(err <= tol(T::DTYPE), "{what} {stage}: rel err {err:e}");
    };
    // Padding rows are never written: start both from the same poison.
    let poison = T::from_f32(7.0);
    let mut h_ref = vec![poison; rows * inter];
    let mut h_fast = h_ref.clone();
    reference.expert_up(&plan, tokens, &x, &w, er(on_input), &mut h_ref).unwrap();
    fast.expert_up(&plan, tokens, &x, &w, er(on_input), &mut h_fast).unwrap();
    check("expert_up", &h_fast, &h_ref);
    let mut o_ref = vec![poison; rows * h];
    let mut o_fast = o_ref.clone();
    reference.expert_down(&plan, tokens, &h_ref, &w, er(!on_input), &mut o_ref).unwrap();
    fast.expert_down(&plan, tokens, &h_ref, &w, er(!on_input), &mut o_fast).unwrap();
    check("expert_down", &o_fast, &o_ref);
    let (mut y_ref, mut y_fast) = (vec![poison; tokens * h], vec![poison; tokens * h]);
    reference.combine(&plan, tokens, h, &o_ref, &slot_rows, 1.5, &mut y_ref).unwrap();
    fast.combine(&plan, tokens, h, &o_ref, &slot_rows, 1.5, &mut y_fast).unwrap();
    assert_eq!(f64s(&y_fast), f64s(&y_ref), "{what} combine: same bits as the portable path");
    // Router logits (f32 out), dense MLP up and linear (with accumulate and row scale).
    let router: Vec<T> = elems(&mut r, e * h, 1.0 / (h as f64).sqrt());
    let rb: Vec<T> = elems(&mut r, e, 0.2);
    let (mut l_ref, mut l_fast) = (vec![0f32; tokens * e], vec![0f32; tokens * e]);
    reference.router_logits(tokens, h, e, &x, &router, Some(&rb), &mut l_ref).unwrap();
    fast.router_logits(tokens, h, e, &x, &router, Some(&rb), &mut l_fast).unwrap();
    let err = rel_err(&f64s(&l_fast), &f64s(&l_ref));
    assert!(err <= 2e-6, "{what} router_logits: {err:e}");
    let one = MlpWeights::<Cpu, T> {
        gate: Some(&m.gate[..inter * h]),
        up: &m.up[..inter * h],
        down: &m.down[..h * inter],
        gate_bias: bias.then_some(&m.gb[..inter]),
        up_bias: bias.then_some(&m.ub[..inter]),
        down_bias: None,
    };
    let mlp = c.expert.mlp;
    let (mut s_ref, mut s_fast) = (vec![poison; tokens * inter], vec![poison; tokens * inter]);
    reference.mlp_up(&mlp, tokens, h, inter, &x, &one, &mut s_ref).unwrap();
    fast.mlp_up(&mlp, tokens, h, inter, &x, &one, &mut s_fast).unwrap();
    check("mlp_up", &s_fast, &s_ref);
    let scale: Vec<f32> = (0..tokens).map(|_| r.uniform() as f32).collect();
    let bias_h = bias.then_some(&m.db[..h]);
    for acc in [false, true] {
        let (mut a, mut b) = (y_ref.clone(), y_ref.clone());
        reference
            .linear(tokens, inter, h, &s_ref, one.down, bias_h, Some(&scale), 0.5, acc, &mut a)
            .unwrap();
        fast.linear(tokens, inter, h, &s_ref, one.down, bias_h, Some(&scale), 0.5, acc, &mut b)
            .unwrap();
        check("linear", &b, &a);
    }
}

#[test]
fn simd_paths_match_the_portable_path() {
    // Edges: K below, at and above the K block (1024) and not a multiple of any vector width;
    // N not a multiple of the 6-column microtile or of the 96-column block; experts with more
    // rows than a 128-row block; padded expert blocks; weights on input or output.
    let shapes: &[(usize, usize, usize, usize, usize, usize, bool, bool)] = &[
        (1, 1, 1, 1, 1, 1, false, false),
        (17, 5, 3, 2, 7, 1, true, false),
        (64, 96, 4, 2, 40, 4, false, true),
        (300, 97, 2, 2, 150, 1, true, false),
        (1100, 200, 4, 2, 33, 3, true, false),
        (130, 1030, 2, 1, 260, 1, false, false),
        // One or two rows per expert (the streaming decode kernels) with K tails of every
        // length class (1100 = 8 * 128 + 76, 200 = 128 + 72).
        (1100, 200, 8, 1, 3, 1, true, false),
        (1100, 200, 8, 2, 7, 1, false, false),
        // The same with N not a multiple of 4 (203 = 192 + 11, 1101 = 5 * 192 + 141): the
        // decode kernel's last weight rows of an item one at a time after its groups of 4
        // (`Tuning::seq_streams`), and K tails of 1101 = 8 * 128 + 77 and 203 = 128 + 75.
        (1101, 203, 8, 2, 7, 1, true, false),
        // Over 96 rows per expert with odd K (the bf16 broadcast kernel's half pair) and a K
        // block boundary (301 = 256 + 45).
        (301, 97, 2, 2, 110, 1, true, false),
        // The weight-broadcast kernel: 2100 > 2048 (two row blocks of K at 32 rows or fewer),
        // N = 13 (a full 12-column stripe and one column, copied) and 2100 = 175 stripes over
        // 11 column blocks; about 16, 17, 33 and 48 rows per expert (16-row remainders).
        (2100, 13, 2, 1, 32, 1, true, false),
        (2100, 13, 2, 1, 66, 1, false, false),
        (520, 40, 3, 1, 51, 1, false, false),
        (300, 24, 3, 1, 144, 1, true, false),
        // K a multiple of 16 at one or two rows per expert: the in-place packed kernel (AMD)
        // or the whole-K streaming one (Intel's direct_rows).
        (256, 48, 8, 1, 9, 1, false, false),
        // f32 outputs over 4 MiB: the up (about 1090 routed rows of 1024) and the down
        // projection's (as many rows of 1024) epilogues write with non-temporal stores
        // (`act::STREAM_MIN_BYTES`).
        (16, 1024, 4, 1, 1200, 1, true, false),
        (1024, 16, 4, 1, 1200, 1, true, false),
    ];
    for (name, cpu) in backends() {
        for (i, &(h, inter, e, k, t, al, bias, oi)) in shapes.iter().enumerate() {
            let seed = 100 + i as u64;
            stages_match::<f32>(&name, &cpu, h, inter, e, k, t, al, bias, oi, seed);
            stages_match::<half::bf16>(&name, &cpu, h, inter, e, k, t, al, bias, oi, seed);
            stages_match::<half::f16>(&name, &cpu, h, inter, e, k, t, al, bias, oi, seed);
        }
    }
}

#[test]
fn conformance_golden_every_isa_and_threading() {
    for (name, cpu) in backends() {
        match run_golden_suite(&HostRunner(cpu)) {
            Ok(n) => println!("{name}: {n} golden checks passed"),
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

fn layer_bits<T: Element>(cpu: &Cpu, case: &moe_core::conformance::Case, threads: usize) -> Vec<u8>
where
    Cpu: MoeStages<T>,
{
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let c = &case.config;
        let plan = MoePlan::new(c, case.tokens).unwrap();
        let ew = ElementWeights::<T>::from_host(&case.weights);
        let x: Vec<T> = case.x.iter().map(|&v| T::from_f64(v)).collect();
        let mut out = vec![T::from_f32(f32::NAN); case.tokens * c.hidden];
        let mut ws = vec![0u8; plan.workspace_bytes(T::DTYPE).unwrap()];
        forward(
            cpu,
            &plan,
            &ew.views::<Cpu>(),
            case.tokens,
            &x[..],
            &mut out[..],
            &mut ws[..],
            &SingleRank,
        )
        .unwrap();
        bytemuck::cast_slice::<T, u8>(&out).to_vec()
    })
}

fn same_bits_for<T: Element>(case: &moe_core::conformance::Case)
where
    Cpu: MoeStages<T>,
{
    for isa in Isa::all_available() {
        for tu in tunings(isa) {
            let par = Cpu::parallel().with_kernels(Kernels::Isa(isa)).with_tuning(tu);
            let single = Cpu::new().with_kernels(Kernels::Isa(isa)).with_tuning(tu);
            let one = layer_bits::<T>(&single, case, 1);
            for threads in [1, 2, 3] {
                let got = layer_bits::<T>(&par, case, threads);
                assert!(
                    got == one,
                    "{} {:?} {:?} {}: {threads} threads differ from one",
                    case.name,
                    isa,
                    tu,
                    T::DTYPE.name()
                );
            }
        }
    }
}

#[test]
fn whole_layer_is_bitwise_identical_across_thread_counts() {
    let mut cases = load_dir(&golden_dir()).unwrap();
    // A bigger case: several row blocks per expert and column blocks per matrix, a shared
    // expert (dense MLP and accumulating linear) and grouped sigmoid routing.
    let mut big =
        random_case(77, Force { tokens: Some(300), experts: Some(8), ..Force::default() });
    big.config = MoeConfig {
        hidden: 200,
        experts: 8,
        top_k: 2,
        router: RouterConfig {
            scoring: Scoring::Sigmoid,
            groups: Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Top2Sum }),
            ..RouterConfig::default()
        },
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: 130,
                gated: true,
                activation: Activation::Silu,
                bias: true,
            },
            apply_weight_on_input: false,
        },
        shared: Some(SharedConfig {
            mlp: MlpConfig {
                intermediate: 100,
                gated: true,
                activation: Activation::Silu,
                bias: false,
            },
            gate: SharedGate::SigmoidLinear,
        }),
        latent: None,
        parallel: ParallelConfig::default(),
    };
    let mut r = Rng::new(5);
    big.weights = moe_core::conformance::random_weights(&big.config, &mut r);
    big.x = r.tensor(big.tokens * big.config.hidden, 1.0);
    big.name = "random_big".into();
    cases.push(big);
    for case in &cases {
        same_bits_for::<f32>(case);
        same_bits_for::<half::bf16>(case);
        same_bits_for::<half::f16>(case);
    }
}

/// The bf16 decode kernel reading 1, 2 or 4 weight rows at a time (`Tuning::seq_streams`)
/// gives the same bits: items of one and two rows, N not a multiple of 4, K tails.
#[test]
fn decode_streams_give_the_same_bits() {
    if !Isa::Avx512Bf16.available() {
        println!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    for tokens in [1, 3, 7] {
        let mut case =
            random_case(91, Force { tokens: Some(tokens), experts: Some(8), ..Force::default() });
        case.config = moe_core::conformance::edge_config(1101, 8, 2, 203);
        let mut r = Rng::new(9 + tokens as u64);
        case.weights = moe_core::conformance::random_weights(&case.config, &mut r);
        case.x = r.tensor(tokens * case.config.hidden, 1.0);
        let run = |seq_streams: usize| {
            let tu = Tuning { seq_streams, ..Tuning::INTEL };
            let cpu = Cpu::new().with_kernels(Kernels::Isa(Isa::Avx512Bf16)).with_tuning(tu);
            layer_bits::<half::bf16>(&cpu, &case, 1)
        };
        let one = run(1);
        assert!(one.chunks(2).any(|b| b != [0, 0]), "T={tokens}: the layer's output is all zeros");
        for streams in [2, 4] {
            assert!(run(streams) == one, "T={tokens}: {streams} streams differ from 1");
        }
    }
}

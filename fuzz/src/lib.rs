//! Fuzz harness bodies for moe-kernels: bytes in, a configuration, a plan, a whole CPU forward
//! out. Every input must either succeed or return a typed error; a panic is a bug.
//!
//! The same functions run under libFuzzer (`cargo fuzz run <target>`) and, over random bytes,
//! in the ordinary test suite (`moe-cpu/tests/fuzz_smoke.rs` includes this file).

use moe_core::conformance::ElementWeights;
use moe_core::reference::{HostLatent, HostMlp, HostShared, HostWeights};
use moe_core::*;

/// Reads fuzzer bytes as small integers and floats; zeros once exhausted.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    /// Next byte.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    /// True one time in `n` (on uniform bytes).
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }
    /// Next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A size in `0..=max`, biased to small values.
    pub fn size(&mut self, max: usize) -> usize {
        match self.u8() {
            b @ 0..=239 => b as usize % (max + 1),
            240..=247 => max,
            _ => self.u32() as usize % (max + 1),
        }
    }
    /// A dimension that may be anything, including huge.
    pub fn wild(&mut self) -> usize {
        match self.u8() % 8 {
            0 => 0,
            1 => usize::MAX >> (self.u8() % 64),
            2 => self.u32() as usize,
            _ => self.u8() as usize % 33,
        }
    }
    /// A float: usually moderate, sometimes NaN, infinite, huge, tiny or denormal.
    pub fn float(&mut self) -> f64 {
        match self.u8() % 16 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 1e30 * (self.u8() as f64 - 128.0),
            4 => 1e-42 * self.u8() as f64,
            5 => 0.0,
            _ => (self.u8() as f64 - 128.0) / 64.0,
        }
    }
    /// `n` floats, mostly moderate (a fraction `wild` of them from [`Bytes::float`]).
    pub fn tensor(&mut self, n: usize, wild: bool) -> Vec<f64> {
        let seed = self.u32() as u64;
        let mut r = moe_core::conformance::Rng::new(seed);
        (0..n)
            .map(|_| if wild && self.u8() < 8 { self.float() } else { r.normal() * 0.5 })
            .collect()
    }
}

fn activation(b: &mut Bytes) -> Activation {
    match b.u8() % 5 {
        0 => Activation::Silu,
        1 => Activation::Gelu,
        2 => Activation::GeluTanh,
        3 => Activation::Relu2,
        _ => Activation::SwigluOai { alpha: b.float(), limit: b.float() },
    }
}

fn mlp(b: &mut Bytes, inter: usize) -> MlpConfig {
    MlpConfig {
        intermediate: inter,
        gated: b.one_in(2),
        activation: activation(b),
        bias: b.one_in(3),
    }
}

fn custom(w: &mut [f32]) {
    w.iter_mut().for_each(|v| *v = v.abs().sqrt());
}

/// A configuration from bytes, with dimensions from `dim` (small or wild).
pub fn config(b: &mut Bytes, dim: &mut dyn FnMut(&mut Bytes) -> usize) -> MoeConfig {
    let hidden = dim(b);
    let experts = dim(b);
    let top_k = dim(b);
    let inter = dim(b);
    let groups = b.one_in(3).then(|| GroupLimit {
        n_group: dim(b),
        topk_group: dim(b),
        score: if b.one_in(2) { GroupScore::Top2Sum } else { GroupScore::Max },
    });
    let reduce = match b.u8() % 6 {
        0 => TopkReduce::None,
        1 => TopkReduce::Sum { eps: b.float() },
        2 => TopkReduce::ClampMin { min: b.float() },
        3 => TopkReduce::PNorm { p: b.float() },
        4 => TopkReduce::Custom(CustomReduce { name: "sqrt-abs", func: custom }),
        _ => TopkReduce::NOAUX_TC,
    };
    let shared_inter = dim(b);
    let latent_size = dim(b);
    MoeConfig {
        hidden,
        experts,
        top_k,
        router: RouterConfig {
            scoring: [Scoring::Softmax, Scoring::Sigmoid, Scoring::None][b.u8() as usize % 3],
            bias: b.one_in(3),
            selection_bias: b.one_in(3),
            groups,
            weights: [
                WeightSource::Scores,
                WeightSource::SoftmaxTopkLogits,
                WeightSource::SigmoidTopkLogits,
            ][b.u8() as usize % 3],
            reduce,
            scale: RoutedScale {
                factor: if b.one_in(2) { 1.0 } else { b.float() },
                placement: if b.one_in(2) {
                    ScalePlacement::OnOutput
                } else {
                    ScalePlacement::OnWeights
                },
            },
        },
        expert: ExpertConfig { mlp: mlp(b, inter), apply_weight_on_input: b.one_in(4) },
        shared: b.one_in(3).then(|| SharedConfig {
            mlp: mlp(b, shared_inter),
            gate: if b.one_in(2) { SharedGate::None } else { SharedGate::SigmoidLinear },
        }),
        latent: b.one_in(4).then(|| LatentConfig { size: latent_size, bias: b.one_in(2) }),
        parallel: ParallelConfig {
            tp_size: 1 + b.u8() as usize % 2,
            tp_rank: b.u8() as usize % 2,
            experts: b
                .one_in(5)
                .then(|| ExpertPlacement { local_experts: dim(b), include_shared: b.one_in(2) }),
        },
    }
}

/// Target `validate`: any configuration validates or returns a typed error.
pub fn fuzz_validate(data: &[u8]) {
    let mut b = Bytes(data);
    let c = config(&mut b, &mut |b| b.wild());
    let _ = c.validate();
}

/// Target `plan`: plans (and their workspace sizes) for any configuration and token count.
pub fn fuzz_plan(data: &[u8]) {
    let mut b = Bytes(data);
    let c = config(&mut b, &mut |b| b.wild());
    let tokens = b.wild();
    let align = b.wild();
    if let Ok(p) = MoePlan::with_row_align(&c, tokens, align) {
        for d in DType::ALL {
            let l = p.layout(d).expect("a valid plan has a layout in every dtype");
            assert!(l.total_bytes >= l.expert_out.offset);
        }
        let _ = p.rows_capacity(tokens);
    }
}

fn maybe<T>(b: &mut Bytes, present: bool, f: impl FnOnce(&mut Bytes) -> T) -> Option<T> {
    // Occasionally drop a tensor the config needs, or add one it does not use.
    let flip = b.u8() == 255;
    (present != flip).then(|| f(b))
}

fn host_mlp(b: &mut Bytes, m: &MlpConfig, n: usize, width: usize) -> HostMlp {
    let i = m.intermediate;
    HostMlp {
        gate: maybe(b, m.gated, |b| b.tensor(n * i * width, true)),
        up: b.tensor(n * i * width, true),
        down: b.tensor(n * width * i, true),
        gate_bias: maybe(b, m.bias && m.gated, |b| b.tensor(n * i, true)),
        up_bias: maybe(b, m.bias, |b| b.tensor(n * i, true)),
        down_bias: maybe(b, m.bias, |b| b.tensor(n * width, true)),
    }
}

/// Bend a random configuration towards a valid one (most forward inputs should get past
/// validation; the rest test it).
fn repair(c: &mut MoeConfig) {
    c.top_k = 1 + (c.top_k - 1) % c.experts;
    if let Some(g) = &mut c.router.groups {
        g.n_group = (1..=c.experts)
            .rev()
            .find(|n| c.experts.is_multiple_of(*n) && *n <= g.n_group.max(1))
            .unwrap_or(1);
        let per = c.experts / g.n_group;
        g.topk_group = g.topk_group.clamp(c.top_k.div_ceil(per), g.n_group);
        if per < 2 {
            g.score = GroupScore::Max;
        }
    }
    let fix = |v: &mut f64, lo: f64| {
        if !v.is_finite() || *v <= lo {
            *v = lo + 1.0;
        }
    };
    match &mut c.router.reduce {
        TopkReduce::Sum { eps } => fix(eps, 0.0),
        TopkReduce::ClampMin { min } => fix(min, 0.0),
        TopkReduce::PNorm { p } => fix(p, 0.0),
        _ => {}
    }
    if !c.router.scale.factor.is_finite() {
        c.router.scale.factor = 1.0;
    }
    for m in core::iter::once(&mut c.expert.mlp).chain(c.shared.as_mut().map(|s| &mut s.mlp)) {
        if let Activation::SwigluOai { alpha, limit } = &mut m.activation {
            fix(alpha, -10.0);
            fix(limit, 0.0);
            m.gated = true;
        }
        m.intermediate = m.intermediate.max(1) * c.parallel.tp_size;
    }
    if let Some(e) = &mut c.parallel.experts {
        e.local_experts = 1 + (e.local_experts - 1) % c.experts;
    }
    c.parallel.tp_rank %= c.parallel.tp_size;
}

/// Target `forward`: a whole CPU forward on small fuzzer-chosen shapes, configurations,
/// values (NaN, infinities, huge, denormal) and buffer lengths, in f32, bf16 and f16. Returns
/// how many of the three forwards succeeded (for coverage checks).
pub fn fuzz_forward(data: &[u8]) -> usize {
    let mut b = Bytes(data);
    let mut c = config(&mut b, &mut |b| 1 + b.size(11));
    if b.u8() < 230 {
        repair(&mut c);
    }
    let tokens = b.size(9);
    if c.validate().is_err() {
        return 0;
    }
    // Shapes as this rank holds them (the intermediates split over tp_size ranks).
    let cc = c;
    let local =
        |m: &MlpConfig| MlpConfig { intermediate: m.local_intermediate(c.parallel.tp_size), ..*m };
    let le = cc.local_experts();
    let tp = c.parallel.tp_size;
    let d = cc.expert_width();
    let w = HostWeights {
        router: b.tensor(c.experts * c.hidden, true),
        router_bias: maybe(&mut b, c.router.bias, |_| vec![0.1; c.experts]),
        selection_bias: maybe(&mut b, c.router.selection_bias, |_| vec![0.05; c.experts]),
        experts: host_mlp(&mut b, &local(&cc.expert.mlp), le, d),
        shared: cc.shared.map(|s| HostShared {
            mlp: host_mlp(&mut b, &local(&s.mlp), 1, c.hidden),
            gate: (s.gate == SharedGate::SigmoidLinear).then(|| b.tensor(c.hidden, true)),
        }),
        latent: cc.latent.map(|l| HostLatent {
            fc1: b.tensor(l.size * c.hidden, true),
            fc2: b.tensor(c.hidden * l.size, true),
            fc1_bias: l.bias.then(|| b.tensor(l.size, true)),
            fc2_bias: l.bias.then(|| b.tensor(c.hidden, true)),
        }),
        expert_map: cc
            .parallel
            .experts
            .map(|_| (0..c.experts).map(|_| b.u8() as i32 % (le as i32 + 2) - 1).collect()),
    };
    // With two tensor-parallel ranks, the full forward meets a one-rank collective (a typed
    // mismatch) and the partial path runs this rank's shard.
    let x = b.tensor(tokens * c.hidden, true);
    let extra_tokens = b.size(2);
    let ws_cut = b.size(3);
    DType::ALL
        .iter()
        .filter(|d| match d {
            DType::F32 => run::<f32>(&c, &w, &x, tokens, extra_tokens, ws_cut, tp),
            DType::BF16 => run::<half::bf16>(&c, &w, &x, tokens, extra_tokens, ws_cut, tp),
            DType::F16 => run::<half::f16>(&c, &w, &x, tokens, extra_tokens, ws_cut, tp),
        })
        .count()
}

fn run<T: Element>(
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    tokens: usize,
    extra: usize,
    ws_cut: usize,
    tp: usize,
) -> bool
where
    moe_cpu::Cpu: MoeStages<T>,
{
    let Ok(plan) = MoePlan::new(c, tokens) else { return false };
    let Ok(bytes) = plan.workspace_bytes(T::DTYPE) else { return false };
    let ew = ElementWeights::<T>::from_host(w);
    let xe: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let mut out = vec![T::from_f32(f32::NAN); tokens * c.hidden + extra];
    let mut ws = vec![0xEEu8; bytes.saturating_sub(ws_cut * 97)];
    let cpu = moe_cpu::Cpu::new();
    let weights = ew.views::<moe_cpu::Cpu>();
    let full =
        forward(&cpu, &plan, &weights, tokens, &xe[..], &mut out[..], &mut ws[..], &SingleRank);
    if tp == 1 {
        full.is_ok()
    } else {
        assert!(matches!(full, Err(MoeError::CollectiveMismatch { .. })));
        forward_partial(&cpu, &plan, &weights, tokens, &xe[..], &mut out[..], &mut ws[..]).is_ok()
    }
}

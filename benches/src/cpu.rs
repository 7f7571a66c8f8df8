//! Shapes, weights and runners (CPU backend).

use moe_core::backend::{ExpertRows, PermuteBuffers, split_workspace};
use moe_core::*;
use moe_cpu::{Isa, Tuning};

/// One canonical shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Name used in bench ids (says when the shape is scaled down).
    pub name: &'static str,
    /// The layer.
    pub config: MoeConfig,
}

/// The points a CPU bench runs, read from the environment: `MOE_BENCH_SHAPES` (prefixes of
/// canonical shape names), `MOE_BENCH_T` and `MOE_BENCH_THREADS` (positive counts),
/// `MOE_BENCH_DTYPES` (`f32`, `bf16`, `f16`), each comma-separated, the given defaults where
/// unset or empty. A value that names nothing (a prefix of no shape, a count that does not
/// parse, an unknown dtype) is an error that says which, never skipped or read as something else.
#[derive(Clone, Debug)]
pub struct Selection {
    /// The canonical shapes selected, in [`canonical`]'s order.
    pub shapes: Vec<Shape>,
    /// Token counts.
    pub tokens: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Element types, by name.
    pub dtypes: Vec<String>,
}

impl Selection {
    /// The selection in the environment, with these defaults for the unset variables (all
    /// shapes when `MOE_BENCH_SHAPES` is unset).
    pub fn from_env(tokens: &[usize], threads: &[usize], dtypes: &[&str]) -> Result<Self, String> {
        Self::from_vars(|v| std::env::var(v).ok(), tokens, threads, dtypes)
    }

    /// [`Selection::from_env`] with the variables read through `var`.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        tokens: &[usize],
        threads: &[usize],
        dtypes: &[&str],
    ) -> Result<Self, String> {
        // An empty variable counts as unset, as in `torch_cpu.py`.
        let list =
            |name: &str| var(name).filter(|v| !v.is_empty()).map(|v| crate::split_list(&v, ','));
        let all = canonical();
        let shapes = match list("MOE_BENCH_SHAPES") {
            None => all,
            Some(prefixes) => {
                if let Some(p) =
                    prefixes.iter().find(|p| !all.iter().any(|s| s.name.starts_with(p.as_str())))
                {
                    return Err(format!("MOE_BENCH_SHAPES: no shape starts with {p:?}"));
                }
                all.into_iter()
                    .filter(|s| prefixes.iter().any(|p| s.name.starts_with(p.as_str())))
                    .collect()
            }
        };
        let counts = |var: &str, d: &[usize]| -> Result<Vec<usize>, String> {
            match list(var) {
                None => Ok(d.to_vec()),
                Some(v) => v
                    .iter()
                    .map(|s| match s.parse() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => Err(format!("{var}: {s:?} is not a positive count")),
                    })
                    .collect(),
            }
        };
        let dtypes = list("MOE_BENCH_DTYPES")
            .unwrap_or_else(|| dtypes.iter().map(|d| d.to_string()).collect());
        if let Some(d) = dtypes.iter().find(|d| !["f32", "bf16", "f16"].contains(&d.as_str())) {
            return Err(format!("MOE_BENCH_DTYPES: unknown {d:?} (f32, bf16, f16)"));
        }
        Ok(Selection {
            shapes,
            tokens: counts("MOE_BENCH_T", tokens)?,
            threads: counts("MOE_BENCH_THREADS", threads)?,
            dtypes,
        })
    }
}

fn mlp(i: usize, act: Activation, bias: bool) -> MlpConfig {
    MlpConfig { intermediate: i, gated: true, activation: act, bias }
}

fn base(h: usize, e: usize, k: usize, i: usize) -> MoeConfig {
    MoeConfig {
        hidden: h,
        experts: e,
        top_k: k,
        router: RouterConfig::default(),
        expert: ExpertConfig { mlp: mlp(i, Activation::Silu, false), apply_weight_on_input: false },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    }
}

/// The canonical shapes. Where the f32 weights of all experts would not fit next to the
/// PyTorch baseline in this machine's 24 GiB, the expert count is scaled down (the name says
/// so); widths, intermediate sizes and top-k are the models'.
pub fn canonical() -> Vec<Shape> {
    let qwen = base(2048, 128, 8, 768);
    let mut gpt = base(2880, 32, 4, 2880);
    gpt.router.bias = true;
    gpt.router.weights = WeightSource::SoftmaxTopkLogits;
    gpt.router.reduce = TopkReduce::None;
    gpt.expert.mlp = mlp(2880, Activation::SwigluOai { alpha: 1.702, limit: 7.0 }, true);
    let mut mixtral = base(4096, 8, 2, 14336);
    mixtral.router.weights = WeightSource::SoftmaxTopkLogits;
    mixtral.router.reduce = TopkReduce::None;
    let mut ds = base(7168, 32, 8, 2048);
    ds.router.scoring = Scoring::Sigmoid;
    ds.router.selection_bias = true;
    ds.router.groups = Some(GroupLimit { n_group: 8, topk_group: 4, score: GroupScore::Top2Sum });
    ds.router.reduce = TopkReduce::Sum { eps: 1e-20 };
    ds.router.scale = RoutedScale { factor: 2.5, placement: ScalePlacement::OnOutput };
    ds.shared =
        Some(SharedConfig { mlp: mlp(2048, Activation::Silu, false), gate: SharedGate::None });
    vec![
        Shape { name: "qwen3_30b_a3b", config: qwen },
        Shape { name: "gpt_oss_120b_e32of128", config: gpt },
        Shape { name: "mixtral_8x7b", config: mixtral },
        Shape { name: "deepseek_v3_e32of256", config: ds },
    ]
}

/// A small fast generator (xorshift64*), for weights.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
    /// `n` values uniform in `[-s, s)`, in element type `T`.
    pub fn tensor<T: Element>(&mut self, n: usize, s: f32) -> Vec<T> {
        (0..n).map(|_| T::from_f32(s * self.next_f32())).collect()
    }

    /// `n` values uniform in `[-s, s)`, filled on the rayon pool: one seed is drawn from this
    /// generator, and chunk `c` of [`PAR_CHUNK`] values comes from its own generator seeded by
    /// that seed and `c`, so the values do not depend on the thread count. (The expert weights
    /// are billions of values; drawn serially they took a quarter of the quick bench.)
    pub fn tensor_par<T: Element>(&mut self, n: usize, s: f32) -> Vec<T> {
        use rayon::prelude::*;
        let seed = (self.next_f32().to_bits() as u64) << 32 | self.next_f32().to_bits() as u64;
        let mut v = vec![T::default(); n];
        v.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, dst)| {
            let mut r = Rng::new(seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for d in dst {
                *d = T::from_f32(s * r.next_f32());
            }
        });
        v
    }
}

/// Values per independently seeded chunk of [`Rng::tensor_par`].
pub const PAR_CHUNK: usize = 1 << 16;

/// An MLP's weights in element type `T`.
pub struct Mlp<T> {
    /// `[n, I, D]`.
    pub gate: Option<Vec<T>>,
    /// `[n, I, D]`.
    pub up: Vec<T>,
    /// `[n, D, I]`.
    pub down: Vec<T>,
    /// `[n, I]`.
    pub gate_bias: Option<Vec<T>>,
    /// `[n, I]`.
    pub up_bias: Option<Vec<T>>,
    /// `[n, D]`.
    pub down_bias: Option<Vec<T>>,
}

impl<T: Element> Mlp<T> {
    fn random(r: &mut Rng, m: &MlpConfig, n: usize, width: usize) -> Self {
        let i = m.intermediate;
        let (si, so) = (1.0 / (width as f32).sqrt(), 1.0 / (i as f32).sqrt());
        Mlp {
            gate: m.gated.then(|| r.tensor_par(n * i * width, si)),
            up: r.tensor_par(n * i * width, si),
            down: r.tensor_par(n * width * i, so),
            gate_bias: (m.bias && m.gated).then(|| r.tensor(n * i, 0.1)),
            up_bias: m.bias.then(|| r.tensor(n * i, 0.1)),
            down_bias: m.bias.then(|| r.tensor(n * width, 0.1)),
        }
    }

    /// Views over these weights.
    pub fn views(&self) -> MlpWeights<'_, moe_cpu::Cpu, T> {
        MlpWeights {
            gate: self.gate.as_deref(),
            up: &self.up,
            down: &self.down,
            gate_bias: self.gate_bias.as_deref(),
            up_bias: self.up_bias.as_deref(),
            down_bias: self.down_bias.as_deref(),
        }
    }
}

/// A layer's weights in element type `T` (no latent, no expert map).
pub struct Weights<T> {
    /// `[E, H]`.
    pub router: Vec<T>,
    /// `[E]`.
    pub router_bias: Option<Vec<T>>,
    /// `[E]`.
    pub selection_bias: Option<Vec<f32>>,
    /// Routed experts.
    pub experts: Mlp<T>,
    /// Shared expert.
    pub shared: Option<Mlp<T>>,
}

impl<T: Element> Weights<T> {
    /// Random weights for `c` (scaled like a trained layer: unit-variance activations).
    pub fn random(c: &MoeConfig, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let (h, e) = (c.hidden, c.experts);
        Weights {
            router: r.tensor(e * h, 1.0 / (h as f32).sqrt()),
            router_bias: c.router.bias.then(|| r.tensor(e, 0.2)),
            selection_bias: c.router.selection_bias.then(|| r.tensor(e, 0.1)),
            experts: Mlp::random(&mut r, &c.expert.mlp, c.experts, h),
            shared: c.shared.map(|s| Mlp::random(&mut r, &s.mlp, 1, h)),
        }
    }

    /// Views for the CPU backend.
    pub fn views(&self) -> MoeWeights<'_, moe_cpu::Cpu, T> {
        MoeWeights {
            router: &self.router,
            router_bias: self.router_bias.as_deref(),
            selection_bias: self.selection_bias.as_deref(),
            experts: self.experts.views(),
            shared: self.shared.as_ref().map(|m| SharedWeights { mlp: m.views(), gate: None }),
            latent: None,
            expert_map: None,
        }
    }
}

/// Weight elements of one routed expert's matrices (gate/up and down, not biases).
pub fn expert_weights(c: &MoeConfig) -> usize {
    let mats = if c.expert.mlp.gated { 3 } else { 2 };
    mats * c.hidden * c.expert.mlp.intermediate
}

/// FLOPs of the routed expert GEMMs for `tokens` tokens (every slot routed): GEMM1 (gate and
/// up) plus GEMM2: two per weight element and routed row.
pub fn expert_flops(c: &MoeConfig, tokens: usize) -> f64 {
    2.0 * (tokens * c.top_k) as f64 * expert_weights(c) as f64
}

/// Bytes of routed expert weights (gate/up and down matrices, not biases) that `active` experts
/// hold in element type `T`: what the expert GEMMs must read from memory at least once per
/// forward when the weights do not fit in cache.
pub fn expert_weight_bytes<T: Element>(c: &MoeConfig, active: usize) -> f64 {
    active as f64 * (expert_weights(c) * size_of::<T>()) as f64
}

/// The CSV columns of the CPU reports (the criterion bench and the `report` example), which
/// `benches/compare.py` reads: the point, the layer and expert-GEMM times, then
/// [`GemmFigures::csv`].
pub const CSV_HEADER: &str = "shape,dtype,tokens,threads,layer_ms,gemm_ms,gemm_gflops,gemm_pct_peak,gemm_pct_dpbf16_peak,gemm_weight_gbs,read_bw_gbs,gemm_pct_floor";

/// An expert-GEMM time set against this machine's ceilings ([`crate::peak::Peaks`]).
#[derive(Clone, Copy, Debug)]
pub struct GemmFigures {
    /// GFLOP/s.
    pub gflops: f64,
    /// % of the FMA peak.
    pub pct_fma: f64,
    /// % of the `vdpbf16ps` peak, for bf16 where the CPU has one.
    pub pct_dpbf16: Option<f64>,
    /// GB/s at which the active experts' weights ([`expert_weight_bytes`]) were read.
    pub weight_gbs: f64,
    /// % of the hardware floor ([`crate::peak::Peaks::floor_ms`]).
    pub pct_floor: f64,
}

impl GemmFigures {
    /// The figures of expert GEMMs that took `gemm_ms` for the layer's last routing (the
    /// active experts are read from its workspace).
    pub fn new<T: Element>(
        layer: &mut Layer<T>,
        pk: &crate::peak::Peaks,
        gemm_ms: f64,
    ) -> Result<Self> {
        let bf16 = T::DTYPE == DType::BF16;
        let flops = expert_flops(&layer.config, layer.tokens);
        let active = layer.active_experts()?;
        let bytes = expert_weight_bytes::<T>(&layer.config, active);
        let gflops = flops / gemm_ms / 1e6;
        Ok(GemmFigures {
            gflops,
            pct_fma: 100.0 * gflops / pk.fma,
            pct_dpbf16: pk.dpbf16.filter(|_| bf16).map(|p| 100.0 * gflops / p),
            weight_gbs: bytes / gemm_ms / 1e6,
            pct_floor: 100.0 * pk.floor_ms(flops, bytes, bf16) / gemm_ms,
        })
    }

    /// The columns of [`CSV_HEADER`] from `gemm_gflops` on (`read_bw_gbs` from `pk`).
    pub fn csv(&self, pk: &crate::peak::Peaks) -> String {
        let dp = self.pct_dpbf16.map_or(String::new(), |p| format!("{p:.3}"));
        format!(
            "{:.3},{:.3},{dp},{:.3},{:.3},{:.3}",
            self.gflops, self.pct_fma, self.weight_gbs, pk.read_gbs, self.pct_floor
        )
    }
}

/// A layer ready to run: plan, weights, input, output, workspace.
pub struct Layer<T> {
    /// Configuration.
    pub config: MoeConfig,
    /// Plan for `tokens`.
    pub plan: MoePlan,
    /// Weights.
    pub weights: Weights<T>,
    /// Tokens per forward.
    pub tokens: usize,
    /// `[T, H]` input.
    pub x: Vec<T>,
    /// `[T, H]` output.
    pub out: Vec<T>,
    /// Workspace.
    pub ws: Vec<u8>,
}

impl<T: Element> Layer<T> {
    /// A layer of shape `c` on `tokens` random tokens.
    pub fn new(c: &MoeConfig, tokens: usize, seed: u64) -> Result<Self> {
        let plan = MoePlan::new(c, tokens)?;
        let ws = vec![0u8; plan.workspace_bytes(T::DTYPE)?];
        let weights = Weights::random(c, seed);
        let x = Rng::new(seed ^ 0xA5A5).tensor(tokens * c.hidden, 1.0);
        Ok(Layer {
            config: *c,
            plan,
            weights,
            tokens,
            x,
            out: vec![T::default(); tokens * c.hidden],
            ws,
        })
    }

    /// Same weights, another token count.
    pub fn retoken(&mut self, tokens: usize, seed: u64) -> Result<()> {
        self.plan = MoePlan::new(&self.config, tokens)?;
        self.ws = vec![0u8; self.plan.workspace_bytes(T::DTYPE)?];
        self.x = Rng::new(seed ^ 0xA5A5).tensor(tokens * self.config.hidden, 1.0);
        self.out = vec![T::default(); tokens * self.config.hidden];
        self.tokens = tokens;
        Ok(())
    }

    /// The experts that received at least one row in the last forward (or routing and
    /// permute stages): their weights are what the expert GEMMs read.
    pub fn active_experts(&mut self) -> Result<usize> {
        let s = split_workspace::<moe_cpu::Cpu, T>(&self.plan.layout(T::DTYPE)?, &mut self.ws[..])?;
        Ok(s.expert_offsets.windows(2).filter(|w| w[1] > w[0]).count())
    }

    /// One whole-layer forward.
    pub fn forward(&mut self, cpu: &moe_cpu::Cpu) -> Result<()>
    where
        moe_cpu::Cpu: MoeStages<T>,
    {
        forward(
            cpu,
            &self.plan,
            &self.weights.views(),
            self.tokens,
            &self.x[..],
            &mut self.out[..],
            &mut self.ws[..],
            &SingleRank,
        )
        .map(|_| ())
    }
}

/// A stage of the layer, for per-stage benches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Router logits GEMM.
    RouterLogits,
    /// Scoring and top-k.
    Route,
    /// Counting sort of the slots by expert.
    Permute,
    /// Grouped GEMM 1 with the fused activation.
    ExpertUp,
    /// Grouped GEMM 2 with the fused routing weight.
    ExpertDown,
    /// Weighted sum of each token's expert outputs.
    Combine,
    /// The shared expert's GEMM 1 with the fused activation (shapes with a shared expert).
    SharedUp,
    /// The shared expert's GEMM 2, accumulated into the output (shapes with a shared expert).
    SharedDown,
}

impl Stage {
    /// The shared expert's stages.
    pub const SHARED: [Stage; 2] = [Stage::SharedUp, Stage::SharedDown];

    /// The routed stages (every layer has them).
    pub const ALL: [Stage; 6] = [
        Stage::RouterLogits,
        Stage::Route,
        Stage::Permute,
        Stage::ExpertUp,
        Stage::ExpertDown,
        Stage::Combine,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::RouterLogits => "router_logits",
            Stage::Route => "route",
            Stage::Permute => "permute",
            Stage::ExpertUp => "expert_up",
            Stage::ExpertDown => "expert_down",
            Stage::Combine => "combine",
            Stage::SharedUp => "shared_up",
            Stage::SharedDown => "shared_down",
        }
    }
}

impl<T: Element> Layer<T>
where
    moe_cpu::Cpu: MoeStages<T>,
{
    /// Run one stage on the workspace left by a previous [`Layer::forward`].
    pub fn stage(&mut self, cpu: &moe_cpu::Cpu, stage: Stage) -> Result<()> {
        let c = self.config;
        let w = self.weights.views();
        let s = split_workspace::<moe_cpu::Cpu, T>(&self.plan.layout(T::DTYPE)?, &mut self.ws[..])?;
        let t = self.tokens;
        let x = &self.x[..];
        match stage {
            Stage::RouterLogits => {
                cpu.router_logits(t, c.hidden, c.experts, x, w.router, w.router_bias, s.logits)
            }
            Stage::Route => cpu.route(
                &c,
                t,
                s.logits,
                w.selection_bias,
                s.route_scratch,
                s.topk_ids,
                s.topk_weights,
            ),
            Stage::Permute => cpu.permute(
                &self.plan,
                t,
                s.topk_ids,
                w.expert_map,
                PermuteBuffers {
                    expert_offsets: s.expert_offsets,
                    expert_cursor: s.expert_cursor,
                    sorted_slots: s.sorted_slots,
                    slot_rows: s.slot_rows,
                },
            ),
            Stage::ExpertUp => cpu.expert_up(
                &self.plan,
                t,
                x,
                &w.experts,
                ExpertRows {
                    expert_offsets: s.expert_offsets,
                    sorted_slots: s.sorted_slots,
                    weights: None,
                },
                s.hidden,
            ),
            Stage::ExpertDown => cpu.expert_down(
                &self.plan,
                t,
                s.hidden,
                &w.experts,
                ExpertRows {
                    expert_offsets: s.expert_offsets,
                    sorted_slots: s.sorted_slots,
                    weights: Some(s.topk_weights),
                },
                s.expert_out,
            ),
            Stage::Combine => cpu.combine(
                &self.plan,
                t,
                c.hidden,
                s.expert_out,
                s.slot_rows,
                c.output_scale() as f32,
                &mut self.out[..],
            ),
            Stage::SharedUp | Stage::SharedDown => {
                let (Some(sc), Some(sw)) = (&c.shared, &w.shared) else {
                    return Err(MoeError::Unsupported {
                        backend: "cpu",
                        what: "a shared-expert stage of a layer without a shared expert",
                    });
                };
                let is = c.shared_local_intermediate();
                if stage == Stage::SharedUp {
                    cpu.mlp_up(&sc.mlp, t, c.hidden, is, x, &sw.mlp, s.shared_hidden)
                } else {
                    // As the layer: rows scaled by the sigmoid gate where the weights have one
                    // (its values are those the last forward left in the workspace).
                    let gate = sw.gate.map(|_| &s.shared_gate[..]);
                    cpu.linear(
                        t,
                        is,
                        c.hidden,
                        s.shared_hidden,
                        sw.mlp.down,
                        sw.mlp.down_bias,
                        gate,
                        1.0,
                        true,
                        &mut self.out[..],
                    )
                }
            }
        }
    }

    /// The stages of this layer: [`Stage::ALL`], then [`Stage::SHARED`] when it has a shared
    /// expert.
    pub fn stages(&self) -> Vec<Stage> {
        let shared = if self.config.shared.is_some() { &Stage::SHARED[..] } else { &[] };
        Stage::ALL.iter().chain(shared).copied().collect()
    }
}

/// A kernel-selection spec of the bench tools, parsed: a [`Tuning`] name (`intel`, `amd`, `allwb`,
/// `detect`; see [`Tuning::from_name`]) or comma-separated fields over the detected tuning:
/// `wb=LO-HI`, `dr=ROWS`, `pf=0|1`, `dp=ROWS`, `dw=LO-HI`, `wn=0|1`, `wh=0|1`, `wp=0|1`, `sp=0|1`,
/// `ss=STREAMS`, `wd=ROWS`, `wf=0|1`, `ov=ROWS` ([`Tuning`]'s `wb_rows`, `direct_rows`,
/// `inplace_prefetch`, `dpbf16_rows`, `dpwb_rows`, `wb_narrow`, `wb_half`, `wb_prefetch`,
/// `seq_prefetch`, `seq_streams`, `wb_dot_rows`, `wb_fuse`, `overlap_rows`) and
/// `isa=NAME` (that instruction set's kernels). Anything else is an error naming it: a tool never
/// runs a variant other than the one asked for.
pub fn parse_variant(spec: &str) -> std::result::Result<(Tuning, Option<Isa>), String> {
    if let Some(t) = Tuning::from_name(spec) {
        return Ok((t, None));
    }
    let mut t = Tuning::detect();
    let mut isa = None;
    let num =
        |key: &str, v: &str| v.parse::<usize>().map_err(|_| format!("{key}={v}: not a row count"));
    let flag = |key: &str, v: &str| match v {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected 0 or 1")),
    };
    let range = |key: &str, v: &str| {
        let (a, b) = v.split_once('-').ok_or(format!("{key}={v}: expected {key}=LO-HI"))?;
        Ok::<_, String>((num(key, a)?, num(key, b)?))
    };
    for f in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let Some((key, v)) = f.split_once('=') else {
            return Err(format!("unknown tuning name or field {f:?} in {spec:?}"));
        };
        match key {
            "wb" => t.wb_rows = range(key, v)?,
            "dr" => t.direct_rows = num(key, v)?,
            "pf" => t.inplace_prefetch = flag(key, v)?,
            "wn" => t.wb_narrow = flag(key, v)?,
            "wh" => t.wb_half = flag(key, v)?,
            "wp" => t.wb_prefetch = flag(key, v)?,
            "sp" => t.seq_prefetch = flag(key, v)?,
            "ss" => t.seq_streams = num(key, v)?,
            "wd" => t.wb_dot_rows = num(key, v)?,
            "wf" => t.wb_fuse = flag(key, v)?,
            "ov" => t.overlap_rows = num(key, v)?,
            "dp" => t.dpbf16_rows = num(key, v)?,
            "dw" => t.dpwb_rows = range(key, v)?,
            "isa" => {
                let i = Isa::from_name(v).ok_or(format!("unknown isa {v:?}"))?;
                if !i.available() {
                    return Err(format!("{i:?} is not available on this CPU"));
                }
                isa = Some(i);
            }
            _ => return Err(format!("unknown field {key:?} in {spec:?}")),
        }
    }
    Ok((t, isa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_name_something_or_fail() {
        let sel = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> =
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Selection::from_vars(
                |n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()),
                &[1, 128],
                &[2],
                &["f32", "bf16"],
            )
        };
        let d = sel(&[("MOE_BENCH_T", "")]).unwrap();
        assert_eq!(d.shapes.len(), canonical().len());
        assert_eq!(
            (d.tokens, d.threads, d.dtypes),
            (vec![1, 128], vec![2], vec!["f32".into(), "bf16".into()])
        );
        let s = sel(&[
            ("MOE_BENCH_SHAPES", "mixtral, qwen"),
            ("MOE_BENCH_T", "16,1024"),
            ("MOE_BENCH_THREADS", "1"),
            ("MOE_BENCH_DTYPES", "f16"),
        ])
        .unwrap();
        // Canonical order, not the variable's.
        let names: Vec<_> = s.shapes.iter().map(|s| s.name).collect();
        assert_eq!(names, ["qwen3_30b_a3b", "mixtral_8x7b"]);
        assert_eq!((s.tokens, s.threads, s.dtypes), (vec![16, 1024], vec![1], vec!["f16".into()]));
        for (k, v, msg) in [
            ("MOE_BENCH_SHAPES", "qwen,llama", "no shape starts with \"llama\""),
            ("MOE_BENCH_T", "1,x", "\"x\" is not a positive count"),
            ("MOE_BENCH_T", "0", "\"0\" is not a positive count"),
            ("MOE_BENCH_T", "1,", "\"\" is not a positive count"),
            ("MOE_BENCH_THREADS", "-1", "\"-1\" is not a positive count"),
            ("MOE_BENCH_DTYPES", "f32,f64", "unknown \"f64\""),
        ] {
            let e = sel(&[(k, v)]).unwrap_err();
            assert!(e.starts_with(k) && e.contains(msg), "{k}={v}: {e}");
        }
    }

    #[test]
    fn variant_specs() {
        assert_eq!(parse_variant("intel"), Ok((Tuning::INTEL, None)));
        assert_eq!(parse_variant(" AMD "), Ok((Tuning::AMD, None)));
        let (t, isa) = parse_variant(
            "wb=8-64,dr=3,pf=1,dp=5,dw=4-96,wn=1,wh=0,wp=0,sp=1,ss=4,wd=3,wf=1,ov=20",
        )
        .unwrap();
        assert_eq!(
            t,
            Tuning {
                wb_rows: (8, 64),
                direct_rows: 3,
                inplace_prefetch: true,
                dpbf16_rows: 5,
                dpwb_rows: (4, 96),
                wb_narrow: true,
                wb_half: false,
                wb_prefetch: false,
                seq_prefetch: true,
                seq_streams: 4,
                wb_dot_rows: 3,
                wb_fuse: true,
                overlap_rows: 20,
            }
        );
        assert_eq!(isa, None);
        assert_eq!(parse_variant("isa=generic"), Ok((Tuning::detect(), Some(Isa::Generic))));
        for bad in [
            "intel,amd",
            "wb=8",
            "dw=4",
            "wn=2",
            "wf=2",
            "wh=x",
            "dr=x",
            "pf=2",
            "isa=nope",
            "kc=128",
            "fast",
        ] {
            let e = parse_variant(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}

//! Configuration types that express every MoE recipe of the golden cases, and their validation.
//!
//! Config is plain data with defaults that match the model families; [`MoeConfig::validate`] is
//! the one place that checks it, and plans are only made from validated configs.

use crate::error::{MoeError, Result};

/// The scoring function applied to all router logits before selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen, ERNIE).
    Softmax,
    /// Element-wise sigmoid (DeepSeek-V3, NemotronH).
    Sigmoid,
    /// Raw logits (gpt-oss, Llama 4).
    None,
}

/// How a group of experts is scored for group-limited selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// Sum of the group's two best selection values (DeepSeek-V3 `noaux_tc`).
    Top2Sum,
    /// The group's best selection value.
    Max,
}

/// Group-limited top-k: experts are split into `n_group` contiguous groups and only experts in
/// the best `topk_group` groups may be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of contiguous expert groups; must divide the expert count.
    pub n_group: usize,
    /// Groups kept per token, `1..=n_group`.
    pub topk_group: usize,
    /// How a group is scored.
    pub score: GroupScore,
}

/// Where each chosen expert's weight comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightSource {
    /// The scoring function's output at the chosen expert (unbiased by the selection bias).
    Scores,
    /// Softmax over the K chosen logits (gpt-oss).
    SoftmaxTopkLogits,
    /// Sigmoid of each chosen logit (Llama 4).
    SigmoidTopkLogits,
}

/// A user-supplied top-k reduce function (FastDeploy's `topk_reduce_func`): it receives the
/// weights of one token's valid slots, in slot order, and rewrites them in place.
#[derive(Clone, Copy, Debug)]
pub struct CustomReduce {
    /// A name for messages and reports.
    pub name: &'static str,
    /// The function. It must not panic; non-finite results propagate to the output.
    pub func: fn(&mut [f32]),
}

/// The top-k reduce (renormalization) applied to the K weights of a token.
#[derive(Clone, Copy, Debug)]
pub enum TopkReduce {
    /// Keep the weights as they are.
    None,
    /// `w / (sum(w) + eps)`; `eps = 1e-20` is the `noaux_tc` default ([`TopkReduce::NOAUX_TC`]).
    Sum {
        /// Added to the denominator, `>= 0`.
        eps: f64,
    },
    /// `w / max(sum(w), min)` (ERNIE 4.5).
    ClampMin {
        /// Lower bound of the denominator, `> 0`.
        min: f64,
    },
    /// `w / ||w||_p` (DBRX).
    PNorm {
        /// The norm's exponent, `> 0`.
        p: f64,
    },
    /// A user-supplied function.
    Custom(CustomReduce),
}

impl TopkReduce {
    /// DeepSeek-V3 / NemotronH renormalization: `w / (sum(w) + 1e-20)`.
    pub const NOAUX_TC: TopkReduce = TopkReduce::Sum { eps: 1e-20 };
}

/// Where the routed scaling factor is applied. Both give the same result to rounding; the
/// output placement multiplies in f32 just before the final rounding, so it cannot overflow a
/// half type where the final result fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalePlacement {
    /// Multiplied into the routing weights.
    OnWeights,
    /// Multiplied into the summed routed output (after latent fc2, before the shared expert).
    OnOutput,
}

/// The routed scaling factor and its placement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutedScale {
    /// The factor (1.0 for none).
    pub factor: f64,
    /// Where it is applied.
    pub placement: ScalePlacement,
}

impl Default for RoutedScale {
    fn default() -> Self {
        RoutedScale { factor: 1.0, placement: ScalePlacement::OnOutput }
    }
}

/// The router: `logits = x W^T (+ b)`, scoring, selection, weights, reduce, scale.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    /// Scoring of all logits.
    pub scoring: Scoring,
    /// The router linear has a bias (`router.bias`, gpt-oss).
    pub bias: bool,
    /// A per-expert bias added to the scores for selection only (`router.selection_bias`).
    pub selection_bias: bool,
    /// Group-limited selection.
    pub groups: Option<GroupLimit>,
    /// Where the weights come from.
    pub weights: WeightSource,
    /// The top-k reduce function.
    pub reduce: TopkReduce,
    /// Routed scaling factor.
    pub scale: RoutedScale,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            scoring: Scoring::Softmax,
            bias: false,
            selection_bias: false,
            groups: None,
            weights: WeightSource::Scores,
            reduce: TopkReduce::Sum { eps: 0.0 },
            scale: RoutedScale::default(),
        }
    }
}

/// Expert activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `relu(x)^2`.
    Relu2,
    /// gpt-oss: `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
    /// `h = (u + 1) * g * sigmoid(alpha g)`. Gated experts only.
    SwigluOai {
        /// Sigmoid slope (1.702 in gpt-oss).
        alpha: f64,
        /// Clamp limit (7.0 in gpt-oss), `> 0`.
        limit: f64,
    },
}

/// An MLP: the routed experts' shape, or the shared expert's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlpConfig {
    /// Intermediate size (the full size; each tensor-parallel rank holds `intermediate / tp_size`).
    pub intermediate: usize,
    /// `down(act(gate x) * up x)` when true, `down(act(up x))` when false.
    pub gated: bool,
    /// The activation.
    pub activation: Activation,
    /// The linears carry biases.
    pub bias: bool,
}

/// The routed experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertConfig {
    /// The experts' MLP.
    pub mlp: MlpConfig,
    /// Multiply the routing weight into the expert's input instead of its output (Llama 4).
    pub apply_weight_on_input: bool,
}

/// The optional sigmoid gate of the shared expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedGate {
    /// The shared output is added as is.
    None,
    /// The shared output is multiplied by `sigmoid(x . shared.gate_weight)` (Qwen2-MoE).
    SigmoidLinear,
}

/// The shared expert: an always-on MLP computed on the layer's input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedConfig {
    /// Its MLP.
    pub mlp: MlpConfig,
    /// Its gate.
    pub gate: SharedGate,
}

/// Latent projections: experts run on `fc1 x` (width `size`) and their weighted sum is projected
/// back by `fc2` (NemotronH latent MoE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentConfig {
    /// The latent width L.
    pub size: usize,
    /// fc1 and fc2 carry biases.
    pub bias: bool,
}

/// Expert parallelism: this rank holds `local_experts` of the layer's experts, placed by an
/// expert map (global id -> local index, or -1) given with the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    /// Experts whose weights this rank holds.
    pub local_experts: usize,
    /// Whether this rank adds the shared expert to its output (exactly one rank per token should).
    pub include_shared: bool,
}

/// How the layer is split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelConfig {
    /// Tensor-parallel degree: the expert and shared intermediate dimensions are split into this
    /// many equal shards, and the layer performs one all-reduce per forward when it is above 1.
    pub tp_size: usize,
    /// This rank, `0..tp_size`. Output-side biases are added on rank 0 only.
    pub tp_rank: usize,
    /// Expert placement, when the experts are split across ranks.
    pub experts: Option<ExpertPlacement>,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig { tp_size: 1, tp_rank: 0, experts: None }
    }
}

/// A whole MoE layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeConfig {
    /// Model width H.
    pub hidden: usize,
    /// Routed experts E (global).
    pub experts: usize,
    /// Experts per token K.
    pub top_k: usize,
    /// Router.
    pub router: RouterConfig,
    /// Routed experts.
    pub expert: ExpertConfig,
    /// Shared expert.
    pub shared: Option<SharedConfig>,
    /// Latent projections.
    pub latent: Option<LatentConfig>,
    /// Parallel split.
    pub parallel: ParallelConfig,
}

fn finite(what: &'static str, v: f64) -> Result<()> {
    if v.is_finite() { Ok(()) } else { Err(MoeError::NonFiniteParameter { what, value: v }) }
}

fn nonzero(what: &'static str, v: usize) -> Result<()> {
    if v == 0 { Err(MoeError::ZeroDimension { what }) } else { Ok(()) }
}

impl MlpConfig {
    fn validate(&self, tp: usize, what: &'static str, inter_what: &'static str) -> Result<()> {
        nonzero(inter_what, self.intermediate)?;
        if let Activation::SwigluOai { alpha, limit } = self.activation {
            finite("swiglu_oai.alpha", alpha)?;
            finite("swiglu_oai.limit", limit)?;
            if limit <= 0.0 {
                return Err(MoeError::InvalidParameter {
                    what: "swiglu_oai.limit",
                    value: limit,
                    rule: "limit > 0",
                });
            }
            if !self.gated {
                return Err(MoeError::InconsistentConfig { what });
            }
        }
        if !self.intermediate.is_multiple_of(tp) {
            return Err(MoeError::InvalidParameter {
                what: inter_what,
                value: self.intermediate as f64,
                rule: "a multiple of tp_size",
            });
        }
        Ok(())
    }

    /// The intermediate size one tensor-parallel rank holds.
    pub fn local_intermediate(&self, tp_size: usize) -> usize {
        self.intermediate / tp_size.max(1)
    }
}

impl MoeConfig {
    /// Check every field and every relation between fields.
    pub fn validate(&self) -> Result<()> {
        nonzero("hidden", self.hidden)?;
        nonzero("experts", self.experts)?;
        if self.top_k == 0 {
            return Err(MoeError::TopKZero);
        }
        if self.top_k > self.experts {
            return Err(MoeError::TopKTooLarge { top_k: self.top_k, experts: self.experts });
        }
        if self.experts > i32::MAX as usize {
            return Err(MoeError::InvalidParameter {
                what: "experts",
                value: self.experts as f64,
                rule: "fits in i32",
            });
        }
        let r = &self.router;
        if let Some(g) = r.groups {
            nonzero("router.groups.n_group", g.n_group)?;
            if !self.experts.is_multiple_of(g.n_group) {
                return Err(MoeError::GroupsDoNotDivide {
                    experts: self.experts,
                    n_group: g.n_group,
                });
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(MoeError::TopkGroupInvalid {
                    topk_group: g.topk_group,
                    n_group: g.n_group,
                });
            }
            let per_group = self.experts / g.n_group;
            if g.score == GroupScore::Top2Sum && per_group < 2 {
                return Err(MoeError::GroupTooSmallForTop2 { experts_per_group: per_group });
            }
            let reachable = per_group * g.topk_group;
            if self.top_k > reachable {
                return Err(MoeError::TopKExceedsGroups { top_k: self.top_k, reachable });
            }
        }
        match r.reduce {
            TopkReduce::None | TopkReduce::Custom(_) => {}
            TopkReduce::Sum { eps } => {
                finite("router.reduce.eps", eps)?;
                if eps < 0.0 {
                    return Err(MoeError::InvalidParameter {
                        what: "router.reduce.eps",
                        value: eps,
                        rule: "eps >= 0",
                    });
                }
            }
            TopkReduce::ClampMin { min } => {
                finite("router.reduce.min", min)?;
                if min <= 0.0 {
                    return Err(MoeError::InvalidParameter {
                        what: "router.reduce.min",
                        value: min,
                        rule: "min > 0",
                    });
                }
            }
            TopkReduce::PNorm { p } => {
                finite("router.reduce.p", p)?;
                if p <= 0.0 {
                    return Err(MoeError::InvalidParameter {
                        what: "router.reduce.p",
                        value: p,
                        rule: "p > 0",
                    });
                }
            }
        }
        finite("router.scale.factor", r.scale.factor)?;
        let p = &self.parallel;
        nonzero("parallel.tp_size", p.tp_size)?;
        if p.tp_rank >= p.tp_size {
            return Err(MoeError::InvalidParameter {
                what: "parallel.tp_rank",
                value: p.tp_rank as f64,
                rule: "tp_rank < tp_size",
            });
        }
        if let Some(ep) = p.experts {
            nonzero("parallel.experts.local_experts", ep.local_experts)?;
            if ep.local_experts > self.experts {
                return Err(MoeError::InvalidParameter {
                    what: "parallel.experts.local_experts",
                    value: ep.local_experts as f64,
                    rule: "local_experts <= experts",
                });
            }
        }
        self.expert.mlp.validate(
            p.tp_size,
            "swiglu_oai needs gated experts",
            "expert.intermediate",
        )?;
        if let Some(s) = &self.shared {
            s.mlp.validate(
                p.tp_size,
                "swiglu_oai needs a gated shared expert",
                "shared.intermediate",
            )?;
        }
        if let Some(l) = &self.latent {
            nonzero("latent.size", l.size)?;
        }
        // Every tensor's element count must fit in usize (and the expert dimension in i32).
        let fits = |what: &'static str, dims: &[usize]| -> Result<()> {
            dims.iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= isize::MAX as usize / 8)
                .map(|_| ())
                .ok_or(MoeError::InvalidParameter {
                    what,
                    value: f64::INFINITY,
                    rule: "tensor sizes fit in memory",
                })
        };
        fits("router.weight", &[self.experts, self.hidden])?;
        fits("experts", &[self.experts, self.expert.mlp.intermediate, self.expert_width()])?;
        if let Some(s) = &self.shared {
            fits("shared", &[s.mlp.intermediate, self.hidden])?;
        }
        if let Some(l) = &self.latent {
            fits("latent", &[l.size, self.hidden])?;
        }
        Ok(())
    }

    /// The width the experts run on: the latent size, or the hidden size.
    pub fn expert_width(&self) -> usize {
        self.latent.map_or(self.hidden, |l| l.size)
    }

    /// Experts whose weights this rank holds.
    pub fn local_experts(&self) -> usize {
        self.parallel.experts.map_or(self.experts, |e| e.local_experts)
    }

    /// The expert intermediate size this rank holds.
    pub fn local_intermediate(&self) -> usize {
        self.expert.mlp.local_intermediate(self.parallel.tp_size)
    }

    /// The shared-expert intermediate size this rank holds (0 without a shared expert).
    pub fn shared_local_intermediate(&self) -> usize {
        self.shared.map_or(0, |s| s.mlp.local_intermediate(self.parallel.tp_size))
    }

    /// Whether this rank computes the shared expert.
    pub fn computes_shared(&self) -> bool {
        self.shared.is_some() && self.parallel.experts.is_none_or(|e| e.include_shared)
    }

    /// Whether this rank adds the output-side biases (down, shared down, latent fc2).
    pub fn adds_output_bias(&self) -> bool {
        self.parallel.tp_rank == 0
    }

    /// Whether this rank adds the latent fc2 bias: it applies to the whole routed sum, so with
    /// experts split across ranks only the rank that also adds the shared expert adds it
    /// (and with tensor parallelism only rank 0).
    pub fn adds_latent_bias(&self) -> bool {
        self.adds_output_bias() && self.parallel.experts.is_none_or(|e| e.include_shared)
    }

    /// The factor the combine (or latent fc2) multiplies into the routed output.
    pub fn output_scale(&self) -> f64 {
        match self.router.scale.placement {
            ScalePlacement::OnOutput => self.router.scale.factor,
            ScalePlacement::OnWeights => 1.0,
        }
    }

    /// The factor the router multiplies into the weights.
    pub fn weight_scale(&self) -> f64 {
        match self.router.scale.placement {
            ScalePlacement::OnOutput => 1.0,
            ScalePlacement::OnWeights => self.router.scale.factor,
        }
    }
}

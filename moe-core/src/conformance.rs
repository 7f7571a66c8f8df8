//! The conformance suite every backend runs: the golden cases (real Hugging Face MoE blocks in
//! float64, see `golden/FORMAT.md`) and randomized property tests against the float64
//! reference.
//!
//! A backend plugs in through [`ConformanceBackend`]: it runs a whole layer in one element type
//! on weights given in float64 (rounding them to the element type itself) and returns the
//! routing and the output. The suite then checks, for every case and element type:
//!
//! * the chosen experts of each token as a set. A token whose selection margin is below what
//!   the element type can resolve (a bound computed from the rounding of `x` and the router
//!   weight) may route differently; such a token is then checked against the float64 reference
//!   forced to the backend's choice, so nothing goes unchecked;
//! * the weights (per expert) and the output by relative-norm error: f32 <= 1e-5,
//!   bf16/f16 <= 2e-2.
//!
//! One line is printed per case and element type. A missing or empty folder is a failure.

use crate::config::*;
use crate::element::{DType, Element};
use crate::error::MoeError;
use crate::reference::{self, HostLatent, HostMlp, HostShared, HostWeights};
use std::collections::HashMap;
use std::format;
use std::path::{Path, PathBuf};
use std::println;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// What a backend returns for one run.
#[derive(Clone, Debug, Default)]
pub struct RunOutput {
    /// `[T, K]` chosen experts.
    pub topk_ids: Vec<i32>,
    /// `[T, K]` final weights.
    pub topk_weights: Vec<f64>,
    /// `[T, H]` output.
    pub out: Vec<f64>,
}

/// A backend under test.
pub trait ConformanceBackend {
    /// Name for the report.
    fn name(&self) -> &'static str;
    /// Run the whole layer in element type `dtype` (weights and `x` rounded to it by the
    /// backend). Return [`MoeError::Unsupported`] for what the backend does not support; the
    /// suite reports it and fails unless the backend declares it in [`Self::unsupported`].
    fn run(
        &self,
        dtype: DType,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError>;
    /// Whether the backend documents `dtype` (or this config) as unsupported, so an
    /// `Unsupported` answer is a skip rather than a failure. Default: everything is supported.
    fn unsupported(&self, _dtype: DType, _config: &MoeConfig) -> bool {
        false
    }
}

/// The relative-norm error bound for an element type.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 | DType::BF16 => 2e-2,
    }
}

/// `||a - b|| / ||b||` (or `||a - b||` when `b` is zero); NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    let e = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    if e.is_nan() { f64::INFINITY } else { e }
}

/// Owned element-typed copies of host weights (for backends that take host slices, and for
/// uploads).
#[derive(Clone, Debug, Default)]
pub struct ElementMlp<T> {
    /// Gate.
    pub gate: Option<Vec<T>>,
    /// Up.
    pub up: Vec<T>,
    /// Down.
    pub down: Vec<T>,
    /// Gate bias.
    pub gate_bias: Option<Vec<T>>,
    /// Up bias.
    pub up_bias: Option<Vec<T>>,
    /// Down bias.
    pub down_bias: Option<Vec<T>>,
}

/// Element-typed latent projections.
#[derive(Clone, Debug, Default)]
pub struct ElementLatent<T> {
    /// `[L, H]`.
    pub fc1: Vec<T>,
    /// `[H, L]`.
    pub fc2: Vec<T>,
    /// `[L]`.
    pub fc1_bias: Option<Vec<T>>,
    /// `[H]`.
    pub fc2_bias: Option<Vec<T>>,
}

/// See [`ElementMlp`].
#[derive(Clone, Debug, Default)]
pub struct ElementWeights<T> {
    /// Router.
    pub router: Vec<T>,
    /// Router bias.
    pub router_bias: Option<Vec<T>>,
    /// Selection bias (f32).
    pub selection_bias: Option<Vec<f32>>,
    /// Experts.
    pub experts: ElementMlp<T>,
    /// Shared MLP and gate.
    pub shared: Option<(ElementMlp<T>, Option<Vec<T>>)>,
    /// Latent projections.
    pub latent: Option<ElementLatent<T>>,
    /// Expert map.
    pub expert_map: Option<Vec<i32>>,
}

/// Round a float64 tensor to element type `T`.
pub fn to_elements<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn opt<T: Element>(v: &Option<Vec<f64>>) -> Option<Vec<T>> {
    v.as_ref().map(|v| to_elements(v))
}

fn mlp_el<T: Element>(m: &HostMlp) -> ElementMlp<T> {
    ElementMlp {
        gate: opt(&m.gate),
        up: to_elements(&m.up),
        down: to_elements(&m.down),
        gate_bias: opt(&m.gate_bias),
        up_bias: opt(&m.up_bias),
        down_bias: opt(&m.down_bias),
    }
}

impl<T: Element> ElementWeights<T> {
    /// Round every tensor of `w` to `T` (the selection bias to f32).
    pub fn from_host(w: &HostWeights) -> Self {
        ElementWeights {
            router: to_elements(&w.router),
            router_bias: opt(&w.router_bias),
            selection_bias: w
                .selection_bias
                .as_ref()
                .map(|b| b.iter().map(|&v| v as f32).collect()),
            experts: mlp_el(&w.experts),
            shared: w.shared.as_ref().map(|s| (mlp_el(&s.mlp), opt(&s.gate))),
            latent: w.latent.as_ref().map(|l| ElementLatent {
                fc1: to_elements(&l.fc1),
                fc2: to_elements(&l.fc2),
                fc1_bias: opt(&l.fc1_bias),
                fc2_bias: opt(&l.fc2_bias),
            }),
            expert_map: w.expert_map.clone(),
        }
    }
}

fn round_host<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

fn round_opt<T: Element>(v: &Option<Vec<f64>>) -> Option<Vec<f64>> {
    v.as_ref().map(|v| round_host::<T>(v))
}

fn round_mlp<T: Element>(m: &HostMlp) -> HostMlp {
    HostMlp {
        gate: round_opt::<T>(&m.gate),
        up: round_host::<T>(&m.up),
        down: round_host::<T>(&m.down),
        gate_bias: round_opt::<T>(&m.gate_bias),
        up_bias: round_opt::<T>(&m.up_bias),
        down_bias: round_opt::<T>(&m.down_bias),
    }
}

/// The host weights as the backend sees them in element type `T` (rounded, kept in f64).
pub fn round_weights<T: Element>(w: &HostWeights) -> HostWeights {
    HostWeights {
        router: round_host::<T>(&w.router),
        router_bias: round_opt::<T>(&w.router_bias),
        selection_bias: w
            .selection_bias
            .as_ref()
            .map(|b| b.iter().map(|&v| v as f32 as f64).collect()),
        experts: round_mlp::<T>(&w.experts),
        shared: w
            .shared
            .as_ref()
            .map(|s| HostShared { mlp: round_mlp::<T>(&s.mlp), gate: round_opt::<T>(&s.gate) }),
        latent: w.latent.as_ref().map(|l| HostLatent {
            fc1: round_host::<T>(&l.fc1),
            fc2: round_host::<T>(&l.fc2),
            fc1_bias: round_opt::<T>(&l.fc1_bias),
            fc2_bias: round_opt::<T>(&l.fc2_bias),
        }),
        expert_map: w.expert_map.clone(),
    }
}

fn round_dyn(dtype: DType, v: &[f64]) -> Vec<f64> {
    match dtype {
        DType::F32 => round_host::<f32>(v),
        DType::F16 => round_host::<half::f16>(v),
        DType::BF16 => round_host::<half::bf16>(v),
    }
}

fn round_weights_dyn(dtype: DType, w: &HostWeights) -> HostWeights {
    match dtype {
        DType::F32 => round_weights::<f32>(w),
        DType::F16 => round_weights::<half::f16>(w),
        DType::BF16 => round_weights::<half::bf16>(w),
    }
}

/// What the backend must reproduce for one case.
#[derive(Clone, Debug)]
pub struct Expected {
    /// `[T, K]`.
    pub topk_ids: Vec<i32>,
    /// `[T, K]`.
    pub topk_weights: Vec<f64>,
    /// `[T]` selection margin.
    pub margin: Vec<f64>,
    /// `[T, H]`.
    pub out: Vec<f64>,
    /// Whether `topk_weights` already include a routed scale placed on the output (the golden
    /// files store the final combine weight); otherwise the check multiplies it in.
    pub weights_include_output_scale: bool,
}

/// One test case: a layer, its inputs, and the expected results.
#[derive(Clone, Debug)]
pub struct Case {
    /// Name for the report.
    pub name: String,
    /// The layer.
    pub config: MoeConfig,
    /// Float64 weights.
    pub weights: HostWeights,
    /// `[T, H]` float64 input.
    pub x: Vec<f64>,
    /// Tokens.
    pub tokens: usize,
    /// Expected results on these float64 inputs.
    pub expected: Expected,
}

/// The outcome of one case in one element type.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The report line.
    pub line: String,
    /// Whether it passed (or was a declared skip).
    pub passed: bool,
    /// Relative-norm error of the weights and of the output (0 when skipped, infinite when the
    /// run failed).
    pub errors: (f64, f64),
}

impl CaseResult {
    fn fail(line: String) -> Self {
        CaseResult { line, passed: false, errors: (f64::INFINITY, f64::INFINITY) }
    }
}

/// Per-token bound on how far a selection value can move when `x` and the router weight are
/// rounded to `dtype` and the logits accumulate in f32; two values closer than twice this may
/// legitimately swap.
fn resolution(
    dtype: DType,
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    t: usize,
    logits: &[f64],
) -> f64 {
    let (h, e) = (c.hidden, c.experts);
    let u = dtype.epsilon() + h as f64 * f32::EPSILON as f64;
    let xt = &x[t * h..(t + 1) * h];
    let mut dl = 0f64;
    for ei in 0..e {
        let s: f64 =
            xt.iter().zip(&w.router[ei * h..(ei + 1) * h]).map(|(a, b)| (a * b).abs()).sum();
        let b = w.router_bias.as_ref().map_or(0.0, |b| b[ei].abs());
        dl = dl.max(u * (s + b));
    }
    let lt = &logits[t * e..(t + 1) * e];
    let mut scores = vec![0.0; e];
    crate::math::score(c.router.scoring, lt, &mut scores);
    let ds = match c.router.scoring {
        Scoring::Softmax => 2.0 * scores.iter().fold(0f64, |a, &b| a.max(b)) * dl,
        Scoring::Sigmoid => 0.25 * dl,
        Scoring::None => dl,
    };
    2.0 * ds + 1e-6
}

/// Check a backend's output against a case in one element type.
pub fn check_case<B: ConformanceBackend + ?Sized>(
    backend: &B,
    case: &Case,
    dtype: DType,
) -> CaseResult {
    let tag = format!("conformance[{}] {:<24} {:<4}", backend.name(), case.name, dtype.name());
    let c = &case.config;
    let (k, h) = (c.top_k, c.hidden);
    let run = match backend.run(dtype, c, &case.weights, &case.x, case.tokens) {
        Ok(r) => r,
        Err(e @ MoeError::Unsupported { .. }) if backend.unsupported(dtype, c) => {
            return CaseResult {
                line: format!("{tag} skipped: {e}"),
                passed: true,
                errors: (0.0, 0.0),
            };
        }
        Err(e) => return CaseResult::fail(format!("{tag} FAIL: error {e}")),
    };
    let t_n = case.tokens;
    if run.topk_ids.len() != t_n * k
        || run.topk_weights.len() != t_n * k
        || run.out.len() != t_n * h
    {
        return CaseResult::fail(format!("{tag} FAIL: output sizes"));
    }
    let ex = &case.expected;
    // Logits of the float64 inputs, for resolution bounds and forced routing.
    let logits = reference::linear(
        &case.x,
        t_n,
        h,
        &case.weights.router,
        c.experts,
        case.weights.router_bias.as_deref(),
    );
    let (mut exp_w, mut got_w) = (Vec::new(), Vec::new());
    let mut exp_out = ex.out.clone();
    let (mut matched, mut near_ties, mut wrong) = (0, 0, Vec::new());
    // Compare final combine weights: the routed scale is in them wherever it is applied.
    let os = c.output_scale();
    let exp_scale = if ex.weights_include_output_scale { 1.0 } else { os };
    for t in 0..t_n {
        let got_ids = &run.topk_ids[t * k..(t + 1) * k];
        let want_ids = &ex.topk_ids[t * k..(t + 1) * k];
        let mut gs: Vec<(i32, f64)> = got_ids
            .iter()
            .copied()
            .zip(run.topk_weights[t * k..(t + 1) * k].iter().map(|w| w * os))
            .collect();
        gs.sort_by_key(|p| p.0);
        let mut ws: Vec<(i32, f64)> = want_ids
            .iter()
            .copied()
            .zip(ex.topk_weights[t * k..(t + 1) * k].iter().map(|w| w * exp_scale))
            .collect();
        ws.sort_by_key(|p| p.0);
        if gs.iter().map(|p| p.0).eq(ws.iter().map(|p| p.0)) {
            matched += 1;
        } else if ex.margin[t] < resolution(dtype, c, &case.weights, &case.x, t, &logits) {
            // A near tie: check this token against the reference forced to the backend's choice.
            near_ties += 1;
            let forced =
                reference::weights_for_ids(c, &logits[t * c.experts..(t + 1) * c.experts], got_ids);
            let xt = &case.x[t * h..(t + 1) * h];
            match reference::output_for_routing(c, &case.weights, xt, 1, got_ids, &forced) {
                Ok(o) => exp_out[t * h..(t + 1) * h].copy_from_slice(&o),
                Err(e) => {
                    return CaseResult::fail(format!("{tag} FAIL: reference {e}"));
                }
            }
            ws = got_ids.iter().copied().zip(forced.into_iter().map(|w| w * os)).collect();
            ws.sort_by_key(|p| p.0);
        } else {
            wrong.push(t);
            continue;
        }
        exp_w.extend(ws.iter().map(|p| p.1));
        got_w.extend(gs.iter().map(|p| p.1));
    }
    let tol = tolerance(dtype);
    let ew = rel_err(&got_w, &exp_w);
    let eo = rel_err(&run.out, &exp_out);
    let unwritten = run.out.iter().filter(|v| !v.is_finite()).count();
    let passed = wrong.is_empty() && ew <= tol && eo <= tol && unwritten == 0;
    let line = format!(
        "{tag} ids {matched}/{t_n} (+{near_ties} near-tie) weights {ew:.2e} out {eo:.2e} (tol {tol:.0e}){}{} {}",
        if wrong.is_empty() {
            String::new()
        } else {
            format!(" WRONG ROUTING at tokens {wrong:?}")
        },
        if unwritten > 0 { format!(" {unwritten} non-finite outputs") } else { String::new() },
        if passed { "ok" } else { "FAIL" }
    );
    CaseResult { line, passed, errors: (ew, eo) }
}

// ---------------------------------------------------------------- golden cases

/// The folder of golden cases: `MOE_GOLDEN_DIR`, or the copy committed in this repository.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("MOE_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("golden"),
    }
}

struct Tensors(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Tensors {
    fn get(&self, name: &str) -> Option<Vec<f64>> {
        self.0.get(name).map(|t| t.1.clone())
    }
    fn req(&self, name: &str) -> Result<Vec<f64>, String> {
        self.get(name).ok_or_else(|| format!("missing tensor `{name}`"))
    }
}

fn read_tensors(path: &Path) -> Result<Tensors, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut map = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let vals: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect(),
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            safetensors::Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            safetensors::Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            d => {
                return Err(format!(
                    "{}: tensor `{name}` has unsupported dtype {d:?}",
                    path.display()
                ));
            }
        };
        map.insert(name.to_string(), (view.shape().to_vec(), vals));
    }
    Ok(Tensors(map))
}

fn jnum(v: &serde_json::Value, key: &str) -> Result<f64, String> {
    v.get(key)
        .and_then(|x| x.as_f64())
        .ok_or_else(|| format!("recipe: `{key}` missing or not a number"))
}

fn jusize(v: &serde_json::Value, key: &str) -> Result<usize, String> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| format!("recipe: `{key}` missing or not an integer"))
}

fn jstr<'v>(v: &'v serde_json::Value, key: &str) -> Result<&'v str, String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .ok_or_else(|| format!("recipe: `{key}` missing or not a string"))
}

fn jbool(v: &serde_json::Value, key: &str) -> bool {
    v.get(key).and_then(|x| x.as_bool()).unwrap_or(false)
}

fn activation(v: &serde_json::Value) -> Result<Activation, String> {
    Ok(match jstr(v, "activation")? {
        "silu" => Activation::Silu,
        "gelu" => Activation::Gelu,
        "gelu_tanh" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "relu2" => Activation::Relu2,
        "swiglu_oai" => {
            Activation::SwigluOai { alpha: jnum(v, "alpha")?, limit: jnum(v, "limit")? }
        }
        a => return Err(format!("recipe: unknown activation `{a}`")),
    })
}

/// Parse a recipe (`NAME.json` of `golden/FORMAT.md`) into a configuration.
pub fn parse_recipe(j: &serde_json::Value) -> Result<MoeConfig, String> {
    let r = j.get("router").ok_or("recipe: `router` missing")?;
    let scoring = match jstr(r, "scoring")? {
        "softmax" => Scoring::Softmax,
        "sigmoid" => Scoring::Sigmoid,
        "none" => Scoring::None,
        s => return Err(format!("recipe: unknown scoring `{s}`")),
    };
    let groups = match r.get("groups") {
        Some(g) if !g.is_null() => Some(GroupLimit {
            n_group: jusize(g, "n_group")?,
            topk_group: jusize(g, "topk_group")?,
            score: match jstr(g, "group_score")? {
                "top2_sum" => GroupScore::Top2Sum,
                "max" => GroupScore::Max,
                s => return Err(format!("recipe: unknown group_score `{s}`")),
            },
        }),
        _ => None,
    };
    let weights = match jstr(r, "weights")? {
        "scores" => WeightSource::Scores,
        "softmax_topk_logits" => WeightSource::SoftmaxTopkLogits,
        "sigmoid_topk_logits" => WeightSource::SigmoidTopkLogits,
        s => return Err(format!("recipe: unknown weights `{s}`")),
    };
    let reduce = match r.get("renormalize") {
        Some(n) if !n.is_null() => match jstr(n, "kind")? {
            "sum" => TopkReduce::Sum { eps: n.get("eps").and_then(|e| e.as_f64()).unwrap_or(0.0) },
            "clamp_min" => TopkReduce::ClampMin { min: jnum(n, "min")? },
            "pnorm" => TopkReduce::PNorm { p: jnum(n, "p")? },
            s => return Err(format!("recipe: unknown renormalize kind `{s}`")),
        },
        _ => TopkReduce::None,
    };
    let scale = r.get("scale").and_then(|s| s.as_f64()).unwrap_or(1.0);
    let e = j.get("expert").ok_or("recipe: `expert` missing")?;
    let mlp = |v: &serde_json::Value, inter: usize| -> Result<MlpConfig, String> {
        Ok(MlpConfig {
            intermediate: inter,
            gated: jbool(v, "gated"),
            activation: activation(v)?,
            bias: jbool(v, "bias"),
        })
    };
    let shared = match j.get("shared") {
        Some(s) if !s.is_null() => Some(SharedConfig {
            mlp: mlp(s, jusize(s, "intermediate")?)?,
            gate: match s.get("gate").and_then(|g| g.as_str()) {
                None => SharedGate::None,
                Some("sigmoid_linear") => SharedGate::SigmoidLinear,
                Some(g) => return Err(format!("recipe: unknown shared gate `{g}`")),
            },
        }),
        _ => None,
    };
    let latent = match j.get("latent") {
        Some(l) if !l.is_null() => {
            Some(LatentConfig { size: jusize(l, "size")?, bias: jbool(l, "bias") })
        }
        _ => None,
    };
    Ok(MoeConfig {
        hidden: jusize(j, "hidden")?,
        experts: jusize(j, "experts")?,
        top_k: jusize(j, "top_k")?,
        router: RouterConfig {
            scoring,
            bias: false, // set from the tensors
            selection_bias: jbool(r, "selection_bias"),
            groups,
            weights,
            reduce,
            scale: RoutedScale { factor: scale, placement: ScalePlacement::OnOutput },
        },
        expert: ExpertConfig {
            mlp: mlp(e, jusize(j, "intermediate")?)?,
            apply_weight_on_input: jbool(e, "apply_weight_on_input"),
        },
        shared,
        latent,
        parallel: ParallelConfig::default(),
    })
}

/// Load one golden case from `NAME.json` + `NAME.safetensors`.
pub fn load_case(json_path: &Path) -> Result<Case, String> {
    let text =
        std::fs::read_to_string(json_path).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let mut config = parse_recipe(&j).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let t = read_tensors(&json_path.with_extension("safetensors"))?;
    config.router.bias = t.0.contains_key("router.bias");
    let mlp = |p: &str| -> Result<HostMlp, String> {
        Ok(HostMlp {
            gate: t.get(&format!("{p}.gate")),
            up: t.req(&format!("{p}.up"))?,
            down: t.req(&format!("{p}.down"))?,
            gate_bias: t.get(&format!("{p}.gate_bias")),
            up_bias: t.get(&format!("{p}.up_bias")),
            down_bias: t.get(&format!("{p}.down_bias")),
        })
    };
    let weights = HostWeights {
        router: t.req("router.weight")?,
        router_bias: t.get("router.bias"),
        selection_bias: t.get("router.selection_bias"),
        experts: mlp("experts")?,
        shared: match config.shared {
            Some(_) => Some(HostShared { mlp: mlp("shared")?, gate: t.get("shared.gate_weight") }),
            None => None,
        },
        latent: match config.latent {
            Some(_) => Some(HostLatent {
                fc1: t.req("latent.fc1")?,
                fc2: t.req("latent.fc2")?,
                fc1_bias: t.get("latent.fc1_bias"),
                fc2_bias: t.get("latent.fc2_bias"),
            }),
            None => None,
        },
        expert_map: None,
    };
    let tokens = jusize(&j, "tokens")?;
    let expected = Expected {
        topk_ids: t.req("topk_ids")?.iter().map(|&v| v as i32).collect(),
        topk_weights: t.req("topk_weights")?,
        margin: t.req("selection_margin")?,
        out: t.req("out")?,
        weights_include_output_scale: true,
    };
    let name = j.get("name").and_then(|n| n.as_str()).map(String::from).unwrap_or_else(|| {
        json_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    });
    config.validate().map_err(|e| format!("{name}: {e}"))?;
    Ok(Case { name, config, weights, x: t.req("x")?, tokens, expected })
}

/// Load every case (`*.json` with a `*.safetensors` beside it) of `dir`, sorted by name. An
/// unreadable folder or one with no case is an error.
pub fn load_dir(dir: &Path) -> Result<Vec<Case>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("golden folder {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json") && p.with_extension("safetensors").exists()
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("golden folder {} holds no case", dir.display()));
    }
    paths.iter().map(|p| load_case(p)).collect()
}

/// Run every golden case of [`golden_dir`] in every element type; print one line each.
/// Returns `Err` with the failing lines if any case fails or the folder has none.
pub fn run_golden_suite<B: ConformanceBackend + ?Sized>(backend: &B) -> Result<usize, String> {
    let dir = golden_dir();
    println!("conformance[{}]: golden cases from {}", backend.name(), dir.display());
    let cases = with_both_scale_placements(load_dir(&dir)?);
    run_cases(backend, &cases)
}

/// Each case as loaded (routed scale on the output), plus, where the scale is not 1, the same
/// case with the scale placed on the weights (`NAME@weights`): both must match the golden.
pub fn with_both_scale_placements(cases: Vec<Case>) -> Vec<Case> {
    let mut all = Vec::with_capacity(2 * cases.len());
    for c in cases {
        let scaled = c.config.router.scale.factor != 1.0;
        let mut w = c.clone();
        all.push(c);
        if scaled {
            w.name.push_str("@weights");
            w.config.router.scale.placement = ScalePlacement::OnWeights;
            all.push(w);
        }
    }
    all
}

/// Check `cases` in every element type, printing one line each.
pub fn run_cases<B: ConformanceBackend + ?Sized>(
    backend: &B,
    cases: &[Case],
) -> Result<usize, String> {
    let mut failed = Vec::new();
    let mut n = 0;
    for case in cases {
        for dtype in DType::ALL {
            let r = check_case(backend, case, dtype);
            println!("{}", r.line);
            n += 1;
            if !r.passed {
                failed.push(r.line);
            }
        }
    }
    if failed.is_empty() {
        Ok(n)
    } else {
        Err(format!("{} of {n} checks failed:\n{}", failed.len(), failed.join("\n")))
    }
}

// ---------------------------------------------------------------- randomized property cases

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    /// Bernoulli(p).
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * core::f64::consts::PI * v).cos()
    }
    /// `n` normals scaled by `s`.
    pub fn tensor(&mut self, n: usize, s: f64) -> Vec<f64> {
        (0..n).map(|_| s * self.normal()).collect()
    }
}

fn custom_softmax_like(w: &mut [f32]) {
    // A user reduce that divides by the sum of squares (any function will do).
    let s: f32 = w.iter().map(|v| v * v).sum::<f32>().max(1e-12);
    w.iter_mut().for_each(|v| *v /= s);
}

/// Shapes a random case may be forced into.
#[derive(Clone, Copy, Debug, Default)]
pub struct Force {
    /// Tokens.
    pub tokens: Option<usize>,
    /// Experts.
    pub experts: Option<usize>,
    /// `top_k = experts`.
    pub k_equals_e: bool,
    /// One group.
    pub one_group: bool,
    /// Every group selected.
    pub all_groups: bool,
}

/// A random layer configuration with random weights and input.
pub fn random_case(seed: u64, force: Force) -> Case {
    let mut r = Rng::new(seed);
    let experts = force.experts.unwrap_or_else(|| [1, 2, 3, 4, 6, 8, 12, 16, 32][r.range(0, 8)]);
    let top_k = if force.k_equals_e { experts } else { r.range(1, experts.min(6)) };
    let hidden = r.range(1, 48);
    let inter = r.range(1, 40);
    let tokens = force.tokens.unwrap_or_else(|| r.range(0, 24));
    let scoring = [Scoring::Softmax, Scoring::Sigmoid, Scoring::None][r.range(0, 2)];
    let mut groups = None;
    let divisors: Vec<usize> = (1..=experts).filter(|&g| experts.is_multiple_of(g)).collect();
    if force.one_group || force.all_groups || r.chance(0.35) {
        let n_group = if force.one_group { 1 } else { divisors[r.range(0, divisors.len() - 1)] };
        let per = experts / n_group;
        let min_groups = top_k.div_ceil(per);
        let topk_group = if force.all_groups { n_group } else { r.range(min_groups, n_group) };
        let score = if per >= 2 && r.chance(0.6) { GroupScore::Top2Sum } else { GroupScore::Max };
        groups = Some(GroupLimit { n_group, topk_group, score });
    }
    let weights =
        [WeightSource::Scores, WeightSource::SoftmaxTopkLogits, WeightSource::SigmoidTopkLogits]
            [r.range(0, 2)];
    let reduce = match r.range(0, 5) {
        0 => TopkReduce::None,
        1 => TopkReduce::Sum { eps: if r.chance(0.5) { 0.0 } else { 1e-20 } },
        2 => TopkReduce::ClampMin { min: 1e-12 },
        3 => TopkReduce::PNorm { p: [1.0, 2.0, 3.5][r.range(0, 2)] },
        4 => TopkReduce::Custom(CustomReduce { name: "sum-of-squares", func: custom_softmax_like }),
        _ => TopkReduce::Sum { eps: 1e-20 },
    };
    // Scores may be negative (scoring none): keep the reduce well defined there.
    let reduce = match (scoring, weights, reduce) {
        (
            Scoring::None,
            WeightSource::Scores,
            TopkReduce::Sum { .. } | TopkReduce::ClampMin { .. },
        ) => TopkReduce::PNorm { p: 2.0 },
        (_, _, r) => r,
    };
    let scale = RoutedScale {
        factor: if r.chance(0.5) { 1.0 } else { 0.5 + 2.0 * r.uniform() },
        placement: if r.chance(0.5) { ScalePlacement::OnOutput } else { ScalePlacement::OnWeights },
    };
    let acts = [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu2,
        Activation::SwigluOai { alpha: 1.702, limit: 7.0 },
    ];
    let mlp = |r: &mut Rng, inter: usize| {
        let gated = r.chance(0.7);
        let mut activation = acts[r.range(0, 4)];
        if !gated && matches!(activation, Activation::SwigluOai { .. }) {
            activation = Activation::Silu;
        }
        MlpConfig { intermediate: inter, gated, activation, bias: r.chance(0.3) }
    };
    let expert = ExpertConfig { mlp: mlp(&mut r, inter), apply_weight_on_input: r.chance(0.2) };
    let shared_inter = r.range(1, 40);
    let shared = r.chance(0.4).then(|| SharedConfig {
        mlp: mlp(&mut r, shared_inter),
        gate: if r.chance(0.5) { SharedGate::SigmoidLinear } else { SharedGate::None },
    });
    let latent = r.chance(0.25).then(|| LatentConfig { size: r.range(1, 24), bias: r.chance(0.5) });
    let config = MoeConfig {
        hidden,
        experts,
        top_k,
        router: RouterConfig {
            scoring,
            bias: r.chance(0.3),
            selection_bias: r.chance(0.3),
            groups,
            weights,
            reduce,
            scale,
        },
        expert,
        shared,
        latent,
        parallel: ParallelConfig::default(),
    };
    generated_case(&format!("random-{seed}"), config, tokens, &mut r)
}

/// A case for `config` with random weights and input drawn from `r`, its expected results
/// computed by the float64 reference.
pub fn generated_case(name: &str, config: MoeConfig, tokens: usize, r: &mut Rng) -> Case {
    let weights = random_weights(&config, r);
    let x = r.tensor(tokens * config.hidden, 1.0);
    let mut case = Case {
        name: name.to_string(),
        config,
        weights,
        x,
        tokens,
        expected: Expected {
            topk_ids: vec![],
            topk_weights: vec![],
            margin: vec![],
            out: vec![],
            weights_include_output_scale: false,
        },
    };
    case.expected = expected_from_reference(&case)
        .unwrap_or_else(|e| panic!("reference failed on a generated case: {e}"));
    case
}

/// Random weights for `c` (scaled by fan-in, so activations stay O(1)).
pub fn random_weights(c: &MoeConfig, r: &mut Rng) -> HostWeights {
    let (h, e) = (c.hidden, c.experts);
    let d = c.expert_width();
    let mlp = |r: &mut Rng, m: &MlpConfig, n: usize, width: usize| {
        let i = m.intermediate;
        let (si, so) = (1.0 / (width as f64).sqrt(), 1.0 / (i as f64).sqrt());
        HostMlp {
            gate: m.gated.then(|| r.tensor(n * i * width, si)),
            up: r.tensor(n * i * width, si),
            down: r.tensor(n * width * i, so),
            gate_bias: (m.bias && m.gated).then(|| r.tensor(n * i, 0.1)),
            up_bias: m.bias.then(|| r.tensor(n * i, 0.1)),
            down_bias: m.bias.then(|| r.tensor(n * width, 0.1)),
        }
    };
    HostWeights {
        router: r.tensor(e * h, 1.0 / (h as f64).sqrt()),
        router_bias: c.router.bias.then(|| r.tensor(e, 0.2)),
        selection_bias: c.router.selection_bias.then(|| r.tensor(e, 0.1)),
        experts: mlp(r, &c.expert.mlp, c.local_experts(), d),
        shared: c.shared.map(|s| HostShared {
            mlp: mlp(r, &s.mlp, 1, h),
            gate: (s.gate == SharedGate::SigmoidLinear)
                .then(|| r.tensor(h, 1.0 / (h as f64).sqrt())),
        }),
        latent: c.latent.map(|l| HostLatent {
            fc1: r.tensor(l.size * h, 1.0 / (h as f64).sqrt()),
            fc2: r.tensor(h * l.size, 1.0 / (l.size as f64).sqrt()),
            fc1_bias: l.bias.then(|| r.tensor(l.size, 0.1)),
            fc2_bias: l.bias.then(|| r.tensor(h, 0.1)),
        }),
        expert_map: None,
    }
}

/// The reference's results on a case's float64 inputs.
pub fn expected_from_reference(case: &Case) -> Result<Expected, MoeError> {
    let (routing, out) = reference::forward(&case.config, &case.weights, &case.x, case.tokens)?;
    Ok(Expected {
        topk_ids: routing.topk_ids,
        topk_weights: routing.topk_weights,
        margin: routing.margin,
        out,
        weights_include_output_scale: false,
    })
}

/// The case as the backend sees it in `dtype`: inputs and weights rounded, expected results
/// recomputed by the reference on the rounded values.
pub fn rounded_case(case: &Case, dtype: DType) -> Case {
    let mut c = case.clone();
    c.x = round_dyn(dtype, &case.x);
    c.weights = round_weights_dyn(dtype, &case.weights);
    c.expected = expected_from_reference(&c).unwrap_or_else(|e| panic!("reference failed: {e}"));
    c
}

/// The forced shapes of the property suite (T = 0, T = 1, K = E, E = 1, one group, all
/// groups), then `random` fully random cases.
pub fn property_cases(random: usize, seed: u64) -> Vec<Case> {
    let forced = [
        Force { tokens: Some(0), ..Force::default() },
        Force { tokens: Some(1), ..Force::default() },
        Force { k_equals_e: true, ..Force::default() },
        Force { experts: Some(1), ..Force::default() },
        Force { one_group: true, ..Force::default() },
        Force { all_groups: true, ..Force::default() },
        Force { experts: Some(16), k_equals_e: true, tokens: Some(5), ..Force::default() },
    ];
    let mut cases: Vec<Case> = forced
        .iter()
        .enumerate()
        .map(|(i, f)| random_case(seed.wrapping_add(i as u64 * 7919), *f))
        .collect();
    cases.extend(
        (0..random).map(|i| random_case(seed.wrapping_add(1_000_003 + i as u64), Force::default())),
    );
    cases
}

/// The randomized property suite: each case in each element type against the float64
/// reference on the same rounded inputs. Prints a summary line per element type and every
/// failure; returns `Err` if any fails.
pub fn run_property_suite<B: ConformanceBackend + ?Sized>(
    backend: &B,
    random: usize,
    seed: u64,
) -> Result<usize, String> {
    let cases = property_cases(random, seed);
    let mut failed = Vec::new();
    let mut n = 0;
    for dtype in DType::ALL {
        let mut worst = 0f64;
        let mut passed = 0;
        for case in &cases {
            let rc = rounded_case(case, dtype);
            let r = check_case(backend, &rc, dtype);
            n += 1;
            if r.passed {
                passed += 1;
            } else {
                failed.push(format!("{} [{:?}]", r.line, case.config));
            }
            worst = worst.max(r.errors.0).max(r.errors.1);
        }
        println!(
            "property[{}] {:<4} {passed}/{} cases passed, worst error {worst:.2e}",
            backend.name(),
            dtype.name(),
            cases.len()
        );
    }
    if failed.is_empty() {
        Ok(n)
    } else {
        Err(format!("{} property checks failed:\n{}", failed.len(), failed.join("\n")))
    }
}

// ---------------------------------------------------------------- host-slice backends

use crate::backend::MoeStages;
use crate::layer::{LatentWeights, MoeWeights, SharedWeights};
use crate::plan::{MoePlan, REGION_ALIGN};
use crate::reduce::{HostSlices, SingleRank};

fn mlp_views<'a, B: HostSlices, T: Element>(
    m: &'a ElementMlp<T>,
) -> crate::backend::MlpWeights<'a, B, T> {
    crate::backend::MlpWeights {
        gate: m.gate.as_deref().map(B::from_host),
        up: B::from_host(&m.up),
        down: B::from_host(&m.down),
        gate_bias: m.gate_bias.as_deref().map(B::from_host),
        up_bias: m.up_bias.as_deref().map(B::from_host),
        down_bias: m.down_bias.as_deref().map(B::from_host),
    }
}

impl<T: Element> ElementWeights<T> {
    /// Views of these weights for a backend over host slices.
    pub fn views<B: HostSlices>(&self) -> MoeWeights<'_, B, T> {
        MoeWeights {
            router: B::from_host(&self.router),
            router_bias: self.router_bias.as_deref().map(B::from_host),
            selection_bias: self.selection_bias.as_deref().map(B::from_host),
            experts: mlp_views(&self.experts),
            shared: self.shared.as_ref().map(|(m, g)| SharedWeights {
                mlp: mlp_views(m),
                gate: g.as_deref().map(B::from_host),
            }),
            latent: self.latent.as_ref().map(|l| LatentWeights {
                fc1: B::from_host(&l.fc1),
                fc2: B::from_host(&l.fc2),
                fc1_bias: l.fc1_bias.as_deref().map(B::from_host),
                fc2_bias: l.fc2_bias.as_deref().map(B::from_host),
            }),
            expert_map: self.expert_map.as_deref().map(B::from_host),
        }
    }
}

/// Run a whole layer on a host-slice backend in element type `T`: weights rounded to `T`,
/// output and workspace poisoned (NaN / 0xFF) first, routing read back from the workspace.
pub fn run_on_host<B: HostSlices + MoeStages<T>, T: Element>(
    backend: &B,
    config: &MoeConfig,
    weights: &HostWeights,
    x: &[f64],
    tokens: usize,
) -> Result<RunOutput, MoeError> {
    let plan = MoePlan::new(config, tokens)?;
    let ew = ElementWeights::<T>::from_host(weights);
    let xe: Vec<T> = to_elements(x);
    let layout = plan.layout(T::DTYPE)?;
    let mut ws = vec![0xFFu8; layout.total_bytes];
    let mut out = vec![T::from_f32(f32::NAN); tokens * config.hidden];
    crate::layer::forward(
        backend,
        &plan,
        &ew.views::<B>(),
        tokens,
        B::from_host(&xe),
        B::from_host_mut(&mut out),
        B::from_host_mut(&mut ws),
        &SingleRank,
    )?;
    let base = ws.as_ptr().align_offset(REGION_ALIGN);
    let read = |r: crate::plan::Region| -> Vec<[u8; 4]> {
        ws[base + r.offset..base + r.offset + 4 * r.len]
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let n = tokens * config.top_k;
    let mut ids_r = layout.topk_ids;
    ids_r.len = n;
    let mut w_r = layout.topk_weights;
    w_r.len = n;
    Ok(RunOutput {
        topk_ids: read(ids_r).into_iter().map(i32::from_le_bytes).collect(),
        topk_weights: read(w_r).into_iter().map(|b| f32::from_le_bytes(b) as f64).collect(),
        out: out.iter().map(|v| v.to_f64()).collect(),
    })
}

/// A [`ConformanceBackend`] for any backend over host slices that implements the stages for
/// all three element types.
pub struct HostRunner<B>(pub B);

impl<B> ConformanceBackend for HostRunner<B>
where
    B: HostSlices + MoeStages<f32> + MoeStages<half::f16> + MoeStages<half::bf16>,
{
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn run(
        &self,
        dtype: DType,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError> {
        match dtype {
            DType::F32 => run_on_host::<B, f32>(&self.0, config, weights, x, tokens),
            DType::F16 => run_on_host::<B, half::f16>(&self.0, config, weights, x, tokens),
            DType::BF16 => run_on_host::<B, half::bf16>(&self.0, config, weights, x, tokens),
        }
    }
}

// ---------------------------------------------------------------- the tie / NaN policy

/// Cases that pin the selection policy every backend must share: exact ties (all logits equal,
/// so the lower expert id wins), group ties, NaN router biases (never selected), and a token
/// with no selectable expert at all (every slot -1, weight 0).
pub fn rules_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let base = |seed: u64, scoring: Scoring, groups: Option<GroupLimit>, bias: Vec<f64>| {
        let mut c =
            random_case(seed, Force { tokens: Some(4), experts: Some(8), ..Force::default() });
        c.config.top_k = 3;
        c.config.router.scoring = scoring;
        c.config.router.groups = groups;
        c.config.router.bias = true;
        c.config.router.selection_bias = false;
        c.config.router.weights = WeightSource::Scores;
        c.config.router.reduce = TopkReduce::Sum { eps: 0.0 };
        c.config.expert.apply_weight_on_input = false;
        c.config.parallel = ParallelConfig::default();
        let mut r = Rng::new(seed);
        c.weights = random_weights(&c.config, &mut r);
        c.weights.router.iter_mut().for_each(|w| *w = 0.0);
        c.weights.router_bias = Some(bias);
        c
    };
    let mut push = |name: &str, mut c: Case| {
        c.name = name.to_string();
        c.expected = expected_from_reference(&c).unwrap_or_else(|e| panic!("reference: {e}"));
        cases.push(c);
    };
    push("rule: all tie", base(11, Scoring::Softmax, None, vec![0.0; 8]));
    push(
        "rule: partial tie",
        base(12, Scoring::Sigmoid, None, vec![0.0, 1.0, 0.5, 1.0, 0.5, 1.0, 0.0, 0.25]),
    );
    push(
        "rule: group tie",
        base(
            13,
            Scoring::Sigmoid,
            Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Top2Sum }),
            vec![0.5, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5, 0.5],
        ),
    );
    let nan = f64::NAN;
    push(
        "rule: NaN never chosen",
        base(14, Scoring::Sigmoid, None, vec![nan, 3.0, nan, 2.0, nan, 1.0, 0.0, nan]),
    );
    push(
        "rule: too few numbers",
        base(15, Scoring::Sigmoid, None, vec![nan, nan, 2.0, nan, nan, nan, nan, 1.0]),
    );
    push("rule: no number", base(16, Scoring::Sigmoid, None, vec![nan; 8]));
    cases
}

/// Run [`rules_cases`] in every element type: the chosen ids must equal the reference's exactly
/// (slot order included), and weights and output must pass the usual checks.
pub fn run_rules_suite<B: ConformanceBackend + ?Sized>(backend: &B) -> Result<usize, String> {
    let mut failed = Vec::new();
    let mut n = 0;
    for case in rules_cases() {
        for dtype in DType::ALL {
            n += 1;
            let rc = rounded_case(&case, dtype);
            let got = backend.run(dtype, &rc.config, &rc.weights, &rc.x, rc.tokens);
            let ids_ok = match &got {
                Ok(r) => r.topk_ids == rc.expected.topk_ids,
                Err(MoeError::Unsupported { .. }) if backend.unsupported(dtype, &rc.config) => true,
                Err(_) => false,
            };
            let r = check_case(backend, &rc, dtype);
            let line = format!("{} ids exact: {}", r.line, if ids_ok { "yes" } else { "NO" });
            println!("{line}");
            if !(ids_ok && r.passed) {
                failed.push(format!(
                    "{line} got {:?} want {:?}",
                    got.map(|g| g.topk_ids),
                    rc.expected.topk_ids
                ));
            }
        }
    }
    if failed.is_empty() {
        Ok(n)
    } else {
        Err(format!("{} rule checks failed:\n{}", failed.len(), failed.join("\n")))
    }
}

// ---------------------------------------------------------------- edge shapes

/// A plain gated-silu layer of the given shape (softmax routing, no extras): the base of the
/// edge-shape cases.
pub fn edge_config(hidden: usize, experts: usize, top_k: usize, inter: usize) -> MoeConfig {
    MoeConfig {
        hidden,
        experts,
        top_k,
        router: RouterConfig::default(),
        expert: ExpertConfig {
            mlp: MlpConfig {
                intermediate: inter,
                gated: true,
                activation: Activation::Silu,
                bias: false,
            },
            apply_weight_on_input: false,
        },
        shared: None,
        latent: None,
        parallel: ParallelConfig::default(),
    }
}

/// The edge shapes every backend checks: T = 0, 1, 37; K = 1; K = E; E = 1; E = 512; H and I
/// not multiples of 8; one group, all groups, groups of one; and one expert that receives every
/// token while the others receive none.
pub fn edge_cases() -> Vec<Case> {
    let make = |name: &str, c: MoeConfig, tokens: usize, seed: u64| {
        generated_case(name, c, tokens, &mut Rng::new(seed))
    };
    let mut cases = vec![
        make("T=0", edge_config(16, 8, 2, 8), 0, 1),
        make("T=1", edge_config(16, 8, 2, 8), 1, 2),
        make("T=37 (no tile multiple)", edge_config(16, 8, 2, 8), 37, 3),
        make("K=1", edge_config(16, 8, 1, 8), 9, 4),
        make("K=E", edge_config(16, 8, 8, 8), 9, 5),
        make("E=1", edge_config(16, 1, 1, 8), 9, 6),
        make("E=512 K=8", edge_config(16, 512, 8, 8), 16, 7),
        make("H=13 I=7", edge_config(13, 8, 2, 7), 11, 8),
    ];
    let mut g = edge_config(16, 16, 4, 8);
    g.router.scoring = Scoring::Sigmoid;
    g.router.groups = Some(GroupLimit { n_group: 1, topk_group: 1, score: GroupScore::Top2Sum });
    cases.push(make("one group", g, 12, 9));
    g.router.groups = Some(GroupLimit { n_group: 4, topk_group: 4, score: GroupScore::Top2Sum });
    cases.push(make("all groups", g, 12, 10));
    g.router.groups = Some(GroupLimit { n_group: 16, topk_group: 4, score: GroupScore::Max });
    cases.push(make("groups of one", g, 12, 11));
    // One expert receives every token, the others none: zero router weight, a large bias on 3.
    let mut c = edge_config(16, 8, 1, 8);
    c.router.bias = true;
    let mut hot = make("one hot expert", c, 20, 12);
    hot.weights.router.iter_mut().for_each(|w| *w = 0.0);
    hot.weights.router_bias = Some((0..8).map(|e| if e == 3 { 5.0 } else { 0.0 }).collect());
    hot.expected = expected_from_reference(&hot).unwrap_or_else(|e| panic!("reference: {e}"));
    assert!(hot.expected.topk_ids.iter().all(|&i| i == 3), "the hot expert takes every token");
    cases.push(hot);
    cases
}

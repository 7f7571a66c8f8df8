//! The scalar semantics, written once and generic over the float type: activations and the
//! routing of one token. The float64 reference instantiates them with `f64`, the CPU backend
//! with `f32`.
//!
//! # Selection rules
//!
//! * **Ties**: between equal selection values (and equal group scores) the lower index wins.
//! * **NaN**: a NaN selection value is never selected. A group whose experts are all NaN has a
//!   NaN score and is never chosen. When fewer than K experts have a non-NaN value, the remaining
//!   slots get expert id `-1` and weight 0; every stage skips such slots.
//! * `-inf` is an ordinary (lowest) value and can be selected.

use crate::config::{
    Activation, GroupScore, MlpConfig, MoeConfig, Scoring, TopkReduce, WeightSource,
};
use num_traits::Float;

/// A float type the semantics can be evaluated in (`f32` or `f64`).
pub trait Real: Float + Copy + core::fmt::Debug + Send + Sync + 'static {
    /// The error function.
    fn erf(self) -> Self;
    /// Conversion from a parameter.
    fn of(v: f64) -> Self;
    /// Narrowing to f32 (for user-supplied reduce functions).
    fn to_f32_lossy(self) -> f32;
    /// Widening from f32.
    fn from_f32(v: f32) -> Self;
}

impl Real for f32 {
    #[inline]
    fn erf(self) -> Self {
        libm::erff(self)
    }
    #[inline]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn to_f32_lossy(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Real for f64 {
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline]
    fn of(v: f64) -> Self {
        v
    }
    #[inline]
    fn to_f32_lossy(self) -> f32 {
        self as f32
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

/// `1 / (1 + exp(-x))`.
#[inline]
pub fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// The activation of an ungated MLP (or of the gate branch of a gated one, for the activations
/// that have that form).
#[inline]
pub fn activate<F: Real>(act: Activation, x: F) -> F {
    let half = F::of(0.5);
    match act {
        Activation::Silu => x * sigmoid(x),
        Activation::Gelu => {
            half * x * (F::one() + (x * F::of(core::f64::consts::FRAC_1_SQRT_2)).erf())
        }
        Activation::GeluTanh => {
            let c = F::of(0.797_884_560_802_865_4); // sqrt(2 / pi)
            half * x * (F::one() + (c * (x + F::of(0.044715) * x * x * x)).tanh())
        }
        Activation::Relu2 => {
            let r = x.max(F::zero());
            r * r
        }
        // Ungated swiglu_oai is rejected by validation; treat the input as both branches.
        Activation::SwigluOai { .. } => gated(act, x, x),
    }
}

/// The gated activation `h = f(gate, up)`.
#[inline]
pub fn gated<F: Real>(act: Activation, gate: F, up: F) -> F {
    match act {
        Activation::SwigluOai { alpha, limit } => {
            let l = F::of(limit);
            let g = gate.min(l);
            let u = up.max(-l).min(l);
            (u + F::one()) * g * sigmoid(F::of(alpha) * g)
        }
        _ => activate(act, gate) * up,
    }
}

/// The MLP's hidden activation from its pre-activations (`gate` ignored when ungated).
#[inline]
pub fn mlp_hidden<F: Real>(mlp: &MlpConfig, gate: F, up: F) -> F {
    if mlp.gated { gated(mlp.activation, gate, up) } else { activate(mlp.activation, up) }
}

/// Scratch for [`route_token`], each slice at least as long as noted.
pub struct RouteScratch<'s, F> {
    /// `[experts]`: the scores.
    pub scores: &'s mut [F],
    /// `[experts]`: the selection values (masked in place).
    pub selection: &'s mut [F],
    /// `[n_group]` (may be empty without groups).
    pub groups: &'s mut [F],
    /// `[top_k]`: f32 staging for a user-supplied reduce.
    pub staging: &'s mut [f32],
}

/// Index of the largest non-NaN value, lowest index on ties; `None` if all are NaN.
#[inline]
pub fn argmax_no_nan<F: Real>(v: &[F]) -> Option<usize> {
    let mut best: Option<(usize, F)> = None;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i)
}

/// Score all logits of one token in place (`scores[e]` from `logits[e]`).
pub fn score<F: Real>(scoring: Scoring, logits: &[F], scores: &mut [F]) {
    match scoring {
        Scoring::Softmax => {
            let m = logits.iter().copied().fold(F::neg_infinity(), |a, b| a.max(b));
            let mut sum = F::zero();
            for (s, &l) in scores.iter_mut().zip(logits) {
                *s = (l - m).exp();
                sum = sum + *s;
            }
            for s in scores.iter_mut() {
                *s = *s / sum;
            }
            // A NaN logit makes the whole softmax undefined.
            if logits.iter().any(|l| l.is_nan()) {
                scores.iter_mut().for_each(|s| *s = F::nan());
            }
        }
        Scoring::Sigmoid => {
            for (s, &l) in scores.iter_mut().zip(logits) {
                *s = sigmoid(l);
            }
        }
        Scoring::None => scores.copy_from_slice(logits),
    }
}

/// Route one token: select `ids` (slot order = descending selection value) and compute the final
/// `weights` (source, reduce, and the scale if it is placed on the weights).
pub fn route_token<F: Real>(
    cfg: &MoeConfig,
    logits: &[F],
    selection_bias: Option<&[F]>,
    s: RouteScratch<'_, F>,
    ids: &mut [i32],
    weights: &mut [F],
) {
    let e = cfg.experts;
    let r = &cfg.router;
    let scores = &mut s.scores[..e];
    let sel = &mut s.selection[..e];
    score(r.scoring, &logits[..e], scores);
    for i in 0..e {
        sel[i] = scores[i] + selection_bias.map_or(F::zero(), |b| b[i]);
    }
    if let Some(g) = r.groups {
        let per = e / g.n_group;
        let gs = &mut s.groups[..g.n_group];
        for (gi, out) in gs.iter_mut().enumerate() {
            let vals = &sel[gi * per..(gi + 1) * per];
            *out = match g.score {
                GroupScore::Max => {
                    vals.iter().copied().filter(|v| !v.is_nan()).fold(F::nan(), F::max)
                }
                GroupScore::Top2Sum => {
                    let mut a: Option<F> = None;
                    let mut b: Option<F> = None;
                    for &v in vals.iter().filter(|v| !v.is_nan()) {
                        if a.is_none_or(|a| v > a) {
                            b = a;
                            a = Some(v);
                        } else if b.is_none_or(|b| v > b) {
                            b = Some(v);
                        }
                    }
                    match (a, b) {
                        (Some(a), Some(b)) => a + b,
                        (Some(a), None) => a,
                        _ => F::nan(),
                    }
                }
            };
        }
        // Pick topk_group groups; a picked group's score becomes NaN, so afterwards every group
        // whose score is still a number was not picked and its experts are masked out.
        for _ in 0..g.topk_group {
            match argmax_no_nan(gs) {
                Some(i) => gs[i] = F::nan(),
                None => break,
            }
        }
        for (gi, gv) in gs.iter().enumerate() {
            if !gv.is_nan() {
                sel[gi * per..(gi + 1) * per].iter_mut().for_each(|v| *v = F::nan());
            }
        }
    }
    select_topk(sel, ids);
    weights_for_ids(cfg, logits, scores, ids, weights, s.staging);
}

/// Fill `ids` with the indices of the best non-NaN values of `sel`, best first, lower index on
/// ties; slots beyond the non-NaN values get -1. `sel` is consumed (chosen entries become NaN).
pub fn select_topk<F: Real>(sel: &mut [F], ids: &mut [i32]) {
    for id in ids.iter_mut() {
        match argmax_no_nan(sel) {
            Some(i) => {
                *id = i as i32;
                sel[i] = F::nan();
            }
            None => *id = -1,
        }
    }
}

/// The final weights of the chosen `ids` of one token (-1 slots get 0): source, top-k reduce,
/// and the routed scale when it is placed on the weights. `scores` are the scored logits.
pub fn weights_for_ids<F: Real>(
    cfg: &MoeConfig,
    logits: &[F],
    scores: &[F],
    ids: &[i32],
    weights: &mut [F],
    staging: &mut [f32],
) {
    let k = ids.len();
    let w = &mut weights[..k];
    w.iter_mut().for_each(|x| *x = F::zero());
    // Valid slots come first (selection fills them in order); a forced id list may hold -1
    // anywhere, so gather the valid ones by position.
    let valid = ids.iter().take_while(|&&i| i >= 0).count();
    let r = &cfg.router;
    match r.weights {
        WeightSource::Scores => {
            for j in 0..valid {
                w[j] = scores[ids[j] as usize];
            }
        }
        WeightSource::SigmoidTopkLogits => {
            for j in 0..valid {
                w[j] = sigmoid(logits[ids[j] as usize]);
            }
        }
        WeightSource::SoftmaxTopkLogits => {
            if valid > 0 {
                let m = (0..valid)
                    .map(|j| logits[ids[j] as usize])
                    .fold(F::neg_infinity(), |a, b| a.max(b));
                let mut sum = F::zero();
                for j in 0..valid {
                    w[j] = (logits[ids[j] as usize] - m).exp();
                    sum = sum + w[j];
                }
                for x in &mut w[..valid] {
                    *x = *x / sum;
                }
            }
        }
    }
    reduce_weights(r.reduce, &mut w[..valid], staging);
    let scale = F::of(cfg.weight_scale());
    if scale != F::one() {
        for x in &mut w[..valid] {
            *x = *x * scale;
        }
    }
}

/// Apply a top-k reduce to one token's valid weights.
pub fn reduce_weights<F: Real>(reduce: TopkReduce, w: &mut [F], staging: &mut [f32]) {
    let sum = || w.iter().fold(F::zero(), |a, &b| a + b);
    let div = match reduce {
        TopkReduce::None => return,
        TopkReduce::Sum { eps } => sum() + F::of(eps),
        TopkReduce::ClampMin { min } => sum().max(F::of(min)),
        TopkReduce::PNorm { p } => {
            let p = F::of(p);
            w.iter().fold(F::zero(), |a, &b| a + b.abs().powf(p)).powf(p.recip())
        }
        TopkReduce::Custom(c) => {
            let st = &mut staging[..w.len()];
            for (d, &x) in st.iter_mut().zip(w.iter()) {
                *d = x.to_f32_lossy();
            }
            (c.func)(st);
            for (x, &d) in w.iter_mut().zip(st.iter()) {
                *x = F::from_f32(d);
            }
            return;
        }
    };
    for x in w.iter_mut() {
        *x = *x / div;
    }
}

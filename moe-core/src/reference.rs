//! The float64 reference: every stage of the layer in plain `f64` loops, the oracle the
//! backends are tested against. It allocates freely; speed is not its job.

use crate::config::{GroupScore, MlpConfig, MoeConfig, SharedGate};
use crate::error::{MoeError, Result};
use crate::math::{self, RouteScratch};
use alloc::vec;
use alloc::vec::Vec;

/// Host copies of an MLP's tensors (layouts as in [`crate::MoeWeights`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostMlp {
    /// Gate projection.
    pub gate: Option<Vec<f64>>,
    /// Up projection.
    pub up: Vec<f64>,
    /// Down projection.
    pub down: Vec<f64>,
    /// Gate bias.
    pub gate_bias: Option<Vec<f64>>,
    /// Up bias.
    pub up_bias: Option<Vec<f64>>,
    /// Down bias.
    pub down_bias: Option<Vec<f64>>,
}

/// Host copies of the shared expert's tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostShared {
    /// The MLP.
    pub mlp: HostMlp,
    /// `[H]` sigmoid gate vector.
    pub gate: Option<Vec<f64>>,
}

/// Host copies of the latent projections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostLatent {
    /// `[L, H]`.
    pub fc1: Vec<f64>,
    /// `[H, L]`.
    pub fc2: Vec<f64>,
    /// `[L]`.
    pub fc1_bias: Option<Vec<f64>>,
    /// `[H]`.
    pub fc2_bias: Option<Vec<f64>>,
}

/// Host copies (float64) of all weights of a layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostWeights {
    /// `[E, H]`.
    pub router: Vec<f64>,
    /// `[E]`.
    pub router_bias: Option<Vec<f64>>,
    /// `[E]`.
    pub selection_bias: Option<Vec<f64>>,
    /// Routed experts.
    pub experts: HostMlp,
    /// Shared expert.
    pub shared: Option<HostShared>,
    /// Latent projections.
    pub latent: Option<HostLatent>,
    /// `[E]` global -> local expert map.
    pub expert_map: Option<Vec<i32>>,
}

/// The reference's routing of a batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    /// `[T, E]` router logits.
    pub logits: Vec<f64>,
    /// `[T, K]` chosen experts, best first (-1 for an empty slot).
    pub topk_ids: Vec<i32>,
    /// `[T, K]` final weights.
    pub topk_weights: Vec<f64>,
    /// `[T]` the selection margin: the gap between the K-th chosen and the best unchosen
    /// selection value among the allowed experts, or half the gap between the last chosen and
    /// the best unchosen group score if smaller (infinite when nothing competes).
    pub margin: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y[t, o] = sum_i x[t, i] w[o, i] + b[o]`.
pub fn linear(
    x: &[f64],
    tokens: usize,
    in_dim: usize,
    w: &[f64],
    out_dim: usize,
    b: Option<&[f64]>,
) -> Vec<f64> {
    let mut y = vec![0.0; tokens * out_dim];
    for t in 0..tokens {
        let xt = &x[t * in_dim..(t + 1) * in_dim];
        for o in 0..out_dim {
            y[t * out_dim + o] =
                dot(xt, &w[o * in_dim..(o + 1) * in_dim]) + b.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// One MLP applied to one input row: `down(h(gate x, up x))` where the pre-activations are
/// `in_scale (W x) + b`. Expert `e` selects the `[e]` slice of stacked weights.
pub fn mlp_row(
    mlp: &MlpConfig,
    w: &HostMlp,
    e: usize,
    width: usize,
    inter: usize,
    x: &[f64],
    in_scale: f64,
    with_down_bias: bool,
) -> Vec<f64> {
    let wi = e * inter * width;
    let mut h = vec![0.0; inter];
    for (i, hv) in h.iter_mut().enumerate() {
        let row = wi + i * width..wi + (i + 1) * width;
        let up = in_scale * dot(x, &w.up[row.clone()])
            + w.up_bias.as_ref().map_or(0.0, |b| b[e * inter + i]);
        let gate = match &w.gate {
            Some(g) => {
                in_scale * dot(x, &g[row]) + w.gate_bias.as_ref().map_or(0.0, |b| b[e * inter + i])
            }
            None => 0.0,
        };
        *hv = math::mlp_hidden(mlp, gate, up);
    }
    let wd = e * width * inter;
    (0..width)
        .map(|o| {
            dot(&h, &w.down[wd + o * inter..wd + (o + 1) * inter])
                + if with_down_bias {
                    w.down_bias.as_ref().map_or(0.0, |b| b[e * width + o])
                } else {
                    0.0
                }
        })
        .collect()
}

/// Route a batch in float64.
pub fn route(c: &MoeConfig, w: &HostWeights, x: &[f64], tokens: usize) -> Routing {
    let (h, e, k) = (c.hidden, c.experts, c.top_k);
    let logits = linear(x, tokens, h, &w.router, e, w.router_bias.as_deref());
    let mut r = Routing {
        topk_ids: vec![-1; tokens * k],
        topk_weights: vec![0.0; tokens * k],
        margin: vec![f64::INFINITY; tokens],
        logits,
    };
    let ng = c.router.groups.map_or(0, |g| g.n_group);
    let (mut scores, mut sel, mut groups, mut staging) =
        (vec![0.0; e], vec![0.0; e], vec![0.0; ng], vec![0f32; k]);
    for t in 0..tokens {
        let lt = &r.logits[t * e..(t + 1) * e];
        math::route_token(
            c,
            lt,
            w.selection_bias.as_deref(),
            RouteScratch {
                scores: &mut scores,
                selection: &mut sel,
                groups: &mut groups,
                staging: &mut staging,
            },
            &mut r.topk_ids[t * k..(t + 1) * k],
            &mut r.topk_weights[t * k..(t + 1) * k],
        );
        r.margin[t] = margin(c, w, lt, &r.topk_ids[t * k..(t + 1) * k]);
    }
    r
}

/// The selection margin of one token (see [`Routing::margin`]).
pub fn margin(c: &MoeConfig, w: &HostWeights, logits: &[f64], ids: &[i32]) -> f64 {
    let e = c.experts;
    let mut scores = vec![0.0; e];
    math::score(c.router.scoring, logits, &mut scores);
    let sel: Vec<f64> =
        (0..e).map(|i| scores[i] + w.selection_bias.as_ref().map_or(0.0, |b| b[i])).collect();
    let mut allowed = vec![true; e];
    let mut group_margin = f64::INFINITY;
    if let Some(g) = c.router.groups {
        let per = e / g.n_group;
        let gscore: Vec<f64> = (0..g.n_group)
            .map(|gi| {
                let mut v: Vec<f64> =
                    sel[gi * per..(gi + 1) * per].iter().copied().filter(|x| !x.is_nan()).collect();
                v.sort_by(|a, b| b.total_cmp(a));
                match g.score {
                    GroupScore::Max => v.first().copied().unwrap_or(f64::NAN),
                    GroupScore::Top2Sum => v.iter().take(2).sum(),
                }
            })
            .collect();
        let chosen: Vec<bool> = (0..g.n_group)
            .map(|gi| ids.iter().any(|&i| i >= 0 && i as usize / per == gi))
            .collect();
        // Groups picked but holding no chosen expert are possible; count groups by score rank.
        let mut order: Vec<usize> = (0..g.n_group).collect();
        order.sort_by(|&a, &b| gscore[b].total_cmp(&gscore[a]).then(a.cmp(&b)));
        let picked = &order[..g.topk_group];
        let last = picked.iter().map(|&i| gscore[i]).fold(f64::INFINITY, f64::min);
        let best_other =
            order[g.topk_group..].iter().map(|&i| gscore[i]).fold(f64::NEG_INFINITY, f64::max);
        group_margin = (last - best_other) / 2.0;
        for (i, a) in allowed.iter_mut().enumerate() {
            *a = picked.contains(&(i / per)) || chosen[i / per];
        }
    }
    let last =
        ids.iter().filter(|&&i| i >= 0).map(|&i| sel[i as usize]).fold(f64::INFINITY, f64::min);
    let best_other = (0..e)
        .filter(|&i| allowed[i] && !ids.contains(&(i as i32)) && !sel[i].is_nan())
        .map(|i| sel[i])
        .fold(f64::NEG_INFINITY, f64::max);
    (last - best_other).min(group_margin)
}

/// The final weights the router would give to a forced choice of `ids` for one token.
pub fn weights_for_ids(c: &MoeConfig, logits: &[f64], ids: &[i32]) -> Vec<f64> {
    let mut scores = vec![0.0; c.experts];
    math::score(c.router.scoring, logits, &mut scores);
    let mut w = vec![0.0; ids.len()];
    let mut staging = vec![0f32; ids.len()];
    math::weights_for_ids(c, logits, &scores, ids, &mut w, &mut staging);
    w
}

/// The layer output for a given routing (`ids`, `weights` as the router produced them).
pub fn output_for_routing(
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    tokens: usize,
    ids: &[i32],
    weights: &[f64],
) -> Result<Vec<f64>> {
    let (h, k) = (c.hidden, c.top_k);
    let d = c.expert_width();
    let inter = c.local_intermediate();
    let xe = match (&c.latent, &w.latent) {
        (Some(l), Some(lw)) => linear(x, tokens, h, &lw.fc1, l.size, lw.fc1_bias.as_deref()),
        (None, None) => x.to_vec(),
        _ => return Err(MoeError::TensorPresence { what: "latent", required: c.latent.is_some() }),
    };
    let mut routed = vec![0.0; tokens * d];
    for t in 0..tokens {
        for j in 0..k {
            let id = ids[t * k + j];
            if id < 0 {
                continue;
            }
            let local = match &w.expert_map {
                Some(m) => m[id as usize],
                None => id,
            };
            if local < 0 {
                continue;
            }
            let wt = weights[t * k + j];
            let on_input = c.expert.apply_weight_on_input;
            let y = mlp_row(
                &c.expert.mlp,
                &w.experts,
                local as usize,
                d,
                inter,
                &xe[t * d..(t + 1) * d],
                if on_input { wt } else { 1.0 },
                true,
            );
            let scale = if on_input { 1.0 } else { wt };
            for (o, v) in y.iter().enumerate() {
                routed[t * d + o] += scale * v;
            }
        }
    }
    let mut out = match (&c.latent, &w.latent) {
        (Some(l), Some(lw)) => linear(&routed, tokens, l.size, &lw.fc2, h, lw.fc2_bias.as_deref()),
        _ => routed,
    };
    let os = c.output_scale();
    out.iter_mut().for_each(|v| *v *= os);
    if let (true, Some(sc), Some(sw)) = (c.computes_shared(), &c.shared, &w.shared) {
        let is = c.shared_local_intermediate();
        for t in 0..tokens {
            let xt = &x[t * h..(t + 1) * h];
            let g = match (sc.gate, &sw.gate) {
                (SharedGate::SigmoidLinear, Some(gw)) => math::sigmoid(dot(xt, gw)),
                (SharedGate::None, None) => 1.0,
                _ => {
                    return Err(MoeError::TensorPresence {
                        what: "shared.gate_weight",
                        required: sc.gate == SharedGate::SigmoidLinear,
                    });
                }
            };
            let y = mlp_row(&sc.mlp, &sw.mlp, 0, h, is, xt, 1.0, true);
            for (o, v) in y.iter().enumerate() {
                out[t * h + o] += g * v;
            }
        }
    }
    Ok(out)
}

/// The whole layer in float64 (one rank: `tp_size` must be 1).
pub fn forward(
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    tokens: usize,
) -> Result<(Routing, Vec<f64>)> {
    c.validate()?;
    if c.parallel.tp_size != 1 {
        return Err(MoeError::Unsupported {
            backend: "reference",
            what: "tp_size > 1 (run the unsharded layer)",
        });
    }
    if x.len() != tokens * c.hidden {
        return Err(MoeError::ShapeMismatch {
            what: "x",
            expected: tokens * c.hidden,
            got: x.len(),
        });
    }
    let r = route(c, w, x, tokens);
    let out = output_for_routing(c, w, x, tokens, &r.topk_ids, &r.topk_weights)?;
    Ok((r, out))
}

fn shard_rows(m: &[f64], n: usize, inter: usize, width: usize, tp: usize, rank: usize) -> Vec<f64> {
    // [n, inter, width] -> [n, inter/tp, width], rows rank*is..(rank+1)*is of each block.
    let is = inter / tp;
    let mut out = Vec::with_capacity(n * is * width);
    for e in 0..n {
        let base = e * inter * width + rank * is * width;
        out.extend_from_slice(&m[base..base + is * width]);
    }
    out
}

fn shard_cols(m: &[f64], n: usize, width: usize, inter: usize, tp: usize, rank: usize) -> Vec<f64> {
    // [n, width, inter] -> [n, width, inter/tp], columns rank*is..(rank+1)*is of each row.
    let is = inter / tp;
    let mut out = Vec::with_capacity(n * width * is);
    for r in 0..n * width {
        let base = r * inter + rank * is;
        out.extend_from_slice(&m[base..base + is]);
    }
    out
}

fn shard_mlp(m: &HostMlp, n: usize, inter: usize, width: usize, tp: usize, rank: usize) -> HostMlp {
    HostMlp {
        gate: m.gate.as_ref().map(|g| shard_rows(g, n, inter, width, tp, rank)),
        up: shard_rows(&m.up, n, inter, width, tp, rank),
        down: shard_cols(&m.down, n, width, inter, tp, rank),
        gate_bias: m.gate_bias.as_ref().map(|b| shard_rows(b, n, inter, 1, tp, rank)),
        up_bias: m.up_bias.as_ref().map(|b| shard_rows(b, n, inter, 1, tp, rank)),
        down_bias: if rank == 0 { m.down_bias.clone() } else { None },
    }
}

impl HostWeights {
    /// The weights tensor-parallel rank `rank` of `tp` holds, for the unsharded `config`: the
    /// expert and shared intermediate dimensions split into `tp` equal shards, output-side
    /// biases on rank 0 only, router and latent projections replicated.
    pub fn shard_tp(&self, config: &MoeConfig, tp: usize, rank: usize) -> HostWeights {
        let d = config.expert_width();
        let mut w = self.clone();
        w.experts = shard_mlp(
            &self.experts,
            config.local_experts(),
            config.expert.mlp.intermediate,
            d,
            tp,
            rank,
        );
        if let (Some(s), Some(sc)) = (&self.shared, &config.shared) {
            w.shared = Some(HostShared {
                mlp: shard_mlp(&s.mlp, 1, sc.mlp.intermediate, config.hidden, tp, rank),
                gate: s.gate.clone(),
            });
        }
        if let (Some(l), true) = (&mut w.latent, rank != 0) {
            l.fc2_bias = None;
        }
        w
    }
}

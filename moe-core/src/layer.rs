//! The layer orchestration, written once over [`MoeStages`]:
//!
//! ```text
//! x ─► router logits ─► route ─► permute ─► (latent fc1) ─► expert_up ─► expert_down ─► combine
//!   ─► (latent fc2, routed scale) ─► + gate(x)·shared(x) ─► Partial ─► reduce (tp > 1) ─► Reduced
//! ```

use crate::backend::{
    Backend, ExpertRows, MlpWeights, MoeStages, PermuteBuffers, Scratch, split_workspace,
};
use crate::config::{MlpConfig, MoeConfig, SharedGate};
use crate::element::Element;
use crate::error::{MoeError, Result};
use crate::plan::MoePlan;
use crate::reduce::{Collective, Partial, Reduced};

/// The shared expert's weights (`[Is, H]`, `[H, Is]`) and its optional gate vector `[H]`.
pub struct SharedWeights<'a, B: Backend, T: Element> {
    /// The MLP.
    pub mlp: MlpWeights<'a, B, T>,
    /// `shared.gate_weight`, present iff the config's gate is [`SharedGate::SigmoidLinear`].
    pub gate: Option<B::View<'a, T>>,
}

/// Latent projections: `fc1 [L, H]`, `fc2 [H, L]`, biases `[L]`, `[H]`.
pub struct LatentWeights<'a, B: Backend, T: Element> {
    /// Down-projection to the latent width.
    pub fc1: B::View<'a, T>,
    /// Up-projection back to the hidden width.
    pub fc2: B::View<'a, T>,
    /// fc1 bias.
    pub fc1_bias: Option<B::View<'a, T>>,
    /// fc2 bias.
    pub fc2_bias: Option<B::View<'a, T>>,
}

/// All weights of a layer, as views over storage the caller owns. Shapes are those of
/// `golden/FORMAT.md` with E the local experts and I, Is the local (per-rank) intermediates.
pub struct MoeWeights<'a, B: Backend, T: Element> {
    /// `[E, H]` router weight (all experts, global).
    pub router: B::View<'a, T>,
    /// `[E]` router bias.
    pub router_bias: Option<B::View<'a, T>>,
    /// `[E]` selection-only bias, f32.
    pub selection_bias: Option<B::View<'a, f32>>,
    /// Routed experts.
    pub experts: MlpWeights<'a, B, T>,
    /// Shared expert.
    pub shared: Option<SharedWeights<'a, B, T>>,
    /// Latent projections.
    pub latent: Option<LatentWeights<'a, B, T>>,
    /// `[E]` global expert id -> local expert index, or -1 (required with expert placement).
    pub expert_map: Option<B::View<'a, i32>>,
}

fn check_len<B: Backend, U: bytemuck::Pod>(
    what: &'static str,
    v: &B::View<'_, U>,
    expected: usize,
) -> Result<()> {
    let got = B::view_len(v);
    if got != expected { Err(MoeError::ShapeMismatch { what, expected, got }) } else { Ok(()) }
}

fn check_opt<B: Backend, U: bytemuck::Pod>(
    what: &'static str,
    v: &Option<B::View<'_, U>>,
    required: bool,
    expected: usize,
) -> Result<()> {
    match (v, required) {
        (Some(v), true) => check_len::<B, U>(what, v, expected),
        (None, false) => Ok(()),
        (_, required) => Err(MoeError::TensorPresence { what, required }),
    }
}

#[allow(clippy::too_many_arguments)]
fn check_mlp<B: Backend, T: Element>(
    names: [&'static str; 6],
    mlp: &MlpConfig,
    w: &MlpWeights<'_, B, T>,
    n: usize,
    inter: usize,
    width: usize,
    out_bias: bool,
) -> Result<()> {
    check_opt::<B, T>(names[0], &w.gate, mlp.gated, n * inter * width)?;
    check_len::<B, T>(names[1], &w.up, n * inter * width)?;
    check_len::<B, T>(names[2], &w.down, n * width * inter)?;
    check_opt::<B, T>(names[3], &w.gate_bias, mlp.bias && mlp.gated, n * inter)?;
    check_opt::<B, T>(names[4], &w.up_bias, mlp.bias, n * inter)?;
    check_opt::<B, T>(names[5], &w.down_bias, mlp.bias && out_bias, n * width)
}

impl<B: Backend, T: Element> MoeWeights<'_, B, T> {
    /// Check every tensor's presence and length against the configuration. Output-side biases
    /// (expert down, shared down, latent fc2) are given on tensor-parallel rank 0 only.
    pub fn validate(&self, c: &MoeConfig) -> Result<()> {
        let (h, e) = (c.hidden, c.experts);
        check_len::<B, T>("router.weight", &self.router, e * h)?;
        check_opt::<B, T>("router.bias", &self.router_bias, c.router.bias, e)?;
        check_opt::<B, f32>(
            "router.selection_bias",
            &self.selection_bias,
            c.router.selection_bias,
            e,
        )?;
        let rank0 = c.adds_output_bias();
        check_mlp(
            [
                "experts.gate",
                "experts.up",
                "experts.down",
                "experts.gate_bias",
                "experts.up_bias",
                "experts.down_bias",
            ],
            &c.expert.mlp,
            &self.experts,
            c.local_experts(),
            c.local_intermediate(),
            c.expert_width(),
            rank0,
        )?;
        match (&c.shared, &self.shared) {
            (None, None) => {}
            (Some(s), Some(w)) => {
                check_mlp(
                    [
                        "shared.gate",
                        "shared.up",
                        "shared.down",
                        "shared.gate_bias",
                        "shared.up_bias",
                        "shared.down_bias",
                    ],
                    &s.mlp,
                    &w.mlp,
                    1,
                    c.shared_local_intermediate(),
                    h,
                    rank0,
                )?;
                check_opt::<B, T>(
                    "shared.gate_weight",
                    &w.gate,
                    s.gate == SharedGate::SigmoidLinear,
                    h,
                )?;
            }
            (req, _) => {
                return Err(MoeError::TensorPresence { what: "shared", required: req.is_some() });
            }
        }
        match (&c.latent, &self.latent) {
            (None, None) => {}
            (Some(l), Some(w)) => {
                check_len::<B, T>("latent.fc1", &w.fc1, l.size * h)?;
                check_len::<B, T>("latent.fc2", &w.fc2, h * l.size)?;
                check_opt::<B, T>("latent.fc1_bias", &w.fc1_bias, l.bias, l.size)?;
                check_opt::<B, T>(
                    "latent.fc2_bias",
                    &w.fc2_bias,
                    l.bias && c.adds_latent_bias(),
                    h,
                )?;
            }
            (req, _) => {
                return Err(MoeError::TensorPresence { what: "latent", required: req.is_some() });
            }
        }
        check_opt::<B, i32>("expert_map", &self.expert_map, c.parallel.experts.is_some(), e)
    }
}

/// Check a forward's arguments against the plan. Returns the layout's scratch.
fn prepare<'w, B: Backend, T: Element>(
    plan: &MoePlan,
    weights: &MoeWeights<'_, B, T>,
    tokens: usize,
    x: &B::View<'_, T>,
    out: &B::ViewMut<'_, T>,
    workspace: B::ViewMut<'w, u8>,
) -> Result<Scratch<'w, B, T>> {
    let c = plan.config();
    if tokens > plan.max_tokens() {
        return Err(MoeError::TooManyTokens { tokens, max: plan.max_tokens() });
    }
    weights.validate(c)?;
    check_len::<B, T>("x", x, tokens * c.hidden)?;
    let got = B::view_mut_len(out);
    if got != tokens * c.hidden {
        return Err(MoeError::ShapeMismatch { what: "out", expected: tokens * c.hidden, got });
    }
    split_workspace::<B, T>(&plan.layout(T::DTYPE)?, workspace)
}

/// Run the layer on `tokens` tokens of `x` (`[T, H]`) into `out` (`[T, H]`), returning this
/// rank's partial sum: merge other partial sums into it, then reduce it once.
pub fn forward_partial<'o, B: MoeStages<T>, T: Element>(
    backend: &B,
    plan: &MoePlan,
    weights: &MoeWeights<'_, B, T>,
    tokens: usize,
    x: B::View<'_, T>,
    out: B::ViewMut<'o, T>,
    workspace: B::ViewMut<'_, u8>,
) -> Result<Partial<'o, B, T>> {
    let s = prepare(plan, weights, tokens, &x, &out, workspace)?;
    let partial = Partial::from_unreduced(out);
    if tokens == 0 {
        return Ok(partial);
    }
    backend.begin_forward()?;
    let r = stages(backend, plan, weights, tokens, x, s, partial);
    let end = backend.end_forward();
    let partial = r?;
    end?;
    Ok(partial)
}

/// The stages of [`forward_partial`] on the checked workspace `s`, into `partial`.
fn stages<'o, B: MoeStages<T>, T: Element>(
    backend: &B,
    plan: &MoePlan,
    weights: &MoeWeights<'_, B, T>,
    tokens: usize,
    x: B::View<'_, T>,
    s: Scratch<'_, B, T>,
    mut partial: Partial<'o, B, T>,
) -> Result<Partial<'o, B, T>> {
    let c = plan.config();
    let Scratch {
        mut logits,
        mut topk_ids,
        mut topk_weights,
        mut route_scratch,
        mut expert_offsets,
        mut expert_cursor,
        mut sorted_slots,
        mut slot_rows,
        mut hidden,
        mut expert_out,
        mut latent_in,
        mut routed,
        mut shared_hidden,
        mut shared_gate,
    } = s;
    let (h, e) = (c.hidden, c.experts);
    backend.router_logits(
        tokens,
        h,
        e,
        x,
        weights.router,
        weights.router_bias,
        B::reborrow(&mut logits),
    )?;
    backend.route(
        c,
        tokens,
        B::as_view(&logits),
        weights.selection_bias,
        B::reborrow(&mut route_scratch),
        B::reborrow(&mut topk_ids),
        B::reborrow(&mut topk_weights),
    )?;
    backend.permute(
        plan,
        tokens,
        B::as_view(&topk_ids),
        weights.expert_map,
        PermuteBuffers {
            expert_offsets: B::reborrow(&mut expert_offsets),
            expert_cursor: B::reborrow(&mut expert_cursor),
            sorted_slots: B::reborrow(&mut sorted_slots),
            slot_rows: B::reborrow(&mut slot_rows),
        },
    )?;
    let rank0 = c.adds_output_bias();
    let expert_in = match (&c.latent, &weights.latent) {
        (Some(l), Some(lw)) => {
            backend.linear(
                tokens,
                h,
                l.size,
                x,
                lw.fc1,
                lw.fc1_bias,
                None,
                1.0,
                false,
                B::reborrow(&mut latent_in),
            )?;
            B::as_view(&latent_in)
        }
        _ => B::narrow(x),
    };
    let on_input = c.expert.apply_weight_on_input;
    let rows = |w: bool| ExpertRows::<B> {
        expert_offsets: B::as_view(&expert_offsets),
        sorted_slots: B::as_view(&sorted_slots),
        weights: w.then(|| B::as_view(&topk_weights)),
    };
    backend.expert_up(
        plan,
        tokens,
        expert_in,
        &weights.experts,
        rows(on_input),
        B::reborrow(&mut hidden),
    )?;
    let mut down = weights.experts;
    if !rank0 {
        down.down_bias = None;
    }
    backend.expert_down(
        plan,
        tokens,
        B::as_view(&hidden),
        &down,
        rows(!on_input),
        B::reborrow(&mut expert_out),
    )?;
    let out_scale = c.output_scale() as f32;
    match (&c.latent, &weights.latent) {
        (Some(l), Some(lw)) => {
            backend.combine(
                plan,
                tokens,
                l.size,
                B::as_view(&expert_out),
                B::as_view(&slot_rows),
                1.0,
                B::reborrow(&mut routed),
            )?;
            backend.linear(
                tokens,
                l.size,
                h,
                B::as_view(&routed),
                lw.fc2,
                if c.adds_latent_bias() { lw.fc2_bias } else { None },
                None,
                out_scale,
                false,
                partial.buf_mut(),
            )?;
        }
        _ => backend.combine(
            plan,
            tokens,
            h,
            B::as_view(&expert_out),
            B::as_view(&slot_rows),
            out_scale,
            partial.buf_mut(),
        )?,
    }
    if let (true, Some(sc), Some(sw)) = (c.computes_shared(), &c.shared, &weights.shared) {
        let is = c.shared_local_intermediate();
        backend.mlp_up(&sc.mlp, tokens, h, is, x, &sw.mlp, B::reborrow(&mut shared_hidden))?;
        let gate = match sw.gate {
            Some(gw) => {
                backend.sigmoid_gate(tokens, h, x, gw, B::reborrow(&mut shared_gate))?;
                Some(B::as_view(&shared_gate))
            }
            None => None,
        };
        // The shared partial sum is merged into the routed one before the single reduce.
        backend.linear(
            tokens,
            is,
            h,
            B::as_view(&shared_hidden),
            sw.mlp.down,
            if rank0 { sw.mlp.down_bias } else { None },
            gate,
            1.0,
            true,
            partial.buf_mut(),
        )?;
    }
    Ok(partial)
}

/// Run the layer and reduce it across the collective's ranks: exactly one all-reduce when
/// `tp_size > 1`, none when it is 1.
#[allow(clippy::too_many_arguments)]
pub fn forward<'o, B: MoeStages<T>, T: Element, C: Collective<B, T>>(
    backend: &B,
    plan: &MoePlan,
    weights: &MoeWeights<'_, B, T>,
    tokens: usize,
    x: B::View<'_, T>,
    out: B::ViewMut<'o, T>,
    workspace: B::ViewMut<'_, u8>,
    collective: &C,
) -> Result<Reduced<'o, B, T>> {
    let p = &plan.config().parallel;
    if collective.world_size() != p.tp_size || collective.rank() != p.tp_rank {
        return Err(MoeError::CollectiveMismatch {
            expected_world: p.tp_size,
            got_world: collective.world_size(),
        });
    }
    forward_partial(backend, plan, weights, tokens, x, out, workspace)?.reduce(backend, collective)
}

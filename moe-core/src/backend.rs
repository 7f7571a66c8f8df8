//! The backend traits: buffer views (so a framework passes its own storage) and the stages of
//! a layer. The layer orchestration in [`crate::layer`] is written once on top of them.

use crate::config::{MlpConfig, MoeConfig};
use crate::element::Element;
use crate::error::{MoeError, Result};
use crate::plan::{MoePlan, Region, WorkspaceLayout};
use bytemuck::Pod;

/// A backend's buffer views. The caller owns all storage; a backend only borrows views.
pub trait Backend: Sized {
    /// The backend's name, for messages.
    const NAME: &'static str;
    /// A shared view of `U`s (e.g. `&'a [U]`, a cudarc `CudaView<'a, U>`).
    type View<'a, U: Pod>: Copy
    where
        U: 'a;
    /// An exclusive view of `U`s.
    type ViewMut<'a, U: Pod>
    where
        U: 'a;

    /// Elements in a view.
    fn view_len<U: Pod>(v: &Self::View<'_, U>) -> usize;
    /// Elements in a mutable view.
    fn view_mut_len<U: Pod>(v: &Self::ViewMut<'_, U>) -> usize;
    /// Shared view of a mutable view.
    fn as_view<'b, 'c: 'b, U: Pod>(v: &'b Self::ViewMut<'c, U>) -> Self::View<'b, U>;
    /// The same view with a shorter lifetime (views are invariant in their lifetime).
    fn narrow<'b, 'c: 'b, U: Pod>(v: Self::View<'c, U>) -> Self::View<'b, U>;
    /// Shorter-lived mutable view of a mutable view.
    fn reborrow<'b, 'c: 'b, U: Pod>(v: &'b mut Self::ViewMut<'c, U>) -> Self::ViewMut<'b, U>;
    /// Split a mutable view at element `mid` (`mid <= len`).
    fn split_at<'a, U: Pod>(
        v: Self::ViewMut<'a, U>,
        mid: usize,
    ) -> (Self::ViewMut<'a, U>, Self::ViewMut<'a, U>);
    /// Bytes to skip from the start of `v` to reach an address aligned to `align`.
    fn misalignment(v: &Self::ViewMut<'_, u8>, align: usize) -> usize;
    /// Reinterpret an aligned byte view whose length is a multiple of `size_of::<U>()`.
    fn cast_bytes<'a, U: Pod>(v: Self::ViewMut<'a, u8>) -> Result<Self::ViewMut<'a, U>>;
}

/// The weights of an MLP: the routed experts (`[E, I, D]` / `[E, D, I]`) or the shared expert
/// (`[I, H]` / `[H, I]`). Biases are `[E, I]` / `[E, D]`.
pub struct MlpWeights<'a, B: Backend, T: Element> {
    /// Gate projection (gated MLPs only).
    pub gate: Option<B::View<'a, T>>,
    /// Up projection.
    pub up: B::View<'a, T>,
    /// Down projection.
    pub down: B::View<'a, T>,
    /// Gate bias.
    pub gate_bias: Option<B::View<'a, T>>,
    /// Up bias.
    pub up_bias: Option<B::View<'a, T>>,
    /// Down bias.
    pub down_bias: Option<B::View<'a, T>>,
}

impl<B: Backend, T: Element> Clone for MlpWeights<'_, B, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend, T: Element> Copy for MlpWeights<'_, B, T> {}

/// The permutation buffers written by [`MoeStages::permute`].
pub struct PermuteBuffers<'a, B: Backend> {
    /// `[E_local + 1]` row offsets.
    pub expert_offsets: B::ViewMut<'a, i32>,
    /// `[E_local]` scatter cursors.
    pub expert_cursor: B::ViewMut<'a, i32>,
    /// `[rows]` slot of each row (-1 for padding).
    pub sorted_slots: B::ViewMut<'a, i32>,
    /// `[T, K]` row of each slot (-1 when not computed here).
    pub slot_rows: B::ViewMut<'a, i32>,
}

/// A grouped expert GEMM's routing inputs.
pub struct ExpertRows<'a, B: Backend> {
    /// `[E_local + 1]` row offsets.
    pub expert_offsets: B::View<'a, i32>,
    /// `[rows]` slot of each row (-1 for padding).
    pub sorted_slots: B::View<'a, i32>,
    /// `[T, K]` weights to apply in this GEMM's epilogue, or `None`.
    pub weights: Option<B::View<'a, f32>>,
}

/// The stages of an MoE layer for element type `T`. Every method works on views the caller
/// owns, checks what it reads, and never allocates.
pub trait MoeStages<T: Element>: Backend {
    /// Called by [`crate::forward_partial`] before a forward's first stage (after its checks).
    /// A backend may then record the forward's stages into one batch (e.g. one command
    /// submission) until [`MoeStages::end_forward`]; stages called outside a begin/end pair run
    /// as they always do. Default: nothing.
    fn begin_forward(&self) -> Result<()> {
        Ok(())
    }

    /// Called by [`crate::forward_partial`] after a forward's last stage, also when a stage
    /// failed: a batching backend submits what it recorded (an error of that submission is
    /// the forward's error). Default: nothing.
    fn end_forward(&self) -> Result<()> {
        Ok(())
    }

    /// `logits[t, e] = sum_h x[t, h] w[e, h] + b[e]`, accumulated and stored in f32.
    fn router_logits(
        &self,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: Self::View<'_, T>,
        weight: Self::View<'_, T>,
        bias: Option<Self::View<'_, T>>,
        logits: Self::ViewMut<'_, f32>,
    ) -> Result<()>;

    /// Select `[T, K]` expert ids and compute their final weights from the logits, following
    /// the rules of [`crate::math`]. `scratch` is the plan's `route_scratch` region.
    fn route(
        &self,
        config: &MoeConfig,
        tokens: usize,
        logits: Self::View<'_, f32>,
        selection_bias: Option<Self::View<'_, f32>>,
        scratch: Self::ViewMut<'_, f32>,
        topk_ids: Self::ViewMut<'_, i32>,
        topk_weights: Self::ViewMut<'_, f32>,
    ) -> Result<()>;

    /// Count slots per local expert, prefix-sum them (each block padded to the plan's row
    /// alignment) and write the slot of each row and the row of each slot. The order within an
    /// expert's block is ascending slot index.
    fn permute(
        &self,
        plan: &MoePlan,
        tokens: usize,
        topk_ids: Self::View<'_, i32>,
        expert_map: Option<Self::View<'_, i32>>,
        out: PermuteBuffers<'_, Self>,
    ) -> Result<()>;

    /// Grouped GEMM 1: `hidden[row] = act(gate_e x[t] + bg, up_e x[t] + bu)` for each row of
    /// expert `e` holding slot `t * K + k`; with `rows.weights`, the pre-activations are
    /// `w (W x) + b` (the weight applied on the input).
    fn expert_up(
        &self,
        plan: &MoePlan,
        tokens: usize,
        x: Self::View<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        hidden: Self::ViewMut<'_, T>,
    ) -> Result<()>;

    /// Grouped GEMM 2: `out[row] = w (down_e hidden[row] + bd)`, with `w = 1` when
    /// `rows.weights` is `None`; padding rows are left untouched.
    fn expert_down(
        &self,
        plan: &MoePlan,
        tokens: usize,
        hidden: Self::View<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        out: Self::ViewMut<'_, T>,
    ) -> Result<()>;

    /// `out[t] = scale * sum_k expert_out[slot_rows[t, k]]` over the slots with a row, summed
    /// in f32 in slot order (deterministic), rounded once.
    fn combine(
        &self,
        plan: &MoePlan,
        tokens: usize,
        width: usize,
        expert_out: Self::View<'_, T>,
        slot_rows: Self::View<'_, i32>,
        scale: f32,
        out: Self::ViewMut<'_, T>,
    ) -> Result<()>;

    /// A dense MLP's first half: `hidden[t] = act(gate x[t] + bg, up x[t] + bu)`.
    fn mlp_up(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        in_dim: usize,
        inter: usize,
        x: Self::View<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        hidden: Self::ViewMut<'_, T>,
    ) -> Result<()>;

    /// A dense linear: `y[t] = scale * rs[t] * (w x[t] + b)`, stored in `out` or added to it
    /// (the sum in f32, rounded once) when `accumulate`.
    fn linear(
        &self,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: Self::View<'_, T>,
        weight: Self::View<'_, T>,
        bias: Option<Self::View<'_, T>>,
        row_scale: Option<Self::View<'_, f32>>,
        scale: f32,
        accumulate: bool,
        out: Self::ViewMut<'_, T>,
    ) -> Result<()>;

    /// `gate[t] = sigmoid(x[t] . w)` in f32.
    fn sigmoid_gate(
        &self,
        tokens: usize,
        hidden: usize,
        x: Self::View<'_, T>,
        weight: Self::View<'_, T>,
        gate: Self::ViewMut<'_, f32>,
    ) -> Result<()>;

    /// `dst += src` element-wise (f32 sum, rounded once).
    fn add_assign(&self, dst: Self::ViewMut<'_, T>, src: Self::View<'_, T>) -> Result<()>;
}

/// The workspace cut into its typed regions.
pub struct Scratch<'a, B: Backend, T: Element> {
    /// See [`WorkspaceLayout::logits`].
    pub logits: B::ViewMut<'a, f32>,
    /// See [`WorkspaceLayout::topk_ids`].
    pub topk_ids: B::ViewMut<'a, i32>,
    /// See [`WorkspaceLayout::topk_weights`].
    pub topk_weights: B::ViewMut<'a, f32>,
    /// See [`WorkspaceLayout::route_scratch`].
    pub route_scratch: B::ViewMut<'a, f32>,
    /// See [`WorkspaceLayout::expert_offsets`].
    pub expert_offsets: B::ViewMut<'a, i32>,
    /// See [`WorkspaceLayout::expert_cursor`].
    pub expert_cursor: B::ViewMut<'a, i32>,
    /// See [`WorkspaceLayout::sorted_slots`].
    pub sorted_slots: B::ViewMut<'a, i32>,
    /// See [`WorkspaceLayout::slot_rows`].
    pub slot_rows: B::ViewMut<'a, i32>,
    /// See [`WorkspaceLayout::hidden`].
    pub hidden: B::ViewMut<'a, T>,
    /// See [`WorkspaceLayout::expert_out`].
    pub expert_out: B::ViewMut<'a, T>,
    /// See [`WorkspaceLayout::latent_in`].
    pub latent_in: B::ViewMut<'a, T>,
    /// See [`WorkspaceLayout::routed`].
    pub routed: B::ViewMut<'a, T>,
    /// See [`WorkspaceLayout::shared_hidden`].
    pub shared_hidden: B::ViewMut<'a, T>,
    /// See [`WorkspaceLayout::shared_gate`].
    pub shared_gate: B::ViewMut<'a, f32>,
}

struct Carver<'a, B: Backend> {
    rest: Option<B::ViewMut<'a, u8>>,
    at: usize,
}

impl<'a, B: Backend> Carver<'a, B> {
    fn take<U: Pod>(&mut self, r: Region) -> Result<B::ViewMut<'a, U>> {
        let rest = self.rest.take().expect("carver holds the rest between takes");
        let (_, rest) = B::split_at(rest, r.offset - self.at);
        let bytes = r.len * core::mem::size_of::<U>();
        let (mine, rest) = B::split_at(rest, bytes);
        self.rest = Some(rest);
        self.at = r.offset + bytes;
        B::cast_bytes(mine)
    }
}

/// Cut `workspace` into the regions of `layout` (checking its size and aligning its base).
pub fn split_workspace<'a, B: Backend, T: Element>(
    layout: &WorkspaceLayout,
    workspace: B::ViewMut<'a, u8>,
) -> Result<Scratch<'a, B, T>> {
    let got = B::view_mut_len(&workspace);
    if got < layout.total_bytes {
        return Err(MoeError::WorkspaceTooSmall { needed: layout.total_bytes, got });
    }
    let skip = B::misalignment(&workspace, crate::plan::REGION_ALIGN);
    let (_, aligned) = B::split_at(workspace, skip);
    let mut c = Carver::<B> { rest: Some(aligned), at: 0 };
    Ok(Scratch {
        logits: c.take(layout.logits)?,
        topk_ids: c.take(layout.topk_ids)?,
        topk_weights: c.take(layout.topk_weights)?,
        route_scratch: c.take(layout.route_scratch)?,
        expert_offsets: c.take(layout.expert_offsets)?,
        expert_cursor: c.take(layout.expert_cursor)?,
        sorted_slots: c.take(layout.sorted_slots)?,
        slot_rows: c.take(layout.slot_rows)?,
        hidden: c.take(layout.hidden)?,
        expert_out: c.take(layout.expert_out)?,
        latent_in: c.take(layout.latent_in)?,
        routed: c.take(layout.routed)?,
        shared_hidden: c.take(layout.shared_hidden)?,
        shared_gate: c.take(layout.shared_gate)?,
    })
}

//! Expert parallelism over an all-to-all (feature `nccl`): each rank holds its own tokens and a
//! block of the experts; every token slot is sent to the rank owning its expert, computed there,
//! and sent back. No all-reduce.
//!
//! ```text
//!  rank r, its T_r tokens:
//!  x ─► router ─► route ─► [host: topk ids + weights, dispatch order] ─► (latent fc1)
//!    ─► gather rows by destination rank ─► all-to-all (rows, expert ids, weights)
//!    ─► permute / expert_up / expert_down / combine(k = 1) on the received rows (local experts)
//!    ─► all-to-all back ─► combine over the token's K slots (slot order) ─► (latent fc2)
//!    ─► + gate(x)·shared(x), computed locally ─► out (complete: no reduce)
//! ```
//!
//! * The layer's stages are the single-GPU ones ([`moe_core::MoeStages`]); the row gathers are
//!   the combine kernel with one slot per row. No new kernel.
//! * Message sizes must be known on the host when NCCL's send / receive are enqueued, so a
//!   forward synchronizes its stream twice: after the routing (the ids and weights are read back
//!   and the dispatch order is computed on the host, [`plan_dispatch`]) and after the exchange
//!   of the per-rank counts. It therefore cannot be captured into a CUDA graph (the
//!   single-GPU and tensor-parallel forwards can). A device-side dispatch (counts by a kernel,
//!   capacity-padded messages) would lift both syncs; not done yet.
//! * Every rank must call [`ExpertParallel::forward`] for every layer, also with zero tokens
//!   (other ranks may send it rows). As with any NCCL program, a rank that returns an error
//!   part-way (a bad argument, a device error) leaves the other ranks waiting in the
//!   collective: treat an error as fatal for the communicator.
//! * The sums are the same as on one GPU: each slot's expert row is computed by the same GEMM
//!   kernel, and the K slots of a token are summed in slot order, so outputs match the one-GPU
//!   forward.
//! * Shapes: the rank's configuration has `tp_size = 1` and `parallel.experts =
//!   Some(ExpertPlacement { local_experts, include_shared: true })` (each rank computes the
//!   shared expert and adds every output bias for its own tokens); its weights hold the experts
//!   [`EpLayout::experts_of`] in that order and `expert_map = EpLayout::expert_map(rank)`. The
//!   router, shared expert and latent projections are replicated.

use crate::nccl::NcclCollective;
use crate::view::{DevView, DevViewMut};
use crate::{CudaBackend, CudaElement, launch};
use cudarc::driver::{CudaSlice, CudaStream, ValidAsZeroBits};
use moe_core::backend::{ExpertRows, MoeStages, PermuteBuffers, Scratch, split_workspace};
use moe_core::{Backend, MoeConfig, MoeError, MoePlan, MoeWeights, Result};
use std::sync::Arc;

const NAME: &str = "cuda-ep";

fn dev_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> MoeError {
    move |e| MoeError::Device { backend: NAME, what, code: e.0 as i64 }
}

/// Which rank owns each expert, and its index among that rank's experts (ascending global id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpLayout {
    world: usize,
    owner: Vec<usize>,
    local: Vec<usize>,
    per_rank: Vec<usize>,
}

impl EpLayout {
    /// `experts` experts in `world` contiguous, balanced blocks (expert `e` on rank
    /// `e * world / experts`). Needs `1 <= world <= experts`.
    pub fn contiguous(experts: usize, world: usize) -> Result<Self> {
        if world == 0 || experts < world {
            return Err(MoeError::InvalidParameter {
                what: "expert-parallel world",
                value: world as f64,
                rule: "1 <= world <= experts (every rank holds an expert)",
            });
        }
        Self::from_owners((0..experts).map(|e| e * world / experts).collect(), world)
    }

    /// Any placement: `owners[e]` is the rank of expert `e`. Every rank must own an expert.
    pub fn from_owners(owners: Vec<usize>, world: usize) -> Result<Self> {
        let mut per_rank = vec![0usize; world];
        let mut local = Vec::with_capacity(owners.len());
        for (e, &r) in owners.iter().enumerate() {
            if r >= world {
                return Err(MoeError::InvalidExpertMap { expert: e, value: r as i32 });
            }
            local.push(per_rank[r]);
            per_rank[r] += 1;
        }
        if world == 0 || per_rank.contains(&0) {
            return Err(MoeError::InvalidParameter {
                what: "expert-parallel placement",
                value: world as f64,
                rule: "every rank owns at least one expert",
            });
        }
        Ok(EpLayout { world, owner: owners, local, per_rank })
    }

    /// Ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Experts of the layer.
    pub fn experts(&self) -> usize {
        self.owner.len()
    }

    /// The rank owning expert `e` (None out of range).
    pub fn owner(&self, e: usize) -> Option<usize> {
        self.owner.get(e).copied()
    }

    /// Experts held by `rank` (0 out of range).
    pub fn local_experts(&self, rank: usize) -> usize {
        self.per_rank.get(rank).copied().unwrap_or(0)
    }

    /// The global ids of `rank`'s experts, in their local order (slice the weights so).
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.experts()).filter(|&e| self.owner[e] == rank).collect()
    }

    /// `rank`'s expert map (global id -> local index, or -1), for `MoeWeights::expert_map`.
    pub fn expert_map(&self, rank: usize) -> Vec<i32> {
        (0..self.experts())
            .map(|e| if self.owner[e] == rank { self.local[e] as i32 } else { -1 })
            .collect()
    }
}

/// Where a rank's token slots go ([`plan_dispatch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// Slots sent to each rank.
    pub send_counts: Vec<usize>,
    /// The slot (`token * top_k + k`) at each position of the send buffer: grouped by
    /// destination rank, in slot order within a rank.
    pub order: Vec<usize>,
    /// The send-buffer position of each slot (inverse of `order`), as the combine's slot rows;
    /// -1 for an empty slot (id -1), which is not sent.
    pub position: Vec<i32>,
}

/// The dispatch of one rank's routed slots: `topk_ids` (`[T, K]`, global expert ids) grouped
/// by the rank owning each expert; empty slots (id -1) are not sent. Errors (no panic) for any
/// other id outside `0..experts`.
pub fn plan_dispatch(layout: &EpLayout, topk_ids: &[i32]) -> Result<Dispatch> {
    let mut d = Dispatch::default();
    plan_dispatch_into(layout, topk_ids, &mut d)?;
    Ok(d)
}

fn plan_dispatch_into(layout: &EpLayout, ids: &[i32], d: &mut Dispatch) -> Result<()> {
    let w = layout.world;
    d.send_counts.clear();
    d.send_counts.resize(w, 0);
    let mut dest = Vec::with_capacity(ids.len());
    for &id in ids {
        // -1: a slot the router left empty (fewer than K experts had a number): not sent, and
        // skipped by the combine like on one GPU.
        let r = if id == -1 {
            None
        } else {
            Some(usize::try_from(id).ok().and_then(|e| layout.owner(e)).ok_or(
                MoeError::InvalidParameter {
                    what: "topk_ids (expert-parallel dispatch)",
                    value: id as f64,
                    rule: "-1 or 0 <= id < experts",
                },
            )?)
        };
        if let Some(r) = r {
            d.send_counts[r] += 1;
        }
        dest.push(r);
    }
    let mut next: Vec<usize> = Vec::with_capacity(w);
    let mut acc = 0;
    for &c in &d.send_counts {
        next.push(acc);
        acc += c;
    }
    d.order.clear();
    d.order.resize(acc, 0);
    d.position.clear();
    d.position.resize(ids.len(), -1);
    for (slot, r) in dest.iter().enumerate() {
        let Some(r) = *r else { continue };
        let p = next[r];
        next[r] += 1;
        d.order[p] = slot;
        d.position[slot] = i32::try_from(p).map_err(|_| MoeError::InvalidParameter {
            what: "expert-parallel slots",
            value: p as f64,
            rule: "fits in i32",
        })?;
    }
    Ok(())
}

/// What one expert-parallel forward moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpStats {
    /// Slots (rows) this rank sent (including those it kept).
    pub sent_rows: usize,
    /// Slots (rows) this rank received and computed (including its own).
    pub received_rows: usize,
    /// [`NcclCollective::all_to_all`] calls enqueued: 5 (the counts; the rows, expert ids
    /// and routing weights, fused in one NCCL group; the results back).
    pub all_to_alls: usize,
    /// All-reduces enqueued: always 0.
    pub all_reduces: usize,
}

/// The buffers and plans of expert-parallel forwards on one rank (allocated once, for at most
/// `max_tokens` tokens per rank on every rank).
pub struct ExpertParallel<T: CudaElement> {
    layout: EpLayout,
    rank: usize,
    top_k: usize,
    width: usize,
    max_tokens: usize,
    recv_plan: MoePlan,
    send_x: CudaSlice<T>,
    recv_x: CudaSlice<T>,
    y_recv: CudaSlice<T>,
    ret: CudaSlice<T>,
    send_ids: CudaSlice<i32>,
    recv_ids: CudaSlice<i32>,
    send_w: CudaSlice<f32>,
    recv_w: CudaSlice<f32>,
    gather_idx: CudaSlice<i32>,
    position: CudaSlice<i32>,
    counts_send: CudaSlice<i32>,
    counts_recv: CudaSlice<i32>,
    recv_ws: CudaSlice<u8>,
    host_ids: Vec<i32>,
    host_w: Vec<f32>,
    dispatch: Dispatch,
}

impl<T: CudaElement> std::fmt::Debug for ExpertParallel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ExpertParallel(rank {} of {}, {} local experts, max {} tokens)",
            self.rank,
            self.layout.world,
            self.layout.local_experts(self.rank),
            self.max_tokens
        )
    }
}

fn alloc<U: cudarc::driver::DeviceRepr + ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<U>> {
    s.alloc_zeros::<U>(n.max(1)).map_err(dev_err("cuMemAlloc"))
}

fn check_config(c: &MoeConfig, layout: &EpLayout, rank: usize) -> Result<()> {
    let p = &c.parallel;
    if p.tp_size != 1 {
        return Err(MoeError::InconsistentConfig {
            what: "the all-to-all expert-parallel forward needs tp_size = 1",
        });
    }
    match p.experts {
        Some(e) if e.include_shared => {
            if e.local_experts != layout.local_experts(rank) || layout.experts() != c.experts {
                return Err(MoeError::InconsistentConfig {
                    what: "parallel.experts.local_experts / experts differ from the EpLayout",
                });
            }
        }
        _ => {
            return Err(MoeError::InconsistentConfig {
                what: "the all-to-all expert-parallel forward needs parallel.experts = \
                       Some(ExpertPlacement { include_shared: true, .. })",
            });
        }
    }
    if rank >= layout.world {
        return Err(MoeError::CollectiveMismatch {
            expected_world: layout.world,
            got_world: rank + 1,
        });
    }
    Ok(())
}

impl<T: CudaElement + ValidAsZeroBits + crate::nccl::NcclElement> ExpertParallel<T>
where
    CudaBackend: MoeStages<T>,
{
    /// Buffers for `rank` of `layout` running `config` (the rank's configuration, see the
    /// module docs) on at most `max_tokens` tokens per rank, allocated on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        config: &MoeConfig,
        layout: EpLayout,
        rank: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        config.validate()?;
        check_config(config, &layout, rank)?;
        let (k, d, w) = (config.top_k, config.expert_width(), layout.world);
        let el = layout.local_experts(rank);
        let overflow = || MoeError::InvalidParameter {
            what: "expert-parallel max_tokens",
            value: max_tokens as f64,
            rule: "world * max_tokens * top_k rows fit in memory sizes",
        };
        let send_rows = max_tokens.checked_mul(k).ok_or_else(overflow)?;
        // A token sends at most min(K, local experts of r) slots to rank r.
        let recv_rows = w.checked_mul(max_tokens * k.min(el)).ok_or_else(overflow)?;
        // The received rows are tokens with one slot each, of width `d`, for the local experts.
        let mut rc = *config;
        rc.hidden = d;
        rc.top_k = 1;
        rc.latent = None;
        rc.shared = None;
        rc.router.groups = None;
        // Padded for the pipelined GEMM too (a multiple of the simple kernel's tile).
        let recv_plan = MoePlan::with_row_align(&rc, recv_rows, CudaBackend::ROW_ALIGN_PIPELINED)?;
        let ws_bytes = recv_plan.workspace_bytes(T::DTYPE)? + moe_core::REGION_ALIGN;
        let n = |rows: usize| rows.checked_mul(d).ok_or_else(overflow);
        Ok(ExpertParallel {
            rank,
            top_k: k,
            width: d,
            max_tokens,
            send_x: alloc(stream, n(send_rows)?)?,
            recv_x: alloc(stream, n(recv_rows)?)?,
            y_recv: alloc(stream, n(recv_rows)?)?,
            ret: alloc(stream, n(send_rows)?)?,
            send_ids: alloc(stream, send_rows)?,
            recv_ids: alloc(stream, recv_rows)?,
            send_w: alloc(stream, send_rows)?,
            recv_w: alloc(stream, recv_rows)?,
            gather_idx: alloc(stream, send_rows)?,
            position: alloc(stream, send_rows)?,
            counts_send: alloc(stream, w)?,
            counts_recv: alloc(stream, w)?,
            recv_ws: alloc(stream, ws_bytes)?,
            recv_plan,
            layout,
            host_ids: Vec::with_capacity(send_rows),
            host_w: Vec::with_capacity(send_rows),
            dispatch: Dispatch::default(),
        })
    }

    /// The placement.
    pub fn layout(&self) -> &EpLayout {
        &self.layout
    }

    /// Run the layer on this rank's `tokens` tokens of `x` (`[T, H]`) into `out` (`[T, H]`,
    /// complete: no reduce follows), exchanging slots with the other ranks through `comm`.
    /// `plan` and `weights` are this rank's (see the module docs); `workspace` holds
    /// `plan.workspace_bytes`. Synchronizes `backend`'s stream twice (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        backend: &CudaBackend,
        comm: &NcclCollective,
        plan: &MoePlan,
        weights: &MoeWeights<'_, CudaBackend, T>,
        tokens: usize,
        x: DevView<'_, T>,
        mut out: DevViewMut<'_, T>,
        workspace: DevViewMut<'_, u8>,
    ) -> Result<EpStats> {
        let c = plan.config();
        check_config(c, &self.layout, self.rank)?;
        if comm.world_size() != self.layout.world || comm.rank() != self.rank {
            return Err(MoeError::CollectiveMismatch {
                expected_world: self.layout.world,
                got_world: comm.world_size(),
            });
        }
        if c.top_k != self.top_k || c.expert_width() != self.width {
            return Err(MoeError::InconsistentConfig {
                what: "the plan's top_k / expert width differ from ExpertParallel::new's",
            });
        }
        let max = self.max_tokens.min(plan.max_tokens());
        if tokens > max {
            return Err(MoeError::TooManyTokens { tokens, max });
        }
        weights.validate(c)?;
        if weights.expert_map.is_none() {
            return Err(MoeError::TensorPresence { what: "expert_map", required: true });
        }
        let (h, e, k, d) = (c.hidden, c.experts, c.top_k, self.width);
        let need = |what, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(MoeError::ShapeMismatch { what, expected, got })
            }
        };
        need("x", x.len, tokens * h)?;
        need("out", out.len, tokens * h)?;
        let s: Scratch<'_, CudaBackend, T> = split_workspace(&plan.layout(T::DTYPE)?, workspace)?;
        let Scratch {
            mut logits,
            mut topk_ids,
            mut topk_weights,
            mut route_scratch,
            mut latent_in,
            routed,
            mut shared_hidden,
            mut shared_gate,
            ..
        } = s;
        let stream = backend.stream().clone();
        let cu = stream.cu_stream();
        let b = backend;
        let w = self.layout.world;
        let sync = |what| stream.synchronize().map_err(dev_err(what));

        // 1. Routing of this rank's tokens; ids and weights to the host.
        let n_slots = tokens * k;
        self.host_ids.clear();
        self.host_ids.resize(n_slots, 0);
        self.host_w.clear();
        self.host_w.resize(n_slots, 0.0);
        if tokens > 0 {
            b.router_logits(
                tokens,
                h,
                e,
                x,
                weights.router,
                weights.router_bias,
                CudaBackend::reborrow(&mut logits),
            )?;
            b.route(
                c,
                tokens,
                CudaBackend::as_view(&logits),
                weights.selection_bias,
                CudaBackend::reborrow(&mut route_scratch),
                CudaBackend::reborrow(&mut topk_ids),
                CudaBackend::reborrow(&mut topk_weights),
            )?;
            // SAFETY: the regions hold at least tokens * K elements (the plan's layout); the
            // host vectors have exactly that many; the copies are on the stream that wrote
            // them and complete before the synchronize below, before the vectors are read.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut self.host_ids, topk_ids.ptr, cu)
                    .map_err(dev_err("cuMemcpyDtoHAsync"))?;
                cudarc::driver::result::memcpy_dtoh_async(&mut self.host_w, topk_weights.ptr, cu)
                    .map_err(dev_err("cuMemcpyDtoHAsync"))?;
            }
            sync("synchronize (routing)")?;
        }

        // 2. Dispatch order on the host; counts exchanged.
        plan_dispatch_into(&self.layout, &self.host_ids, &mut self.dispatch)?;
        let dsp = &self.dispatch;
        let gather: Vec<i32> = dsp.order.iter().map(|&s| (s / k.max(1)) as i32).collect();
        let ids: Vec<i32> = dsp.order.iter().map(|&s| self.host_ids[s]).collect();
        let wts: Vec<f32> = dsp.order.iter().map(|&s| self.host_w[s]).collect();
        let counts: Vec<i32> = dsp.send_counts.iter().map(|&n| n as i32).collect();
        // SAFETY: each destination buffer was allocated with at least as many elements as the
        // source slice (send_rows >= tokens * K, world counts); the host vectors live until
        // the synchronize after the count exchange, which orders the copies before they drop.
        unsafe {
            upload(&self.gather_idx, &gather, cu)?;
            upload(&self.position, &dsp.position, cu)?;
            upload(&self.send_ids, &ids, cu)?;
            upload(&self.send_w, &wts, cu)?;
            upload(&self.counts_send, &counts, cu)?;
        }
        let ones = vec![1usize; w];
        comm.all_to_all(
            &stream,
            DevView::of(&self.counts_send),
            &ones,
            DevViewMut::of(&mut self.counts_recv),
            &ones,
            1,
        )?;
        let mut recv_counts_i = vec![0i32; w];
        // SAFETY: `counts_recv` holds `w` i32s; the copy completes before the synchronize.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut recv_counts_i,
                DevView::of(&self.counts_recv).ptr,
                cu,
            )
            .map_err(dev_err("cuMemcpyDtoHAsync"))?;
        }
        sync("synchronize (counts)")?;
        drop((gather, ids, wts));
        let send_counts = dsp.send_counts.clone();
        let n_send: usize = send_counts.iter().sum();
        let mut recv_counts = Vec::with_capacity(w);
        for &cnt in &recv_counts_i {
            recv_counts.push(usize::try_from(cnt).map_err(|_| MoeError::InvalidParameter {
                what: "received slot count",
                value: cnt as f64,
                rule: ">= 0",
            })?);
        }
        let n_recv: usize = recv_counts.iter().sum();
        if n_recv > self.recv_plan.max_tokens() {
            return Err(MoeError::TooManyTokens {
                tokens: n_recv,
                max: self.recv_plan.max_tokens(),
            });
        }

        // 3. Expert input rows (latent fc1 first), gathered in dispatch order and exchanged.
        let src = match (&c.latent, &weights.latent) {
            (Some(l), Some(lw)) if tokens > 0 => {
                b.linear(
                    tokens,
                    h,
                    l.size,
                    x,
                    lw.fc1,
                    lw.fc1_bias,
                    None,
                    1.0,
                    false,
                    CudaBackend::reborrow(&mut latent_in),
                )?;
                CudaBackend::as_view(&latent_in).prefix(tokens * d)
            }
            _ => x,
        };
        if n_send > 0 {
            launch::combine(
                &stream,
                &backend.kernels,
                T::INDEX,
                src.ptr,
                DevView::of(&self.gather_idx).ptr,
                DevViewMut::of(&mut self.send_x).ptr,
                n_send as u32,
                d as i32,
                1,
                1.0,
            )?;
        }
        {
            let g = comm.group()?;
            comm.all_to_all(
                &stream,
                DevView::of(&self.send_x),
                &send_counts,
                DevViewMut::of(&mut self.recv_x),
                &recv_counts,
                d,
            )?;
            comm.all_to_all(
                &stream,
                DevView::of(&self.send_ids),
                &send_counts,
                DevViewMut::of(&mut self.recv_ids),
                &recv_counts,
                1,
            )?;
            comm.all_to_all(
                &stream,
                DevView::of(&self.send_w),
                &send_counts,
                DevViewMut::of(&mut self.recv_w),
                &recv_counts,
                1,
            )?;
            g.end()?;
        }

        // 4. The local experts on the received rows (one slot per row), in received order.
        if n_recv > 0 {
            let rp = &self.recv_plan;
            let rs: Scratch<'_, CudaBackend, T> =
                split_workspace(&rp.layout(T::DTYPE)?, DevViewMut::of(&mut self.recv_ws))?;
            let Scratch {
                mut expert_offsets,
                mut expert_cursor,
                mut sorted_slots,
                mut slot_rows,
                mut hidden,
                mut expert_out,
                ..
            } = rs;
            let recv_ids = DevView::of(&self.recv_ids).prefix(n_recv);
            let recv_w = DevView::of(&self.recv_w).prefix(n_recv);
            let recv_x = DevView::of(&self.recv_x).prefix(n_recv * d);
            b.permute(
                rp,
                n_recv,
                recv_ids,
                weights.expert_map,
                PermuteBuffers {
                    expert_offsets: CudaBackend::reborrow(&mut expert_offsets),
                    expert_cursor: CudaBackend::reborrow(&mut expert_cursor),
                    sorted_slots: CudaBackend::reborrow(&mut sorted_slots),
                    slot_rows: CudaBackend::reborrow(&mut slot_rows),
                },
            )?;
            let on_input = c.expert.apply_weight_on_input;
            let rows = |wt: bool| ExpertRows::<CudaBackend> {
                expert_offsets: CudaBackend::as_view(&expert_offsets),
                sorted_slots: CudaBackend::as_view(&sorted_slots),
                weights: wt.then_some(recv_w),
            };
            b.expert_up(
                rp,
                n_recv,
                recv_x,
                &weights.experts,
                rows(on_input),
                CudaBackend::reborrow(&mut hidden),
            )?;
            b.expert_down(
                rp,
                n_recv,
                CudaBackend::as_view(&hidden),
                &weights.experts,
                rows(!on_input),
                CudaBackend::reborrow(&mut expert_out),
            )?;
            b.combine(
                rp,
                n_recv,
                d,
                CudaBackend::as_view(&expert_out),
                CudaBackend::as_view(&slot_rows),
                1.0,
                DevViewMut::of(&mut self.y_recv).prefix(n_recv * d),
            )?;
        }

        // 5. Results back to the slots' ranks, in dispatch order.
        comm.all_to_all(
            &stream,
            DevView::of(&self.y_recv),
            &recv_counts,
            DevViewMut::of(&mut self.ret),
            &send_counts,
            d,
        )?;

        // 6. Each token's K slots summed in slot order (then latent fc2), plus the shared expert.
        if tokens > 0 {
            let out_scale = c.output_scale() as f32;
            let ret = DevView::of(&self.ret).ptr;
            let pos = DevView::of(&self.position).ptr;
            match (&c.latent, &weights.latent) {
                (Some(l), Some(lw)) => {
                    launch::combine(
                        &stream,
                        &backend.kernels,
                        T::INDEX,
                        ret,
                        pos,
                        routed.ptr,
                        tokens as u32,
                        l.size as i32,
                        k as i32,
                        1.0,
                    )?;
                    b.linear(
                        tokens,
                        l.size,
                        h,
                        CudaBackend::as_view(&routed).prefix(tokens * l.size),
                        lw.fc2,
                        lw.fc2_bias,
                        None,
                        out_scale,
                        false,
                        CudaBackend::reborrow(&mut out),
                    )?;
                }
                _ => launch::combine(
                    &stream,
                    &backend.kernels,
                    T::INDEX,
                    ret,
                    pos,
                    out.ptr,
                    tokens as u32,
                    h as i32,
                    k as i32,
                    out_scale,
                )?,
            }
            if let (Some(sc), Some(sw)) = (&c.shared, &weights.shared) {
                let is = c.shared_local_intermediate();
                b.mlp_up(
                    &sc.mlp,
                    tokens,
                    h,
                    is,
                    x,
                    &sw.mlp,
                    CudaBackend::reborrow(&mut shared_hidden),
                )?;
                let gate = match sw.gate {
                    Some(gw) => {
                        b.sigmoid_gate(tokens, h, x, gw, CudaBackend::reborrow(&mut shared_gate))?;
                        Some(CudaBackend::as_view(&shared_gate))
                    }
                    None => None,
                };
                b.linear(
                    tokens,
                    is,
                    h,
                    CudaBackend::as_view(&shared_hidden),
                    sw.mlp.down,
                    sw.mlp.down_bias,
                    gate,
                    1.0,
                    true,
                    CudaBackend::reborrow(&mut out),
                )?;
            }
        }
        Ok(EpStats { sent_rows: n_send, received_rows: n_recv, all_to_alls: 5, all_reduces: 0 })
    }
}

/// Copy `src` to the start of `dst` on the stream.
///
/// # Safety
/// `dst` holds at least `src.len()` elements and `src` lives until the stream has passed the
/// copy.
unsafe fn upload<U: cudarc::driver::DeviceRepr>(
    dst: &CudaSlice<U>,
    src: &[U],
    cu: cudarc::driver::sys::CUstream,
) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    if src.len() > dst.len() {
        return Err(MoeError::ShapeMismatch {
            what: "expert-parallel upload",
            expected: src.len(),
            got: dst.len(),
        });
    }
    // SAFETY: the caller guarantees the sizes and the lifetime of `src` (see above).
    unsafe {
        cudarc::driver::result::memcpy_htod_async(DevView::of(dst).ptr, src, cu)
            .map_err(dev_err("cuMemcpyHtoDAsync"))
    }
}

/// [`ExpertParallel::forward`] as a function.
#[allow(clippy::too_many_arguments)]
pub fn forward_expert_parallel<T: CudaElement + ValidAsZeroBits + crate::nccl::NcclElement>(
    ep: &mut ExpertParallel<T>,
    backend: &CudaBackend,
    comm: &NcclCollective,
    plan: &MoePlan,
    weights: &MoeWeights<'_, CudaBackend, T>,
    tokens: usize,
    x: DevView<'_, T>,
    out: DevViewMut<'_, T>,
    workspace: DevViewMut<'_, u8>,
) -> Result<EpStats>
where
    CudaBackend: MoeStages<T>,
{
    ep.forward(backend, comm, plan, weights, tokens, x, out, workspace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_layout_and_maps() {
        let l = EpLayout::contiguous(8, 2).expect("layout");
        assert_eq!(l.experts_of(1), vec![4, 5, 6, 7]);
        assert_eq!(l.expert_map(0), vec![0, 1, 2, 3, -1, -1, -1, -1]);
        assert_eq!(l.expert_map(1), vec![-1, -1, -1, -1, 0, 1, 2, 3]);
        let u = EpLayout::contiguous(5, 2).expect("uneven");
        assert_eq!((u.local_experts(0), u.local_experts(1)), (3, 2));
        assert!(EpLayout::contiguous(1, 2).is_err());
        assert!(EpLayout::from_owners(vec![0, 0], 2).is_err());
        assert!(EpLayout::from_owners(vec![0, 3], 2).is_err());
        let s = EpLayout::from_owners(vec![1, 0, 1, 0], 2).expect("strided");
        assert_eq!(s.expert_map(1), vec![0, -1, 1, -1]);
        assert_eq!(s.experts_of(0), vec![1, 3]);
    }

    #[test]
    fn dispatch_groups_by_rank_in_slot_order() {
        let l = EpLayout::contiguous(4, 2).expect("layout");
        // 3 tokens, K = 2.
        let ids = [3, 0, 1, 2, 2, 3];
        let d = plan_dispatch(&l, &ids).expect("dispatch");
        assert_eq!(d.send_counts, vec![2, 4]);
        assert_eq!(d.order, vec![1, 2, 0, 3, 4, 5]);
        for (p, &s) in d.order.iter().enumerate() {
            assert_eq!(d.position[s], p as i32);
        }
        assert!(plan_dispatch(&l, &[0, 4]).is_err());
        assert!(plan_dispatch(&l, &[-2]).is_err());
        let e = plan_dispatch(&l, &[-1, 3, 1, -1]).expect("empty slots");
        assert_eq!(
            (e.send_counts, e.order, e.position),
            (vec![1, 1], vec![2, 1], vec![-1, 1, 0, -1])
        );
        assert_eq!(plan_dispatch(&l, &[]).expect("empty").send_counts, vec![0, 0]);
    }

    /// The data flow of [`ExpertParallel::forward`] on the host, for `world` ranks: gather in
    /// dispatch order, blocks exchanged in rank order, a per-slot "expert" on the owner, blocks
    /// back, and the sum of each token's slots through `position`. Must equal the direct sum.
    fn simulate(layout: &EpLayout, ids_per_rank: &[Vec<i32>], k: usize) {
        let w = layout.world();
        let expert = |e: i32, token: f64| if e < 0 { 0.0 } else { 1000.0 * e as f64 + token };
        let d: Vec<Dispatch> =
            ids_per_rank.iter().map(|ids| plan_dispatch(layout, ids).expect("dispatch")).collect();
        // Sent: (global token id, expert id) per position, grouped by destination.
        let base: Vec<usize> = (0..w)
            .scan(0, |a, r| {
                let b = *a;
                *a += ids_per_rank[r].len() / k;
                Some(b)
            })
            .collect();
        let sent: Vec<Vec<(f64, i32)>> = (0..w)
            .map(|r| {
                d[r].order.iter().map(|&s| ((base[r] + s / k) as f64, ids_per_rank[r][s])).collect()
            })
            .collect();
        let block = |r: usize, p: usize| {
            let lo: usize = d[r].send_counts[..p].iter().sum();
            lo..lo + d[r].send_counts[p]
        };
        // Receiver p: blocks from ranks 0..w in order; computes; returns the same blocks.
        let mut back: Vec<Vec<f64>> = (0..w).map(|r| vec![f64::NAN; sent[r].len()]).collect();
        for p in 0..w {
            let recv: Vec<(f64, i32)> =
                (0..w).flat_map(|r| sent[r][block(r, p)].iter().copied()).collect();
            let y: Vec<f64> = recv
                .iter()
                .map(|&(t, e)| {
                    assert_eq!(layout.owner(e as usize), Some(p), "slot sent to its owner");
                    expert(e, t)
                })
                .collect();
            let mut at = 0;
            for r in 0..w {
                let n = d[r].send_counts[p];
                back[r][block(r, p)].copy_from_slice(&y[at..at + n]);
                at += n;
            }
        }
        for r in 0..w {
            let tokens = ids_per_rank[r].len() / k;
            for t in 0..tokens {
                let got: f64 = (0..k)
                    .map(|j| match d[r].position[t * k + j] {
                        -1 => 0.0,
                        p => back[r][p as usize],
                    })
                    .sum();
                let want: f64 =
                    (0..k).map(|j| expert(ids_per_rank[r][t * k + j], (base[r] + t) as f64)).sum();
                assert_eq!(got, want, "rank {r} token {t}");
            }
        }
    }

    #[test]
    fn dispatch_and_return_reassemble_every_token() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for (experts, world, k) in [(4, 2, 2), (8, 2, 1), (8, 4, 3), (5, 2, 2), (16, 3, 4)] {
            let layout = EpLayout::contiguous(experts, world).expect("layout");
            let ids: Vec<Vec<i32>> = (0..world)
                .map(|r| {
                    let tokens = if r == 0 { 0 } else { next(9) };
                    (0..tokens * k)
                        .map(|_| if next(7) == 0 { -1 } else { next(experts) as i32 })
                        .collect()
                })
                .collect();
            simulate(&layout, &ids, k);
        }
    }
}

//! The portable, scalar first version of every stage: the reference the fast paths are
//! tested against, and the fallback wherever a fast path does not apply.

use crate::{Cpu, dot, expert_range, need, need_opt};
use moe_core::backend::{ExpertRows, MlpWeights, PermuteBuffers};
use moe_core::math::{self, RouteScratch};
use moe_core::{Element, MlpConfig, MoeConfig, MoeError, MoePlan, Result};

/// The portable stages of a [`Cpu`] backend.
pub(crate) struct Portable<'a>(pub &'a Cpu);

impl Portable<'_> {
    pub(crate) fn router_logits<T: Element>(
        &self,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        logits: &mut [f32],
    ) -> Result<()> {
        need("x", x, tokens * hidden)?;
        need("router.weight", weight, experts * hidden)?;
        need_opt("router.bias", bias, experts)?;
        need("logits", logits, tokens * experts)?;
        let bad = |v: &T| !v.to_f32().is_finite();
        if let Some(i) =
            self.0.check_finite_input.then(|| x[..tokens * hidden].iter().position(bad)).flatten()
        {
            return Err(MoeError::NonFiniteInput { what: "x", index: i });
        }
        for t in 0..tokens {
            let xt = &x[t * hidden..(t + 1) * hidden];
            for e in 0..experts {
                logits[t * experts + e] = dot(xt, &weight[e * hidden..(e + 1) * hidden])
                    + bias.map_or(0.0, |b| b[e].to_f32());
            }
        }
        Ok(())
    }

    pub(crate) fn route(
        &self,
        c: &MoeConfig,
        tokens: usize,
        logits: &[f32],
        selection_bias: Option<&[f32]>,
        scratch: &mut [f32],
        topk_ids: &mut [i32],
        topk_weights: &mut [f32],
    ) -> Result<()> {
        let (e, k) = (c.experts, c.top_k);
        let ng = c.router.groups.map_or(0, |g| g.n_group);
        need("logits", logits, tokens * e)?;
        need_opt("router.selection_bias", selection_bias, e)?;
        need("route_scratch", scratch, 2 * e + ng + k)?;
        need("topk_ids", topk_ids, tokens * k)?;
        need("topk_weights", topk_weights, tokens * k)?;
        let (scores, rest) = scratch.split_at_mut(e);
        let (selection, rest) = rest.split_at_mut(e);
        let (groups, staging) = rest.split_at_mut(ng);
        for t in 0..tokens {
            math::route_token(
                c,
                &logits[t * e..(t + 1) * e],
                selection_bias,
                RouteScratch {
                    scores: &mut *scores,
                    selection: &mut *selection,
                    groups: &mut *groups,
                    staging: &mut *staging,
                },
                &mut topk_ids[t * k..(t + 1) * k],
                &mut topk_weights[t * k..(t + 1) * k],
            );
        }
        Ok(())
    }

    pub(crate) fn permute(
        &self,
        plan: &MoePlan,
        tokens: usize,
        topk_ids: &[i32],
        expert_map: Option<&[i32]>,
        out: PermuteBuffers<'_, Cpu>,
    ) -> Result<()> {
        let c = plan.config();
        let (k, el, align) = (c.top_k, c.local_experts(), plan.row_align());
        let slots = tokens * k;
        let PermuteBuffers { expert_offsets, expert_cursor, sorted_slots, slot_rows } = out;
        need("topk_ids", topk_ids, slots)?;
        need("expert_offsets", expert_offsets, el + 1)?;
        need("expert_cursor", expert_cursor, el)?;
        need("slot_rows", slot_rows, slots)?;
        need("sorted_slots", sorted_slots, plan.rows_capacity(tokens))?;
        let cursor = &mut expert_cursor[..el];
        cursor.fill(0);
        if let Some(map) = expert_map {
            need("expert_map", map, c.experts)?;
            for (g, &l) in map[..c.experts].iter().enumerate() {
                if l < -1 || l >= el as i32 || (l >= 0 && cursor[l as usize] != 0) {
                    return Err(MoeError::InvalidExpertMap { expert: g, value: l });
                }
                if l >= 0 {
                    cursor[l as usize] = 1;
                }
            }
            cursor.fill(0);
        }
        let local = |id: i32| -> Result<Option<usize>> {
            if id < -1 || id >= c.experts as i32 {
                return Err(MoeError::InvalidParameter {
                    what: "topk_ids",
                    value: id as f64,
                    rule: "-1 <= id < experts",
                });
            }
            Ok(match (id, expert_map) {
                (-1, _) => None,
                (id, Some(m)) => usize::try_from(m[id as usize]).ok(),
                (id, None) => Some(id as usize),
            })
        };
        for &id in &topk_ids[..slots] {
            if let Some(l) = local(id)? {
                cursor[l] += 1;
            }
        }
        let mut at = 0usize;
        for l in 0..el {
            expert_offsets[l] = at as i32;
            at += (cursor[l] as usize).div_ceil(align) * align;
            cursor[l] = 0;
        }
        expert_offsets[el] = at as i32;
        sorted_slots[..at].fill(-1);
        for (slot, &id) in topk_ids[..slots].iter().enumerate() {
            slot_rows[slot] = match local(id)? {
                Some(l) => {
                    let row = expert_offsets[l] as usize + cursor[l] as usize;
                    cursor[l] += 1;
                    sorted_slots[row] = slot as i32;
                    row as i32
                }
                None => -1,
            };
        }
        Ok(())
    }

    pub(crate) fn expert_up<T: Element>(
        &self,
        plan: &MoePlan,
        tokens: usize,
        x: &[T],
        w: &MlpWeights<'_, Cpu, T>,
        rows: ExpertRows<'_, Cpu>,
        hidden: &mut [T],
    ) -> Result<()> {
        let c = plan.config();
        let (d, inter, el, k) =
            (c.expert_width(), c.local_intermediate(), c.local_experts(), c.top_k);
        need("expert input", x, tokens * d)?;
        Cpu::check_mlp(w, c.expert.mlp.gated, el, inter, d)?;
        need_opt("topk_weights", rows.weights, tokens * k)?;
        for e in 0..el {
            for row in expert_range(rows.expert_offsets, e, rows.sorted_slots.len())? {
                let Ok(slot) = usize::try_from(rows.sorted_slots[row]) else { continue };
                let t = slot / k;
                if t >= tokens {
                    continue;
                }
                need("hidden", hidden, (row + 1) * inter)?;
                let s = rows.weights.map_or(1.0, |wt| wt[slot]);
                Cpu::up_rows(
                    &c.expert.mlp,
                    d,
                    inter,
                    e,
                    &x[t * d..(t + 1) * d],
                    s,
                    w,
                    &mut hidden[row * inter..(row + 1) * inter],
                );
            }
        }
        Ok(())
    }

    pub(crate) fn expert_down<T: Element>(
        &self,
        plan: &MoePlan,
        tokens: usize,
        hidden: &[T],
        w: &MlpWeights<'_, Cpu, T>,
        rows: ExpertRows<'_, Cpu>,
        out: &mut [T],
    ) -> Result<()> {
        let c = plan.config();
        let (d, inter, el, k) =
            (c.expert_width(), c.local_intermediate(), c.local_experts(), c.top_k);
        need("experts.down", w.down, el * d * inter)?;
        need_opt("experts.down_bias", w.down_bias, el * d)?;
        need_opt("topk_weights", rows.weights, tokens * k)?;
        for e in 0..el {
            let wd = &w.down[e * d * inter..(e + 1) * d * inter];
            for row in expert_range(rows.expert_offsets, e, rows.sorted_slots.len())? {
                let Ok(slot) = usize::try_from(rows.sorted_slots[row]) else { continue };
                if slot >= tokens * k {
                    continue;
                }
                need("hidden", hidden, (row + 1) * inter)?;
                need("expert_out", out, (row + 1) * d)?;
                let h = &hidden[row * inter..(row + 1) * inter];
                let s = rows.weights.map_or(1.0, |wt| wt[slot]);
                for o in 0..d {
                    let v = dot(h, &wd[o * inter..(o + 1) * inter])
                        + w.down_bias.map_or(0.0, |b| b[e * d + o].to_f32());
                    out[row * d + o] = T::from_f32(s * v);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn combine<T: Element>(
        &self,
        plan: &MoePlan,
        tokens: usize,
        width: usize,
        expert_out: &[T],
        slot_rows: &[i32],
        scale: f32,
        out: &mut [T],
    ) -> Result<()> {
        let k = plan.config().top_k;
        need("slot_rows", slot_rows, tokens * k)?;
        need("out", out, tokens * width)?;
        for &r in &slot_rows[..tokens * k] {
            if r >= 0 {
                need("expert_out", expert_out, (r as usize + 1) * width)?;
            }
        }
        for t in 0..tokens {
            let rs = &slot_rows[t * k..(t + 1) * k];
            for o in 0..width {
                let mut acc = 0f32;
                for &r in rs {
                    if r >= 0 {
                        acc += expert_out[r as usize * width + o].to_f32();
                    }
                }
                out[t * width + o] = T::from_f32(scale * acc);
            }
        }
        Ok(())
    }

    pub(crate) fn mlp_up<T: Element>(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        in_dim: usize,
        inter: usize,
        x: &[T],
        w: &MlpWeights<'_, Cpu, T>,
        hidden: &mut [T],
    ) -> Result<()> {
        need("x", x, tokens * in_dim)?;
        need("hidden", hidden, tokens * inter)?;
        Cpu::check_mlp(w, mlp.gated, 1, inter, in_dim)?;
        for t in 0..tokens {
            Cpu::up_rows(
                mlp,
                in_dim,
                inter,
                0,
                &x[t * in_dim..(t + 1) * in_dim],
                1.0,
                w,
                &mut hidden[t * inter..(t + 1) * inter],
            );
        }
        Ok(())
    }

    pub(crate) fn linear<T: Element>(
        &self,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        row_scale: Option<&[f32]>,
        scale: f32,
        accumulate: bool,
        out: &mut [T],
    ) -> Result<()> {
        need("linear.x", x, tokens * in_dim)?;
        need("linear.weight", weight, out_dim * in_dim)?;
        need_opt("linear.bias", bias, out_dim)?;
        need_opt("linear.row_scale", row_scale, tokens)?;
        need("linear.out", out, tokens * out_dim)?;
        for t in 0..tokens {
            let xt = &x[t * in_dim..(t + 1) * in_dim];
            let s = scale * row_scale.map_or(1.0, |r| r[t]);
            for o in 0..out_dim {
                let v = s
                    * (dot(xt, &weight[o * in_dim..(o + 1) * in_dim])
                        + bias.map_or(0.0, |b| b[o].to_f32()));
                let dst = &mut out[t * out_dim + o];
                *dst = T::from_f32(if accumulate { dst.to_f32() + v } else { v });
            }
        }
        Ok(())
    }

    pub(crate) fn sigmoid_gate<T: Element>(
        &self,
        tokens: usize,
        hidden: usize,
        x: &[T],
        weight: &[T],
        gate: &mut [f32],
    ) -> Result<()> {
        need("x", x, tokens * hidden)?;
        need("shared.gate_weight", weight, hidden)?;
        need("shared_gate", gate, tokens)?;
        for t in 0..tokens {
            gate[t] = math::sigmoid(dot(&x[t * hidden..(t + 1) * hidden], &weight[..hidden]));
        }
        Ok(())
    }

    pub(crate) fn add_assign<T: Element>(&self, dst: &mut [T], src: &[T]) -> Result<()> {
        need("add_assign.src", src, dst.len())?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = T::from_f32(d.to_f32() + s.to_f32());
        }
        Ok(())
    }
}

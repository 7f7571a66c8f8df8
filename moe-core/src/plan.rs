//! `MoePlan`: the shapes of one layer for up to `max_tokens` tokens, and the workspace a forward
//! needs, computed up front so that a forward never allocates.

use crate::config::MoeConfig;
use crate::element::DType;
use crate::error::{MoeError, Result};

/// Alignment of every workspace region, in bytes (also a valid CUDA/wgpu storage alignment).
pub const REGION_ALIGN: usize = 256;

/// One typed region of the workspace: byte offset from the aligned base, and element count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Region {
    /// Byte offset from the (aligned) start of the workspace.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

/// Where each intermediate of a forward lives in the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkspaceLayout {
    /// `f32 [T, E]` router logits.
    pub logits: Region,
    /// `i32 [T, K]` chosen expert ids (global; -1 for an empty slot).
    pub topk_ids: Region,
    /// `f32 [T, K]` final routing weights.
    pub topk_weights: Region,
    /// `f32 [2 E + n_group + K]` host routing scratch (scores, selection values, group scores,
    /// staging for a user-supplied reduce); GPU backends may leave it unused.
    pub route_scratch: Region,
    /// `i32 [E_local + 1]` first permuted row of each local expert (the last entry is the total).
    pub expert_offsets: Region,
    /// `i32 [E_local]` per-expert cursor used while scattering.
    pub expert_cursor: Region,
    /// `i32 [rows]` the slot (`t * K + k`) in each permuted row, -1 for padding rows.
    pub sorted_slots: Region,
    /// `i32 [T, K]` the permuted row of each slot, -1 if its expert is not local or empty.
    pub slot_rows: Region,
    /// `T [rows, I_local]` activated expert intermediate.
    pub hidden: Region,
    /// `T [rows, D]` weighted expert outputs (D = latent size or hidden).
    pub expert_out: Region,
    /// `T [T, L]` latent input `fc1 x` (empty without latent).
    pub latent_in: Region,
    /// `T [T, L]` combined routed output before fc2 (empty without latent).
    pub routed: Region,
    /// `T [T, Is_local]` shared-expert intermediate (empty without a shared expert).
    pub shared_hidden: Region,
    /// `f32 [T]` shared-expert sigmoid gate (empty without one).
    pub shared_gate: Region,
    /// Total bytes, including [`REGION_ALIGN`] bytes of slack to align the base.
    pub total_bytes: usize,
}

/// The validated shapes of a layer for up to `max_tokens` tokens.
#[derive(Clone, Copy, Debug)]
pub struct MoePlan {
    config: MoeConfig,
    max_tokens: usize,
    row_align: usize,
}

fn overflow() -> MoeError {
    MoeError::InvalidParameter {
        what: "workspace size",
        value: f64::INFINITY,
        rule: "the plan's buffers must fit in usize",
    }
}

impl MoePlan {
    /// Validate `config` and plan for up to `max_tokens` tokens, rows unpadded.
    pub fn new(config: &MoeConfig, max_tokens: usize) -> Result<MoePlan> {
        Self::with_row_align(config, max_tokens, 1)
    }

    /// As [`MoePlan::new`], with each expert's block of permuted rows padded to a multiple of
    /// `row_align` (a GPU GEMM's M tile).
    pub fn with_row_align(
        config: &MoeConfig,
        max_tokens: usize,
        row_align: usize,
    ) -> Result<MoePlan> {
        config.validate()?;
        if row_align == 0 {
            return Err(MoeError::ZeroDimension { what: "row_align" });
        }
        if max_tokens > i32::MAX as usize / config.top_k {
            return Err(MoeError::InvalidParameter {
                what: "max_tokens",
                value: max_tokens as f64,
                rule: "max_tokens * top_k fits in i32",
            });
        }
        let plan = MoePlan { config: *config, max_tokens, row_align };
        plan.layout(DType::F32)?; // every size fits
        Ok(plan)
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The largest token count a forward may use.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The row padding of each expert's block.
    pub fn row_align(&self) -> usize {
        self.row_align
    }

    /// Upper bound on permuted rows for `tokens` tokens.
    pub fn rows_capacity(&self, tokens: usize) -> usize {
        let pad = self.config.local_experts().saturating_mul(self.row_align - 1);
        tokens.saturating_mul(self.config.top_k).saturating_add(pad)
    }

    /// The workspace layout for element type `dtype`.
    pub fn layout(&self, dtype: DType) -> Result<WorkspaceLayout> {
        let c = &self.config;
        let t = self.max_tokens;
        let k = c.top_k;
        let el = c.local_experts();
        let rows = self.rows_capacity(t);
        if rows > i32::MAX as usize {
            return Err(MoeError::InvalidParameter {
                what: "permuted rows",
                value: rows as f64,
                rule: "tokens * top_k + experts * (row_align - 1) fits in i32",
            });
        }
        let lat = c.latent.map_or(0, |l| l.size);
        let es = dtype.size_bytes();
        let mut at = 0usize;
        let mut region = |len: usize, size: usize| -> Result<Region> {
            let bytes = len.checked_mul(size).ok_or_else(overflow)?;
            let r = Region { offset: at, len };
            at =
                at.checked_add(bytes.div_ceil(REGION_ALIGN) * REGION_ALIGN).ok_or_else(overflow)?;
            Ok(r)
        };
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(overflow);
        let ng = c.router.groups.map_or(0, |g| g.n_group);
        let has_gate = c.shared.is_some_and(|s| s.gate == crate::config::SharedGate::SigmoidLinear);
        let mut l = WorkspaceLayout {
            logits: region(mul(t, c.experts)?, 4)?,
            topk_ids: region(mul(t, k)?, 4)?,
            topk_weights: region(mul(t, k)?, 4)?,
            route_scratch: region(2 * c.experts + ng + k, 4)?,
            expert_offsets: region(el + 1, 4)?,
            expert_cursor: region(el, 4)?,
            sorted_slots: region(rows, 4)?,
            slot_rows: region(mul(t, k)?, 4)?,
            hidden: region(mul(rows, c.local_intermediate())?, es)?,
            expert_out: region(mul(rows, c.expert_width())?, es)?,
            latent_in: region(mul(t, lat)?, es)?,
            routed: region(mul(t, lat)?, es)?,
            shared_hidden: region(mul(t, c.shared_local_intermediate())?, es)?,
            shared_gate: region(if has_gate { t } else { 0 }, 4)?,
            total_bytes: 0,
        };
        l.total_bytes = at.checked_add(REGION_ALIGN).ok_or_else(overflow)?;
        Ok(l)
    }

    /// Bytes of workspace a forward needs for element type `dtype`.
    pub fn workspace_bytes(&self, dtype: DType) -> Result<usize> {
        Ok(self.layout(dtype)?.total_bytes)
    }
}

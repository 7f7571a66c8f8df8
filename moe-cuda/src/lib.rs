//! # moe-cuda
//!
//! The CUDA backend of moe-kernels: every stage of an MoE layer ([`moe_core::MoeStages`]) for
//! `f32`, `half::f16` and `half::bf16` on NVIDIA GPUs (sm_80 and newer), running the kernels
//! of [`moe_kernels`] through cudarc on the caller's stream.
//!
//! * The fatbin is loaded once per CUDA context ([`CudaBackend::new`]).
//! * A forward allocates nothing and never synchronizes with the host, so a whole
//!   [`moe_core::forward`] can be captured into a CUDA graph and replayed. The stages only
//!   launch kernels; [`DevView::of`] is the one call that touches cudarc's per-allocation
//!   event tracking, so with several streams make the views before `begin_capture` (or switch
//!   tracking off with `CudaContext::disable_event_tracking` before allocating).
//! * Plans must pad each expert's rows to the grouped GEMM's tile:
//!   `MoePlan::with_row_align(config, max_tokens, CudaBackend::ROW_ALIGN)`.
//! * Routing with a user-supplied top-k reduce ([`moe_core::TopkReduce::Custom`]) is not run
//!   on the GPU: [`MoeStages::route`] returns [`MoeError::Unsupported`] for it.
//!
//! Views are [`DevView`] / [`DevViewMut`]: copyable wrappers over cudarc slices and views
//! (`DevView::of(&slice)`).
//!
//! Without a CUDA driver on the machine, cudarc (built with dynamic loading) would panic at its
//! first call; [`driver_available`] checks for the library first and [`CudaBackend::new`]
//! returns an error instead.
//!
//! With the feature `nccl`: multi-GPU layers. [`nccl::NcclCollective`] is the tensor-parallel
//! [`moe_core::Collective`] (one NCCL all-reduce per layer) and carries the all-to-all of the
//! expert-parallel forward, [`ep::ExpertParallel`] (no all-reduce).

#[cfg(feature = "nccl")]
pub mod ep;
mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
mod view;

use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use moe_core::backend::{Backend, ExpertRows, MlpWeights, MoeStages, PermuteBuffers};
use moe_core::config::{
    Activation, GroupScore, MlpConfig, MoeConfig, Scoring, TopkReduce, WeightSource,
};
use moe_core::{DType, Element, MoeError, MoePlan, Result};
use std::sync::{Arc, Mutex, Weak};

pub use view::{DevView, DevViewMut};

const NAME: &str = "cuda";

pub(crate) fn err(what: &'static str) -> impl Fn(DriverError) -> MoeError {
    move |e| MoeError::Device { backend: NAME, what, code: e.0 as i64 }
}

fn unsupported(what: &'static str) -> MoeError {
    MoeError::Unsupported { backend: NAME, what }
}

/// Whether the CUDA driver library (`libcuda.so.1` / `nvcuda.dll`) can be loaded. cudarc with
/// dynamic loading panics on its first call without it; check this first.
pub fn driver_available() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: only tries to open the driver library with libloading; no symbol is called.
        unsafe { cudarc::driver::sys::is_culib_present() }
    })
    .unwrap_or(false)
}

/// A context on device `ordinal`, or the reason there is none (no driver, no device, no
/// kernels compiled in). Never panics.
pub fn try_context(ordinal: usize) -> std::result::Result<Arc<CudaContext>, String> {
    if !moe_kernels::AVAILABLE {
        return Err("moe-kernels was built without nvcc (no CUDA kernels)".into());
    }
    if !driver_available() {
        return Err("no CUDA driver library (libcuda) on this machine".into());
    }
    match std::panic::catch_unwind(|| CudaContext::new(ordinal)) {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(format!("no CUDA device {ordinal}: {e:?}")),
        Err(_) => Err("the CUDA driver could not be initialized".into()),
    }
}

/// Element types the CUDA kernels support.
pub trait CudaElement: Element + cudarc::driver::DeviceRepr {
    /// Kernel variant index (0 f32, 1 f16, 2 bf16).
    const INDEX: usize;
    /// Whether the GEMM may use 16-byte loads of 8 elements.
    const VEC8: bool;
}
impl CudaElement for f32 {
    const INDEX: usize = 0;
    const VEC8: bool = false;
}
impl CudaElement for half::f16 {
    const INDEX: usize = 1;
    const VEC8: bool = true;
}
impl CudaElement for half::bf16 {
    const INDEX: usize = 2;
    const VEC8: bool = true;
}

type Cache = Mutex<Vec<(usize, Weak<launch::Kernels>)>>;
static MODULES: Cache = Mutex::new(Vec::new());

/// GEMM kernel choices (for tuning and comparisons).
///
/// The default is [`GemmTuning::BEST`]: every kernel below where it is eligible, each verified
/// on an H100 (golden, property, edge-shape, graph-replay tests; compute-sanitizer).
/// [`GemmTuning::SIMPLE`] runs the simple 64 x 64 kernel everywhere (the reference choice the
/// tests compare the others with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTuning {
    /// Use the pipelined tensor-core kernel (128 x 64 tiles, cp.async, ldmatrix) for 16-bit
    /// types when K % 8 == 0 and the operands are 16-byte aligned. Otherwise (and always for
    /// f32) the simple 64 x 64 kernel runs.
    pub pipelined: bool,
    /// For gated GEMMs on the pipelined path, the variant capped at 128 registers (two blocks
    /// per SM, some register spills) instead of one block of 176 registers.
    pub capped_gated: bool,
    /// Use the memory-bound decode kernel (`moe_gemm_dec*`, kernels/cuda/gemm_decode.cu) for
    /// 16-bit GEMMs with few rows per group, chosen on the host by [`decode_fragments`] from
    /// shapes alone (no device data is read, so a forward stays graph-capturable); other GEMMs
    /// keep the choice above.
    pub decode: bool,
    /// Use the Hopper wgmma kernel (`moe_gemm_wg_*`, sm_90a: persistent, 128 x 256 tiles,
    /// warp-specialized cp.async ring, wgmma.m64n256k16) where it is eligible: a compute
    /// capability 9.0 device, bf16/f16, K % 64 == 0, 16-byte aligned A and W, N >= 128, and
    /// for grouped GEMMs expert blocks padded to 128 rows (a plan from
    /// [`CudaBackend::make_plan`]). Every other GEMM falls back to the pipelined kernel
    /// (where eligible) or the simple one. With `pipelined` also on, shapes where wgmma
    /// measured slower than the pipelined kernel go to the latter (`CudaBackend::wgmma_pays`).
    pub wgmma: bool,
    /// Use the TMA variant of the Hopper wgmma kernel (`moe_gemm_wgt_*`,
    /// kernels/cuda/gemm_sm90_tma.cu: the weights, and A where it is not gathered, loaded by
    /// `cp.async.bulk.tensor` from host-encoded tensor maps; one K step of wgmma kept in
    /// flight; paired epilogue stores) wherever `wgmma` would take the cp.async one (same
    /// eligibility; it implies `wgmma`). Part of [`GemmTuning::BEST`] since H100 run 7
    /// (dense 8192^3 435 vs 354 TFLOP/s for the cp.async kernel; moe-cuda/RESULTS.md).
    pub wgmma_tma: bool,
    /// With `wgmma_tma`: the clustered variant (`moe_gemm_wgm_*`): CTA pairs on adjacent M
    /// tiles of one expert load one half of the shared weight tile each and multicast it to
    /// both (a third less shared-memory fill traffic from L2 per CTA). Falls back to the
    /// unclustered TMA kernel where clusters are unavailable.
    pub wgmma_multicast: bool,
}

impl Default for GemmTuning {
    fn default() -> Self {
        GemmTuning::BEST
    }
}

impl GemmTuning {
    /// The simple 64 x 64 kernel for every GEMM (all choices off).
    pub const SIMPLE: GemmTuning = GemmTuning {
        pipelined: false,
        capped_gated: false,
        decode: false,
        wgmma: false,
        wgmma_tma: false,
        wgmma_multicast: false,
    };
    /// Every faster path where it is eligible: the decode kernel for few rows per expert,
    /// wgmma (its TMA variant) on compute capability 9.0, the pipelined kernel (capped gated variant) elsewhere,
    /// the simple kernel for what none of them takes (f32, odd K, unaligned views).
    pub const BEST: GemmTuning = GemmTuning {
        pipelined: true,
        capped_gated: true,
        decode: true,
        wgmma: true,
        wgmma_tma: true,
        wgmma_multicast: false,
    };
}

/// The decode kernel's rule: the n8 row fragments per pass (1, 2, 4 or 8, i.e. 8 to 64 rows
/// per pass over the weights), or `None` to keep the tiled kernels. From host-known numbers
/// only: `rows_bound`, the most rows one group can have (grouped: T, since a token picks an
/// expert at most once; dense: M); `slots`, the rows in all (grouped T K, dense M); `groups`,
/// the (local) experts (dense 1).
///
/// Rule: decode when the mean rows per group with rows, `slots / min(groups, slots)`, is at
/// most 32 or `rows_bound <= 64`. The pass size covers `min(rows_bound, 3 mean + 8)` rows
/// (about the largest of independently routed groups; more rows in a skewed group cost
/// another pass over that expert's weights, not correctness), capped at 64.
pub fn decode_fragments(rows_bound: usize, slots: usize, groups: usize) -> Option<u32> {
    if slots == 0 || rows_bound == 0 || groups == 0 {
        return None;
    }
    let mean = slots.div_ceil(groups.min(slots));
    if mean > 32 && rows_bound > 64 {
        return None;
    }
    let est = rows_bound.min(3 * mean + 8);
    Some([1u32, 2, 4, 8].into_iter().find(|nf| 8 * *nf as usize >= est).unwrap_or(8))
}

/// The CUDA backend: the loaded kernels and the stream every stage is launched on.
#[derive(Clone)]
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Arc<launch::Kernels>,
    tuning: GemmTuning,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Row alignment plans must use with this backend (the simple grouped GEMM's tile height).
    pub const ROW_ALIGN: usize = moe_kernels::GEMM_TILE_M;
    /// Row alignment with which grouped GEMMs can take the pipelined kernel.
    pub const ROW_ALIGN_PIPELINED: usize = moe_kernels::GEMM_TC_TILE_M;

    /// A backend launching on `stream`. Loads the fatbin into the stream's context the first
    /// time (once per context; later backends share it).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !moe_kernels::AVAILABLE {
            return Err(unsupported("moe-kernels was built without nvcc"));
        }
        let ctx = stream.context().clone();
        let key = ctx.cu_ctx() as usize;
        let mut cache = MODULES.lock().map_err(|_| MoeError::Device {
            backend: NAME,
            what: "module cache lock",
            code: -1,
        })?;
        cache.retain(|(_, w)| w.strong_count() > 0);
        if let Some(k) = cache.iter().find(|(c, _)| *c == key).and_then(|(_, w)| w.upgrade()) {
            return Ok(CudaBackend { stream, kernels: k, tuning: GemmTuning::default() });
        }
        let module = ctx
            .load_module(Ptx::from_binary(moe_kernels::FATBIN.to_vec()))
            .map_err(err("cuModuleLoadData"))?;
        let kernels = Arc::new(launch::Kernels::load(module, &ctx)?);
        cache.push((key, Arc::downgrade(&kernels)));
        Ok(CudaBackend { stream, kernels, tuning: GemmTuning::default() })
    }

    /// The same backend with other GEMM kernel choices.
    pub fn with_tuning(mut self, tuning: GemmTuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The GEMM kernel choices.
    pub fn tuning(&self) -> GemmTuning {
        self.tuning
    }

    /// The stream the stages are launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A plan for this backend (rows padded to [`Self::ROW_ALIGN`]).
    pub fn plan(config: &MoeConfig, max_tokens: usize) -> Result<MoePlan> {
        MoePlan::with_row_align(config, max_tokens, Self::ROW_ALIGN)
    }

    /// The row alignment this backend's tuning wants ([`Self::ROW_ALIGN_PIPELINED`] with the
    /// pipelined or the wgmma kernel, else [`Self::ROW_ALIGN`]).
    pub fn row_align(&self) -> usize {
        if self.tuning.pipelined
            || self.tuning.wgmma
            || self.tuning.wgmma_tma
            || self.tuning.wgmma_multicast
        {
            Self::ROW_ALIGN_PIPELINED
        } else {
            Self::ROW_ALIGN
        }
    }

    /// A plan padded for this backend's tuning.
    pub fn make_plan(&self, config: &MoeConfig, max_tokens: usize) -> Result<MoePlan> {
        MoePlan::with_row_align(config, max_tokens, self.row_align())
    }
}

/// Checks that a view holds at least `expected` elements (workspace regions are sized for the
/// plan's maximum token count, so they may be longer than a forward needs).
fn need(what: &'static str, len: usize, expected: usize) -> Result<()> {
    if len < expected { Err(MoeError::ShapeMismatch { what, expected, got: len }) } else { Ok(()) }
}

fn int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| MoeError::InvalidParameter {
        what,
        value: v as f64,
        rule: "fits in i32 on the CUDA backend",
    })
}

fn opt_ptr<U>(v: &Option<DevView<'_, U>>) -> u64 {
    v.as_ref().map_or(0, |v| v.ptr)
}

fn act_code(a: Activation) -> (i32, f32, f32) {
    match a {
        Activation::Silu => (0, 0.0, 0.0),
        Activation::Gelu => (1, 0.0, 0.0),
        Activation::GeluTanh => (2, 0.0, 0.0),
        Activation::Relu2 => (3, 0.0, 0.0),
        Activation::SwigluOai { alpha, limit } => (4, alpha as f32, limit as f32),
    }
}

fn check_opt<U>(what: &'static str, v: &Option<DevView<'_, U>>, expected: usize) -> Result<()> {
    match v {
        Some(v) => need(what, v.len, expected),
        None => Ok(()),
    }
}

fn check_row_align(plan: &MoePlan) -> Result<()> {
    if !plan.row_align().is_multiple_of(CudaBackend::ROW_ALIGN) {
        return Err(unsupported(
            "plan row_align must be a multiple of 64 (use CudaBackend::plan or MoePlan::with_row_align)",
        ));
    }
    Ok(())
}

impl Backend for CudaBackend {
    const NAME: &'static str = NAME;
    type View<'a, U: bytemuck::Pod>
        = DevView<'a, U>
    where
        U: 'a;
    type ViewMut<'a, U: bytemuck::Pod>
        = DevViewMut<'a, U>
    where
        U: 'a;

    fn view_len<U: bytemuck::Pod>(v: &DevView<'_, U>) -> usize {
        v.len
    }
    fn view_mut_len<U: bytemuck::Pod>(v: &DevViewMut<'_, U>) -> usize {
        v.len
    }
    fn as_view<'b, 'c: 'b, U: bytemuck::Pod>(v: &'b DevViewMut<'c, U>) -> DevView<'b, U> {
        DevView::raw(v.ptr, v.len)
    }
    fn narrow<'b, 'c: 'b, U: bytemuck::Pod>(v: DevView<'c, U>) -> DevView<'b, U> {
        DevView::raw(v.ptr, v.len)
    }
    fn reborrow<'b, 'c: 'b, U: bytemuck::Pod>(v: &'b mut DevViewMut<'c, U>) -> DevViewMut<'b, U> {
        DevViewMut::raw(v.ptr, v.len)
    }
    fn split_at<'a, U: bytemuck::Pod>(
        v: Self::ViewMut<'a, U>,
        mid: usize,
    ) -> (Self::ViewMut<'a, U>, Self::ViewMut<'a, U>) {
        let mid = mid.min(v.len);
        let size = std::mem::size_of::<U>() as u64;
        (DevViewMut::raw(v.ptr, mid), DevViewMut::raw(v.ptr + mid as u64 * size, v.len - mid))
    }
    fn misalignment(v: &DevViewMut<'_, u8>, align: usize) -> usize {
        let a = align.max(1) as u64;
        ((a - v.ptr % a) % a) as usize
    }
    fn cast_bytes<'a, U: bytemuck::Pod>(v: Self::ViewMut<'a, u8>) -> Result<Self::ViewMut<'a, U>> {
        let size = std::mem::size_of::<U>();
        let align = std::mem::align_of::<U>() as u64;
        if size == 0 || v.ptr % align != 0 || v.len % size != 0 {
            return Err(MoeError::InvalidParameter {
                what: "workspace region",
                value: v.ptr as f64,
                rule: "aligned to and a multiple of the element size",
            });
        }
        Ok(DevViewMut::raw(v.ptr, v.len / size))
    }
}

impl CudaBackend {
    /// `rows_ok`: for a grouped GEMM, whether expert blocks are padded to the pipelined tile.
    /// A dense GEMM (M = its rows) may take the decode kernel; grouped ones go through
    /// [`Self::run_grouped_gemm`].
    fn run_gemm<T: CudaElement>(&self, p: launch::GemmParams, rows_ok: bool) -> Result<()> {
        let m = p.m.max(0) as usize;
        self.run_gemm_with::<T>(p, rows_ok, (m, m, 1))
    }

    /// A grouped GEMM of `tokens` tokens routed to `top_k` of `p.grouped` local experts.
    fn run_grouped_gemm<T: CudaElement>(
        &self,
        p: launch::GemmParams,
        rows_ok: bool,
        tokens: usize,
        top_k: usize,
    ) -> Result<()> {
        self.run_gemm_with::<T>(p, rows_ok, (tokens, tokens * top_k, p.grouped.max(0) as usize))
    }

    /// `shape`: (rows_bound, slots, groups) of [`decode_fragments`].
    fn run_gemm_with<T: CudaElement>(
        &self,
        p: launch::GemmParams,
        rows_ok: bool,
        shape: (usize, usize, usize),
    ) -> Result<()> {
        let (rows_bound, slots, groups) = shape;
        let decode = if T::VEC8 && self.tuning.decode && p.vec_a != 0 && p.vec_w != 0 {
            decode_fragments(rows_bound, slots, groups)
        } else {
            None
        };
        if let Some(nf) = decode {
            let groups = groups.min(slots).min(u32::MAX as usize) as u32;
            let path = launch::GemmPath::Decode { nf_log2: nf.trailing_zeros(), groups };
            return launch::gemm(&self.stream, &self.kernels, T::INDEX, path, &p);
        }
        let aligned = T::VEC8 && rows_ok && p.vec_a != 0 && p.vec_w != 0;
        let path = if Self::gemv_fits::<T>(&p) {
            launch::GemmPath::Gemv
        } else if (self.tuning.wgmma || self.tuning.wgmma_tma || self.tuning.wgmma_multicast)
            && aligned
            && self.wgmma_eligible(&p)
            && (!self.tuning.pipelined || Self::wgmma_pays(&p))
        {
            if self.tuning.wgmma_tma || self.tuning.wgmma_multicast {
                launch::GemmPath::WgmmaTma { multicast: self.tuning.wgmma_multicast }
            } else {
                launch::GemmPath::Wgmma
            }
        } else if self.tuning.pipelined && aligned {
            launch::GemmPath::Pipelined { capped: self.tuning.capped_gated }
        } else {
            launch::GemmPath::Simple
        };
        launch::gemm(&self.stream, &self.kernels, T::INDEX, path, &p)
    }

    /// Whether a dense product goes to the warp-per-column kernel: at most 16 rows (one block
    /// row, each weight byte read once), or up to 256 rows when the weight is small enough to
    /// stay in L2 across the block rows (router logits). Otherwise the tiled kernels, whose
    /// few, long-running blocks only pay off with many rows.
    fn gemv_fits<T: CudaElement>(p: &launch::GemmParams) -> bool {
        let w_bytes = p.n as usize * p.k as usize * size_of::<T>() * (1 + (p.gated != 0) as usize);
        p.grouped == 0 && (p.m <= 16 || (p.m <= 256 && w_bytes <= 4 << 20))
    }

    /// The wgmma kernel's eligibility beyond 16-bit type, 16-byte alignment (vec_a / vec_w:
    /// K % 8 == 0 and aligned A, W) and 128-row expert blocks: K a multiple of its 64-wide K
    /// step, N at least 128 (narrower outputs waste most of a 256-column tile), and a compute
    /// capability 9.0 device.
    fn wgmma_eligible(&self, p: &launch::GemmParams) -> bool {
        p.k > 0 && p.k % 64 == 0 && p.n >= 128 && self.kernels.wgmma_available()
    }

    /// Whether the wgmma kernel is expected to beat the pipelined one: K and N both at least
    /// 1024. Measured on an H100 (run 4, bf16, T = 4096): Qwen3-30B-A3B (I = 768: GEMM1
    /// N = 768, GEMM2 K = 768) 2.92 ms with wgmma vs 2.39 ms pipelined; gpt-oss-120b
    /// (I = 2880) 5.77 vs 7.33 ms; Mixtral 10.07 vs 16.34 ms. Short K loops and few 256-wide
    /// column tiles leave the persistent kernel's prologue and epilogue exposed.
    fn wgmma_pays(p: &launch::GemmParams) -> bool {
        p.k >= 1024 && p.n >= 1024
    }

    /// Whether this device can run the wgmma kernel (compute capability 9.0).
    pub fn wgmma_available(&self) -> bool {
        self.kernels.wgmma_available()
    }

    /// Whether this device can run the TMA variant of the wgmma kernel
    /// ([`GemmTuning::wgmma_tma`]; otherwise that tuning falls back to the cp.async one).
    pub fn wgmma_tma_available(&self) -> bool {
        self.kernels.wgmma_tma_available()
    }

    /// The clusters of two CTAs the clustered TMA wgmma kernel runs (the driver's occupancy
    /// answer for one 197 KB CTA per SM, asked at its first launch; `None` before that).
    pub fn wgmma_multicast_clusters(&self) -> Option<u32> {
        self.kernels.wgmma_multicast_clusters()
    }

    /// Whether this device can run the clustered TMA wgmma kernel
    /// ([`GemmTuning::wgmma_multicast`]).
    pub fn wgmma_multicast_available(&self) -> bool {
        self.kernels.wgmma_multicast_available()
    }

    fn vec_ok<T: CudaElement>(k: usize, ptrs: &[u64]) -> i32 {
        (T::VEC8 && k.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16))) as i32
    }
}

impl<T: CudaElement> MoeStages<T> for CudaBackend {
    fn router_logits(
        &self,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: DevView<'_, T>,
        weight: DevView<'_, T>,
        bias: Option<DevView<'_, T>>,
        logits: DevViewMut<'_, f32>,
    ) -> Result<()> {
        need("x", x.len, tokens * hidden)?;
        need("router.weight", weight.len, experts * hidden)?;
        check_opt("router.bias", &bias, experts)?;
        need("logits", logits.len, tokens * experts)?;
        let p = launch::GemmParams {
            a: x.ptr,
            w_up: weight.ptr,
            bias_up: opt_ptr(&bias),
            out: logits.ptr,
            m: int("tokens", tokens)?,
            n: int("experts", experts)?,
            k: int("hidden", hidden)?,
            scale: 1.0,
            out_f32: 1,
            vec_a: Self::vec_ok::<T>(hidden, &[x.ptr]),
            vec_w: Self::vec_ok::<T>(hidden, &[weight.ptr]),
            ..Default::default()
        };
        self.run_gemm::<T>(p, true)
    }

    fn route(
        &self,
        config: &MoeConfig,
        tokens: usize,
        logits: DevView<'_, f32>,
        selection_bias: Option<DevView<'_, f32>>,
        _scratch: DevViewMut<'_, f32>,
        topk_ids: DevViewMut<'_, i32>,
        topk_weights: DevViewMut<'_, f32>,
    ) -> Result<()> {
        let r = &config.router;
        let (e, k) = (config.experts, config.top_k);
        let (reduce_kind, reduce_param) = match r.reduce {
            TopkReduce::None => (0, 0.0),
            TopkReduce::Sum { eps } => (1, eps),
            TopkReduce::ClampMin { min } => (2, min),
            TopkReduce::PNorm { p } => (3, p),
            TopkReduce::Custom(_) => {
                return Err(unsupported("a user-supplied top-k reduce (TopkReduce::Custom)"));
            }
        };
        if e > moe_kernels::ROUTE_MAX_EXPERTS {
            return Err(unsupported("more than 512 experts in the fused router"));
        }
        need("logits", logits.len, tokens * e)?;
        check_opt("router.selection_bias", &selection_bias, e)?;
        need("topk_ids", topk_ids.len, tokens * k)?;
        need("topk_weights", topk_weights.len, tokens * k)?;
        let (n_group, topk_group, group_score) = match r.groups {
            Some(g) => (g.n_group, g.topk_group, if g.score == GroupScore::Max { 1 } else { 0 }),
            None => (0, 0, 0),
        };
        let p = launch::RouteParams {
            logits: logits.ptr,
            sel_bias: opt_ptr(&selection_bias),
            topk_ids: topk_ids.ptr,
            topk_weights: topk_weights.ptr,
            tokens: int("tokens", tokens)?,
            experts: e as i32,
            top_k: k as i32,
            scoring: match r.scoring {
                Scoring::Softmax => 0,
                Scoring::Sigmoid => 1,
                Scoring::None => 2,
            },
            n_group: n_group as i32,
            topk_group: topk_group as i32,
            group_score,
            weight_src: match r.weights {
                WeightSource::Scores => 0,
                WeightSource::SoftmaxTopkLogits => 1,
                WeightSource::SigmoidTopkLogits => 2,
            },
            reduce_kind,
            reduce_param: reduce_param as f32,
            scale: config.weight_scale() as f32,
        };
        launch::route(&self.stream, &self.kernels, &p)
    }

    fn permute(
        &self,
        plan: &MoePlan,
        tokens: usize,
        topk_ids: DevView<'_, i32>,
        expert_map: Option<DevView<'_, i32>>,
        out: PermuteBuffers<'_, Self>,
    ) -> Result<()> {
        check_row_align(plan)?;
        let c = plan.config();
        let (el, k) = (c.local_experts(), c.top_k);
        let n = tokens * k;
        need("topk_ids", topk_ids.len, n)?;
        check_opt("expert_map", &expert_map, c.experts)?;
        need("expert_offsets", out.expert_offsets.len, el + 1)?;
        need("expert_cursor", out.expert_cursor.len, el)?;
        need("sorted_slots", out.sorted_slots.len, plan.rows_capacity(tokens))?;
        need("slot_rows", out.slot_rows.len, n)?;
        let warps = (12288usize.saturating_sub(2 * el + 2) / el).min(32);
        if warps == 0 {
            return Err(unsupported("more than 4095 local experts in the permute"));
        }
        let p = launch::PermuteParams {
            topk_ids: topk_ids.ptr,
            expert_map: opt_ptr(&expert_map),
            expert_offsets: out.expert_offsets.ptr,
            expert_cursor: out.expert_cursor.ptr,
            sorted_slots: out.sorted_slots.ptr,
            slot_rows: out.slot_rows.ptr,
            n: int("tokens * top_k", n)?,
            experts: int("experts", c.experts)?,
            local_experts: el as i32,
            row_align: int("row_align", plan.row_align())?,
        };
        launch::permute(&self.stream, &self.kernels, &p, warps as u32)
    }

    fn expert_up(
        &self,
        plan: &MoePlan,
        tokens: usize,
        x: DevView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        hidden: DevViewMut<'_, T>,
    ) -> Result<()> {
        check_row_align(plan)?;
        let c = plan.config();
        let mlp = &c.expert.mlp;
        let (el, d, i, k) = (c.local_experts(), c.expert_width(), c.local_intermediate(), c.top_k);
        let cap = plan.rows_capacity(tokens);
        need("expert input", x.len, tokens * d)?;
        check_mlp_up(mlp, weights, el, i, d)?;
        need("expert_offsets", rows.expert_offsets.len, el + 1)?;
        need("sorted_slots", rows.sorted_slots.len, cap)?;
        check_opt("routing weights", &rows.weights, tokens * k)?;
        need("hidden", hidden.len, cap * i)?;
        let (act, alpha, limit) = act_code(mlp.activation);
        let wg = opt_ptr(&weights.gate);
        let p = launch::GemmParams {
            a: x.ptr,
            w_up: weights.up.ptr,
            w_gate: wg,
            bias_up: opt_ptr(&weights.up_bias),
            bias_gate: opt_ptr(&weights.gate_bias),
            expert_offsets: rows.expert_offsets.ptr,
            sorted_slots: rows.sorted_slots.ptr,
            row_weights: opt_ptr(&rows.weights),
            out: hidden.ptr,
            m: int("rows", cap)?,
            n: int("intermediate", i)?,
            k: int("expert width", d)?,
            grouped: el as i32,
            top_k: k as i32,
            a_gather: 1,
            weight_mode: if rows.weights.is_some() { 1 } else { 0 },
            epilogue: 1,
            gated: mlp.gated as i32,
            act,
            alpha,
            limit,
            scale: 1.0,
            vec_a: Self::vec_ok::<T>(d, &[x.ptr]),
            vec_w: Self::vec_ok::<T>(d, &[weights.up.ptr, wg]),
            ..Default::default()
        };
        self.run_grouped_gemm::<T>(
            p,
            plan.row_align().is_multiple_of(Self::ROW_ALIGN_PIPELINED),
            tokens,
            k,
        )
    }

    fn expert_down(
        &self,
        plan: &MoePlan,
        tokens: usize,
        hidden: DevView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        out: DevViewMut<'_, T>,
    ) -> Result<()> {
        check_row_align(plan)?;
        let c = plan.config();
        let (el, d, i, k) = (c.local_experts(), c.expert_width(), c.local_intermediate(), c.top_k);
        let cap = plan.rows_capacity(tokens);
        need("hidden", hidden.len, cap * i)?;
        need("experts.down", weights.down.len, el * d * i)?;
        check_opt("experts.down_bias", &weights.down_bias, el * d)?;
        need("expert_offsets", rows.expert_offsets.len, el + 1)?;
        need("sorted_slots", rows.sorted_slots.len, cap)?;
        check_opt("routing weights", &rows.weights, tokens * k)?;
        need("expert_out", out.len, cap * d)?;
        let p = launch::GemmParams {
            a: hidden.ptr,
            w_up: weights.down.ptr,
            bias_up: opt_ptr(&weights.down_bias),
            expert_offsets: rows.expert_offsets.ptr,
            sorted_slots: rows.sorted_slots.ptr,
            row_weights: opt_ptr(&rows.weights),
            out: out.ptr,
            m: int("rows", cap)?,
            n: int("expert width", d)?,
            k: int("intermediate", i)?,
            grouped: el as i32,
            top_k: k as i32,
            weight_mode: if rows.weights.is_some() { 2 } else { 0 },
            scale: 1.0,
            vec_a: Self::vec_ok::<T>(i, &[hidden.ptr]),
            vec_w: Self::vec_ok::<T>(i, &[weights.down.ptr]),
            ..Default::default()
        };
        self.run_grouped_gemm::<T>(
            p,
            plan.row_align().is_multiple_of(Self::ROW_ALIGN_PIPELINED),
            tokens,
            k,
        )
    }

    fn combine(
        &self,
        plan: &MoePlan,
        tokens: usize,
        width: usize,
        expert_out: DevView<'_, T>,
        slot_rows: DevView<'_, i32>,
        scale: f32,
        out: DevViewMut<'_, T>,
    ) -> Result<()> {
        let k = plan.config().top_k;
        need("expert_out", expert_out.len, plan.rows_capacity(tokens) * width)?;
        need("slot_rows", slot_rows.len, tokens * k)?;
        need("out", out.len, tokens * width)?;
        launch::combine(
            &self.stream,
            &self.kernels,
            T::INDEX,
            expert_out.ptr,
            slot_rows.ptr,
            out.ptr,
            u32::try_from(tokens).map_err(|_| unsupported("more than 2^32 tokens"))?,
            int("width", width)?,
            k as i32,
            scale,
        )
    }

    fn mlp_up(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        in_dim: usize,
        inter: usize,
        x: DevView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        hidden: DevViewMut<'_, T>,
    ) -> Result<()> {
        need("x", x.len, tokens * in_dim)?;
        check_mlp_up(mlp, weights, 1, inter, in_dim)?;
        need("hidden", hidden.len, tokens * inter)?;
        let (act, alpha, limit) = act_code(mlp.activation);
        let wg = opt_ptr(&weights.gate);
        let p = launch::GemmParams {
            a: x.ptr,
            w_up: weights.up.ptr,
            w_gate: wg,
            bias_up: opt_ptr(&weights.up_bias),
            bias_gate: opt_ptr(&weights.gate_bias),
            out: hidden.ptr,
            m: int("tokens", tokens)?,
            n: int("intermediate", inter)?,
            k: int("in_dim", in_dim)?,
            epilogue: 1,
            gated: mlp.gated as i32,
            act,
            alpha,
            limit,
            scale: 1.0,
            vec_a: Self::vec_ok::<T>(in_dim, &[x.ptr]),
            vec_w: Self::vec_ok::<T>(in_dim, &[weights.up.ptr, wg]),
            ..Default::default()
        };
        self.run_gemm::<T>(p, true)
    }

    fn linear(
        &self,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: DevView<'_, T>,
        weight: DevView<'_, T>,
        bias: Option<DevView<'_, T>>,
        row_scale: Option<DevView<'_, f32>>,
        scale: f32,
        accumulate: bool,
        out: DevViewMut<'_, T>,
    ) -> Result<()> {
        need("x", x.len, tokens * in_dim)?;
        need("weight", weight.len, out_dim * in_dim)?;
        check_opt("bias", &bias, out_dim)?;
        check_opt("row_scale", &row_scale, tokens)?;
        need("out", out.len, tokens * out_dim)?;
        let p = launch::GemmParams {
            a: x.ptr,
            w_up: weight.ptr,
            bias_up: opt_ptr(&bias),
            row_weights: opt_ptr(&row_scale),
            out: out.ptr,
            m: int("tokens", tokens)?,
            n: int("out_dim", out_dim)?,
            k: int("in_dim", in_dim)?,
            weight_mode: if row_scale.is_some() { 2 } else { 0 },
            scale,
            accumulate: accumulate as i32,
            vec_a: Self::vec_ok::<T>(in_dim, &[x.ptr]),
            vec_w: Self::vec_ok::<T>(in_dim, &[weight.ptr]),
            ..Default::default()
        };
        self.run_gemm::<T>(p, true)
    }

    fn sigmoid_gate(
        &self,
        tokens: usize,
        hidden: usize,
        x: DevView<'_, T>,
        weight: DevView<'_, T>,
        gate: DevViewMut<'_, f32>,
    ) -> Result<()> {
        need("x", x.len, tokens * hidden)?;
        need("shared.gate_weight", weight.len, hidden)?;
        need("gate", gate.len, tokens)?;
        launch::sigmoid_gate(
            &self.stream,
            &self.kernels,
            T::INDEX,
            x.ptr,
            weight.ptr,
            gate.ptr,
            int("tokens", tokens)?,
            int("hidden", hidden)?,
        )
    }

    fn add_assign(&self, dst: DevViewMut<'_, T>, src: DevView<'_, T>) -> Result<()> {
        if dst.len != src.len {
            return Err(MoeError::ShapeMismatch {
                what: "add_assign src",
                expected: dst.len,
                got: src.len,
            });
        }
        launch::add_assign(&self.stream, &self.kernels, T::INDEX, dst.ptr, src.ptr, dst.len as i64)
    }
}

fn check_mlp_up<T: CudaElement>(
    mlp: &MlpConfig,
    w: &MlpWeights<'_, CudaBackend, T>,
    n: usize,
    inter: usize,
    width: usize,
) -> Result<()> {
    need("up", w.up.len, n * inter * width)?;
    if mlp.gated {
        match &w.gate {
            Some(g) => need("gate", g.len, n * inter * width)?,
            None => return Err(MoeError::TensorPresence { what: "gate", required: true }),
        }
        check_opt("gate_bias", &w.gate_bias, n * inter)?;
    }
    check_opt("up_bias", &w.up_bias, n * inter)?;
    Ok(())
}

/// The element type tag of `T` (for messages).
pub fn dtype_of<T: CudaElement>() -> DType {
    T::DTYPE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_arithmetic_needs_no_device() {
        let v = DevViewMut::<u8>::raw(0x1000 + 3, 1000);
        assert_eq!(<CudaBackend as Backend>::misalignment(&v, 256), 253);
        let (a, b) = <CudaBackend as Backend>::split_at(v, 253);
        assert_eq!((a.len, b.len, b.ptr), (253, 747, 0x1100));
        let (c, _) = <CudaBackend as Backend>::split_at(b, 400);
        let f = <CudaBackend as Backend>::cast_bytes::<f32>(c).expect("aligned");
        assert_eq!(f.len, 100);
        let odd = DevViewMut::<u8>::raw(0x1002, 8);
        assert!(matches!(
            <CudaBackend as Backend>::cast_bytes::<f32>(odd),
            Err(MoeError::InvalidParameter { .. })
        ));
        // split beyond the end is clamped, never a panic
        let w = DevViewMut::<i32>::raw(0x2000, 4);
        let (x, y) = <CudaBackend as Backend>::split_at(w, 9);
        assert_eq!((x.len, y.len), (4, 0));
    }

    #[test]
    fn decode_rule() {
        // Mixtral (E 8, K 2): T 1 -> 8 rows, T 16 -> 16, T 128 (mean 32) -> 64-row passes
        assert_eq!(decode_fragments(1, 2, 8), Some(1));
        assert_eq!(decode_fragments(16, 32, 8), Some(2));
        assert_eq!(decode_fragments(128, 256, 8), Some(8));
        assert_eq!(decode_fragments(1024, 2048, 8), None);
        // Qwen3 (E 128, K 8): T 128 -> mean 8 -> 32-row passes; T 1024 -> mean 64 -> tiled
        assert_eq!(decode_fragments(128, 1024, 128), Some(4));
        assert_eq!(decode_fragments(1024, 8192, 128), None);
        // DeepSeek-V3 routed (E 256, K 8) and its shared expert (dense M = T)
        assert_eq!(decode_fragments(16, 128, 256), Some(2));
        assert_eq!(decode_fragments(128, 1024, 256), Some(4));
        assert_eq!(decode_fragments(64, 64, 1), Some(8));
        assert_eq!(decode_fragments(65, 65, 1), None);
        assert_eq!(decode_fragments(0, 0, 8), None);
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a machine without libcuda this must return Err; with one, Ok. Never a panic.
        let _ = try_context(0);
    }
}

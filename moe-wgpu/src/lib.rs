//! # moe-wgpu
//!
//! The wgpu backend of moe-kernels: [`moe_core::Backend`] and [`moe_core::MoeStages`] over
//! views of the caller's `wgpu::Buffer`s, running the WGSL of [`moe_shaders`].
//!
//! * Views ([`WgpuView`], [`WgpuViewMut`]) are a buffer reference, a byte offset and a length.
//!   Every storage buffer the backend sees needs `BufferUsages::STORAGE`.
//! * Pipelines, bind-group layouts and the two buffers the backend owns (a uniform parameter
//!   ring and a small placeholder for absent optional tensors) are created once per device; a
//!   forward creates no buffers ([`WgpuBackend::buffers_created`] counts them).
//! * Each stage writes its parameters with `Queue::write_buffer` into its own slots of a
//!   4096-slot uniform ring and records its dispatches in one compute pass. A stage called on
//!   its own submits its pass at once; within a forward ([`moe_core::forward`], between
//!   [`MoeStages::begin_forward`] and [`MoeStages::end_forward`]) the stages' passes go into
//!   one command encoder, submitted once at the end (on the H100 each submission left ~21 us
//!   of GPU idle). The ring is locked from the write to the recording (threads may share a
//!   backend; a forward being recorded by one thread does not take other threads' stages)
//!   and, when it wraps, the backend submits a forward being recorded and waits for the
//!   device before reusing a slot. A stage does not wait otherwise: poll the device
//!   ([`WgpuBackend::synchronize`]) or map a buffer to see results.
//! * Expert GEMMs come in three variants ([`ExpertGemm`], [`Options::expert_gemm`]): a tiled
//!   one (16 x 64 output tiles through workgroup memory); the few-row GEMM
//!   ([`moe_shaders::GEMV`]: each weight row streamed as 16-byte words by 16-256 lanes, 4
//!   words of each weight row per lane per step, applied to a block of 1, 4 or 8 rows, one
//!   fixed-order reduction per block, the activation and routing-weight epilogues fused;
//!   [`FewRowGemm`] keeps the earlier register-resident kernel for A/B); and a scalar decode one (the few-row
//!   path for views not aligned to 16-byte words). By default the host picks from the
//!   shapes: the few-row GEMM for at most [`GEMV_MAX_ROWS`] rows per local expert on average
//!   where K and the views are word-aligned, else scalar decode when
//!   `tokens * top_k <= 4 * local_experts`, else tiled. Linears (router, shared expert down,
//!   latent) of at most [`GEMV_MAX_ROWS`] tokens also take the few-row GEMM. All are
//!   deterministic. The few-row expert GEMMs launch one z workgroup per expert that can have
//!   rows (`min(local experts, tokens * top_k)`; each finds its expert by a scan of the row
//!   offsets), not one per expert. Route runs one workgroup per token up to 1024 experts.
//! * Profiling: [`WgpuBackend::begin_stage_timestamps`] / [`WgpuBackend::end_stage_timestamps`]
//!   give each stage's GPU time where the device has `TIMESTAMP_QUERY`.
//! * Element types: `f32`; `f16` (the WGSL `f16` type when the device has `SHADER_F16`,
//!   otherwise packed two to a `u32`); `bf16` (packed two to a `u32`, widened by a shift and
//!   rounded to nearest even in the shader). Arithmetic is f32. A user-supplied top-k reduce
//!   ([`moe_core::TopkReduce::Custom`]) cannot run in a shader: [`MoeError::Unsupported`].
//! * Limits: up to 256 expert groups. llvmpipe/lavapipe stops an invocation's loops after
//!   65535 iterations in total (real GPUs have no such cap); on it, a stage whose loops could
//!   exceed that (route with `top_k * experts` near 60000, permute past ~30M slots, GEMMs with
//!   very long K per row tile) returns [`MoeError::Unsupported`] instead of a wrong result.
//!
//! ```no_run
//! use moe_core::*;
//! use moe_wgpu::{WgpuBackend, WgpuView, WgpuViewMut};
//!
//! # fn main() -> Result<()> {
//! # let config: MoeConfig = unimplemented!();
//! # let (router, gate, up, down, x, out, ws): (wgpu::Buffer, wgpu::Buffer, wgpu::Buffer,
//! #     wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer) = unimplemented!();
//! let backend = WgpuBackend::request()?.expect("a wgpu adapter");
//! let tokens = 16;
//! let plan = MoePlan::new(&config, tokens)?;
//! let (h, e, i) = (config.hidden, config.experts, config.expert.mlp.intermediate);
//! // Views of the caller's buffers (STORAGE usage), f32 here.
//! let weights = MoeWeights::<WgpuBackend, f32> {
//!     router: WgpuView::new(&router, 0, e * h)?,
//!     router_bias: None,
//!     selection_bias: None,
//!     experts: MlpWeights {
//!         gate: Some(WgpuView::new(&gate, 0, e * i * h)?),
//!         up: WgpuView::new(&up, 0, e * i * h)?,
//!         down: WgpuView::new(&down, 0, e * h * i)?,
//!         gate_bias: None,
//!         up_bias: None,
//!         down_bias: None,
//!     },
//!     shared: None,
//!     latent: None,
//!     expert_map: None,
//! };
//! let ws_bytes = plan.workspace_bytes(DType::F32)?; // `ws` holds at least this many bytes
//! forward(
//!     &backend,
//!     &plan,
//!     &weights,
//!     tokens,
//!     WgpuView::new(&x, 0, tokens * h)?,
//!     WgpuViewMut::new(&out, 0, tokens * h)?,
//!     WgpuViewMut::new(&ws, 0, ws_bytes)?,
//!     &SingleRank,
//! )?;
//! backend.synchronize()?; // the stages are submitted; wait (or map `out`) to read results
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod view;

use bytemuck::Pod;
use moe_core::{
    Activation, Backend, DType, Element, ExpertRows, GroupScore, MlpConfig, MlpWeights, MoeConfig,
    MoeError, MoePlan, MoeStages, PermuteBuffers, Result, Scoring, TopkReduce, WeightSource,
};
use moe_shaders::Storage;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
pub use view::{WgpuView, WgpuViewMut};

const NAME: &str = "wgpu";
/// Bytes of one parameter slot (the uniform offset alignment WebGPU guarantees to accept).
const SLOT: u64 = 256;
/// Parameter slots of the ring (each dispatch of a forward takes the next one; when the ring
/// wraps, the backend waits for the device before reusing a slot). 4096 slots (1 MiB): a wait
/// every ~340 forwards of ~12 dispatches instead of every ~20.
const SLOTS: u64 = 4096;
/// Workgroups per grid dimension WebGPU guarantees.
const MAX_GROUPS: u32 = 65535;

fn unsupported(what: &'static str) -> MoeError {
    MoeError::Unsupported { backend: NAME, what }
}

fn shape(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got { Err(MoeError::ShapeMismatch { what, expected, got }) } else { Ok(()) }
}

fn at_least(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if got < expected { Err(MoeError::ShapeMismatch { what, expected, got }) } else { Ok(()) }
}

fn u32_of(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoeError::InvalidParameter {
        what,
        value: v as f64,
        rule: "fits in u32 (the shaders index with u32)",
    })
}

/// Check an expert map on the host (the rules the CPU backend enforces in `permute`): every
/// entry is -1 or a local expert index `< local_experts`, and no two global experts share a
/// local one. The wgpu backend reads the map on the device and cannot report a bad entry
/// there (it treats an out-of-range entry as "not held here"), so check a map once when you
/// upload it.
pub fn check_expert_map(map: &[i32], experts: usize, local_experts: usize) -> Result<()> {
    if map.len() != experts {
        return Err(MoeError::ShapeMismatch {
            what: "expert_map",
            expected: experts,
            got: map.len(),
        });
    }
    let mut seen = vec![false; local_experts];
    for (g, &l) in map.iter().enumerate() {
        match usize::try_from(l) {
            Ok(i) if i < local_experts && !seen[i] => seen[i] = true,
            Err(_) if l == -1 => {}
            _ => return Err(MoeError::InvalidExpertMap { expert: g, value: l }),
        }
    }
    Ok(())
}

/// The loop-iteration budget of one invocation on llvmpipe/lavapipe (gallivm stops every loop
/// of an invocation after 65535 iterations in total), with a margin; `None` elsewhere.
fn llvmpipe_loop_cap(info: &wgpu::AdapterInfo) -> Option<u64> {
    info.name.to_ascii_lowercase().contains("llvmpipe").then_some(60_000)
}

/// An upper bound on the loop iterations of one GEMM invocation: its row tiles (grid stride
/// over `gy` workgroups) times the K tiles (4 weight loads, 16 FMAs, 2 control) of each.
fn gemm_loops(rows: usize, gy: usize, k: usize) -> u64 {
    let m_tiles = rows.div_ceil(moe_shaders::TILE as usize).div_ceil(gy.max(1)) as u64 + 1;
    let k_tiles = k.div_ceil(moe_shaders::TILE as usize) as u64;
    m_tiles * (k_tiles * 22 + 8) + 4
}

/// An upper bound on the loop iterations of one invocation of a decode GEMM variant: passes of
/// `DECODE_ROWS` rows over `rows`, each a K loop (two elements per invocation and step; ~32
/// inner iterations per step) and the reduction.
fn decode_loops(rows: usize, k: usize) -> u64 {
    let passes = rows.div_ceil(moe_shaders::DECODE_ROWS as usize) as u64 + 1;
    let k_steps = k.div_ceil(2 * moe_shaders::DECODE_GROUP as usize) as u64;
    passes * (k_steps * 32 + 160) + 16
}

/// Block on a wgpu future. Native wgpu resolves its futures on the calling thread, so this
/// only spins if a backend defers.
pub fn block_on<F: core::future::Future>(f: F) -> F::Output {
    let mut f = core::pin::pin!(f);
    let mut cx = core::task::Context::from_waker(core::task::Waker::noop());
    loop {
        if let core::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// The shader modules of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shader {
    Linear,
    Route,
    Permute,
    ExpertUp,
    ExpertDown,
    Combine,
    Add,
    Gemv,
}

impl Shader {
    const ALL: [Shader; 8] = [
        Shader::Linear,
        Shader::Route,
        Shader::Permute,
        Shader::ExpertUp,
        Shader::ExpertDown,
        Shader::Combine,
        Shader::Add,
        Shader::Gemv,
    ];

    fn source(self) -> &'static str {
        match self {
            Shader::Linear => moe_shaders::LINEAR,
            Shader::Route => moe_shaders::ROUTE,
            Shader::Permute => moe_shaders::PERMUTE,
            Shader::ExpertUp => moe_shaders::EXPERT_UP,
            Shader::ExpertDown => moe_shaders::EXPERT_DOWN,
            Shader::Combine => moe_shaders::COMBINE,
            Shader::Add => moe_shaders::ADD,
            Shader::Gemv => moe_shaders::GEMV,
        }
    }

    /// Storage bindings after the uniform at binding 0.
    fn storage_bindings(self) -> u32 {
        match self {
            Shader::Linear => 5,
            Shader::Route => 4,
            Shader::Permute => 6,
            Shader::ExpertUp => 9,
            Shader::ExpertDown => 7,
            Shader::Combine => 3,
            Shader::Add => 2,
            Shader::Gemv => 10,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A short name of the stage that `d` (its first dispatch) belongs to, for
/// [`WgpuBackend::begin_stage_timestamps`].
fn stage_label(d: &Dispatch<'_>) -> &'static str {
    let p = |i: usize| d.params.get(i).copied().unwrap_or(0);
    match d.shader {
        Shader::Linear if p(11) != 0 => "gate (linear)",
        Shader::Linear => "linear",
        Shader::Route => "route",
        Shader::Permute => "permute",
        Shader::ExpertUp if p(17) != 0 => "mlp up (tiled)",
        Shader::ExpertUp => "expert up (tiled)",
        Shader::ExpertDown => "expert down (tiled)",
        Shader::Combine => "combine",
        Shader::Add => "add",
        Shader::Gemv => match (p(2), p(5), p(21)) {
            (0, _, 1) => "gate (gemv)",
            (0, _, _) => "linear (gemv)",
            (1, 1, _) => "mlp up (gemv)",
            (1, _, _) => "expert up (gemv)",
            _ => "expert down (gemv)",
        },
    }
}

/// GPU time of one stage (one compute pass) recorded between
/// [`WgpuBackend::begin_stage_timestamps`] and [`WgpuBackend::end_stage_timestamps`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTime {
    /// The stage's kernel (e.g. `"route"`, `"expert up (gemv)"`, `"linear"`).
    pub label: &'static str,
    /// Nanoseconds from the beginning of the first recorded stage to the beginning of this one.
    pub start_ns: f64,
    /// Nanoseconds from the beginning to the end of this stage's compute pass.
    pub gpu_ns: f64,
}

/// The query set and buffers of a stage-timestamp recording.
struct StageStamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    cap: u32,
    labels: Vec<&'static str>,
}

/// A pipeline: shader, element and output storage, entry point, and the `LANES` and `RB`
/// pipeline constants of [`Shader::Gemv`] (`LANES | RB << 16`; 0 for the other shaders).
type PipelineKey = (Shader, Storage, Storage, &'static str, u32);

/// One storage binding: the buffer range bound (aligned) and the view's element offset in it.
struct Bind<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    base: u32,
}

/// A few-row GEMM dispatch's kernel and grid (see [`WgpuBackend::gemv_grid`]).
#[derive(Clone, Copy, Debug)]
struct GemvGrid {
    /// `"stream"` or `"main"` ([`FewRowGemm`]).
    entry: &'static str,
    /// The `LANES` pipeline constant.
    lanes: u32,
    /// The `RB` pipeline constant of `stream` (0 for `main`).
    rb: u32,
    /// The workgroup grid.
    groups: [u32; 3],
    /// Its x extent (the shader's `nx`).
    nx: u32,
}

/// The stages of one forward recorded into one command encoder (between
/// [`MoeStages::begin_forward`] and [`MoeStages::end_forward`] on the thread that began it),
/// submitted once.
struct Batch {
    owner: std::thread::ThreadId,
    depth: u32,
    encoder: wgpu::CommandEncoder,
    /// Stages recorded into `encoder`.
    stages: usize,
}

/// One dispatch of a stage.
struct Dispatch<'a> {
    pipeline: wgpu::ComputePipeline,
    shader: Shader,
    params: Vec<u32>,
    binds: Vec<Bind<'a>>,
    groups: [u32; 3],
}

/// Which variant of the expert GEMMs (`expert_up`, `expert_down`, the dense MLP's up half)
/// a backend runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpertGemm {
    /// Chosen per call from the shapes (default): the few-row GEMM ([`moe_shaders::GEMV`],
    /// weights read once as 16-byte words and held in registers) when there are at most
    /// [`GEMV_MAX_ROWS`] rows per local expert on average and K and the views are aligned to
    /// 16-byte words; otherwise the scalar decode variant when there are at most 4 rows per
    /// local expert on average (`tokens * top_k <= 4 * local_experts`); the tiled one
    /// otherwise. Linears (router, shared expert down, latent projections) of at most
    /// [`GEMV_MAX_ROWS`] tokens take the few-row GEMM under the same alignment rule.
    #[default]
    Auto,
    /// Always the tiled variant (16-row x 64-column output tiles through workgroup memory),
    /// for the linears too.
    Tiled,
    /// The few-row GEMM wherever it can run, else the scalar decode variant wherever it can
    /// run; the tiled one only where neither can (a grid past 65535 workgroups or, on
    /// llvmpipe, its loop budget). For tests.
    Decode,
    /// The scalar decode variant (K split across a workgroup, every row of the expert applied
    /// to each loaded weight chunk) wherever it can run, the tiled one elsewhere; linears as
    /// [`ExpertGemm::Auto`]. For tests of the path unaligned views take.
    DecodeScalar,
}

/// Which kernel of the few-row GEMM ([`moe_shaders::GEMV`]) a backend runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FewRowGemm {
    /// Entry point `stream` (default): a group of 16-256 lanes per output feature streams its
    /// weight row through the K loop, 4 words of each weight row per lane per step (8
    /// independent 16-byte loads in flight when gated, 4 otherwise), and one fixed-order
    /// reduction per block of 1, 4 or 8 rows.
    #[default]
    Stream,
    /// Entry point `main` (the earlier kernel, for A/B): each lane holds 4 words of each
    /// weight row per K segment in registers and applies them to every block of 4 rows, with
    /// a reduction per block of rows.
    Resident,
}

/// The most rows (tokens for a linear, rows per local expert on average for an expert GEMM)
/// for which [`ExpertGemm::Auto`] takes the few-row GEMM.
pub const GEMV_MAX_ROWS: usize = 64;

/// Choices made when a backend is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Store `f16` as the WGSL type `f16` when the device has `SHADER_F16` (default); when off
    /// or unavailable, `f16` is packed two to a `u32` and converted in the shader.
    pub native_f16: bool,
    /// The expert GEMM variant ([`ExpertGemm::Auto`] by default).
    pub expert_gemm: ExpertGemm,
    /// The most rows (tokens for a linear, rows per local expert on average for an expert
    /// GEMM under [`ExpertGemm::Auto`]) for which the few-row GEMM is taken
    /// ([`GEMV_MAX_ROWS`] by default; for experiments).
    pub gemv_max_rows: usize,
    /// The few-row GEMM's kernel ([`FewRowGemm::Stream`] by default).
    pub few_row: FewRowGemm,
    /// About how many 16-byte words of each weight row a lane of [`FewRowGemm::Stream`]
    /// reads (sets its lanes per output feature: the power of two, 16 to 256, at or above
    /// `K words / this`); [`moe_shaders::GEMV_STREAM_WORDS`] by default, for tuning.
    pub gemv_stream_words: usize,
    /// Record a forward's stages into one command encoder and submit it once (default);
    /// when off, each stage is submitted on its own (for A/B).
    pub batch_forward: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            native_f16: true,
            expert_gemm: ExpertGemm::Auto,
            gemv_max_rows: GEMV_MAX_ROWS,
            few_row: FewRowGemm::Stream,
            gemv_stream_words: moe_shaders::GEMV_STREAM_WORDS as usize,
            batch_forward: true,
        }
    }
}

/// The wgpu backend: a device, its queue, and what is created once per device.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    f16: bool,
    expert_gemm: ExpertGemm,
    gemv_max_rows: usize,
    few_row: FewRowGemm,
    batch_forward: bool,
    gemv_stream_words: usize,
    params: wgpu::Buffer,
    dummy: wgpu::Buffer,
    layouts: Vec<wgpu::BindGroupLayout>,
    pipeline_layouts: Vec<wgpu::PipelineLayout>,
    modules: Mutex<HashMap<(Shader, Storage, Storage), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    buffers_created: AtomicUsize,
    decode_dispatches: AtomicUsize,
    gemv_dispatches: AtomicUsize,
    dispatches: AtomicUsize,
    submits: AtomicUsize,
    stages: AtomicUsize,
    next_slot: Mutex<u64>,
    batch: Mutex<Option<Batch>>,
    stage_stamps: Mutex<Option<StageStamps>>,
    info: wgpu::AdapterInfo,
    loop_cap: Option<u64>,
    storage_align: u64,
    max_binding: u64,
}

impl core::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("f16", &self.f16)
            .field("buffers_created", &self.buffers_created())
            .finish_non_exhaustive()
    }
}

impl WgpuBackend {
    /// Use `device` and `queue` with the default [`Options`].
    pub fn new(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::with_options(device, queue, Options::default())
    }

    /// Use `device` and `queue` with `options`.
    pub fn with_options(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: Options,
    ) -> Result<Self> {
        let limits = device.limits();
        let info = device.adapter_info();
        let f16 = options.native_f16 && device.features().contains(wgpu::Features::SHADER_F16);
        let mut layouts = Vec::new();
        let mut pipeline_layouts = Vec::new();
        for s in Shader::ALL {
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }];
            for b in 1..=s.storage_bindings() {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: b,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
            let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("moe-wgpu"),
                entries: &entries,
            });
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("moe-wgpu"),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
            layouts.push(bgl);
            pipeline_layouts.push(pl);
        }
        let created = AtomicUsize::new(0);
        let mk = |label, size, usage| {
            created.fetch_add(1, Ordering::Relaxed);
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let params = mk(
            "moe-wgpu params",
            SLOT * SLOTS,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let dummy = mk("moe-wgpu placeholder", 256, wgpu::BufferUsages::STORAGE);
        Ok(WgpuBackend {
            storage_align: u64::from(limits.min_storage_buffer_offset_alignment.max(4)),
            max_binding: limits.max_storage_buffer_binding_size,
            device,
            queue,
            f16,
            expert_gemm: options.expert_gemm,
            gemv_max_rows: options.gemv_max_rows,
            few_row: options.few_row,
            batch_forward: options.batch_forward,
            gemv_stream_words: options.gemv_stream_words.max(1),
            params,
            dummy,
            layouts,
            pipeline_layouts,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            buffers_created: created,
            decode_dispatches: AtomicUsize::new(0),
            gemv_dispatches: AtomicUsize::new(0),
            dispatches: AtomicUsize::new(0),
            submits: AtomicUsize::new(0),
            stages: AtomicUsize::new(0),
            next_slot: Mutex::new(0),
            batch: Mutex::new(None),
            stage_stamps: Mutex::new(None),
            loop_cap: llvmpipe_loop_cap(&info),
            info,
        })
    }

    /// Request an adapter and a device with `SHADER_F16` where the adapter has it and the
    /// adapter's own limits. `Ok(None)` when no adapter exists at all. The usual wgpu
    /// environment variables apply (e.g. `WGPU_BACKEND=vulkan` to use only Vulkan, where
    /// Mesa's lavapipe is a software adapter).
    pub fn request() -> Result<Option<Self>> {
        Self::request_with(Options::default())
    }

    /// As [`WgpuBackend::request`], with `options`.
    pub fn request_with(options: Options) -> Result<Option<Self>> {
        Self::request_with_features(options, wgpu::Features::empty())
    }

    /// As [`WgpuBackend::request_with`], also enabling those of `extra` (e.g.
    /// `TIMESTAMP_QUERY` for a benchmark) that the adapter has; check
    /// `backend.device().features()` for what was enabled. The device gets the adapter's own
    /// limits (`adapter.limits()`: on a discrete GPU, multi-GB `max_buffer_size` and
    /// `max_storage_buffer_binding_size`), not WebGPU's defaults.
    pub fn request_with_features(options: Options, extra: wgpu::Features) -> Result<Option<Self>> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = match block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })) {
            Ok(a) => a,
            Err(_) => return Ok(None),
        };
        let features = adapter.features() & (wgpu::Features::SHADER_F16 | extra);
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moe-wgpu"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|_| MoeError::Device {
            backend: NAME,
            what: "request_device",
            code: -1,
        })?;
        Self::with_options(device, queue, options).map(Some)
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether an expert GEMM over `slots` rows in all (`tokens * top_k`, at most `rows` of
    /// them in one expert) of `experts` experts, with `columns` decode workgroups per expert
    /// and reduction length `k`, runs the decode variant.
    fn use_decode(
        &self,
        slots: usize,
        experts: usize,
        rows: usize,
        columns: usize,
        k: usize,
    ) -> bool {
        let wanted = match self.expert_gemm {
            ExpertGemm::Tiled => false,
            ExpertGemm::Decode | ExpertGemm::DecodeScalar => true,
            ExpertGemm::Auto => slots <= 4 * experts,
        };
        let decode = wanted
            && columns <= MAX_GROUPS as usize
            && self.check_loops(decode_loops(rows, k), "").is_ok();
        if decode {
            self.decode_dispatches.fetch_add(1, Ordering::Relaxed);
        }
        decode
    }

    /// On llvmpipe (lavapipe), whose invocations stop looping after 65535 loop iterations in
    /// total, refuse a dispatch whose invocations may need more (`iterations`, an upper
    /// bound) instead of computing a wrong result.
    fn check_loops(&self, iterations: u64, what: &'static str) -> Result<()> {
        match self.loop_cap {
            Some(cap) if iterations > cap => Err(unsupported(what)),
            _ => Ok(()),
        }
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Whether `f16` is stored as the WGSL type `f16` (the device has `SHADER_F16` and
    /// [`Options::native_f16`] is on); otherwise it is packed two to a `u32`.
    pub fn native_f16(&self) -> bool {
        self.f16
    }

    /// Whether element type `dtype` is supported (all of f32, f16 and bf16 are).
    pub fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Buffers this backend has created since it was made (2, at construction). A forward
    /// creates none.
    pub fn buffers_created(&self) -> usize {
        self.buffers_created.load(Ordering::Relaxed)
    }

    /// Expert GEMM dispatches that ran a decode variant (the scalar one or the few-row GEMM)
    /// since the backend was made (see [`ExpertGemm`]).
    pub fn decode_gemm_dispatches(&self) -> usize {
        self.decode_dispatches.load(Ordering::Relaxed)
    }

    /// Dispatches of the few-row GEMM ([`moe_shaders::GEMV`]: expert GEMMs and small linears)
    /// since the backend was made.
    pub fn gemv_dispatches(&self) -> usize {
        self.gemv_dispatches.load(Ordering::Relaxed)
    }

    /// Compute dispatches recorded since the backend was made (for counting a forward's).
    pub fn dispatches(&self) -> usize {
        self.dispatches.load(Ordering::Relaxed)
    }

    /// Queue submissions made since the backend was made: one per stage called on its own,
    /// one per forward ([`moe_core::forward`] records its stages into one command encoder
    /// between [`MoeStages::begin_forward`] and [`MoeStages::end_forward`]).
    pub fn submits(&self) -> usize {
        self.submits.load(Ordering::Relaxed)
    }

    /// Stages recorded since the backend was made (each one compute pass).
    pub fn stages(&self) -> usize {
        self.stages.load(Ordering::Relaxed)
    }

    fn batch_lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Batch>>> {
        self.batch.lock().map_err(|_| MoeError::Device {
            backend: NAME,
            what: "forward batch lock",
            code: -1,
        })
    }

    fn new_encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("moe-wgpu") })
    }

    /// Submit the stages recorded in `b` so far (a fresh encoder takes their place).
    fn flush_batch(&self, b: &mut Batch) {
        let enc = core::mem::replace(&mut b.encoder, self.new_encoder());
        if b.stages > 0 {
            self.queue.submit([enc.finish()]);
            self.submits.fetch_add(1, Ordering::Relaxed);
        }
        b.stages = 0;
    }

    /// Begin recording this thread's stages into one encoder (see [`MoeStages::begin_forward`]).
    /// Where another thread's forward is being recorded, this thread's stages are submitted one
    /// by one as outside a forward.
    fn begin_batch(&self) -> Result<()> {
        if !self.batch_forward {
            return Ok(());
        }
        let me = std::thread::current().id();
        let mut g = self.batch_lock()?;
        match g.as_mut() {
            None => {
                *g = Some(Batch { owner: me, depth: 1, encoder: self.new_encoder(), stages: 0 })
            }
            Some(b) if b.owner == me => b.depth += 1,
            Some(_) => {}
        }
        Ok(())
    }

    /// End this thread's recording begun by [`Self::begin_batch`]: submit what it recorded.
    fn end_batch(&self) -> Result<()> {
        let me = std::thread::current().id();
        let mut g = self.batch_lock()?;
        let Some(b) = g.as_mut().filter(|b| b.owner == me) else {
            return Ok(());
        };
        b.depth -= 1;
        if b.depth > 0 {
            return Ok(());
        }
        let Some(mut b) = g.take() else {
            return Ok(());
        };
        drop(g);
        // Errors of the recorded passes (wgpu reports them at `finish` or submission).
        self.scoped("a forward's command submission", || {
            self.flush_batch(&mut b);
            Ok(())
        })
    }

    /// Start recording GPU timestamps at the beginning and end of each stage's compute pass
    /// (each stage is one compute pass), for up to `max_stages` stages (at most 2048). Needs
    /// `wgpu::Features::TIMESTAMP_QUERY` on the device: returns `false` (and records nothing)
    /// without it. A recording already under way is discarded.
    pub fn begin_stage_timestamps(&self, max_stages: u32) -> bool {
        if !self.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return false;
        }
        let cap = max_stages.clamp(1, 2048);
        let bytes = 16 * u64::from(cap);
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("moe-wgpu stage timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * cap,
        });
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolve = buffer(
            "moe-wgpu stage timestamps resolve",
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        );
        let read = buffer(
            "moe-wgpu stage timestamps read",
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let Ok(mut g) = self.stage_stamps.lock() else {
            return false;
        };
        *g = Some(StageStamps { set, resolve, read, cap, labels: Vec::new() });
        true
    }

    /// Stop the recording begun by [`Self::begin_stage_timestamps`], wait for the device and
    /// return the GPU time of each recorded stage in submission order (empty where nothing
    /// was recorded).
    pub fn end_stage_timestamps(&self) -> Result<Vec<StageTime>> {
        let taken = self
            .stage_stamps
            .lock()
            .map_err(|_| MoeError::Device {
                backend: NAME,
                what: "stage timestamps lock",
                code: -1,
            })?
            .take();
        let Some(st) = taken else {
            return Ok(Vec::new());
        };
        let n = st.labels.len() as u32;
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = 16 * u64::from(n);
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("moe-wgpu stage timestamps"),
        });
        enc.resolve_query_set(&st.set, 0..2 * n, &st.resolve, 0);
        enc.copy_buffer_to_buffer(&st.resolve, 0, &st.read, 0, bytes);
        self.queue.submit([enc.finish()]);
        let slice = st.read.slice(0..bytes);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.synchronize()?;
        let v: Vec<u64> = {
            let m = slice.get_mapped_range().map_err(|_| MoeError::Device {
                backend: NAME,
                what: "mapping the stage timestamps",
                code: -1,
            })?;
            bytemuck::pod_collect_to_vec(&m)
        };
        st.read.unmap();
        let period = f64::from(self.queue.get_timestamp_period());
        let t0 = v[0];
        Ok(st
            .labels
            .iter()
            .enumerate()
            .map(|(i, &label)| StageTime {
                label,
                start_ns: v[2 * i].wrapping_sub(t0) as f64 * period,
                gpu_ns: v[2 * i + 1].wrapping_sub(v[2 * i]) as f64 * period,
            })
            .collect())
    }

    /// Wait until all submitted work is done.
    pub fn synchronize(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|_| MoeError::Device { backend: NAME, what: "device poll", code: -1 })
    }

    fn storage<T: Element>(&self) -> Result<Storage> {
        match T::DTYPE {
            DType::F32 => Ok(Storage::F32),
            DType::F16 if self.f16 => Ok(Storage::F16),
            DType::F16 => Ok(Storage::F16Packed),
            DType::BF16 => Ok(Storage::BF16),
        }
    }

    fn pipeline(
        &self,
        shader: Shader,
        elem: Storage,
        out: Storage,
        entry: &'static str,
    ) -> Result<wgpu::ComputePipeline> {
        self.pipeline_with(shader, elem, out, entry, 0, 0)
    }

    /// As [`Self::pipeline`], with the `LANES` pipeline constant of [`Shader::Gemv`] when
    /// `lanes > 0` and its `RB` constant when `rb > 0`.
    fn pipeline_with(
        &self,
        shader: Shader,
        elem: Storage,
        out: Storage,
        entry: &'static str,
        lanes: u32,
        rb: u32,
    ) -> Result<wgpu::ComputePipeline> {
        fn lock_err<E>(_: E) -> MoeError {
            MoeError::Device { backend: NAME, what: "pipeline cache lock", code: -1 }
        }
        let key = (shader, elem, out, entry, lanes | rb << 16);
        if let Some(p) = self.pipelines.lock().map_err(lock_err)?.get(&key) {
            return Ok(p.clone());
        }
        let module = self.scoped("shader module creation", || {
            let mut modules = self.modules.lock().map_err(lock_err)?;
            Ok(modules
                .entry((shader, elem, out))
                .or_insert_with(|| {
                    let src = moe_shaders::compose(shader.source(), elem, out);
                    self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("moe-wgpu"),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    })
                })
                .clone())
        })?;
        let constants = [("LANES", f64::from(lanes)), ("RB", f64::from(rb))];
        let constants: &[(&str, f64)] = match (lanes, rb) {
            (0, _) => &[],
            (_, 0) => &constants[..1],
            _ => &constants,
        };
        let p = self.scoped("shader module or pipeline creation", || {
            Ok(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&self.pipeline_layouts[shader.index()]),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    // Every shader writes its workgroup memory before reading it: skip the
                    // zeroing prologue wgpu would add to each workgroup.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            }))
        })?;
        self.pipelines.lock().map_err(lock_err)?.insert(key, p.clone());
        Ok(p)
    }

    fn bind_raw<'a>(
        &'a self,
        buffer: &'a wgpu::Buffer,
        offset: u64,
        len: usize,
        size: usize,
    ) -> Result<Bind<'a>> {
        if len == 0 {
            return Ok(Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 });
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(unsupported("a view's buffer lacks BufferUsages::STORAGE"));
        }
        let aligned = offset - offset % self.storage_align;
        let end = offset + (len * size) as u64;
        let bsize = (end - aligned).div_ceil(4) * 4;
        if aligned + bsize > buffer.size() {
            return Err(unsupported(
                "a view that ends within the last 4 bytes of an odd-sized buffer",
            ));
        }
        if bsize > self.max_binding {
            return Err(unsupported("a view larger than max_storage_buffer_binding_size"));
        }
        let base = u32_of("view offset in elements", ((offset - aligned) / size as u64) as usize)?;
        Ok(Bind { buffer, offset: aligned, size: bsize, base })
    }

    fn bind<'a, U: Pod>(&'a self, v: &WgpuView<'a, U>) -> Result<Bind<'a>> {
        self.bind_raw(v.buffer, v.offset, v.len, core::mem::size_of::<U>())
    }

    fn bind_mut<'a, U: Pod>(&'a self, v: &WgpuViewMut<'a, U>) -> Result<Bind<'a>> {
        self.bind_raw(v.buffer, v.offset, v.len, core::mem::size_of::<U>())
    }

    fn bind_opt<'a, U: Pod>(&'a self, v: &Option<WgpuView<'a, U>>) -> Result<Bind<'a>> {
        match v {
            Some(v) => self.bind(v),
            None => Ok(Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 }),
        }
    }

    /// Encode `dispatches` in order (one compute pass each) and submit them once.
    fn submit(&self, dispatches: &[Dispatch<'_>]) -> Result<()> {
        self.scoped("a stage's bind groups or submission", || self.submit_inner(dispatches))
    }

    /// Run `f` inside validation and out-of-memory error scopes: a wgpu error raised by it
    /// (a buffer still mapped, destroyed, ...) becomes [`MoeError::Device`] instead of reaching
    /// the device's uncaptured-error handler (which panics by default).
    fn scoped<R>(&self, what: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let v = block_on(validation.pop());
        let o = block_on(oom.pop());
        match (v, o) {
            (None, None) => r,
            (Some(_), _) => Err(MoeError::Device { backend: NAME, what, code: -1 }),
            (None, Some(_)) => Err(MoeError::Device { backend: NAME, what, code: -2 }),
        }
    }

    fn submit_inner(&self, dispatches: &[Dispatch<'_>]) -> Result<()> {
        let n = dispatches.len() as u64;
        if n > SLOTS {
            return Err(unsupported("more dispatches in one stage than parameter slots"));
        }
        // The ring lock is held until the submission: threads sharing the backend must not
        // write each other's slots (or wrap the ring) between a write and its submit.
        let mut next = self.next_slot.lock().map_err(|_| MoeError::Device {
            backend: NAME,
            what: "parameter ring lock",
            code: -1,
        })?;
        let mut batch = self.batch_lock()?;
        if *next + n > SLOTS {
            // The ring wraps: submit the stages of a forward being recorded (their slots are
            // written), then make sure no submitted dispatch still reads its slots.
            if let Some(b) = batch.as_mut() {
                self.flush_batch(b);
            }
            self.synchronize()?;
            *next = 0;
        }
        let me = std::thread::current().id();
        let mut batch = batch.as_mut().filter(|b| b.owner == me);
        let first = *next;
        *next += n;
        // The stage's slots are contiguous: one write for all of them.
        let mut bytes = vec![0u8; (n * SLOT) as usize];
        for (j, d) in dispatches.iter().enumerate() {
            let raw: &[u8] = bytemuck::cast_slice(&d.params);
            let at = j * SLOT as usize;
            bytes[at..at + raw.len()].copy_from_slice(raw);
        }
        self.queue.write_buffer(&self.params, first * SLOT, &bytes);
        let mut groups = Vec::with_capacity(dispatches.len());
        for (j, d) in dispatches.iter().enumerate() {
            let i = first + j as u64;
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.params,
                    offset: i * SLOT,
                    size: wgpu::BufferSize::new(SLOT),
                }),
            }];
            for (j, b) in d.binds.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: j as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: b.buffer,
                        offset: b.offset,
                        size: wgpu::BufferSize::new(b.size),
                    }),
                });
            }
            groups.push(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("moe-wgpu"),
                layout: &self.layouts[d.shader.index()],
                entries: &entries,
            }));
        }
        let mut own = None;
        let enc = match batch.as_mut() {
            Some(b) => {
                b.stages += 1;
                &mut b.encoder
            }
            None => own.insert(self.new_encoder()),
        };
        self.stages.fetch_add(1, Ordering::Relaxed);
        {
            // One compute pass for the stage: wgpu places the barriers that the buffer uses
            // of consecutive dispatches need.
            let mut stamps = self.stage_stamps.lock().map_err(|_| MoeError::Device {
                backend: NAME,
                what: "stage timestamps lock",
                code: -1,
            })?;
            let timestamp_writes = match (stamps.as_mut(), dispatches.first()) {
                (Some(st), Some(d)) if (st.labels.len() as u32) < st.cap => {
                    let i = 2 * st.labels.len() as u32;
                    st.labels.push(stage_label(d));
                    Some(wgpu::ComputePassTimestampWrites {
                        query_set: &st.set,
                        beginning_of_pass_write_index: Some(i),
                        end_of_pass_write_index: Some(i + 1),
                    })
                }
                _ => None,
            };
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("moe-wgpu"),
                timestamp_writes,
            });
            for (d, g) in dispatches.iter().zip(&groups) {
                let [x, y, z] = d.groups;
                if x == 0 || y == 0 || z == 0 {
                    continue;
                }
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(x, y, z);
                self.dispatches.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(enc) = own {
            self.queue.submit([enc.finish()]);
            self.submits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether a GEMM over `slots` rows in all of `experts` experts takes the few-row GEMM by
    /// the backend's [`ExpertGemm`] choice (before the alignment and size checks of
    /// [`Self::gemv_grid`]); `linear` for the dense linears.
    fn gemv_wanted(&self, slots: usize, experts: usize, linear: bool) -> bool {
        match self.expert_gemm {
            ExpertGemm::Tiled => false,
            _ if linear => slots <= self.gemv_max_rows,
            ExpertGemm::Decode => true,
            ExpertGemm::DecodeScalar => false,
            ExpertGemm::Auto => slots <= self.gemv_max_rows * experts.max(1),
        }
    }

    /// The `LANES` constant and grid of a [`Shader::Gemv`] dispatch over `n` output features
    /// of `experts` experts (grid z), reduction length `k`, at most `rows` rows in one expert,
    /// `scan` the local expert count where the z workgroups are ranks of the experts with rows
    /// (see [`Self::expert_grid`]), else 0, with the
    /// word-read bindings `words` (activations and weights), and `row_hint` the rows one
    /// expert (or the linear) has in the common case (1 at one token; picks the `stream`
    /// kernel's rows per block); `None` where it cannot run: K or
    /// a view offset not a multiple of the word's elements, a grid past 65535 workgroups, or
    /// (llvmpipe) past the loop budget.
    #[allow(clippy::too_many_arguments)]
    fn gemv_grid(
        &self,
        elem: Storage,
        k: usize,
        n: usize,
        experts: usize,
        rows: usize,
        scan: usize,
        row_hint: usize,
        words: &[&Bind<'_>],
    ) -> Option<GemvGrid> {
        let ve = moe_shaders::gemv_elements_per_word(elem) as usize;
        if k == 0
            || n == 0
            || !k.is_multiple_of(ve)
            || words.iter().any(|b| !(b.base as usize).is_multiple_of(ve))
        {
            return None;
        }
        let kv = k / ve;
        let per_lane = moe_shaders::GEMV_WORDS as usize;
        let stream = self.few_row == FewRowGemm::Stream;
        let lanes = if stream {
            // about GEMV_STREAM_WORDS words of each weight row per lane
            kv.div_ceil(self.gemv_stream_words)
        } else {
            kv.div_ceil(per_lane)
        }
        .next_power_of_two()
        .clamp(if stream { 16 } else { 32 }, 256);
        // rows per block of `stream`: 1 where each expert (or the linear) has one row, else
        // 4 or 8 from the average
        let rb: usize = match row_hint {
            0 | 1 => 1,
            2..=4 => 4,
            _ => 8,
        };
        let per_group = moe_shaders::GEMV_GROUP as usize / lanes;
        let gx = n.div_ceil(per_group);
        let nx = gx.min(MAX_GROUPS as usize);
        let ny = gx.div_ceil(nx);
        if ny > MAX_GROUPS as usize || experts > MAX_GROUPS as usize || experts == 0 {
            return None;
        }
        let nseg = kv.div_ceil(lanes * per_lane) as u64;
        let scan_loops = if scan > 0 { 2 * scan.div_ceil(256) as u64 + 16 } else { 0 };
        let loops = if stream {
            let (rb, steps) = (rb as u64, nseg);
            let blocks = rows.div_ceil(rb as usize) as u64 + 1;
            blocks * (2 * rb + steps * (rb + 1) + 9 * (2 * rb + 1) + 4) + 8 + scan_loops
        } else {
            let blocks = rows.div_ceil(moe_shaders::GEMV_ROWS as usize) as u64 + 1;
            blocks * (8 + nseg * (per_lane as u64 * 7) + 8 * 9 + 4) + 8 + scan_loops
        };
        self.check_loops(loops, "").ok()?;
        Some(GemvGrid {
            entry: if stream { "stream" } else { "main" },
            lanes: lanes as u32,
            rb: if stream { rb as u32 } else { 0 },
            groups: [nx as u32, ny as u32, experts as u32],
            nx: nx as u32,
        })
    }

    /// The z extent of an expert GEMM's few-row grid over `experts` local experts and `slots`
    /// routed slots, and the shader's `compact` parameter. At most `slots` experts have rows:
    /// where that is fewer than the experts, the grid has one z workgroup per possible expert
    /// with rows (the shader finds the expert of each by a scan of the offsets), so that a
    /// decode step does not launch a grid's worth of workgroups for every idle expert.
    fn expert_grid(experts: usize, slots: usize) -> (usize, usize) {
        let z = experts.min(slots).max(1);
        (z, if z < experts { experts } else { 0 })
    }

    /// Record one [`Shader::Gemv`] dispatch. `binds`: x, wa, wb, ba, bb, offsets, sorted
    /// slots, routing weights, row scale, y (bindings 1..=10). `params` without `nx`, which
    /// is inserted here.
    fn gemv_dispatch<'a>(
        &self,
        elem: Storage,
        out: Storage,
        grid: GemvGrid,
        mut params: Vec<u32>,
        binds: Vec<Bind<'a>>,
    ) -> Result<Dispatch<'a>> {
        let GemvGrid { entry, lanes, rb, groups, nx } = grid;
        params.insert(23, nx);
        self.gemv_dispatches.fetch_add(1, Ordering::Relaxed);
        if params[2] != 0 {
            // An expert GEMM (or the dense MLP's up half): counted as a decode variant too.
            self.decode_dispatches.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Dispatch {
            pipeline: self.pipeline_with(Shader::Gemv, elem, out, entry, lanes, rb)?,
            shader: Shader::Gemv,
            params,
            binds,
            groups,
        })
    }

    /// A 1-D grid of `n` invocations in workgroups of `moe_shaders::GROUP`, folded into 2-D
    /// when it has more than 65535 workgroups. Returns the grid and its x extent.
    fn grid_1d(n: usize) -> Result<([u32; 3], u32)> {
        let groups = n.div_ceil(moe_shaders::GROUP as usize);
        let nx = groups.clamp(1, MAX_GROUPS as usize);
        let ny = groups.div_ceil(nx);
        if ny > MAX_GROUPS as usize {
            return Err(unsupported("more than 65535^2 workgroups"));
        }
        Ok(([nx as u32, ny.max(1) as u32, if groups == 0 { 0 } else { 1 }], nx as u32))
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_impl<'a>(
        &'a self,
        elem: Storage,
        out_ty: Storage,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: Bind<'a>,
        w: Bind<'a>,
        b: Option<Bind<'a>>,
        rs: Option<Bind<'a>>,
        scale: f32,
        accumulate: bool,
        sigmoid: bool,
        out: Bind<'a>,
    ) -> Result<()> {
        let grid = if self.gemv_wanted(tokens, 1, true) {
            self.gemv_grid(elem, in_dim, out_dim, 1, tokens, 0, tokens, &[&x, &w])
        } else {
            None
        };
        if let Some(grid) = grid {
            let dummy = || Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 };
            let params = vec![
                u32_of("in_dim", in_dim)?,
                u32_of("out_dim", out_dim)?,
                0,
                1,
                u32_of("tokens", tokens)?,
                1,
                x.base,
                w.base,
                0,
                b.as_ref().map_or(0, |b| b.base),
                0,
                0,
                0,
                0,
                rs.as_ref().map_or(0, |b| b.base),
                out.base,
                0,
                u32::from(b.is_some()),
                0,
                u32::from(rs.is_some()),
                u32::from(accumulate),
                u32::from(sigmoid),
                0,
                scale.to_bits(),
                0,
                0,
                0,
            ];
            let binds = vec![
                x,
                w,
                dummy(),
                b.unwrap_or_else(dummy),
                dummy(),
                dummy(),
                dummy(),
                dummy(),
                rs.unwrap_or_else(dummy),
                out,
            ];
            let d = self.gemv_dispatch(elem, out_ty, grid, params, binds)?;
            return self.submit(&[d]);
        }
        let t = moe_shaders::TILE as usize;
        let gx = out_dim.div_ceil(moe_shaders::TILE_N as usize);
        let gy = tokens.div_ceil(t).clamp(1, MAX_GROUPS as usize);
        if gx > MAX_GROUPS as usize {
            return Err(unsupported("a linear with more than 65535 column tiles"));
        }
        self.check_loops(
            gemm_loops(tokens, gy, in_dim),
            "a linear too long for llvmpipe's 65535-iteration loop cap",
        )?;
        let params = vec![
            u32_of("tokens", tokens)?,
            u32_of("in_dim", in_dim)?,
            u32_of("out_dim", out_dim)?,
            x.base,
            w.base,
            b.as_ref().map_or(0, |b| b.base),
            rs.as_ref().map_or(0, |b| b.base),
            out.base,
            u32::from(b.is_some()),
            u32::from(rs.is_some()),
            u32::from(accumulate),
            u32::from(sigmoid),
            scale.to_bits(),
        ];
        let dummy = || Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 };
        let binds = vec![x, w, b.unwrap_or_else(dummy), rs.unwrap_or_else(dummy), out];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::Linear, elem, out_ty, "main")?,
            shader: Shader::Linear,
            params,
            binds,
            groups: [gx as u32, gy as u32, 1],
        }])
    }

    #[allow(clippy::too_many_arguments)]
    fn up_impl<T: Element>(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        topk: usize,
        experts: usize,
        pad: usize,
        width: usize,
        inter: usize,
        x: WgpuView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: Option<&ExpertRows<'_, Self>>,
        hidden: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        let n_w = experts * inter * width;
        shape("up weight", n_w, weights.up.len)?;
        if mlp.gated {
            shape("gate weight", n_w, weights.gate.map_or(0, |g| g.len))?;
        }
        let has_b = weights.up_bias.is_some();
        if has_b {
            shape("up bias", experts * inter, weights.up_bias.map_or(0, |b| b.len))?;
            if mlp.gated {
                shape("gate bias", experts * inter, weights.gate_bias.map_or(0, |b| b.len))?;
            }
        }
        let (act, alpha, limit) = match mlp.activation {
            Activation::Silu => (0, 0.0, 0.0),
            Activation::Gelu => (1, 0.0, 0.0),
            Activation::GeluTanh => (2, 0.0, 0.0),
            Activation::Relu2 => (3, 0.0, 0.0),
            Activation::SwigluOai { alpha, limit } => (4, alpha as f32, limit as f32),
        };
        let dense = rows.is_none();
        let tile = moe_shaders::TILE as usize;
        if experts > MAX_GROUPS as usize {
            return Err(unsupported("more than 65535 column tiles or local experts"));
        }
        let dummy = || Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 };
        let xb = self.bind(&x)?;
        let gb = if mlp.gated { self.bind_opt(&weights.gate)? } else { dummy() };
        let ub = self.bind(&weights.up)?;
        let on_input = rows.is_some_and(|r| r.weights.is_some());
        let bgb = if has_b && mlp.gated { self.bind_opt(&weights.gate_bias)? } else { dummy() };
        let bub = if has_b { self.bind_opt(&weights.up_bias)? } else { dummy() };
        let (off, sorted, tw) = match rows {
            Some(r) => (
                self.bind(&r.expert_offsets)?,
                self.bind(&r.sorted_slots)?,
                match &r.weights {
                    Some(w) => self.bind(w)?,
                    None => dummy(),
                },
            ),
            None => (dummy(), dummy(), dummy()),
        };
        let hb = self.bind_mut(&hidden)?;
        let (gz, compact) =
            if dense { (experts, 0) } else { Self::expert_grid(experts, tokens * topk) };
        let grid = if self.gemv_wanted(tokens * topk, experts, dense) {
            let mut words = vec![&xb, &ub];
            if mlp.gated {
                words.push(&gb);
            }
            let hint = match tokens {
                1 => 1,
                _ if dense => tokens,
                _ => (tokens * topk).div_ceil(gz).max(2),
            };
            self.gemv_grid(elem, width, inter, gz, tokens + pad, compact, hint, &words)
        } else {
            None
        };
        if let Some(grid) = grid {
            let params = vec![
                u32_of("width", width)?,
                u32_of("intermediate", inter)?,
                1,
                u32_of("top_k", topk)?,
                u32_of("tokens", tokens)?,
                u32::from(dense),
                xb.base,
                ub.base,
                gb.base,
                bub.base,
                bgb.base,
                off.base,
                sorted.base,
                tw.base,
                0,
                hb.base,
                u32::from(mlp.gated),
                u32::from(has_b),
                u32::from(on_input),
                0,
                0,
                0,
                act,
                1.0f32.to_bits(),
                alpha.to_bits(),
                limit.to_bits(),
                u32_of("experts", compact)?,
            ];
            let binds = vec![xb, ub, gb, bub, bgb, off, sorted, tw, dummy(), hb];
            let d = self.gemv_dispatch(elem, elem, grid, params, binds)?;
            return self.submit(&[d]);
        }
        let dcols = inter.div_ceil(moe_shaders::DECODE_UP_FEATURES as usize);
        let decode = self.use_decode(tokens * topk, experts, tokens + pad, dcols, width);
        let (entry, groups) = if decode {
            ("decode", [dcols as u32, 1, experts as u32])
        } else {
            let gx = inter.div_ceil(moe_shaders::TILE_N as usize);
            let gy = tokens.div_ceil(tile).clamp(1, MAX_GROUPS as usize);
            if gx > MAX_GROUPS as usize {
                return Err(unsupported("more than 65535 column tiles or local experts"));
            }
            self.check_loops(
                gemm_loops(tokens + moe_shaders::TILE as usize, gy, width),
                "an expert GEMM too long for llvmpipe's 65535-iteration loop cap",
            )?;
            ("main", [gx as u32, gy as u32, experts as u32])
        };
        let params = vec![
            u32_of("width", width)?,
            u32_of("intermediate", inter)?,
            u32_of("top_k", topk)?,
            u32_of("tokens", tokens)?,
            xb.base,
            gb.base,
            ub.base,
            bgb.base,
            bub.base,
            off.base,
            sorted.base,
            tw.base,
            hb.base,
            u32::from(mlp.gated),
            u32::from(has_b),
            u32::from(on_input),
            act,
            u32::from(dense),
            alpha.to_bits(),
            limit.to_bits(),
        ];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::ExpertUp, elem, elem, entry)?,
            shader: Shader::ExpertUp,
            params,
            binds: vec![xb, gb, ub, bgb, bub, off, sorted, tw, hb],
            groups,
        }])
    }
}

impl Backend for WgpuBackend {
    const NAME: &'static str = NAME;
    type View<'a, U: Pod>
        = WgpuView<'a, U>
    where
        U: 'a;
    type ViewMut<'a, U: Pod>
        = WgpuViewMut<'a, U>
    where
        U: 'a;

    fn view_len<U: Pod>(v: &Self::View<'_, U>) -> usize {
        v.len
    }

    fn view_mut_len<U: Pod>(v: &Self::ViewMut<'_, U>) -> usize {
        v.len
    }

    fn as_view<'b, 'c: 'b, U: Pod>(v: &'b Self::ViewMut<'c, U>) -> Self::View<'b, U> {
        v.as_view()
    }

    fn narrow<'b, 'c: 'b, U: Pod>(v: Self::View<'c, U>) -> Self::View<'b, U> {
        v
    }

    fn reborrow<'b, 'c: 'b, U: Pod>(v: &'b mut Self::ViewMut<'c, U>) -> Self::ViewMut<'b, U> {
        v.reborrow()
    }

    fn split_at<'a, U: Pod>(
        v: Self::ViewMut<'a, U>,
        mid: usize,
    ) -> (Self::ViewMut<'a, U>, Self::ViewMut<'a, U>) {
        v.split_at(mid)
    }

    fn misalignment(v: &Self::ViewMut<'_, u8>, align: usize) -> usize {
        let a = align.max(1) as u64;
        ((a - v.offset % a) % a) as usize
    }

    fn cast_bytes<'a, U: Pod>(v: Self::ViewMut<'a, u8>) -> Result<Self::ViewMut<'a, U>> {
        v.cast()
    }
}

impl<T: Element> MoeStages<T> for WgpuBackend {
    fn begin_forward(&self) -> Result<()> {
        self.begin_batch()
    }

    fn end_forward(&self) -> Result<()> {
        self.end_batch()
    }

    fn router_logits(
        &self,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: WgpuView<'_, T>,
        weight: WgpuView<'_, T>,
        bias: Option<WgpuView<'_, T>>,
        logits: WgpuViewMut<'_, f32>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        shape("x", tokens * hidden, x.len)?;
        shape("router.weight", experts * hidden, weight.len)?;
        if let Some(b) = &bias {
            shape("router.bias", experts, b.len)?;
        }
        at_least("logits", tokens * experts, logits.len)?;
        if tokens == 0 {
            return Ok(());
        }
        let b = match &bias {
            Some(b) => Some(self.bind(b)?),
            None => None,
        };
        self.linear_impl(
            elem,
            Storage::F32,
            tokens,
            hidden,
            experts,
            self.bind(&x)?,
            self.bind(&weight)?,
            b,
            None,
            1.0,
            false,
            false,
            self.bind_mut(&logits)?,
        )
    }

    fn route(
        &self,
        config: &MoeConfig,
        tokens: usize,
        logits: WgpuView<'_, f32>,
        selection_bias: Option<WgpuView<'_, f32>>,
        _scratch: WgpuViewMut<'_, f32>,
        topk_ids: WgpuViewMut<'_, i32>,
        topk_weights: WgpuViewMut<'_, f32>,
    ) -> Result<()> {
        let (e, k) = (config.experts, config.top_k);
        let r = &config.router;
        let (reduce, rparam) = match r.reduce {
            TopkReduce::None => (0u32, 0.0f32),
            TopkReduce::Sum { eps } => (1, eps as f32),
            TopkReduce::ClampMin { min } => (2, min as f32),
            TopkReduce::PNorm { p } => (3, p as f32),
            TopkReduce::Custom(_) => {
                return Err(unsupported(
                    "a user-supplied top-k reduce (TopkReduce::Custom) cannot run in a shader",
                ));
            }
        };
        at_least("logits", tokens * e, logits.len)?;
        at_least("topk_ids", tokens * k, topk_ids.len)?;
        at_least("topk_weights", tokens * k, topk_weights.len)?;
        if let Some(b) = &selection_bias {
            shape("router.selection_bias", e, b.len)?;
        }
        let (n_group, topk_group, gscore) = match r.groups {
            Some(g) => {
                if g.n_group > moe_shaders::MAX_GROUPS as usize {
                    return Err(unsupported("more than 256 expert groups"));
                }
                (g.n_group, g.topk_group, if g.score == GroupScore::Top2Sum { 0 } else { 1 })
            }
            None => (0, 0, 0),
        };
        if tokens == 0 {
            return Ok(());
        }
        // One workgroup per token where the experts fit its workgroup memory (`wg`), else one
        // invocation per token (`main`).
        let wg_groups = tokens.min(MAX_GROUPS as usize);
        let wg_strides = tokens.div_ceil(wg_groups) as u64;
        let lanes = moe_shaders::ROUTE_GROUP as usize;
        let wg_per_token = (2 * e
            + 3 * e.div_ceil(lanes)
            + n_group * (e / n_group.max(1) + n_group + 2)
            + k * (e.div_ceil(lanes) + 10)
            + 4 * k
            + 16) as u64;
        let use_wg = e <= moe_shaders::ROUTE_WG_EXPERTS as usize
            && self.check_loops(wg_strides * (wg_per_token + 1), "").is_ok();
        let (entry, groups) = if use_wg {
            ("wg", wg_groups)
        } else {
            let groups = tokens.div_ceil(lanes).min(MAX_GROUPS as usize);
            let per_token =
                (2 * e + n_group * (e / n_group.max(1) + n_group + 2) + k * (e + 1) + 4 * k + 8)
                    as u64;
            let strides = tokens.div_ceil(groups * lanes) as u64;
            self.check_loops(
                strides * (per_token + 1),
                "a route (top_k x experts) too long for llvmpipe's 65535-iteration loop cap",
            )?;
            ("main", groups)
        };
        let lb = self.bind(&logits)?;
        let sb = self.bind_opt(&selection_bias)?;
        let ib = self.bind_mut(&topk_ids)?;
        let wb = self.bind_mut(&topk_weights)?;
        let params = vec![
            u32_of("tokens", tokens)?,
            u32_of("experts", e)?,
            u32_of("top_k", k)?,
            lb.base,
            sb.base,
            ib.base,
            wb.base,
            match r.scoring {
                Scoring::Softmax => 0,
                Scoring::Sigmoid => 1,
                Scoring::None => 2,
            },
            u32::from(selection_bias.is_some()),
            n_group as u32,
            topk_group as u32,
            gscore,
            match r.weights {
                WeightSource::Scores => 0,
                WeightSource::SoftmaxTopkLogits => 1,
                WeightSource::SigmoidTopkLogits => 2,
            },
            reduce,
            rparam.to_bits(),
            (config.weight_scale() as f32).to_bits(),
        ];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::Route, Storage::F32, Storage::F32, entry)?,
            shader: Shader::Route,
            params,
            binds: vec![lb, sb, ib, wb],
            groups: [groups as u32, 1, 1],
        }])
    }

    fn permute(
        &self,
        plan: &MoePlan,
        tokens: usize,
        topk_ids: WgpuView<'_, i32>,
        expert_map: Option<WgpuView<'_, i32>>,
        out: PermuteBuffers<'_, Self>,
    ) -> Result<()> {
        let c = plan.config();
        let (k, el) = (c.top_k, c.local_experts());
        let n = tokens * k;
        at_least("topk_ids", n, topk_ids.len)?;
        at_least("expert_offsets", el + 1, out.expert_offsets.len)?;
        at_least("expert_cursor", el, out.expert_cursor.len)?;
        at_least("sorted_slots", plan.rows_capacity(tokens), out.sorted_slots.len)?;
        at_least("slot_rows", n, out.slot_rows.len)?;
        if let Some(m) = &expert_map {
            shape("expert_map", c.experts, m.len)?;
        }
        if el > MAX_GROUPS as usize {
            return Err(unsupported("more than 65535 local experts"));
        }
        let chunks = n.div_ceil(1024) as u64;
        let pad = plan.row_align().div_ceil(256) as u64;
        self.check_loops(
            (2 * chunks + pad + 16).max(el as u64 + 2),
            "a permute too long for llvmpipe's 65535-iteration loop cap",
        )?;
        let ib = || self.bind(&topk_ids);
        let mb = || self.bind_opt(&expert_map);
        let ob = || self.bind_mut(&out.expert_offsets);
        let cb = || self.bind_mut(&out.expert_cursor);
        let sb = || self.bind_mut(&out.sorted_slots);
        let rb = || self.bind_mut(&out.slot_rows);
        let (i0, m0, o0, c0, s0, r0) = (ib()?, mb()?, ob()?, cb()?, sb()?, rb()?);
        let params = vec![
            u32_of("slots", n)?,
            el as u32,
            u32_of("experts", c.experts)?,
            u32::from(expert_map.is_some()),
            u32_of("row_align", plan.row_align())?,
            i0.base,
            m0.base,
            o0.base,
            c0.base,
            s0.base,
            r0.base,
        ];
        let mut ds = Vec::new();
        for (entry, groups) in [
            ("count", [el as u32, 1, 1]),
            ("offsets_main", [1, 1, 1]),
            ("scatter", [el as u32, 1, 1]),
        ] {
            ds.push(Dispatch {
                pipeline: self.pipeline(Shader::Permute, Storage::F32, Storage::F32, entry)?,
                shader: Shader::Permute,
                params: params.clone(),
                binds: vec![ib()?, mb()?, ob()?, cb()?, sb()?, rb()?],
                groups,
            });
        }
        self.submit(&ds)
    }

    fn expert_up(
        &self,
        plan: &MoePlan,
        tokens: usize,
        x: WgpuView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        hidden: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        let c = plan.config();
        let (d, inter, el) = (c.expert_width(), c.local_intermediate(), c.local_experts());
        at_least("expert input", tokens * d, x.len)?;
        at_least("hidden", plan.rows_capacity(tokens) * inter, hidden.len)?;
        at_least("expert_offsets", el + 1, rows.expert_offsets.len)?;
        if let Some(w) = &rows.weights {
            at_least("topk_weights", tokens * c.top_k, w.len)?;
        }
        if tokens == 0 {
            return Ok(());
        }
        let pad = plan.row_align();
        self.up_impl(
            &c.expert.mlp,
            tokens,
            c.top_k,
            el,
            pad,
            d,
            inter,
            x,
            weights,
            Some(&rows),
            hidden,
        )
    }

    fn expert_down(
        &self,
        plan: &MoePlan,
        tokens: usize,
        hidden: WgpuView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        out: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        let c = plan.config();
        let (d, inter, el) = (c.expert_width(), c.local_intermediate(), c.local_experts());
        let cap = plan.rows_capacity(tokens);
        at_least("hidden", cap * inter, hidden.len)?;
        at_least("expert_out", cap * d, out.len)?;
        shape("down weight", el * d * inter, weights.down.len)?;
        if let Some(b) = &weights.down_bias {
            shape("down bias", el * d, b.len)?;
        }
        at_least("expert_offsets", el + 1, rows.expert_offsets.len)?;
        if let Some(w) = &rows.weights {
            at_least("topk_weights", tokens * c.top_k, w.len)?;
        }
        if tokens == 0 {
            return Ok(());
        }
        let tile = moe_shaders::TILE as usize;
        if el > MAX_GROUPS as usize {
            return Err(unsupported("more than 65535 column tiles or local experts"));
        }
        let hb = self.bind(&hidden)?;
        let wb = self.bind(&weights.down)?;
        let bb = self.bind_opt(&weights.down_bias)?;
        let ob = self.bind(&rows.expert_offsets)?;
        let sb = self.bind(&rows.sorted_slots)?;
        let tb = self.bind_opt(&rows.weights)?;
        let yb = self.bind_mut(&out)?;
        let (gz, compact) = Self::expert_grid(el, tokens * c.top_k);
        let grid = if self.gemv_wanted(tokens * c.top_k, el, false) {
            let hint = if tokens == 1 { 1 } else { (tokens * c.top_k).div_ceil(gz).max(2) };
            let rows = tokens + plan.row_align();
            self.gemv_grid(elem, inter, d, gz, rows, compact, hint, &[&hb, &wb])
        } else {
            None
        };
        if let Some(grid) = grid {
            let dummy = || Bind { buffer: &self.dummy, offset: 0, size: 256, base: 0 };
            let params = vec![
                inter as u32,
                d as u32,
                2,
                c.top_k as u32,
                0,
                0,
                hb.base,
                wb.base,
                0,
                bb.base,
                0,
                ob.base,
                sb.base,
                tb.base,
                0,
                yb.base,
                0,
                u32::from(weights.down_bias.is_some()),
                u32::from(rows.weights.is_some()),
                0,
                0,
                0,
                0,
                1.0f32.to_bits(),
                0,
                0,
                compact as u32,
            ];
            let binds = vec![hb, wb, dummy(), bb, dummy(), ob, sb, tb, dummy(), yb];
            let dsp = self.gemv_dispatch(elem, elem, grid, params, binds)?;
            return self.submit(&[dsp]);
        }
        let dcols = d.div_ceil(moe_shaders::DECODE_DOWN_COLUMNS as usize);
        let decode = self.use_decode(tokens * c.top_k, el, tokens + plan.row_align(), dcols, inter);
        let (entry, groups) = if decode {
            ("decode", [dcols as u32, 1, el as u32])
        } else {
            let gx = d.div_ceil(moe_shaders::TILE_N as usize);
            let gy = tokens.div_ceil(tile).clamp(1, MAX_GROUPS as usize);
            if gx > MAX_GROUPS as usize {
                return Err(unsupported("more than 65535 column tiles or local experts"));
            }
            self.check_loops(
                gemm_loops(tokens + plan.row_align(), gy, inter),
                "an expert GEMM too long for llvmpipe's 65535-iteration loop cap",
            )?;
            ("main", [gx as u32, gy as u32, el as u32])
        };
        let params = vec![
            inter as u32,
            d as u32,
            hb.base,
            wb.base,
            bb.base,
            ob.base,
            sb.base,
            tb.base,
            yb.base,
            u32::from(rows.weights.is_some()),
            u32::from(weights.down_bias.is_some()),
        ];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::ExpertDown, elem, elem, entry)?,
            shader: Shader::ExpertDown,
            params,
            binds: vec![hb, wb, bb, ob, sb, tb, yb],
            groups,
        }])
    }

    fn combine(
        &self,
        plan: &MoePlan,
        tokens: usize,
        width: usize,
        expert_out: WgpuView<'_, T>,
        slot_rows: WgpuView<'_, i32>,
        scale: f32,
        out: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        let k = plan.config().top_k;
        at_least("slot_rows", tokens * k, slot_rows.len)?;
        at_least("combine out", tokens * width, out.len)?;
        at_least("expert_out", plan.rows_capacity(tokens) * width, expert_out.len)?;
        if tokens == 0 {
            return Ok(());
        }
        let (groups, nx) = Self::grid_1d(tokens * width)?;
        let eb = self.bind(&expert_out)?;
        let sb = self.bind(&slot_rows)?;
        let ob = self.bind_mut(&out)?;
        let params = vec![
            u32_of("tokens", tokens)?,
            k as u32,
            u32_of("width", width)?,
            eb.base,
            sb.base,
            ob.base,
            nx,
            scale.to_bits(),
        ];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::Combine, elem, elem, "main")?,
            shader: Shader::Combine,
            params,
            binds: vec![eb, sb, ob],
            groups,
        }])
    }

    fn mlp_up(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        in_dim: usize,
        inter: usize,
        x: WgpuView<'_, T>,
        weights: &MlpWeights<'_, Self, T>,
        hidden: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        shape("mlp input", tokens * in_dim, x.len)?;
        at_least("mlp hidden", tokens * inter, hidden.len)?;
        if tokens == 0 {
            return Ok(());
        }
        self.storage::<T>()?;
        self.up_impl(mlp, tokens, 1, 1, 0, in_dim, inter, x, weights, None, hidden)
    }

    fn linear(
        &self,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: WgpuView<'_, T>,
        weight: WgpuView<'_, T>,
        bias: Option<WgpuView<'_, T>>,
        row_scale: Option<WgpuView<'_, f32>>,
        scale: f32,
        accumulate: bool,
        out: WgpuViewMut<'_, T>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        at_least("linear input", tokens * in_dim, x.len)?;
        shape("linear weight", out_dim * in_dim, weight.len)?;
        if let Some(b) = &bias {
            shape("linear bias", out_dim, b.len)?;
        }
        if let Some(r) = &row_scale {
            at_least("linear row scale", tokens, r.len)?;
        }
        at_least("linear out", tokens * out_dim, out.len)?;
        if tokens == 0 {
            return Ok(());
        }
        let b = match &bias {
            Some(b) => Some(self.bind(b)?),
            None => None,
        };
        let rs = match &row_scale {
            Some(r) => Some(self.bind(r)?),
            None => None,
        };
        self.linear_impl(
            elem,
            elem,
            tokens,
            in_dim,
            out_dim,
            self.bind(&x)?,
            self.bind(&weight)?,
            b,
            rs,
            scale,
            accumulate,
            false,
            self.bind_mut(&out)?,
        )
    }

    fn sigmoid_gate(
        &self,
        tokens: usize,
        hidden: usize,
        x: WgpuView<'_, T>,
        weight: WgpuView<'_, T>,
        gate: WgpuViewMut<'_, f32>,
    ) -> Result<()> {
        let elem = self.storage::<T>()?;
        shape("gate input", tokens * hidden, x.len)?;
        shape("shared.gate_weight", hidden, weight.len)?;
        at_least("shared gate", tokens, gate.len)?;
        if tokens == 0 {
            return Ok(());
        }
        self.linear_impl(
            elem,
            Storage::F32,
            tokens,
            hidden,
            1,
            self.bind(&x)?,
            self.bind(&weight)?,
            None,
            None,
            1.0,
            false,
            true,
            self.bind_mut(&gate)?,
        )
    }

    fn add_assign(&self, dst: WgpuViewMut<'_, T>, src: WgpuView<'_, T>) -> Result<()> {
        let elem = self.storage::<T>()?;
        shape("add_assign src", dst.len, src.len)?;
        if dst.len == 0 {
            return Ok(());
        }
        let (groups, nx) = Self::grid_1d(dst.len)?;
        let db = self.bind_mut(&dst)?;
        let sb = self.bind(&src)?;
        let params = vec![u32_of("elements", dst.len)?, db.base, sb.base, nx];
        self.submit(&[Dispatch {
            pipeline: self.pipeline(Shader::Add, elem, elem, "main")?,
            shader: Shader::Add,
            params,
            binds: vec![db, sb],
            groups,
        }])
    }
}

//! Test harness: upload host weights, run `moe_core::forward` on the wgpu backend, read back.
#![allow(dead_code)]

use half::f16;
use moe_core::conformance::{ConformanceBackend, RunOutput};
use moe_core::reference::{HostMlp, HostWeights};
use moe_core::{
    DType, Element, LatentWeights, MlpWeights, MoeConfig, MoeError, MoePlan, MoeWeights,
    SharedWeights, SingleRank, TopkReduce,
};
use moe_wgpu::{ExpertGemm, FewRowGemm, Options, WgpuBackend, WgpuView, WgpuViewMut};
use std::sync::OnceLock;

/// The backend on the first adapter, or `None` (with a message) where none exists.
pub fn backend() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| make(Options::default())).as_ref()
}

/// A second backend that packs f16 into u32 words even where `SHADER_F16` exists.
pub fn packed_backend() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| make(Options { native_f16: false, ..Options::default() })).as_ref()
}

/// A backend that runs the expert GEMMs' decode variant wherever it can
/// ([`ExpertGemm::Decode`]); `packed_f16` as in [`packed_backend`].
pub fn decode_backend(packed_f16: bool) -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    static PACKED: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let options =
        Options { native_f16: !packed_f16, expert_gemm: ExpertGemm::Decode, ..Options::default() };
    if packed_f16 { &PACKED } else { &BE }.get_or_init(|| make(options)).as_ref()
}

/// A backend that runs the few-row GEMM wherever it can ([`ExpertGemm::Decode`]) with its
/// earlier kernel ([`FewRowGemm::Resident`], entry point `main`), for the A/B kernel.
pub fn resident_backend() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| {
        make(Options {
            expert_gemm: ExpertGemm::Decode,
            few_row: FewRowGemm::Resident,
            ..Options::default()
        })
    })
    .as_ref()
}

/// A backend that runs the expert GEMMs' scalar decode variant wherever it can
/// ([`ExpertGemm::DecodeScalar`]: the path of views not aligned to 16-byte words).
pub fn scalar_decode_backend() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| make(Options { expert_gemm: ExpertGemm::DecodeScalar, ..Options::default() }))
        .as_ref()
}

/// A backend that always runs the expert GEMMs' tiled variant ([`ExpertGemm::Tiled`]).
pub fn tiled_backend() -> Option<&'static WgpuBackend> {
    static BE: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    BE.get_or_init(|| make(Options { expert_gemm: ExpertGemm::Tiled, ..Options::default() }))
        .as_ref()
}

fn make(options: Options) -> Option<WgpuBackend> {
    let be = find(options);
    // CI sets MOE_WGPU_REQUIRE_ADAPTER=1 so that a missing lavapipe fails instead of skipping.
    if be.is_none() && std::env::var_os("MOE_WGPU_REQUIRE_ADAPTER").is_some_and(|v| v != "0") {
        panic!("MOE_WGPU_REQUIRE_ADAPTER is set but no wgpu adapter was found");
    }
    be
}

fn find(options: Options) -> Option<WgpuBackend> {
    match WgpuBackend::request_with(options) {
        Ok(Some(b)) => {
            let i = b.adapter_info();
            let info = format!(
                "{} ({:?}, {:?}, driver {} {})",
                i.name, i.backend, i.device_type, i.driver, i.driver_info
            );
            say(&format!("\nmoe-wgpu: adapter {info}, native f16: {}", b.native_f16()));
            check_device_type(i);
            Some(b)
        }
        Ok(None) => {
            say(
                "moe-wgpu: SKIP: no wgpu adapter on this machine (install mesa-vulkan-drivers for lavapipe)",
            );
            None
        }
        Err(e) => {
            say(&format!("moe-wgpu: SKIP: no usable wgpu device: {e}"));
            None
        }
    }
}

/// `MOE_WGPU_REQUIRE_DEVICE_TYPE` (set on the GPU machine so that the tests cannot silently run
/// on llvmpipe/lavapipe): `discrete` needs a discrete GPU, `gpu` any adapter that is not a
/// CPU, `cpu` a CPU adapter. Panics when the chosen adapter does not match.
fn check_device_type(info: &wgpu::AdapterInfo) {
    use wgpu::DeviceType;
    let Ok(want) = std::env::var("MOE_WGPU_REQUIRE_DEVICE_TYPE") else { return };
    let ok = match want.to_ascii_lowercase().as_str() {
        "" | "any" => true,
        "discrete" => info.device_type == DeviceType::DiscreteGpu,
        "gpu" => !matches!(info.device_type, DeviceType::Cpu | DeviceType::Other),
        "cpu" => info.device_type == DeviceType::Cpu,
        other => panic!("MOE_WGPU_REQUIRE_DEVICE_TYPE={other}: expected discrete, gpu, cpu or any"),
    };
    assert!(
        ok,
        "MOE_WGPU_REQUIRE_DEVICE_TYPE={want} but the adapter is {} ({:?}, {:?})",
        info.name, info.device_type, info.backend
    );
}

/// Print past the test harness's output capture, so a skip is visible in every run.
fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A device buffer, the byte offset of the data in it, and its element count.
pub struct Buf {
    pub buf: wgpu::Buffer,
    pub offset: u64,
    pub len: usize,
}

impl Buf {
    pub fn view<U: bytemuck::Pod>(&self) -> WgpuView<'_, U> {
        WgpuView::new(&self.buf, self.offset, self.len).expect("view fits its buffer")
    }
    pub fn view_mut<U: bytemuck::Pod>(&self) -> WgpuViewMut<'_, U> {
        WgpuViewMut::new(&self.buf, self.offset, self.len).expect("view fits its buffer")
    }
}

thread_local! {
    /// Bytes of poison placed before every uploaded tensor (tests views at unaligned offsets).
    pub static PAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub fn upload_bytes(be: &WgpuBackend, bytes: &[u8], len: usize) -> Buf {
    let elem = bytes.len().checked_div(len).unwrap_or(1);
    let pad = PAD.with(|p| p.get());
    let pad = pad - pad % elem.max(1);
    let mut data = vec![0xFFu8; pad];
    data.extend_from_slice(bytes);
    let mut b = upload_raw(be, &data);
    b.offset = pad as u64;
    b.len = len;
    b
}

fn upload_raw(be: &WgpuBackend, bytes: &[u8]) -> Buf {
    let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
    let buf = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("test"),
        size,
        usage: USAGE,
        mapped_at_creation: false,
    });
    let mut padded = bytes.to_vec();
    padded.resize(size as usize, 0);
    be.queue().write_buffer(&buf, 0, &padded);
    Buf { buf, offset: 0, len: bytes.len() }
}

pub fn upload<T: Element>(be: &WgpuBackend, data: &[f64]) -> Buf {
    let v: Vec<T> = data.iter().map(|&x| T::from_f64(x)).collect();
    upload_bytes(be, bytemuck::cast_slice(&v), v.len())
}

pub fn upload_f32(be: &WgpuBackend, data: &[f64]) -> Buf {
    upload::<f32>(be, data)
}

pub fn upload_i32(be: &WgpuBackend, data: &[i32]) -> Buf {
    upload_bytes(be, bytemuck::cast_slice(data), data.len())
}

/// `bytes` bytes filled with 0xFF (NaN in f32/f16/bf16, -1 in i32), after the poison pad.
pub fn poisoned(be: &WgpuBackend, bytes: usize) -> Buf {
    upload_bytes(be, &vec![0xFFu8; bytes], bytes)
}

pub fn read_bytes(be: &WgpuBackend, buf: &wgpu::Buffer, offset: u64, bytes: usize) -> Vec<u8> {
    let start = offset / 4 * 4;
    let size = (offset + bytes as u64 - start).div_ceil(4).max(1) * 4;
    let staging = be.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = be.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, start, &staging, 0, size);
    be.queue().submit([enc.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    be.synchronize().expect("poll");
    let data = staging.slice(..).get_mapped_range().expect("mapped").to_vec();
    staging.unmap();
    let skip = (offset - start) as usize;
    data[skip..skip + bytes].to_vec()
}

pub fn read<T: Element>(be: &WgpuBackend, buf: &wgpu::Buffer, offset: u64, len: usize) -> Vec<f64> {
    let b = read_bytes(be, buf, offset, len * size_of::<T>());
    bytemuck::pod_collect_to_vec::<u8, T>(&b).iter().map(|v| v.to_f64()).collect()
}

pub fn read_i32(be: &WgpuBackend, buf: &wgpu::Buffer, offset: u64, len: usize) -> Vec<i32> {
    bytemuck::pod_collect_to_vec(&read_bytes(be, buf, offset, len * 4))
}

/// What one forward gives back.
#[derive(Debug, Clone)]
pub struct Run {
    pub topk_ids: Vec<i32>,
    pub topk_weights: Vec<f64>,
    pub out: Vec<f64>,
    pub buffers_created_in_forward: usize,
}

struct DevMlp {
    gate: Option<Buf>,
    up: Buf,
    down: Buf,
    gate_bias: Option<Buf>,
    up_bias: Option<Buf>,
    down_bias: Option<Buf>,
}

fn up_mlp<T: Element>(be: &WgpuBackend, m: &HostMlp) -> DevMlp {
    let o = |v: &Option<Vec<f64>>| v.as_ref().map(|v| upload::<T>(be, v));
    DevMlp {
        gate: o(&m.gate),
        up: upload::<T>(be, &m.up),
        down: upload::<T>(be, &m.down),
        gate_bias: o(&m.gate_bias),
        up_bias: o(&m.up_bias),
        down_bias: o(&m.down_bias),
    }
}

fn mlp_views<'a, T: Element>(m: &'a DevMlp) -> MlpWeights<'a, WgpuBackend, T> {
    MlpWeights {
        gate: m.gate.as_ref().map(|b| b.view()),
        up: m.up.view(),
        down: m.down.view(),
        gate_bias: m.gate_bias.as_ref().map(|b| b.view()),
        up_bias: m.up_bias.as_ref().map(|b| b.view()),
        down_bias: m.down_bias.as_ref().map(|b| b.view()),
    }
}

/// Run the whole layer through `moe_core::forward` in element type `T`.
pub fn run_typed<T: Element>(
    be: &WgpuBackend,
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    tokens: usize,
    row_align: usize,
) -> Result<Run, MoeError> {
    let plan = MoePlan::with_row_align(c, tokens.max(1), row_align)?;
    let layout = plan.layout(T::DTYPE)?;
    let router = upload::<T>(be, &w.router);
    let router_bias = w.router_bias.as_ref().map(|b| upload::<T>(be, b));
    let sel_bias = w.selection_bias.as_ref().map(|b| upload_f32(be, b));
    let experts = up_mlp::<T>(be, &w.experts);
    let shared = w
        .shared
        .as_ref()
        .map(|s| (up_mlp::<T>(be, &s.mlp), s.gate.as_ref().map(|g| upload::<T>(be, g))));
    let latent = w.latent.as_ref().map(|l| {
        (
            upload::<T>(be, &l.fc1),
            upload::<T>(be, &l.fc2),
            l.fc1_bias.as_ref().map(|b| upload::<T>(be, b)),
            l.fc2_bias.as_ref().map(|b| upload::<T>(be, b)),
        )
    });
    let emap = w.expert_map.as_ref().map(|m| upload_i32(be, m));
    let xb = upload::<T>(be, x);
    let ws = poisoned(be, layout.total_bytes);
    let out_len = tokens * c.hidden;
    let out = poisoned(be, out_len * size_of::<T>());
    let skip = (ws.offset as usize).next_multiple_of(moe_core::REGION_ALIGN) - ws.offset as usize;
    let ws_base = ws.offset + skip as u64;
    let weights = MoeWeights::<WgpuBackend, T> {
        router: router.view(),
        router_bias: router_bias.as_ref().map(|b| b.view()),
        selection_bias: sel_bias.as_ref().map(|b| b.view()),
        experts: mlp_views(&experts),
        shared: shared
            .as_ref()
            .map(|(m, g)| SharedWeights { mlp: mlp_views(m), gate: g.as_ref().map(|g| g.view()) }),
        latent: latent.as_ref().map(|(f1, f2, b1, b2)| LatentWeights {
            fc1: f1.view(),
            fc2: f2.view(),
            fc1_bias: b1.as_ref().map(|b| b.view()),
            fc2_bias: b2.as_ref().map(|b| b.view()),
        }),
        expert_map: emap.as_ref().map(|m| m.view()),
    };
    let before = be.buffers_created();
    moe_core::forward(
        be,
        &plan,
        &weights,
        tokens,
        xb.view(),
        WgpuViewMut::new(&out.buf, out.offset, out_len)?,
        WgpuViewMut::<u8>::new(&ws.buf, ws.offset, layout.total_bytes)?,
        &SingleRank,
    )?;
    let buffers_created_in_forward = be.buffers_created() - before;
    be.synchronize()?;
    let k = c.top_k;
    Ok(Run {
        topk_ids: read_i32(be, &ws.buf, ws_base + layout.topk_ids.offset as u64, tokens * k),
        topk_weights: read::<f32>(
            be,
            &ws.buf,
            ws_base + layout.topk_weights.offset as u64,
            tokens * k,
        ),
        out: read::<T>(be, &out.buf, out.offset, out_len),
        buffers_created_in_forward,
    })
}

/// Run in `dtype` (f32, f16 where supported; bf16 is unsupported).
pub fn run(
    be: &WgpuBackend,
    dtype: DType,
    c: &MoeConfig,
    w: &HostWeights,
    x: &[f64],
    tokens: usize,
    row_align: usize,
) -> Result<Run, MoeError> {
    match dtype {
        DType::F32 => run_typed::<f32>(be, c, w, x, tokens, row_align),
        DType::F16 => run_typed::<f16>(be, c, w, x, tokens, row_align),
        DType::BF16 => run_typed::<half::bf16>(be, c, w, x, tokens, row_align),
    }
}

/// The wgpu backend as a `moe_core::conformance::ConformanceBackend`.
pub struct Wgpu(pub &'static WgpuBackend);

impl ConformanceBackend for Wgpu {
    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn run(
        &self,
        dtype: DType,
        config: &MoeConfig,
        weights: &HostWeights,
        x: &[f64],
        tokens: usize,
    ) -> Result<RunOutput, MoeError> {
        let r = run(self.0, dtype, config, weights, x, tokens, 1)?;
        if r.buffers_created_in_forward != 0 {
            return Err(MoeError::Device {
                backend: "wgpu",
                what: "a forward created buffers",
                code: r.buffers_created_in_forward as i64,
            });
        }
        Ok(RunOutput { topk_ids: r.topk_ids, topk_weights: r.topk_weights, out: r.out })
    }

    /// A user-supplied top-k reduce cannot run in a shader.
    fn unsupported(&self, dtype: DType, config: &MoeConfig) -> bool {
        !self.0.supports(dtype) || matches!(config.router.reduce, TopkReduce::Custom(_))
    }
}

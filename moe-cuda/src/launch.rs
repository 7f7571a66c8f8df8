//! Every raw kernel launch of the crate, and the parameter structs shared with the CUDA
//! sources (`kernels/cuda/*.cu`; field order and types must match them exactly).

use crate::err;
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use moe_core::Result;
use std::sync::Arc;

/// `GemmParams` of `gemm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GemmParams {
    pub a: u64,
    pub w_up: u64,
    pub w_gate: u64,
    pub bias_up: u64,
    pub bias_gate: u64,
    pub expert_offsets: u64,
    pub sorted_slots: u64,
    pub row_weights: u64,
    pub out: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub grouped: i32,
    pub top_k: i32,
    pub a_gather: i32,
    pub weight_mode: i32,
    pub epilogue: i32,
    pub gated: i32,
    pub act: i32,
    pub alpha: f32,
    pub limit: f32,
    pub scale: f32,
    pub accumulate: i32,
    pub out_f32: i32,
    pub vec_a: i32,
    pub vec_w: i32,
}

/// A `CUtensorMap` (`MoeTmaMap` of gemm_sm90_tma.cu): 128 opaque bytes, 64-byte aligned,
/// passed by value to the TMA wgmma kernels.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TmaMap {
    opaque: [u64; 16],
}

impl TmaMap {
    /// A tiled tensor map over a row-major 16-bit tensor of `dims` (innermost first, the
    /// innermost contiguous) with the byte `strides` of the outer dimensions, box `boxes`
    /// (innermost first), 128-byte swizzle (the box's innermost extent must be 64 elements =
    /// 128 bytes), out-of-bounds elements read as zero. `ty`: 1 = f16, 2 = bf16.
    fn tiled(ty: usize, addr: u64, dims: &[u64], strides: &[u64], boxes: &[u32]) -> Result<TmaMap> {
        debug_assert!(dims.len() == boxes.len() && strides.len() + 1 == dims.len());
        let dtype = if ty == 2 {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        } else {
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
        };
        let elem = [1u32; 3];
        let mut m = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: a host-only encoding call (no device access): `m` is a writable CUtensorMap,
        // dims / strides / boxes / elem hold rank, rank - 1, rank and rank entries (rank =
        // dims.len() <= 3); the address is only recorded in the map. The driver validates the
        // arguments (16-byte aligned address, strides multiples of 16, box <= 256 per
        // dimension) and returns an error code otherwise.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut m,
                dtype,
                dims.len() as u32,
                addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(moe_core::MoeError::Device {
                backend: "cuda",
                what: "cuTensorMapEncodeTiled",
                code: r as i64,
            });
        }
        Ok(TmaMap { opaque: m.opaque })
    }
}

/// `RouteParams` of `route.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RouteParams {
    pub logits: u64,
    pub sel_bias: u64,
    pub topk_ids: u64,
    pub topk_weights: u64,
    pub tokens: i32,
    pub experts: i32,
    pub top_k: i32,
    pub scoring: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub group_score: i32,
    pub weight_src: i32,
    pub reduce_kind: i32,
    pub reduce_param: f32,
    pub scale: f32,
}

/// `PermuteParams` of `permute.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PermuteParams {
    pub topk_ids: u64,
    pub expert_map: u64,
    pub expert_offsets: u64,
    pub expert_cursor: u64,
    pub sorted_slots: u64,
    pub slot_rows: u64,
    pub n: i32,
    pub experts: i32,
    pub local_experts: i32,
    pub row_align: i32,
}

// SAFETY: plain `#[repr(C)]` structs of integers, floats and device addresses whose layout
// matches the `__global__` parameter structs in kernels/cuda; passed by value.
unsafe impl DeviceRepr for GemmParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for RouteParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for PermuteParams {}
// SAFETY: 128 plain bytes with the size and 64-byte alignment of CUtensorMap, the type of the
// TMA kernels' `MoeTmaMap` parameters (passed by value).
unsafe impl DeviceRepr for TmaMap {}

/// The kernels of the fatbin, loaded once per context. Index 0/1/2 = f32/f16/bf16.
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    route: CudaFunction,
    permute: CudaFunction,
    gemm: [CudaFunction; 3],
    /// `moe_gemv_*`: dense products of at most [`GEMV_ROWS`] rows per block row.
    gemv: [CudaFunction; 3],
    /// `[f16, bf16][ungated, gated, gated capped at 128 registers]`.
    tc: [[CudaFunction; 3]; 2],
    /// Whether the pipelined kernels got their shared-memory limit.
    tc_ok: bool,
    /// `moe_gemm_dec{1,2,4,8}_*` then the narrow-strip `moe_gemm_dec{1,2}n_*`:
    /// `[f16, bf16][index of DEC_SMEM]` (gemm_decode.cu).
    dec: [[CudaFunction; 6]; 2],
    /// Whether the decode kernels got their shared-memory limit.
    dec_ok: bool,
    /// `[f16, bf16][ungated, gated]` wgmma kernels (`gemm_sm90.cu`).
    wg: [[CudaFunction; 2]; 2],
    /// Whether the device is compute capability 9.0 (the sm_90a code of the wgmma kernels
    /// runs) and the wgmma kernels got their shared-memory limit.
    wg_ok: bool,
    /// `[f16, bf16][ungated, gated]` wgmma kernels with TMA weight loads
    /// (`gemm_sm90_tma.cu`); usable where `wg_ok` and `wgt_ok`.
    wgt: [[CudaFunction; 2]; 2],
    /// Whether the TMA wgmma kernels got their shared-memory limit.
    wgt_ok: bool,
    /// `[f16, bf16][ungated, gated]` clustered TMA wgmma kernels (B multicast to CTA pairs).
    wgm: [[CudaFunction; 2]; 2],
    /// Whether the clustered kernels got their shared-memory limit.
    wgm_ok: bool,
    /// Clusters of two that fit on the device at once (0: not yet asked).
    wgm_clusters: std::sync::atomic::AtomicU32,
    /// Multiprocessors: the persistent wgmma grid.
    sms: u32,
    combine: [CudaFunction; 3],
    gate: [CudaFunction; 3],
    add: [CudaFunction; 3],
}

impl Kernels {
    pub(crate) fn load(module: Arc<CudaModule>, ctx: &CudaContext) -> Result<Kernels> {
        let f = |name: &'static str| module.load_function(name).map_err(err("cuModuleGetFunction"));
        let three = |base: &'static [&'static str; 3]| -> Result<[CudaFunction; 3]> {
            Ok([f(base[0])?, f(base[1])?, f(base[2])?])
        };
        // The pipelined kernels are optional: if they cannot be prepared (their shared memory
        // limit raised), the simple kernel serves every GEMM.
        let tc = [
            three(&["moe_gemm_tc_f16", "moe_gemm_tc_gated_f16", "moe_gemm_tc_gated2_f16"])?,
            three(&["moe_gemm_tc_bf16", "moe_gemm_tc_gated_bf16", "moe_gemm_tc_gated2_bf16"])?,
        ];
        let tc_ok = tc.iter().flatten().all(|f| {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                TC_SMEM_GATED as i32,
            )
            .is_ok()
        });
        let six = |n: [&'static str; 6]| -> Result<[CudaFunction; 6]> {
            Ok([f(n[0])?, f(n[1])?, f(n[2])?, f(n[3])?, f(n[4])?, f(n[5])?])
        };
        let dec = [
            six([
                "moe_gemm_dec1_f16",
                "moe_gemm_dec2_f16",
                "moe_gemm_dec4_f16",
                "moe_gemm_dec8_f16",
                "moe_gemm_dec1n_f16",
                "moe_gemm_dec2n_f16",
            ])?,
            six([
                "moe_gemm_dec1_bf16",
                "moe_gemm_dec2_bf16",
                "moe_gemm_dec4_bf16",
                "moe_gemm_dec8_bf16",
                "moe_gemm_dec1n_bf16",
                "moe_gemm_dec2n_bf16",
            ])?,
        ];
        let dec_ok = dec.iter().all(|v| {
            v.iter().zip(DEC_SMEM).all(|(f, smem)| {
                // A hint (its failure is harmless): the whole carveout as shared memory, so
                // that 2 wide or 4 narrow blocks fit per SM (the kernels bypass L1: cp.async.cg).
                let _ = f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                );
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .is_ok()
            })
        });
        let wg = [
            [f("moe_gemm_wg_f16")?, f("moe_gemm_wg_gated_f16")?],
            [f("moe_gemm_wg_bf16")?, f("moe_gemm_wg_gated_bf16")?],
        ];
        let wgt = [
            [f("moe_gemm_wgt_f16")?, f("moe_gemm_wgt_gated_f16")?],
            [f("moe_gemm_wgt_bf16")?, f("moe_gemm_wgt_gated_bf16")?],
        ];
        let wgm = [
            [f("moe_gemm_wgm_f16")?, f("moe_gemm_wgm_gated_f16")?],
            [f("moe_gemm_wgm_bf16")?, f("moe_gemm_wgm_gated_bf16")?],
        ];
        let attr = |a| ctx.attribute(a).map_err(err("cuDeviceGetAttribute"));
        let cc = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        // Only sm_90 runs the sm_90a code (elsewhere the kernels are empty stubs): never
        // launch them on another device.
        let wg_ok = cc == (9, 0)
            && wg.iter().flatten().all(|f| {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    WG_SMEM as i32,
                )
                .is_ok()
            });
        let wgt_ok = wg_ok
            && wgt.iter().flatten().all(|f| {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    WG_SMEM as i32,
                )
                .is_ok()
            });
        let wgm_ok = wgt_ok
            && wgm.iter().flatten().all(|f| {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    WG_SMEM as i32,
                )
                .is_ok()
            });
        Ok(Kernels {
            tc,
            tc_ok,
            dec,
            dec_ok,
            wg,
            wg_ok,
            wgt,
            wgt_ok,
            wgm,
            wgm_ok,
            wgm_clusters: std::sync::atomic::AtomicU32::new(0),
            sms,
            route: f("moe_route")?,
            permute: f("moe_permute")?,
            gemm: three(&["moe_gemm_f32", "moe_gemm_f16", "moe_gemm_bf16"])?,
            gemv: three(&["moe_gemv_f32", "moe_gemv_f16", "moe_gemv_bf16"])?,
            combine: three(&["moe_combine_f32", "moe_combine_f16", "moe_combine_bf16"])?,
            gate: three(&[
                "moe_sigmoid_gate_f32",
                "moe_sigmoid_gate_f16",
                "moe_sigmoid_gate_bf16",
            ])?,
            add: three(&["moe_add_assign_f32", "moe_add_assign_f16", "moe_add_assign_bf16"])?,
            _module: module,
        })
    }
}

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Dynamic shared memory of the pipelined kernels: 3 stages of (128 A rows + 128 / 64 B rows)
/// x 40 halves.
const TC_SMEM_GATED: u32 = 3 * (128 + 128) * 40 * 2;
const TC_SMEM: u32 = 3 * (128 + 64) * 40 * 2;
/// Dynamic shared memory of the wgmma kernels (`WG_SMEM_BYTES` of gemm_sm90.cu): 4 stages of
/// (128 A rows + 256 B rows) x 64 halves, plus 1024 bytes for the 1024-byte alignment.
const WG_SMEM: u32 = 4 * (128 + 256) * 64 * 2 + 1024;

/// Dynamic shared memory of `moe_gemm_dec{1,2,4,8}_*` and `moe_gemm_dec{1,2}n_*`
/// (`DecCfg<NF, WR>::SMEM_BYTES` of gemm_decode.cu): 4 warps x stages x (WR weight + 8 NF
/// token rows) x 64 bytes; wide (WR = 64) stages (4, 4, 4, 3), narrow (WR = 32) stages (5, 4).
pub(crate) const DEC_SMEM: [u32; 6] = [73728, 81920, 98304, 98304, 51200, 49152];

/// Index of the narrow-strip decode kernels in `Kernels::dec` (NF 1, 2 at 4 + nf index).
const DEC_NARROW: usize = 4;

/// Whether a decode GEMM takes the narrow strips (32 weight rows per block instead of 64):
/// NF 1 or 2 (`nf` index <= 1) and fewer than 8 wide blocks per SM (e.g. Mixtral at T = 1:
/// 2 experts x 448 gated strips = 896 blocks on 132 SMs, 2 resident per SM, i.e. 3.4 waves
/// of 512 KB blocks; the down projection 2 x 64 = 128 blocks, fewer than the SMs). Narrow
/// blocks are half the bytes, twice as many, 4 resident per SM (114-120 registers, 48-50 KB).
///
/// For measurements, the environment variable `MOE_CUDA_DECODE_STRIPS` (read once per
/// process) overrides the rule for NF 1 and 2: `wide` or `narrow`; anything else keeps it.
pub(crate) fn decode_narrow(nf: usize, wide_blocks: u64, sms: u32) -> bool {
    nf <= 1
        && match decode_strips_override() {
            Some(narrow) => narrow,
            None => wide_blocks < 8 * sms.max(1) as u64,
        }
}

/// `MOE_CUDA_DECODE_STRIPS`: `Some(true)` narrow, `Some(false)` wide, `None` the rule.
fn decode_strips_override() -> Option<bool> {
    static STRIPS: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *STRIPS.get_or_init(|| match std::env::var("MOE_CUDA_DECODE_STRIPS").as_deref() {
        Ok("narrow") => Some(true),
        Ok("wide") => Some(false),
        _ => None,
    })
}

/// Which GEMM kernel a launch uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmPath {
    /// `moe_gemm_*`: 64 x 64 tiles, register-staged, any K and alignment, f32 SIMT.
    Simple,
    /// `moe_gemm_tc_*`: 128 x 64 tiles, cp.async pipeline, ldmatrix; `capped` selects the
    /// gated variant limited to 128 registers.
    Pipelined { capped: bool },
    /// `moe_gemv_*`: dense only, one warp per output column, [`GEMV_ROWS`] rows per block.
    Gemv,
    /// `moe_gemm_dec{1,2,4,8}_*` (gemm_decode.cu): swap-AB tensor cores, weights streamed once
    /// per pass of `8 << nf_log2` rows. `groups`: the host's bound on the groups (experts) with
    /// rows, min(local experts, T K) (dense: 1); the grid is `groups` x feature strips.
    Decode { nf_log2: u32, groups: u32 },
    /// `moe_gemm_wg_*` (sm_90a): persistent, 128 x 256 tiles (gated 128 x 128 gate + up),
    /// wgmma from a 4-stage cp.async ring; needs K % 64 == 0, 16-byte aligned A and W,
    /// N >= 128 and expert blocks padded to 128 rows (the caller checks; see
    /// `CudaBackend::run_gemm`). On a device other than compute capability 9.0 this falls
    /// back to the pipelined kernel.
    Wgmma,
    /// `moe_gemm_wgt_*` (sm_90a, gemm_sm90_tma.cu): the wgmma kernel with the weights (and,
    /// for GEMMs without a row gather, A) loaded by TMA and one K step of wgmma in flight.
    /// Same requirements as [`GemmPath::Wgmma`]; falls back to it (then to the pipelined
    /// kernel) where the TMA kernels are unavailable.
    /// `multicast`: `moe_gemm_wgm_*`, the same kernel in clusters of two CTAs (adjacent M
    /// tiles) that load one half of the shared weight tile each and multicast it to both.
    WgmmaTma { multicast: bool },
}

impl Kernels {
    /// Whether the wgmma kernels can run on this device.
    pub(crate) fn wgmma_available(&self) -> bool {
        self.wg_ok
    }

    /// Whether the TMA variant of the wgmma kernels can run on this device.
    pub(crate) fn wgmma_tma_available(&self) -> bool {
        self.wg_ok && self.wgt_ok
    }

    /// The clusters of two that the clustered kernels' grid uses (the driver's occupancy answer,
    /// asked at their first launch); `None` before that.
    pub(crate) fn wgmma_multicast_clusters(&self) -> Option<u32> {
        Some(self.wgm_clusters.load(std::sync::atomic::Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Whether the clustered (multicast) TMA wgmma kernels can run on this device.
    pub(crate) fn wgmma_multicast_available(&self) -> bool {
        self.wgmma_tma_available() && self.wgm_ok
    }
}

/// Rows one `moe_gemv_*` block computes (`GEMV_MR` of gemv.cu).
pub(crate) const GEMV_ROWS: u32 = 16;

/// Launches a GEMM: `moe_gemm_*` (one 64 x 64 tile per block, 128 threads) or, for 16-bit
/// types on the pipelined path, `moe_gemm_tc_*` (128 x 64 tiles, 256 threads).
pub(crate) fn gemm(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    path: GemmPath,
    p: &GemmParams,
) -> Result<()> {
    if let GemmPath::Decode { nf_log2, groups } = path
        && ty > 0
        && k.dec_ok
    {
        return gemm_decode(s, k, ty, nf_log2.min(3) as usize, groups, p);
    }
    if path == GemmPath::Gemv {
        debug_assert_eq!(p.grouped, 0, "moe_gemv is dense only");
        let grid = ((p.n as u32).div_ceil(4), (p.m as u32).div_ceil(GEMV_ROWS));
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let mut b = s.launch_builder(&k.gemv[ty]);
        b.arg(p);
        // SAFETY: as for the tiled kernels below: the callers checked every pointer of `p`
        // against its view for M x K of A, N x K of W (and the gate), M x N of out; `p` is a
        // dense product (grouped == 0), the only kind moe_gemv reads; 16-byte loads only when
        // vec_a / vec_w say K % 8 == 0 and the bases are 16-byte aligned.
        return unsafe { b.launch(cfg(grid, 128)) }.map(drop).map_err(err("launch moe_gemv"));
    }
    if let GemmPath::WgmmaTma { multicast } = path
        && ty > 0
        && k.wgmma_tma_available()
    {
        return gemm_wgmma_tma(s, k, ty, multicast && k.wgmma_multicast_available(), p);
    }
    let path = if matches!(path, GemmPath::WgmmaTma { .. }) { GemmPath::Wgmma } else { path };
    if path == GemmPath::Wgmma && ty > 0 && k.wg_ok {
        // upper bound of the tile count (M is the row capacity); the real list is derived on
        // the device from expert_offsets, so the grid is fixed and the launch graph-capturable
        let grid = wg_grid(k, p);
        if grid == 0 {
            return Ok(());
        }
        let f = &k.wg[ty - 1][(p.gated != 0) as usize];
        let mut b = s.launch_builder(f);
        b.arg(p);
        let mut c = cfg((grid, 1), 384);
        c.shared_mem_bytes = WG_SMEM;
        // SAFETY: as for the other GEMM kernels below (pointers checked against their views by
        // the callers); in addition the caller selected this path only for K % 64 == 0,
        // 16-byte aligned A and W, N >= 128 and expert blocks padded to 128 rows, on a compute
        // capability 9.0 device (wg_ok) whose dynamic shared memory limit was raised to
        // WG_SMEM at load.
        return unsafe { b.launch(c) }.map(drop).map_err(err("launch moe_gemm_wg"));
    }
    let path = if path == GemmPath::Wgmma { GemmPath::Pipelined { capped: false } } else { path };
    let (f, tile_m, threads, smem) = match path {
        GemmPath::Pipelined { capped } if ty > 0 && k.tc_ok => {
            let v = if p.gated != 0 { 1 + capped as usize } else { 0 };
            let smem = if p.gated != 0 { TC_SMEM_GATED } else { TC_SMEM };
            (&k.tc[ty - 1][v], 128u32, 256u32, smem)
        }
        _ => (&k.gemm[ty], 64, 128, 0),
    };
    let grid = ((p.m as u32).div_ceil(tile_m), (p.n as u32).div_ceil(64));
    if grid.0 == 0 || grid.1 == 0 {
        return Ok(());
    }
    let mut b = s.launch_builder(f);
    b.arg(p);
    let mut c = cfg(grid, threads);
    c.shared_mem_bytes = smem;
    // SAFETY: the callers checked every pointer of `p` against the length of the view it came
    // from for the rows/columns the kernel touches (M x K of A, E x N x K of W, M x N of out);
    // the struct matches `GemmParams` of gemm.cu. The pipelined kernels additionally need
    // K % 8 == 0 and 16-byte aligned A and W (the caller selects them only then) and get
    // their dynamic shared memory (raised at load) here.
    unsafe { b.launch(c) }.map(drop).map_err(err("launch moe_gemm"))
}

/// The persistent grid of the wgmma kernels: min(#SMs, an upper bound of the tile count).
fn wg_grid(k: &Kernels, p: &GemmParams) -> u32 {
    let bn = if p.gated != 0 { 128 } else { 256 };
    let tiles = u64::from((p.m as u32).div_ceil(128)) * u64::from((p.n as u32).div_ceil(bn));
    tiles.min(u64::from(k.sms)) as u32
}

/// The grid of the clustered kernels: 2 x min(clusters that fit at once, an upper bound of
/// the units: pairs of M tiles x N tiles).
fn wgm_grid(s: &CudaStream, k: &Kernels, ty: usize, p: &GemmParams) -> u32 {
    use std::sync::atomic::Ordering;
    let bn = if p.gated != 0 { 128 } else { 256 };
    let units = u64::from((p.m as u32).div_ceil(256)) * u64::from((p.n as u32).div_ceil(bn));
    let mut fit = k.wgm_clusters.load(Ordering::Relaxed);
    if fit == 0 {
        let mut c = cfg((k.sms & !1, 1), 384);
        c.shared_mem_bytes = WG_SMEM;
        fit = k.wgm[ty - 1][1]
            .occupancy_max_active_clusters(c, s)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(k.sms / 2)
            .min(k.sms / 2)
            .max(1);
        k.wgm_clusters.store(fit, Ordering::Relaxed);
    }
    (units.min(u64::from(fit)) * 2) as u32
}

/// Launches `moe_gemm_wgt_*`: encodes the tensor maps (host only: graph-capturable, the maps
/// travel in the kernel parameters) of W_up (and W_gate) as [E, N, K] with box 64 x 128 x 1,
/// and of A as [M, K] with box 64 x 128 when A is not gathered (`a_gather == 0`) and M >= 128.
/// `multicast`: the clustered kernel `moe_gemm_wgm_*` (grid: pairs of CTAs, at most the
/// clusters that fit on the device at once).
fn gemm_wgmma_tma(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    multicast: bool,
    p: &GemmParams,
) -> Result<()> {
    let grid = if multicast { wgm_grid(s, k, ty, p) } else { wg_grid(k, p) };
    if grid == 0 {
        return Ok(());
    }
    let (m, n, kk) = (p.m as u64, p.n as u64, p.k as u64);
    let e = p.grouped.max(1) as u64;
    let wdims = [kk, n, e];
    let wstrides = [kk * 2, n * kk * 2];
    let wbox = [64u32, 128, 1];
    let tm_up = TmaMap::tiled(ty, p.w_up, &wdims, &wstrides, &wbox)?;
    let tm_gate = if p.gated != 0 {
        TmaMap::tiled(ty, p.w_gate, &wdims, &wstrides, &wbox)?
    } else {
        TmaMap::default()
    };
    // A by TMA only without a row gather and with at least one full box of rows (M >= 128:
    // the box never exceeds the tensor, so the bytes of a stage are always the full boxes)
    let a_tma = (p.a_gather == 0 && m >= 128) as i32;
    let tm_a = if a_tma != 0 {
        TmaMap::tiled(ty, p.a, &[kk, m], &[kk * 2], &[64, 128])?
    } else {
        TmaMap::default()
    };
    let f = if multicast { &k.wgm } else { &k.wgt };
    let f = &f[ty - 1][(p.gated != 0) as usize];
    let mut b = s.launch_builder(f);
    b.arg(p).arg(&a_tma).arg(&tm_a).arg(&tm_up).arg(&tm_gate);
    let mut c = cfg((grid, 1), 384);
    c.shared_mem_bytes = WG_SMEM;
    // SAFETY: as for the wgmma kernel in `gemm` (same requirements, checked by the caller:
    // K % 64 == 0, 16-byte aligned A and W, N >= 128, 128-row expert blocks, a compute
    // capability 9.0 device whose dynamic shared memory limit was raised at load). The tensor
    // maps cover exactly the checked extents: W (and the gate) E x N x K, A M x K (M the
    // row capacity the caller checked A against); reads outside them are zero-filled by the
    // TMA. The argument list matches `moe_gemm_wgt_*` / `moe_gemm_wgm_*` (GemmParams, int,
    // 3 x CUtensorMap); the clustered kernels get an even grid (their compile-time cluster
    // size is 2) and derive the same unit list in both CTAs of a cluster.
    unsafe { b.launch(c) }.map(drop).map_err(err("launch moe_gemm_wgt"))
}

/// Launches `moe_gemm_dec*`: 128 threads, one block per (group with rows, feature strip of 64
/// outputs, gated 32; narrow strips half that, see [`decode_narrow`]); blocks past the groups
/// that have rows exit at once.
fn gemm_decode(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    nf: usize,
    groups: u32,
    p: &GemmParams,
) -> Result<()> {
    let wide_feat = if p.gated != 0 { 32u32 } else { 64 };
    let wide_blocks = u64::from((p.n.max(0) as u32).div_ceil(wide_feat)) * u64::from(groups);
    let narrow = decode_narrow(nf, wide_blocks, k.sms);
    let feat = if narrow { wide_feat / 2 } else { wide_feat };
    let strips = (p.n.max(0) as u32).div_ceil(feat);
    let blocks = strips.checked_mul(groups).filter(|&b| b < i32::MAX as u32);
    let Some(blocks) = blocks else {
        return Err(moe_core::MoeError::Unsupported {
            backend: "cuda",
            what: "decode GEMM grid larger than 2^31 blocks",
        });
    };
    if blocks == 0 || p.m == 0 {
        return Ok(());
    }
    let index = if narrow { DEC_NARROW + nf } else { nf };
    let mut b = s.launch_builder(&k.dec[ty - 1][index]);
    b.arg(p);
    let mut c = cfg((blocks, 1), 128);
    c.shared_mem_bytes = DEC_SMEM[index];
    // SAFETY: as for `gemm`: the callers checked every pointer of `p` against its view; the
    // decode kernels need K % 8 == 0 and 16-byte aligned A and W (the caller selects them only
    // then; vec_a and vec_w say so) and get their dynamic shared memory (raised at load) here.
    // Blocks beyond the groups that have rows read only expert_offsets and exit.
    unsafe { b.launch(c) }.map(drop).map_err(err("launch moe_gemm_dec"))
}

/// Launches `moe_route` (one warp per token, 4 per block).
pub(crate) fn route(s: &CudaStream, k: &Kernels, p: &RouteParams) -> Result<()> {
    let blocks = (p.tokens as u32).div_ceil(4);
    if blocks == 0 {
        return Ok(());
    }
    let mut b = s.launch_builder(&k.route);
    b.arg(p);
    // SAFETY: logits hold tokens x experts f32, ids/weights tokens x top_k, the selection bias
    // (if any) experts f32 (checked by the caller); experts <= 512 as the kernel requires.
    unsafe { b.launch(cfg((blocks, 1), 128)) }.map(drop).map_err(err("launch moe_route"))
}

/// Launches `moe_permute` (one block of `warps` warps).
pub(crate) fn permute(s: &CudaStream, k: &Kernels, p: &PermuteParams, warps: u32) -> Result<()> {
    let mut b = s.launch_builder(&k.permute);
    b.arg(p);
    // SAFETY: buffers checked by the caller (ids and slot_rows n, offsets E_local + 1, cursor
    // E_local, sorted_slots the plan's row capacity, map E); warps * E_local + E_local + 1 ints
    // fit the kernel's 12288-int shared array (the caller computed `warps` so).
    unsafe { b.launch(cfg((1, 1), 32 * warps)) }.map(drop).map_err(err("launch moe_permute"))
}

/// Launches `moe_combine_*` (one block of 256 threads per token).
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    expert_out: u64,
    slot_rows: u64,
    out: u64,
    tokens: u32,
    width: i32,
    top_k: i32,
    scale: f32,
) -> Result<()> {
    if tokens == 0 {
        return Ok(());
    }
    let mut b = s.launch_builder(&k.combine[ty]);
    b.arg(&expert_out).arg(&slot_rows).arg(&out).arg(&width).arg(&top_k).arg(&scale);
    // SAFETY: out holds tokens x width, slot_rows tokens x top_k, and every row index the
    // permute wrote is below the row capacity that expert_out holds (rows x width).
    unsafe { b.launch(cfg((tokens, 1), 256)) }.map(drop).map_err(err("launch moe_combine"))
}

/// Launches `moe_sigmoid_gate_*` (one warp per token).
pub(crate) fn sigmoid_gate(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    x: u64,
    w: u64,
    gate: u64,
    tokens: i32,
    hidden: i32,
) -> Result<()> {
    let blocks = (tokens as u32).div_ceil(4);
    if blocks == 0 {
        return Ok(());
    }
    let mut b = s.launch_builder(&k.gate[ty]);
    b.arg(&x).arg(&w).arg(&gate).arg(&tokens).arg(&hidden);
    // SAFETY: x holds tokens x hidden, w hidden, gate tokens elements (checked by the caller).
    unsafe { b.launch(cfg((blocks, 1), 128)) }.map(drop).map_err(err("launch moe_sigmoid_gate"))
}

/// Launches `moe_add_assign_*` (grid-stride).
pub(crate) fn add_assign(
    s: &CudaStream,
    k: &Kernels,
    ty: usize,
    dst: u64,
    src: u64,
    n: i64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let blocks = (n as u64).div_ceil(256).min(8192) as u32;
    let mut b = s.launch_builder(&k.add[ty]);
    b.arg(&dst).arg(&src).arg(&n);
    // SAFETY: dst and src both hold n elements (checked by the caller).
    unsafe { b.launch(cfg((blocks, 1), 256)) }.map(drop).map_err(err("launch moe_add_assign"))
}

#[cfg(test)]
mod decode_tests {
    use super::{DEC_NARROW, DEC_SMEM, decode_narrow};

    /// The narrow-strip rule on the H100 (132 SMs) decode points of the bench.
    #[test]
    fn narrow_rule() {
        if std::env::var_os("MOE_CUDA_DECODE_STRIPS").is_some() {
            return; // a measurement override is in force
        }
        // Mixtral T = 1 (NF 1, 2 experts): up 2 x 448 gated strips, down 2 x 64 strips
        assert!(decode_narrow(0, 896, 132));
        assert!(decode_narrow(0, 128, 132));
        // Mixtral T = 16 (NF 2, 8 experts): up 8 x 448 stays wide, down 8 x 64 goes narrow
        assert!(!decode_narrow(1, 3584, 132));
        assert!(decode_narrow(1, 512, 132));
        // Qwen3 T = 16 (128 experts): wide; T = 128 (NF 4) and larger NF never narrow
        assert!(!decode_narrow(1, 3072, 132));
        assert!(!decode_narrow(2, 24, 132));
        assert!(!decode_narrow(3, 24, 132));
        // the threshold: 8 wide blocks per SM
        assert!(decode_narrow(0, 1055, 132));
        assert!(!decode_narrow(0, 1056, 132));
    }

    /// 4 narrow blocks per SM fit an SM's 228 KB of shared memory (3 KB static + 1 KB reserved
    /// per block), 2 wide ones.
    #[test]
    fn decode_smem_occupancy() {
        let per_sm = 228 * 1024;
        for (i, &smem) in DEC_SMEM.iter().enumerate() {
            let blocks = if i >= DEC_NARROW { 4 } else { 2 };
            assert!(blocks * (smem + 4096) <= per_sm, "decode kernel {i}: {smem} bytes");
        }
    }
}

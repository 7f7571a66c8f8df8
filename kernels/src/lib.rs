//! # moe-kernels
//!
//! The CUDA C++ kernels of moe-kernels (`cuda/*.cu`), compiled by nvcc at build time into one
//! fatbin (sm_80 and sm_90a machine code plus compute_80 PTX) and embedded here. Load it with
//! `cuModuleLoadData` (cudarc: `Ptx::from_binary(FATBIN.to_vec())` and `load_module`).
//!
//! Kernels (all `extern "C"`): `moe_route`, `moe_permute`, `moe_gemm_{f32,f16,bf16}`,
//! `moe_gemm_tc_{f16,bf16}`, `moe_gemm_tc_gated{,2}_{f16,bf16}`,
//! `moe_gemm_dec{1,2,4,8}_{f16,bf16}` (gemm_decode.cu), `moe_gemm_wg{,_gated}_{f16,bf16}` (sm_90a
//! wgmma; empty stubs in the sm_80 / compute_80 code), `moe_gemv_*`, `moe_combine_*`,
//! `moe_sigmoid_gate_*`, `moe_add_assign_*`. Their parameter structs are
//! documented in the sources; `moe-cuda` mirrors them.

/// The fatbin, or an empty slice when the crate was built without nvcc.
pub const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moe_kernels.fatbin"));

/// Whether the kernels were compiled (nvcc was found at build time).
pub const AVAILABLE: bool = !FATBIN.is_empty();

/// Rows of one tile of the simple GEMM kernel: expert blocks of permuted rows must be padded to
/// a multiple of this (`MoePlan::with_row_align`).
pub const GEMM_TILE_M: usize = 64;

/// Rows of one tile of the pipelined GEMM kernels (`moe_gemm_tc_*`): grouped GEMMs use them
/// only when expert blocks are padded to a multiple of this.
pub const GEMM_TC_TILE_M: usize = 128;

/// The largest expert count the fused router supports.
pub const ROUTE_MAX_EXPERTS: usize = 512;

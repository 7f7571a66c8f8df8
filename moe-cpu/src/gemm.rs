//! The fast path: `C = A · Bᵀ` with both operands K-contiguous (activations `[rows, K]`, weights
//! `[N, K]`), cache-blocked, with SIMD microkernels chosen at run time.
//!
//! # Blocking and kernels
//!
//! A work item is one expert's block of at most [`MB`] rows by at most [`NB`] columns (weight
//! rows); its f32 result tiles then go through the stage's epilogue (activation, routing
//! weight, bias, rounding). The kernels below are chosen by the item's row count and element
//! type and by the CPU model's [`Tuning`] (never by the thread count):
//!
//! * up to [`DIRECT_ROWS`] rows (decode) where the in-place packed kernel below does not apply,
//!   and up to [`Tuning::direct_rows`] rows anyway:
//!   the weight rows and the item's rows are read in place
//!   and widened in registers (f16/bf16 → f32); each group of [`NR`] weight rows is streamed
//!   over its whole length (long sequential streams, one prefetch per cache line
//!   [`PREFETCH_AHEAD`] bytes ahead); `MR × NR` vector accumulators along K, reduced
//!   horizontally at the end of each [`KC`] block;
//! * more rows: the same dot-product microkernel on packed operands: per K block the rows of A
//!   are widened into `[MP][KS]` and each micro-panel of [`NR`] weight rows into `[NR][KS]`
//!   (L1), both 64-byte aligned with a padded stride (no split loads, no 4 KiB aliasing); while
//!   a micro-panel is used, the next one's weight rows are prefetched into L2, a slice per
//!   microkernel call, so that its copy does not wait on memory. With AVX-512, up to
//!   [`INPLACE_ROWS`] rows and K a multiple of 16, the weight rows are not copied but read in
//!   place (widened in registers, with an L2 prefetch [`INPLACE_AHEAD`] bytes ahead on each,
//!   instead of the next micro-panel's, where [`Tuning::inplace_prefetch`] says so): this
//!   replaces the few-rows kernel above, which then serves only K tails;
//! * AVX-512 and a row count in [`Tuning::wb_rows`] (Intel and AMD: from 8; both with 8
//!   instead of 12 weight rows per stripe, [`Tuning::wb_narrow`]): the weight-broadcast
//!   kernel (module `wb`): the item's rows transposed once per K block into `[k][32]` tiles
//!   (rows in the vector lanes), each weight element broadcast to 32 rows; f32 weight rows are
//!   read in place, 8 (or 12) at a time, other element types widened into a small stripe; an
//!   8 (or 12) × 32 register tile, no horizontal sums;
//! * AVX-512 and at least [`BC_MIN_ROWS`] rows: the broadcast (outer-product) kernel. Per K
//!   block of [`KC_BC`], the item's rows are copied once (L2), every 32-column weight panel is
//!   transposed into `[k][32]` (L2), and each [`MR_BC`]-row group (L1) runs against all the
//!   panels; the next K block's weight rows are prefetched into L2 meanwhile. AVX2 has the
//!   same kernel with a 6 × 16 register tile, 16-column panels (8 × 8 transposes) and a K
//!   block of 256 (it fits Zen 3's 512 KiB L2);
//! * [`Isa::Avx512Bf16`], bf16 operands and at most [`Tuning::dpbf16_rows`] rows (AMD: all;
//!   Intel: 1-2, where `vdpbf16ps` runs at half the FMA rate): kernels on `vdpbf16ps`, 32 bf16
//!   products per instruction (module `dpbf16`): whole weight rows, one or four at a time
//!   ([`Tuning::seq_streams`]), for decode, the packed
//!   dot-product kernel with the weight rows in place (few rows) or copied, a broadcast
//!   kernel on pair-packed weights for many rows, and, for the rows in
//!   [`Tuning::dpwb_rows`] (AMD: from 8), a weight-broadcast kernel (rows in the vector lanes
//!   as pairs, weight pairs broadcast from the rows in place) that takes precedence;
//! * [`Isa::Amx`], bf16 operands and at least [`AMX_MIN_ROWS`] rows: the AMX-BF16 tile kernel
//!   (module `amx`: weights as the tiles' A operand, copied into tile order, or read in place
//!   by the tile loads for items of at most 128 rows; the item's rows packed once per K block
//!   into the VNNI B layout, transposed f32 results).
//!
//! # Rows packed ahead
//!
//! The two weight-broadcast kernels transpose the item's rows (rows into the vector lanes), a
//! cost shared only by the item's [`NB`] columns: with many columns per expert (Mixtral's up
//! projection: 2 × 75 column blocks) each expert's rows were transposed 75 times. So before the
//! items run, the grouped GEMM (`Grouped::run` in the crate root) packs each expert row block
//! whose kernel is one of them ([`row_pack`]) once, over all of K, into a buffer shared by the
//! items ([`RowPack`], [`pack_rows`], in parallel over 16-row groups); the kernels then read the
//! tiles from there. Same bits (the kernels sum in the same order). Measured on Zen 4 (2
//! threads, expert GEMMs, paired medians over 3-7 interleaved rounds against packing per
//! item): Mixtral T=128 / 1024 f32 0.960x / 0.938x, bf16 0.961x / 0.973x; DeepSeek-V3 T=1024
//! f32 0.946x, bf16 0.953x; gpt-oss T=1024 f32 0.956x, bf16 0.932x; T=16 0.995-1.004x.
//!
//! # Determinism
//!
//! The blocking never depends on the thread count and every output element is computed by
//! exactly one work item, so the result has the same bits whatever the number of threads.
//! (It may differ between instruction sets: the lane count changes the summation order.)

use moe_core::{DType, Element};

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod amx;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
#[cfg(target_arch = "x86_64")]
mod wb;

/// Rows of a work item (one expert's rows share each packed weight panel).
pub(crate) const MB: usize = 256;
/// Rows of A packed at once (the A buffer of the dot-product kernels).
pub(crate) const MP: usize = 128;
/// Columns of a work item (a multiple of [`NR`]).
pub(crate) const NB: usize = 192;
/// K block (a multiple of every vector width).
pub(crate) const KC: usize = 1024;
/// Row stride of the packing buffers: KC plus one cache line, so that the rows a microkernel
/// streams do not all map to the same L1 set (4 KiB aliasing).
pub(crate) const KS: usize = KC + 16;
/// Up to this many rows, work items read the weights in place (no packing copy).
pub(crate) const DIRECT_ROWS: usize = 16;
/// Bytes prefetched ahead on each weight row by the few-rows kernel (0: none).
pub(crate) const PREFETCH_AHEAD: usize = 2048;
/// Up to this many rows (and K a multiple of the vector width), the packed dot-product kernel
/// reads the weight rows in place: every item below the broadcast kernel's [`BC_MIN_ROWS`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const INPLACE_ROWS: usize = BC_MIN_ROWS - 1;
/// Bytes ahead on each weight row that the in-place packed kernel fetches into L2.
pub(crate) const INPLACE_AHEAD: usize = 4096;
/// Rows of a microkernel tile (at most; AVX2 uses 2, its 16 registers hold 2 × NR
/// accumulators).
pub(crate) const MR: usize = 4;
/// Columns (weight rows) of a microkernel tile.
pub(crate) const NR: usize = 6;

const _: () = assert!(NB.is_multiple_of(NR) && KC.is_multiple_of(16));

/// The cache lines `span` of a run of weight rows, for L2 prefetches: line `t` is line
/// `t % lines` of row `(t / lines) % rows`, at `base + row * stride + line * step` elements.
/// Walked with one division per span, not one per line: a 32-bit division costs about as much
/// as the few-rows kernels' FMAs on one line (on Zen 4, dividing per line made the in-place
/// kernel run 4-row items at 43 GFLOP/s per thread in cache instead of 52).
#[inline(always)]
fn line_span<T>(
    base: *const T,
    stride: usize,
    step: usize,
    lines: usize,
    rows: usize,
    span: core::ops::Range<usize>,
) -> impl Iterator<Item = *const u8> {
    let n = if lines == 0 || rows == 0 { 0 } else { span.len() };
    let (mut row, mut line) =
        if n == 0 { (0, 0) } else { ((span.start / lines) % rows, span.start % lines) };
    (0..n).map(move |_| {
        let p = base.wrapping_add(row * stride + line * step) as *const u8;
        line += 1;
        if line == lines {
            line = 0;
            row += 1;
            if row == rows {
                row = 0;
            }
        }
        p
    })
}

/// From this many rows (below it, transposing the weights costs more than it saves),
/// AVX-512 work items use the broadcast (outer-product) kernel: 12 × 32
/// register tile, weights transposed into `[k][32]` panels while packing (16 × 16 in-register
/// transposes), A rows broadcast from the packed rows. No horizontal sums, and 4 B of A plus
/// 128 B of B per 24 FMAs instead of 10 vectors. AVX2 (6 × 16 tile) uses the same threshold:
/// on Zen 3, 2 threads, f32 expert GEMMs with the broadcast kernel from 96 rows vs never vs
/// from 32 rows (interleaved): Mixtral T=1024 (256 rows per expert) 6386 / 7340 / 6806 ms,
/// gpt-oss T=1024 (128) 1729 / 1885 / 1731, Mixtral T=128 (32) 907 / 929 / 971, Qwen3 T=1024
/// (64, a few experts above 96) 709 / 697 / 1154 (best of 5 rounds for the first two).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const BC_MIN_ROWS: usize = 96;
/// K block of the broadcast kernel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const KC_BC: usize = 256;
/// Rows of the broadcast kernel's register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const MR_BC: usize = 12;
/// Columns of a transposed weight panel (two 16-lane vectors).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const NP_BC: usize = 32;

/// From this many rows, bf16 work items run on the AMX tile unit when [`Isa::Amx`] is chosen;
/// fewer rows (decode) stream the weights faster through the AVX-512 few-rows kernel, which
/// reads them in place (measured on the Qwen3 and Mixtral shapes: 4 rows lose, 8 win).
#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
pub(crate) const AMX_MIN_ROWS: usize = 6;

const _: () = assert!(NB.is_multiple_of(NP_BC) && KC_BC.is_multiple_of(16) && KC_BC <= KC);

/// One work item: rows `a_rows` of `a` (row length `k`) times rows `n0..n0 + nb` of each
/// present `b` matrix (`[N, k]`).
pub(crate) struct Block<'a, T> {
    /// A storage, rows of length `k`.
    pub a: &'a [T],
    /// The A rows of this item (at most [`MB`]).
    pub a_rows: &'a [usize],
    /// Reduction length.
    pub k: usize,
    /// Up to two B matrices sharing A (gate and up projections).
    pub b: [Option<&'a [T]>; 2],
    /// First column.
    pub n0: usize,
    /// Columns (at most [`NB`]).
    pub nb: usize,
    /// The item's rows already packed for a weight-broadcast kernel (see [`RowPack`]), shared
    /// by every item of the same rows; `None`: the kernel packs them itself. A kernel uses
    /// them only if they are packed for it (the layout named), so any value is safe to pass.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub packed: Option<(RowPack, &'a [f32])>,
}

/// The layout of an item's rows packed ahead of its work items (once per expert row block,
/// instead of once per item, that is once per [`NB`] columns): row tiles of 32 rows, tile `t`
/// at `t * K' * 32` 32-bit lanes, the layout of `wb::pack_row_tiles` (a last tile narrower:
/// lanes in units of 16, or of 8 where the flag says so, [`Tuning::wb_half`]; lanes past the
/// rows zero). Written by [`pack_rows`]; the buffer holds [`RowPack::len`] floats, 64-byte
/// aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPack {
    /// f32 elements (widened from the element type), for the AVX-512 weight-broadcast kernel
    /// (module `wb`): `K' = K`; its `wb_half` and (f32 only) `wb_dot_rows` (the rows it packs:
    /// [`RowPack::rows`]).
    F32(bool, usize),
    /// bf16 pairs of consecutive K elements, for the `vdpbf16ps` weight-broadcast kernel
    /// (module `dpbf16`): `K' = K / 2` (K even); its `wb_half` and `wb_dot_rows`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Pairs(bool, usize),
}

impl RowPack {
    /// 32-bit lanes per row (`K'`).
    pub(crate) fn width(self, k: usize) -> usize {
        match self {
            RowPack::F32(..) => k,
            RowPack::Pairs(..) => k / 2,
        }
    }

    /// Floats of the packed rows of an item of `m` rows.
    pub(crate) fn len(self, m: usize, k: usize) -> usize {
        m.div_ceil(32) * 32 * self.width(k)
    }

    /// The rows of an item of `m` rows that this layout packs: the kernel's row tiles take
    /// them ([`tiled_rows`]); the rest run as dot products on the rows in place.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn rows(self, m: usize) -> usize {
        match self {
            RowPack::F32(half, dots) | RowPack::Pairs(half, dots) => tiled_rows(m, half, dots),
        }
    }
}

/// The most rows a weight-broadcast item leaves to dot products ([`tiled_rows`]).
#[cfg(target_arch = "x86_64")]
pub(crate) const DOT_ROWS: usize = 7;

/// The rows of a weight-broadcast item of `mb` rows that run in row tiles: all of them, or
/// (`dots > 0`) all but the last `mb % u` (`u` the lanes of a tile's unit: 8 with `half`, else
/// 16) when there are at most `dots` (and at most [`DOT_ROWS`]) of those and at least `u`
/// others; the kernels compute the rest as dot products (`wb::dot_chunk` and its `vdpbf16ps`
/// twin).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn tiled_rows(mb: usize, half: bool, dots: usize) -> usize {
    let u = if half { 8 } else { 16 };
    let r = mb % u;
    if r <= dots.min(DOT_ROWS) && mb >= u { mb - r } else { mb }
}

/// The packed row layout the kernel of an item of `m` rows takes, if that kernel is a
/// weight-broadcast kernel (the choice of [`run_block`], which this mirrors; the kernels check
/// the layout they are given, so a mismatch would only cost the sharing).
#[allow(unused_variables)]
pub(crate) fn row_pack(
    isa: Isa,
    tuning: Tuning,
    dtype: DType,
    m: usize,
    k: usize,
) -> Option<RowPack> {
    let wb = k > 0 && m >= tuning.wb_rows.0 && m < tuning.wb_rows.1;
    let dots = if dtype == DType::F32 { tuning.wb_dot_rows } else { 0 };
    let f32_wb = wb.then_some(RowPack::F32(tuning.wb_half, dots));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => f32_wb,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 if dtype == DType::BF16 && m <= tuning.dpbf16_rows => {
            let dw =
                k > 0 && k.is_multiple_of(2) && m >= tuning.dpwb_rows.0 && m < tuning.dpwb_rows.1;
            dw.then_some(RowPack::Pairs(tuning.wb_half, tuning.wb_dot_rows))
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => f32_wb,
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        Isa::Amx if dtype == DType::BF16 && k > 0 && m >= AMX_MIN_ROWS => None,
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        Isa::Amx => f32_wb,
        _ => None,
    }
}

/// Another item's work that a weight-broadcast item takes on while it runs (the crate's
/// overlap of few-rows items, see [`Tuning::overlap_rows`]): lines of that work's weights to
/// fetch into L2 during the item's microkernel calls, and the work itself, run between two of
/// its chunks once they were fetched.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) trait Assist {
    /// The lines to fetch into L2 during one microkernel call: at most `max` 64-byte lines
    /// from the address returned (none: 0).
    fn lines(&mut self, max: usize) -> (*const u8, usize);
    /// Between two chunks of the item: run the work whose lines were fetched, if any.
    fn between(&mut self);
}

/// The AVX-512 kernel of an item (see [`avx512_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Avx512Kernel {
    /// The weight-broadcast kernel (module `wb`).
    Wb,
    /// The broadcast kernel (`avx512::run_block_bc`).
    Bc,
    /// The few-rows kernel, each group of [`NR`] weight rows streamed over all of K
    /// ([`run_direct_cols`] runs one such group).
    Direct,
    /// The engine's row blocks, the weight rows read in place (`true`) or widened into a
    /// buffer.
    Rows(bool),
}

/// The kernel `avx512::run_block_any` runs for an item of `m` rows and reduction length `k`:
/// the one place that decides it (the overlap of few-rows items, [`direct_item`], asks it too).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn avx512_kernel(tuning: Tuning, m: usize, k: usize) -> Avx512Kernel {
    if k > 0 && m >= tuning.wb_rows.0 && m < tuning.wb_rows.1 {
        return Avx512Kernel::Wb;
    }
    if m >= BC_MIN_ROWS {
        return Avx512Kernel::Bc;
    }
    // In place only up to INPLACE_ROWS rows and where K needs no tail step; the few-rows kernel
    // up to `direct_rows` rows, and up to DIRECT_ROWS where the in-place kernel does not apply.
    let inplace = m <= INPLACE_ROWS && k.is_multiple_of(16) && m > tuning.direct_rows;
    if k > 0 && m <= DIRECT_ROWS && !inplace {
        Avx512Kernel::Direct
    } else {
        Avx512Kernel::Rows(inplace)
    }
}

/// Whether [`run_block`] gives an item of `m` rows (`m > 0`) to the AVX-512 few-rows kernel
/// ([`Avx512Kernel::Direct`]).
#[allow(unused_variables)]
pub(crate) fn direct_item(isa: Isa, tuning: Tuning, dtype: DType, m: usize, k: usize) -> bool {
    let avx512 = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => !(dtype == DType::BF16 && m <= tuning.dpbf16_rows),
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        Isa::Amx => !(dtype == DType::BF16 && k > 0 && m >= AMX_MIN_ROWS),
        _ => false,
    };
    avx512 && m > 0 && avx512_kernel(tuning, m, k) == Avx512Kernel::Direct
}

/// Columns `j..j + NR` of B `bi` of an item that [`direct_item`] gives to the few-rows kernel:
/// what that kernel writes for them (columns past `blk.nb` too, never read), the same bits.
///
/// # Safety
/// As [`run_block`], with `direct_item` true for this item; `blk.b[bi]` present, `j < blk.nb`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn run_direct_cols<T: Element>(
    blk: &Block<'_, T>,
    out: Out,
    bi: usize,
    j: usize,
) {
    debug_assert!(blk.b[bi].is_some() && j < blk.nb);
    // SAFETY: `direct_item` holds only for AVX-512 instruction sets, which the caller checked;
    // the caller's contract otherwise.
    unsafe { avx512::run_direct_cols(blk, out, bi, j) }
}

/// Pack the 16-row groups `groups` of the rows `a_rows` of `a` (row length `k`) in the layout
/// `pack` (see [`RowPack`]) into `dst`, which holds [`RowPack::len`] floats for all of
/// `a_rows`: only the rows the layout packs ([`RowPack::rows`]; groups past them pack
/// nothing). Groups may be packed by different threads into disjoint parts of the buffer.
///
/// # Safety
/// `isa` is available and is one whose kernels take `pack` (an AVX-512 one; AVX512-BF16 for
/// [`RowPack::Pairs`]); `dst` is 64-byte aligned and valid for writes of
/// `pack.len(a_rows.len(), k)` floats; every row of `a_rows` lies in `a`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn pack_rows<T: Element>(
    isa: Isa,
    pack: RowPack,
    a: &[T],
    a_rows: &[usize],
    k: usize,
    groups: core::ops::Range<usize>,
    dst: *mut f32,
) {
    debug_assert!(matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx));
    let a_rows = &a_rows[..pack.rows(a_rows.len())];
    let g = a_rows.len().div_ceil(16);
    let groups = groups.start.min(g)..groups.end.min(g);
    match pack {
        // SAFETY: the caller's contract (AVX-512; the buffer, which holds the packed rows of
        // all of the caller's rows, and the rows).
        RowPack::F32(h, _) => unsafe { wb::pack_rows(a, a_rows, k, h, groups, dst) },
        // SAFETY: the caller's contract (AVX512-BF16, so the element type is bf16: the caller
        // chose the layout with [`row_pack`]).
        RowPack::Pairs(h, _) => unsafe { dpbf16::pack_rows(a, a_rows, k, h, groups, dst) },
    }
}

/// A cache-line aligned array (the microkernel's vector loads must not split cache lines).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Aligned<const N: usize>(pub [f32; N]);

/// The f32 result tiles of a work item, `[MB][NB]` for each B.
pub(crate) type Tiles = [[f32; MB * NB]; 2];

/// Where a work item writes its results: for each B, rows `i < a_rows.len()` at `i * NB`.
/// Every element of those rows in columns `< nb` is written (the first K block stores, later
/// ones add), so the buffers may start uninitialized.
pub(crate) type Out = [*mut f32; 2];

/// An instruction set the microkernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (8-wide arrays the compiler vectorizes for the baseline target).
    Generic,
    /// x86-64 AVX2 + FMA (+ F16C for f16).
    Avx2,
    /// x86-64 AVX-512 F/BW/DQ/VL.
    Avx512,
    /// x86-64 AVX-512 plus AVX512-BF16 (`vdpbf16ps`, e.g. AMD Zen 4): bf16 GEMMs multiply bf16
    /// pairs into f32 sums (twice the products per instruction of widening to f32); f32 and
    /// f16 run the AVX-512 kernels.
    Avx512Bf16,
    /// x86-64 AVX-512 plus the AMX-BF16 tile unit: bf16 GEMMs run on the tiles (bf16 products,
    /// f32 sums); f32 and f16 run the AVX-512 kernels. Needs the CPU features, the OS tile state
    /// and Linux's tile-data permission (asked on first use); `MOE_CPU_AMX=0` turns it off.
    Amx,
    /// aarch64 NEON.
    Neon,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => dpbf16::available(),
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Isa::Amx => amx::available(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best instruction set of this machine, or the one the environment variable
    /// `MOE_CPU_ISA` names (`generic`, `avx2`, `avx512`, `avx512bf16`, `amx`, `neon`; case
    /// insensitive) when this machine can run it. Read once per process.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::all_available().last().unwrap_or(Isa::Generic);
            std::env::var("MOE_CPU_ISA")
                .ok()
                .and_then(|v| Isa::from_name(&v))
                .filter(|i| i.available())
                .unwrap_or(best)
        })
    }

    /// The instruction set of a name (`avx512bf16`, ...: the variant's name, case
    /// insensitive).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| format!("{i:?}").eq_ignore_ascii_case(name.trim()))
    }

    /// Every instruction set, best last.
    const ALL: [Isa; 6] =
        [Isa::Generic, Isa::Neon, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// Every instruction set this machine can run, best last.
    pub fn all_available() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|i| i.available())
    }
}

/// Kernel choices that depend on the CPU model, not only on its instruction set: measured
/// per vendor, chosen once per process by [`Tuning::detect`], overridable per backend
/// (`Cpu::with_tuning`). Any tuning gives correct results; the bits may differ between tunings
/// (another kernel sums in another order) but never with the thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuning {
    /// AVX-512 work items with at least `wb_rows.0` and fewer than `wb_rows.1` rows run the
    /// weight-broadcast kernel (rows in the vector lanes, weights broadcast); none when
    /// `wb_rows.0 >= wb_rows.1`.
    pub wb_rows: (usize, usize),
    /// AVX-512 work items of at most this many rows stream each group of weight rows over its
    /// whole K (the few-rows kernel), also where the in-place packed kernel could take them.
    pub direct_rows: usize,
    /// The AVX-512 dot-product kernel that reads the weight rows in place also fetches each of
    /// them 4 KiB ahead into L2 with software prefetches, instead of fetching the next panel's
    /// weight rows into L2 while a panel runs. Either gives the same bits.
    pub inplace_prefetch: bool,
    /// With [`Isa::Avx512Bf16`], bf16 work items of at most this many rows run on `vdpbf16ps`;
    /// larger ones are widened to f32 FMAs (the AVX-512 kernels).
    pub dpbf16_rows: usize,
    /// With [`Isa::Avx512Bf16`], bf16 work items that go to the `vdpbf16ps` kernels (see
    /// `dpbf16_rows`) with at least `dpwb_rows.0` and fewer than `dpwb_rows.1` rows, and an
    /// even K, run its weight-broadcast kernel (rows in the vector lanes, weight pairs
    /// broadcast); none when `dpwb_rows.0 >= dpwb_rows.1`.
    pub dpwb_rows: (usize, usize),
    /// The AVX-512 weight-broadcast kernel reads 8 weight rows per stripe instead of 12 (16
    /// accumulators instead of 24): the stripe's rows are read in place at a stride that is a
    /// multiple of 4 KiB for most of the models' K, so they all map to one L1 set, and 12 of
    /// them take more ways than an 8-way L1 has (Zen 4) or all 12 ways of Emerald Rapids',
    /// evicting the packed rows' lines of that set. Either gives the same bits.
    pub wb_narrow: bool,
    /// The weight-broadcast kernels give an item's last row tile lanes in units of 8 (a 256-bit
    /// half vector after its 512-bit ones) instead of 16, for CPUs where a 256-bit FMA or
    /// `vdpbf16ps` costs half a 512-bit one (Zen 4 splits 512-bit operations into two 256-bit
    /// halves): at most 7 rows' work wasted per item instead of 15. Either gives the same bits.
    pub wb_half: bool,
    /// The f32 weight-broadcast kernel also fetches the weight rows it reads in place into L2
    /// a chunk ahead with software prefetches (as it always does for the rows it copies),
    /// instead of leaving them to the hardware prefetchers alone. Either gives the same bits.
    pub wb_prefetch: bool,
    /// The `vdpbf16ps` decode kernel (items of 1-2 rows, each weight row streamed over its
    /// whole K) also fetches its weight rows into L2 ahead with software prefetches, instead of
    /// leaving the one sequential stream to the hardware prefetchers. Either gives the same
    /// bits.
    pub seq_prefetch: bool,
    /// The `vdpbf16ps` decode kernel reads up to this many weight rows at a time (4, 2 or 1:
    /// the largest not above it, 0 counting as 1; with two activation rows at most 2), each its
    /// own sequential stream, instead of one row after another: more lines in flight per core
    /// where the hardware prefetchers follow several streams better than one. Any value gives
    /// the same bits (each sum in the same order).
    pub seq_streams: usize,
    /// The weight-broadcast kernels (f32, and `vdpbf16ps` for bf16) leave an item's last `rows
    /// % u` rows (`u` = 8 with [`Tuning::wb_half`], else 16), when there are at most this many
    /// of them (at most 7 count) and at least `u` other rows, to dot products over the same
    /// weight rows while they are in cache (all 16 lanes of each product used) instead of a
    /// unit whose other lanes would be idle; 0: never. Either gives results within rounding of
    /// the other, each the same bits whatever the thread count.
    pub wb_dot_rows: usize,
    /// The f32 weight-broadcast kernel with 8 weight rows per stripe ([`Tuning::wb_narrow`])
    /// runs an item's last two row tiles, of 2 and 1 16-lane vectors, as one register tile of
    /// 3 vectors (24 accumulators), one pass over each chunk of weight rows for both. Either
    /// gives the same bits.
    pub wb_fuse: bool,
    /// With several threads, work items of at least this many rows (compute-bound ones) take on
    /// the few-rows items' work (those of the streaming kernel, at most `direct_rows` rows,
    /// memory-bound) while they run: one group of that kernel's weight rows at a time is
    /// fetched into L2 during their microkernel calls, then run from there; the groups left
    /// run after them. The memory stalls of the few-rows items overlap the others' arithmetic;
    /// 0: never. Either gives the same bits.
    pub overlap_rows: usize,
}

impl Tuning {
    /// AMD (measured on Zen 4): `vdpbf16ps` does twice the FMA's products per cycle (211 vs 100
    /// GFLOP/s per thread), so every bf16 item uses it; the in-place packed kernel with
    /// software prefetch beat the whole-K streaming one for few rows. Zen 4's L1 has 8 ways,
    /// so the weight-broadcast kernels read 8 weight rows per stripe there (2 threads,
    /// interleaved, expert GEMMs, time over the previous tuning's in the same round, median of
    /// 4-5 rounds):
    /// * f32 items from 16 rows (all sizes) went to the weight-broadcast kernel, 8 rows per
    ///   stripe ([`Tuning::wb_narrow`]): Mixtral f32 T=128 0.962x, T=1024 0.945x, DeepSeek-V3
    ///   0.922x / 0.944x, Qwen3 T=1024 0.966x, gpt-oss T=1024 0.975x, the T=16 points and Qwen3
    ///   and gpt-oss T=128 0.995x-1.012x; with 12 rows per stripe the same items took 1.03x-1.08x
    ///   the previous time (Mixtral T=128 1.075x), and from 8 rows Qwen3 T=128 1.058x;
    /// * bf16 items from 8 rows go to the `vdpbf16ps` weight-broadcast kernel: 0.898x-0.992x at
    ///   all 12 bf16 points T=16/128/1024 of the four models (DeepSeek-V3 T=128 0.898x, Qwen3
    ///   T=1024 0.932x, gpt-oss T=1024 0.953x, Mixtral T=128 0.966x);
    /// * an item's last row tile in 8-lane units ([`Tuning::wb_half`]; against 16, paired
    ///   medians of 3-4 rounds, same bits): f32 T=128 Mixtral 0.937x, gpt-oss 0.952x,
    ///   DeepSeek-V3 0.977x, Qwen3 1.000x; T=1024 0.972x / 0.984x / 0.963x / 1.011x; bf16 T=128
    ///   0.966x / 0.949x / 0.957x / 0.978x, T=1024 1.003x / 0.989x / 0.985x / 0.966x.
    /// * then from 8 rows (with the 8-lane tail, 8-15-row items take one 256-bit half; against
    ///   16, medians of 11 and 15 rounds): Qwen3 f32 T=128 0.961x / 0.972x, gpt-oss T=128 0.950x
    ///   / 0.950x, DeepSeek-V3 T=16 0.969x / 0.969x, the other T=16 / T=128 points 0.98x-1.007x
    ///   (from 4 or 6 rows: no better; bf16 `dpwb_rows` from 2, 4 or 6 instead of 8: 0.99x-1.18x);
    /// * the in-place f32 weight rows also prefetched into L2 a chunk ahead
    ///   ([`Tuning::wb_prefetch`]; 11 rounds): Qwen3 f32 T=128 0.921x, gpt-oss T=128 0.950x;
    ///   for items of more than 32 rows too (7 rounds): Qwen3 T=1024 0.968x, the other T=128 /
    ///   T=1024 points 0.995x-1.011x.
    /// * the `vdpbf16ps` decode kernel without its software prefetch ([`Tuning::seq_prefetch`]
    ///   off; three runs of 11 rounds, same bits): bf16 T=1 Qwen3 0.928x / 0.968x / 0.989x,
    ///   gpt-oss 0.995x / 0.965x / 1.007x, Mixtral 1.006x / 0.954x / 1.005x, DeepSeek-V3 1.003x
    ///   / 0.998x / 1.004x (0.927x in a faster spell of the host); T=16 (1-4 rows per expert)
    ///   Qwen3 0.873x / 0.881x / 0.903x, gpt-oss 0.981x / 0.911x / 0.913x, Mixtral 1.004x /
    ///   0.996x / 0.984x, DeepSeek-V3 0.991x / 1.007x / 1.026x. The few-rows dot kernel's
    ///   prefetch (3-7 rows) stays: without it Mixtral bf16 T=16 took 1.100x; so does f32's
    ///   (`inplace_prefetch`): without it Mixtral f32 T=1 1.119x, DeepSeek-V3 1.107x.
    /// * an item's last 1-5 rows past a multiple of 8 as dot products
    ///   ([`Tuning::wb_dot_rows`] 5, against 0; 5 rounds): f32 T=128 Mixtral 0.912x,
    ///   DeepSeek-V3 0.957x, gpt-oss 0.962x (0.948x-0.955x in three more runs), Qwen3
    ///   0.98x-1.03x (bandwidth-bound); T=1024 0.973x-1.008x; T=16 0.999x-1.027x (few items of
    ///   8 rows); bf16 T=128 Mixtral 0.888x, DeepSeek-V3 0.953x, gpt-oss 0.956x (0.956x in 9
    ///   more rounds), Qwen3 1.023x (0.995x in 9 more); T=1024 0.970x-0.996x. Up to 3, 4, 6 or
    ///   7 rows instead of 5: f32 gpt-oss T=128 1.037x, 1.000x, 1.024x, 1.02x-1.03x the time of
    ///   5, the other T=128 points within 1 %; bf16 within the noise of 5 but for gpt-oss T=128
    ///   (3: 1.015x, 7: 1.022x).
    /// * the f32 in-place kernel with its per-row prefetch no longer also fetches the next
    ///   panel's weight rows (7-9 rounds, same bits): f32 T=1 Qwen3 0.913x, gpt-oss 0.927x,
    ///   Mixtral 0.858x, DeepSeek-V3 0.976x; T=16 0.915x / 0.984x / 0.906x / 0.916x; T=128
    ///   0.99x-1.01x. In cache (one thread, 192 weight rows, K 768 / 2048) its 4-row items went
    ///   from 52 / 50 to 90 / 83 GFLOP/s, 2-row items from 33 / 29 to 71 / 57. Against the
    ///   next-panel prefetch alone (`inplace_prefetch` off) it is still faster: T=1 Qwen3
    ///   1.117x, gpt-oss 1.132x, Mixtral 1.521x, DeepSeek-V3 1.122x; T=16 1.239x / 1.092x /
    ///   1.366x / 1.082x the time without it. bf16 keeps its next-panel prefetch beside the
    ///   per-row one: without it Qwen3 bf16 T=128 took 1.048x, gpt-oss T=16 1.061x (Mixtral
    ///   T=16 0.935x).
    ///
    /// [`Tuning::wb_fuse`] (measured on Emerald Rapids) is off until measured on Zen 4; so is
    /// [`Tuning::overlap_rows`], which needs few-rows items (`direct_rows`, 0 here). The decode
    /// kernel reads one weight row at a time ([`Tuning::seq_streams`] 1): streaming 2 or 4 rows
    /// at once took 1.12x-1.46x the time at bf16 T=1 on Zen 4 (2026-12-06, the same sums; how
    /// that version prefetched is not recorded, the kept one continues each stream's prefetch 4
    /// rows on); not re-measured.
    pub const AMD: Tuning = Tuning {
        wb_rows: (8, usize::MAX),
        direct_rows: 0,
        inplace_prefetch: true,
        dpbf16_rows: usize::MAX,
        dpwb_rows: (8, usize::MAX),
        wb_narrow: true,
        wb_half: true,
        wb_prefetch: true,
        seq_prefetch: false,
        seq_streams: 1,
        wb_dot_rows: 5,
        wb_fuse: false,
        overlap_rows: 0,
    };

    /// Intel (measured on a 2-core Emerald Rapids guest without AMX, 2 threads, expert GEMMs,
    /// interleaved runs):
    /// * `vdpbf16ps` runs at half the f32 FMA rate there (83 vs 169 GFLOP/s per thread), so
    ///   bf16 items above 2 rows are widened to f32 FMAs (Mixtral bf16 T=1024 3380 vs 4798 ms,
    ///   DeepSeek-V3 3547 vs 5691); at 1-2 rows its streaming kernel still reads fastest
    ///   (Qwen3 bf16 T=1 2.0 vs 2.4 ms, gpt-oss 12.9 vs 15.1);
    /// * below 8 rows, each group of weight rows streamed over its whole K beats the in-place
    ///   packed kernel (f32 T=1: Mixtral 48 vs 65 ms, gpt-oss 15.3 vs 20.4, DeepSeek-V3 51 vs
    ///   68; T=16: Qwen3 69 vs 83);
    /// * in the in-place packed kernel, the hardware prefetchers stream the weight rows better
    ///   than software prefetches ([`Tuning::inplace_prefetch`]; f32 Mixtral T=16 332 vs 370
    ///   ms, gpt-oss T=1 20.7 vs 25.0, DeepSeek-V3 T=16 230 vs 262);
    /// * from 8 rows the weight-broadcast kernel is the fastest (f32: Mixtral T=128, 32 rows per
    ///   expert, 702 vs 820 ms; gpt-oss T=128, 16 rows, 276 vs 322; Qwen3 T=1024, 64 rows, 422 vs
    ///   573); from 128 rows too since its rows were packed once per GEMM (re-measured on another
    ///   such guest on 2026-12-06, against `wb_rows` (8, 128), 3 rounds, time in the same round:
    ///   f32 T=1024 Mixtral 0.920x, DeepSeek-V3 0.950x, gpt-oss 0.909x, Qwen3 0.982x);
    /// * there too, with the in-place f32 weight rows also prefetched into L2 a chunk ahead
    ///   ([`Tuning::wb_prefetch`], measured with the line above): f32 T=128 Qwen3 0.896x,
    ///   Mixtral 0.969x, DeepSeek-V3 0.967x, gpt-oss 1.018x (0.981x in another 5 rounds);
    ///   bf16 (widened, not read in place) T=128 / T=1024 0.96x-1.06x, within the rounds'
    ///   spread.
    ///
    /// * an item's last 1-5 rows past a multiple of 16 as dot products ([`Tuning::wb_dot_rows`]
    ///   5, against 0 with the lines above; 9 rounds): f32 T=128 Mixtral 0.888x, DeepSeek-V3
    ///   0.963x, gpt-oss 0.973x, Qwen3 0.995x; T=1024 (5 rounds) 0.948x-0.990x, within the
    ///   rounds' spread; up to 7 rows: no better then (T=128 Mixtral 0.865x, gpt-oss 1.031x);
    /// * up to 7 rows once the dot products ran per chunk against the weight rows in L1 (the
    ///   next session, same machine type; against 5, 7 rounds): f32 T=128 Mixtral 0.966x
    ///   (0.962x-0.968x; 0.969x in 7 other rounds), DeepSeek-V3 0.991x (0.994x), Qwen3 0.990x,
    ///   gpt-oss 1.004x (1.008x); T=1024 0.978x-1.017x, within the rounds' spread. Up to 9 or
    ///   11 rows (in a build that allowed more than 7), against 5: no better (Mixtral T=128
    ///   1.017x / 1.021x, DeepSeek-V3 0.989x / 1.005x).
    /// * 8 weight rows per stripe instead of 12 ([`Tuning::wb_narrow`]; the session after,
    ///   same machine type; same bits): f32 T=128 Mixtral 0.967x (0.944x-1.000x, 7 rounds;
    ///   0.964x in 5 more), DeepSeek-V3 1.000x / 0.985x, gpt-oss 0.998x, Qwen3 1.012x; T=1024
    ///   0.986x-0.999x; T=16 f32 and bf16 T=16 / T=128 0.983x-1.012x. In cache (one thread, 192
    ///   weight rows, K 4096) 16 / 32 / 48 / 64 / 128 rows: 106 / 145 / 135 / 145 / 148
    ///   GFLOP/s against 102 / 141 / 130 / 145 / 147; 32 rows at K 2880 (no 4 KiB stride) 147
    ///   against 144, K 2048 151 against 145.
    /// * an item's last two row tiles of 2 and 1 vectors as one register tile of 3
    ///   ([`Tuning::wb_fuse`]; the session after, same machine type; against apart, same bits):
    ///   f32 T=128 DeepSeek-V3 (experts of 40-51 and 77 rows) 0.969x (7 rounds), Mixtral 1.004x,
    ///   Qwen3 0.993x, gpt-oss 0.984x; T=1024 Qwen3 0.973x (9 rounds), DeepSeek-V3 0.955x (5),
    ///   Mixtral 0.995x, gpt-oss 0.999x (9); bf16 (widened) T=128 DeepSeek-V3 0.977x, Mixtral
    ///   0.956x, Qwen3 0.999x, gpt-oss 1.003x, T=1024 0.978x / 0.955x / 0.991x / 0.995x (5).
    ///   In cache (one thread, 192 weight rows, K 2048), 40 / 48 / 80 rows: 125 / 149 / 147
    ///   GFLOP/s against 113-115 / 131-137 / 140.
    /// * the few-rows items' work taken on by the items of at least 24 rows
    ///   ([`Tuning::overlap_rows`]; same session; against none, 5 rounds, same bits): f32 T=128
    ///   DeepSeek-V3 (8 of its 32 experts get 3-7 rows, streamed at 10-14 GB/s per thread, 15 %
    ///   of the threads' time for 3 % of the FLOPs) 0.946x (0.918x-0.962x; 0.943x, 0.951x in
    ///   two more runs: 378-383 ms, 239-235 GFLOP/s, against 404-414), bf16 T=128 0.921x,
    ///   gpt-oss T=128 f32 0.989x (0.933x in 7 other rounds), bf16 0.975x; without its
    ///   prefetches (the groups run from memory) 1.061x, no better than none. The points
    ///   without both kinds of items (T=16, Mixtral, Qwen3 T=128) and T=1024: 0.97x-1.03x,
    ///   within the rounds' spread. In the DeepSeek-V3 T=128 GEMMs the few-rows work took 62
    ///   thread-ms as groups run from L2 against 124-127 as items (of 817).
    ///
    /// The `vdpbf16ps` weight-broadcast kernel (`dpwb_rows`) was not measured there: off. Nor
    /// is `wb_half` on (Golden Cove runs a 512-bit FMA at the cost of a 256-bit one): with 8-row
    /// units and up to 5 dot-product rows (5 rounds) f32 T=128 Mixtral 0.918x but gpt-oss
    /// 1.053x, Qwen3 1.025x. The `vdpbf16ps` decode kernel keeps the software prefetch measured
    /// with it there (`seq_prefetch`; without it, 9 rounds: bf16 T=1 1.22x-1.31x the time), and
    /// reads 4 weight rows at a time ([`Tuning::seq_streams`]; 2026-12-07, same bits): one row
    /// at a time took, bf16 T=1, Qwen3 1.089x / 1.095x, gpt-oss 1.078x / 1.074x, Mixtral
    /// 1.078x / 1.077x, DeepSeek-V3 1.068x / 1.063x (two pairs, 7 rounds each), T=16 0.99x-1.05x.
    /// A read-only replica (2 threads, rows of 8 KiB, one L2 prefetch per line 4 KiB ahead)
    /// read 28.7-29.6 GB/s as one stream per thread, 32.0-33.0 as 4, 32.7-33.6 as 8.
    pub const INTEL: Tuning = Tuning {
        wb_rows: (8, usize::MAX),
        direct_rows: 7,
        inplace_prefetch: false,
        dpbf16_rows: 2,
        dpwb_rows: (0, 0),
        wb_narrow: true,
        wb_half: false,
        wb_prefetch: true,
        seq_prefetch: true,
        seq_streams: 4,
        wb_dot_rows: 7,
        wb_fuse: true,
        overlap_rows: 24,
    };

    /// Every item a weight-broadcast kernel can take goes to it (for tests). [`Tuning::wb_fuse`]
    /// is on but idle with 12 weight rows per stripe (`fused_row_tiles_give_the_same_bits`
    /// tests it).
    #[doc(hidden)]
    pub const ALL_WB: Tuning = Tuning {
        wb_rows: (1, usize::MAX),
        direct_rows: 0,
        inplace_prefetch: false,
        dpbf16_rows: usize::MAX,
        dpwb_rows: (1, usize::MAX),
        wb_narrow: false,
        wb_half: true,
        wb_prefetch: true,
        seq_prefetch: true,
        seq_streams: 1,
        wb_dot_rows: 7,
        wb_fuse: true,
        overlap_rows: 0,
    };

    /// The tuning of a name, case insensitive: `amd`, `intel`, `allwb` ([`Tuning::ALL_WB`]) or
    /// `detect` ([`Tuning::detect`]); for benches that compare tunings.
    pub fn from_name(name: &str) -> Option<Tuning> {
        match name.trim().to_ascii_lowercase().as_str() {
            "amd" => Some(Tuning::AMD),
            "intel" => Some(Tuning::INTEL),
            "allwb" => Some(Tuning::ALL_WB),
            "detect" => Some(Tuning::detect()),
            _ => None,
        }
    }

    /// The tuning of this machine's CPU vendor ([`Tuning::AMD`] on AMD, [`Tuning::INTEL`]
    /// elsewhere). Read once per process.
    pub fn detect() -> Tuning {
        static T: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
        *T.get_or_init(|| if cpu_is_amd() { Tuning::AMD } else { Tuning::INTEL })
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::detect()
    }
}

/// Whether the CPU vendor string (CPUID leaf 0) is AMD's.
fn cpu_is_amd() -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // CPUID leaf 0 (the vendor string) exists on every x86-64 CPU.
        let r = core::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    false
}

/// Run one work item with `isa` into `out` (`out[bi][i * NB + j]` for row `i`, column `n0 + j`).
///
/// The caller has checked `isa.available()`, that every A row lies in `a`, and every B row in
/// `n0..n0 + nb` lies in its matrix.
///
/// # Safety
/// Each `out[bi]` of a present `blk.b[bi]` must be valid for writes (and reads after them) of
/// `blk.a_rows.len() * NB` floats.
pub(crate) unsafe fn run_block<T: Element>(isa: Isa, tuning: Tuning, blk: &Block<'_, T>, out: Out) {
    // SAFETY: the caller's contract.
    unsafe { run_block_with(isa, tuning, blk, out, None) }
}

/// [`run_block`], the weight-broadcast kernel (if it takes the item) taking on `assist`'s work
/// meanwhile.
///
/// # Safety
/// As [`run_block`].
#[allow(unused_variables, unused_mut)]
pub(crate) unsafe fn run_block_with<T: Element>(
    isa: Isa,
    tuning: Tuning,
    blk: &Block<'_, T>,
    out: Out,
    mut assist: Option<&mut dyn Assist>,
) {
    debug_assert!(blk.a_rows.len() <= MB && blk.nb <= NB);
    debug_assert!(blk.a_rows.iter().all(|&r| (r + 1) * blk.k <= blk.a.len()));
    debug_assert!(blk.b.iter().flatten().all(|b| (blk.n0 + blk.nb) * blk.k <= b.len()));
    // Only the x86-64 kernels take tunings.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tuning;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has AVX-512 (`Isa::available`); the bounds of
        // every row read are checked by the caller (asserted above in debug builds).
        Isa::Avx512 => unsafe { avx512::run_block_any(blk, out, tuning, assist) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `Isa::Avx512Bf16.available()` (AVX-512 and AVX512-BF16);
        // bounds as above. bf16 items of at most `tuning.dpbf16_rows` rows go to the
        // `vdpbf16ps` kernels, the rest to AVX-512.
        Isa::Avx512Bf16 => unsafe {
            if T::DTYPE == moe_core::DType::BF16 && blk.a_rows.len() <= tuning.dpbf16_rows {
                dpbf16::run_block(blk, out, tuning)
            } else {
                avx512::run_block_any(blk, out, tuning, assist)
            }
        },
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: the caller checked `Isa::Amx.available()` (AMX-BF16, the tile permission and
        // AVX-512); bounds as above. bf16 items go to the tile unit, the rest to AVX-512.
        Isa::Amx => unsafe {
            if T::DTYPE == moe_core::DType::BF16 && blk.k > 0 && blk.a_rows.len() >= AMX_MIN_ROWS {
                amx::run_block(blk, out)
            } else {
                avx512::run_block_any(blk, out, tuning, assist)
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA + F16C.
        Isa::Avx2 => unsafe { avx2::run_block_any(blk, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, for NEON.
        Isa::Neon => unsafe { neon::run_block(blk, out) },
        // SAFETY: the generic kernels need no CPU feature; bounds as above.
        _ => unsafe { generic::run_block(blk, out) },
    }
}

/// The engine, written once and compiled per instruction set. The including module defines `L`
/// (lanes), `MRX` (rows of its microkernel tile, at most [`MR`]), `V` (vector type), and `zero`,
/// `load`, `fma`, `hsum4`, `widen_f16` with the module's `#[target_feature]`s.
macro_rules! engine {
    ($(#[$attr:meta])*) => {
        use super::{Aligned, Block, DIRECT_ROWS, KC, KS, MP, NB, NR, Out, PREFETCH_AHEAD};
        /// Elements of `T` per 64-byte cache line (at least).
        const LINE: usize = 16;
        use core::mem::MaybeUninit;
        use moe_core::{DType, Element};

        /// Widen `src` into `dst` (same length).
        $(#[$attr])*
        #[inline]
        unsafe fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
            match T::DTYPE {
                DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
                DType::BF16 => {
                    let s: &[u16] = bytemuck::cast_slice(src);
                    for (d, &s) in dst.iter_mut().zip(s) {
                        *d = f32::from_bits((s as u32) << 16);
                    }
                }
                // SAFETY: same features as this function; equal lengths.
                DType::F16 => unsafe { widen_f16(bytemuck::cast_slice(src), dst) },
            }
        }

        /// `c[i * NB + j] (+)= sum_k a[i * KS + k] b[j * KS + k]` for `i < M`, `j < NR`,
        /// `k < kcp` (`kcp` a multiple of `L`).
        $(#[$attr])*
        #[inline]
        unsafe fn micro<const M: usize>(
            a: *const f32,
            b: *const f32,
            kcp: usize,
            c: *mut f32,
            first: bool,
        ) {
            // SAFETY: the caller passes buffers holding M (resp. NR) initialized rows of `kcp`
            // floats at stride KS, and a tile with M rows of NB >= NR columns.
            unsafe {
                let mut acc = [[zero(); NR]; M];
                let mut k = 0;
                while k < kcp {
                    // M A vectors in registers, the NR B vectors streamed one at a time: M * NR
                    // + M + 1 live vectors (29 with AVX-512, 15 with AVX2).
                    let mut av = [zero(); M];
                    for (i, v) in av.iter_mut().enumerate() {
                        *v = load(a.add(i * KS + k));
                    }
                    for j in 0..NR {
                        let bj = load(b.add(j * KS + k));
                        for (row, &ai) in acc.iter_mut().zip(av.iter()) {
                            row[j] = fma(ai, bj, row[j]);
                        }
                    }
                    k += L;
                }
                store_acc::<M>(acc, c, first);
            }
        }

        /// Few rows (decode): the weight rows and the item's rows are both read in place and
        /// widened in registers (no packing copy), with software prefetch ahead on each of the
        /// NR weight streams.
        /// `c[i * NB + j] (+)= sum_{k < kc} A_i[k] B_j[k]` for `i < M`, `j < NR`.
        $(#[$attr])*
        #[inline]
        unsafe fn micro_direct<const M: usize, T: Element>(
            arow: [*const T; M],
            brow: [*const T; NR],
            kc: usize,
            c: *mut f32,
            first: bool,
        ) {
            // SAFETY: the caller passes M rows and NR weight rows of at least kc elements, and a
            // tile with M rows of NB >= NR columns. Prefetches never fault.
            unsafe {
                let mut acc = [[zero(); NR]; M];
                let full = kc / L * L;
                let mut k = 0;
                while k < full {
                    let mut av = [zero(); M];
                    for (i, v) in av.iter_mut().enumerate() {
                        *v = load_t(arow[i].add(k));
                    }
                    for j in 0..NR {
                        let at = k * core::mem::size_of::<T>();
                        if PREFETCH_AHEAD > 0 && at % 64 == 0 {
                            prefetch((brow[j] as *const u8).wrapping_add(at + PREFETCH_AHEAD));
                        }
                        let bj = load_t(brow[j].add(k));
                        for (row, &ai) in acc.iter_mut().zip(av.iter()) {
                            row[j] = fma(ai, bj, row[j]);
                        }
                    }
                    k += L;
                }
                for (i, row) in acc.iter().enumerate() {
                    let s0 = hsum4(row[0], row[1], row[2], row[3]);
                    let s1 = hsum4(row[4], row[5], zero(), zero());
                    let mut sums = [s0[0], s0[1], s0[2], s0[3], s1[0], s1[1]];
                    for kk in full..kc {
                        let av = (*arow[i].add(kk)).to_f32();
                        for (j, s) in sums.iter_mut().enumerate() {
                            *s += av * (*brow[j].add(kk)).to_f32();
                        }
                    }
                    let cr = c.add(i * NB);
                    for (j, &s) in sums.iter().enumerate() {
                        if first {
                            *cr.add(j) = s;
                        } else {
                            *cr.add(j) += s;
                        }
                    }
                }
            }
        }

        /// Packed rows, weight rows read in place and widened in registers:
        /// `c[i * NB + j] (+)= sum_{k < kc} a[i * KS + k] B_j[k]` for `i < M`, `j < NR` (`kc` a
        /// multiple of `L`: no tail step, which would keep the accumulators on the stack), one
        /// L2 prefetch per step and weight row [`INPLACE_AHEAD`](super::INPLACE_AHEAD) bytes
        /// ahead when `PF`.
        $(#[$attr])*
        #[inline]
        unsafe fn micro_pb<const M: usize, T: Element, const PF: bool>(
            a: *const f32,
            brow: [*const T; NR],
            kc: usize,
            c: *mut f32,
            first: bool,
        ) {
            // SAFETY: the caller passes M packed rows of kc floats at stride KS, NR weight rows
            // of kc readable elements, and a tile with M rows of NB >= NR columns. Prefetches
            // never fault.
            unsafe {
                let mut acc = [[zero(); NR]; M];
                let mut k = 0;
                while k < kc {
                    let mut av = [zero(); M];
                    for (i, v) in av.iter_mut().enumerate() {
                        *v = load(a.add(i * KS + k));
                    }
                    for j in 0..NR {
                        let at = k * core::mem::size_of::<T>() + super::INPLACE_AHEAD;
                        if PF {
                            prefetch_l2((brow[j] as *const u8).wrapping_add(at));
                        }
                        let bj = load_t(brow[j].add(k));
                        for (row, &ai) in acc.iter_mut().zip(av.iter()) {
                            row[j] = fma(ai, bj, row[j]);
                        }
                    }
                    k += L;
                }
                store_acc::<M>(acc, c, first);
            }
        }

        /// `c[i * NB + j] (=|+=)` the horizontal sums of `acc[i][j]`, `i < M`, `j < NR`. By
        /// value, not by reference: an escaping reference made LLVM keep the accumulators in
        /// memory through the caller's K loop (see `dpbf16::store`).
        $(#[$attr])*
        #[inline]
        unsafe fn store_acc<const M: usize>(acc: [[V; NR]; M], c: *mut f32, first: bool) {
            for (i, row) in acc.iter().enumerate() {
                let s0 = hsum4(row[0], row[1], row[2], row[3]);
                let s1 = hsum4(row[4], row[5], zero(), zero());
                let sums = [s0[0], s0[1], s0[2], s0[3], s1[0], s1[1]];
                for (j, &s) in sums.iter().enumerate() {
                    // SAFETY: the caller's tile has M rows of NB >= NR columns from `c`.
                    unsafe {
                        let d = c.add(i * NB + j);
                        if first {
                            *d = s;
                        } else {
                            *d += s;
                        }
                    }
                }
            }
        }

        /// A work item of at most [`DIRECT_ROWS`] rows (see [`micro_direct`]). Each group of
        /// NR weight rows is streamed over its whole length (K blocks inner), so that a thread
        /// reads its item's weights front to back as NR long sequential streams; the row tiles
        /// after the first find the weight block in L1. The sums are those of the K-outer
        /// order (per K block, horizontal sum, then added in K order), bit for bit.
        $(#[$attr])*
        unsafe fn run_direct<T: Element>(blk: &Block<'_, T>, out: Out) {
            for bi in 0..2 {
                if blk.b[bi].is_none() {
                    continue;
                }
                let mut j = 0;
                while j < blk.nb {
                    // SAFETY: same features; the caller's contract, B `bi` present, j < nb.
                    unsafe { run_direct_cols(blk, out, bi, j) };
                    j += NR;
                }
            }
        }

        /// Columns `j..j + NR` (those below `nb`) of B `bi` of a few-rows item (see
        /// [`run_direct`]): its NR weight rows streamed over all of K against all its rows;
        /// columns `j..j + NR` of `out[bi]` written (those past `nb` too, never read).
        ///
        /// # Safety
        /// As [`run_direct`]; `blk.b[bi]` present, `j < blk.nb`, and the tile has room for NR
        /// columns from `j` (NB is a multiple of NR).
        $(#[$attr])*
        pub(crate) unsafe fn run_direct_cols<T: Element>(
            blk: &Block<'_, T>,
            out: Out,
            bi: usize,
            j: usize,
        ) {
            let (k, mb, nb) = (blk.k, blk.a_rows.len(), blk.nb);
            let Some(b) = blk.b[bi] else { return };
            let nr = NR.min(nb - j);
            let first_row = (blk.n0 + j) * k;
            // Rows past nb repeat the first row (their columns are never read).
            let mut brow = [b[first_row..first_row + k].as_ptr(); NR];
            for (jj, p) in brow.iter_mut().enumerate().take(nr) {
                let at = (blk.n0 + j + jj) * k;
                *p = b[at..at + k].as_ptr();
            }
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let bk = brow.map(|p| p.wrapping_add(k0));
                let mut i = 0;
                while i < mb {
                    let m = (mb - i).min(MRX);
                    let mut arow = [blk.a.as_ptr(); 4];
                    for (ii, p) in arow.iter_mut().enumerate().take(m) {
                        let at = blk.a_rows[i + ii] * k + k0;
                        *p = blk.a[at..at + kc].as_ptr();
                    }
                    // SAFETY: m rows of kc elements from `arow`; NR weight rows of kc
                    // elements from `bk` (each lies in its row of k); the caller's
                    // tile has room for NR columns from j.
                    unsafe {
                        let c = out[bi].add(i * NB + j);
                        let f = k0 == 0;
                        let [a0, a1, a2, a3] = arow;
                        match m {
                            4 => micro_direct::<4, T>([a0, a1, a2, a3], bk, kc, c, f),
                            3 => micro_direct::<3, T>([a0, a1, a2], bk, kc, c, f),
                            2 => micro_direct::<2, T>([a0, a1], bk, kc, c, f),
                            _ => micro_direct::<1, T>([a0], bk, kc, c, f),
                        }
                    }
                    i += MRX;
                }
                k0 += KC;
            }
        }

        /// One work item (see the module docs): items of at most [`DIRECT_ROWS`] rows take the
        /// few-rows kernel, the rest run in row blocks of [`MP`] (the weight rows read in
        /// place where the including module allows it, INPLACE_MAX, with the in-place kernel's
        /// L2 prefetch). The AVX-512 dispatch decides in `super::avx512_kernel` instead.
        $(#[$attr])*
        pub(crate) unsafe fn run_block<T: Element>(blk: &Block<'_, T>, out: Out) {
            let mb = blk.a_rows.len();
            // In place only where K needs no tail step.
            let inplace = mb <= INPLACE_MAX && blk.k % L == 0;
            // SAFETY: same features; the caller's contract (in place: k is a multiple of L).
            unsafe {
                if blk.k > 0 && mb <= DIRECT_ROWS && !inplace {
                    run_direct(blk, out)
                } else {
                    run_row_blocks::<T, true>(blk, out, inplace)
                }
            }
        }

        /// One work item in row blocks of [`MP`] (see [`run_rows`]); `PF`: the in-place
        /// kernel fetches each weight row [`INPLACE_AHEAD`](super::INPLACE_AHEAD) bytes ahead
        /// into L2.
        ///
        /// # Safety
        /// As [`run_block`]; `inplace` only where `blk.k` is a multiple of `L`.
        $(#[$attr])*
        pub(crate) unsafe fn run_row_blocks<T: Element, const PF: bool>(
            blk: &Block<'_, T>,
            out: Out,
            inplace: bool,
        ) {
            let mb = blk.a_rows.len();
            if blk.k == 0 {
                for (bi, o) in out.iter().enumerate() {
                    if blk.b[bi].is_some() {
                        // SAFETY: the caller's buffers hold mb rows of NB floats.
                        unsafe { core::ptr::write_bytes(*o, 0, mb * NB) };
                    }
                }
                return;
            }
            debug_assert!(!inplace || blk.k % L == 0);
            let mut r0 = 0;
            while r0 < mb {
                let r1 = (r0 + MP).min(mb);
                // SAFETY: rows r0..r1 of the caller's buffers.
                let o = unsafe { [out[0].add(r0 * NB), out[1].add(r0 * NB)] };
                let rows = &blk.a_rows[r0..r1];
                // SAFETY: same features; the caller's contract for these rows (in place: k is
                // a multiple of L).
                unsafe {
                    if inplace {
                        run_rows::<T, true, PF>(blk, rows, o)
                    } else {
                        run_rows::<T, false, PF>(blk, rows, o)
                    }
                };
                r0 = r1;
            }
        }

        /// Rows `a_rows` (at most [`MP`]) of a work item: the rows widened into the A buffer per
        /// K block, the weight rows widened per micro-panel into the B buffer, or (`INPLACE`,
        /// only when `k` is a multiple of `L`) read in place by [`micro_pb`].
        $(#[$attr])*
        unsafe fn run_rows<T: Element, const INPLACE: bool, const PF: bool>(
            blk: &Block<'_, T>,
            a_rows: &[usize],
            out: Out,
        ) {
            let (k, mb, nb) = (blk.k, a_rows.len(), blk.nb);
            let mut a_buf = MaybeUninit::<Aligned<{ MP * KS }>>::uninit();
            let mut b_buf = MaybeUninit::<Aligned<{ NR * KS }>>::uninit();
            let ap = a_buf.as_mut_ptr() as *mut f32;
            let bp = b_buf.as_mut_ptr() as *mut f32;
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let kcp = kc.div_ceil(L) * L;
                for (i, &r) in a_rows.iter().enumerate() {
                    // SAFETY: row i < MP of the A buffer, kcp <= KC floats; written before read.
                    let dst = unsafe { core::slice::from_raw_parts_mut(ap.add(i * KS), kcp) };
                    // SAFETY: same features as this function.
                    unsafe { widen(&blk.a[r * k + k0..r * k + k0 + kc], &mut dst[..kc]) };
                    dst[kc..].fill(0.0);
                }
                for (bi, b) in blk.b.iter().enumerate() {
                    let Some(b) = b else { continue };
                    let mut j = 0;
                    while j < nb {
                        let nr = NR.min(nb - j);
                        // In place: rows past nr repeat the first (their columns are never
                        // read).
                        let mut brow = [b[(blk.n0 + j) * k + k0..].as_ptr(); NR];
                        for jj in 0..NR {
                            if INPLACE {
                                if jj < nr {
                                    brow[jj] = b[(blk.n0 + j + jj) * k + k0..].as_ptr();
                                }
                                continue;
                            }
                            let row = bp.wrapping_add(jj * KS);
                            // SAFETY: row jj < NR of the B buffer, kcp <= KC floats.
                            let dst = unsafe { core::slice::from_raw_parts_mut(row, kcp) };
                            if jj < nr {
                                let at = (blk.n0 + j + jj) * k + k0;
                                // SAFETY: same features as this function.
                                unsafe { widen(&b[at..at + kc], &mut dst[..kc]) };
                                dst[kc..].fill(0.0);
                            } else {
                                dst.fill(0.0);
                            }
                        }
                        // The next panel's weight rows (this K block), fetched into L2 a
                        // slice per microkernel call so that its copy does not wait on memory;
                        // not where `micro_pb` fetches each in-place row ahead itself (`PF`):
                        // those rows are read there in turn, and the extra prefetches cost
                        // the few-rows items more than they saved (see `Tuning::AMD`).
                        let next = if INPLACE && PF { 0 } else { (nb - (j + nr).min(nb)).min(NR) };
                        let lines = kc.div_ceil(LINE);
                        let calls = mb.div_ceil(MRX);
                        let per = (next * lines).div_ceil(calls);
                        let mut i = 0;
                        while i < mb {
                            let q = i / MRX;
                            let (t0, t1) = (q * per, ((q + 1) * per).min(next * lines));
                            let row0 = b.as_ptr().wrapping_add((blk.n0 + j + nr) * k + k0);
                            for p in super::line_span(row0, k, LINE, lines, next, t0..t1) {
                                prefetch_l2(p);
                            }
                            let first = k0 == 0;
                            // SAFETY: rows i..i + m of the A buffer and all NR rows of the B
                            // buffer hold kcp initialized floats; the tile has room for NR
                            // columns from j (NB is a multiple of NR).
                            unsafe {
                                let a = ap.add(i * KS) as *const f32;
                                let c = out[bi].add(i * NB + j);
                                match ((mb - i).min(MRX), INPLACE) {
                                    (4, true) => micro_pb::<4, T, PF>(a, brow, kc, c, first),
                                    (3, true) => micro_pb::<3, T, PF>(a, brow, kc, c, first),
                                    (2, true) => micro_pb::<2, T, PF>(a, brow, kc, c, first),
                                    (_, true) => micro_pb::<1, T, PF>(a, brow, kc, c, first),
                                    (4, false) => micro::<4>(a, bp, kcp, c, first),
                                    (3, false) => micro::<3>(a, bp, kcp, c, first),
                                    (2, false) => micro::<2>(a, bp, kcp, c, first),
                                    (_, false) => micro::<1>(a, bp, kcp, c, first),
                                }
                            }
                            i += MRX;
                        }
                        j += NR;
                    }
                }
                k0 += KC;
            }
        }
    };
}

/// Portable kernels: 8-wide arrays.
mod generic {
    const L: usize = 8;
    const MRX: usize = super::MR;
    /// In-place weights: not measured on this instruction set (AVX2 on Zen 4 lost at 32
    /// rows per expert), so never.
    const INPLACE_MAX: usize = 0;
    type V = [f32; L];

    #[inline(always)]
    fn zero() -> V {
        [0.0; L]
    }
    /// Reads `L` floats at `p`.
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees `L` readable floats at `p`.
        unsafe { (p as *const V).read_unaligned() }
    }
    #[inline(always)]
    fn fma(a: V, b: V, mut c: V) -> V {
        for l in 0..L {
            c[l] += a[l] * b[l];
        }
        c
    }
    #[inline(always)]
    fn hsum(v: V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn hsum4(a: V, b: V, c: V, d: V) -> [f32; 4] {
        [hsum(a), hsum(b), hsum(c), hsum(d)]
    }
    #[inline(always)]
    unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_bits(s).to_f32();
        }
    }

    #[inline(always)]
    unsafe fn load_t<T: moe_core::Element>(p: *const T) -> V {
        let mut v = [0f32; L];
        for (l, x) in v.iter_mut().enumerate() {
            // SAFETY: the caller guarantees `L` readable elements at `p`.
            *x = unsafe { *p.add(l) }.to_f32();
        }
        v
    }
    #[inline(always)]
    fn prefetch(_p: *const u8) {}
    #[inline(always)]
    fn prefetch_l2(_p: *const u8) {}

    engine!();
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;
    const L: usize = 16;
    const MRX: usize = super::MR;
    /// Up to this many rows, work items read the weights in place (packed rows, `micro_pb`):
    /// measured faster than the in-place `run_direct` and the copying kernel on Zen 4, 2
    /// threads, interleaved, expert GEMMs f32: Qwen3 T=1 6.8 vs 9.7 ms, Mixtral T=1 46.6 vs
    /// 55.9, Qwen3 T=128 (8 rows per expert) 128 vs 153, Mixtral T=16 232 vs 264, DeepSeek-V3
    /// T=16 260 vs 297; and at 41-95 rows (in place vs copy, DeepSeek-V3 T=128 726 vs 761,
    /// Mixtral T=128 813 vs 852, Qwen3 T=1024 (64 rows) 481 vs 489; Mixtral T=256 (64) 1405 vs
    /// 1362 the other way, within this machine's noise).
    const INPLACE_MAX: usize = super::INPLACE_ROWS;
    type V = __m512;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero() -> V {
        _mm512_setzero_ps()
    }
    /// Reads 16 floats at `p`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 16 readable floats at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm512_fmadd_ps(a, b, c)
    }
    /// The lane sums of four vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn hsum4(a: V, b: V, c: V, d: V) -> [f32; 4] {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
        let x0 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let x1 = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        let (x0, x1) = (_mm512_castps_pd(x0), _mm512_castps_pd(x1));
        // Per 128-bit lane: [a, b, c, d] partial sums.
        let y = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x0, x1)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x0, x1)),
        );
        let lo = _mm512_castps512_ps256(y);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1));
        let z = _mm256_add_ps(lo, hi);
        let w = _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
        let mut r = [0f32; 4];
        // SAFETY: `r` holds 4 floats.
        unsafe { _mm_storeu_ps(r.as_mut_ptr(), w) };
        r
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: 16 halves readable and 16 floats writable at `i` (i + 16 <= n).
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
            i += 16;
        }
        for j in i..n {
            dst[j] = half::f16::from_bits(src[j]).to_f32();
        }
    }

    /// Reads 16 elements at `p`, widened.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,f16c,avx2")]
    unsafe fn load_t<T: moe_core::Element>(p: *const T) -> V {
        // SAFETY: the caller guarantees 16 readable elements at `p`.
        unsafe {
            match T::DTYPE {
                moe_core::DType::F32 => _mm512_loadu_ps(p as *const f32),
                moe_core::DType::BF16 => {
                    let h = _mm256_loadu_si256(p as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
                moe_core::DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            }
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn prefetch(p: *const u8) {
        // A prefetch never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }

    engine!(#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx2")]);

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn prefetch_l2(p: *const u8) {
        // A prefetch never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
    }

    use super::{KC_BC, MR_BC, NP_BC, Tuning};

    /// 16 floats of `src` from `at` (fewer than 16 left: the rest are zeros), widened.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn load16<T: Element>(src: &[T], at: usize) -> V {
        let n = src.len().saturating_sub(at).min(16);
        let m: __mmask16 = if n == 16 { 0xFFFF } else { ((1u32 << n) - 1) as __mmask16 };
        // SAFETY: masked-off lanes are not read; the `n` lanes read lie in `src`.
        unsafe {
            let p = src.as_ptr().add(at.min(src.len()));
            match T::DTYPE {
                DType::F32 => _mm512_maskz_loadu_ps(m, p as *const f32),
                DType::BF16 => {
                    let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
                DType::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)),
            }
        }
    }

    /// In-register transpose of a 16 × 16 block (`r[i]` lane `j` → `r[j]` lane `i`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose16(r: &mut [V; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // r[4i + q], 128-bit lane L: rows 4i..4i+3 of column 4L + q.
        for i in 0..4 {
            let (a, b) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 1]));
            let (c, d) = (_mm512_castps_pd(t[4 * i + 2]), _mm512_castps_pd(t[4 * i + 3]));
            r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
            r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
        }
        let mut o = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (x0, x1, x2, x3) = (r[q], r[4 + q], r[8 + q], r[12 + q]);
            let s0 = _mm512_shuffle_f32x4(x0, x1, 0x44);
            let s1 = _mm512_shuffle_f32x4(x0, x1, 0xEE);
            let s2 = _mm512_shuffle_f32x4(x2, x3, 0x44);
            let s3 = _mm512_shuffle_f32x4(x2, x3, 0xEE);
            o[q] = _mm512_shuffle_f32x4(s0, s2, 0x88);
            o[4 + q] = _mm512_shuffle_f32x4(s0, s2, 0xDD);
            o[8 + q] = _mm512_shuffle_f32x4(s1, s3, 0x88);
            o[12 + q] = _mm512_shuffle_f32x4(s1, s3, 0xDD);
        }
        *r = o;
    }

    /// Transposed results into the caller's tiles: `ct` holds, for each present B `bi`, a
    /// `[column][MB]` block at `ct + bi * NB * MB` whose columns below `cols` are written for
    /// rows below `mb` rounded up to 16; `out[bi]` receives rows `< mb`, columns `< nb`
    /// (rounded up to 16), 16 × 16 at a time. Columns from `cols` are read as zeros.
    ///
    /// # Safety
    /// `ct` as above (64-byte aligned); each `out[bi]` of a present B valid for writes of `mb`
    /// rows of [`NB`] floats; `mb <= MB`, `nb <= NB`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn ct_to_tiles(
        ct: *const f32,
        present: [bool; 2],
        out: Out,
        mb: usize,
        nb: usize,
        cols: usize,
    ) {
        for (bi, o) in out.iter().enumerate() {
            if !present[bi] {
                continue;
            }
            let cb = ct.wrapping_add(bi * NB * super::MB);
            for g in 0..mb.div_ceil(16) {
                // Only the rows < mb: a kernel may leave the lanes past them unwritten.
                let live = (mb - g * 16).min(16);
                let m: __mmask16 = if live == 16 { 0xFFFF } else { (1u16 << live) - 1 };
                let mut j = 0;
                while j < nb {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (jj, v) in r.iter_mut().enumerate() {
                        if j + jj < cols {
                            // SAFETY: column j + jj < cols, rows g * 16.. < mb of the written
                            // block (the caller's contract; masked to them); 64-byte aligned.
                            *v = unsafe {
                                _mm512_maskz_load_ps(m, cb.add((j + jj) * super::MB + g * 16))
                            };
                        }
                    }
                    transpose16(&mut r);
                    for (i, v) in r.iter().enumerate().take(mb - g * 16) {
                        // SAFETY: row g * 16 + i < mb, columns j..j + 16 <= NB (NB is a
                        // multiple of 16) of the caller's tile.
                        unsafe { _mm512_storeu_ps(o.add((g * 16 + i) * NB + j), *v) };
                    }
                    j += 16;
                }
            }
        }
    }

    /// `c[i * NB + j] (+)= sum_{k < kc} a[i * KSB + k] bt[k * 32 + j]` for `i < M`, `j < 32`:
    /// `a` holds packed rows, `bt` a transposed weight panel.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn micro_bc<const M: usize>(
        a: *const f32,
        bt: *const f32,
        kc: usize,
        c: *mut f32,
        first: bool,
    ) {
        // SAFETY: the caller passes M packed rows of kc floats at stride KSB, a transposed panel of
        // kc × 32 floats (64-byte aligned rows), and a tile with M rows of NB >= 32 columns
        // from `c`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            let mut ak = a;
            let mut bk = bt;
            for _ in 0..kc {
                let b0 = _mm512_load_ps(bk);
                let b1 = _mm512_load_ps(bk.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ak.add(i * KSB));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
                ak = ak.add(1);
                bk = bk.add(NP_BC);
            }
            for (i, row) in acc.iter().enumerate() {
                let cr = c.add(i * NB);
                if first {
                    _mm512_storeu_ps(cr, row[0]);
                    _mm512_storeu_ps(cr.add(16), row[1]);
                } else {
                    _mm512_storeu_ps(cr, _mm512_add_ps(_mm512_loadu_ps(cr), row[0]));
                    _mm512_storeu_ps(
                        cr.add(16),
                        _mm512_add_ps(_mm512_loadu_ps(cr.add(16)), row[1]),
                    );
                }
            }
        }
    }

    /// Row stride of the broadcast kernel's A buffer (a K block plus one cache line, so that
    /// the rows a microkernel reads do not map to the same L1 set).
    const KSB: usize = KC_BC + 16;

    /// One work item: the broadcast kernel from [`super::BC_MIN_ROWS`] rows, the dot-product
    /// kernels below.
    ///
    /// # Safety
    /// As [`super::run_block`], on a CPU with the features below.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx2")]
    pub(crate) unsafe fn run_block_any<T: Element>(
        blk: &Block<'_, T>,
        out: Out,
        tuning: Tuning,
        assist: Option<&mut dyn super::Assist>,
    ) {
        use super::Avx512Kernel as K;
        let m = blk.a_rows.len();
        // SAFETY: same features; the caller's contract (the weight-broadcast and few-rows
        // kernels are chosen only for K > 0, the in-place one only where K is a multiple of L).
        unsafe {
            match super::avx512_kernel(tuning, m, blk.k) {
                K::Wb if tuning.wb_narrow => {
                    super::wb::run_block::<T, { super::wb::NJ_NARROW }>(blk, out, tuning, assist)
                }
                K::Wb => {
                    super::wb::run_block::<T, { super::wb::NJ_WIDE }>(blk, out, tuning, assist)
                }
                K::Bc => run_block_bc(blk, out),
                K::Direct => run_direct(blk, out),
                K::Rows(inplace) if tuning.inplace_prefetch => {
                    run_row_blocks::<T, true>(blk, out, inplace)
                }
                K::Rows(inplace) => run_row_blocks::<T, false>(blk, out, inplace),
            }
        }
    }

    /// One work item with the broadcast kernel (at least [`super::BC_MIN_ROWS`] rows). Per K
    /// block of [`KC_BC`], the item's rows are copied (widened) once into a buffer at row
    /// stride [`KSB`] (L2); for each present B, every 32-column weight panel of the item is
    /// transposed into `[k][32]` (16 × 16 in-register transposes; L2), and each [`MR_BC`]-row
    /// group (L1) then runs against all the panels while the next K block's weight rows are
    /// fetched into L2.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx2")]
    pub(crate) unsafe fn run_block_bc<T: Element>(blk: &Block<'_, T>, out: Out) {
        let (k, mb, nb) = (blk.k, blk.a_rows.len(), blk.nb);
        if k == 0 {
            // SAFETY: same features; the dot-product path handles K = 0.
            unsafe { run_block(blk, out) };
            return;
        }
        let mut a_buf = MaybeUninit::<Aligned<{ super::MB * KSB }>>::uninit();
        let mut bt_buf = MaybeUninit::<Aligned<{ KC_BC * NB }>>::uninit();
        let ap = a_buf.as_mut_ptr() as *mut f32;
        let bt = bt_buf.as_mut_ptr() as *mut f32;
        let panels = nb.div_ceil(NP_BC);
        let groups = mb.div_ceil(MR_BC);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC_BC.min(k - k0);
            let kcp = kc.div_ceil(16) * 16;
            let first = k0 == 0;
            // Copy (widen) the rows, zero-padded to kcp, at stride KSB.
            for (i, &r) in blk.a_rows.iter().enumerate() {
                // SAFETY: row i < MB of the A buffer, kcp <= KSB floats; written before read.
                let dst = unsafe { core::slice::from_raw_parts_mut(ap.add(i * KSB), kcp) };
                // SAFETY: same features as this function.
                unsafe { widen(&blk.a[r * k + k0..r * k + k0 + kc], &mut dst[..kc]) };
                dst[kc..].fill(0.0);
            }
            for (bi, b) in blk.b.iter().enumerate() {
                let Some(b) = b else { continue };
                for p in 0..panels {
                    // Transpose the weight rows n0 + 32p.. (zero rows past nb) into panel p,
                    // [kcp][32].
                    let btp = bt.wrapping_add(p * KC_BC * NP_BC);
                    for gg in 0..2 {
                        let j0 = p * NP_BC + gg * 16;
                        let mut c = 0;
                        let full_rows = j0 + 16 <= nb;
                        let row0 = b.as_ptr().wrapping_add((blk.n0 + j0) * k + k0);
                        while c < kcp {
                            let mut r = [_mm512_setzero_ps(); 16];
                            if full_rows && c + 16 <= kc {
                                // 16 whole rows, 16 whole columns: plain loads, one row
                                // pointer stepped by k.
                                let mut p = row0.wrapping_add(c);
                                for v in r.iter_mut() {
                                    // SAFETY: same features; rows n0 + j0 + jj < n0 + nb and
                                    // columns k0 + c + 16 <= k0 + kc lie in the caller's
                                    // matrix (its contract).
                                    *v = unsafe { load_t(p) };
                                    p = p.wrapping_add(k);
                                }
                            } else {
                                for (jj, v) in r.iter_mut().enumerate() {
                                    if j0 + jj < nb {
                                        let at = (blk.n0 + j0 + jj) * k + k0;
                                        // SAFETY: same features; reads stay in the row's kc
                                        // floats.
                                        *v = unsafe { load16(&b[at..at + kc], c) };
                                    }
                                }
                            }
                            transpose16(&mut r);
                            for (kk, v) in r.iter().enumerate() {
                                // SAFETY: panel p < NB / 32, row c + kk < kcp <= KC_BC,
                                // columns gg*16..gg*16+16: inside the buffer, 64-byte aligned.
                                unsafe { _mm512_store_ps(btp.add((c + kk) * NP_BC + gg * 16), *v) };
                            }
                            c += 16;
                        }
                    }
                }
                // The next K block of these weight rows, fetched into L2 a slice per
                // microkernel call so that its transposition does not wait on memory.
                let next_kc = KC_BC.min(k - (k0 + kc).min(k));
                let lines = next_kc.div_ceil(16);
                let per = (nb * lines).div_ceil(groups * panels);
                // Each micro-panel of rows stays in L1 while the weight panels stream from L2.
                for g in 0..groups {
                    let i = g * MR_BC;
                    for p in 0..panels {
                        let q = g * panels + p;
                        let span = q * per..((q + 1) * per).min(nb * lines);
                        let row0 = b.as_ptr().wrapping_add(blk.n0 * k + k0 + kc);
                        for p in super::line_span(row0, k, 16, lines, nb, span) {
                            prefetch_l2(p);
                        }
                        // SAFETY: rows i..i + M of the A buffer hold kc floats; panel p kc rows of 32;
                        // the caller's tile has room for 32 columns from p * 32 of rows i..
                        // (NB is a multiple of 32).
                        unsafe {
                            let a = ap.add(i * KSB) as *const f32;
                            let c = out[bi].add(i * NB + p * NP_BC);
                            let bt = bt.add(p * KC_BC * NP_BC) as *const f32;
                            match (mb - i).min(MR_BC) {
                                12 => micro_bc::<12>(a, bt, kc, c, first),
                                11 => micro_bc::<11>(a, bt, kc, c, first),
                                10 => micro_bc::<10>(a, bt, kc, c, first),
                                9 => micro_bc::<9>(a, bt, kc, c, first),
                                8 => micro_bc::<8>(a, bt, kc, c, first),
                                7 => micro_bc::<7>(a, bt, kc, c, first),
                                6 => micro_bc::<6>(a, bt, kc, c, first),
                                5 => micro_bc::<5>(a, bt, kc, c, first),
                                4 => micro_bc::<4>(a, bt, kc, c, first),
                                3 => micro_bc::<3>(a, bt, kc, c, first),
                                2 => micro_bc::<2>(a, bt, kc, c, first),
                                _ => micro_bc::<1>(a, bt, kc, c, first),
                            }
                        }
                    }
                }
            }
            k0 += KC_BC;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;
    const L: usize = 8;
    const MRX: usize = 2;
    /// In-place weights: never. They lose at every point below the broadcast kernel, on Zen 4
    /// in AVX2 mode (32 rows per expert) and on Zen 3 (expert GEMMs, 2 threads, copy vs in
    /// place: Mixtral T=16 408 vs 538 ms, T=128 1185 vs 2501; DeepSeek-V3 T=128 1029 vs 1896;
    /// Qwen3 T=128 217 vs 255).
    const INPLACE_MAX: usize = 0;
    type V = __m256;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zero() -> V {
        _mm256_setzero_ps()
    }
    /// Reads 8 floats at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 8 readable floats at `p`.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    /// The lane sums of four vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum4(a: V, b: V, c: V, d: V) -> [f32; 4] {
        let x0 = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let x1 = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        let (x0, x1) = (_mm256_castps_pd(x0), _mm256_castps_pd(x1));
        let y = _mm256_add_ps(
            _mm256_castpd_ps(_mm256_unpacklo_pd(x0, x1)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(x0, x1)),
        );
        let w = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
        let mut r = [0f32; 4];
        // SAFETY: `r` holds 4 floats.
        unsafe { _mm_storeu_ps(r.as_mut_ptr(), w) };
        r
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: 8 halves readable and 8 floats writable at `i` (i + 8 <= n).
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_bits(src[j]).to_f32();
        }
    }

    /// Reads 8 elements at `p`, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_t<T: moe_core::Element>(p: *const T) -> V {
        // SAFETY: the caller guarantees 8 readable elements at `p`.
        unsafe {
            match T::DTYPE {
                moe_core::DType::F32 => _mm256_loadu_ps(p as *const f32),
                moe_core::DType::BF16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
                moe_core::DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch(p: *const u8) {
        // A prefetch never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_l2(p: *const u8) {
        // A prefetch never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
    }

    engine!(#[target_feature(enable = "avx2,fma,f16c")]);

    /// Rows of the AVX2 broadcast kernel's register tile (6 × 16: 12 accumulators, two weight
    /// vectors and one broadcast in 16 registers).
    const MR2: usize = 6;
    /// Columns of a transposed weight panel (two 8-lane vectors).
    const NP2: usize = 16;
    /// K block of the AVX2 broadcast kernel: a 6-row micro-panel (6 KiB) and one weight panel
    /// (16 KiB) stay in L1, the item's panels (192 KiB) and rows (272 KiB) in L2.
    const KC2: usize = 256;
    /// Row stride of the A buffer (a K block plus one cache line: no 4 KiB aliasing between
    /// the six rows a microkernel reads).
    const KSB2: usize = KC2 + 16;

    const _: () = assert!(NB.is_multiple_of(NP2) && KC2.is_multiple_of(8) && KC2 <= KC);

    /// 8 elements of `src` from `at` (fewer left: the rest are zeros), widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<T: Element>(src: &[T], at: usize) -> V {
        if at + 8 <= src.len() {
            // SAFETY: 8 readable elements at `at`.
            return unsafe { load_t(src.as_ptr().add(at)) };
        }
        let mut tmp = [0f32; 8];
        for (d, s) in tmp.iter_mut().zip(src.iter().skip(at)) {
            *d = s.to_f32();
        }
        // SAFETY: `tmp` holds 8 floats.
        unsafe { _mm256_loadu_ps(tmp.as_ptr()) }
    }

    /// In-register transpose of an 8 × 8 block (`r[i]` lane `j` → `r[j]` lane `i`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(r: &mut [V; 8]) {
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // s[4h + q], 128-bit lane L: rows 4h..4h+3 of column 4L + q.
        let mut q4 = [_mm256_setzero_ps(); 8];
        for h in 0..2 {
            let (a, b, c, d) = (t[4 * h], t[4 * h + 1], t[4 * h + 2], t[4 * h + 3]);
            q4[4 * h] = _mm256_shuffle_ps::<0x44>(a, c);
            q4[4 * h + 1] = _mm256_shuffle_ps::<0xEE>(a, c);
            q4[4 * h + 2] = _mm256_shuffle_ps::<0x44>(b, d);
            q4[4 * h + 3] = _mm256_shuffle_ps::<0xEE>(b, d);
        }
        for q in 0..4 {
            r[q] = _mm256_permute2f128_ps::<0x20>(q4[q], q4[4 + q]);
            r[4 + q] = _mm256_permute2f128_ps::<0x31>(q4[q], q4[4 + q]);
        }
    }

    /// `c[i * NB + j] (+)= sum_{k < kc} a[i][k] bt[k * 16 + j]` for `i < M`, `j < 16`: `a`
    /// holds row pointers (copied or in place), `bt` a transposed weight panel.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro_bc<const M: usize>(
        a: [*const f32; MR2],
        bt: *const f32,
        kc: usize,
        c: *mut f32,
        first: bool,
    ) {
        // SAFETY: the caller passes M row pointers to kc floats each, a transposed
        // panel of kc × 16 floats (32-byte aligned rows), and a tile with M rows of NB >= 16
        // columns from `c`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            let mut bk = bt;
            for kk in 0..kc {
                let b0 = _mm256_load_ps(bk);
                let b1 = _mm256_load_ps(bk.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a[i].add(kk));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
                bk = bk.add(NP2);
            }
            for (i, row) in acc.iter().enumerate() {
                let cr = c.add(i * NB);
                if first {
                    _mm256_storeu_ps(cr, row[0]);
                    _mm256_storeu_ps(cr.add(8), row[1]);
                } else {
                    _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), row[0]));
                    _mm256_storeu_ps(cr.add(8), _mm256_add_ps(_mm256_loadu_ps(cr.add(8)), row[1]));
                }
            }
        }
    }

    /// One work item: the broadcast kernel from [`super::BC_MIN_ROWS`] rows, the dot-product
    /// kernels below.
    ///
    /// # Safety
    /// As [`super::run_block`], on a CPU with the features below.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn run_block_any<T: Element>(blk: &Block<'_, T>, out: Out) {
        // SAFETY: same features; the caller's contract.
        unsafe {
            if blk.k > 0 && blk.a_rows.len() >= super::BC_MIN_ROWS {
                run_block_bc(blk, out)
            } else {
                run_block(blk, out)
            }
        }
    }

    /// Weight rows `n0 + 16p..` (zero rows past `nb`) of K block `k0..k0 + kc` into the
    /// panel at `btp`, `[kcp][16]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn transpose_panel<T: Element>(
        b: &[T],
        blk: &Block<'_, T>,
        k0: usize,
        kc: usize,
        kcp: usize,
        p: usize,
        btp: *mut f32,
    ) {
        let (k, nb) = (blk.k, blk.nb);
        for gg in 0..2 {
            let j0 = p * NP2 + gg * 8;
            let mut c = 0;
            while c < kcp {
                let mut r = [_mm256_setzero_ps(); 8];
                for (jj, v) in r.iter_mut().enumerate() {
                    if j0 + jj < nb {
                        let at = (blk.n0 + j0 + jj) * k + k0;
                        // SAFETY: same features; reads stay in the row's kc values.
                        *v = unsafe { load8(&b[at..at + kc], c) };
                    }
                }
                transpose8(&mut r);
                for (kk, v) in r.iter().enumerate() {
                    // SAFETY: panel p < NB / 16, row c + kk < kcp <= KC2, columns
                    // gg*8..gg*8+8: inside the buffer, 32-byte aligned.
                    unsafe { _mm256_store_ps(btp.add((c + kk) * NP2 + gg * 8), *v) };
                }
                c += 8;
            }
        }
    }

    /// One work item with the broadcast kernel (K > 0). Per K block of [`KC2`], the item's
    /// rows are copied (widened) once into the A buffer (L2; f32 rows are read in place),
    /// every 16-column weight panel is transposed (widened) into `[k][16]` (8 × 8 in-register
    /// transposes; L2), and each [`MR2`]-row group (L1) runs against all the panels; the next K
    /// block's weight rows are fetched into L2 meanwhile, a slice per microkernel call.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_block_bc<T: Element>(blk: &Block<'_, T>, out: Out) {
        let (k, mb, nb) = (blk.k, blk.a_rows.len(), blk.nb);
        let mut a_buf = MaybeUninit::<Aligned<{ super::MB * KSB2 }>>::uninit();
        let mut bt_buf = MaybeUninit::<Aligned<{ KC2 * NB }>>::uninit();
        let ap = a_buf.as_mut_ptr() as *mut f32;
        let bt = bt_buf.as_mut_ptr() as *mut f32;
        let panels = nb.div_ceil(NP2);
        let groups = mb.div_ceil(MR2);
        // f32 rows are read in place (no copy; expert GEMMs, 2 threads, interleaved, best of
        // 2-5 rounds, in place vs copy: Mixtral T=1024 5699 / 6107 / 6094 vs 6191 / 6385 / 6103
        // ms, gpt-oss T=1024 2139 / 1993 / 1781 vs 2272 / 1901 / 1857, DeepSeek-V3 T=1024 7569
        // vs 7607); the next row group's rows are fetched into L1 meanwhile, a row per panel
        // call.
        let inplace = T::DTYPE == DType::F32;
        let mut k0 = 0;
        while k0 < k {
            let kc = KC2.min(k - k0);
            let kcp = kc.div_ceil(8) * 8;
            let first = k0 == 0;
            if !inplace {
                for (i, &r) in blk.a_rows.iter().enumerate() {
                    // SAFETY: row i < MB of the A buffer, kc <= KSB2 floats; written before read.
                    let dst = unsafe { core::slice::from_raw_parts_mut(ap.add(i * KSB2), kc) };
                    // SAFETY: same features as this function.
                    unsafe { widen(&blk.a[r * k + k0..r * k + k0 + kc], dst) };
                }
            }
            for (bi, b) in blk.b.iter().enumerate() {
                let Some(b) = b else { continue };
                for p in 0..panels {
                    // SAFETY: panel p of the buffer (p < NB / 16); same features.
                    unsafe {
                        transpose_panel(b, blk, k0, kc, kcp, p, bt.wrapping_add(p * KC2 * NP2))
                    };
                }
                let next_kc = KC2.min(k - (k0 + kc).min(k));
                let lines = next_kc.div_ceil(LINE);
                let per = (nb * lines).div_ceil(groups * panels);
                for g in 0..groups {
                    let i = g * MR2;
                    // The group's row pointers: rows of the A buffer, or (in place, f32) A rows
                    // from k0; rows past mb repeat the last row (their results are not stored).
                    let mut a = [ap as *const f32; MR2];
                    for (ii, pa) in a.iter_mut().enumerate() {
                        let row = (i + ii).min(mb - 1);
                        *pa = if inplace {
                            (blk.a.as_ptr() as *const f32).wrapping_add(blk.a_rows[row] * k + k0)
                        } else {
                            ap.wrapping_add(row * KSB2)
                        };
                    }
                    for p in 0..panels {
                        let q = g * panels + p;
                        let span = q * per..((q + 1) * per).min(nb * lines);
                        let row0 = b.as_ptr().wrapping_add(blk.n0 * k + k0 + kc);
                        for p in super::line_span(row0, k, LINE, lines, nb, span) {
                            prefetch_l2(p);
                        }
                        // SAFETY: the M row pointers address kc floats each: rows of the A
                        // buffer, or (in place, f32) A rows from k0 (k0 + kc <= k; the caller
                        // checked the rows); panel p holds kc rows of 16; the caller's tile has
                        // room for 16 columns from p * 16 of rows i.. (NB is a multiple of 16).
                        unsafe {
                            if inplace && p < MR2 && g + 1 < groups {
                                let row = (i + MR2 + p).min(mb - 1);
                                let src =
                                    (blk.a.as_ptr() as *const f32).add(blk.a_rows[row] * k + k0);
                                for l in 0..kc.div_ceil(16) {
                                    prefetch(src.wrapping_add(l * 16) as *const u8);
                                }
                            }
                            let c = out[bi].add(i * NB + p * NP2);
                            let bt = bt.add(p * KC2 * NP2) as *const f32;
                            match (mb - i).min(MR2) {
                                6 => micro_bc::<6>(a, bt, kc, c, first),
                                5 => micro_bc::<5>(a, bt, kc, c, first),
                                4 => micro_bc::<4>(a, bt, kc, c, first),
                                3 => micro_bc::<3>(a, bt, kc, c, first),
                                2 => micro_bc::<2>(a, bt, kc, c, first),
                                _ => micro_bc::<1>(a, bt, kc, c, first),
                            }
                        }
                    }
                }
            }
            k0 += KC2;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;
    const L: usize = 4;
    const MRX: usize = super::MR;
    /// In-place weights: not measured on this instruction set (AVX2 on Zen 4 lost at 32
    /// rows per expert), so never.
    const INPLACE_MAX: usize = 0;
    type V = float32x4_t;

    #[inline]
    #[target_feature(enable = "neon")]
    fn zero() -> V {
        vdupq_n_f32(0.0)
    }
    /// Reads 4 floats at `p`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 4 readable floats at `p`.
        unsafe { vld1q_f32(p) }
    }
    #[inline]
    #[target_feature(enable = "neon")]
    fn fma(a: V, b: V, c: V) -> V {
        vfmaq_f32(c, a, b)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    fn hsum4(a: V, b: V, c: V, d: V) -> [f32; 4] {
        let s = vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
        let mut r = [0f32; 4];
        // SAFETY: `r` holds 4 floats.
        unsafe { vst1q_f32(r.as_mut_ptr(), s) };
        r
    }
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_bits(s).to_f32();
        }
    }

    /// Reads 4 elements at `p`, widened.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load_t<T: moe_core::Element>(p: *const T) -> V {
        let mut v = [0f32; L];
        for (l, x) in v.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 4 readable elements at `p`.
            *x = unsafe { *p.add(l) }.to_f32();
        }
        // SAFETY: `v` holds 4 floats.
        unsafe { vld1q_f32(v.as_ptr()) }
    }
    #[inline]
    fn prefetch(_p: *const u8) {}
    #[inline(always)]
    fn prefetch_l2(_p: *const u8) {}

    engine!(#[target_feature(enable = "neon")]);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The prefetch walk visits exactly the lines of the per-line division it replaced, in the
    /// same order, for spans that start mid-row, wrap over the rows, or are empty.
    #[test]
    fn line_span_walks_the_lines_of_the_division() {
        let base = 1000usize as *const f32;
        for (lines, rows) in [(1, 1), (3, 2), (16, 6), (7, 5), (0, 4), (5, 0)] {
            for start in 0..2 * lines * rows + 2 {
                for len in [0, 1, lines + 1, 3 * lines * rows + 1] {
                    let span = start..start + len;
                    let got: Vec<usize> = line_span(base, 100, 16, lines, rows, span.clone())
                        .map(|p| p as usize)
                        .collect();
                    let want: Vec<usize> = if lines == 0 || rows == 0 {
                        vec![]
                    } else {
                        span.map(|t| 1000 + 4 * (((t / lines) % rows) * 100 + (t % lines) * 16))
                            .collect()
                    };
                    assert_eq!(got, want, "lines {lines} rows {rows} span from {start}, {len}");
                }
            }
        }
    }

    /// Test inputs: `(m + 3) * k` A elements (the item's `m` rows scattered among them, as the
    /// expert GEMMs read them) and two `nb * k` weight matrices, none of them zero.
    fn inputs(m: usize, k: usize, nb: usize) -> (Vec<f32>, Vec<usize>, [Vec<f32>; 2]) {
        let v = |i: usize| ((i * 7919) % 23) as f32 * 0.03 - 0.3;
        let a = (0..(m + 3) * k).map(v).collect();
        let rows = (0..m).map(|i| (i * 5 + 1) % (m + 3)).collect();
        let b = [5, 11].map(|o| (0..nb * k).map(|i| v(i + o)).collect());
        (a, rows, b)
    }

    /// Run the item `a_rows` × `b` (columns `0..nb`) with `isa` and `tuning` into tiles
    /// poisoned with NaN; `packed` as [`Block::packed`].
    ///
    /// # Panics
    /// If `isa` is not available.
    fn run_item<T: Element>(
        isa: Isa,
        tuning: Tuning,
        a: &[T],
        a_rows: &[usize],
        k: usize,
        b: [Option<&[T]>; 2],
        nb: usize,
        packed: Option<(RowPack, &[f32])>,
    ) -> Box<Tiles> {
        assert!(isa.available() && a_rows.len() <= MB && nb <= NB);
        assert!(a_rows.iter().all(|&r| (r + 1) * k <= a.len()));
        assert!(b.iter().flatten().all(|b| nb * k <= b.len()));
        let mut t: Box<Tiles> = Box::new([[f32::NAN; MB * NB]; 2]);
        let blk = Block { a, a_rows, k, b, n0: 0, nb, packed };
        let out = [t[0].as_mut_ptr(), t[1].as_mut_ptr()];
        // SAFETY: MB rows of NB floats per tile; `isa` is available and A and B hold every row
        // read (asserted above).
        unsafe { run_block(isa, tuning, &blk, out) };
        t
    }

    /// `tile`'s rows (those of `a_rows`) and columns `0..nb` within rounding of f32 sums of
    /// the item's products, computed in double precision.
    fn check_double_sums(
        tile: &[f32],
        a: &[f32],
        a_rows: &[usize],
        k: usize,
        b: &[f32],
        nb: usize,
        what: &str,
    ) {
        for (i, &row) in a_rows.iter().enumerate() {
            for j in 0..nb {
                let (mut s, mut mag) = (0f64, 0f64);
                for x in 0..k {
                    let p = a[row * k + x] as f64 * b[j * k + x] as f64;
                    s += p;
                    mag += p.abs();
                }
                let got = tile[i * NB + j] as f64;
                assert!((got - s).abs() <= 1e-6 * mag, "{what} row {i} column {j}: {got} vs {s}");
            }
        }
    }

    /// Rows packed ahead give the kernels the same bits as rows they pack themselves, and the
    /// kernels do read them (NaN-poisoned packed rows poison the results) wherever
    /// [`row_pack`] names a layout. Returns how many items took packed rows.
    fn packed_rows_match<T: Element>(isa: Isa, tuning: Tuning) -> usize {
        let mut used = 0;
        let nb = 40;
        for k in [2usize, 31, 64, 300, 1030] {
            for m in [1usize, 7, 8, 9, 16, 17, 31, 33, 48, 83, 100, 256] {
                let (a, rows, b) = inputs(m, k, nb);
                let widen = |x: &[f32]| x.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
                let (a, b) = (widen(&a), b.map(|b| widen(&b)));
                let run = |packed: Option<(RowPack, &[f32])>| {
                    let b = [Some(&b[0][..]), Some(&b[1][..])];
                    let t = run_item(isa, tuning, &a, &rows, k, b, nb, packed);
                    let mut r = vec![];
                    for tile in t.iter() {
                        for i in 0..m {
                            r.extend(tile[i * NB..i * NB + nb].iter().map(|x| x.to_bits()));
                        }
                    }
                    r
                };
                let Some(p) = row_pack(isa, tuning, T::DTYPE, m, k) else { continue };
                let mut buf = vec![Aligned([f32::NAN; 16]); p.len(m, k).div_ceil(16)];
                let dst = buf.as_mut_ptr() as *mut f32;
                // SAFETY: `row_pack` chose the layout for this available instruction set; the
                // buffer holds p.len(m, k) floats, 64-byte aligned; the rows lie in `a`.
                unsafe { pack_rows(isa, p, &a, &rows, k, 0..m.div_ceil(16), dst) };
                let len = p.len(m, k);
                // SAFETY: the buffer holds `len` floats.
                let packed = unsafe { core::slice::from_raw_parts(dst as *const f32, len) };
                let what = format!("{isa:?} {tuning:?} {:?} m={m} k={k}", T::DTYPE);
                assert!(run(None) == run(Some((p, packed))), "{what}: other bits");
                for x in buf.iter_mut() {
                    x.0 = [f32::NAN; 16];
                }
                // SAFETY: as above.
                let poisoned = unsafe { core::slice::from_raw_parts(dst as *const f32, len) };
                let r = run(Some((p, poisoned)));
                // Every row the layout packs reads them (the f32 kernel's last rows may run
                // as dot products on the rows in place).
                let packed_rows = p.rows(m);
                assert!(
                    r.chunks(nb * m)
                        .flat_map(|t| &t[..nb * packed_rows])
                        .all(|&x| f32::from_bits(x).is_nan()),
                    "{what}: packed rows unused"
                );
                used += 1;
            }
        }
        used
    }

    /// The weight-broadcast kernel's dot-product rows (1-7 past 16 or 32 tiled rows, 12 and 8
    /// weight rows per stripe, a partial last stripe, K over one and two A blocks and a partial
    /// chunk) against double-precision sums.
    #[test]
    fn dot_product_rows_match_double_sums() {
        if !Isa::Avx512.available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let wide = Tuning { wb_narrow: false, wb_half: false, wb_dot_rows: 7, ..Tuning::INTEL };
        let narrow = Tuning { wb_narrow: true, ..wide };
        let nb = 40;
        for tuning in [wide, narrow] {
            for k in [31usize, 300, 2100] {
                for m in (17..=23).chain(33..=39) {
                    assert!(tiled_rows(m, false, 7) < m);
                    let (a, rows, [b0, _]) = inputs(m, k, nb);
                    let b = [Some(&b0[..]), None];
                    let t = run_item(Isa::Avx512, tuning, &a, &rows, k, b, nb, None);
                    let what = format!("{tuning:?} m={m} k={k}");
                    check_double_sums(&t[0], &a, &rows, k, &b0, nb, &what);
                }
            }
        }
    }

    /// An item's last two row tiles run as one 3-vector register tile ([`Tuning::wb_fuse`]):
    /// the same bits as the two tiles apart, and within rounding of double-precision sums
    /// (with dot-product rows after the tiles, a partial last stripe, K over one and two A
    /// blocks and a partial chunk).
    #[test]
    fn fused_row_tiles_give_the_same_bits() {
        if !Isa::Avx512.available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let fused = Tuning { wb_narrow: true, wb_half: false, wb_fuse: true, ..Tuning::INTEL };
        let apart = Tuning { wb_fuse: false, ..fused };
        for nb in [40usize, 48] {
            for k in [31usize, 300, 2100] {
                for m in [33usize, 40, 47, 48, 51, 55, 80, 90, 112] {
                    let (a, rows, b) = inputs(m, k, nb);
                    let run = |tuning| {
                        let bs = [Some(&b[0][..]), Some(&b[1][..])];
                        run_item(Isa::Avx512, tuning, &a, &rows, k, bs, nb, None)
                    };
                    let (f, p) = (run(fused), run(apart));
                    for bi in 0..2 {
                        let at = format!("m={m} k={k} nb={nb} B{bi}");
                        for i in 0..m {
                            let (got, other) = (&f[bi][i * NB..][..nb], &p[bi][i * NB..][..nb]);
                            let same =
                                got.iter().zip(other).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{at} row {i}: other bits");
                        }
                        check_double_sums(&f[bi], &a, &rows, k, &b[bi], nb, &at);
                    }
                }
            }
        }
    }

    #[test]
    fn rows_packed_ahead_give_the_same_bits() {
        let mut used = 0;
        for isa in
            Isa::all_available().filter(|i| matches!(i, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx))
        {
            for tuning in [Tuning::AMD, Tuning::INTEL, Tuning::ALL_WB] {
                used += packed_rows_match::<f32>(isa, tuning);
                used += packed_rows_match::<half::bf16>(isa, tuning);
                used += packed_rows_match::<half::f16>(isa, tuning);
            }
        }
        if Isa::Avx512.available() {
            assert!(used > 0, "no item took packed rows");
        } else {
            eprintln!("skipped: no AVX-512 on this CPU, no kernel takes packed rows");
        }
        println!("{used} items took rows packed ahead");
    }
}

//! bf16 work items on AVX512-BF16 (`vdpbf16ps`: pairs of bf16 products summed into f32 lanes).
//!
//! # Why
//!
//! The AVX-512 kernels widen bf16 operands to f32 and run one f32 FMA per product; `vdpbf16ps`
//! multiplies 32 bf16 pairs per instruction into 16 f32 lanes, twice the products per
//! instruction, and reads both operands as they are stored (no widening, half the bytes per
//! vector). CPUs with AVX512-BF16 but no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake)
//! run their bf16 GEMMs here; see [`super::Isa::Avx512Bf16`].
//!
//! # Kernels
//!
//! Chosen by the item's rows. All but the last are dot-product kernels (16-lane accumulators
//! along K, reduced horizontally at the end), the shape of the AVX-512 dot-product kernels:
//!
//! * up to [`SEQ_ROWS`] rows (decode): each weight row over its whole K, one or four rows at a
//!   time ([`super::Tuning::seq_streams`]: so many sequential streams per thread), four
//!   accumulators per activation row and weight row, read in place (where
//!   [`super::Tuning::seq_prefetch`] says so with one L2 prefetch per weight line [`L2_AHEAD`]
//!   bytes ahead on each stream), the K tail read with masked loads (zeros past the end);
//! * more rows: per K block the item's rows are copied once into an aligned `[MP][KSH]` buffer
//!   (zero-padded to a multiple of 32), and an `MR × NR` dot tile runs against each micro-panel
//!   of [`NR`] weight rows, the next micro-panel's weight rows prefetched into L2 meanwhile, a
//!   slice per microkernel call. When K is a multiple of 32 the weight rows are read in place
//!   ([`micro_pb`], with the same prefetch ahead on each row); otherwise each micro-panel is
//!   first copied into an aligned, zero-padded `[NR][KSH]` buffer (L1). The copy, a third of
//!   the GEMM time at 32 rows in `perf`, lost everywhere it could be compared (this machine,
//!   2 threads, interleaved, expert GEMMs, in place vs copy: Qwen3 T=128 (8 rows per expert)
//!   63.5 vs 100.7 ms, gpt-oss T=128 (16) 125.5 vs 168.3, Mixtral T=128 (32) 384 vs 470,
//!   DeepSeek-V3 T=128 331 vs 413, Mixtral T=256 (64) 695 vs 743, DeepSeek-V3 T=256 578 vs
//!   664, Qwen3 T=1024 (64) 272 vs 285, gpt-oss T=512 (64) 325 vs 335);
//! * from [`BC_ROWS`] rows: the broadcast kernel ([`run_bc`]): weights packed as pairs
//!   `[k/2][NP][2]`, activation pairs broadcast from the rows in place, no horizontal sums;
//! * rows in [`super::Tuning::dpwb_rows`] (AMD: from 8) and K even, before all of the above: the
//!   weight-broadcast kernel ([`run_wb`]): the rows packed once per A block into pair-lane
//!   tiles, the weight rows read in place, each weight pair broadcast to 32 rows; an item's
//!   last 1-5 rows past a multiple of 8 or 16 ([`super::Tuning::wb_dot_rows`]) as dot products
//!   against each stripe's weight rows over the A block, while they are in L2.
//!
//! # Numerics and determinism
//!
//! A bf16 × bf16 product is exact in f32; each lane adds its two products per step in the
//! instruction's fixed order (round to nearest even, denormal inputs and results flushed to
//! zero, as bf16 arithmetic does). The blocking depends only on the shapes, and every output
//! element is computed by exactly one work item: the same bits whatever the thread count.

use super::avx512::{hsum4, prefetch_l2};
use super::wb::{Prefetch, RT, pack_row_tiles, store_ct, store_ct_half, tile_shape};
use super::{Aligned, Block, DOT_ROWS, KC, MB, MP, MR, NB, NR, Out, tiled_rows};
use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use half::bf16;

/// bf16 per vector (and per 64-byte cache line).
const L: usize = 32;
/// Row stride (in bf16) of the packing buffers: a K block plus one cache line, so that the
/// rows a microkernel streams do not map to the same L1 set.
const KSH: usize = KC + L;

/// Up to this many rows, work items stream their weight rows one at a time
/// ([`run_seq`]); from 3 rows on, the `MR × NR` tile's reuse of each loaded vector pays more
/// (measured on this machine, 2 threads, interleaved runs: Qwen3 T=1 2.64 vs 3.30 ms and
/// gpt-oss T=1 7.10 vs 8.40 ms sequential; Mixtral T=16, about 4 rows per expert, 146 vs 119 ms
/// for the tile).
const SEQ_ROWS: usize = 2;
/// Bytes ahead on each weight stream that the in-place kernels fetch into L2. Zen 4 measured
/// no gain, or a loss, from L1 prefetches (Mixtral T=1: 34.3 ms with L1 prefetches 2 KiB ahead,
/// 27.5 without any, 25.8 with these, on the first instance measured; later ones ran the
/// decode kernel faster without any: [`super::Tuning::seq_prefetch`]).
const L2_AHEAD: usize = 4096;

const _: () = assert!(KC.is_multiple_of(L));

/// Whether the CPU has what these kernels use: AVX-512 F/BW/DQ/VL and AVX512-BF16.
pub(crate) fn available() -> bool {
    super::Isa::Avx512.available() && std::is_x86_feature_detected!("avx512bf16")
}

/// A 32-bf16 vector from 64 bytes at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn load(p: *const bf16) -> __m512bh {
    // SAFETY: the caller guarantees 64 readable bytes at `p`; `__m512i` and `__m512bh` are both
    // 64-byte vectors of plain bits, so the transmute only renames the type.
    unsafe { core::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i)) }
}

/// The first `n <= 32` bf16 at `p` (the rest zeros); lanes past `n` are not read.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_tail(p: *const bf16, n: usize) -> __m512bh {
    let m: __mmask32 = if n >= L { u32::MAX } else { (1u32 << n) - 1 };
    // SAFETY: masked-off lanes are not read (no fault); the caller guarantees `n` readable bf16
    // at `p`. Same-size plain-bits transmute as in `load`.
    unsafe {
        core::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(m, p as *const i16))
    }
}

/// `c[i * NB + j] (=|+=) sum` for `i < M`, `j < NR` from the 16-lane accumulators. Taken by
/// value: with a reference the accumulator array's address escapes into this (not always
/// inlined) function, and LLVM then kept the array in memory through the whole K loop of the
/// caller, a store after every `vdpbf16ps` (seen in `perf annotate`, 3x slower).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const M: usize>(acc: [[__m512; NR]; M], c: *mut f32, first: bool) {
    let z = _mm512_setzero_ps();
    for (i, row) in acc.iter().enumerate() {
        let s0 = hsum4(row[0], row[1], row[2], row[3]);
        let s1 = hsum4(row[4], row[5], z, z);
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

/// Packed operands: `c[i * NB + j] (+)= sum_{k < kcp} a[i * KSH + k] b[j * KSH + k]` for
/// `i < M`, `j < NR` (`kcp` a multiple of 32, rows padded with zeros).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro<const M: usize>(
    a: *const bf16,
    b: *const bf16,
    kcp: usize,
    c: *mut f32,
    first: bool,
) {
    // SAFETY: the caller passes buffers of M (resp. NR) rows of `kcp` bf16 at stride KSH, and
    // a tile with M rows of NB >= NR columns.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NR]; M];
        let mut k = 0;
        while k < kcp {
            let mut av = [load(a.add(k)); M];
            for (i, v) in av.iter_mut().enumerate().skip(1) {
                *v = load(a.add(i * KSH + k));
            }
            for j in 0..NR {
                let bj = load(b.add(j * KSH + k));
                for (row, &ai) in acc.iter_mut().zip(av.iter()) {
                    row[j] = _mm512_dpbf16_ps(row[j], ai, bj);
                }
            }
            k += L;
        }
        store::<M>(acc, c, first);
    }
}

/// Packed rows, weight rows read in place: `c[i * NB + j] (+)= sum_{k < kc} a[i * KSH + k]
/// B_j[k]` for `i < M`, `j < NR` (`kc` a multiple of 32), with one L2 prefetch per weight line
/// [`L2_AHEAD`] bytes ahead. No K tail: a masked tail step after the loop makes the compiler
/// keep the accumulators on the stack (stores in the loop, measured 2x slower).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro_pb<const M: usize>(
    a: *const bf16,
    brow: [*const bf16; NR],
    kc: usize,
    c: *mut f32,
    first: bool,
) {
    // SAFETY: the caller passes M packed rows of kc bf16 at stride KSH, NR weight rows of kc
    // readable bf16, and a tile with M rows of NB >= NR columns. Prefetches never fault.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NR]; M];
        let mut k = 0;
        while k < kc {
            let mut av = [load(a.add(k)); M];
            for (i, v) in av.iter_mut().enumerate().skip(1) {
                *v = load(a.add(i * KSH + k));
            }
            for j in 0..NR {
                prefetch_l2((brow[j] as *const u8).wrapping_add(2 * k + L2_AHEAD));
                let bj = load(brow[j].add(k));
                for (row, &ai) in acc.iter_mut().zip(av.iter()) {
                    row[j] = _mm512_dpbf16_ps(row[j], ai, bj);
                }
            }
            k += L;
        }
        store::<M>(acc, c, first);
    }
}

/// `NS` weight rows at a time (`NS` sequential streams): `c[i * NB + s] = sum_{k < kc} A_i[k]
/// B_s[k]` for `i < M`, `s < NS`, four accumulators per row pair (four vectors of B per step),
/// masked tail; each sum in the same order whatever `NS` (the same bits). With `PF`, one L2
/// prefetch per weight line [`L2_AHEAD`] bytes ahead on each stream; past the end of its row a
/// stream continues `NS` rows later (`B_s + NS · kc`, the row it reads next), where one row at
/// a time that is simply the next row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro_seq<const M: usize, const NS: usize, const PF: bool>(
    arow: [*const bf16; M],
    brow: [*const bf16; NS],
    kc: usize,
    c: *mut f32,
) {
    // SAFETY: as `micro_direct`, for NS weight rows of kc elements (`c` the tile element of
    // row 0, weight row 0; the tile has NB columns). The prefetches compute addresses with
    // `wrapping_add` and never fault.
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); 4]; NS]; M];
        let full = kc / (4 * L) * (4 * L);
        let row_bytes = 2 * kc;
        let mut k = 0;
        while k < full {
            let mut a = [[load(arow[0].add(k)); 4]; M];
            for (i, ai) in a.iter_mut().enumerate() {
                for (q, v) in ai.iter_mut().enumerate() {
                    *v = load(arow[i].add(k + q * L));
                }
            }
            for s in 0..NS {
                let mut b = [load(brow[s].add(k)); 4];
                for (q, v) in b.iter_mut().enumerate() {
                    if PF {
                        let at = 2 * (k + q * L) + L2_AHEAD;
                        let at = if at < row_bytes { at } else { at + (NS - 1) * row_bytes };
                        prefetch_l2((brow[s] as *const u8).wrapping_add(at));
                    }
                    *v = load(brow[s].add(k + q * L));
                }
                for (row, ai) in acc.iter_mut().zip(a.iter()) {
                    for q in 0..4 {
                        row[s][q] = _mm512_dpbf16_ps(row[s][q], ai[q], b[q]);
                    }
                }
            }
            k += 4 * L;
        }
        let mut q = 0;
        while k < kc {
            let n = (kc - k).min(L);
            let mut a = [load_tail(arow[0].add(k), n); M];
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = load_tail(arow[i].add(k), n);
            }
            for s in 0..NS {
                let b = load_tail(brow[s].add(k), n);
                for (row, &ai) in acc.iter_mut().zip(a.iter()) {
                    row[s][q] = _mm512_dpbf16_ps(row[s][q], ai, b);
                }
            }
            k += n;
            q += 1;
        }
        for (i, row) in acc.iter().enumerate() {
            for (s, r) in row.iter().enumerate() {
                let h = hsum4(r[0], r[1], r[2], r[3]);
                *c.add(i * NB + s) = (h[0] + h[1]) + (h[2] + h[3]);
            }
        }
    }
}

/// A work item of at most [`SEQ_ROWS`] rows: weight rows over their whole K, `streams` of
/// them at a time (4, 2 or 1, the largest of those not above it; with two activation rows at
/// most 2: 32 accumulators would not fit the registers), so that a thread reads its item's
/// weights as that many sequential streams (`PF`: see [`super::Tuning::seq_prefetch`]; see
/// [`super::Tuning::seq_streams`]); an item's last weight rows short of a group one at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn run_seq<const PF: bool>(blk: &Block<'_, bf16>, out: Out, streams: usize) {
    let (k, mb, nb) = (blk.k, blk.a_rows.len(), blk.nb);
    for (bi, b) in blk.b.iter().enumerate() {
        let Some(b) = b else { continue };
        let mut i = 0;
        while i < mb {
            let m = (mb - i).min(2);
            let mut arow = [blk.a.as_ptr(); 2];
            for (ii, p) in arow.iter_mut().enumerate().take(m) {
                let at = blk.a_rows[i + ii] * k;
                *p = blk.a[at..at + k].as_ptr();
            }
            // 4, 2 or 1 rows at a time; at most 2 with two activation rows (16 accumulators).
            let ns = match streams {
                4.. => 4 / m,
                2 | 3 => 2,
                _ => 1,
            };
            let mut j = 0;
            while j < nb {
                let g = if j + ns <= nb { ns } else { 1 };
                let at = (blk.n0 + j) * k;
                let brow = b[at..at + g * k].as_ptr();
                let br = |s: usize| brow.wrapping_add(s * k);
                // SAFETY: m <= 2 rows and g weight rows of k elements (checked by the slices
                // above); the tile has room for row i + m - 1, column j + g - 1 < nb <= NB.
                unsafe {
                    let c = out[bi].add(i * NB + j);
                    let [a0, a1] = arow;
                    match (m, g) {
                        (1, 4) => micro_seq::<1, 4, PF>([a0], [br(0), br(1), br(2), br(3)], k, c),
                        (1, 2) => micro_seq::<1, 2, PF>([a0], [br(0), br(1)], k, c),
                        (2, 2) => micro_seq::<2, 2, PF>([a0, a1], [br(0), br(1)], k, c),
                        (2, _) => micro_seq::<2, 1, PF>([a0, a1], [brow], k, c),
                        _ => micro_seq::<1, 1, PF>([a0], [brow], k, c),
                    }
                }
                j += g;
            }
            i += m;
        }
    }
}

/// Copy `src` into `dst[..src.len()]` and zero the rest of `dst`.
#[inline]
fn copy_padded(src: &[bf16], dst: &mut [bf16]) {
    dst[..src.len()].copy_from_slice(src);
    dst[src.len()..].fill(bf16::ZERO);
}

/// Rows `a_rows` (at most [`MP`]) of a work item: the rows packed per K block, the weight
/// rows copied per micro-panel (`INPLACE` false) or read in place (`INPLACE`, only when `k` is
/// a multiple of 32: [`micro_pb`] has no K tail).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn run_rows<const INPLACE: bool>(blk: &Block<'_, bf16>, a_rows: &[usize], out: Out) {
    /// A cache-line aligned bf16 buffer (`Aligned` holds f32: half as many).
    type Buf<const N: usize> = MaybeUninit<Aligned<N>>;
    let (k, mb, nb) = (blk.k, a_rows.len(), blk.nb);
    let mut a_buf = Buf::<{ MP * KSH / 2 }>::uninit();
    let mut b_buf = Buf::<{ NR * KSH / 2 }>::uninit();
    let ap = a_buf.as_mut_ptr() as *mut bf16;
    let bp = b_buf.as_mut_ptr() as *mut bf16;
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let kcp = kc.div_ceil(L) * L;
        for (i, &r) in a_rows.iter().enumerate() {
            // SAFETY: row i < MP of the A buffer, kcp <= KSH bf16; written before read.
            let dst = unsafe { core::slice::from_raw_parts_mut(ap.add(i * KSH), kcp) };
            copy_padded(&blk.a[r * k + k0..r * k + k0 + kc], dst);
        }
        for (bi, b) in blk.b.iter().enumerate() {
            let Some(b) = b else { continue };
            let mut j = 0;
            while j < nb {
                let nr = NR.min(nb - j);
                // In place: rows past nr repeat the first (their columns are never read).
                let mut brow = [b[(blk.n0 + j) * k + k0..].as_ptr(); NR];
                for jj in 0..NR {
                    if INPLACE {
                        if jj < nr {
                            brow[jj] = b[(blk.n0 + j + jj) * k + k0..].as_ptr();
                        }
                        continue;
                    }
                    // SAFETY: row jj < NR of the B buffer, kcp <= KSH bf16.
                    let dst = unsafe { core::slice::from_raw_parts_mut(bp.add(jj * KSH), kcp) };
                    if jj < nr {
                        let at = (blk.n0 + j + jj) * k + k0;
                        copy_padded(&b[at..at + kc], dst);
                    } else {
                        dst.fill(bf16::ZERO);
                    }
                }
                // The next panel's weight rows (this K block), fetched into L2 a slice per
                // microkernel call so that its copy does not wait on memory.
                let next = (nb - (j + nr).min(nb)).min(NR);
                let lines = kc.div_ceil(L);
                let calls = mb.div_ceil(MR);
                let per = (next * lines).div_ceil(calls);
                let mut i = 0;
                while i < mb {
                    let q = i / MR;
                    let span = q * per..((q + 1) * per).min(next * lines);
                    let row0 = b.as_ptr().wrapping_add((blk.n0 + j + nr) * k + k0);
                    for p in super::line_span(row0, k, L, lines, next, span) {
                        prefetch_l2(p);
                    }
                    let first = k0 == 0;
                    // SAFETY: rows i..i + m of the A buffer and all NR rows of the B buffer
                    // hold kcp initialized bf16 (in place: kcp == kc, and each weight row
                    // holds kc bf16 from k0); the tile has room for NR columns from j (NB is a
                    // multiple of NR).
                    unsafe {
                        let a = ap.add(i * KSH) as *const bf16;
                        let c = out[bi].add(i * NB + j);
                        match ((mb - i).min(MR), INPLACE) {
                            (4, true) => micro_pb::<4>(a, brow, kc, c, first),
                            (3, true) => micro_pb::<3>(a, brow, kc, c, first),
                            (2, true) => micro_pb::<2>(a, brow, kc, c, first),
                            (_, true) => micro_pb::<1>(a, brow, kc, c, first),
                            (4, false) => micro::<4>(a, bp, kcp, c, first),
                            (3, false) => micro::<3>(a, bp, kcp, c, first),
                            (2, false) => micro::<2>(a, bp, kcp, c, first),
                            (_, false) => micro::<1>(a, bp, kcp, c, first),
                        }
                    }
                    i += MR;
                }
                j += NR;
            }
        }
        k0 += KC;
    }
}

/// K block (bf16) of the broadcast kernel: a packed [`NP`]-column weight panel is
/// `KB / 2 × NP` pairs, 64 KiB, and an item's panels (up to 384 KiB with two B) stay in L2
/// while every row group runs against them. Measured on this machine, 2 threads, interleaved,
/// expert GEMMs at T=1024: DeepSeek-V3 (256 rows per expert) 2264 ms with 128, 2200 with 256,
/// 2149 with 512, 2174 with 1024; Mixtral 2394 / 2125 / 1988 / 2049; gpt-oss (128 rows) 694
/// with 128, 672 with 512.
const KB: usize = 512;
/// Rows of the broadcast kernel's register tile (MB_T × NV vectors of accumulators).
const MB_T: usize = 6;
/// Vectors (of 16 columns) per row of the broadcast kernel's register tile.
const NV: usize = 4;
/// Columns of a packed weight panel.
const NP: usize = 16 * NV;
/// From this many rows, bf16 work items use the broadcast kernel (measured on this machine, 2
/// threads, interleaved: 128 rows per expert, gpt-oss T=1024, 740 vs 932 ms for the packed
/// dot-product kernel, DeepSeek-V3 T=1024 (256 rows) 3023 vs 3452 ms; 32 rows (Mixtral T=128)
/// 576 vs 515 ms and 64 rows (Qwen3 T=1024) 410 vs 366 ms the other way).
pub(crate) const BC_ROWS: usize = 96;

const _: () = assert!(NB.is_multiple_of(NP) && KB.is_multiple_of(L) && KB <= KC);

/// The `n = min(32, len - at)` bf16 of `src` from `at` as 16 pairs (zeros past `n`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_pairs(src: &[bf16], at: usize) -> __m512 {
    let n = src.len().saturating_sub(at).min(L);
    let m: __mmask32 = if n == L { u32::MAX } else { (1u32 << n) - 1 };
    // SAFETY: masked-off lanes are not read; the `n` lanes read lie in `src`.
    unsafe {
        let p = src.as_ptr().add(at.min(src.len()));
        _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p as *const i16))
    }
}

/// `c[i * NB + j] (=|+=) sum_{p < kp} pair(a_i, p) · bt[p][j]` for `i < M`, `j < NP`: `a_i`
/// rows in place (pairs broadcast; an odd `kc` ends with a half pair, its high half zero),
/// `bt` a packed panel of `kp = ceil(kc / 2)` rows of [`NP`] pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro_bc<const M: usize>(
    a: [*const bf16; M],
    bt: *const u32,
    kc: usize,
    c: *mut f32,
    first: bool,
) {
    // SAFETY: the caller passes M rows of kc readable bf16, a panel of ceil(kc / 2) × NP pairs
    // (64-byte aligned rows) and a tile with M rows of NB >= NP columns from `c`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; M];
        let full = kc / 2;
        let mut bk = bt;
        let bh = |v: __m512i| core::mem::transmute::<__m512i, __m512bh>(v);
        for p in 0..=full {
            if p == full && kc.is_multiple_of(2) {
                break;
            }
            let mut b = [bh(_mm512_setzero_si512()); NV];
            for (v, x) in b.iter_mut().enumerate() {
                *x = bh(_mm512_load_si512(bk.add(16 * v) as *const __m512i));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // A full pair, or (the last of an odd kc) the last element and a zero.
                let pair = if p < full {
                    (a[i].add(2 * p) as *const i32).read_unaligned()
                } else {
                    (a[i].add(kc - 1) as *const u16).read() as i32
                };
                let av = bh(_mm512_set1_epi32(pair));
                for (r, &x) in row.iter_mut().zip(b.iter()) {
                    *r = _mm512_dpbf16_ps(*r, av, x);
                }
            }
            bk = bk.add(NP);
        }
        for (i, row) in acc.iter().enumerate() {
            let cr = c.add(i * NB);
            for (v, &x) in row.iter().enumerate() {
                let d = cr.add(16 * v);
                if first {
                    _mm512_storeu_ps(d, x);
                } else {
                    _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), x));
                }
            }
        }
    }
}

/// A work item of at least [`BC_ROWS`] rows with the broadcast kernel: per K block of [`KB`],
/// each [`NP`]-column weight panel of each B is packed into pairs `[k/2][NP][2]` (16 × 16
/// transposes of 32-bit pairs, zeros past the item's columns and the K block; L2), then every
/// [`MB_T`]-row group (its rows read in place, L1) runs against all the panels; the next K
/// block's weight rows are prefetched into L2 meanwhile, a slice per microkernel call.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn run_bc(blk: &Block<'_, bf16>, out: Out) {
    use super::avx512::transpose16;
    let (k, mb, nb) = (blk.k, blk.a_rows.len(), blk.nb);
    let panels = nb.div_ceil(NP);
    let groups = mb.div_ceil(MB_T);
    let nmat = blk.b.iter().flatten().count();
    // Packed panels of every present B: [bi][panel][KB / 2][NP] pairs.
    let mut bt_buf = MaybeUninit::<Aligned<{ 2 * (NB / NP) * (KB / 2) * NP }>>::uninit();
    let bt = bt_buf.as_mut_ptr() as *mut u32;
    let panel_at = |bi: usize, p: usize| (bi * (NB / NP) + p) * (KB / 2) * NP;
    let mut k0 = 0;
    while k0 < k {
        let kc = KB.min(k - k0);
        let kp = kc.div_ceil(2);
        for (bi, b) in blk.b.iter().enumerate() {
            let Some(b) = b else { continue };
            for p in 0..panels {
                for gg in 0..NV {
                    let j0 = p * NP + gg * 16;
                    let mut c = 0;
                    while c < kp {
                        let mut r = [_mm512_setzero_ps(); 16];
                        for (jj, v) in r.iter_mut().enumerate() {
                            if j0 + jj < nb {
                                let at = (blk.n0 + j0 + jj) * k + k0;
                                // SAFETY: same features; masked to the row's kc bf16.
                                *v = unsafe { load_pairs(&b[at..at + kc], 2 * c) };
                            }
                        }
                        transpose16(&mut r);
                        for (q, v) in r.iter().enumerate() {
                            // SAFETY: pair row c + q < KB / 2 (kp <= KB / 2, c a multiple of
                            // 16 below kp, KB / 2 a multiple of 16) of panel p of B bi, columns
                            // gg * 16..: inside the buffer, 64-byte aligned.
                            unsafe {
                                let d = bt.add(panel_at(bi, p) + (c + q) * NP + gg * 16);
                                _mm512_store_ps(d as *mut f32, *v)
                            }
                        }
                        c += 16;
                    }
                }
            }
        }
        // The next K block of the weight rows, fetched into L2 a slice per microkernel call.
        let next = KB.min(k - (k0 + kc).min(k));
        let lines = (2 * next).div_ceil(64);
        let calls = groups * panels * nmat;
        let per = (nb * lines * nmat).div_ceil(calls.max(1));
        let mut q = 0;
        for g in 0..groups {
            let i = g * MB_T;
            let m = (mb - i).min(MB_T);
            let mut arow = [blk.a.as_ptr(); MB_T];
            for (ii, r) in arow.iter_mut().enumerate().take(m) {
                let at = blk.a_rows[i + ii] * k + k0;
                *r = blk.a[at..at + kc].as_ptr();
            }
            for (bi, b) in blk.b.iter().enumerate() {
                let Some(b) = b else { continue };
                for p in 0..panels {
                    let span = q * per..((q + 1) * per).min(nb * lines * nmat);
                    let row0 = b.as_ptr().wrapping_add(blk.n0 * k + k0 + kc);
                    for p in super::line_span(row0, k, 32, lines, nb, span) {
                        prefetch_l2(p);
                    }
                    q += 1;
                    // SAFETY: m rows of kc bf16 from `arow`; panel p of B bi holds kp pair
                    // rows; the caller's tile has room for NP columns from p * NP of rows i..
                    // (NB is a multiple of NP).
                    unsafe {
                        let bp = bt.add(panel_at(bi, p)) as *const u32;
                        let c = out[bi].add(i * NB + p * NP);
                        let f = k0 == 0;
                        let a = arow;
                        macro_rules! go {
                            ($($n:literal)*) => {
                                match m {
                                    $($n => micro_bc::<$n>(
                                        core::array::from_fn(|x| a[x]), bp, kc, c, f),)*
                                    _ => micro_bc::<MB_T>(a, bp, kc, c, f),
                                }
                            };
                        }
                        go!(1 2 3 4 5);
                    }
                }
            }
        }
        k0 += KB;
    }
}

/// Weight rows (result columns) per stripe and register tile of the weight-broadcast kernel.
/// Eight, not the twelve of the AVX-512 kernel in module `wb`: the rows are read in place at
/// a stride of K × 2 bytes, a multiple of 4 KiB for the models' K, so they all map to the same
/// L1 set, and Zen 4's L1 has 8 ways. Measured on Zen 4 (2 threads, interleaved, expert GEMMs,
/// rows 16-95, paired medians over 5 rounds against the dot-product kernels): with 12 rows
/// Mixtral T=128 1.159x the time, Qwen3 T=1024 1.018x; with 8 rows 0.954x and 0.955x,
/// DeepSeek-V3 T=128 0.910x.
const NJ: usize = 8;
/// K chunk (in pairs) of the weight-broadcast kernel: a stripe's chunk, `NJ` rows of 512 bytes,
/// stays in L1 while every row tile runs against it.
const KP_WB: usize = 128;
/// Pairs of the weight-broadcast kernel's packed rows (256 KiB): [`MB`] rows of two chunks,
/// or fewer rows of a longer A block.
const A_PAIRS: usize = MB * 2 * KP_WB;

const _: () = assert!(NB.is_multiple_of(NJ) && NB.is_multiple_of(16) && MB.is_multiple_of(RT));

/// `ct[j * MB + v * 16 + l] (+)= sum_{p < kp} pair(at[p * 16 * MV + v * 16 + l]) ·
/// pair(W_j[2p], W_j[2p + 1])` for `j < J`, `v < MV`, `l < 16`, and with `H = 1` the same for
/// the tile's 8-lane half (`ah[p * 8 + l]`, `l < 8`, into `ct[j * MB + 16 * MV + l]`): `at` a
/// packed row tile (one row's pair per 32-bit lane), `W_j` the weight rows `w + j * ws` read in
/// place, each pair broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_wb<const MV: usize, const H: usize, const J: usize>(
    at: *const u32,
    ah: *const u32,
    w: *const bf16,
    ws: usize,
    kp: usize,
    ct: *mut f32,
    first: bool,
    pf: Prefetch,
) {
    // SAFETY: the caller passes a packed row tile of kp × 16·MV pairs (64-byte aligned rows)
    // and, with H = 1, its half of kp × 8 pairs (32-byte aligned rows), J weight rows of at
    // least 2·kp readable bf16 at stride ws, and J rows of at least 16·MV + 8·H floats
    // (64-byte aligned) at stride MB from `ct`.
    unsafe {
        let bh = |v: __m512i| core::mem::transmute::<__m512i, __m512bh>(v);
        let bh2 = |v: __m256i| core::mem::transmute::<__m256i, __m256bh>(v);
        let mut acc = [[_mm512_setzero_ps(); MV]; J];
        let mut acch = [[_mm256_setzero_ps(); H]; J];
        let mut ak = at;
        let mut hk = ah;
        let mut wk = w;
        for p in 0..kp {
            if p % 16 == 0 {
                // One line of each of a later chunk's weight rows (`pf`) per 16 steps, into L2.
                let l = pf.first + p / 16;
                if l < pf.end {
                    for j in 0..NJ {
                        prefetch_l2(pf.base.wrapping_add(j * pf.stride + l * 64));
                    }
                }
            }
            let mut a = [bh(_mm512_setzero_si512()); MV];
            for (v, x) in a.iter_mut().enumerate() {
                *x = bh(_mm512_load_si512(ak.add(v * 16) as *const __m512i));
            }
            let mut ha = [bh2(_mm256_setzero_si256()); H];
            for x in ha.iter_mut() {
                *x = bh2(_mm256_load_si256(hk as *const __m256i));
            }
            for (j, (row, hrow)) in acc.iter_mut().zip(acch.iter_mut()).enumerate() {
                let pair = (wk.add(j * ws) as *const i32).read_unaligned();
                let b = bh(_mm512_set1_epi32(pair));
                for (x, &av) in row.iter_mut().zip(a.iter()) {
                    *x = _mm512_dpbf16_ps(*x, av, b);
                }
                for (x, &av) in hrow.iter_mut().zip(ha.iter()) {
                    *x = _mm256_dpbf16_ps(*x, av, bh2(_mm256_set1_epi32(pair)));
                }
            }
            ak = ak.add(16 * MV);
            hk = hk.add(8 * H);
            wk = wk.add(2);
        }
        store_ct(acc, ct, first);
        store_ct_half(acch, ct.add(16 * MV), first);
    }
}

/// [`super::pack_rows`] for [`super::RowPack::Pairs`]: each 32-bit lane a row's bf16 pair,
/// all of K (even).
///
/// # Safety
/// As [`super::pack_rows`], on a CPU with the features below; `T` is bf16.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_rows<T: moe_core::Element>(
    a: &[T],
    a_rows: &[usize],
    k: usize,
    half: bool,
    groups: core::ops::Range<usize>,
    dst: *mut f32,
) {
    assert!(T::DTYPE == moe_core::DType::BF16 && k.is_multiple_of(2));
    let a = bytemuck::cast_slice::<T, bf16>(a);
    // SAFETY: the caller's buffer holds len(a_rows.len(), k) = tiles * (k / 2) * RT floats,
    // 64-byte aligned; `load_pairs` reads only inside the row's slice (checked against `a`).
    unsafe {
        pack_row_tiles(dst, a_rows.len(), k / 2, k / 2, half, groups, |i, c| {
            load_pairs(&a[a_rows[i] * k..(a_rows[i] + 1) * k], 2 * c)
        })
    }
}

/// `[i][j] = sum_{k < n} a[i][k] w[j][k]` for `i < R`, `j < J` (the rest zero) on `vdpbf16ps`:
/// each sum 16 lane partial sums (32 bf16 per step, the last step masked), then added across
/// the lanes in a fixed order.
///
/// # Safety
/// Each `a[i]` and `w[j]` is valid for reads of `n` bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dots<const R: usize, const J: usize>(
    a: [*const bf16; R],
    w: [*const bf16; J],
    n: usize,
) -> [[f32; 8]; 4] {
    // SAFETY: every load reads inside the first `n` bf16 of its row (`load_tail` masks).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        let mut k = 0;
        while k < n {
            let av = a.map(|p| load_tail(p.add(k), n - k));
            for (j, p) in w.iter().enumerate() {
                let wv = load_tail(p.add(k), n - k);
                for (row, &x) in acc.iter_mut().zip(av.iter()) {
                    row[j] = _mm512_dpbf16_ps(row[j], x, wv);
                }
            }
            k += L;
        }
        let mut s = [[0.0; 8]; 4];
        for (o, row) in s.iter_mut().zip(acc) {
            for (x, v) in o.iter_mut().zip(row) {
                *x = _mm512_reduce_add_ps(v);
            }
        }
        s
    }
}

/// The dot-product rows of this weight-broadcast kernel, `nrows` (at most [`DOT_ROWS`]) against `cols`
/// weight rows: in groups of up to 3 rows against 8 weight rows (24 accumulators; 3 + 8 loads
/// per 24 products), or of 4 against 4 where 4 or 7 rows are left (4 + 4 per 16).
/// `sums(r, rows, weight_rows)` gives a group's `[row][weight row]` sums, given its `r` rows'
/// indices (past `r` the last repeats) and its weight rows' (past `cols` the last repeats; those
/// sums are dropped); `ct[j * MB + i] (=|+=)` them for `j < cols`, `i < nrows`.
///
/// # Safety
/// `ct` is valid for `cols` rows of at least `nrows` floats at stride [`MB`]; `sums` is safe to
/// call with such indices.
unsafe fn dot_groups(
    nrows: usize,
    cols: usize,
    ct: *mut f32,
    first: bool,
    mut sums: impl FnMut(usize, [usize; 4], [usize; 8]) -> [[f32; 8]; 4],
) {
    let mut i0 = 0;
    while i0 < nrows {
        let left = nrows - i0;
        let r = if left == 4 || left == 7 { 4 } else { left.min(3) };
        let jw = if r == 4 { 4 } else { 8 };
        let mut j0 = 0;
        while j0 < cols {
            let s = sums(
                r,
                core::array::from_fn(|i| i0 + i.min(r - 1)),
                core::array::from_fn(|j| (j0 + j).min(cols - 1)),
            );
            for (i, row) in s.iter().enumerate().take(r) {
                for (j, &x) in row.iter().enumerate().take(jw.min(cols - j0)) {
                    // SAFETY: column j0 + j < cols, row i0 + i < nrows (the caller's contract
                    // on `ct`).
                    unsafe {
                        let p = ct.add((j0 + j) * MB + i0 + i);
                        *p = if first { x } else { *p + x };
                    }
                }
            }
            j0 += jw;
        }
        i0 += r;
    }
}

/// The rows past an item's [`tiled_rows`] (`rows`, at most [`DOT_ROWS`]) against the weight rows `w`
/// (`cols` of them from row `w0`), over the bf16 `e0..e0 + n` of each row (length `k`):
/// `ct[j * MB + i] (=|+=)` the sums for `j < cols`, `i < rows.len()`.
///
/// # Safety
/// `e0 + n <= k`; `ct` is valid for `cols` rows of at least `rows.len()` floats at stride
/// [`MB`]. (Every row read is sliced from `a` or `w`.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows(
    a: &[bf16],
    rows: &[usize],
    w: &[bf16],
    w0: usize,
    cols: usize,
    k: usize,
    e0: usize,
    n: usize,
    ct: *mut f32,
    first: bool,
) {
    debug_assert!(rows.len() <= DOT_ROWS && cols > 0 && e0 + n <= k);
    let arow = |i: usize| a[rows[i] * k + e0..][..n].as_ptr();
    let wrow = |j: usize| w[(w0 + j) * k + e0..][..n].as_ptr();
    // SAFETY: the caller's contract on `ct`; each row pointer is valid for n bf16 (sliced
    // above), the CPU has this function's features. The groups as the f32 twin's.
    unsafe {
        dot_groups(rows.len(), cols, ct, first, |r, ai, wj| match r {
            1 => dots::<1, 8>([arow(ai[0])], wj.map(wrow), n),
            2 => dots::<2, 8>([0, 1].map(|i| arow(ai[i])), wj.map(wrow), n),
            3 => dots::<3, 8>([0, 1, 2].map(|i| arow(ai[i])), wj.map(wrow), n),
            _ => dots::<4, 4>(ai.map(arow), [0, 1, 2, 3].map(|j| wrow(wj[j])), n),
        })
    }
}

/// A work item with the weight-broadcast kernel on `vdpbf16ps` (K even): the `vdpbf16ps` twin
/// of the AVX-512 weight-broadcast kernel (module `wb`). The item's rows are packed once per A
/// block (as much of K as [`A_PAIRS`] holds for them; or they come packed ahead over all of K,
/// [`super::RowPack::Pairs`], and the same A blocks are walked) into row tiles of [`RT`] rows, each
/// 32-bit lane one row's pair of consecutive K elements (16 × 16 transposes of pairs); the
/// weight rows are read in place, [`NJ`] at a time, each pair broadcast to all the tile's
/// rows: 2 vector loads and 8 broadcasts per 16 `vdpbf16ps`, no horizontal sums, no weight
/// copy; the weight rows of the chunk after the next are fetched into L2 meanwhile, a slice
/// per call. The last tile's lanes come in units of 8 where [`super::Tuning::wb_half`] says
/// so (a 256-bit half after its 512-bit vectors): 8 rows of `vdpbf16ps` on `ymm` cost half a
/// `zmm` instruction on Zen 4, so an item wastes at most 7 lanes per pair instead of 15.
/// Measured on Zen 4 (2 threads, expert GEMMs, paired medians of 4 interleaved rounds against
/// 16-lane units, same bits): T=128 Qwen3 0.978, gpt-oss 0.949, Mixtral 0.966, DeepSeek-V3 0.957;
/// T=1024 0.966 / 0.989 / 1.003 / 0.985. With `dots` ([`super::Tuning::wb_dot_rows`]) an
/// item's last `mb % 8 <= dots` rows (past at least 8) are left to [`dot_rows`] instead, after
/// each stripe's last chunk of an A block. The results accumulate transposed (`[column][MB]`,
/// chunks of [`KP_WB`] pairs added in K order) and are transposed into the caller's tiles at
/// the end.
///
/// # Safety
/// As [`run_block`]; `blk.k` even and positive.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
unsafe fn run_wb(blk: &Block<'_, bf16>, out: Out, half: bool, dots: usize) {
    use super::avx512::ct_to_tiles;
    let (k, mb, nb, n0) = (blk.k, blk.a_rows.len(), blk.nb, blk.n0);
    debug_assert!(k > 0 && k.is_multiple_of(2) && mb > 0 && mb <= MB && nb <= NB);
    // The rows in row tiles; the rest as dot products.
    let (all, mb) = (mb, tiled_rows(mb, half, dots));
    // Packed rows of one A block: tile t at t * kpa * RT pairs, `[pair][16 · MV]`.
    let mut a_buf = MaybeUninit::<Aligned<A_PAIRS>>::uninit();
    // Transposed results, `[bi][column][MB]`.
    let mut c_buf = MaybeUninit::<Aligned<{ 2 * NB * MB }>>::uninit();
    let ap = a_buf.as_mut_ptr() as *mut u32;
    let cp = c_buf.as_mut_ptr() as *mut f32;
    let tiles = mb.div_ceil(RT);
    let stripes = nb.div_ceil(NJ);
    let kpairs = k / 2;
    let bis: &[usize] = match (blk.b[0].is_some(), blk.b[1].is_some()) {
        (true, true) => &[0, 1],
        (true, false) => &[0],
        (false, true) => &[1],
        (false, false) => return,
    };
    // Pairs per A block: as many as the buffer holds for this item's rows.
    let kpa = (A_PAIRS / (tiles * RT) / KP_WB * KP_WB).max(KP_WB);
    // Rows packed ahead (all of K; tile t at t * kpairs * RT), or packed here per A block.
    let pre = match blk.packed {
        Some((rp @ super::RowPack::Pairs(h, _), p)) if h == half && rp.rows(all) == mb => {
            assert!(p.len() >= rp.len(mb, k), "packed rows too short");
            Some(p.as_ptr() as *const u32)
        }
        _ => None,
    };
    let mut a0 = 0;
    while a0 < kpairs {
        let kac = kpa.min(kpairs - a0);
        if pre.is_none() {
            // Pack the rows of this A block, each 32-bit lane one row's pair.
            // SAFETY: the A buffer holds tiles * kpa * RT <= A_PAIRS elements of 32 bits,
            // 64-byte aligned; kac <= kpa; rows i < mb; same features for `load_pairs`,
            // masked to `src`.
            unsafe {
                pack_row_tiles(ap as *mut f32, mb, kpa, kac, half, 0..mb.div_ceil(16), |i, c| {
                    let row = blk.a_rows[i];
                    let src = &blk.a[row * k + 2 * a0..row * k + 2 * (a0 + kac)];
                    load_pairs(src, 2 * c)
                })
            };
        }
        // Chunks in the order they run: (B, stripe, first pair), the last fastest; a later one
        // (in this A block or the next) is fetched into L2 during each. `step`: the chunk after
        // one in this A block's walk.
        let step = |(b, s, c): (usize, usize, usize)| {
            if c + KP_WB < a0 + kac {
                Some((b, s, c + KP_WB))
            } else if s + 1 < stripes {
                Some((b, s + 1, a0))
            } else if b + 1 < bis.len() {
                Some((b + 1, 0, a0))
            } else {
                None
            }
        };
        let next_block = (a0 + kpa < kpairs).then_some((0, 0, a0 + kpa));
        let mut cur = Some((0, 0, a0));
        while let Some((b, s, c0)) = cur {
            let bi = bis[b];
            let bw = blk.b[bi].unwrap_or(&[]);
            let j0 = s * NJ;
            let nj = NJ.min(nb - j0);
            let kp = KP_WB.min(a0 + kac - c0);
            let first = c0 == 0;
            cur = step((b, s, c0));
            // Fetched into L2 meanwhile: the chunk after the next one (the next A block's first
            // where this walk ends there), or the next A block's first during this walk's last
            // chunk. Two chunks ahead rather than one (a chunk is only 512 bytes of each weight
            // row; Zen 4, 2 threads, expert GEMMs, 9 interleaved rounds: gpt-oss bf16 T=128
            // 0.964x / 0.965x, Qwen3 T=128 0.973x / 0.988x, the other bf16 points of the four
            // models at T=16 / 128 / 1024 0.986x-1.009x; f32's 1 KiB chunks gained nothing).
            let nxt = match cur {
                Some(n) => step(n).or(next_block),
                None => next_block,
            };
            let mut pf = Prefetch { base: core::ptr::null(), stride: 0, first: 0, end: 0 };
            let mut lines = 0;
            if let Some((pb, ps, pc)) = nxt {
                let pw = blk.b[bis[pb]].unwrap_or(&[]);
                let prow = n0 + (ps * NJ).min(nb - 1);
                pf.base = pw.as_ptr().wrapping_add(prow * k + 2 * pc) as *const u8;
                // A partial stripe fetches its first row only (a prefetch never faults, but
                // rows past the matrix are not worth fetching).
                pf.stride = if ps * NJ + NJ <= nb { 2 * k } else { 0 };
                lines = (4 * KP_WB.min(kpairs - pc)).div_ceil(64);
            }
            // The stripe's rows from pair c0: nj rows of at least 2 · kp bf16 (c0 + kp <=
            // k / 2), checked by the slice.
            let w = bw[(n0 + j0) * k + 2 * c0..][..(nj - 1) * k + 2 * kp].as_ptr();
            for t in 0..tiles {
                let (mv, h) = tile_shape(mb, t, half);
                let (at, ah) = match pre {
                    Some(p) => {
                        let tile = p.wrapping_add(t * kpairs * RT);
                        (
                            tile.wrapping_add(c0 * 16 * mv),
                            tile.wrapping_add(16 * mv * kpairs + c0 * 8),
                        )
                    }
                    None => {
                        let tile = (ap as *const u32).wrapping_add(t * kpa * RT);
                        let c = c0 - a0;
                        (tile.wrapping_add(c * 16 * mv), tile.wrapping_add(16 * mv * kpa + c * 8))
                    }
                };
                let ct = cp.wrapping_add(bi * NB * MB + j0 * MB + t * RT);
                pf.first = t * lines / tiles;
                pf.end = (t + 1) * lines / tiles;
                // SAFETY: tile t holds pair rows c0 - a0..c0 - a0 + kp of 16 · mv lanes and, if
                // h, of 8 lanes after them (packed above for this A block, or pair rows
                // c0..c0 + kp of all of K packed ahead: length checked); `w` holds nj rows of
                // 2 · kp bf16 at stride k; the Cᵀ rows j0..j0 + nj <= NB have room for
                // 16 · mv + 8 · h <= 32 rows from t * 32 < MB, 64-byte aligned. Prefetches
                // never fault.
                unsafe {
                    macro_rules! go {
                        ($($n:literal)*) => {
                            match (mv, h, nj) {
                                $((2, _, $n) => micro_wb::<2, 0, $n>(at, ah, w, k, kp, ct, first, pf),
                                (1, 1, $n) => micro_wb::<1, 1, $n>(at, ah, w, k, kp, ct, first, pf),
                                (1, _, $n) => micro_wb::<1, 0, $n>(at, ah, w, k, kp, ct, first, pf),
                                (_, _, $n) => micro_wb::<0, 1, $n>(at, ah, w, k, kp, ct, first, pf),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    // Every stripe width 1..=NJ has its arm.
                    const _: () = assert!(NJ == 8);
                    go!(1 2 3 4 5 6 7 8);
                }
            }
            if all > mb && c0 + KP_WB >= a0 + kac {
                // The stripe's last chunk of this A block: the rows past the tiles against its
                // weight rows over the whole block (in L2 now).
                // SAFETY: pairs a0..a0 + kac lie in K; columns j0..j0 + nj of the Cᵀ block,
                // rows mb..all < MB.
                unsafe {
                    dot_rows(
                        blk.a,
                        &blk.a_rows[mb..all],
                        bw,
                        n0 + j0,
                        nj,
                        k,
                        2 * a0,
                        2 * kac,
                        cp.wrapping_add(bi * NB * MB + j0 * MB + mb),
                        a0 == 0,
                    )
                };
            }
        }
        a0 += kpa;
    }
    // SAFETY: columns 0..nb of the Cᵀ block of each present B were written above for every row
    // tile (all K); the caller's tiles hold mb rows of NB floats.
    unsafe {
        let present = [blk.b[0].is_some(), blk.b[1].is_some()];
        ct_to_tiles(cp, present, out, all, nb, nb)
    };
}

/// One bf16 work item (see the module docs).
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ/VL and AVX512-BF16 ([`available`]); every A row and B row of
/// the item lies in its slice; each `out[bi]` of a present `blk.b[bi]` is valid for writes
/// (and reads after them) of `blk.a_rows.len() * NB` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
pub(crate) unsafe fn run_block<T: moe_core::Element>(
    blk: &Block<'_, T>,
    out: Out,
    tuning: super::Tuning,
) {
    let (wb_rows, half) = (tuning.dpwb_rows, tuning.wb_half);
    debug_assert!(T::DTYPE == moe_core::DType::BF16);
    // The element type is bf16 (the caller dispatches on `T::DTYPE`): the same bits.
    let blk = &Block {
        a: bytemuck::cast_slice::<T, bf16>(blk.a),
        a_rows: blk.a_rows,
        k: blk.k,
        b: blk.b.map(|b| b.map(bytemuck::cast_slice::<T, bf16>)),
        n0: blk.n0,
        nb: blk.nb,
        packed: blk.packed,
    };
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
    if mb >= wb_rows.0 && mb < wb_rows.1 && blk.k.is_multiple_of(2) {
        // SAFETY: same features; the caller's contract, K even and positive.
        unsafe { run_wb(blk, out, half, tuning.wb_dot_rows) };
        return;
    }
    if mb <= SEQ_ROWS {
        // SAFETY: same features; the caller's contract.
        unsafe {
            let ss = tuning.seq_streams;
            if tuning.seq_prefetch {
                run_seq::<true>(blk, out, ss)
            } else {
                run_seq::<false>(blk, out, ss)
            }
        };
        return;
    }
    if mb >= BC_ROWS {
        // SAFETY: same features; the caller's contract.
        unsafe { run_bc(blk, out) };
        return;
    }
    let inplace = blk.k.is_multiple_of(L);
    let mut r0 = 0;
    while r0 < mb {
        let r1 = (r0 + MP).min(mb);
        // SAFETY: rows r0..r1 of the caller's buffers.
        let o = unsafe { [out[0].add(r0 * NB), out[1].add(r0 * NB)] };
        let rows = &blk.a_rows[r0..r1];
        // SAFETY: same features; the caller's contract for these rows (in place: k is a
        // multiple of 32).
        unsafe {
            if inplace { run_rows::<true>(blk, rows, o) } else { run_rows::<false>(blk, rows, o) }
        };
        r0 = r1;
    }
}

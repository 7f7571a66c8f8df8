//! The weight-broadcast kernel (AVX-512): rows are the vector dimension, weights are broadcast.
//!
//! # Why
//!
//! The other many-row kernels put the weights' columns in the vector lanes, so every K block of
//! every weight row is transposed (or copied) once per work item, and that cost is shared only
//! by the item's rows. Here the item's rows are transposed instead, into `[k][32 rows]` tiles,
//! and that cost is shared by all the item's columns (up to [`NB`], for each B); each weight
//! element is broadcast to a whole vector of rows. The register tile is [`NJ_NARROW`] weight
//! rows × 32 rows (16 accumulators): 2 vector loads and 8 broadcasts per 16 FMAs, no horizontal
//! sums; or [`NJ_WIDE`] weight rows (24 accumulators, 12 broadcasts per 24 FMAs), which the
//! L1's ways favour less than the load ratio suggests (see [`super::Tuning::wb_narrow`]). An
//! item's last 16-row tile after a 32-row one runs with it as one register tile of 48 rows
//! where [`fuses`] says so.
//!
//! # Blocking
//!
//! Per A block (as much of K as 256 KiB of packed rows holds: 256 rows × 256, 32 rows × 2048): the
//! item's rows are packed into row tiles of 32 (a 16-row tile for a remainder of at most 16; zero
//! rows past the item), unless they come packed ahead over all of K ([`super::RowPack::F32`],
//! shared by the expert's items; the same A blocks are walked). Then, for each B, each stripe of
//! `NJ` weight rows and each chunk of [`KC_WB`] along the A block, every row tile runs against the
//! chunk. f32 weight rows of a full stripe are read in place, `NJ` sequential streams that the
//! hardware prefetchers follow (and, with [`super::Tuning::wb_prefetch`], software prefetches into
//! L2 a chunk ahead: faster on Zen 4 and on Emerald Rapids); bf16/f16 and a partial last stripe
//! are widened into a `[NJ][KC_WB]` buffer (at most 12 KiB), while the next chunk's weight rows are
//! fetched into L2. The results accumulate transposed (`[column][MB]`, chunks added in K order) and
//! are transposed into the caller's `[row][NB]` tiles at the end of the item. Stack: 657 KiB.
//!
//! An item of `uq + r` rows would leave `u - r` lanes of its last unit idle (`u` = 8 with
//! [`super::Tuning::wb_half`]'s 8-lane units, else 16); with f32 elements and `r` at most
//! [`super::Tuning::wb_dot_rows`] (and [`DOT_ROWS`]), the tiles take the `uq` rows
//! ([`tiled_rows`]) and the last `r` run as dot products (K in the 16 lanes, [`dot_chunk`])
//! against each chunk of weight rows right after the tiles, while it is in L1; their 16-lane
//! sums are kept over the A block (a `[row][NJ]` buffer per stripe, 5 KiB) and added across
//! the lanes at the stripe's last chunk. (Before 2026-12-06 they ran after the stripe's last
//! chunk over the whole A block, the weight rows read again from L2: 3 times a tiled row's
//! cost per row in cache, now 1.6 times; the same sums in the same order, the same bits.)
//!
//! # Determinism
//!
//! Every output element is one sequential sum over k per K block (for the dot-product rows: 16
//! lane sums over the A block, added across the lanes in a fixed order), the blocks added in K
//! order; the blocking depends only on the item's shape: the same bits whatever the thread
//! count.

use super::avx512::{ct_to_tiles, load16, prefetch_l2, transpose16};
use super::{Aligned, Block, DOT_ROWS, MB, NB, Out, tiled_rows};
use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use moe_core::Element;

/// Weight rows (columns of the result) per stripe and register tile: [`NJ_WIDE`], or
/// [`NJ_NARROW`] where [`super::Tuning::wb_narrow`] says so.
pub(crate) const NJ_WIDE: usize = 12;
/// Weight rows per stripe where [`super::Tuning::wb_narrow`] says so (both presets): the
/// stripe's rows are read in place at a stride of K floats, a multiple of 4 KiB for most of the
/// models' K, so they all map to the same L1 set, and 12 of them do not fit in 8 ways (Zen 4)
/// or fill all 12 (Emerald Rapids), evicting the packed rows' lines there.
pub(crate) const NJ_NARROW: usize = 8;
/// K block.
pub(crate) const KC_WB: usize = 256;
/// Rows per full row tile (two 16-lane vectors).
pub(super) const RT: usize = 32;
/// Floats of the packed rows' buffer (256 KiB): [`MB`] rows of one [`KC_WB`] chunk, or fewer
/// rows of a longer A block.
const A_BUF: usize = MB * KC_WB;

/// Lines `first..end` of NJ weight rows (`base + j * stride`) to fetch into L2 during a
/// microkernel call, one line of every row per 16 steps (also used by the `vdpbf16ps` twin).
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    pub(super) base: *const u8,
    pub(super) stride: usize,
    pub(super) first: usize,
    pub(super) end: usize,
}

/// The shape of row tile `t` of `mb` rows: (16-lane vectors, 8-lane halves) = lanes / 16 and
/// (lanes % 16) / 8, the lanes covering the tile's `mb - t * RT` rows (at most [`RT`]) in units
/// of 16, or of 8 with `unit8` (the `vdpbf16ps` kernel, whose 8-lane `ymm` half runs at half a
/// 16-lane instruction's cost on Zen 4: fewer lanes wasted on an item's last rows).
#[inline]
pub(super) fn tile_shape(mb: usize, t: usize, unit8: bool) -> (usize, usize) {
    let rem = (mb - t * RT).min(RT);
    if unit8 {
        let w8 = rem.div_ceil(8);
        (w8 / 2, w8 % 2)
    } else {
        (rem.div_ceil(16), 0)
    }
}

/// Pack the 16-row groups `groups` (all: `0..mb.div_ceil(16)`) of `mb` rows of one A block
/// into row tiles of [`RT`] 32-bit lanes: tile `t` at `ap + t * kr * RT`, of the shape
/// [`tile_shape`] gives (`mv` 16-lane vectors, `h` 8-lane halves): `[r][16 · mv]` for
/// `r < kac`, then (if `h`) `[r][8]` at `16 · mv · kr`; lanes past `mb` zero. `load(i, c)`
/// gives the 32-bit elements `c..c + 16` of the item's row `i` in this block (zeros past its
/// end): f32 elements here, bf16 pairs in the `vdpbf16ps` twin (`unit8`). 16 × 16 in-register
/// transposes. With `kr = kac =` K' (all of K), this is the layout of [`super::RowPack`].
///
/// # Safety
/// `ap` is 64-byte aligned and valid for writes of `mb.div_ceil(RT) * kr * RT` floats;
/// `kac <= kr`; `groups.end <= mb.div_ceil(16)`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pack_row_tiles(
    ap: *mut f32,
    mb: usize,
    kr: usize,
    kac: usize,
    unit8: bool,
    groups: core::ops::Range<usize>,
    load: impl Fn(usize, usize) -> __m512,
) {
    debug_assert!(groups.end <= mb.div_ceil(16));
    for g in groups {
        let (t, half) = (g / 2, g % 2);
        let (mv, h) = tile_shape(mb, t, unit8);
        let tile = ap.wrapping_add(t * kr * RT);
        let mut c = 0;
        while c < kac {
            let mut r = [_mm512_setzero_ps(); 16];
            for (ii, v) in r.iter_mut().enumerate().take(mb - g * 16) {
                *v = load(g * 16 + ii, c);
            }
            transpose16(&mut r);
            for (q, v) in r.iter().enumerate().take(kac - c) {
                if half < mv {
                    // SAFETY: tile t < mb.div_ceil(RT), row c + q < kac <= kr of 16 · mv
                    // lanes, lanes half * 16.. (half < mv): inside the caller's buffer, 64-byte
                    // aligned.
                    unsafe { _mm512_store_ps(tile.add((c + q) * 16 * mv + half * 16), *v) };
                } else {
                    debug_assert!(h == 1 && half == mv);
                    // SAFETY: the tile's 8-lane half (h = 1: at most 8 rows here), row c + q <
                    // kr of 8 lanes after the 16 · mv · kr of the vectors: inside the tile's
                    // RT · kr floats, 32-byte aligned.
                    unsafe {
                        _mm256_store_ps(
                            tile.add(16 * mv * kr + (c + q) * 8),
                            _mm512_castps512_ps256(*v),
                        )
                    };
                }
            }
            c += 16;
        }
    }
}

/// [`super::pack_rows`] for [`super::RowPack::F32`]: the rows widened to f32, all of K.
///
/// # Safety
/// As [`super::pack_rows`], on a CPU with the features below.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn pack_rows<T: Element>(
    a: &[T],
    a_rows: &[usize],
    k: usize,
    half: bool,
    groups: core::ops::Range<usize>,
    dst: *mut f32,
) {
    // SAFETY: the caller's buffer holds len(a_rows.len(), k) = tiles * k * RT floats, 64-byte
    // aligned; `load16` reads only inside the row's slice (checked against `a`).
    unsafe {
        pack_row_tiles(dst, a_rows.len(), k, k, half, groups, |i, c| {
            load16(&a[a_rows[i] * k..(a_rows[i] + 1) * k], c)
        })
    }
}

/// The dot-product rows' 16-lane partial sums over one chunk: `p[i * ps + j] (=|+=)` lane `l`
/// of `a[i][16 s + l] · w[j * ws + 16 s + l]` summed over the steps `s` (`16 s + l < kc`), for
/// the `R` rows `a[i]` and the `J` weight rows at `w`, in that order after the chunks before
/// (`first`: none).
///
/// # Safety
/// Each `a[i]` is valid for reads of `kc` floats, `w` for `J` rows of `kc` floats at stride
/// `ws`; `p` for `R` rows of `J` vectors at stride `ps`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_group<const R: usize, const J: usize>(
    a: [*const f32; R],
    w: *const f32,
    ws: usize,
    kc: usize,
    p: *mut __m512,
    ps: usize,
    first: bool,
) {
    // SAFETY: every load reads inside the first `kc` floats of its row (the last step masked:
    // masked-off elements are not read); `p` as the caller says.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = *p.add(i * ps + j);
                }
            }
        }
        let mut k = 0;
        while k < kc {
            let m: __mmask16 = if kc - k >= 16 { 0xFFFF } else { (1u16 << (kc - k)) - 1 };
            let mut av = [_mm512_setzero_ps(); R];
            for (x, q) in av.iter_mut().zip(a) {
                *x = _mm512_maskz_loadu_ps(m, q.add(k));
            }
            for j in 0..J {
                let wv = _mm512_maskz_loadu_ps(m, w.add(j * ws + k));
                for (row, &x) in acc.iter_mut().zip(av.iter()) {
                    row[j] = _mm512_fmadd_ps(x, wv, row[j]);
                }
            }
            k += 16;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                *p.add(i * ps + j) = x;
            }
        }
    }
}

/// The rows past an item's [`tiled_rows`] (`rows`, at most [`DOT_ROWS`]; f32 activations `a`,
/// row length `k`) against one chunk of a stripe's `NJ` weight rows (`w`, stride `ws`, just
/// read by the row tiles: in L1), over `k0..k0 + kc`: their 16-lane partial sums added into
/// `p` (`[row][NJ]`; `first`: the A block's first chunk). All the rows in one group against as
/// many weight rows at a time as keep 24 accumulators (5 rows: 3 passes of 4 weight rows, 27
/// loads per 60 FMAs; in groups of 2 rows against 12 it was 41), the rows reloaded (from L1)
/// per pass; with 8 weight rows, 7 rows as 4 + 3.
///
/// # Safety
/// Every row lies in `a`'s slice, `k0 + kc <= k`; `w` holds `NJ` rows of `kc` floats at stride
/// `ws`; `p` is valid for `rows.len() * NJ` vectors.
#[inline]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_chunk<const NJ: usize>(
    a: &[f32],
    rows: &[usize],
    k: usize,
    k0: usize,
    kc: usize,
    w: *const f32,
    ws: usize,
    p: *mut __m512,
    first: bool,
) {
    debug_assert!(rows.len() <= DOT_ROWS && k0 + kc <= k);
    let arow = |i: usize| a[rows[i] * k + k0..][..kc].as_ptr();
    let wide = NJ == NJ_WIDE;
    // All the rows in one group (the arms below choose the weight rows per pass), but 7 rows
    // against 8 weight rows as 4 + 3 (7 against 2 at a time would take 4 passes).
    let groups: &[(usize, usize)] = match rows.len() {
        7 if !wide => &[(0, 4), (4, 3)],
        n => &[(0, n)],
    };
    for &(i0, g) in groups {
        let pg = p.wrapping_add(i0 * NJ);
        macro_rules! go {
            ($r:literal, $j:expr) => {{
                let ar: [*const f32; $r] = core::array::from_fn(|i| arow(i0 + i));
                let mut jb = 0;
                while jb < NJ {
                    debug_assert!(NJ % $j == 0);
                    // SAFETY: each row pointer is valid for kc floats (sliced above); weight
                    // rows jb..jb + J <= NJ (J = $j divides NJ) of `w`, and the group's rows of
                    // `p` at columns jb..jb + J, as the caller passes them; same features.
                    unsafe {
                        dot_group::<$r, { $j }>(
                            ar,
                            w.wrapping_add(jb * ws),
                            ws,
                            kc,
                            pg.wrapping_add(jb),
                            NJ,
                            first,
                        )
                    };
                    jb += $j;
                }
            }};
        }
        match (g, wide) {
            (1, _) => go!(1, NJ),
            (2, _) => go!(2, NJ),
            (3, true) => go!(3, 6),
            (3, false) => go!(3, NJ),
            (4, true) => go!(4, 6),
            (4, false) => go!(4, 4),
            (5, _) => go!(5, 4),
            (6, _) => go!(6, 4),
            _ => go!(7, 3),
        }
    }
}

/// `ct[j * MB + v * 16..][..16] (=|+=) acc[j][v]`: a weight-broadcast register tile into the
/// transposed results (`ct` 64-byte aligned). Taken by value, as `dpbf16`'s `store` explains.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_ct<const NJ: usize, const MV: usize>(
    acc: [[__m512; MV]; NJ],
    ct: *mut f32,
    first: bool,
) {
    for (j, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            // SAFETY: the caller passes NJ rows of at least 16 · MV floats at stride MB from
            // `ct`, 64-byte aligned.
            unsafe {
                let p = ct.add(j * MB + v * 16);
                if first {
                    _mm512_store_ps(p, x);
                } else {
                    _mm512_store_ps(p, _mm512_add_ps(_mm512_load_ps(p), x));
                }
            }
        }
    }
}

/// `ct[j * MB + v * 16 + l] (+)= sum_{k < kc} w[j * ws + k] at[k * 16 * MV + v * 16 + l]`
/// for `j < NJ`, `v < MV`, `l < 16`, and with `H = 1` the same for the tile's 8-lane half
/// (`ah[k * 8 + l]`, `l < 8`, into `ct[j * MB + 16 * MV + l]`). With `MT > MV` the register
/// tile also takes the next row tile's `MT - MV` vectors (`at2[k * 16 * (MT - MV) + ..]`, into
/// lanes `16 * MV..16 * MT` of `ct`, where that tile's results lie), and then `H = 0`: one
/// pass over the weight rows for both tiles (see [`fuses`]). `more`: (first byte, count) of
/// another item's lines to fetch into L2 meanwhile, one per 4 steps of k.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<
    const NJ: usize,
    const MT: usize,
    const MV: usize,
    const H: usize,
    const PF: bool,
>(
    at: *const f32,
    at2: *const f32,
    ah: *const f32,
    w: *const f32,
    ws: usize,
    kc: usize,
    ct: *mut f32,
    first: bool,
    pf: Prefetch,
    more: (*const u8, usize),
) {
    const { assert!(MT >= MV && (MT == MV || H == 0)) };
    // SAFETY: the caller passes a packed row tile of kc × 16·MV floats (64-byte aligned rows)
    // and, with H = 1, its half of kc × 8 floats (32-byte aligned rows), with MT > MV the next
    // tile's kc × 16·(MT - MV) floats (64-byte aligned rows), NJ weight rows of at least kc
    // floats at stride ws, and NJ rows of at least 16·MT + 8·H floats at stride MB from `ct`
    // (64-byte aligned). Prefetches never fault.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); MT]; NJ];
        let mut acch = [[_mm256_setzero_ps(); H]; NJ];
        let mut ak = at;
        let mut ak2 = at2;
        let mut hk = ah;
        let mut wk = w;
        let mut k = 0;
        // `more`: another item's lines, one per step of 4 k (see `super::Assist`).
        let (mp, mn) = more;
        let mut mi = 0;
        while k < kc {
            if mi < mn {
                prefetch_l2(mp.wrapping_add(mi * 64));
                mi += 1;
            }
            if PF && k % 16 == 0 {
                // One line of each of the next chunk's weight rows per 16 steps, into L2.
                let l = pf.first + k / 16;
                if l < pf.end {
                    for j in 0..NJ {
                        prefetch_l2(pf.base.wrapping_add(j * pf.stride + l * 64));
                    }
                }
            }
            // Steps of 4 k (1 at the end): each weight row's address is formed once per 4
            // broadcasts instead of once per broadcast (the stride is a runtime value). The
            // same sums in the same order.
            let u = if kc - k >= 4 { 4 } else { 1 };
            for q in 0..u {
                let mut a = [_mm512_setzero_ps(); MT];
                for (v, x) in a.iter_mut().enumerate() {
                    *x = if v < MV {
                        _mm512_load_ps(ak.add(v * 16))
                    } else {
                        _mm512_load_ps(ak2.add((v - MV) * 16))
                    };
                }
                let mut ha = [_mm256_setzero_ps(); H];
                for x in ha.iter_mut() {
                    *x = _mm256_load_ps(hk);
                }
                for (j, (row, hrow)) in acc.iter_mut().zip(acch.iter_mut()).enumerate() {
                    let wv = *wk.add(j * ws + q);
                    let b = _mm512_set1_ps(wv);
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_fmadd_ps(a[v], b, *x);
                    }
                    for (x, &av) in hrow.iter_mut().zip(ha.iter()) {
                        *x = _mm256_fmadd_ps(av, _mm256_set1_ps(wv), *x);
                    }
                }
                ak = ak.add(16 * MV);
                if MT > MV {
                    ak2 = ak2.add(16 * (MT - MV));
                }
                hk = hk.add(8 * H);
            }
            wk = wk.add(u);
            k += u;
        }
        store_ct(acc, ct, first);
        store_ct_half(acch, ct.add(16 * MV), first);
    }
}

/// `ct[j * MB..][..8] (=|+=) acc[j]` for the 8-lane halves of a register tile (`ct` 32-byte
/// aligned).
#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn store_ct_half<const NJ: usize, const H: usize>(
    acc: [[__m256; H]; NJ],
    ct: *mut f32,
    first: bool,
) {
    for (j, row) in acc.iter().enumerate() {
        for &x in row {
            // SAFETY: the caller passes NJ rows of at least 8 floats at stride MB from `ct`,
            // 32-byte aligned.
            unsafe {
                let p = ct.add(j * MB);
                if first {
                    _mm256_store_ps(p, x);
                } else {
                    _mm256_store_ps(p, _mm256_add_ps(_mm256_load_ps(p), x));
                }
            }
        }
    }
}

/// Whether an item's last two row tiles, of 2 vectors and of 1 (17-32 and 9-16 rows, or 1-16
/// without the 8-lane halves), run as one register tile of 3 vectors × `NJ` weight rows (24
/// accumulators: 3 loads and 8 broadcasts per 24 FMAs, where the 1-vector tile alone takes 9
/// loads per 8 FMAs and 8 accumulators, as many as the FMAs' latency needs in flight):
/// [`super::Tuning::wb_fuse`] with 8 weight rows per stripe (12 would take 36 accumulators).
/// The same sums in the same order: the same bits.
#[inline]
fn fuses(nj: usize, tuning: super::Tuning) -> bool {
    tuning.wb_fuse && nj == NJ_NARROW
}

/// One work item with the weight-broadcast kernel (see the module docs).
///
/// # Safety
/// As [`super::run_block`], on a CPU with the features below; `blk.k > 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx2")]
pub(crate) unsafe fn run_block<T: Element, const NJ: usize>(
    blk: &Block<'_, T>,
    out: Out,
    tuning: super::Tuning,
    mut assist: Option<&mut dyn super::Assist>,
) {
    let (half, prefetch) = (tuning.wb_half, tuning.wb_prefetch);
    let fuse = fuses(NJ, tuning);
    const { assert!(NJ <= NJ_WIDE && NB.is_multiple_of(NJ)) };
    let (k, mb, nb, n0) = (blk.k, blk.a_rows.len(), blk.nb, blk.n0);
    debug_assert!(k > 0 && mb > 0 && mb <= MB && nb <= NB);
    // The rows in row tiles; the rest (f32 only) as dot products.
    let dots = if T::DTYPE == moe_core::DType::F32 { tuning.wb_dot_rows } else { 0 };
    let (all, mb) = (mb, tiled_rows(mb, half, dots));
    // Packed rows of one A block: tile t at t * ka * RT, `[k][16 · MV]`.
    let mut a_buf = MaybeUninit::<Aligned<{ A_BUF }>>::uninit();
    // Transposed results, `[bi][column][MB]`.
    let mut c_buf = MaybeUninit::<Aligned<{ 2 * NB * MB }>>::uninit();
    // One chunk of a stripe of weight rows, `[NJ][KC_WB]`.
    let mut w_buf = MaybeUninit::<Aligned<{ NJ_WIDE * KC_WB }>>::uninit();
    let ap = a_buf.as_mut_ptr() as *mut f32;
    let cp = c_buf.as_mut_ptr() as *mut f32;
    let wp = w_buf.as_mut_ptr() as *mut f32;
    // The dot-product rows' 16-lane partial sums for the current stripe, `[row][NJ]`.
    let mut p_buf = MaybeUninit::<Aligned<{ DOT_ROWS * NJ_WIDE * 16 }>>::uninit();
    let tiles = mb.div_ceil(RT);
    let stripes = nb.div_ceil(NJ);
    // The A block: as much of K as the packing buffer holds for this item's rows, so that few
    // rows walk each stripe's weight rows over long runs.
    let ka = (A_BUF / (tiles * RT) / KC_WB * KC_WB).max(KC_WB);
    let bis: &[usize] = match (blk.b[0].is_some(), blk.b[1].is_some()) {
        (true, true) => &[0, 1],
        (true, false) => &[0],
        (false, true) => &[1],
        (false, false) => return,
    };
    // Chunks in the order they run: (A block, B, stripe, chunk), the last index fastest.
    let chunks_of = |a0: usize| (ka.min(k - a0)).div_ceil(KC_WB);
    let next = |(a0, b, s, c): (usize, usize, usize, usize)| {
        if c + 1 < chunks_of(a0) {
            Some((a0, b, s, c + 1))
        } else if s + 1 < stripes {
            Some((a0, b, s + 1, 0))
        } else if b + 1 < bis.len() {
            Some((a0, b + 1, 0, 0))
        } else if a0 + ka < k {
            Some((a0 + ka, 0, 0, 0))
        } else {
            None
        }
    };
    // Rows packed ahead (all of K; tile t at t * k * RT), or packed here per A block.
    let pre = match blk.packed {
        Some((rp @ super::RowPack::F32(h, _), p)) if h == half && rp.rows(all) == mb => {
            assert!(p.len() >= rp.len(mb, k), "packed rows too short");
            Some(p.as_ptr())
        }
        _ => None,
    };
    let mut cur = Some((0, 0, 0, 0));
    while let Some((a0, b, s, c)) = cur {
        let bi = bis[b];
        let k0 = a0 + c * KC_WB;
        let kc = KC_WB.min(k - k0);
        if pre.is_none() && b == 0 && s == 0 && c == 0 {
            // Pack the rows of this A block.
            let kac = ka.min(k - a0);
            // SAFETY: the A buffer holds tiles * ka * RT <= A_BUF floats, 64-byte aligned;
            // kac <= ka; rows i < mb; same features for `load16`, which reads only inside
            // `src`.
            unsafe {
                pack_row_tiles(ap, mb, ka, kac, half, 0..mb.div_ceil(16), |i, c| {
                    let row = blk.a_rows[i];
                    let src = &blk.a[row * k + a0..row * k + a0 + kac];
                    load16(src, c)
                })
            };
        }
        let bw = blk.b[bi].unwrap_or(&[]);
        let j0 = s * NJ;
        // Rows past nb repeat the last one in the prefetch (a prefetch never faults).
        let mut pf = Prefetch { base: core::ptr::null(), stride: 0, first: 0, end: 0 };
        let mut lines = 0;
        cur = next((a0, b, s, c));
        // f32 weight rows of a full stripe are read in place (followed by the hardware
        // prefetchers, and where `tuning.wb_prefetch` says so also fetched a chunk ahead into
        // L2); other stripes are copied (widened), the next chunk's weight rows fetched into L2
        // meanwhile.
        let inplace = T::DTYPE == moe_core::DType::F32 && j0 + NJ <= nb;
        let swpf = !inplace || prefetch;
        if swpf && let Some((pa0, pb, ps, pc)) = cur {
            let pk0 = pa0 + pc * KC_WB;
            let pw = blk.b[bis[pb]].unwrap_or(&[]);
            let prow = n0 + (ps * NJ).min(nb - 1);
            pf.base = pw.as_ptr().wrapping_add(prow * k + pk0) as *const u8;
            pf.stride = if ps * NJ + NJ <= nb { k * core::mem::size_of::<T>() } else { 0 };
            lines = (KC_WB.min(k - pk0) * core::mem::size_of::<T>()).div_ceil(64);
        }
        let (wsrc, ws) = if inplace {
            (bw[(n0 + j0) * k + k0..][..(NJ - 1) * k + kc].as_ptr() as *const f32, k)
        } else {
            for jj in 0..NJ {
                let dst = wp.wrapping_add(jj * KC_WB);
                let src: &[T] =
                    if j0 + jj < nb { &bw[(n0 + j0 + jj) * k + k0..][..kc] } else { &[] };
                let mut x = 0;
                while x < kc {
                    // SAFETY: same features; `load16` reads only inside `src` (zeros past
                    // it); row jj < NJ of the chunk, x + 16 <= KC_WB: inside the buffer,
                    // 64-byte aligned.
                    unsafe { _mm512_store_ps(dst.add(x), load16(src, x)) };
                    x += 16;
                }
            }
            (wp as *const f32, KC_WB)
        };
        let first = k0 == 0;
        let cb = cp.wrapping_add(bi * NB * MB + j0 * MB);
        // Tile t's packed rows of this chunk: its vectors and its 8-lane half.
        let tile_at = |t: usize| {
            let (mv, _) = tile_shape(mb, t, half);
            match pre {
                Some(p) => {
                    let tile = p.wrapping_add(t * k * RT);
                    (tile.wrapping_add(k0 * 16 * mv), tile.wrapping_add(16 * mv * k + k0 * 8))
                }
                None => {
                    let tile = (ap as *const f32).wrapping_add(t * ka * RT);
                    let c = k0 - a0;
                    (tile.wrapping_add(c * 16 * mv), tile.wrapping_add(16 * mv * ka + c * 8))
                }
            }
        };
        let mut t = 0;
        while t < tiles {
            let (mv, h) = tile_shape(mb, t, half);
            // The last two tiles as one register tile of 3 vectors (see `fuses`).
            let two = fuse
                && t + 2 == tiles
                && (mv, h) == (2, 0)
                && tile_shape(mb, t + 1, half) == (1, 0);
            let (at, ah) = tile_at(t);
            let at2 = if two { tile_at(t + 1).0 } else { at };
            let ct = cb.wrapping_add(t * RT);
            let span = if two { 2 } else { 1 };
            pf.first = t * lines / tiles;
            pf.end = (t + span) * lines / tiles;
            let more = match assist.as_deref_mut() {
                Some(a) => a.lines(kc.div_ceil(4)),
                None => (core::ptr::null(), 0),
            };
            // SAFETY: tile t holds k-rows k0 - a0..k0 - a0 + kc of 16 · mv floats and, if h, of
            // 8 floats after them (packed above for this A block, or rows k0..k0 + kc of all of
            // K packed ahead: length checked), and when fused tile t + 1 those rows of 16
            // floats; `wsrc` holds NJ rows of kc floats at stride ws (in place: the weight
            // rows n0 + j0.., checked by the slice above; else the chunk); the Cᵀ rows j0..j0 +
            // NJ <= NB (NB is a multiple of NJ) have room for 16 · mv + 8 · h <= 32 rows from t
            // * 32 < MB, or when fused 48 from t * 32 (tile t + 1 < tiles starts below MB and
            // takes 16 of its 32 rows).
            unsafe {
                macro_rules! go {
                    ($pf:literal) => {
                        match (mv, h, two) {
                            (2, _, true) => micro::<NJ, 3, 2, 0, $pf>(
                                at, at2, ah, wsrc, ws, kc, ct, first, pf, more,
                            ),
                            (2, _, _) => micro::<NJ, 2, 2, 0, $pf>(
                                at, at2, ah, wsrc, ws, kc, ct, first, pf, more,
                            ),
                            (1, 1, _) => micro::<NJ, 1, 1, 1, $pf>(
                                at, at2, ah, wsrc, ws, kc, ct, first, pf, more,
                            ),
                            (1, _, _) => micro::<NJ, 1, 1, 0, $pf>(
                                at, at2, ah, wsrc, ws, kc, ct, first, pf, more,
                            ),
                            _ => micro::<NJ, 0, 0, 1, $pf>(
                                at, at2, ah, wsrc, ws, kc, ct, first, pf, more,
                            ),
                        }
                    };
                }
                if swpf { go!(true) } else { go!(false) }
            }
            t += span;
        }
        if all > mb {
            // The rows past the tiles against the same chunk of weight rows (in L1 now),
            // their lane sums kept over the A block; at the stripe's last chunk of the block,
            // added across the lanes into the results.
            let a32: &[f32] = bytemuck::cast_slice(blk.a);
            let pp = p_buf.as_mut_ptr() as *mut __m512;
            // SAFETY: f32 elements (`dots` is 0 otherwise); the rows lie in `a` (sliced
            // inside), k0 + kc <= k; `wsrc` holds NJ rows of kc floats at stride ws (above);
            // the partial sums' buffer holds DOT_ROWS * NJ_WIDE vectors, 64-byte aligned.
            unsafe {
                dot_chunk::<NJ>(a32, &blk.a_rows[mb..all], k, k0, kc, wsrc, ws, pp, k0 == a0)
            };
            if c + 1 == chunks_of(a0) {
                let cols = NJ.min(nb - j0);
                for i in 0..all - mb {
                    for j in 0..cols {
                        // SAFETY: vector i * NJ + j < DOT_ROWS * NJ_WIDE of the buffer, written
                        // above; column j0 + j < nb <= NB, row mb + i < all <= MB of the
                        // Cᵀ block.
                        unsafe {
                            let x = _mm512_reduce_add_ps(*pp.add(i * NJ + j));
                            let q = cb.add(j * MB + mb + i);
                            *q = if a0 == 0 { x } else { *q + x };
                        }
                    }
                }
            }
        }
        if let Some(a) = assist.as_deref_mut() {
            a.between();
        }
    }
    // SAFETY: every stripe (stripes * NJ columns) of the Cᵀ block of each present B was
    // written above for every row tile; the caller's tiles hold mb rows of NB floats.
    unsafe {
        let present = [blk.b[0].is_some(), blk.b[1].is_some()];
        ct_to_tiles(cp, present, out, all, nb, stripes * NJ)
    };
}

const _: () = assert!(NB.is_multiple_of(16) && MB.is_multiple_of(RT));
const _: () = assert!(KC_WB.is_multiple_of(16));

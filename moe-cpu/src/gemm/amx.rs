//! bf16 work items on the AMX tile unit (`tdpbf16ps`: bf16 × bf16 products, f32 sums).
//!
//! # Layout
//!
//! The weights are `[N, K]`, K-contiguous: the layout of an AMX "A" operand (16 rows of 32
//! bf16), so the weights need no interleaving: per K block and pair of 16-row n-tiles, the
//! weight rows are copied (with zero padding past the item's columns and the K block) into a
//! tile-ordered L1 buffer, while the next pair's rows are prefetched into L2 (a line per line
//! copied). Items of at most [`DIRECT_MAX_ROWS`] rows skip that copy for full tiles (16 weight
//! rows present, K block a multiple of 32): `tileloadd` reads them in place with the weights'
//! row stride, double-buffered, with the lines a few k-steps ahead fetched into L1
//! ([`kernel_direct`]), so the weights are read once instead of read, written and read again.
//! The activation rows play the "B" operand: per K block of [`KA`] (for items whose tiles are
//! all read in place, as long a block as the buffer allows, up to [`KA_DIRECT_MAX`]), the
//! item's rows are gathered and packed once into the VNNI layout (pairs of K interleaved:
//! `[m-tile][k-step][k/2][16 rows][2]`, 16 × 16 transposes of 32-bit pairs) and reused by
//! every weight tile. Each `tdpbf16ps` thus computes a transposed 16 × 16 result tile
//! `Cᵀ[n][m]`; the item accumulates `Cᵀ` over K in f32 (2 × 2 tiles in registers, stored
//! between K blocks), then transposes it into the caller's `[row][NB]` tiles, where the stage's
//! usual epilogue runs.
//!
//! Tails: weight rows past the item's columns, activation rows past the item's rows and K
//! positions past the K block are packed as zeros, so padding contributes exact zeros.
//!
//! # Determinism
//!
//! Every output element is summed in a fixed order (K blocks in order, k-steps of 32 in order,
//! the tile unit's fixed order within a step) by exactly one work item: the same bits whatever
//! the thread count. The tile unit flushes denormal inputs and results to zero (bf16 rules).
//!
//! # Availability
//!
//! [`available`]: CPUID says AMX-TILE and AMX-BF16 (and the AVX-512 the packing uses), the OS
//! enables the tile state in XCR0 (bits 17 and 18), Linux grants this process the tile-data
//! permission (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once), and the
//! environment variable `MOE_CPU_AMX` is not `0`. Otherwise [`super::Isa::Amx`] is not
//! available and the AVX-512 kernels run (the explicit fallback).

use super::{Aligned, Block, MB, NB, Out};
use core::arch::asm;
use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use moe_core::Element;
use std::sync::OnceLock;

/// K block of the AMX path (a multiple of 32): the packed rows take `MB × KA × 2` bytes (L2).
pub(crate) const KA: usize = 512;
/// Up to this many rows (at most 8 m-tiles), full weight tiles are read in place from the
/// weights by [`kernel_direct`] instead of being copied first: with so few reuses the copy is a
/// second pass over the weights that costs more than the strided tile loads (measured on the
/// Mixtral and gpt-oss shapes: 256 rows lose, 32 to 128 win).
pub(crate) const DIRECT_MAX_ROWS: usize = 128;
/// Longest K block of items whose weight tiles are all read in place (at most
/// [`DIRECT_MAX_ROWS`] rows): the packed rows' buffer (`MB × KA` bf16) holds `MB × KA / rows`
/// K positions of the item's rows (rows rounded up to 16; the block rounded down to 32), up to
/// this many. On a 2-core slice of an AMX Xeon (Emerald
/// Rapids), bf16 expert GEMMs in interleaved runs, 512 vs this longer block: gpt-oss T=1024
/// 360 / 280 ms and 378 / 313, gpt-oss T=128 90 / 78 and 107 / 91, Qwen3 T=128 69 / 62 and
/// 73 / 68, DeepSeek-V3 T=1024 842 / 815 and 1079 / 943, Mixtral T=128 202 / 255, 276 / 287 and
/// 333 / 281 (best of 3-6 rounds; 13 of 15 such pairs faster, the same bits). Mixtral T=1024,
/// whose items all have more than 128 rows and so run the same code either way, gave the
/// noise of such a pair: 692 / 675 and 1300 / 1249.
pub(crate) const KA_DIRECT_MAX: usize = 8192;
/// K-steps ahead that [`kernel_direct`] fetches its weight lines into L1.
const PREFETCH_STEPS: usize = 8;
/// bf16 per k-step (one tile row: 64 bytes).
const KT: usize = 32;
/// Rows (and columns) of a tile.
const TR: usize = 16;

const _: () = assert!(KA.is_multiple_of(KT) && MB.is_multiple_of(TR) && NB.is_multiple_of(TR));

/// Whether this process can run the AMX-BF16 kernels (see the module docs); the first call
/// asks Linux for the tile-data permission.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("MOE_CPU_AMX").is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        super::Isa::Avx512.available() && cpu_has_amx_bf16() && os_enables_tiles() && request_perm()
    })
}

/// CPUID: leaf 7 present, AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
fn cpu_has_amx_bf16() -> bool {
    // SAFETY: CPUID exists on every x86-64 CPU (the function is safe in newer toolchains).
    #[allow(unused_unsafe)]
    let (max, l7) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0)) };
    max >= 7 && (l7.edx >> 22) & 1 == 1 && (l7.edx >> 24) & 1 == 1
}

/// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA), read only when the OS uses XSAVE (CPUID.1 ECX
/// bit 27, OSXSAVE; otherwise `xgetbv` faults).
fn os_enables_tiles() -> bool {
    // SAFETY: CPUID exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let osxsave = unsafe { __cpuid(1).ecx >> 27 } & 1 == 1;
    if !osxsave {
        return false;
    }
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        // SAFETY: the caller checked OSXSAVE, so `xgetbv` with ECX = 0 is allowed.
        unsafe { _xgetbv(0) }
    }
    // SAFETY: OSXSAVE set means the CPU has XSAVE (the function's feature) and XGETBV works.
    let x = unsafe { xcr0() };
    (x >> 17) & 3 == 3
}

/// Ask Linux for the AMX tile-data permission for this process (once; all threads).
#[cfg(target_os = "linux")]
fn request_perm() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, feature) takes two integers, touches no memory of
    // ours, and only extends this process's permitted XSAVE features; it fails with an error
    // code (handled: no AMX) on kernels or VMs that do not support it.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    r == 0
}

/// Other systems: no known way to ask for the tile state here, so no AMX.
#[cfg(not(target_os = "linux"))]
fn request_perm() -> bool {
    false
}

/// The tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileCfg([u8; 64]);

impl TileCfg {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // colsb (u16, little endian)
            c[48 + t] = TR as u8; // rows
            t += 1;
        }
        TileCfg(c)
    }
}

static CFG: TileCfg = TileCfg::new();

// Tile helpers. The tile registers are invisible to the compiler (it never uses them), so
// their contents persist between `asm!` blocks of one thread; `ldtilecfg` was run first.

/// `tmm{T} = 16 rows of 64 bytes at p, p + stride, ...`.
#[inline(always)]
unsafe fn tload<const T: u8>(p: *const u8, stride: usize) {
    // SAFETY: the caller guarantees 16 readable rows of 64 bytes at `p` with this stride and a
    // configured tile state.
    unsafe {
        asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride,
             options(nostack, preserves_flags, readonly))
    }
}

/// Store `tmm{T}` as 16 rows of 64 bytes at p, p + stride, ...
#[inline(always)]
unsafe fn tstore<const T: u8>(p: *mut u8, stride: usize) {
    // SAFETY: the caller guarantees 16 writable rows of 64 bytes at `p` with this stride.
    unsafe {
        asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) stride,
             options(nostack, preserves_flags))
    }
}

/// `tmm{T} = 0`.
#[inline(always)]
unsafe fn tzero<const T: u8>() {
    // SAFETY: needs a configured tile state (the caller's contract); touches no memory.
    unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, preserves_flags, nomem)) }
}

/// `tmm{C} += tmm{A} · tmm{B}` (bf16 pairs, f32 accumulation).
#[inline(always)]
unsafe fn tdp<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: needs a configured tile state (the caller's contract); touches no memory.
    unsafe {
        asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
             options(nostack, preserves_flags, nomem))
    }
}

/// The 2 × 2 (at most) register-tile kernel over one K block: `Cᵀ` tiles `(t, m)` for n-tiles
/// `t < NN` and m-tiles `m < MM` (tile `t * 2 + m`; weights in tiles 4 + t, packed rows in
/// 6 + m). Tiles live at `c + t * 16 * cs + m * 64` (row stride `cs` bytes); they start at zero
/// when `first`, else are loaded. Weight tile (t, s) is the 1 KiB at `w[t] + s * 1024`, packed
/// row tile (m, s) the 1 KiB at `a[m] + s * 1024`.
///
/// # Safety
/// A configured tile state; every pointer valid for the tiles it covers (see the caller).
#[inline(always)]
unsafe fn kernel<const NN: usize, const MM: usize>(
    c: *mut u8,
    cs: usize,
    first: bool,
    w: [*const u8; 2],
    a: [*const u8; 2],
    steps: usize,
) {
    // SAFETY: the caller's contract covers every tile address below.
    unsafe {
        let ct = |t: usize, m: usize| c.add(t * TR * cs + m * 64);
        if first {
            tzero::<0>();
            if MM == 2 {
                tzero::<1>();
            }
            if NN == 2 {
                tzero::<2>();
                if MM == 2 {
                    tzero::<3>();
                }
            }
        } else {
            tload::<0>(ct(0, 0), cs);
            if MM == 2 {
                tload::<1>(ct(0, 1), cs);
            }
            if NN == 2 {
                tload::<2>(ct(1, 0), cs);
                if MM == 2 {
                    tload::<3>(ct(1, 1), cs);
                }
            }
        }
        for s in 0..steps {
            let o = s * TR * 64;
            tload::<4>(w[0].add(o), 64);
            tload::<6>(a[0].add(o), 64);
            tdp::<0, 4, 6>();
            if MM == 2 {
                tload::<7>(a[1].add(o), 64);
                tdp::<1, 4, 7>();
            }
            if NN == 2 {
                tload::<5>(w[1].add(o), 64);
                tdp::<2, 5, 6>();
                if MM == 2 {
                    tdp::<3, 5, 7>();
                }
            }
        }
        tstore::<0>(ct(0, 0), cs);
        if MM == 2 {
            tstore::<1>(ct(0, 1), cs);
        }
        if NN == 2 {
            tstore::<2>(ct(1, 0), cs);
            if MM == 2 {
                tstore::<3>(ct(1, 1), cs);
            }
        }
    }
}

/// One n-tile by `MM` (at most 2) m-tiles over one K block, with the weight tile read in place:
/// k-step `s` of the tile is the 16 rows of 64 bytes at `w + s * 64`, `ws` bytes apart (the
/// `[N, K]` weights themselves). Double-buffered: even k-steps load the weight tile into tmm4 and
/// the packed rows into tmm6/tmm7, odd ones into tmm5 and tmm2/tmm3, so that a step's loads need
/// not wait for the previous step's products to release their tiles. `Cᵀ` tiles in tmm0/tmm1 at
/// `c + m * 64` (row stride `cs` bytes), zero when `first`, else loaded; packed row tile
/// (m, s) the 1 KiB at `a[m] + s * 1024`. When `prefetch`, each step fetches into L1 the weight
/// lines [`PREFETCH_STEPS`] k-steps ahead: of this tile, then of the next n-tile (the 16 rows
/// from `w + 16 * ws`, the next tile the caller runs).
///
/// # Safety
/// A configured tile state; every pointer valid for the tiles it covers (see the caller).
/// Prefetches never fault, whatever the address.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_direct<const MM: usize>(
    c: *mut u8,
    cs: usize,
    first: bool,
    w: *const u8,
    ws: usize,
    a: [*const u8; 2],
    steps: usize,
    prefetch: bool,
) {
    let fetch = |s: usize| {
        if prefetch {
            let sd = s + PREFETCH_STEPS;
            let line = if sd < steps {
                w.wrapping_add(sd * 64)
            } else {
                w.wrapping_add(TR * ws + (sd - steps) * 64)
            };
            for r in 0..TR {
                // SAFETY: SSE is part of the x86-64 baseline; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(r * ws) as *const i8) };
            }
        }
    };
    // SAFETY: the caller's contract covers every tile address below.
    unsafe {
        if first {
            tzero::<0>();
            if MM == 2 {
                tzero::<1>();
            }
        } else {
            tload::<0>(c, cs);
            if MM == 2 {
                tload::<1>(c.add(64), cs);
            }
        }
        let mut s = 0;
        while s < steps {
            let o = s * TR * 64;
            fetch(s);
            tload::<4>(w.add(s * 64), ws);
            tload::<6>(a[0].add(o), 64);
            if MM == 2 {
                tload::<7>(a[1].add(o), 64);
            }
            tdp::<0, 4, 6>();
            if MM == 2 {
                tdp::<1, 4, 7>();
            }
            if s + 1 < steps {
                let o = o + TR * 64;
                fetch(s + 1);
                tload::<5>(w.add(s * 64 + 64), ws);
                tload::<2>(a[0].add(o), 64);
                if MM == 2 {
                    tload::<3>(a[1].add(o), 64);
                }
                tdp::<0, 5, 2>();
                if MM == 2 {
                    tdp::<1, 5, 3>();
                }
            }
            s += 2;
        }
        tstore::<0>(c, cs);
        if MM == 2 {
            tstore::<1>(c.add(64), cs);
        }
    }
}

/// 32 bf16 of `src` from `at` as 16 pairs (fewer left: zeros).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn load_pairs(src: &[u16], at: usize) -> __m512 {
    let n = src.len().saturating_sub(at).min(KT);
    let m: __mmask32 = if n == KT { u32::MAX } else { (1u32 << n) - 1 };
    // SAFETY: masked-off lanes are not read; the `n` lanes read lie in `src`.
    unsafe {
        _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, src.as_ptr().add(at.min(src.len())) as _))
    }
}

/// One bf16 work item on the tile unit (see the module docs). `T` must be bf16.
///
/// # Safety
/// [`available`] returned true; the contract of [`super::run_block`] (rows in bounds, `out`
/// tiles of `a_rows.len() × NB` floats for each present B).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c,avx2")]
pub(crate) unsafe fn run_block<T: Element>(blk: &Block<'_, T>, out: Out) {
    debug_assert!(T::DTYPE == moe_core::DType::BF16 && blk.k > 0);
    let a: &[u16] = bytemuck::cast_slice(blk.a);
    let (k, mb, nb, n0) = (blk.k, blk.a_rows.len(), blk.nb, blk.n0);
    let (mtn, ntn) = (mb.div_ceil(TR), nb.div_ceil(TR));
    // Packed rows: [m-tile][k-step][16 pairs][16 rows] of u32 (bf16 pairs).
    let mut a_buf = MaybeUninit::<Aligned<{ MB * KA / 2 }>>::uninit();
    // Cᵀ accumulators: [n][MB] f32 for each B.
    let mut c_buf = MaybeUninit::<Aligned<{ 2 * NB * MB }>>::uninit();
    // The weight rows of one n-group (two n-tiles), packed: [n-tile][k-step][16 rows][32].
    let mut w_buf = MaybeUninit::<Aligned<{ 2 * TR * KA / 2 }>>::uninit();
    let ap = a_buf.as_mut_ptr() as *mut u16;
    let cp = c_buf.as_mut_ptr() as *mut f32;
    let wp = w_buf.as_mut_ptr() as *mut u16;
    let cs = MB * 4;
    // SAFETY: `CFG` is a valid 64-byte palette-1 configuration; the tile state was permitted
    // (`available`).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CFG as *const TileCfg, options(nostack, readonly)) };
    // Items that take the in-place kernel everywhere (few rows, whole tiles, K a multiple of
    // 32) use a longer K block, as long as the packed rows' buffer allows: each weight row is
    // then streamed in longer runs and the Cᵀ tiles are loaded and stored fewer times. (The
    // sums are the same: a K block boundary only stores and reloads the f32 accumulators.)
    let ka = if mb <= DIRECT_MAX_ROWS && nb.is_multiple_of(TR) && k.is_multiple_of(KT) {
        (MB * KA / (mtn * TR)).min(KA_DIRECT_MAX) / KT * KT
    } else {
        KA
    };
    let mut k0 = 0;
    while k0 < k {
        let kc = ka.min(k - k0);
        let steps = kc.div_ceil(KT);
        // Pack the rows (zero rows past mb, zeros past kc).
        for mt in 0..mtn {
            for s in 0..steps {
                let mut r = [_mm512_setzero_ps(); 16];
                for (ii, v) in r.iter_mut().enumerate() {
                    if let Some(&row) = blk.a_rows.get(mt * TR + ii) {
                        let src = &a[row * k + k0..row * k + k0 + kc];
                        *v = load_pairs(src, s * KT);
                    }
                }
                super::avx512::transpose16(&mut r);
                for (p, v) in r.iter().enumerate() {
                    // SAFETY: tile mt * steps + s of the buffer's MB * KA / 512 tiles of 1 KiB
                    // (mt < mtn and steps <= ka / 32, with mtn * ka <= MB * KA / 16 by the
                    // choice of ka), row p < 16 of 32 u16; 64-byte aligned.
                    unsafe {
                        _mm512_store_ps(ap.add(((mt * steps + s) * TR + p) * KT) as *mut f32, *v)
                    };
                }
            }
        }
        for (bi, b) in blk.b.iter().enumerate() {
            let Some(b) = b else { continue };
            let b: &[u16] = bytemuck::cast_slice(b);
            let rows_of = |j: usize| &b[(n0 + j) * k + k0..(n0 + j) * k + k0 + kc];
            let cb = cp.wrapping_add(bi * NB * MB);
            let mut nt = 0;
            while nt < ntn {
                let nn = (ntn - nt).min(2);
                let first = k0 == 0;
                if mb <= DIRECT_MAX_ROWS && kc % KT == 0 && (nt + nn) * TR <= nb {
                    // Few rows, full tiles: the weight tiles are read in place (one pass over
                    // the weights, no copy), each n-tile against every pair of m-tiles in turn.
                    for t in 0..nn {
                        let w = rows_of((nt + t) * TR).as_ptr() as *const u8;
                        let mut mt = 0;
                        while mt < mtn {
                            let mm = (mtn - mt).min(2);
                            let ptrs = [
                                ap.wrapping_add(mt * steps * TR * KT) as *const u8,
                                ap.wrapping_add((mt + 1) * steps * TR * KT) as *const u8,
                            ];
                            let c = cb.wrapping_add((nt + t) * TR * MB + mt * TR) as *mut u8;
                            // SAFETY: tiles configured above. C tiles: rows (nt+t)*16.. (< NB)
                            // of the Cᵀ buffer, columns mt*16.. (< MB). Weight tile: rows
                            // (nt+t)*16..+16 <= nb (checked) of this B, bytes k0*2.. +
                            // steps*64 = (k0+kc)*2 of each row (kc a multiple of 32, checked).
                            // Packed row tiles (mt + m < mtn, s < steps) lie in their buffer,
                            // written above.
                            unsafe {
                                let (ws, pf) = (k * 2, mt == 0);
                                if mm == 2 {
                                    kernel_direct::<2>(c, cs, first, w, ws, ptrs, steps, pf);
                                } else {
                                    kernel_direct::<1>(c, cs, first, w, ws, ptrs, steps, pf);
                                }
                            }
                            mt += 2;
                        }
                    }
                    nt += 2;
                    continue;
                }
                // Pack the weight rows of n-tiles nt.. (rows past nb and K past kc: zeros).
                // (Only items with the usual K block get here: the longer one is taken only
                // where every tile goes to the in-place kernel above.)
                assert!(kc <= KA, "the packed weight buffer holds one K block of KA");
                for jj in 0..nn * TR {
                    let (t, r) = (jj / TR, jj % TR);
                    let j = nt * TR + jj;
                    let src = if j < nb { rows_of(j) } else { &[][..] };
                    // The same row of the next n-group (or, after the last, of the first
                    // n-group in the next K block), fetched into L2 while this one is copied.
                    let (pj, pk) = if j + 2 * TR < ntn * TR {
                        (j + 2 * TR, k0)
                    } else {
                        (j + 2 * TR - ntn * TR, k0 + KA)
                    };
                    let pf = b.as_ptr().wrapping_add((n0 + pj) * k + pk);
                    for s in 0..steps {
                        _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(s * KT) as *const i8);
                        let v = load_pairs(src, s * KT);
                        // SAFETY: tile t < 2, step s < KA / 32, row r < 16 of the buffer;
                        // 64-byte aligned.
                        unsafe {
                            _mm512_store_ps(wp.add(((t * steps + s) * TR + r) * KT) as *mut f32, v)
                        };
                    }
                }
                let w = [wp as *const u8, wp.wrapping_add(steps * TR * KT) as *const u8];
                let mut mt = 0;
                while mt < mtn {
                    let mm = (mtn - mt).min(2);
                    let ptrs = [
                        ap.wrapping_add(mt * steps * TR * KT) as *const u8,
                        ap.wrapping_add((mt + 1) * steps * TR * KT) as *const u8,
                    ];
                    let c = cb.wrapping_add(nt * TR * MB + mt * TR) as *mut u8;
                    // SAFETY: tiles configured above. C tiles: rows nt*16.. (< NB) of the Cᵀ
                    // buffer, columns mt*16.. (< MB). Weight tiles (t < nn, s < steps) and
                    // packed row tiles (mt + m < mtn, s < steps) lie in their buffers, written
                    // above.
                    unsafe {
                        match (nn, mm) {
                            (2, 2) => kernel::<2, 2>(c, cs, first, w, ptrs, steps),
                            (2, _) => kernel::<2, 1>(c, cs, first, w, ptrs, steps),
                            (_, 2) => kernel::<1, 2>(c, cs, first, w, ptrs, steps),
                            _ => kernel::<1, 1>(c, cs, first, w, ptrs, steps),
                        }
                    }
                    mt += 2;
                }
                nt += 2;
            }
        }
        k0 += ka;
    }
    // SAFETY: releases this thread's tile state (no memory access).
    unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    // Cᵀ → the caller's [row][NB] tiles.
    // SAFETY: the kernels above wrote every n-tile (ntn * 16 columns) of the Cᵀ block of each
    // present B for all mtn m-tiles; the caller's tiles hold mb rows of NB floats.
    unsafe {
        let present = [blk.b[0].is_some(), blk.b[1].is_some()];
        super::avx512::ct_to_tiles(cp, present, out, mb, nb, ntn * TR)
    };
}

//! The up-projection epilogue: `h[j] = f(s·gate[j] + gate_bias[j], s·up[j] + up_bias[j])` over
//! one row of a work item's f32 results, rounded to the element type.
//!
//! With AVX-512 the exponential-based activations (gated SiLU and swiglu-oai, the activations of
//! most MoE models) run 16 lanes at a time with a vector `exp` (Cody-Waite reduction to
//! `|r| ≤ ln2/2`, a degree-7 Taylor polynomial, `vscalefps` for the power of two: within a few
//! ulp of `libm::expf`, overflow to +∞ and underflow to 0 as `expf`). Every other activation and
//! instruction set runs [`moe_core::math::mlp_hidden`] per element. The result of an element
//! depends on its inputs only, so the bits do not depend on the blocking or the thread count.

use crate::Isa;
#[cfg(target_arch = "x86_64")]
use moe_core::Activation;
use moe_core::{Element, MlpConfig, math};

/// f32 output rows of at least this many bytes in all (those a stage writes) are written by
/// the expert GEMMs' epilogues with non-temporal stores ([`streams`]). Their rows are read only after the whole stage (by
/// the down projection, by the combine), when the stage's weights have streamed through the
/// caches; written with ordinary stores, each line is first read from memory (a read for
/// ownership) in the epilogue's path: the epilogues took 1.6 % of DeepSeek-V3 f32 T=128's
/// thread time and 5.3 % of Qwen3's at T=1024, about 1 ns per element (the `trace` timeline).
/// Measured on Emerald Rapids (whole layer, against ordinary stores in the same round, 5
/// rounds): f32 Qwen3 T=1024 0.960x, DeepSeek-V3 T=1024 0.995x, T=128 0.997x; bf16 outputs
/// gained nothing (Qwen3 T=1024 1.016x, T=128 0.999x), so they keep ordinary stores, as do
/// small outputs (decode), which stay in cache for their reader.
#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
pub(crate) const STREAM_MIN_BYTES: usize = 4 << 20;

/// Whether an epilogue writing `bytes` bytes of output rows of `dtype` elements with the
/// kernels of `isa` uses non-temporal stores: f32, an AVX-512 instruction set, at least
/// [`STREAM_MIN_BYTES`]. The grouped GEMM fences ([`fence`]) after every work item's epilogue.
#[allow(unused_variables)]
pub(crate) fn streams(isa: Isa, dtype: moe_core::DType, bytes: usize) -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    return dtype == moe_core::DType::F32
        && matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
        && bytes >= STREAM_MIN_BYTES;
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    false
}

/// Make this thread's non-temporal stores globally visible before its later stores (the
/// signal that its work is done): `sfence` on x86-64, nothing elsewhere.
#[inline]
pub(crate) fn fence() {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: SSE is part of the x86-64 baseline.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    };
}

/// Elements staged per [`fill_row`] pass (on the stack).
#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
const STAGE: usize = 256;

/// `dst[j] = f(j)` for every `j`; where `stream` (and the CPU has AVX-512 F) with
/// non-temporal stores, the caller then [`fence`]s: the values staged on the stack, the
/// 64-byte-aligned whole lines of each pass written with `vmovntdq`, its ends with ordinary
/// stores. The same values either way.
#[inline]
pub(crate) fn fill_row<T: Element>(dst: &mut [T], stream: bool, mut f: impl FnMut(usize) -> T) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if stream && std::arch::is_x86_feature_detected!("avx512f") {
        let mut buf = [T::default(); STAGE];
        let mut c0 = 0;
        while c0 < dst.len() {
            let n = STAGE.min(dst.len() - c0);
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = f(c0 + j);
            }
            // SAFETY: AVX-512 F detected above; `n` elements in both.
            unsafe { avx512::stream_copy(&mut dst[c0..c0 + n], &buf[..n]) };
            c0 += n;
        }
        return;
    }
    let _ = stream;
    for (j, d) in dst.iter_mut().enumerate() {
        *d = f(j);
    }
}

/// One row of the epilogue. `up` and `gate` (when the MLP is gated) hold the f32 products of
/// columns `n0..n0 + up.len()`; `ub` and `gb` are the whole bias vectors of this weight block
/// (indexed from `n0`); `dst` gets the rounded activations, with non-temporal stores where
/// `stream` ([`fill_row`]).
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn up_row<T: Element>(
    isa: Isa,
    mlp: &MlpConfig,
    s: f32,
    n0: usize,
    up: &[f32],
    gate: Option<&[f32]>,
    ub: Option<&[T]>,
    gb: Option<&[T]>,
    dst: &mut [T],
    stream: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(g)) = (mlp.gated, gate)
        && matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
        && matches!(mlp.activation, Activation::Silu | Activation::SwigluOai { .. })
    {
        // SAFETY: every one of these instruction sets includes AVX-512 F (checked available by
        // the caller, `Cpu::isa`).
        unsafe { avx512::gated_row(mlp.activation, s, n0, up, g, ub, gb, dst, stream) };
        return;
    }
    let _ = isa;
    fill_row(dst, stream, |j| {
        let i = n0 + j;
        let u = s * up[j] + ub.map_or(0.0, |b| b[i].to_f32());
        let gt = match gate {
            Some(gv) => s * gv[j] + gb.map_or(0.0, |b| b[i].to_f32()),
            None => 0.0,
        };
        T::from_f32(math::mlp_hidden(mlp, gt, u))
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use core::arch::x86_64::*;

    /// Lanes per vector.
    const L: usize = 16;
    /// Columns staged per pass (on the stack).
    const CHUNK: usize = 256;

    /// `dst.copy_from_slice(src)` (equal lengths), the 64-byte-aligned whole lines of `dst` with
    /// non-temporal stores (`vmovntdq`), the elements before and after them with ordinary ones.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[cfg_attr(miri, allow(dead_code))]
    pub(super) unsafe fn stream_copy<T: Element>(dst: &mut [T], src: &[T]) {
        let n = dst.len();
        assert_eq!(n, src.len());
        let size = core::mem::size_of::<T>();
        // Elements up to the first 64-byte boundary (dst is element-aligned: a whole number of
        // them), whole lines, the rest.
        let head = dst.as_ptr().align_offset(64).min(n);
        let lines = (n - head) * size / 64;
        let body = lines * 64 / size;
        dst[..head].copy_from_slice(&src[..head]);
        for l in 0..lines {
            let at = head + l * 64 / size;
            // SAFETY: 64 bytes from element `at` lie inside both slices (head + body <= n);
            // the destination is 64-byte aligned there (past `head`); AVX-512 F (the caller).
            unsafe {
                let v = _mm512_loadu_si512(src.as_ptr().add(at) as *const __m512i);
                _mm512_stream_si512(dst.as_mut_ptr().add(at) as *mut __m512i, v);
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }

    /// `exp(x)` per lane (see the module docs).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp(x: __m512) -> __m512 {
        // Beyond these, expf is +inf (scalef overflows) or 0 (scalef underflows); clamping keeps
        // n small with the same results. (max/min return their second operand for a NaN: NaN
        // is put back at the end.)
        let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0)), _mm512_set1_ps(89.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(core::f32::consts::LOG2_E)),
        );
        // r = x - n ln2, ln2 split in a high part exact in f32 times n and a low part.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.0 / 5040.0);
        p = _mm512_fmadd_ps(p, r, c(1.0 / 720.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, c(0.5));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        let e = _mm512_scalef_ps(p, n);
        // NaN in, NaN out (the clamp above replaced it).
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_mov_ps(e, nan, x)
    }

    /// `1 / (1 + exp(-x))` per lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sigmoid(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))))
    }

    /// `n` bias values from `b[at..]` widened to f32 (zeros past `n`), or zeros.
    #[inline]
    fn bias<T: Element>(b: Option<&[T]>, at: usize, n: usize, out: &mut [f32; CHUNK]) {
        match b {
            Some(b) => {
                for (o, v) in out[..n].iter_mut().zip(&b[at..at + n]) {
                    *o = v.to_f32();
                }
            }
            None => out[..n].fill(0.0),
        }
    }

    /// The gated SiLU / swiglu-oai row (see [`super::up_row`]).
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gated_row<T: Element>(
        act: Activation,
        s: f32,
        n0: usize,
        up: &[f32],
        gate: &[f32],
        ub: Option<&[T]>,
        gb: Option<&[T]>,
        dst: &mut [T],
        stream: bool,
    ) {
        let sv = _mm512_set1_ps(s);
        let (mut ubuf, mut gbuf, mut hbuf) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
        let mut c0 = 0;
        while c0 < dst.len() {
            let n = CHUNK.min(dst.len() - c0);
            bias(ub, n0 + c0, n, &mut ubuf);
            bias(gb, n0 + c0, n, &mut gbuf);
            let mut j = 0;
            while j < n {
                let m: __mmask16 = if n - j >= L { 0xFFFF } else { ((1u32 << (n - j)) - 1) as u16 };
                // SAFETY: lanes j..j + 16 of the staging buffers (CHUNK a multiple of 16) and of
                // `up`/`gate` from c0 + j, masked to the n - j that remain.
                unsafe {
                    let u = _mm512_fmadd_ps(
                        sv,
                        _mm512_maskz_loadu_ps(m, up.as_ptr().add(c0 + j)),
                        _mm512_loadu_ps(ubuf.as_ptr().add(j)),
                    );
                    let g = _mm512_fmadd_ps(
                        sv,
                        _mm512_maskz_loadu_ps(m, gate.as_ptr().add(c0 + j)),
                        _mm512_loadu_ps(gbuf.as_ptr().add(j)),
                    );
                    let h = match act {
                        Activation::SwigluOai { alpha, limit } => {
                            let l = _mm512_set1_ps(limit as f32);
                            // As `math::gated`: min/max return the limit for a NaN input.
                            let g = _mm512_min_ps(g, l);
                            let u = _mm512_min_ps(
                                _mm512_max_ps(u, _mm512_sub_ps(_mm512_setzero_ps(), l)),
                                l,
                            );
                            let sg = sigmoid(_mm512_mul_ps(_mm512_set1_ps(alpha as f32), g));
                            _mm512_mul_ps(
                                _mm512_mul_ps(_mm512_add_ps(u, _mm512_set1_ps(1.0)), g),
                                sg,
                            )
                        }
                        _ => _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u),
                    };
                    _mm512_storeu_ps(hbuf.as_mut_ptr().add(j), h);
                }
                j += L;
            }
            fill_row(&mut dst[c0..c0 + n], stream, |j| T::from_f32(hbuf[j]));
            c0 += n;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// `fill_row` with non-temporal stores writes exactly its elements, whatever the slice's
    /// alignment and length (the ends with ordinary stores), f32 and bf16.
    #[test]
    fn streamed_rows_write_every_element_and_nothing_else() {
        fn check<T: Element>() {
            for off in 0..20 {
                for n in [0usize, 1, 7, 15, 16, 17, 31, 63, 64, 65, 192, 255, 256, 257, 700] {
                    let mut v = vec![T::from_f32(-3.0); off + n + 40];
                    fill_row(&mut v[off..off + n], true, |j| T::from_f32(j as f32 * 0.5 + 1.0));
                    fence();
                    for (i, x) in v.iter().enumerate() {
                        let want = T::from_f32(if (off..off + n).contains(&i) {
                            (i - off) as f32 * 0.5 + 1.0
                        } else {
                            -3.0
                        });
                        assert_eq!(
                            x.to_f32(),
                            want.to_f32(),
                            "{:?} offset {off} length {n} at {i}",
                            T::DTYPE
                        );
                    }
                }
            }
        }
        check::<f32>();
        check::<half::bf16>();
    }

    #[test]
    fn vector_exp_matches_libm() {
        if !Isa::Avx512.available() {
            return;
        }
        let mut worst = 0f64;
        let mut x = -110.0f32;
        while x < 95.0 {
            let mut lanes = [0f32; 16];
            for (l, v) in lanes.iter_mut().enumerate() {
                *v = x + l as f32 * 0.0137;
            }
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F checked above; 16 floats in and out.
            unsafe {
                use core::arch::x86_64::*;
                #[target_feature(enable = "avx512f")]
                unsafe fn run(a: &[f32; 16], o: &mut [f32; 16]) {
                    // SAFETY: 16 floats each.
                    unsafe {
                        _mm512_storeu_ps(o.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(a.as_ptr())))
                    }
                }
                run(&lanes, &mut got);
            }
            for (l, &g) in got.iter().enumerate() {
                let want = (lanes[l] as f64).exp();
                if want > f32::MAX as f64 {
                    assert_eq!(g, f32::INFINITY, "exp({})", lanes[l]);
                } else if want >= f32::MIN_POSITIVE as f64 {
                    worst = worst.max(((g as f64) - want).abs() / want);
                } else {
                    assert!(
                        (g as f64 - want).abs() <= 2.0 * f32::MIN_POSITIVE as f64 * 1e-6 + 1e-45
                    );
                }
            }
            x += 0.2191;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        // NaN in, NaN out.
        let mut got = [0f32; 16];
        // SAFETY: AVX-512 F checked above.
        unsafe {
            use core::arch::x86_64::*;
            #[target_feature(enable = "avx512f")]
            unsafe fn run(o: &mut [f32; 16]) {
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), avx512::exp(_mm512_set1_ps(f32::NAN))) }
            }
            run(&mut got);
        }
        assert!(got.iter().all(|v| v.is_nan()));
    }
}

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

/// One row of the epilogue. `up` and `gate` (when the MLP is gated) hold the f32 products of
/// columns `n0..n0 + up.len()`; `ub` and `gb` are the whole bias vectors of this weight block
/// (indexed from `n0`); `dst` gets the rounded activations.
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
) {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(g)) = (mlp.gated, gate)
        && matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
        && matches!(mlp.activation, Activation::Silu | Activation::SwigluOai { .. })
    {
        // SAFETY: every one of these instruction sets includes AVX-512 F (checked available by
        // the caller, `Cpu::isa`).
        unsafe { avx512::gated_row(mlp.activation, s, n0, up, g, ub, gb, dst) };
        return;
    }
    let _ = isa;
    for (j, d) in dst.iter_mut().enumerate() {
        let i = n0 + j;
        let u = s * up[j] + ub.map_or(0.0, |b| b[i].to_f32());
        let gt = match gate {
            Some(gv) => s * gv[j] + gb.map_or(0.0, |b| b[i].to_f32()),
            None => 0.0,
        };
        *d = T::from_f32(math::mlp_hidden(mlp, gt, u));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use core::arch::x86_64::*;

    /// Lanes per vector.
    const L: usize = 16;
    /// Columns staged per pass (on the stack).
    const CHUNK: usize = 256;

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
            for (d, &h) in dst[c0..c0 + n].iter_mut().zip(&hbuf[..n]) {
                *d = T::from_f32(h);
            }
            c0 += n;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

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

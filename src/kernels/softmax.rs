//! The softmax pieces the fused ops share: a vectorisable `exp`, the row max and the shifted
//! sum in eight lanes, and the in-place numerator pass of a softmax row.

/// Where [`exp_approx`] underflows to 0 and saturates to +∞.
const EXP_LO: f32 = -87.336_54;
const EXP_HI: f32 = 88.376_26;
/// ln2 split in a part exact in f32 and the rest (Cody–Waite), so r keeps full precision.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Rounds to nearest with the 1.5·2²³ trick (branch-free, vectorises).
const SHIFT: f32 = 12_582_912.0;
/// Taylor coefficients of eʳ to r⁶, highest first, for Horner's rule (truncation error < 2e-8
/// relative on |r| ≤ 0.347).
const EXP_POLY: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `eˣ` by range reduction `x = n·ln2 + r` and a degree-6 polynomial on |r| ≤ ln2/2, written so
/// that LLVM vectorises loops over it (libm's `expf` is a scalar call). Relative error ≲ 2e-7
/// (a couple of ulp) over the whole range; underflows to exactly 0 below −87.3 (so −∞ gives 0)
/// and saturates to +∞ above 88.37 (eˣ < f32::MAX there, but no caller goes near it).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let n = (xc * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    // 2ⁿ from the exponent bits; n ∈ [−126, 127] after the clamp.
    let ni = n as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `Σ exp(xᵢ − m)`, accumulated in 8 lanes.
#[inline(always)]
pub fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += exp_approx(c[k] - m);
        }
    }
    let mut s: f32 = rest.iter().map(|&v| exp_approx(v - m)).sum();
    for a in acc {
        s += a;
    }
    s
}

/// Max of a non-empty slice, in 8 lanes.
#[inline(always)]
pub fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    rest.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b))
}

/// Turns `row` into `exp(xᵢ − max)` in place and returns `(max, Σ exp(xᵢ − max))`: the
/// numerators of a softmax row and its normaliser, summed in order. A non-empty row.
#[inline(always)]
pub fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    let m = max_of(row);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = exp_approx(*x - m);
        sum += *x;
    }
    (m, sum)
}

/// `exp(xᵢ − m)` in place, by [`x86::exp8`] where the CPU has AVX2 (the same bits as
/// [`exp_approx`] either way), without the in-order sum of [`exp_shifted_in_place`].
pub fn exp_minus_in_place(row: &mut [f32], m: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        return unsafe { x86::exp_minus(row, m) };
    }
    row.iter_mut().for_each(|x| *x = exp_approx(*x - m));
}

/// AVX2 versions of the pieces above, for the kernels' AVX2 paths (see `kernels::has_wide`):
/// the same operations in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{max_of, EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, SHIFT};
    use std::arch::x86_64::*;

    /// [`super::exp_approx`] on eight lanes (clamp, range reduction, the polynomial as `mul`
    /// then `add`, the exponent bits, the two out-of-range cases), so each lane equals
    /// `exp_approx` of it bit for bit.
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let set = |v: f32| _mm256_set1_ps(v);
        let (lo, hi) = (set(EXP_LO), set(EXP_HI));
        // `f32::clamp`: below → lo, above → hi, NaN stays.
        let xc = _mm256_blendv_ps(x, lo, _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        let xc = _mm256_blendv_ps(xc, hi, _mm256_cmp_ps::<_CMP_GT_OQ>(xc, hi));
        let shift = set(SHIFT);
        let n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, set(std::f32::consts::LOG2_E)), shift), shift);
        let r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, set(LN2_HI))), _mm256_mul_ps(n, set(LN2_LO)));
        let mut p = set(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
        }
        let ni = _mm256_cvttps_epi32(n);
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127))));
        let y = _mm256_mul_ps(p, scale);
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        _mm256_blendv_ps(y, set(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi))
    }

    /// `exp(xᵢ − m)` in place by [`exp8`] (the tail by [`super::exp_approx`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_minus(row: &mut [f32], m: f32) {
        let mv = _mm256_set1_ps(m);
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv)));
        }
        for x in chunks.into_remainder() {
            *x = super::exp_approx(*x - m);
        }
    }

    /// [`super::exp_shifted_in_place`] with the numerators made by [`exp8`]: the same max, the
    /// same values, the same left-to-right sum.
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
        let m = max_of(row);
        exp_minus(row, m);
        let mut sum = 0f32;
        for &x in row.iter() {
            sum += x;
        }
        (m, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(100.0).is_infinite());
    }

    #[test]
    fn sums_and_max() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let m = max_of(&v);
        assert_eq!(m, v.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let s: f64 = v.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!((sum_exp_shifted(&v, m) as f64 - s).abs() < 1e-5 * s);
    }

    /// `x86::exp8` gives `exp_approx`'s bits lane by lane, across the range, the clamps and
    /// the special values.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn exp8_and_its_softmax_pass_equal_the_scalar_ones() {
        if !crate::kernels::has_wide() {
            return;
        }
        let mut xs: Vec<f32> = (0..20_000).map(|i| -100.0 + i as f32 * 0.0097).collect();
        xs.extend([0.0, -0.0, f32::NEG_INFINITY, f32::INFINITY, -87.336_54, 88.376_26, f32::MIN_POSITIVE, -1e-30]);
        while !xs.len().is_multiple_of(8) {
            xs.push(1.5);
        }
        for c in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: `has_wide` said the CPU has AVX2.
            unsafe {
                use std::arch::x86_64::*;
                _mm256_storeu_ps(got.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(c.as_ptr())));
            }
            for (g, &x) in got.iter().zip(c) {
                assert_eq!(g.to_bits(), exp_approx(x).to_bits(), "x = {x}");
            }
        }
        // The softmax numerator pass, on lengths off the eight-lane step.
        for n in [1, 7, 8, 81, 200] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 37.0 - 12.0).sin() * 9.0).collect();
            let (mut a, mut b) = (row.clone(), row);
            // SAFETY: `has_wide` said the CPU has AVX2.
            let (ma, sa) = unsafe { x86::exp_shifted_in_place(&mut a) };
            let (mb, sb) = exp_shifted_in_place(&mut b);
            assert_eq!((ma.to_bits(), sa.to_bits()), (mb.to_bits(), sb.to_bits()), "n = {n}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "n = {n}");
        }
    }
}

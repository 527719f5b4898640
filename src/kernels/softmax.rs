//! The softmax pieces the fused ops share: a vectorisable `exp`, the row max and the shifted
//! sum in eight lanes, and the in-place numerator pass of a softmax row; and the row's argmax,
//! greedy decoding's choice.

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

/// `Σ exp(xᵢ − m)`, accumulated in 8 lanes: by [`x86::sum_exp_shifted`] where the CPU has AVX2
/// (the same lanes, so the same bits). LLVM kept [`exp_approx`]'s range branches here and
/// computed the eight lanes one after another (~5.5 ns a value on a 2-core Xeon), on every
/// training step's log-sum-exp over the extended vocabulary (BENCHMARKS.md).
#[inline]
pub fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        return unsafe { x86::sum_exp_shifted(x, m) };
    }
    sum_exp_shifted_scalar(x, m)
}

/// [`sum_exp_shifted`]'s reference.
#[inline(always)]
pub fn sum_exp_shifted_scalar(x: &[f32], m: f32) -> f32 {
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
/// numerators of a softmax row and its normaliser, the sum in eight lanes as
/// [`sum_exp_shifted`] adds (one pass). A non-empty row. By [`x86::exp_shifted_in_place`]
/// where the CPU has AVX2 (the same bits). The chain teacher's softmax over 49,152 old tokens
/// at ~500 positions and the training attention's rows go through it: with the exponentials
/// scalar it cost ~5.5 ns a value on a 2-core Xeon, with them in eight lanes but the sum left
/// to right (one chain of dependent additions) ~2.3 ns (BENCHMARKS.md).
#[inline]
pub fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        return unsafe { x86::exp_shifted_in_place(row) };
    }
    exp_shifted_in_place_scalar(row)
}

/// [`exp_shifted_in_place`]'s reference: lane `k` adds the values at `k`, `k + 8`, … of the
/// whole eights, then the tail is summed and the lanes are added to it in order, as in
/// [`sum_exp_shifted_scalar`] (so the two give the same normaliser for the same row).
#[inline(always)]
pub fn exp_shifted_in_place_scalar(row: &mut [f32]) -> (f32, f32) {
    let m = max_of(row);
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for k in 0..8 {
            c[k] = exp_approx(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - m);
        sum += *x;
    }
    for a in acc {
        sum += a;
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

/// The index of the first maximum of `row`, as `torch.argmax` picks it: NaNs never win, except
/// that a NaN in the first place keeps index 0 (every comparison with it is false), and an
/// empty row or one with nothing above −∞ gives 0. Greedy decoding takes this once per token and
/// sequence, on the thread the batch waits for: the scalar loop took 28–52 µs for SmolLM2's
/// 49,152 logits, [`x86::argmax`] ~3.4 µs (BENCHMARKS.md).
pub fn argmax(row: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2.
        return unsafe { x86::argmax(row) };
    }
    argmax_scalar(row)
}

/// [`argmax`]'s reference: one pass, a later value wins only when strictly greater.
pub fn argmax_scalar(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
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

    /// Whether the CPU has AVX-512F besides AVX2 and FMA: the passes below then take sixteen
    /// values at a time through [`exp16`] (the exponentials are most of a softmax pass, and a
    /// 512-bit register does twice the work per instruction).
    #[inline]
    pub fn has_avx512() -> bool {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::kernels::has_wide() && *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// [`exp8`] on sixteen lanes, the same operations (the blends as mask blends), so each
    /// lane equals [`super::exp_approx`] of it bit for bit.
    ///
    /// # Safety
    /// The CPU must have AVX-512F ([`has_avx512`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        let set = |v: f32| _mm512_set1_ps(v);
        let (lo, hi) = (set(EXP_LO), set(EXP_HI));
        let xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo), x, lo);
        let xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(xc, hi), xc, hi);
        let shift = set(SHIFT);
        let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, set(std::f32::consts::LOG2_E)), shift), shift);
        let r = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(n, set(LN2_HI))), _mm512_mul_ps(n, set(LN2_LO)));
        let mut p = set(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
        }
        let ni = _mm512_cvttps_epi32(n);
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
        let y = _mm512_mul_ps(p, scale);
        let y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo), y, _mm512_setzero_ps());
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi), y, set(f32::INFINITY))
    }

    /// `exp(xᵢ − m)` over the whole sixteens of `len` values at `x` (stored back when `STORE`),
    /// each sixteen added to an eight-lane sum as two eights, low half first: the order the
    /// eight-lane passes add them in. Returns the sum and how many values it took.
    ///
    /// # Safety
    /// The CPU must have AVX-512F ([`has_avx512`]); `x` must be valid for `len` reads (and
    /// writes when `STORE`).
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn exp16_pass<const STORE: bool>(x: *mut f32, len: usize, m: f32) -> (__m256, usize) {
        let mv = _mm512_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= len {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x.add(i)), mv));
            if STORE {
                _mm512_storeu_ps(x.add(i), e);
            }
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            acc = _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
            i += 16;
        }
        (acc, i)
    }

    /// `exp(xᵢ − m)` in place by [`exp8`] (the tail by [`super::exp_approx`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_minus(row: &mut [f32], m: f32) {
        let done = if has_avx512() { exp16_pass::<true>(row.as_mut_ptr(), row.len(), m).1 } else { 0 };
        let row = &mut row[done..];
        let mv = _mm256_set1_ps(m);
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv)));
        }
        for x in chunks.into_remainder() {
            *x = super::exp_approx(*x - m);
        }
    }

    /// [`super::sum_exp_shifted_scalar`] with eight lanes in one register: lane k adds the same
    /// exponentials in the same order, the tail and the lanes are added as there.
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        // Only read: `STORE` is false.
        let (mut acc, done) = if has_avx512() { exp16_pass::<false>(x.as_ptr() as *mut f32, x.len(), m) } else { (_mm256_setzero_ps(), 0) };
        let x = &x[done..];
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv)));
        }
        let mut s: f32 = rest.iter().map(|&v| super::exp_approx(v - m)).sum();
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for a in lanes {
            s += a;
        }
        s
    }

    /// [`super::exp_shifted_in_place_scalar`] with the numerators made by [`exp8`] and the
    /// eight lanes in one register: the same max, the same values, the same sums.
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
        let m = max_of(row);
        let mv = _mm256_set1_ps(m);
        let (mut acc, done) = if has_avx512() { exp16_pass::<true>(row.as_mut_ptr(), row.len(), m) } else { (_mm256_setzero_ps(), 0) };
        let mut chunks = row[done..].chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = 0f32;
        for x in chunks.into_remainder() {
            *x = super::exp_approx(*x - m);
            sum += *x;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for a in lanes {
            sum += a;
        }
        (m, sum)
    }

    /// [`super::argmax_scalar`] over sixteen lanes: each lane keeps its first strict maximum
    /// and its index (ordered comparisons, so a NaN never replaces anything), then the lanes'
    /// largest value with the smallest index among equals, then the tail past the last whole
    /// sixteen. The same index as the scalar loop for every input (`argmax_equals_the_scalar_loop`).
    ///
    /// # Safety
    /// The CPU must have AVX2 (`kernels::has_wide`).
    #[target_feature(enable = "avx2")]
    pub unsafe fn argmax(row: &[f32]) -> u32 {
        match row.first() {
            Some(f) if !f.is_nan() => {}
            _ => return 0,
        }
        let whole = row.len() / 16 * 16;
        assert!(whole <= i32::MAX as usize, "a row of at most 2³¹ values");
        let mut val = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        let mut idx = [_mm256_set1_epi32(-1); 2];
        let mut cur = [_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)];
        let step = _mm256_set1_epi32(16);
        let p = row.as_ptr();
        let mut i = 0;
        while i < whole {
            for h in 0..2 {
                let x = _mm256_loadu_ps(p.add(i + 8 * h));
                let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(x, val[h]);
                val[h] = _mm256_blendv_ps(val[h], x, gt);
                idx[h] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx[h]), _mm256_castsi256_ps(cur[h]), gt));
                cur[h] = _mm256_add_epi32(cur[h], step);
            }
            i += 16;
        }
        let (mut v, mut ix) = ([0f32; 16], [0i32; 16]);
        for h in 0..2 {
            _mm256_storeu_ps(v.as_mut_ptr().add(8 * h), val[h]);
            _mm256_storeu_si256(ix.as_mut_ptr().add(8 * h) as *mut __m256i, idx[h]);
        }
        // (value, index); index −1: the lane never saw a value above −∞.
        let mut best = (f32::NEG_INFINITY, -1i64);
        for (&vj, &ij) in v.iter().zip(&ix) {
            if ij >= 0 && (vj > best.0 || (vj == best.0 && (ij as i64) < best.1)) {
                best = (vj, ij as i64);
            }
        }
        for (k, &x) in row[whole..].iter().enumerate() {
            if x > best.0 {
                best = (x, (whole + k) as i64);
            }
        }
        best.1.max(0) as u32
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
        if x86::has_avx512() {
            for c in xs.chunks_exact(16) {
                let mut got = [0f32; 16];
                // SAFETY: `has_avx512` said the CPU has AVX-512F.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(got.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(c.as_ptr())));
                }
                for (g, &x) in got.iter().zip(c) {
                    assert_eq!(g.to_bits(), exp_approx(x).to_bits(), "x = {x} (exp16)");
                }
            }
        }
        // The softmax numerator pass, on lengths off the eight- and sixteen-lane steps (where
        // the CPU has AVX-512F, the sixteens, then an eight, then the tail).
        for n in [1, 7, 8, 15, 16, 17, 24, 31, 81, 200, 49_152 + 27] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 37.0 - 12.0).sin() * 9.0).collect();
            let (mut a, mut b) = (row.clone(), row);
            // SAFETY: `has_wide` said the CPU has AVX2.
            let (ma, sa) = unsafe { x86::exp_shifted_in_place(&mut a) };
            let (mb, sb) = exp_shifted_in_place_scalar(&mut b);

            assert_eq!((ma.to_bits(), sa.to_bits()), (mb.to_bits(), sb.to_bits()), "n = {n}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "n = {n}");
        }
        // The log-sum-exp's sum, in its eight lanes, on rows as long as a vocabulary, values
        // spread over many magnitudes (so that any other order of the additions shows).
        for n in [1, 7, 8, 16, 24, 31, 81, 1000, 49_152] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 29.0).sin() * 20.0 - 8.0 + (i % 17) as f32 * 0.37).collect();
            let m = max_of(&row);
            // SAFETY: `has_wide` said the CPU has AVX2.
            let (sx, ss) = (unsafe { x86::sum_exp_shifted(&row, m) }, sum_exp_shifted_scalar(&row, m));
            assert_eq!(sx.to_bits(), ss.to_bits(), "n = {n}: sum_exp_shifted");
            // The in-place pass makes the same sum of the same row.
            let mut r = row.clone();
            // SAFETY: as above.
            assert_eq!(unsafe { x86::exp_shifted_in_place(&mut r) }.1.to_bits(), ss.to_bits(), "n = {n}: exp_shifted_in_place");
        }
    }

    /// The AVX2 argmax picks the scalar loop's index: ties (first wins), NaNs anywhere, a NaN
    /// first, −∞ everywhere, ±0, and lengths around the sixteen-lane step.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn argmax_equals_the_scalar_loop() {
        if !crate::kernels::has_wide() {
            return;
        }
        let mut rows: Vec<Vec<f32>> = vec![vec![], vec![f32::NAN, 5.0, 7.0], vec![f32::NEG_INFINITY; 40], vec![-0.0, 0.0, -0.0], vec![1.0, 3.0, 3.0, 2.0]];
        let mut state = 7u64;
        for n in [1, 15, 16, 17, 31, 32, 33, 100, 49_152] {
            for kind in 0..4 {
                let row: Vec<f32> = (0..n)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let r = (state >> 40) as u32;
                        match kind {
                            // Few distinct values: many ties.
                            0 => (r % 7) as f32,
                            1 if r.is_multiple_of(13) => f32::NAN,
                            2 if r.is_multiple_of(5) => f32::NEG_INFINITY,
                            _ => (r as f32 / 1e6).sin() * 30.0,
                        }
                    })
                    .collect();
                rows.push(row);
            }
        }
        // The maximum in the tail only, and in lane 15 of the last whole chunk.
        let mut tail = vec![0.5f32; 37];
        tail[35] = 9.0;
        rows.push(tail);
        let mut lane = vec![0.5f32; 37];
        lane[31] = 9.0;
        lane[3] = 9.0;
        rows.push(lane);
        for row in &rows {
            // SAFETY: `has_wide` said the CPU has AVX2.
            let got = unsafe { x86::argmax(row) };
            assert_eq!(got, argmax_scalar(row), "row of {} values", row.len());
        }
    }
}

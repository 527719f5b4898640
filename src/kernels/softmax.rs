//! The softmax pieces the fused ops share: a vectorisable `exp`, the row max and the shifted
//! sum in eight lanes, and the in-place numerator pass of a softmax row.

/// `eˣ` by range reduction `x = n·ln2 + r` and a degree-6 polynomial on |r| ≤ ln2/2, written so
/// that LLVM vectorises loops over it (libm's `expf` is a scalar call). Relative error ≲ 2e-7
/// (a couple of ulp) over the whole range; underflows to exactly 0 below −87.3 (so −∞ gives 0)
/// and saturates to +∞ above 88.37 (eˣ < f32::MAX there, but no caller goes near it).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 split in a part exact in f32 and the rest (Cody–Waite), so r keeps full precision.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.336_54, 88.376_26);
    // Round to nearest with the 1.5·2²³ trick (branch-free, vectorises).
    const SHIFT: f32 = 12_582_912.0;
    let n = (xc * LOG2E + SHIFT) - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients to r⁶ (truncation error < 2e-8 relative on |r| ≤ 0.347).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2ⁿ from the exponent bits; n ∈ [−126, 127] after the clamp.
    let ni = n as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.336_54 {
        0.0
    } else if x > 88.376_26 {
        f32::INFINITY
    } else {
        y
    }
}

/// `Σ exp(xᵢ − m)`, accumulated in 8 lanes.
#[inline]
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
#[inline]
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
#[inline]
pub fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    let m = max_of(row);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = exp_approx(*x - m);
        sum += *x;
    }
    (m, sum)
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
}

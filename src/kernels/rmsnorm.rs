//! RMSNorm over the last dimension, `y = x / √(mean(x²) + eps) · w`: the fused op on f32 flex
//! with its hand-written backward, and [`rms_norm_composed`], the composition from tensor ops
//! every other backend and dtype runs and the fused op is tested against.

use super::{dims, flex_f32, float_dtype, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use burn::tensor::{FloatDType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// Rows per parallel task for row-wise kernels: enough work to amortise a rayon task.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Forward of `y = x / √(mean(x²) + eps) · w` over rows of `x` `[n, d]`: `y` and `1/√(…)` per row.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let n = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut inv = vec![0f32; n];
    let rpt = rows_per_task(d);
    y.par_chunks_mut(d * rpt).zip(inv.par_chunks_mut(rpt)).enumerate().for_each(|(ci, (yc, ic))| {
        let xc = &x[ci * rpt * d..][..yc.len()];
        sum_squares(xc, d, ic);
        for (k, (yr, iv)) in yc.chunks_mut(d).zip(ic.iter_mut()).enumerate() {
            let row = &xc[k * d..][..d];
            let ss = *iv;
            // Same order of operations as the composed version: mean, + eps, sqrt, recip.
            let r = 1.0 / ((ss / d as f32) + eps as f32).sqrt();
            *iv = r;
            for ((o, &v), &g) in yr.iter_mut().zip(row).zip(w) {
                *o = (v * r) * g;
            }
        }
    });
    (y, inv)
}

/// `out[i] = Σⱼ x[i·d + j]²` for each row of `x` `[n, d]`, summed left to right from zero (the
/// order `row.iter().map(|v| v * v).sum()` gives). A sequential f32 sum waits on each addition,
/// so a decode step's few rows took ~4 % of the calling thread's time while the helpers idled
/// (4.7 µs per norm of 8 × 576 values); eight rows at a time in the eight lanes of one register
/// keep every row's own order (so the values are bit for bit the same) and do eight additions
/// per wait (1.5 µs).
fn sum_squares(x: &[f32], d: usize, out: &mut [f32]) {
    assert_eq!(x.len(), out.len() * d);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        done = unsafe { x86::sum_squares8(x, d, out) };
    }
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = x[i * d..(i + 1) * d].iter().map(|v| v * v).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::attention::x86::transpose8;
    use std::arch::x86_64::*;

    /// [`super::sum_squares`] for the leading whole groups of eight rows (`d` a multiple of
    /// eight); returns how many rows it did. Each 8×8 block of the group is transposed so
    /// that one register holds one column across the eight rows, and the columns are added
    /// in order as squares (`mul` then `add`, never a fused FMA).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_squares8(x: &[f32], d: usize, out: &mut [f32]) -> usize {
        let groups = out.len() / 8;
        assert!(d.is_multiple_of(8) && x.len() >= groups * 8 * d);
        for g in 0..groups {
            let base = x.as_ptr().add(g * 8 * d);
            // Rust's f32 `sum` starts from −0.0; `−0.0 + s` is `s` for every square, so the
            // lanes may start from +0.0.
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                let cols = transpose8(std::array::from_fn(|r| _mm256_loadu_ps(base.add(r * d + c))));
                for v in cols {
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
                }
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(g * 8), acc);
        }
        groups * 8
    }
}

/// Backward of [`rms_norm_rows`]: `dx` and (when asked) `dw`.
pub fn rms_norm_rows_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], want_dw: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let rpt = rows_per_task(d);
    dx.par_chunks_mut(d * rpt).enumerate().for_each(|(ci, dxc)| {
        for (k, dxr) in dxc.chunks_mut(d).enumerate() {
            let i = ci * rpt + k;
            let (row, g, r) = (&x[i * d..][..d], &dy[i * d..][..d], inv[i]);
            // dn = dy·w;  dx = r·(dn − n·mean(dn·n)),  n = x·r.
            let dot: f32 = row.iter().zip(g).zip(w).map(|((&v, &gy), &wv)| gy * wv * v).sum::<f32>() * r;
            let c = dot / d as f32;
            for (((o, &v), &gy), &wv) in dxr.iter_mut().zip(row).zip(g).zip(w) {
                *o = r * (gy * wv - v * r * c);
            }
        }
    });
    let dw = want_dw.then(|| {
        let n = inv.len();
        let mut dw = vec![0f64; d];
        for i in 0..n {
            let (row, g, r) = (&x[i * d..][..d], &dy[i * d..][..d], inv[i]);
            for ((acc, &v), &gy) in dw.iter_mut().zip(row).zip(g) {
                *acc += (gy * v * r) as f64;
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    });
    (dx, dw)
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// x, w, 1/rms per row.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, inv) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw] = ops.parents;
        let (xv, wv, dyv) = (values(&x), values(&w), values(&dy));
        let (dx, dw) = rms_norm_rows_backward(&xv, &wv, &inv, &dyv, pw.is_some());
        if let Some(node) = px {
            grads.register::<Flex>(node.id, new_tensor(dx, dims(&x)));
        }
        if let (Some(node), Some(dw)) = (pw, dw) {
            grads.register::<Flex>(node.id, new_tensor(dw, dims(&w)));
        }
    }
}

/// Fused RMSNorm over the last dimension of an f32 flex `x` `[B, T, d]` with weight `w` `[d]`;
/// `None` when either is not an f32 flex tensor (the caller composes it instead).
pub fn rms_norm(x: &Tensor<3>, w: &Tensor<1>, eps: f64) -> Option<Tensor<3>> {
    match inputs([flex_f32(x), flex_f32(w)])? {
        Inputs::Plain([xp, wp]) => {
            let (y, _) = rms_norm_rows(&values(&xp), &values(&wp), eps);
            Some(from_plain(new_tensor(y, dims(&xp))))
        }
        Inputs::Tracked([xp, wp], nodes) => {
            let (y, inv) = rms_norm_rows(&values(&xp), &values(&wp), eps);
            let out = new_tensor(y, dims(&xp));
            Some(from_tracked(record(RmsNormBackward, nodes, || (xp, wp, inv), out)))
        }
    }
}

/// RMSNorm from tensor ops, computed in f32 whatever the activation dtype (as HF does), for
/// every backend and dtype; the fused kernel's reference.
pub fn rms_norm_composed(x: Tensor<3>, w: Tensor<1>, eps: f64) -> Tensor<3> {
    let dtype = x.dtype();
    let x32 = x.cast(FloatDType::F32);
    let var = x32.clone().square().mean_dim(2);
    let normed = x32 * (var + eps).sqrt().recip();
    let normed = normed.cast(w.dtype());
    let out = normed * w.unsqueeze::<3>();
    if out.dtype() != dtype { out.cast(float_dtype(dtype)) } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{close, close1, normal};
    use burn::tensor::Device;

    use super::rms_norm_composed as composed_rms;

    /// Every row's sum of squares bit for bit the sequential one, in whole groups of eight
    /// rows, their remainder, and row lengths the SIMD path does not take.
    #[test]
    fn sums_of_squares_are_the_sequential_sums() {
        for (n, d) in [(1, 24), (8, 24), (13, 576), (17, 64), (9, 12)] {
            let x: Vec<f32> = normal([n * d], 0.0, 3.0, (n * d) as u64, &Device::flex()).into_data().try_into_vec::<f32>().unwrap();
            let mut got = vec![f32::NAN; n];
            sum_squares(&x, d, &mut got);
            for (i, g) in got.iter().enumerate() {
                let want: f32 = x[i * d..(i + 1) * d].iter().map(|v| v * v).sum();
                assert_eq!(g.to_bits(), want.to_bits(), "row {i} of {n}×{d}");
            }
        }
    }

    #[test]
    fn rms_norm_forward_and_gradients_match_composition() {
        let dev = Device::flex().autodiff();
        let x0: Tensor<3> = normal([2, 5, 24], 0.0, 2.0, 1, &dev);
        let w0: Tensor<1> = normal([24], 1.0, 0.3, 2, &dev);
        let up: Tensor<3> = normal([2, 5, 24], 0.0, 1.0, 3, &dev);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let w = w0.clone().detach().require_grad();
            let y = if fused { rms_norm(&x, &w, 1e-5).expect("f32 flex takes the fused path") } else { composed_rms(x.clone(), w.clone(), 1e-5) };
            let g = (y.clone() * up.clone()).sum().backward();
            (y.detach(), x.grad(&g).unwrap(), w.grad(&g).unwrap())
        };
        let (yf, dxf, dwf) = run(true);
        let (yc, dxc, dwc) = run(false);
        close(yf, yc, 1e-5);
        close(dxf, dxc, 1e-4);
        close1(dwf, dwc, 1e-4);
        // Inference path (no autodiff) gives the same values.
        let plain = Device::flex();
        let xp = Tensor::<3>::from_data(x0.clone().into_data(), &plain);
        let wp = Tensor::<1>::from_data(w0.clone().into_data(), &plain);
        close(rms_norm(&xp, &wp, 1e-5).unwrap(), composed_rms(xp, wp, 1e-5), 1e-5);
    }

    #[test]
    fn frozen_rms_weight_gets_no_gradient() {
        let dev = Device::flex().autodiff();
        let x: Tensor<3> = normal([1, 3, 8], 0.0, 1.0, 4, &dev).require_grad();
        let w: Tensor<1> = Tensor::ones([8], &dev);
        let g = rms_norm(&x, &w, 1e-6).unwrap().sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(w.grad(&g).is_none());
    }
}

//! Cross-entropy against soft targets over rows of logits `[n, v]`: row `i` has a weight `w_i`
//! and, when it counts, a target distribution `q` (a row of a host table, read in place), and
//! contributes `−w_i Σ_j q_j ln softmax(row)_j`. With the targets' entropy added by the caller
//! this is the KL of a distillation term.
//!
//! The fused op (f32 flex) sweeps each row twice forward (max, then Σexp and Σq·z together) and
//! once backward, writing `w·(p_j·Σq − q_j)` over the saved logits when nothing else holds them.
//! Composed from burn's ops ([`composed`], what other backends run and the reference the fused
//! op is tested against) the term costs a `[n, v]` log-softmax forward and backward and a
//! `[n, v]` target tensor on the device: about a second per step on 2 cores at the quickstart's
//! 2 × 256 × 65,792 logits.

use super::{dims, flex_f32, from_plain, from_tracked, new_tensor, record, values, FlexF32};
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Soft targets for the rows of a logits matrix: `table` holds target rows of the vocabulary's
/// width; logits row `i` reads table row `row[i]` with weight `weight[i]`, or costs nothing when
/// `row[i]` is `None` or its weight is 0.
#[derive(Debug, Clone)]
pub struct SoftTargets {
    pub table: Arc<Vec<f32>>,
    pub row: Vec<Option<usize>>,
    pub weight: Vec<f32>,
}

impl SoftTargets {
    fn target(&self, i: usize, v: usize) -> Option<(&[f32], f32)> {
        let r = self.row[i]?;
        let w = self.weight[i];
        (w != 0.0).then(|| (&self.table[r * v..(r + 1) * v], w))
    }

    fn check(&self, n: usize, v: usize) {
        assert!(self.row.len() == n && self.weight.len() == n, "soft targets for {} rows do not fit logits [{n}, {v}]", self.row.len());
        assert!(self.table.len().is_multiple_of(v.max(1)) && self.row.iter().flatten().all(|&r| (r + 1) * v <= self.table.len()), "a soft target row is outside its table of width {v}");
    }
}

/// Per row: log-sum-exp (0 for rows that do not count); and the weighted sum of the term.
pub fn forward_rows(x: &[f32], v: usize, t: &SoftTargets) -> (Vec<f32>, f64) {
    let n = t.row.len();
    let mut lse = vec![0f32; n];
    let mut term = vec![0f64; n];
    lse.par_iter_mut().zip(term.par_iter_mut()).enumerate().for_each(|(i, (l, out))| {
        let Some((q, w)) = t.target(i, v) else { return };
        let row = &x[i * v..][..v];
        let m = super::softmax::max_of(row);
        *l = m + super::softmax::sum_exp_shifted(row, m).ln();
        // −Σ q (z − lse) = lse·Σq − Σ q z
        let (mut qs, mut qz) = (0f64, 0f64);
        for (&qj, &zj) in q.iter().zip(row) {
            qs += qj as f64;
            qz += qj as f64 * zj as f64;
        }
        *out = w as f64 * (*l as f64 * qs - qz);
    });
    (lse, term.iter().sum())
}

/// The gradient of `g ·` the term, written over `x`.
pub fn backward_rows(x: &mut [f32], v: usize, lse: &[f32], t: &SoftTargets, g: f32) {
    x.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let Some((q, w)) = t.target(i, v) else {
            row.fill(0.0);
            return;
        };
        let qs: f32 = q.iter().sum();
        let (l, gw) = (lse[i], g * w);
        // The exponentials first (eight at a time where the CPU has AVX2), then the rest of
        // `gw · (exp(x − l)·qs − q)` in its order.
        super::softmax::exp_minus_in_place(row, l);
        for (e, &qj) in row.iter_mut().zip(q) {
            *e = gw * (*e * qs - qj);
        }
    });
}

#[derive(Debug)]
struct SoftCeBackward;

impl Backward<Flex, 1> for SoftCeBackward {
    /// Logits `[n, v]`, log-sum-exp per row, the targets.
    type State = (FlexTensor, Vec<f32>, Arc<SoftTargets>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, lse, targets) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let g = values(&dy)[0];
        let v = dims(&x)[1];
        let grad = super::grad_over(x, |buf| backward_rows(buf, v, &lse, &targets, g));
        grads.register::<Flex>(node.id, grad);
    }
}

/// The term summed over rows, `[1]`: fused on f32 flex, composed elsewhere.
pub fn sum(logits: Tensor<2>, targets: Arc<SoftTargets>) -> Tensor<1> {
    let [n, v] = logits.dims();
    targets.check(n, v);
    match flex_f32(&logits) {
        Some(FlexF32::Plain(x)) => {
            drop(logits);
            let (_, s) = forward_rows(&values(&x), v, &targets);
            from_plain(new_tensor(vec![s as f32], vec![1]))
        }
        Some(FlexF32::Tracked(a)) => {
            drop(logits);
            let (x, guard) = a.into_parts();
            let (lse, s) = forward_rows(&values(&x), v, &targets);
            let out = new_tensor(vec![s as f32], vec![1]);
            from_tracked(record(SoftCeBackward, [guard], || (x, lse, targets), out))
        }
        None => composed(logits, &targets),
    }
}

/// The composed reference: `−Σ w·q·log_softmax(x)` with the targets laid out as a tensor.
pub fn composed(logits: Tensor<2>, t: &SoftTargets) -> Tensor<1> {
    let [n, v] = logits.dims();
    let device = logits.device();
    let mut q = vec![0f32; n * v];
    let mut w = vec![0f32; n];
    for i in 0..n {
        if let Some((row, wi)) = t.target(i, v) {
            q[i * v..(i + 1) * v].copy_from_slice(row);
            w[i] = wi;
        }
    }
    let logp = log_softmax(logits.cast(FloatDType::F32), 1);
    let q: Tensor<2> = Tensor::from_data(TensorData::new(q, [n, v]), &device);
    let w: Tensor<2> = Tensor::from_data(TensorData::new(w, [n, 1]), &device);
    (q * logp).sum_dim(1).mul(w).sum().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::normal;
    use burn::tensor::Device;

    #[test]
    fn fused_sum_and_gradient_match_the_composed_reference() {
        let dev = Device::flex().autodiff();
        let (n, v) = (7, 23);
        let x0: Tensor<2> = normal([n, v], 0.0, 3.0, 1, &dev);
        // Four target rows (one with exact zeros), read by rows in another order; row 2 has
        // none and row 5 has weight 0.
        let mut table = vec![0f32; 4 * v];
        for (r, row) in table.chunks_mut(v).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if r == 1 && j % 3 == 0 { 0.0 } else { 1.0 + ((r * 5 + j * 3) % 7) as f32 };
            }
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s);
        }
        let t = Arc::new(SoftTargets {
            table: Arc::new(table),
            row: vec![Some(3), Some(0), None, Some(1), Some(2), Some(0), Some(1)],
            weight: vec![0.5, 1.0, 2.0, 1.5, 0.25, 0.0, 3.0],
        });
        let xf = x0.clone().detach().require_grad();
        let sf = sum(xf.clone(), t.clone());
        let gf = (sf.clone() * 0.7).backward();
        let xc = x0.clone().detach().require_grad();
        let sc = composed(xc.clone(), &t);
        let gc = (sc.clone() * 0.7).backward();
        let (sf, sc): (f32, f32) = (sf.into_scalar(), sc.into_scalar());
        assert!(sc > 1.0, "random logits are far from the targets: {sc}");
        assert!((sf - sc).abs() <= 1e-5 * sc.abs(), "{sf} vs {sc}");
        let (gf, gc): (Vec<f32>, Vec<f32>) = (xf.grad(&gf).unwrap().into_data().try_to_vec().unwrap(), xc.grad(&gc).unwrap().into_data().try_to_vec().unwrap());
        for (a, c) in gf.iter().zip(&gc) {
            assert!((a - c).abs() <= 1e-6 + 1e-4 * c.abs(), "{a} vs {c}");
        }
        // Rows without a target or with weight 0 get no gradient.
        assert!(gf[2 * v..3 * v].iter().chain(&gf[5 * v..6 * v]).all(|&g| g == 0.0));
    }
}

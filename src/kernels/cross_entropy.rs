//! The causal-LM cross-entropy over rows of logits `[n, v]` with one target per row (−1: none):
//! the fused op on f32 flex and [`composed_rows`], the composition every other backend and
//! dtype runs and the fused op is tested against.
//!
//! The forward pass takes each row's log-sum-exp and target logit in two sweeps (max, then
//! Σexp) without writing any `[n, v]` tensor; the backward pass overwrites the saved logits with
//! `g·(softmax − onehot)` in one sweep, so the only vocabulary-sized tensor is the logits buffer
//! itself. The per-row NLL is on the host after the forward sweep, so sums per group of rows
//! (per sequence) cost nothing extra.

use super::{dims, flex_f32, from_plain, from_tracked, new_tensor, record, values, FlexF32};
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Per row of `x` `[n, v]`: log-sum-exp, and the summed NLL of rows whose target is ≥ 0.
pub fn ce_forward_rows(x: &[f32], v: usize, targets: &[i64]) -> (Vec<f32>, f64) {
    let (lse, groups) = ce_forward_groups(x, v, targets, targets.len().max(1));
    (lse, groups.iter().sum())
}

/// [`ce_forward_rows`] with the NLL summed per group of `group` consecutive rows (one group per
/// sequence when `group` is the sequence length).
pub fn ce_forward_groups(x: &[f32], v: usize, targets: &[i64], group: usize) -> (Vec<f32>, Vec<f64>) {
    let mut lse = vec![0f32; targets.len()];
    // Per-position values first so the sweep stays parallel over positions even for one sequence.
    let mut nll = vec![0f64; targets.len()];
    lse.par_iter_mut().zip(nll.par_iter_mut()).enumerate().for_each(|(i, (out, n))| {
        let row = &x[i * v..][..v];
        let m = super::softmax::max_of(row);
        let l = m + super::softmax::sum_exp_shifted(row, m).ln();
        *out = l;
        if targets[i] >= 0 {
            *n = (l - row[targets[i] as usize]) as f64;
        }
    });
    (lse, nll.chunks(group).map(|c| c.iter().sum()).collect())
}

/// `dx = g·(softmax(x) − onehot(target))` per row, written over `x`; rows without a target get 0.
pub fn ce_backward_rows(x: &mut [f32], v: usize, lse: &[f32], targets: &[i64], g: f32) {
    x.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let t = targets[i];
        if t < 0 {
            row.fill(0.0);
            return;
        }
        // The exponentials first (eight at a time where the CPU has AVX2), then the scale: the
        // same two operations per value as `g · exp(x − l)`.
        super::softmax::exp_minus_in_place(row, lse[i]);
        row.iter_mut().for_each(|e| *e *= g);
        row[t as usize] -= g;
    });
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// Logits `[n, v]`, log-sum-exp per row, target per row (−1: none).
    type State = (FlexTensor, Vec<f32>, Arc<Vec<i64>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, lse, targets) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let g = values(&dy)[0];
        let v = dims(&x)[1];
        let grad = super::grad_over(x, |buf| ce_backward_rows(buf, v, &lse, &targets, g));
        grads.register::<Flex>(node.id, grad);
    }
}

/// Fused `Σ NLL` over rows of f32 flex logits `[n, v]`; `None` for other backends or dtypes.
pub fn sum(logits: Tensor<2>, targets: Arc<Vec<i64>>) -> Option<Tensor<1>> {
    let n = targets.len().max(1);
    sum_rows(logits, targets, n).map(|(sum, _)| sum)
}

/// [`sum`] plus the NLL of each group of `group` consecutive rows, read on the
/// host where the forward sweep computes it anyway. The sum is the groups' sum, so the two agree.
pub fn sum_rows(logits: Tensor<2>, targets: Arc<Vec<i64>>, group: usize) -> Option<(Tensor<1>, Vec<f64>)> {
    let [_, v] = logits.dims();
    match flex_f32(&logits)? {
        FlexF32::Plain(x) => {
            drop(logits);
            let (_, rows) = ce_forward_groups(&values(&x), v, &targets, group);
            let nll: f64 = rows.iter().sum();
            Some((from_plain(new_tensor(vec![nll as f32], vec![1])), rows))
        }
        FlexF32::Tracked(a) => {
            drop(logits);
            let (x, guard) = a.into_parts();
            let (lse, rows) = ce_forward_groups(&values(&x), v, &targets, group);
            let nll: f64 = rows.iter().sum();
            let out = new_tensor(vec![nll as f32], vec![1]);
            Some((from_tracked(record(CrossEntropyBackward, [guard], || (x, lse, targets), out)), rows))
        }
    }
}

/// The composed reference: per group of `group` consecutive rows, `−Σ log_softmax(x)[target]`
/// over the rows whose target is ≥ 0, `[n / group]`.
pub fn composed_rows(logits: Tensor<2>, targets: &[i64], group: usize) -> Tensor<1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let idx: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let mask: Vec<f32> = targets.iter().map(|&t| if t >= 0 { 1.0 } else { 0.0 }).collect();
    let logp = log_softmax(logits.cast(FloatDType::F32), 1);
    let idx: Tensor<2, Int> = Tensor::from_data(TensorData::new(idx, [n, 1]), &device);
    let m: Tensor<2> = Tensor::from_data(TensorData::new(mask, [n, 1]), &device);
    -(logp.gather(1, idx) * m).reshape([n / group, group]).sum_dim(1).reshape([n / group])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::normal;
    use burn::tensor::Device;

    #[test]
    fn fused_sum_rows_and_gradient_match_the_composed_reference() {
        let dev = Device::flex().autodiff();
        let (n, v, group) = (12, 29, 4);
        let x0: Tensor<2> = normal([n, v], 0.0, 3.0, 1, &dev);
        let targets: Vec<i64> = (0..n).map(|i| if i % 5 == 2 { -1 } else { ((i * 7) % v) as i64 }).collect();
        let xf = x0.clone().detach().require_grad();
        let (sf, rows) = sum_rows(xf.clone(), Arc::new(targets.clone()), group).expect("f32 flex takes the fused path");
        let gf = (sf.clone() * 0.5).backward();
        let xc = x0.clone().detach().require_grad();
        let rc = composed_rows(xc.clone(), &targets, group);
        let gc = (rc.clone().sum() * 0.5).backward();
        let rc: Vec<f32> = rc.into_data().try_to_vec().unwrap();
        for (a, c) in rows.iter().zip(&rc) {
            assert!((*a as f32 - c).abs() <= 1e-5 * c.abs().max(1.0), "{a} vs {c}");
        }
        let (sf, sc): (f32, f32) = (sf.into_scalar(), rc.iter().sum());
        assert!((sf - sc).abs() <= 1e-5 * sc.abs(), "{sf} vs {sc}");
        let (gf, gc): (Vec<f32>, Vec<f32>) = (xf.grad(&gf).unwrap().into_data().try_to_vec().unwrap(), xc.grad(&gc).unwrap().into_data().try_to_vec().unwrap());
        for (a, c) in gf.iter().zip(&gc) {
            assert!((a - c).abs() <= 1e-6 + 1e-4 * c.abs(), "{a} vs {c}");
        }
    }
}

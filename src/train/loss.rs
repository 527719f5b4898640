//! The causal-LM loss, shifted as HF does: position t predicts `labels[t+1]`; −100 is ignored.
//!
//! On flex in f32 the loss is one fused op over the `[B·T, V]` logits: the forward pass takes
//! each row's log-sum-exp and target logit in two sweeps (max, then Σexp) without writing any
//! `[B·T, V]` tensor, and the backward pass overwrites the saved logits with
//! `g·(softmax − onehot)` in one sweep, so the only vocabulary-sized tensor is the logits buffer
//! itself. Elsewhere (libtorch, f16/bf16 logits) it is composed from `log_softmax` and `gather`.

use crate::model::fused::{self, from_plain, from_tracked, new_tensor, record, values, FlexF32};
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Sum of next-token NLL over unmasked positions (f32 scalar tensor `[1]`), and their count.
pub fn nll_sum(logits: Tensor<3>, labels: &[Vec<i64>]) -> (Tensor<1>, usize) {
    let [b, t, v] = logits.dims();
    // Row b·T + i of the flattened logits predicts labels[b][i+1]; each sequence's last row has
    // no target.
    let targets: Vec<i64> = labels.iter().flat_map(|row| (0..t).map(move |i| if i + 1 < t && row[i + 1] >= 0 { row[i + 1] } else { -1 })).collect();
    let n = targets.iter().filter(|&&x| x >= 0).count();
    if logits.dtype() == burn::tensor::DType::F32 {
        if let Some(sum) = cross_entropy_sum(logits.clone().reshape([b * t, v]), Arc::new(targets.clone())) {
            return (sum, n);
        }
    }
    (composed_nll_sum(logits, labels), n)
}

/// The composed reference: `−Σ log_softmax(logits)[target]` over unmasked positions.
pub fn composed_nll_sum(logits: Tensor<3>, labels: &[Vec<i64>]) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut mask = Vec::with_capacity(b * (t - 1));
    for row in labels {
        for &l in &row[1..t] {
            let ok = l >= 0;
            targets.push(if ok { l } else { 0 });
            mask.push(if ok { 1.0f32 } else { 0.0 });
        }
    }
    let logp = log_softmax(logits.slice([0..b, 0..t - 1, 0..v]).cast(FloatDType::F32), 2);
    let idx: Tensor<3, Int> = Tensor::from_data(TensorData::new(targets, [b, t - 1, 1]), &device);
    let m: Tensor<3> = Tensor::from_data(TensorData::new(mask, [b, t - 1, 1]), &device);
    -(logp.gather(2, idx) * m).sum()
}

/// Per row of `x` `[n, v]`: log-sum-exp, and the summed NLL of rows whose target is ≥ 0.
pub fn ce_forward_rows(x: &[f32], v: usize, targets: &[i64]) -> (Vec<f32>, f64) {
    let mut lse = vec![0f32; targets.len()];
    let nll: f64 = lse
        .par_iter_mut()
        .enumerate()
        .map(|(i, out)| {
            let row = &x[i * v..][..v];
            let m = fused::max_of(row);
            let l = m + fused::sum_exp_shifted(row, m).ln();
            *out = l;
            match targets[i] {
                t if t >= 0 => (l - row[t as usize]) as f64,
                _ => 0.0,
            }
        })
        .sum();
    (lse, nll)
}

/// `dx = g·(softmax(x) − onehot(target))` per row, written over `x`; rows without a target get 0.
pub fn ce_backward_rows(x: &mut [f32], v: usize, lse: &[f32], targets: &[i64], g: f32) {
    x.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let t = targets[i];
        if t < 0 {
            row.fill(0.0);
            return;
        }
        let l = lse[i];
        for e in row.iter_mut() {
            *e = g * fused::exp_approx(*e - l);
        }
        row[t as usize] -= g;
    });
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// Logits `[n, v]`, log-sum-exp per row, target per row (−1: none).
    type State = (FlexTensor, Vec<f32>, Arc<Vec<i64>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (mut x, lse, targets) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let g = values(&dy)[0];
        let shape = fused::dims(&x);
        let v = shape[1];
        let whole = x.layout().contiguous_offsets() == Some((0, shape[0] * v));
        // The saved logits are normally ours alone: overwrite them with the gradient.
        let grad = match (whole, x.try_storage_mut::<f32>()) {
            (true, Some(buf)) if buf.len() == shape[0] * v => {
                ce_backward_rows(buf, v, &lse, &targets, g);
                x
            }
            _ => {
                let mut buf = values(&x).into_owned();
                ce_backward_rows(&mut buf, v, &lse, &targets, g);
                new_tensor(buf, shape)
            }
        };
        grads.register::<Flex>(node.id, grad);
    }
}

/// Fused `Σ NLL` over rows of f32 flex logits `[n, v]`; `None` for other backends or dtypes.
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Arc<Vec<i64>>) -> Option<Tensor<1>> {
    let [_, v] = logits.dims();
    match fused::flex_f32(&logits)? {
        FlexF32::Plain(x) => {
            drop(logits);
            let (_, nll) = ce_forward_rows(&values(&x), v, &targets);
            Some(from_plain(new_tensor(vec![nll as f32], vec![1])))
        }
        FlexF32::Tracked(a) => {
            drop(logits);
            let (x, guard) = a.into_parts();
            let (lse, nll) = ce_forward_rows(&values(&x), v, &targets);
            let out = new_tensor(vec![nll as f32], vec![1]);
            Some(from_tracked(record(CrossEntropyBackward, [guard], || (x, lse, targets), out)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn labels(b: usize, t: usize, v: usize) -> Vec<Vec<i64>> {
        (0..b).map(|i| (0..t).map(|j| if (i + j) % 5 == 3 { -100 } else { ((i * 31 + j * 17) % v) as i64 }).collect()).collect()
    }

    #[test]
    fn fused_loss_and_gradient_match_log_softmax() {
        let dev = Device::flex().autodiff();
        let (b, t, v) = (2, 6, 37);
        let x0: Tensor<3> = Tensor::random([b, t, v], Distribution::Normal(0.0, 4.0), &dev);
        let lab = labels(b, t, v);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            // Scale the loss as the step does, so the upstream gradient is not 1.
            let (sum, n) = if fused { nll_sum(x.clone() * 1.0, &lab) } else { (composed_nll_sum(x.clone() * 1.0, &lab), 0) };
            let g = (sum.clone() * 0.37).backward();
            (sum.into_scalar::<f32>(), n, x.grad(&g).unwrap())
        };
        let (lf, n, gf) = run(true);
        let (lc, _, gc) = run(false);
        assert_eq!(n, lab.iter().map(|r| r[1..].iter().filter(|&&l| l >= 0).count()).sum::<usize>());
        assert!((lf - lc).abs() <= 1e-5 * lc.abs(), "{lf} vs {lc}");
        let (gf, gc) = (gf.into_data().try_to_vec::<f32>().unwrap(), gc.into_data().try_to_vec::<f32>().unwrap());
        for (a, c) in gf.iter().zip(&gc) {
            assert!((a - c).abs() <= 1e-6 + 1e-4 * c.abs(), "{a} vs {c}");
        }
        // The last position of each row and masked labels get no gradient.
        assert!(gf[(t - 1) * v..t * v].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn inference_path_gives_the_same_sum() {
        let dev = Device::flex();
        let (b, t, v) = (1, 5, 11);
        let x: Tensor<3> = Tensor::random([b, t, v], Distribution::Normal(0.0, 2.0), &dev);
        let lab = labels(b, t, v);
        let (f, _) = nll_sum(x.clone(), &lab);
        let c = composed_nll_sum(x, &lab);
        let (f, c) = (f.into_scalar::<f32>(), c.into_scalar::<f32>());
        assert!((f - c).abs() <= 1e-5 * c.abs(), "{f} vs {c}");
    }
}

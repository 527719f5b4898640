//! The causal-LM loss, shifted as HF does: position t predicts `labels[t+1]`; −100 is ignored.

use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

/// Sum of next-token NLL over unmasked positions (f32 scalar tensor `[1]`), and their count.
pub fn nll_sum(logits: Tensor<3>, labels: &[Vec<i64>]) -> (Tensor<1>, usize) {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let mut targets = Vec::with_capacity(b * (t - 1));
    let mut mask = Vec::with_capacity(b * (t - 1));
    let mut n = 0;
    for row in labels {
        for &l in &row[1..t] {
            let ok = l >= 0;
            n += ok as usize;
            targets.push(if ok { l } else { 0 });
            mask.push(if ok { 1.0f32 } else { 0.0 });
        }
    }
    let logp = log_softmax(logits.slice([0..b, 0..t - 1, 0..v]).cast(FloatDType::F32), 2);
    let idx: Tensor<3, Int> = Tensor::from_data(TensorData::new(targets, [b, t - 1, 1]), &device);
    let m: Tensor<3> = Tensor::from_data(TensorData::new(mask, [b, t - 1, 1]), &device);
    (-(logp.gather(2, idx) * m).sum(), n)
}

//! A bias-free projection with a frozen base weight in HF layout `[out, in]`, plus any number
//! of LoRA branches (see [`crate::lora`]). This is where LoRA is applied in the forward pass.

use crate::lora::LoraBranch;
use burn::module::{Module, Param};
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored in safetensors; never transposed in memory.
    pub weight: Param<Tensor<2>>,
    /// Stacked adapters apply as a sum of rank-r updates, never as a dense ΔW.
    pub lora: Vec<LoraBranch>,
}

impl Linear {
    pub fn new(weight: Tensor<2>) -> Self {
        Linear { weight: Param::from_tensor(weight).set_require_grad(false), lora: Vec::new() }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// `x·Wᵀ + Σ s·(dropout(x)·Aᵀ)·Bᵀ` over the last dimension of `x` `[B, T, in]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, i] = x.dims();
        let x2 = x.reshape([b * t, i]);
        let w = self.weight.val();
        let out = w.dims()[0];
        let mut y = x2.clone().matmul(w.transpose());
        for branch in &self.lora {
            y = y + branch.delta(x2.clone());
        }
        y.reshape([b, t, out])
    }
}

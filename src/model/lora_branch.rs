//! One LoRA branch on a projection: the layer as the forward pass sees it. Adapters are built,
//! loaded, saved and merged in [`crate::lora`]; the branch lives here so that the model does
//! not depend on that module.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor};

/// One rank-r update `s·(dropout(x)·Aᵀ)·Bᵀ`. A and B stay rank-sized in the forward and the
/// backward pass: the dense `B·A` is only ever formed by `merge`.
#[derive(Module, Debug)]
pub struct LoraBranch {
    /// `[r, in]`, PEFT's `lora_A.weight`.
    pub a: Param<Tensor<2>>,
    /// `[out, r]`, PEFT's `lora_B.weight`.
    pub b: Param<Tensor<2>>,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraBranch {
    pub fn new(a: Tensor<2>, b: Tensor<2>, scale: f64, dropout: f64) -> Self {
        LoraBranch { a: Param::from_tensor(a), b: Param::from_tensor(b), scale, dropout }
    }

    /// The update for `x` `[N, in]` → `[N, out]`, in `x`'s dtype (masters may be f32 while the
    /// activations are f16: gradients flow through the cast).
    pub fn delta(&self, x: Tensor<2>) -> Tensor<2> {
        let xd = self.dropped_input(&x).unwrap_or(x);
        self.delta_of_dropped(xd)
    }

    /// The branch's input after LoRA dropout, when it applies (training with dropout > 0);
    /// `None` means the branch reads `x` itself.
    pub fn dropped_input(&self, x: &Tensor<2>) -> Option<Tensor<2>> {
        (self.dropout > 0.0 && x.device().is_autodiff()).then(|| {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x.clone() * mask / keep
        })
    }

    /// [`Self::delta`] of an input that has been through dropout already.
    pub fn delta_of_dropped(&self, xd: Tensor<2>) -> Tensor<2> {
        let dt = crate::kernels::float_dtype(xd.dtype());
        let a = self.a.val().cast(dt);
        let b = self.b.val().cast(dt);
        xd.matmul(a.transpose()).matmul(b.transpose()) * self.scale
    }
}

//! RMSNorm, computed in f32 whatever the activation dtype, as HF does: the variance of
//! fp16 activations overflows long before the activations themselves do.

use burn::module::{Module, Param};
use burn::tensor::{FloatDType, Tensor};

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // f32 on flex: one fused pass each way (see `fused`); the composition below otherwise.
        let w = self.weight.val();
        match super::fused::rms_norm(&x, &w, self.eps) {
            Some(y) => y,
            None => rms_norm_composed(x, w, self.eps),
        }
    }
}

/// RMSNorm from tensor ops, for every backend and dtype; the fused kernel's reference.
pub fn rms_norm_composed(x: Tensor<3>, w: Tensor<1>, eps: f64) -> Tensor<3> {
    let dtype = x.dtype();
    let x32 = x.cast(FloatDType::F32);
    let var = x32.clone().square().mean_dim(2);
    let normed = x32 * (var + eps).sqrt().recip();
    let normed = normed.cast(w.dtype());
    let out = normed * w.unsqueeze::<3>();
    if out.dtype() != dtype { out.cast(float_dtype(dtype)) } else { out }
}

/// The float dtype of a tensor's dtype (panics only on a non-float, which is a bug here).
pub fn float_dtype(d: burn::tensor::DType) -> FloatDType {
    match d {
        burn::tensor::DType::F16 => FloatDType::F16,
        burn::tensor::DType::BF16 => FloatDType::BF16,
        burn::tensor::DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

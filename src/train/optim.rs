//! AdamW with per-parameter learning rates and weight decay, matching torch.optim.AdamW's
//! update exactly (decoupled decay first, bias-corrected moments, eps outside the sqrt).
//! State lives next to the parameters as plain (non-autodiff) f32 tensors.

use burn::module::Param;
use burn::tensor::{FloatDType, Tensor};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

pub struct Moments {
    pub m: Tensor<2>,
    pub v: Tensor<2>,
    pub t: u64,
}

#[derive(Default)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, state: BTreeMap::new() }
    }

    /// Updates `param` in place from its (unscaled, clipped) gradient `grad` (f32, no autodiff).
    pub fn step(&mut self, name: &str, param: &mut Param<Tensor<2>>, grad: Tensor<2>, lr: f64, weight_decay: f64) {
        let c = self.cfg;
        let p = param.val().inner().cast(FloatDType::F32);
        let st = self.state.entry(name.to_string()).or_insert_with(|| Moments { m: grad.zeros_like(), v: grad.zeros_like(), t: 0 });
        st.t += 1;
        st.m = st.m.clone() * c.beta1 + grad.clone() * (1.0 - c.beta1);
        st.v = st.v.clone() * c.beta2 + grad.square() * (1.0 - c.beta2);
        let bc1 = 1.0 - c.beta1.powi(st.t as i32);
        let bc2 = 1.0 - c.beta2.powi(st.t as i32);
        let p = if weight_decay != 0.0 { p * (1.0 - lr * weight_decay) } else { p };
        let denom = (st.v.clone().sqrt() / bc2.sqrt()) + c.eps;
        let p = p - st.m.clone() / denom * (lr / bc1);
        let id = param.id;
        *param = Param::initialized(id, Tensor::from_inner(p).require_grad());
    }
}

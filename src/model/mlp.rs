//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
use crate::kernels::swiglu::{swiglu, swiglu_composed};
use burn::module::Module;
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // Quantized gate and up: one product that applies the gate per task (the same values).
        if let Some(h) = Linear::forward_glu(&self.gate_proj, &self.up_proj, &x, &crate::kernels::swiglu::swiglu_into) {
            return self.down_proj.forward(h);
        }
        // One pass over `x` for both projections that read it (see `Linear::forward_shared`).
        let [g, u] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x);
        // f32 on flex: one fused kernel each way (see `kernels::swiglu`); the composition otherwise.
        let h = match swiglu(&g, &u) {
            Some(h) => h,
            None => swiglu_composed(g, u),
        };
        self.down_proj.forward(h)
    }
}

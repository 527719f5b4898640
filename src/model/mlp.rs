//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let g = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g * self.up_proj.forward(x))
    }
}

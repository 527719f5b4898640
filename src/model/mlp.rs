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
        // One pass over `x` for both projections that read it (see `Linear::forward_shared`).
        let [g, u] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x);
        // f32 on flex: one fused kernel each way (see `fused`); the composition otherwise.
        let h = match super::fused::swiglu(&g, &u) {
            Some(h) => h,
            None => silu(g) * u,
        };
        self.down_proj.forward(h)
    }
}

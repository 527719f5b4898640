//! The SwiGLU gate `silu(g) · u`: the fused element-wise op on f32 flex with its hand-written
//! backward, and [`swiglu_composed`], the composition every other backend and dtype runs and
//! the fused op is tested against.

use super::softmax::exp_approx;
use super::{dims, flex_f32, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use burn::tensor::activation::silu;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `silu(g) · u` element-wise.
pub fn swiglu_values(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    let chunk = |((o, g), u): ((&mut [f32], &[f32]), &[f32])| swiglu_into(o, g, u);
    let threads = rayon::current_num_threads();
    if (4096..1 << 16).contains(&g.len()) && threads > 1 {
        // A batched decode step's few rows (8 × 1536 for SmolLM2): split over the quantized
        // products' spinning team, whose helpers are awake between two products, instead of
        // one thread while they spin (or a rayon worker woken for microseconds of work).
        let per = g.len().div_ceil(threads).next_multiple_of(8);
        let tasks: Vec<_> = out.chunks_mut(per).zip(g.chunks(per)).zip(u.chunks(per)).collect();
        crate::ggml::team::for_each(threads, tasks, chunk);
    } else {
        out.par_chunks_mut(16_384).zip(g.par_chunks(16_384)).zip(u.par_chunks(16_384)).for_each(chunk);
    }
    out
}

/// [`swiglu_values`] of one slice into `o` (the quantized gate/up product applies it to each
/// task's rows, see [`crate::ggml::QuantMatrix::matmul_glu`]): the same bits, element by element.
pub fn swiglu_into(o: &mut [f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        return unsafe { x86::swiglu_chunk(o, g, u) };
    }
    swiglu_chunk(o, g, u)
}

/// The reference arithmetic of [`swiglu_values`] on one chunk: `(g·σ(g))·u`.
fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::softmax::x86::exp8;
    use std::arch::x86_64::*;

    /// [`super::swiglu_chunk`] eight at a time with the same operations (`σ(g) = 1/(1 +
    /// exp_approx(−g))`, the sign flipped as a bit, then `(g·σ)·u`), so each output has the
    /// reference's bits; the tail goes through the reference.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (`kernels::has_wide`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
        let n = o.len().min(g.len()).min(u.len());
        let full = n / 8 * 8;
        let (one, sign) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
        for i in (0..full).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, sign))));
            let y = _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
        }
        super::swiglu_chunk(&mut o[full..n], &g[full..n], &u[full..n]);
    }
}

/// Gradients of [`swiglu_values`]: `(dg, du)`.
pub fn swiglu_backward_values(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(16_384).zip(du.par_chunks_mut(16_384)).enumerate().for_each(|(ci, (dgc, duc))| {
        let off = ci * 16_384;
        for (k, (a, b)) in dgc.iter_mut().zip(duc.iter_mut()).enumerate() {
            let (gv, uv, d) = (g[off + k], u[off + k], dy[off + k]);
            let s = sigmoid(gv);
            let silu = gv * s;
            *b = d * silu;
            // d silu/dg = s·(1 + g·(1 − s)).
            *a = d * uv * (s * (1.0 + gv * (1.0 - s)));
        }
    });
    (dg, du)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [pg, pu] = ops.parents;
        let (dg, du) = swiglu_backward_values(&values(&g), &values(&u), &values(&dy));
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, new_tensor(dg, dims(&g)));
        }
        if let Some(node) = pu {
            grads.register::<Flex>(node.id, new_tensor(du, dims(&u)));
        }
    }
}

/// Fused `silu(g) · u` for f32 flex tensors of one shape; `None` otherwise.
pub fn swiglu<const D: usize>(g: &Tensor<D>, u: &Tensor<D>) -> Option<Tensor<D>> {
    if g.dims() != u.dims() {
        return None;
    }
    match inputs([flex_f32(g), flex_f32(u)])? {
        Inputs::Plain([gp, up]) => Some(from_plain(new_tensor(swiglu_values(&values(&gp), &values(&up)), dims(&gp)))),
        Inputs::Tracked([gp, up], nodes) => {
            let out = new_tensor(swiglu_values(&values(&gp), &values(&up)), dims(&gp));
            Some(from_tracked(record(SwigluBackward, nodes, || (gp, up), out)))
        }
    }
}

/// `silu(g) · u` from tensor ops, for every backend and dtype; the fused op's reference.
pub fn swiglu_composed<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Tensor<D> {
    silu(g) * u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{close, normal};
    use burn::tensor::Device;

    /// The AVX2 path gives the reference's bits (see `kernels::has_wide`), tail included.
    #[test]
    fn swiglu_avx2_equals_scalar() {
        let n = 16_384 + 1_003;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 / 100.0 - 10.0) * 1.3).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 997) as f32 / 97.0).cos()).collect();
        let wide = swiglu_values(&g, &u);
        let base = crate::kernels::baseline_on_this_thread(|| {
            let mut o = vec![0f32; n];
            swiglu_chunk(&mut o, &g, &u);
            o
        });
        assert!(wide.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn swiglu_forward_and_gradients_match_composition() {
        let dev = Device::flex().autodiff();
        let g0: Tensor<3> = normal([2, 7, 33], 0.0, 3.0, 1, &dev);
        let u0: Tensor<3> = normal([2, 7, 33], 0.0, 1.0, 2, &dev);
        let up: Tensor<3> = normal([2, 7, 33], 0.0, 1.0, 3, &dev);
        let run = |fused: bool| {
            let g = g0.clone().detach().require_grad();
            let u = u0.clone().detach().require_grad();
            let y = if fused { swiglu(&g, &u).expect("fused path") } else { swiglu_composed(g.clone(), u.clone()) };
            let gr = (y.clone() * up.clone()).sum().backward();
            (y.detach(), g.grad(&gr).unwrap(), u.grad(&gr).unwrap())
        };
        let (yf, dgf, duf) = run(true);
        let (yc, dgc, duc) = run(false);
        close(yf, yc, 1e-5);
        close(dgf, dgc, 1e-5);
        close(duf, duc, 1e-5);
    }

    #[test]
    fn other_dtypes_fall_back() {
        let dev = Device::flex();
        let x: Tensor<3> = Tensor::<3>::ones([1, 2, 4], &dev).cast(burn::tensor::FloatDType::F16);
        assert!(swiglu(&x, &x).is_none());
    }
}

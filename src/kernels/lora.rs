//! A frozen projection with one LoRA branch, `y = x·Wᵀ + s·(x_d·Aᵀ)·Bᵀ`, as one op with a
//! hand-written backward on flex in f32 (`x_d` is `x` after LoRA dropout, or `x` itself).
//!
//! Why: composed, the branch adds three `[N, out]` passes forward (the rank-r product's output,
//! its scaling, the sum) and as many backward, plus a second `[N, in]` input gradient that is
//! then summed; across the 210 projections of a 30-layer model that was a visible share of a
//! 2-core training step. Here the branch is accumulated into the base product's output by
//! the GEMM itself, and the input gradient `dy·W + s·(dy·B)·A` is one buffer. The base weight
//! gets no gradient: it is frozen by construction (the op declines a weight that wants one).
//!
//! The model's `LoraBranch::delta` with `Linear::forward` stays the reference (any backend and
//! dtype); [`lora_linear_composed`] is the same composition in f32, and the unit test checks
//! output and every gradient against it.

use super::frozen::FrozenPacked;
use super::gemm::{gemm, View};
use super::{flex_f32, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use std::sync::Arc;

/// Whether the branch's rank-r products (one dimension is the rank) over `n` tokens are split
/// over the thread pool: only from 4,096 tokens. Below that, the `gemm` crate's split of such
/// a skinny product cost more than it saved at every size measured on a 2-core Zen 4 (rank 8,
/// `in`/`out` 576–1536): at 256 tokens each took 1.1–5× as long split as on one thread (the
/// six of a 576×576 projection 238 µs against 492–672), at 1,024 1.2–2.3×; at 4,096 the two
/// were even, and there a CPU with more cores can gain from the split. The quickstart's
/// student step took ~0.04 s less (of ~0.95; BENCHMARKS.md, "The LoRA branch's products on
/// one thread").
fn split_rank_products(n: usize) -> bool {
    n >= 4096
}

/// Forward on host values: `x`, `xd` `[n, in]`, `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`.
/// Returns `y` `[n, out]` and `u = xd·Aᵀ` `[n, r]` (kept for the gradient of B). With `packed`,
/// the frozen product `x·Wᵀ` runs on its packing instead of `w`.
#[allow(clippy::too_many_arguments)]
pub fn forward_values(x: &[f32], xd: &[f32], w: &[f32], a: &[f32], b: &[f32], scale: f32, [n, inp, out, r]: [usize; 4], packed: Option<&FrozenPacked>) -> (Vec<f32>, Vec<f32>) {
    let mut y = match packed {
        Some(p) => p.forward(x, n),
        None => {
            let mut y = vec![0f32; n * out];
            gemm(&mut y, out, [n, out, inp], View::rows(x, 0, inp), View::t(w, 0, inp), 1.0, false, true);
            y
        }
    };
    let mut u = vec![0f32; n * r];
    gemm(&mut u, r, [n, r, inp], View::rows(xd, 0, inp), View::t(a, 0, inp), 1.0, false, split_rank_products(n));
    gemm(&mut y, out, [n, out, r], View::rows(&u, 0, r), View::t(b, 0, r), scale, true, split_rank_products(n));
    (y, u)
}

/// Gradients from `dy` `[n, out]`: `(dx, dxd, da, db)`. With `same_input` the branch's input
/// gradient is added into `dx` and `dxd` is `None`. With `packed`, the frozen product `dy·W`
/// runs on its packing.
#[allow(clippy::too_many_arguments)]
pub fn backward_values(xd: &[f32], u: &[f32], w: &[f32], a: &[f32], b: &[f32], dy: &[f32], scale: f32, same_input: bool, [n, inp, out, r]: [usize; 4], packed: Option<&FrozenPacked>) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let mut dyb = vec![0f32; n * r];
    gemm(&mut dyb, r, [n, r, out], View::rows(dy, 0, out), View::rows(b, 0, r), 1.0, false, split_rank_products(n));
    let mut dx = match packed {
        Some(p) => p.backward(dy, n),
        None => {
            let mut dx = vec![0f32; n * inp];
            gemm(&mut dx, inp, [n, inp, out], View::rows(dy, 0, out), View::rows(w, 0, inp), 1.0, false, true);
            dx
        }
    };
    let dxd = if same_input {
        gemm(&mut dx, inp, [n, inp, r], View::rows(&dyb, 0, r), View::rows(a, 0, inp), scale, true, split_rank_products(n));
        None
    } else {
        let mut g = vec![0f32; n * inp];
        gemm(&mut g, inp, [n, inp, r], View::rows(&dyb, 0, r), View::rows(a, 0, inp), scale, false, split_rank_products(n));
        Some(g)
    };
    let mut da = vec![0f32; r * inp];
    gemm(&mut da, inp, [r, inp, n], View::t(&dyb, 0, r), View::rows(xd, 0, inp), scale, false, split_rank_products(n));
    let mut db = vec![0f32; out * r];
    gemm(&mut db, r, [out, r, n], View::t(dy, 0, out), View::rows(u, 0, r), scale, false, split_rank_products(n));
    (dx, dxd, da, db)
}

#[derive(Debug)]
struct LoraLinearBackward;

#[derive(Debug, Clone)]
struct State {
    xd: FlexTensor,
    u: Vec<f32>,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    scale: f32,
    same_input: bool,
    sizes: [usize; 4],
    packed: Option<Arc<FrozenPacked>>,
}

impl Backward<Flex, 4> for LoraLinearBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pxd, pa, pb] = ops.parents;
        let [n, inp, out, r] = s.sizes;
        let (dx, dxd, da, db) = backward_values(&values(&s.xd), &s.u, &values(&s.w), &values(&s.a), &values(&s.b), &values(&dy), s.scale, s.same_input, s.sizes, s.packed.as_deref());
        if let Some(node) = px {
            grads.register::<Flex>(node.id, new_tensor(dx, vec![n, inp]));
        }
        if let (Some(node), Some(g)) = (pxd, dxd) {
            grads.register::<Flex>(node.id, new_tensor(g, vec![n, inp]));
        }
        if let Some(node) = pa {
            grads.register::<Flex>(node.id, new_tensor(da, vec![r, inp]));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, new_tensor(db, vec![out, r]));
        }
    }
}

/// `x·Wᵀ + scale·(xd·Aᵀ)·Bᵀ` for f32 flex `x` `[n, in]` (and `xd`, the branch's input after
/// dropout, `None` for `x` itself); `None` when a tensor is not f32 flex or `w` wants a
/// gradient (the caller composes it instead). `packed`: copies of `w` that its two products
/// (forward and input gradient) run on instead (`[train] frozen_products`); where this CPU
/// cannot run them, `w` itself.
pub fn lora_linear(x: &Tensor<2>, xd: Option<&Tensor<2>>, w: &Tensor<2>, a: &Tensor<2>, b: &Tensor<2>, scale: f64, packed: Option<&Arc<FrozenPacked>>) -> Option<Tensor<2>> {
    let [n, inp] = x.dims();
    let [out, inw] = w.dims();
    let [r, ina] = a.dims();
    if inw != inp || ina != inp || b.dims() != [out, r] || xd.is_some_and(|t| t.dims() != [n, inp]) || w.is_require_grad() {
        return None;
    }
    if let Some(p) = packed {
        assert!(p.dims() == [out, inp], "packings of {:?} for a weight [{out}, {inp}]", p.dims());
    }
    let packed = packed.filter(|p| p.runs());
    let sizes = [n, inp, out, r];
    let scale = scale as f32;
    let xd_t = xd.unwrap_or(x);
    match inputs([flex_f32(x), flex_f32(xd_t), flex_f32(w), flex_f32(a), flex_f32(b)])? {
        Inputs::Plain([xp, xdp, wp, ap, bp]) => {
            let (y, _) = forward_values(&values(&xp), &values(&xdp), &values(&wp), &values(&ap), &values(&bp), scale, sizes, packed.map(|p| &**p));
            Some(from_plain(new_tensor(y, vec![n, out])))
        }
        // The frozen weight's node is not a parent: it gets no gradient.
        Inputs::Tracked([xp, xdp, wp, ap, bp], [xg, xdg, _, ag, bg]) => {
            let (y, u) = forward_values(&values(&xp), &values(&xdp), &values(&wp), &values(&ap), &values(&bp), scale, sizes, packed.map(|p| &**p));
            let y = new_tensor(y, vec![n, out]);
            Some(from_tracked(record(LoraLinearBackward, [xg, xdg, ag, bg], || State { xd: xdp, u, w: wp, a: ap, b: bp, scale, same_input: xd.is_none(), sizes, packed: packed.cloned() }, y)))
        }
    }
}

/// `x·Wᵀ + scale·(xd·Aᵀ)·Bᵀ` from tensor ops (`xd` `None` for `x` itself): the composition
/// [`lora_linear`] replaces, for tests.
pub fn lora_linear_composed(x: Tensor<2>, xd: Option<Tensor<2>>, w: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scale: f64) -> Tensor<2> {
    let xb = xd.unwrap_or(x.clone());
    x.matmul(w.transpose()) + xb.matmul(a.transpose()).matmul(b.transpose()) * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::assert_close;
    use burn::tensor::Device;

    fn vec_of(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    /// Output and the gradients of x, A and B equal the composition `x·Wᵀ + s·(xd·Aᵀ)·Bᵀ`, with
    /// the branch reading `x` itself and reading a separate (dropped-out) input; W gets none.
    #[test]
    fn matches_composition_forward_and_gradients() {
        let dev = Device::flex().autodiff();
        let (n, inp, out, r, s) = (37, 24, 19, 4, 2.5);
        // Fixed inputs: drawn from the shared random generator they changed with every run
        // (and with whichever test drew before), and one run in a few dozen met a cancellation
        // that put an output's summation-order difference just past the tolerance.
        let fixed = |[rows, cols]: [usize; 2], seed: usize, scale: f32| -> Tensor<2> {
            let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0).map(|u| u * scale * 1.7).collect();
            Tensor::from_data(burn::tensor::TensorData::new(v, [rows, cols]), &dev)
        };
        let x0 = fixed([n, inp], 1, 1.0);
        let w = fixed([out, inp], 2, 0.3);
        let a0 = fixed([r, inp], 3, 0.3);
        let b0 = fixed([out, r], 4, 0.3);
        let up = fixed([n, out], 5, 1.0);
        // Every fifth input dropped, in a pattern that is not aligned with the rows.
        let mask = Tensor::from_data(burn::tensor::TensorData::new((0..n * inp).map(|i| if i % 5 == 3 { 0f32 } else { 1.0 }).collect::<Vec<_>>(), [n, inp]), &dev);
        for dropped in [false, true] {
            let run = |fused: bool| {
                let (x, a, b) = (x0.clone().detach().require_grad(), a0.clone().detach().require_grad(), b0.clone().detach().require_grad());
                let xd = dropped.then(|| x.clone() * mask.clone() / 0.8);
                let y = if fused {
                    lora_linear(&x, xd.as_ref(), &w, &a, &b, s, None).expect("f32 flex takes the fused path")
                } else {
                    lora_linear_composed(x.clone(), xd.clone(), w.clone(), a.clone(), b.clone(), s)
                };
                let g = (y.clone() * up.clone()).sum().backward();
                assert!(w.grad(&g).is_none(), "the frozen weight gets no gradient");
                [vec_of(y.detach()), vec_of(x.grad(&g).unwrap()), vec_of(a.grad(&g).unwrap()), vec_of(b.grad(&g).unwrap())]
            };
            let (f, c) = (run(true), run(false));
            for (i, what) in ["y", "dx", "dA", "dB"].iter().enumerate() {
                assert_close(&f[i], &c[i], 1e-5, &format!("{what} (dropout {dropped})"));
            }
        }
        // Without autodiff: the same output.
        let plain = Device::flex();
        let p = |t: &Tensor<2>| Tensor::<2>::from_data(t.clone().into_data(), &plain);
        let y = lora_linear(&p(&x0), None, &p(&w), &p(&a0), &p(&b0), s, None).unwrap();
        let want = lora_linear_composed(p(&x0), None, p(&w), p(&a0), p(&b0), s);
        assert_close(&vec_of(y), &vec_of(want), 1e-5, "plain");
    }

    /// `[composition, fused f32, fused on the packing]` of `y`, `dx`, `dA`, `dB` for one weight
    /// (`[out, in]` values `wv`) and its packing.
    fn three_ways(wv: &[f32], packed: &Arc<FrozenPacked>, (n, inp, out, r, s): (usize, usize, usize, usize, f64)) -> [[Vec<f32>; 4]; 3] {
        let dev = Device::flex().autodiff();
        let fixed = |[rows, cols]: [usize; 2], seed: usize, scale: f32| -> Vec<f32> { (0..rows * cols).map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0) * scale).collect() };
        let t = |v: &Vec<f32>, d: [usize; 2]| Tensor::<2>::from_data(burn::tensor::TensorData::new(v.clone(), d), &dev);
        let (xv, av, bv, upv) = (fixed([n, inp], 1, 1.0), fixed([r, inp], 3, 0.3), fixed([out, r], 4, 0.3), fixed([n, out], 5, 1.0));
        let run = |mode: usize| {
            let (x, a, b) = (t(&xv, [n, inp]).require_grad(), t(&av, [r, inp]).require_grad(), t(&bv, [out, r]).require_grad());
            let w = t(&wv.to_vec(), [out, inp]);
            let y = match mode {
                0 => lora_linear_composed(x.clone(), None, w, a.clone(), b.clone(), s),
                1 => lora_linear(&x, None, &w, &a, &b, s, None).unwrap(),
                _ => lora_linear(&x, None, &w, &a, &b, s, Some(packed)).unwrap(),
            };
            let g = (y.clone() * t(&upv, [n, out])).sum().backward();
            [vec_of(y.detach()), vec_of(x.grad(&g).unwrap()), vec_of(a.grad(&g).unwrap()), vec_of(b.grad(&g).unwrap())]
        };
        [run(0), run(1), run(2)]
    }

    /// The packing's output and input gradient are the composition's within `per_term` times
    /// the terms each sums (`in` forward, `out` backward) and differ from the f32 op's (so the
    /// packing ran); the LoRA gradients, which do not read W, are bit for bit the f32 op's.
    fn check_packing(name: &str, [composed, fused, packed]: [[Vec<f32>; 4]; 3], (inp, out): (usize, usize), per_term: f32) {
        for (i, what, terms) in [(0, "y", inp), (1, "dx", out)] {
            let worst = packed[i].iter().zip(&composed[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= terms as f32 * per_term, "{name} {what}: differs from f32 by {worst}");
            assert!(packed[i] != fused[i], "{name} {what}: the same values as f32, so the packing was not used");
        }
        assert_eq!(packed[2], fused[2], "{name}: dA does not read W");
        assert_eq!(packed[3], fused[3], "{name}: dB does not read W");
    }

    /// bf16 packings: both products with W round their inputs to 8 significant bits (2^-9
    /// relative each; terms of magnitude ≤ 0.3). Where the CPU lacks AVX512-BF16 there is
    /// nothing to run.
    #[test]
    fn bf16_packings_stay_within_bf16_rounding_of_the_composition() {
        if !crate::kernels::bf16::available() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 path of lora_linear was not run");
            return;
        }
        let (n, inp, out, r, s) = (29, 64, 48, 4, 2.0);
        let wv: Vec<f32> = (0..out * inp).map(|i| (((i * 7919 + 2 * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0) * 0.3).collect();
        let packed = Arc::new(FrozenPacked::Bf16(crate::kernels::bf16::FrozenBf16::new(&wv, out, inp)));
        check_packing("bf16", three_ways(&wv, &packed, (n, inp, out, r, s)), (inp, out), 0.3 / 256.0);
    }

    /// Int8 copies (W on its Q4_1 grid forward, Wᵀ in Q8_0 backward): activations and output
    /// gradients rounded to 8 bits per 32-value block (half a step: 1/254 of the block's
    /// largest), and Wᵀ as well backward. Every CPU runs them.
    #[test]
    fn int8_copies_stay_within_eight_bit_rounding_of_the_composition() {
        use crate::ggml::{QType, QuantMatrix};
        let (n, inp, out, r, s) = (29, 64, 96, 4, 2.0);
        let raw: Vec<f32> = (0..out * inp).map(|i| (((i * 7919 + 2 * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0) * 0.3).collect();
        let wv = QuantMatrix::quantize(QType::Q4_1, out, inp, &raw).unwrap().dequantize();
        let packed = Arc::new(FrozenPacked::Int8(crate::kernels::frozen::FrozenInt8::new(&wv, out, inp).unwrap()));
        // Per term: x's rounding (|x| ≤ 1, |w| ≤ 0.3) forward; dy's (|dy| ≤ 1) and Wᵀ's backward.
        check_packing("int8", three_ways(&wv, &packed, (n, inp, out, r, s)), (inp, out), 2.0 * 0.3 / 254.0);
    }

    #[test]
    fn a_weight_that_wants_a_gradient_is_declined() {
        let dev = Device::flex().autodiff();
        let x: Tensor<2> = Tensor::ones([2, 3], &dev);
        let w: Tensor<2> = Tensor::<2>::ones([4, 3], &dev).require_grad();
        let (a, b) = (Tensor::<2>::ones([1, 3], &dev), Tensor::<2>::ones([4, 1], &dev));
        assert!(lora_linear(&x, None, &w, &a, &b, 1.0, None).is_none());
    }
}

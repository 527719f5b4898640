//! A frozen weight's two training products, `x·Wᵀ` forward and `dy·W` backward, on copies of
//! `W` made once when training starts (`[train] frozen_products`), instead of the f32 GEMM over
//! the dense weight, which stays the model's and is what is saved and merged.
//!
//! - [`FrozenPacked::Bf16`]: bf16 packings for `vdpbf16ps` ([`super::bf16`]), activations
//!   rounded to bf16 as they are read, f32 sums. Faster than f32 where the CPU splits its
//!   512-bit FMAs (Zen 4), not on Intel's Xeons.
//! - [`FrozenPacked::Int8`]: the quantized kernels inference uses ([`crate::ggml`]), whose
//!   `vpdpbusd` makes four times the multiply-adds of an f32 FMA. Forward, `W` is held on its
//!   own Q4_1 grid where it lies on one (a model imported from a Q4_1 GGUF, such as the
//!   quickstart's SmolLM2), so the weights are exact, else in Q8_0; backward, `Wᵀ` in Q8_0
//!   (blocks of 32 along the output dimension, which the input gradient sums over). The
//!   activations and the output gradients are rounded to 8 bits per block of 32 under one
//!   scale, as llama.cpp's Q8_0 activations are; a row far below or above that format's range
//!   is scaled by a power of two first ([`matmul_in_range`]). The products with the
//!   projections of a 256-token row run 2–3.4× faster than f32's on an Emerald Rapids Xeon
//!   (BENCHMARKS.md, "An int8 frozen path"). The LM head's frozen old rows have the same
//!   copies (a table's own, [`crate::model::TokenTable::pack_base`]).
//!
//! The f32 product stays the default and the reference: the tests hold each packing's output
//! and input gradient to it within the packing's rounding.

use super::bf16::FrozenBf16;
use super::{flex_f32, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use crate::ggml::{QType, QuantMatrix};
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use std::sync::Arc;

/// What `[train] frozen_products = "auto"` runs on this CPU: `int8` where the quantized kernels
/// have their AVX-512 VNNI set ([`int8_outruns_f32`]), else `bf16` on AMD's AVX-512 cores with
/// AVX512-BF16 ([`super::bf16::outruns_f32`]), `f32` elsewhere, where no copy has been
/// measured to be faster.
pub fn auto() -> &'static str {
    if int8_outruns_f32() {
        "int8"
    } else if super::bf16::outruns_f32() {
        "bf16"
    } else {
        "f32"
    }
}

/// Whether the int8 copies outrun the f32 products here: on CPUs with AVX-512 VNNI. On a
/// 2-core Emerald Rapids Xeon the quickstart's student step took 1.14–1.15 s instead of
/// 1.47–1.49 (f32), and 300 steps of its recipe ended within ±0.013 bit/char of the f32 run's
/// validation figures (two runs; two seeds differ by ~0.07; BENCHMARKS.md, "An int8 frozen
/// path"). On a 2-core Zen 4, which also has bf16, the student step took 0.95–0.97 s instead
/// of bf16's 1.06–1.14 (two pairs of 40-step runs, BENCHMARKS.md, "int8 on a Zen 4"). The
/// integer sums are exact and the float tail is the same instructions on either vendor, so
/// the validation figures carry over. CPUs without VNNI keep bf16 or f32.
pub fn int8_outruns_f32() -> bool {
    crate::ggml::Kernels::best().name == "avx512vnni"
}

/// `W` `[out, in]` in the quantized kernels: `forward` `[out, in]` (Q4_1 where exact, else
/// Q8_0) and `backward` = `Wᵀ` `[in, out]` in Q8_0.
#[derive(Debug)]
pub struct FrozenInt8 {
    pub forward: QuantMatrix,
    pub backward: QuantMatrix,
}

impl FrozenInt8 {
    /// `None` when a dimension is not a whole number of 32-value blocks (the products need
    /// both: `in` for the forward rows, `out` for the transposed ones).
    pub fn new(w: &[f32], out: usize, inp: usize) -> Option<Self> {
        let block = QType::Q8_0.block();
        if w.len() != out * inp || !out.is_multiple_of(block) || !inp.is_multiple_of(block) || out == 0 || inp == 0 {
            return None;
        }
        let forward = QuantMatrix::quantize_exact(QType::Q4_1, out, inp, w).or_else(|| QuantMatrix::quantize(QType::Q8_0, out, inp, w).ok())?;
        let mut wt = vec![0f32; w.len()];
        for (o, row) in w.chunks_exact(inp).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                wt[i * out + o] = v;
            }
        }
        let backward = QuantMatrix::quantize(QType::Q8_0, inp, out, &wt).ok()?;
        Some(FrozenInt8 { forward, backward })
    }
}

/// The copies of one frozen weight `W` `[out, in]` that training's products run on.
#[derive(Debug)]
pub enum FrozenPacked {
    Bf16(FrozenBf16),
    Int8(FrozenInt8),
}

impl FrozenPacked {
    /// `[out, in]` of the weight.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenPacked::Bf16(p) => p.forward.dims(),
            FrozenPacked::Int8(p) => [p.forward.rows(), p.forward.cols()],
        }
    }

    /// Whether this CPU runs the packing's kernels (bf16 needs AVX512-BF16; the quantized
    /// kernels run everywhere).
    pub fn runs(&self) -> bool {
        match self {
            FrozenPacked::Bf16(_) => super::bf16::available(),
            FrozenPacked::Int8(_) => true,
        }
    }

    /// `x·Wᵀ` `[n, out]` for `x` `[n, in]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self {
            FrozenPacked::Bf16(p) => {
                let out = p.forward.dims()[0];
                let mut y = vec![0f32; n * out];
                p.forward.matmul(x, n, &mut y, out, false);
                y
            }
            FrozenPacked::Int8(p) => matmul_in_range(&p.forward, x, n),
        }
    }

    /// `dy·W` `[n, in]` for `dy` `[n, out]`.
    pub fn backward(&self, dy: &[f32], n: usize) -> Vec<f32> {
        match self {
            FrozenPacked::Bf16(p) => {
                let inp = p.backward.dims()[0];
                let mut dx = vec![0f32; n * inp];
                p.backward.matmul(dy, n, &mut dx, inp, false);
                dx
            }
            FrozenPacked::Int8(p) => matmul_in_range(&p.backward, dy, n),
        }
    }
}

/// Largest magnitude of a row that the 8-bit blocks take as it is: from 2^-6 (a block scale of
/// max/127 then stays above f16's smallest normal, 2^-14) to 2^22 (below f16's largest, 65504,
/// times 127).
const IN_RANGE: std::ops::Range<f32> = 0.015625..4_194_304.0;

/// `q.matmul(x, n)` with each row of `x` whose largest magnitude lies outside [`IN_RANGE`]
/// multiplied by the power of two that brings it into [1, 2), and its output row by the inverse.
/// Why: an 8-bit block keeps its scale `max/127` in f16, whose subnormals hold few bits and
/// which rounds below 3e-8 to zero. Gradients are small (they shrink with the number of tokens
/// a step averages over): at the quickstart's first step some rows of `dy` peak below 2^-6,
/// and without this the step's gradient norm was 2.4 % below f32's (1.1 % with it; the rest is
/// the forward's rounding). Scaling by a power of two changes no code and no normal scale, so
/// rows in range give the same bits either way.
fn matmul_in_range(q: &QuantMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let k = q.cols();
    let exponent = |row: &[f32]| {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        // 0, NaN and ∞ stay as they are: nothing to gain, and the step's checks see them.
        (amax.is_normal() && !IN_RANGE.contains(&amax)).then(|| amax.log2().floor().clamp(-126.0, 126.0) as i32)
    };
    let exps: Vec<Option<i32>> = x.chunks_exact(k).map(exponent).collect();
    if exps.iter().all(Option::is_none) {
        return q.matmul(x, n);
    }
    let pow2 = |e: i32| f32::from_bits(((127 + e) as u32) << 23);
    let mut xs = x.to_vec();
    for (row, e) in xs.chunks_exact_mut(k).zip(&exps) {
        if let Some(e) = e {
            row.iter_mut().for_each(|v| *v *= pow2(-e));
        }
    }
    let mut y = q.matmul(&xs, n);
    for (row, e) in y.chunks_exact_mut(q.rows()).zip(&exps) {
        if let Some(e) = e {
            row.iter_mut().for_each(|v| *v *= pow2(*e));
        }
    }
    y
}

#[derive(Debug)]
struct FrozenMatmulBackward;

impl Backward<Flex, 1> for FrozenMatmulBackward {
    type State = Arc<FrozenPacked>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let p = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px] = ops.parents;
        if let Some(node) = px {
            let [out, inp] = p.dims();
            let dyv = values(&dy);
            let n = dyv.len() / out.max(1);
            grads.register::<Flex>(node.id, new_tensor(p.backward(&dyv, n), vec![n, inp]));
        }
    }
}

/// `x·Wᵀ` `[n, out]` for an f32 flex `x` `[n, in]` against the packings of a frozen `W`, with
/// the input's gradient `dy·W` on the transposed packing: the LM head's product with its old
/// rows. `None` when `x` is not f32 flex or this CPU cannot run the packing (the caller
/// multiplies by the f32 weight instead).
pub fn frozen_matmul_t(x: &Tensor<2>, p: &Arc<FrozenPacked>) -> Option<Tensor<2>> {
    let [n, k] = x.dims();
    let [out, kw] = p.dims();
    assert_eq!(k, kw, "frozen product: x [{n}, {k}] against a packing of [{out}, {kw}]");
    if !p.runs() {
        return None;
    }
    let product = |x: &FlexTensor| new_tensor(p.forward(&values(x), n), vec![n, out]);
    match inputs([flex_f32(x)])? {
        Inputs::Plain([xp]) => Some(from_plain(product(&xp))),
        Inputs::Tracked([xp], nodes) => {
            let y = product(&xp);
            Some(from_tracked(record(FrozenMatmulBackward, nodes, || p.clone(), y)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0) * scale).collect()
    }

    /// `x·Wᵀ` and `dy·W` in f64 from the f32 values.
    fn exact(x: &[f32], w: &[f32], n: usize, out: usize, inp: usize) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; n * out];
        let mut dx = vec![0f64; n * inp];
        for t in 0..n {
            for o in 0..out {
                y[t * out + o] = (0..inp).map(|i| x[t * inp + i] as f64 * w[o * inp + i] as f64).sum();
            }
        }
        // dy = x's first `out` columns reused as an output gradient of the same scale.
        for t in 0..n {
            for i in 0..inp {
                dx[t * inp + i] = (0..out).map(|o| x[t * inp + (o % inp)] as f64 * w[o * inp + i] as f64).sum();
            }
        }
        (y, dx)
    }

    /// On a Q4_1 grid the forward copy holds `W` exactly and the only rounding is the
    /// activations' 8 bits per block; the backward copy rounds `Wᵀ` to Q8_0 as well. Both stay
    /// within that rounding of the exact products, and the transposition is the right one
    /// (a wrong one is off by the products' own size).
    #[test]
    fn int8_products_are_the_exact_ones_within_eight_bit_rounding() {
        let (n, out, inp) = (7, 64, 96);
        // Weights dequantized from Q4_1, as a model imported from a Q4_1 GGUF has them.
        let w = QuantMatrix::quantize(QType::Q4_1, out, inp, &fixed(out * inp, 2, 0.3)).unwrap().dequantize();
        let p = FrozenInt8::new(&w, out, inp).expect("whole blocks");
        assert_eq!(p.forward.qtype(), QType::Q4_1, "weights on a Q4_1 grid are held on it");
        assert_eq!((p.backward.qtype(), p.backward.rows(), p.backward.cols()), (QType::Q8_0, inp, out));
        let p = FrozenPacked::Int8(p);
        assert_eq!(p.dims(), [out, inp]);
        let x = fixed(n * inp, 1, 1.0);
        let dy: Vec<f32> = (0..n).flat_map(|t| (0..out).map(move |o| (t, o))).map(|(t, o)| x[t * inp + (o % inp)]).collect();
        let (y, dx) = (p.forward(&x, n), p.backward(&dy, n));
        let (want_y, want_dx) = exact(&x, &w, n, out, inp);
        // Each term's 8-bit rounding is at most half a step of its block's maximum (|x| ≤ 1:
        // 1/254) times |w| ≤ 0.3, twice that where `Wᵀ` is rounded too; the errors of a sum of
        // `k` terms stay far below `k` times that, which is the bound.
        for (what, got, want, k, per) in [("y", &y, &want_y, inp, 0.3 / 254.0), ("dx", &dx, &want_dx, out, 2.0 * 0.3 / 254.0)] {
            let worst = got.iter().zip(want.iter()).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            let size = want.iter().map(|v| v.abs()).fold(0f64, f64::max);
            assert!(worst <= k as f64 * per / 4.0, "{what}: off by {worst} (products up to {size})");
            assert!(worst > 0.0, "{what}: exact, so the 8-bit kernels were not used");
        }
    }

    /// Rows far below or above the 8-bit blocks' range (gradients averaged over many tokens)
    /// give the products of the same rows in range, scaled by the same power of two, bit for
    /// bit; the plain quantized product loses the tiny row (its f16 block scales underflow).
    #[test]
    fn rows_out_of_the_blocks_range_are_scaled_exactly() {
        let (n, out, inp) = (3, 64, 64);
        let p = FrozenPacked::Int8(FrozenInt8::new(&fixed(out * inp, 7, 0.3), out, inp).unwrap());
        let FrozenPacked::Int8(q) = &p else { unreachable!() };
        let x = fixed(n * inp, 8, 1.0);
        let (y, dx) = (p.forward(&x, n), p.backward(&x, n));
        assert_eq!(y, q.forward.matmul(&x, n), "rows in range take the plain product");
        for e in [-40, -20, 30] {
            let s = 2f32.powi(e);
            let xs: Vec<f32> = x.iter().map(|v| v * s).collect();
            assert_eq!(p.forward(&xs, n), y.iter().map(|v| v * s).collect::<Vec<_>>(), "forward, 2^{e}");
            assert_eq!(p.backward(&xs, n), dx.iter().map(|v| v * s).collect::<Vec<_>>(), "backward, 2^{e}");
        }
        let tiny: Vec<f32> = x.iter().map(|v| v * 2f32.powi(-40)).collect();
        assert!(q.forward.matmul(&tiny, n).iter().all(|v| *v == 0.0), "the plain product keeps a row of 1e-12 (the test's premise)");
        // One row out of range, the others not: only that row is scaled.
        let mut mixed = x.clone();
        mixed[..inp].iter_mut().for_each(|v| *v *= 2f32.powi(-40));
        let ym = p.forward(&mixed, n);
        assert_eq!(&ym[out..], &y[out..]);
        assert_eq!(&ym[..out], &y[..out].iter().map(|v| v * 2f32.powi(-40)).collect::<Vec<_>>()[..]);
    }

    /// Off the grid the forward copy is Q8_0; dimensions that are not whole blocks decline.
    #[test]
    fn int8_copies_fall_back_to_q8_0_and_decline_partial_blocks() {
        let w = fixed(64 * 32, 3, 0.3);
        assert_eq!(FrozenInt8::new(&w, 64, 32).unwrap().forward.qtype(), QType::Q8_0);
        assert!(FrozenInt8::new(&fixed(48 * 32, 3, 0.3), 48, 32).is_none(), "48 outputs: Wᵀ has no whole blocks");
        assert!(FrozenInt8::new(&fixed(64 * 40, 3, 0.3), 64, 40).is_none(), "40 inputs");
    }

    /// The head's op: forward and the input's gradient are the packing's products.
    #[test]
    fn frozen_matmul_t_forward_and_gradient_are_the_packings() {
        use burn::tensor::{Device, TensorData};
        let dev = Device::flex().autodiff();
        let (n, out, inp) = (5, 64, 32);
        let w = fixed(out * inp, 4, 0.3);
        let p = Arc::new(FrozenPacked::Int8(FrozenInt8::new(&w, out, inp).unwrap()));
        let xv = fixed(n * inp, 5, 1.0);
        let upv = fixed(n * out, 6, 1.0);
        let x: Tensor<2> = Tensor::from_data(TensorData::new(xv.clone(), [n, inp]), &dev).require_grad();
        let up: Tensor<2> = Tensor::from_data(TensorData::new(upv.clone(), [n, out]), &dev);
        let y = frozen_matmul_t(&x, &p).expect("f32 flex");
        let g = (y.clone() * up).sum().backward();
        assert_eq!(y.into_data().try_into_vec::<f32>().unwrap(), p.forward(&xv, n));
        assert_eq!(x.grad(&g).unwrap().into_data().try_into_vec::<f32>().unwrap(), p.backward(&upv, n));
    }
}

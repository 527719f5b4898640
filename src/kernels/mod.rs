//! The compute kernels under the model: host GEMM, the vectorised softmax pieces, and the fused
//! ops with hand-written backward passes for the flex (CPU) backend in f32, one file per op with
//! its forward, its backward and the composition it replaces:
//! - [`gemm`]: a bounds-checked GEMM over strided host views, and `x·Wᵀ` as an op;
//! - [`softmax`]: a vectorisable `exp`, row max and shifted sums, the softmax numerator pass;
//! - [`rmsnorm`], [`swiglu`], [`lora`] (a frozen projection with its LoRA branch) and
//!   [`attention`] (causal GQA with RoPE; the cached host path of inference);
//! - [`cross_entropy`]: the causal-LM loss over `[n, v]` logits without a softmax tensor;
//! - [`soft_ce`]: cross-entropy against soft targets (the distillation terms), likewise;
//! - [`frozen`]: a frozen weight's products on copies made for them once (bf16 packings in
//!   [`bf16`], or the quantized kernels), `[train] frozen_products`.
//!
//! The AdamW step is fused the same way in `train::optim` (an update, not an op with a
//! backward), on top of the shared pieces here.
//!
//! Why: composed from burn's element-wise ops, each of these is 6–12 kernels forward and as many
//! tensors saved and walked again backward; on 2 cores that bookkeeping cost as much as the
//! GEMMs around it. A fused op reads its inputs once forward, saves only them, and writes each
//! gradient in one pass.
//!
//! Each op takes the fused path only for f32 flex tensors (tracked or not, see [`flex_f32`])
//! and otherwise falls back to the composition it replaces, so libtorch, f16/bf16 and the tests'
//! reference runs go through the same code as before; `LINLY_LORA_KERNELS=composed` sends every
//! op to its composition ([`kernel_path`]). The unit tests check forward and gradient of every
//! fused op against that composition.
//!
//! This layer uses no model type: the model calls it with tensors and plain values.

pub mod attention;
pub mod bf16;
pub mod cross_entropy;
pub mod frozen;
pub mod gemm;
pub mod lora;
pub mod rmsnorm;
pub mod softmax;
pub mod soft_ce;
pub mod swiglu;

use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use burn_autodiff::ops::{Backward, NodeGuard, OpsKind};
use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexTensor};
use std::borrow::Cow;

pub type AdTensor = burn_backend::tensor::FloatTensor<Autodiff<Flex>>;

/// A float tensor on flex in f32, split into what a fused op needs.
pub enum FlexF32 {
    /// Under autodiff (it may or may not require a gradient).
    Tracked(AdTensor),
    /// A plain flex tensor (inference).
    Plain(FlexTensor),
}

/// Which path the ops take: `fused` where they can (the default), or `composed` everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Fused,
    Composed,
}

/// The path chosen by `LINLY_LORA_KERNELS` (`fused`, the default, or `composed`), read once.
/// `composed` sends every op to the fallback that libtorch, f16 and bf16 always take, so that
/// the CPU tests check that path against the same references as the fused one. Any other value
/// panics: a typo must not silently test the wrong path.
pub fn kernel_path() -> KernelPath {
    static PATH: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("LINLY_LORA_KERNELS").as_deref() {
        Err(_) | Ok("") | Ok("fused") => KernelPath::Fused,
        Ok("composed") => KernelPath::Composed,
        Ok(other) => panic!("LINLY_LORA_KERNELS={other:?}: use `fused` (the default) or `composed`"),
    })
}

/// The flex primitive behind `t`, when `t` is an f32 flex tensor and the fused path is on;
/// `None` sends the caller to its composed fallback.
pub fn flex_f32<const D: usize>(t: &Tensor<D>) -> Option<FlexF32> {
    if t.dtype() != DType::F32 || kernel_path() == KernelPath::Composed {
        return None;
    }
    if let Ok(a) = t.clone().try_into_primitive::<Autodiff<Flex>>() {
        return Some(FlexF32::Tracked(a));
    }
    t.clone().try_into_primitive::<Flex>().ok().map(FlexF32::Plain)
}

/// The flex primitives of a fused op's inputs (each from [`flex_f32`]) on one of the op's two
/// paths: all plain (inference), or all tracked, with the graph nodes to [`record`] the op
/// under. `None` when an input is not f32 flex or plain and tracked inputs are mixed (the
/// caller composes the op instead).
pub enum Inputs<const N: usize> {
    Plain([FlexTensor; N]),
    Tracked([FlexTensor; N], [NodeGuard; N]),
}

pub fn inputs<const N: usize>(ts: [Option<FlexF32>; N]) -> Option<Inputs<N>> {
    let ts: Vec<FlexF32> = ts.into_iter().collect::<Option<_>>()?;
    if ts.iter().all(|t| matches!(t, FlexF32::Plain(_))) {
        let plain: Vec<FlexTensor> = ts.into_iter().filter_map(|t| if let FlexF32::Plain(p) = t { Some(p) } else { None }).collect();
        return plain.try_into().ok().map(Inputs::Plain);
    }
    if ts.iter().all(|t| matches!(t, FlexF32::Tracked(_))) {
        let (prims, nodes): (Vec<FlexTensor>, Vec<NodeGuard>) = ts.into_iter().filter_map(|t| if let FlexF32::Tracked(a) = t { Some(a.into_parts()) } else { None }).unzip();
        return Some(Inputs::Tracked(prims.try_into().ok()?, nodes.try_into().ok()?));
    }
    None
}

/// Wraps a result primitive back into a tensor.
pub fn from_tracked<const D: usize>(t: AdTensor) -> Tensor<D> {
    Tensor::from_primitive::<Autodiff<Flex>>(t)
}

pub fn from_plain<const D: usize>(t: FlexTensor) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(t)
}

/// Puts `out`, computed by `op` from `parents`, into the autodiff graph: with `state` kept for
/// `op`'s backward when a parent wants a gradient, as a constant otherwise.
pub fn record<Op: Backward<Flex, N>, const N: usize>(op: Op, parents: [NodeGuard; N], state: impl FnOnce() -> Op::State, out: FlexTensor) -> AdTensor {
    match op.prepare::<burn_autodiff::checkpoint::strategy::NoCheckpointing>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Whether the host kernels' AVX2 + FMA versions run: the CPU has both (detected once), and no
/// test asked for the baseline version on this thread (`baseline_on_this_thread`, a test helper).
///
/// Why they exist: the crate is built for the x86-64 baseline (SSE2) so that one binary runs
/// anywhere, which leaves the host loops outside `ggml` 4 wide, with every chain's latency
/// exposed. A kernel's AVX2 version does the same float operations in the same order as its
/// baseline reference (`mul` then `add`, never a fused FMA, sums left to right), so the two
/// give the same bits; each has a test that compares them.
#[inline]
pub fn has_wide() -> bool {
    #[cfg(test)]
    if BASELINE.with(|b| b.get()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
thread_local! {
    static BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the host kernels on this thread taking their baseline versions, so a test can
/// compare the bits of both.
#[cfg(test)]
pub fn baseline_on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    BASELINE.with(|b| b.set(true));
    let r = f();
    BASELINE.with(|b| b.set(false));
    r
}


/// The values of a flex f32 tensor in row-major order, borrowed when already contiguous.
pub fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous after to_contiguous").to_vec()),
    }
}

/// Runs `f` on `t`'s values as host f32: borrowed in place from a plain contiguous f32 flex
/// tensor (inference: the quantized products' input, which the copy out through `TensorData`
/// made a fresh, page-faulting allocation of per projection), converted otherwise.
pub fn with_host_f32<const D: usize, R>(t: Tensor<D>, f: impl FnOnce(&[f32]) -> R) -> R {
    if let Some(FlexF32::Plain(p)) = flex_f32(&t) {
        return f(&values(&p));
    }
    f(&crate::io::weights::tensor_to_f32(t))
}

/// The gradient a fused op's backward writes with the shape of its saved input `x`: `f` fills
/// `x`'s own buffer when nothing else holds it (normally the saved logits are the op's alone, so
/// no vocabulary-sized tensor is allocated), else a copy of it.
pub fn grad_over(mut x: FlexTensor, f: impl FnOnce(&mut [f32])) -> FlexTensor {
    let shape = dims(&x);
    let n: usize = shape.iter().product();
    let whole = x.layout().contiguous_offsets() == Some((0, n));
    match (whole, x.try_storage_mut::<f32>()) {
        (true, Some(buf)) if buf.len() == n => {
            f(buf);
            x
        }
        _ => {
            let mut buf = values(&x).into_owned();
            f(&mut buf);
            new_tensor(buf, shape)
        }
    }
}

/// A new contiguous f32 flex tensor.
pub fn new_tensor(v: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// Shape of a flex tensor as a Vec.
pub fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// The float dtype of a tensor's dtype (panics only on a non-float, which is a bug here).
pub fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// Comparisons the kernels' tests share: each fused op against its composition.
#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::{Device, Tensor, TensorData};

    /// N(mean, std²) values that are the same on every run, from the crate's seeded generator.
    /// Not `Tensor::random`: it draws from one unseeded generator that the tests running at
    /// once share, so a parity test met a different input each run, and an unlucky one (a
    /// cancellation that puts a summation-order difference past the tolerance) failed one run
    /// in a few dozen.
    pub fn normal<const D: usize>(shape: [usize; D], mean: f32, std: f32, seed: u64, dev: &Device) -> Tensor<D> {
        let mut g = crate::rng::SplitMix::new(seed);
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| mean + std * g.normal() as f32).collect();
        Tensor::from_data(TensorData::new(v, shape), dev)
    }

    pub fn close(a: Tensor<3>, b: Tensor<3>, tol: f32) {
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    pub fn close1(a: Tensor<1>, b: Tensor<1>, tol: f32) {
        close(a.unsqueeze::<3>(), b.unsqueeze::<3>(), tol)
    }

    pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }
}

//! Fused kernels with hand-written backward passes for the flex (CPU) backend in f32: RMSNorm
//! and SwiGLU here, the causal-LM cross-entropy in [`crate::train::loss`].
//!
//! Why: composed from burn's element-wise ops, each of these is 6–12 kernels forward and as many
//! tensors saved and walked again backward; on 2 cores that bookkeeping cost as much as the
//! GEMMs around it. A fused op reads its inputs once forward, saves only them, and writes each
//! gradient in one pass.
//!
//! Each op takes the fused path only for f32 flex tensors (tracked or not) and otherwise falls
//! back to the composition it replaces, so libtorch, f16/bf16 and the tests' reference runs go
//! through the same code as before. The unit tests check forward and gradient of every fused
//! op against that composition.

use burn::tensor::{DType, Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
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

/// The values of a flex f32 tensor in row-major order, borrowed when already contiguous.
pub fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous after to_contiguous").to_vec()),
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

// ---------------------------------------------------------------------------------------------
// Vectorisable exp
// ---------------------------------------------------------------------------------------------

/// `eˣ` by range reduction `x = n·ln2 + r` and a degree-6 polynomial on |r| ≤ ln2/2, written so
/// that LLVM vectorises loops over it (libm's `expf` is a scalar call). Relative error ≲ 2e-7
/// (a couple of ulp) over the whole range; underflows to exactly 0 below −87.3 (so −∞ gives 0)
/// and saturates to +∞ above 88.37 (eˣ < f32::MAX there, but no caller goes near it).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 split in a part exact in f32 and the rest (Cody–Waite), so r keeps full precision.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.336_54, 88.376_26);
    // Round to nearest with the 1.5·2²³ trick (branch-free, vectorises).
    const SHIFT: f32 = 12_582_912.0;
    let n = (xc * LOG2E + SHIFT) - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients to r⁶ (truncation error < 2e-8 relative on |r| ≤ 0.347).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2ⁿ from the exponent bits; n ∈ [−126, 127] after the clamp.
    let ni = n as i32;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.336_54 {
        0.0
    } else if x > 88.376_26 {
        f32::INFINITY
    } else {
        y
    }
}

/// `Σ exp(xᵢ − m)`, accumulated in 8 lanes.
#[inline]
pub fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += exp_approx(c[k] - m);
        }
    }
    let mut s: f32 = rest.iter().map(|&v| exp_approx(v - m)).sum();
    for a in acc {
        s += a;
    }
    s
}

/// Max of a non-empty slice, in 8 lanes.
#[inline]
pub fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    rest.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b))
}

/// Rows per parallel task for row-wise kernels: enough work to amortise a rayon task.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// Forward of `y = x / √(mean(x²) + eps) · w` over rows of `x` `[n, d]`: `y` and `1/√(…)` per row.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let n = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut inv = vec![0f32; n];
    let rpt = rows_per_task(d);
    y.par_chunks_mut(d * rpt).zip(inv.par_chunks_mut(rpt)).enumerate().for_each(|(ci, (yc, ic))| {
        for (k, (yr, iv)) in yc.chunks_mut(d).zip(ic.iter_mut()).enumerate() {
            let row = &x[(ci * rpt + k) * d..][..d];
            let ss: f32 = row.iter().map(|v| v * v).sum();
            // Same order of operations as the composed version: mean, + eps, sqrt, recip.
            let r = 1.0 / ((ss / d as f32) + eps as f32).sqrt();
            *iv = r;
            for ((o, &v), &g) in yr.iter_mut().zip(row).zip(w) {
                *o = (v * r) * g;
            }
        }
    });
    (y, inv)
}

/// Backward of [`rms_norm_rows`]: `dx` and (when asked) `dw`.
pub fn rms_norm_rows_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], want_dw: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let rpt = rows_per_task(d);
    dx.par_chunks_mut(d * rpt).enumerate().for_each(|(ci, dxc)| {
        for (k, dxr) in dxc.chunks_mut(d).enumerate() {
            let i = ci * rpt + k;
            let (row, g, r) = (&x[i * d..][..d], &dy[i * d..][..d], inv[i]);
            // dn = dy·w;  dx = r·(dn − n·mean(dn·n)),  n = x·r.
            let dot: f32 = row.iter().zip(g).zip(w).map(|((&v, &gy), &wv)| gy * wv * v).sum::<f32>() * r;
            let c = dot / d as f32;
            for (((o, &v), &gy), &wv) in dxr.iter_mut().zip(row).zip(g).zip(w) {
                *o = r * (gy * wv - v * r * c);
            }
        }
    });
    let dw = want_dw.then(|| {
        let n = inv.len();
        let mut dw = vec![0f64; d];
        for i in 0..n {
            let (row, g, r) = (&x[i * d..][..d], &dy[i * d..][..d], inv[i]);
            for ((acc, &v), &gy) in dw.iter_mut().zip(row).zip(g) {
                *acc += (gy * v * r) as f64;
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    });
    (dx, dw)
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// x, w, 1/rms per row.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, inv) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw] = ops.parents;
        let (xv, wv, dyv) = (values(&x), values(&w), values(&dy));
        let (dx, dw) = rms_norm_rows_backward(&xv, &wv, &inv, &dyv, pw.is_some());
        if let Some(node) = px {
            grads.register::<Flex>(node.id, new_tensor(dx, dims(&x)));
        }
        if let (Some(node), Some(dw)) = (pw, dw) {
            grads.register::<Flex>(node.id, new_tensor(dw, dims(&w)));
        }
    }
}

/// Fused RMSNorm over the last dimension of an f32 flex `x` `[B, T, d]` with weight `w` `[d]`;
/// `None` when either is not an f32 flex tensor (the caller composes it instead).
pub fn rms_norm(x: &Tensor<3>, w: &Tensor<1>, eps: f64) -> Option<Tensor<3>> {
    match (flex_f32(x)?, flex_f32(w)?) {
        (FlexF32::Plain(xp), FlexF32::Plain(wp)) => {
            let (y, _) = rms_norm_rows(&values(&xp), &values(&wp), eps);
            Some(from_plain(new_tensor(y, dims(&xp))))
        }
        (FlexF32::Tracked(xa), FlexF32::Tracked(wa)) => {
            let (xp, xg) = xa.into_parts();
            let (wp, wg) = wa.into_parts();
            let (y, inv) = rms_norm_rows(&values(&xp), &values(&wp), eps);
            let out = new_tensor(y, dims(&xp));
            Some(from_tracked(record(RmsNormBackward, [xg, wg], || (xp, wp, inv), out)))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `silu(g) · u` element-wise.
pub fn swiglu_values(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(16_384).zip(g.par_chunks(16_384)).zip(u.par_chunks(16_384)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
    out
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
    match (flex_f32(g)?, flex_f32(u)?) {
        (FlexF32::Plain(gp), FlexF32::Plain(up)) => Some(from_plain(new_tensor(swiglu_values(&values(&gp), &values(&up)), dims(&gp)))),
        (FlexF32::Tracked(ga), FlexF32::Tracked(ua)) => {
            let (gp, gg) = ga.into_parts();
            let (up, ug) = ua.into_parts();
            let out = new_tensor(swiglu_values(&values(&gp), &values(&up)), dims(&gp));
            Some(from_tracked(record(SwigluBackward, [gg, ug], || (gp, up), out)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn exp_approx_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(100.0).is_infinite());
    }

    #[test]
    fn sums_and_max() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let m = max_of(&v);
        assert_eq!(m, v.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let s: f64 = v.iter().map(|&x| ((x - m) as f64).exp()).sum();
        assert!((sum_exp_shifted(&v, m) as f64 - s).abs() < 1e-5 * s);
    }

    fn close(a: Tensor<3>, b: Tensor<3>, tol: f32) {
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn close1(a: Tensor<1>, b: Tensor<1>, tol: f32) {
        close(a.unsqueeze::<3>(), b.unsqueeze::<3>(), tol)
    }

    use crate::model::norm::rms_norm_composed as composed_rms;

    #[test]
    fn rms_norm_forward_and_gradients_match_composition() {
        let dev = Device::flex().autodiff();
        let x0: Tensor<3> = Tensor::random([2, 5, 24], Distribution::Normal(0.0, 2.0), &dev);
        let w0: Tensor<1> = Tensor::random([24], Distribution::Normal(1.0, 0.3), &dev);
        let up: Tensor<3> = Tensor::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let w = w0.clone().detach().require_grad();
            let y = if fused { rms_norm(&x, &w, 1e-5).expect("f32 flex takes the fused path") } else { composed_rms(x.clone(), w.clone(), 1e-5) };
            let g = (y.clone() * up.clone()).sum().backward();
            (y.detach(), x.grad(&g).unwrap(), w.grad(&g).unwrap())
        };
        let (yf, dxf, dwf) = run(true);
        let (yc, dxc, dwc) = run(false);
        close(yf, yc, 1e-5);
        close(dxf, dxc, 1e-4);
        close1(dwf, dwc, 1e-4);
        // Inference path (no autodiff) gives the same values.
        let plain = Device::flex();
        let xp = Tensor::<3>::from_data(x0.clone().into_data(), &plain);
        let wp = Tensor::<1>::from_data(w0.clone().into_data(), &plain);
        close(rms_norm(&xp, &wp, 1e-5).unwrap(), composed_rms(xp, wp, 1e-5), 1e-5);
    }

    #[test]
    fn frozen_rms_weight_gets_no_gradient() {
        let dev = Device::flex().autodiff();
        let x: Tensor<3> = Tensor::random([1, 3, 8], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let w: Tensor<1> = Tensor::ones([8], &dev);
        let g = rms_norm(&x, &w, 1e-6).unwrap().sum().backward();
        assert!(x.grad(&g).is_some());
        assert!(w.grad(&g).is_none());
    }

    #[test]
    fn swiglu_forward_and_gradients_match_composition() {
        let dev = Device::flex().autodiff();
        let g0: Tensor<3> = Tensor::random([2, 7, 33], Distribution::Normal(0.0, 3.0), &dev);
        let u0: Tensor<3> = Tensor::random([2, 7, 33], Distribution::Normal(0.0, 1.0), &dev);
        let up: Tensor<3> = Tensor::random([2, 7, 33], Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let g = g0.clone().detach().require_grad();
            let u = u0.clone().detach().require_grad();
            let y = if fused { swiglu(&g, &u).expect("fused path") } else { silu(g.clone()) * u.clone() };
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

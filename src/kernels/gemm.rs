//! A bounds-checked wrapper over the `gemm` crate (the kernel flex's own matmul uses) for the
//! fused ops, which multiply strided views of host buffers without building tensors; and
//! [`try_matmul_t`], `x·Wᵀ` as an autodiff op on top of it, which sends the few rows of a
//! decode step to [`few_rows_t`] instead (no gradients, at most [`FEW`] rows).
//!
//! Why an op of our own for a plain product: flex allocates every matmul output as a byte
//! vector and then copies it into a 16-byte-aligned buffer (burn-flex 0.22 `FlexTensor::empty`
//! → `Bytes::from_bytes_vec`), a second full write of each result. For the LM head that is the
//! `[tokens, vocab]` logits forward and the `[vocab, hidden]` table gradient backward, some
//! 300 MB per training step at SmolLM2's size. Outputs built here are f32 vectors, kept as
//! they are.

use super::{flex_f32, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};

/// A read-only strided matrix view: element `(i, j)` is `data[off + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// The row-major matrix at `off` with row stride `rs`.
    pub fn rows(data: &'a [f32], off: usize, rs: usize) -> Self {
        View { data, off, rs, cs: 1 }
    }

    /// The transpose of the row-major matrix at `off` with row stride `rs`.
    pub fn t(data: &'a [f32], off: usize, rs: usize) -> Self {
        View { data, off, rs: 1, cs: rs }
    }
}

/// `c[m×n] = scale·a[m×k]·b[k×n]`, or `c += …` with `accumulate`; `c` row-major with row stride
/// `ldc`. `parallel` spreads one product over the rayon pool; callers that already run one
/// product per task pass `false`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(c: &mut [f32], ldc: usize, [m, n, k]: [usize; 3], a: View, b: View, scale: f32, accumulate: bool, parallel: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|r| r[..n].iter_mut().for_each(|x| *x = 0.0));
        }
        return;
    }
    let last = |v: &View, r: usize, cl: usize| v.off + (r - 1) * v.rs + (cl - 1) * v.cs;
    assert!(last(&a, m, k) < a.data.len() && last(&b, k, n) < b.data.len(), "gemm operand out of bounds: {m}×{k} · {k}×{n}");
    assert!((m - 1) * ldc + n <= c.len(), "gemm output out of bounds: {m}×{n}, row stride {ldc}, {} values", c.len());
    let par = if parallel && m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above bound every element gemm reads (a, b) and writes (c).
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, ldc as isize,
            accumulate,
            a.data.as_ptr().add(a.off), a.cs as isize, a.rs as isize,
            b.data.as_ptr().add(b.off), b.cs as isize, b.rs as isize,
            1.0f32, scale,
            false, false, false,
            par,
        );
    }
}

#[derive(Debug)]
struct MatmulTBackward;

impl Backward<Flex, 2> for MatmulTBackward {
    /// x `[n, k]`, w `[m, k]`.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw] = ops.parents;
        let (xv, wv, dyv) = (values(&x), values(&w), values(&dy));
        let k = w.layout().shape()[1];
        let (n, m) = (xv.len() / k, wv.len() / k);
        if let Some(node) = px {
            // dx = dy·W
            let mut dx = vec![0f32; n * k];
            gemm(&mut dx, k, [n, k, m], View::rows(&dyv, 0, m), View::rows(&wv, 0, k), 1.0, false, true);
            grads.register::<Flex>(node.id, new_tensor(dx, vec![n, k]));
        }
        if let Some(node) = pw {
            // dW = dyᵀ·x
            let mut dw = vec![0f32; m * k];
            gemm(&mut dw, k, [m, k, n], View::t(&dyv, 0, m), View::rows(&xv, 0, k), 1.0, false, true);
            grads.register::<Flex>(node.id, new_tensor(dw, vec![m, k]));
        }
    }
}

/// `x·Wᵀ` for f32 flex `x` `[n, k]` and `w` `[m, k]`, with gradients for whichever of the two
/// is tracked; `None` for anything else (see [`matmul_t`]).
pub fn try_matmul_t(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [n, k] = x.dims();
    let [m, kw] = w.dims();
    if k != kw {
        return None;
    }
    let product = |x: &FlexTensor, w: &FlexTensor| {
        let mut y = vec![0f32; n * m];
        gemm(&mut y, m, [n, m, k], View::rows(&values(x), 0, k), View::t(&values(w), 0, k), 1.0, false, true);
        new_tensor(y, vec![n, m])
    };
    match inputs([flex_f32(x), flex_f32(w)])? {
        // Decoding (one sequence or a batch of a few) multiplies a few rows by frozen weights.
        Inputs::Plain([xp, wp]) if (1..=FEW).contains(&n) && k > 0 => Some(from_plain(new_tensor(few_rows_t(&values(&xp), &values(&wp), n, k), vec![n, m]))),
        Inputs::Plain([xp, wp]) => Some(from_plain(product(&xp, &wp))),
        Inputs::Tracked([xp, wp], nodes) => {
            let y = product(&xp, &wp);
            Some(from_tracked(record(MatmulTBackward, nodes, || (xp, wp), y)))
        }
    }
}

/// Rows of `x` up to which a product without gradients goes through [`few_rows_t`] (sixteen
/// f32 sequences decode faster as two groups of eight there than through `gemm`: 93 against
/// 114 ms a step).
pub const FEW: usize = 16;
/// Rows of `x` that [`dot_rows`] takes at once.
const GROUP: usize = 8;

/// `x · wᵀ`, `[n, m]`, for a few rows of `x` `[n, k]` against `w` `[m, k]`: each weight row is
/// read once per group of eight rows of `x`, by the products' spinning team. The `gemm` crate
/// packs the weights for every product of more than one row, so a decode step of four f32
/// sequences cost 2.5× one step; here it costs 1.4×. Every output is the same sum whatever `n`
/// is ([`dot_rows`]), so a sequence decoded beside others gets bit for bit the projections it
/// gets alone.
pub fn few_rows_t(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!((1..=FEW).contains(&n) && x.len() == n * k && k > 0 && w.len().is_multiple_of(k), "few_rows_t: {n}×{k} against {} values", w.len());
    let m = w.len() / k;
    // Weight rows per task: ~64 KB of weights, enough to hide a task's hand-over.
    let per = (16_384 / k).max(1);
    let mut yt = vec![0f32; m * n];
    let tasks: Vec<(usize, &mut [f32])> = yt.chunks_mut(per * n).enumerate().map(|(c, y)| (c * per, y)).collect();
    crate::ggml::team::for_each(rayon::current_num_threads(), tasks, |(r0, y)| {
        for (i, yr) in y.chunks_exact_mut(n).enumerate() {
            let wr = &w[(r0 + i) * k..][..k];
            for (g, yg) in yr.chunks_mut(GROUP).enumerate() {
                dot_rows(wr, &x[g * GROUP * k..], yg);
            }
        }
    });
    if n == 1 {
        // One row: `[m, 1]` is already `[1, m]`.
        return yt;
    }
    let mut y = vec![0f32; n * m];
    for (r, yr) in yt.chunks_exact(n).enumerate() {
        for (t, &v) in yr.iter().enumerate() {
            y[t * m + r] = v;
        }
    }
    y
}

/// `out[t] = w · x[t]` for the first `out.len()` (≤ [`GROUP`]) rows of `x`, each `w.len()`
/// long. The sum of one output depends only on `w` and its own row: eight lanes over whole
/// chunks of eight, fused multiply-adds in order, the lanes added left to right, then the
/// remainder.
fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = w.len();
    #[cfg(target_arch = "x86_64")]
    if super::has_wide() {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA.
        return unsafe { x86::dot_rows(w, x, out) };
    }
    for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
        let mut lanes = [0f32; 8];
        let whole = k / 8 * 8;
        for (wc, xc) in w[..whole].chunks_exact(8).zip(xr[..whole].chunks_exact(8)) {
            for l in 0..8 {
                lanes[l] = wc[l].mul_add(xc[l], lanes[l]);
            }
        }
        *o = lanes.iter().sum::<f32>() + w[whole..].iter().zip(&xr[whole..]).map(|(a, b)| a * b).sum::<f32>();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot_rows`] in AVX2 registers: the same lanes, operations and order.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
        // One instance per row count: the accumulators are an array of known length, which
        // the compiler keeps in registers.
        match out.len() {
            1 => rows::<1>(w, x, out),
            2 => rows::<2>(w, x, out),
            3 => rows::<3>(w, x, out),
            4 => rows::<4>(w, x, out),
            5 => rows::<5>(w, x, out),
            6 => rows::<6>(w, x, out),
            7 => rows::<7>(w, x, out),
            8 => rows::<8>(w, x, out),
            n => panic!("dot_rows: {n} rows, at most {}", super::GROUP),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const N: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        assert!(out.len() == N && x.len() >= N * k);
        let whole = k / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); N];
        for c in (0..whole).step_by(8) {
            // The weights stream from memory once per step; asking 2 KB ahead took a step of
            // eight sequences from ~58 to ~44 ms. (A prefetch past the row's end cannot fault.)
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(c + 512) as *const i8);
            let wv = _mm256_loadu_ps(w.as_ptr().add(c));
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(t * k + c)), *a);
            }
        }
        for (t, o) in out.iter_mut().enumerate() {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
            let xr = &x[t * k..(t + 1) * k];
            *o = lanes.iter().sum::<f32>() + w[whole..].iter().zip(&xr[whole..]).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// `x·Wᵀ`: [`try_matmul_t`] where it applies, burn's matmul on other backends and dtypes.
pub fn matmul_t(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    match try_matmul_t(&x, &w) {
        Some(y) => y,
        None => x.matmul(w.transpose()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        (0..m * n).map(|ij| (0..k).map(|l| a[(ij / n) * k + l] * b[l * n + ij % n]).sum()).collect()
    }

    /// A row multiplied beside others gets bit for bit its solo products, which are the
    /// product up to rounding; the remainder after whole chunks of eight counts.
    #[test]
    fn few_rows_are_their_solo_rows() {
        let (m, k) = (37, 44);
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 211) as f32 / 105.0 - 1.0).collect();
        let x: Vec<f32> = (0..FEW * k).map(|i| ((i * 104_729) % 97) as f32 / 48.0 - 1.0).collect();
        let all = few_rows_t(&x, &w, FEW, k);
        let wt: Vec<f32> = (0..k * m).map(|i| w[(i % m) * k + i / m]).collect();
        let want = naive(&x, &wt, FEW, m, k);
        for t in 0..FEW {
            let solo = few_rows_t(&x[t * k..(t + 1) * k], &w, 1, k);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&all[t * m..(t + 1) * m]), bits(&solo), "row {t}");
            for (g, e) in solo.iter().zip(&want[t * m..(t + 1) * m]) {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "row {t}: {g} vs {e}");
            }
        }
    }

    /// The AVX2 dot rows are the portable ones, bit for bit.
    #[test]
    fn dot_rows_avx2_equals_portable() {
        let k = 44;
        let w: Vec<f32> = (0..k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let x: Vec<f32> = (0..3 * k).map(|i| ((i * 7) % 23) as f32 / 11.0 - 1.0).collect();
        let (mut wide, mut base) = ([0f32; 3], [0f32; 3]);
        dot_rows(&w, &x, &mut wide);
        crate::kernels::baseline_on_this_thread(|| dot_rows(&w, &x, &mut base));
        assert_eq!(wide.map(f32::to_bits), base.map(f32::to_bits));
    }

    #[test]
    fn views_transposes_scale_and_accumulate() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32).sin()).collect();
        let want = naive(&a, &b, m, n, k);
        let mut c = vec![0f32; m * n];
        gemm(&mut c, n, [m, n, k], View::rows(&a, 0, k), View::rows(&b, 0, n), 1.0, false, false);
        c.iter().zip(&want).for_each(|(x, y)| assert!((x - y).abs() < 1e-5));
        // aᵀ stored as k×m, bᵀ stored as n×k: the same product through transposed views.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        gemm(&mut c, n, [m, n, k], View::t(&at, 0, m), View::t(&bt, 0, k), 2.0, true, true);
        c.iter().zip(&want).for_each(|(x, y)| assert!((x - 3.0 * y).abs() < 1e-4));
        // k = 0 writes zeros.
        gemm(&mut c, n, [m, n, 0], View::rows(&a, 0, k), View::rows(&b, 0, n), 1.0, false, false);
        assert!(c.iter().all(|&x| x == 0.0));
    }

    /// `try_matmul_t` equals burn's `x.matmul(wᵀ)` forward and in both gradients.
    #[test]
    fn matmul_t_matches_burn() {
        use crate::kernels::testing::normal;
        use burn::tensor::Device;
        let dev = Device::flex().autodiff();
        let x0: Tensor<2> = normal([9, 6], 0.0, 1.0, 1, &dev);
        let w0: Tensor<2> = normal([11, 6], 0.0, 1.0, 2, &dev);
        let up: Tensor<2> = normal([9, 11], 0.0, 1.0, 3, &dev);
        let run = |ours: bool| {
            let (x, w) = (x0.clone().detach().require_grad(), w0.clone().detach().require_grad());
            let y = if ours { try_matmul_t(&x, &w).expect("f32 flex") } else { x.clone().matmul(w.clone().transpose()) };
            let g = (y.clone() * up.clone()).sum().backward();
            [y.detach(), x.grad(&g).unwrap(), w.grad(&g).unwrap()].map(|t| t.into_data().try_into_vec::<f32>().unwrap())
        };
        let (a, b) = (run(true), run(false));
        for (p, q) in a.iter().zip(&b) {
            p.iter().zip(q).for_each(|(u, v)| assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}"));
        }
        // A frozen weight gets no gradient.
        let x = x0.clone().detach().require_grad();
        let g = try_matmul_t(&x, &w0).unwrap().sum().backward();
        assert!(x.grad(&g).is_some() && w0.grad(&g).is_none());
    }
}

//! Causal grouped-query attention with RoPE as one op with a hand-written backward, for the
//! flex backend in f32 without a KV cache: training, and batched scoring without a cache.
//!
//! Why: composed from burn ops, RoPE is six element-wise kernels per tensor each way, the shared
//! K/V heads are copied once per query head, and burn's attention fallback writes and walks the
//! `[B, H, T, T]` scores, mask and softmax several times forward and again backward. Here each
//! (batch, head) pair is two small GEMMs per row block and one softmax pass. Backward recomputes
//! the probabilities from the saved log-sum-exp, flash-attention style, so the op keeps
//! `O(B·H·T·D)` state instead of `O(B·H·T²)`. Row blocks see only the keys up to their last
//! row, so the masked upper triangle is mostly never computed.
//!
//! The composed path in [`super::attention`] stays the reference: the unit tests check this
//! op's output and its three gradients against it.

use super::fused::{dims, exp_approx, flex_f32, from_plain, from_tracked, max_of, new_tensor, record, values, FlexF32};
use super::gemm::{gemm, View};
use super::rope::rotate_rows;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// Query rows per block: small enough that the causal triangle is mostly skipped, large
/// enough for the GEMM micro-kernel to run at speed.
const ROW_BLOCK: usize = 64;

/// Sizes of one attention call: batch, positions, query heads, shared K/V heads, head size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.h / self.kvh
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Copies `t` rows of `d` values (row stride `rs` in `src`) into contiguous `dst` `[t, d]` and
/// rotates them with [`rotate_rows`], the host rotation the cached inference path uses.
fn rotate_into(dst: &mut [f32], src: &[f32], off: usize, rs: usize, cos: &[f32], sin: &[f32], d: usize) {
    for (i, out) in dst.chunks_exact_mut(d).enumerate() {
        out.copy_from_slice(&src[off + i * rs..][..d]);
    }
    rotate_rows(dst, cos, sin, 1, d);
}

/// The transpose of [`rotate_into`]'s rotation applied to a gradient `[t, d]`, in place.
fn unrotate(g: &mut [f32], cos: &[f32], sin: &[f32], d: usize) {
    let half = d / 2;
    for (i, row) in g.chunks_exact_mut(d).enumerate() {
        let (c, s) = (&cos[i * d..][..d], &sin[i * d..][..d]);
        for j in 0..half {
            let (g1, g2) = (row[j], row[half + j]);
            row[j] = g1 * c[j] + g2 * s[half + j];
            row[half + j] = g2 * c[half + j] - g1 * s[j];
        }
    }
}

/// What the forward pass keeps for backward: rotated queries `[B, H, T, D]` and keys
/// `[B, KVH, T, D]`, and the log-sum-exp of each score row `[B, H, T]`.
#[derive(Debug, Clone)]
pub struct Saved {
    qr: Vec<f32>,
    kr: Vec<f32>,
    lse: Vec<f32>,
}

/// Forward on host values: `q` `[B, T, H·D]`, `k`/`v` `[B, T, KVH·D]` (projections before RoPE),
/// `cos`/`sin` `[T, D]`. Returns the context `[B, T, H·D]` and the state for backward.
pub fn forward_values(q: &[f32], k: &[f32], v: &[f32], cos: &[f32], sin: &[f32], s: Dims) -> (Vec<f32>, Saved) {
    let Dims { b, t, h, kvh, d } = s;
    let (qw, kw) = (h * d, kvh * d);
    let mut kr = vec![0f32; b * kvh * t * d];
    kr.par_chunks_mut(t * d).enumerate().for_each(|(i, dst)| rotate_into(dst, k, (i / kvh) * t * kw + (i % kvh) * d, kw, cos, sin, d));
    let mut qr = vec![0f32; b * h * t * d];
    let mut lse = vec![0f32; b * h * t];
    let mut heads = vec![0f32; b * h * t * d];
    let (groups, scale) = (s.groups(), s.scale());
    qr.par_chunks_mut(t * d).zip(lse.par_chunks_mut(t)).zip(heads.par_chunks_mut(t * d)).enumerate().for_each(|(i, ((qh, lh), oh))| {
        let (bi, hh) = (i / h, i % h);
        let g = hh / groups;
        rotate_into(qh, q, bi * t * qw + hh * d, qw, cos, sin, d);
        let kg = &kr[(bi * kvh + g) * t * d..][..t * d];
        let v_off = bi * t * kw + g * d;
        let mut p = vec![0f32; ROW_BLOCK * t];
        for r0 in (0..t).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(t);
            let rows = r1 - r0;
            // Scores of rows r0..r1 against keys 0..r1 (the keys they may see).
            gemm(&mut p, t, [rows, r1, d], View::rows(qh, r0 * d, d), View::t(kg, 0, d), scale, false, false);
            for (ri, row) in p.chunks_exact_mut(t).take(rows).enumerate() {
                let n = r0 + ri + 1;
                let m = max_of(&row[..n]);
                let mut sum = 0f32;
                for x in &mut row[..n] {
                    *x = exp_approx(*x - m);
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row[..n].iter_mut().for_each(|x| *x *= inv);
                row[n..r1].iter_mut().for_each(|x| *x = 0.0);
                lh[r0 + ri] = m + sum.ln();
            }
            gemm(&mut oh[r0 * d..], d, [rows, d, r1], View::rows(&p, 0, t), View::rows(v, v_off, kw), 1.0, false, false);
        }
    });
    let mut out = vec![0f32; b * t * qw];
    out.par_chunks_mut(t * qw).enumerate().for_each(|(bi, ob)| {
        for hh in 0..h {
            let src = &heads[(bi * h + hh) * t * d..][..t * d];
            for (i, row) in src.chunks_exact(d).enumerate() {
                ob[i * qw + hh * d..][..d].copy_from_slice(row);
            }
        }
    });
    (out, Saved { qr, kr, lse })
}

/// Backward on host values: gradients of `q`, `k`, `v` (shapes as in [`forward_values`]) from
/// `dout` `[B, T, H·D]`, with the forward's `out` and state.
#[allow(clippy::too_many_arguments)]
pub fn backward_values(v: &[f32], out: &[f32], dout: &[f32], saved: &Saved, cos: &[f32], sin: &[f32], s: Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, t, h, kvh, d } = s;
    let (qw, kw, groups, scale) = (h * d, kvh * d, s.groups(), s.scale());
    // One task per (batch, K/V head): it owns that head's dK/dV and its query heads' dQ.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * kvh)
        .into_par_iter()
        .map(|i| {
            let (bi, g) = (i / kvh, i % kvh);
            let kg = &saved.kr[i * t * d..][..t * d];
            let v_off = bi * t * kw + g * d;
            let mut dq = vec![0f32; groups * t * d];
            let mut dk = vec![0f32; t * d];
            let mut dv = vec![0f32; t * d];
            let mut p = vec![0f32; ROW_BLOCK * t];
            let mut dp = vec![0f32; ROW_BLOCK * t];
            for (gi, dqh) in dq.chunks_exact_mut(t * d).enumerate() {
                let hh = g * groups + gi;
                let qh = &saved.qr[(bi * h + hh) * t * d..][..t * d];
                let lh = &saved.lse[(bi * h + hh) * t..][..t];
                let o_off = bi * t * qw + hh * d;
                for r0 in (0..t).step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(t);
                    let rows = r1 - r0;
                    gemm(&mut p, t, [rows, r1, d], View::rows(qh, r0 * d, d), View::t(kg, 0, d), scale, false, false);
                    // dP = dO·Vᵀ for the same block.
                    gemm(&mut dp, t, [rows, r1, d], View::rows(dout, o_off + r0 * qw, qw), View::t(v, v_off, kw), 1.0, false, false);
                    for ri in 0..rows {
                        let i = r0 + ri;
                        let n = i + 1;
                        let (pr, dpr) = (&mut p[ri * t..][..r1], &mut dp[ri * t..][..r1]);
                        let l = lh[i];
                        for x in &mut pr[..n] {
                            *x = exp_approx(*x - l);
                        }
                        pr[n..].iter_mut().for_each(|x| *x = 0.0);
                        // Σⱼ Pᵢⱼ·dPᵢⱼ = dOᵢ·Oᵢ.
                        let (doi, oi) = (&dout[o_off + i * qw..][..d], &out[o_off + i * qw..][..d]);
                        let rowdot: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                        for (x, y) in pr[..n].iter().zip(&mut dpr[..n]) {
                            *y = x * (*y - rowdot) * scale;
                        }
                        dpr[n..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    // dV[0..r1] += Pᵀ·dO, dQ[r0..r1] = dS·K, dK[0..r1] += dSᵀ·Q.
                    gemm(&mut dv, d, [r1, d, rows], View::t(&p, 0, t), View::rows(dout, o_off + r0 * qw, qw), 1.0, true, false);
                    gemm(&mut dqh[r0 * d..], d, [rows, d, r1], View::rows(&dp, 0, t), View::rows(kg, 0, d), 1.0, false, false);
                    gemm(&mut dk, d, [r1, d, rows], View::t(&dp, 0, t), View::rows(qh, r0 * d, d), 1.0, true, false);
                }
                unrotate(dqh, cos, sin, d);
            }
            unrotate(&mut dk, cos, sin, d);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; b * t * qw];
    let mut dk = vec![0f32; b * t * kw];
    let mut dv = vec![0f32; b * t * kw];
    for (i, (pq, pk, pv)) in parts.iter().enumerate() {
        let (bi, g) = (i / kvh, i % kvh);
        for r in 0..t {
            for gi in 0..groups {
                let hh = g * groups + gi;
                dq[bi * t * qw + r * qw + hh * d..][..d].copy_from_slice(&pq[(gi * t + r) * d..][..d]);
            }
            dk[bi * t * kw + r * kw + g * d..][..d].copy_from_slice(&pk[r * d..][..d]);
            dv[bi * t * kw + r * kw + g * d..][..d].copy_from_slice(&pv[r * d..][..d]);
        }
    }
    (dq, dk, dv)
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// v, the output, the forward state, RoPE tables and sizes.
    type State = (FlexTensor, FlexTensor, Saved, Vec<f32>, Vec<f32>, Dims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (v, out, saved, cos, sin, s) = ops.state;
        let dout = grads.consume::<Flex>(&ops.node);
        let [pq, pk, pv] = ops.parents;
        let (dq, dk, dv) = backward_values(&values(&v), &values(&out), &values(&dout), &saved, &cos, &sin, s);
        let (qs, kvs) = (vec![s.b, s.t, s.h * s.d], vec![s.b, s.t, s.kvh * s.d]);
        if let Some(node) = pq {
            grads.register::<Flex>(node.id, new_tensor(dq, qs));
        }
        if let Some(node) = pk {
            grads.register::<Flex>(node.id, new_tensor(dk, kvs.clone()));
        }
        if let Some(node) = pv {
            grads.register::<Flex>(node.id, new_tensor(dv, kvs));
        }
    }
}

/// Causal attention of `q` `[B, T, H·D]` over `k`/`v` `[B, T, KVH·D]` (projections before RoPE,
/// positions `0..T`) with RoPE tables `cos`/`sin` `[T, D]`; the context `[B, T, H·D]`, or
/// `None` when the inputs are not f32 flex tensors (the caller composes it instead).
pub fn causal_attention(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, cos: &[f32], sin: &[f32], [h, kvh, d]: [usize; 3]) -> Option<Tensor<3>> {
    let [b, t, qw] = q.dims();
    if qw != h * d || k.dims() != [b, t, kvh * d] || v.dims() != [b, t, kvh * d] || h % kvh != 0 || d % 2 != 0 || cos.len() != t * d {
        return None;
    }
    let s = Dims { b, t, h, kvh, d };
    match (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?) {
        (FlexF32::Plain(qp), FlexF32::Plain(kp), FlexF32::Plain(vp)) => {
            let (out, _) = forward_values(&values(&qp), &values(&kp), &values(&vp), cos, sin, s);
            Some(from_plain(new_tensor(out, dims(&qp))))
        }
        (FlexF32::Tracked(qa), FlexF32::Tracked(ka), FlexF32::Tracked(va)) => {
            let (qp, qg) = qa.into_parts();
            let (kp, kg) = ka.into_parts();
            let (vp, vg) = va.into_parts();
            let (out, saved) = forward_values(&values(&qp), &values(&kp), &values(&vp), cos, sin, s);
            let out = new_tensor(out, dims(&qp));
            let kept = out.clone();
            Some(from_tracked(record(AttentionBackward, [qg, kg, vg], || (vp, kept, saved, cos.to_vec(), sin.to_vec(), s), out)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::model::attention::Attention;
    use crate::model::rope::RopeTables;
    use burn::tensor::{Device, Distribution};

    fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Output and the gradients of q, k and v equal the composed path (RoPE ops, repeated K/V
    /// heads, burn's causal attention), for several row-block splits and GQA group sizes.
    #[test]
    fn matches_composed_forward_and_gradients() {
        for &(b, t, h, kvh, d) in &[(2, 5, 4, 2, 8), (1, 70, 3, 1, 16), (2, 130, 6, 3, 8), (1, 64, 2, 2, 4)] {
            let dev = Device::flex().autodiff();
            let cfg = LlamaConfig::synthetic(h * d, 1, h, kvh, 64, 256);
            let rope = RopeTables::new(&cfg, 0, t, &dev, burn::tensor::DType::F32);
            let q0: Tensor<3> = Tensor::random([b, t, h * d], Distribution::Normal(0.0, 1.5), &dev);
            let k0: Tensor<3> = Tensor::random([b, t, kvh * d], Distribution::Normal(0.0, 1.5), &dev);
            let v0: Tensor<3> = Tensor::random([b, t, kvh * d], Distribution::Normal(0.0, 1.0), &dev);
            let up: Tensor<3> = Tensor::random([b, t, h * d], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fused: bool| {
                let (q, k, v) = (q0.clone().detach().require_grad(), k0.clone().detach().require_grad(), v0.clone().detach().require_grad());
                let y = if fused {
                    causal_attention(&q, &k, &v, &rope.cos_host, &rope.sin_host, [h, kvh, d]).expect("f32 flex takes the fused path")
                } else {
                    Attention::composed_context(q.clone(), k.clone(), v.clone(), &rope, None, [h, kvh, d])
                };
                let g = (y.clone() * up.clone()).sum().backward();
                [vec_of(y.detach()), vec_of(q.grad(&g).unwrap()), vec_of(k.grad(&g).unwrap()), vec_of(v.grad(&g).unwrap())]
            };
            let (f, c) = (run(true), run(false));
            for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                assert_close(&f[i], &c[i], 2e-5, &format!("{what} at {:?}", (b, t, h, kvh, d)));
            }
            // Without autodiff the same values come out.
            let plain = Device::flex();
            let p = |x: &Tensor<3>| Tensor::<3>::from_data(x.clone().into_data(), &plain);
            let y = causal_attention(&p(&q0), &p(&k0), &p(&v0), &rope.cos_host, &rope.sin_host, [h, kvh, d]).unwrap();
            assert_close(&vec_of(y), &f[0], 1e-6, "plain forward");
        }
    }

    /// A frozen input (no gradient wanted) gets none, the others still do.
    #[test]
    fn untracked_inputs_get_no_gradient() {
        let dev = Device::flex().autodiff();
        let cfg = LlamaConfig::synthetic(16, 1, 2, 1, 64, 16);
        let rope = RopeTables::new(&cfg, 0, 6, &dev, burn::tensor::DType::F32);
        let q: Tensor<3> = Tensor::random([1, 6, 16], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let k: Tensor<3> = Tensor::random([1, 6, 8], Distribution::Normal(0.0, 1.0), &dev);
        let v: Tensor<3> = Tensor::random([1, 6, 8], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let g = causal_attention(&q, &k, &v, &rope.cos_host, &rope.sin_host, [2, 1, 8]).unwrap().sum().backward();
        assert!(q.grad(&g).is_some() && v.grad(&g).is_some());
        assert!(k.grad(&g).is_none());
    }

    #[test]
    fn rotation_and_its_transpose_are_adjoint() {
        let d = 8;
        let (cos, sin) = crate::model::rope::tables(d, 10000.0, &crate::config::RopeScaling::None, 3, 2);
        let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.71).cos()).collect();
        let mut rx = vec![0f32; 2 * d];
        rotate_into(&mut rx, &x, 0, d, &cos, &sin, d);
        let mut ry = y.clone();
        unrotate(&mut ry, &cos, &sin, d);
        // ⟨R x, y⟩ = ⟨x, Rᵀ y⟩.
        let a: f32 = rx.iter().zip(&y).map(|(p, q)| p * q).sum();
        let b: f32 = x.iter().zip(&ry).map(|(p, q)| p * q).sum();
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

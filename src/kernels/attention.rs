//! Causal grouped-query attention with RoPE on host f32 buffers:
//! - [`causal_attention`]: one op with a hand-written backward, for the flex backend in f32
//!   without a KV cache (training, and batched scoring without a cache);
//! - [`cached_attention`]: batch 1 over a growing host KV cache (inference on flex in f32);
//! - [`attention_composed`]: the composition from burn ops (repeated K/V heads, burn's
//!   `attention`) every other backend, dtype and cache runs, and the reference of both;
//! - [`rotate_rows`]: RoPE applied to host rows, bit for bit the tensor rotation.
//!
//! Why: composed from burn ops, RoPE is six element-wise kernels per tensor each way, the shared
//! K/V heads are copied once per query head, and burn's attention fallback writes and walks the
//! `[B, H, T, T]` scores, mask and softmax several times forward and again backward. Here each
//! (batch, head) pair is two small GEMMs per row block and one softmax pass. Backward recomputes
//! the probabilities from the saved log-sum-exp, flash-attention style, so the op keeps
//! `O(B·H·T·D)` state instead of `O(B·H·T²)`. Row blocks see only the keys up to their last
//! row, so the masked upper triangle is mostly never computed. Decoding one token composed
//! costs some thirty small burn ops per layer; [`cached_attention`] is one pass.
//!
//! The model's `Attention::composed_context` (RoPE tables, the cache, then
//! [`attention_composed`]) stays the reference: its unit tests check these ops' outputs and
//! the three gradients against it.

use super::gemm::{gemm, View};
use super::softmax::{exp_approx, exp_shifted_in_place};
use super::{dims, flex_f32, from_plain, from_tracked, inputs, new_tensor, record, values, Inputs};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};
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

/// Rotates rows of `x` `[t, heads·head_dim]` in place with host tables `[t, head_dim]`: the
/// same products and sum as the model's `RopeTables::apply` (`x·cos + rotate_half(x)·sin`), so
/// the two agree bit for bit.
pub fn rotate_rows(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) {
    let half = head_dim / 2;
    for (row, (c, s)) in x.chunks_exact_mut(heads * head_dim).zip(cos.chunks_exact(head_dim).zip(sin.chunks_exact(head_dim))) {
        for v in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = v.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] + (-b) * s[i];
                x2[i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}

/// Copies `t` rows of `d` values (row stride `rs` in `src`) into contiguous `dst` `[t, d]` and
/// rotates them with [`rotate_rows`], the host rotation the cached inference path uses.
pub fn rotate_into(dst: &mut [f32], src: &[f32], off: usize, rs: usize, cos: &[f32], sin: &[f32], d: usize) {
    for (i, out) in dst.chunks_exact_mut(d).enumerate() {
        out.copy_from_slice(&src[off + i * rs..][..d]);
    }
    rotate_rows(dst, cos, sin, 1, d);
}

/// The transpose of [`rotate_into`]'s rotation applied to a gradient `[t, d]`, in place.
pub fn unrotate(g: &mut [f32], cos: &[f32], sin: &[f32], d: usize) {
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
                let (m, sum) = exp_shifted_in_place(&mut row[..n]);
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
    match inputs([flex_f32(q), flex_f32(k), flex_f32(v)])? {
        Inputs::Plain([qp, kp, vp]) => {
            let (out, _) = forward_values(&values(&qp), &values(&kp), &values(&vp), cos, sin, s);
            Some(from_plain(new_tensor(out, dims(&qp))))
        }
        Inputs::Tracked([qp, kp, vp], nodes) => {
            let (out, saved) = forward_values(&values(&qp), &values(&kp), &values(&vp), cos, sin, s);
            let out = new_tensor(out, dims(&qp));
            let kept = out.clone();
            Some(from_tracked(record(AttentionBackward, nodes, || (vp, kept, saved, cos.to_vec(), sin.to_vec(), s), out)))
        }
    }
}

/// Causal grouped-query attention of `t` new positions of batch 1 over host keys and values
/// `kc`/`vc` `[start + t, kv_heads·d]` (every cached position, the new ones last, keys after
/// RoPE). `q` `[t, heads·d]` holds the new queries after RoPE; query `i` sits at position
/// `start + i` and sees every key up to it. Returns the context `[t, heads·d]`, scores scaled
/// by `1/√d` as burn's `attention` does.
pub fn cached_attention(q: &[f32], kc: KvSlice<'_>, vc: KvSlice<'_>, start: usize, [h, kvh, d]: [usize; 3]) -> Vec<f32> {
    match (kc, vc) {
        (KvSlice::F32(k), KvSlice::F32(v)) => cached_attention_of(q, k, v, start, [h, kvh, d]),
        (KvSlice::F16(k), KvSlice::F16(v)) => cached_attention_of(q, k, v, start, [h, kvh, d]),
        _ => panic!("a layer's keys and values share one storage type"),
    }
}

/// A host cache's keys or values as attention reads them: f32, or f16 widened exactly.
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

/// A cache element: read back as f32 without rounding.
pub trait KvElem: Copy + Send + Sync {
    /// Stored as IEEE half precision (F16C widens eight at a time).
    const HALF: bool;
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// [`cached_attention`] over keys and values stored as `T`.
fn cached_attention_of<T: KvElem>(q: &[f32], kc: &[T], vc: &[T], start: usize, [h, kvh, d]: [usize; 3]) -> Vec<f32> {
    let t = q.len() / (h * d);
    // Head-major [h, t, d]; for one token that is already [t, h·d].
    let mut out = vec![0f32; h * t * d];
    // Spread (head, block of queries) tasks over threads only when there is real work (a
    // prompt), not for one token. The quantized products' spinning team runs them: its helpers
    // are awake between two products, where rayon's would have to be woken (perf on the 2-core
    // machine: the caller computed every head alone while a team helper spun).
    if t * (start + t) * d >= 1 << 16 {
        const QB: usize = 16;
        let tasks: Vec<(usize, usize, &mut [f32])> = out.chunks_mut(t * d).enumerate().flat_map(|(hh, o)| o.chunks_mut(QB * d).enumerate().map(move |(c, oc)| (hh, c * QB, oc))).collect();
        crate::ggml::team::for_each(rayon::current_num_threads(), tasks, |(hh, i0, o)| cached_head(q, kc, vc, start, [h, kvh, d], hh, i0, o, &mut Vec::new()));
    } else {
        // One scores buffer for every head: decoding calls this per layer and token.
        let mut p = Vec::new();
        out.chunks_mut(t * d).enumerate().for_each(|(hh, o)| cached_head(q, kc, vc, start, [h, kvh, d], hh, 0, o, &mut p));
    }
    if t == 1 {
        return out;
    }
    let mut ctx = vec![0f32; t * h * d];
    for hh in 0..h {
        for i in 0..t {
            ctx[i * h * d + hh * d..][..d].copy_from_slice(&out[(hh * t + i) * d..][..d]);
        }
    }
    ctx
}

/// [`cached_attention`]'s queries `i0..` of head `hh` into `o` (their rows of the head's block
/// `[t, d]`). The queries are `start + i0 + i` positions in, and see the keys up to their own.
/// With AVX2 (and a head size in whole eight-lane chunks) [`x86::cached_head`] does the same
/// arithmetic with its vectors in registers; [`cached_head_scalar`] is the reference it equals
/// bit for bit (`cached_attention_avx2_equals_scalar`). `p` is scratch for the scores, grown
/// as needed (its contents are overwritten before they are read).
#[allow(clippy::too_many_arguments)]
fn cached_head<T: KvElem>(q: &[f32], kc: &[T], vc: &[T], start: usize, dims: [usize; 3], hh: usize, i0: usize, o: &mut [f32], p: &mut Vec<f32>) {
    let last = start + i0 + o.len() / dims[2];
    if p.len() < last {
        p.resize(last, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if dims[2].is_multiple_of(8) && super::has_wide() && (!T::HALF || std::arch::is_x86_feature_detected!("f16c")) {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA, and F16C where the cache
        // is f16.
        return unsafe { x86::cached_head(q, kc, vc, start, dims, hh, i0, o, p) };
    }
    cached_head_scalar(q, kc, vc, start, dims, hh, i0, o, p)
}

/// The reference arithmetic of [`cached_head`]: scores as [`dot`]s scaled, the softmax
/// numerators and their sum ([`exp_shifted_in_place`]), the values summed key by key in order,
/// then one multiplication by the inverse sum.
#[allow(clippy::too_many_arguments)]
fn cached_head_scalar<T: KvElem>(q: &[f32], kc: &[T], vc: &[T], start: usize, [h, kvh, d]: [usize; 3], hh: usize, i0: usize, o: &mut [f32], p: &mut [f32]) {
    let (w, scale) = (kvh * d, 1.0 / (d as f32).sqrt());
    let g = hh / (h / kvh);
    for (i, oi) in o.chunks_exact_mut(d).enumerate().map(|(i, oi)| (i0 + i, oi)) {
        let qi = &q[i * h * d + hh * d..][..d];
        let n = start + i + 1;
        for (j, pj) in p[..n].iter_mut().enumerate() {
            *pj = dot(qi, &kc[j * w + g * d..][..d]) * scale;
        }
        let (_, sum) = exp_shifted_in_place(&mut p[..n]);
        for (j, &pj) in p[..n].iter().enumerate() {
            for (a, &b) in oi.iter_mut().zip(&vc[j * w + g * d..][..d]) {
                *a += pj * b.widen();
            }
        }
        let inv = 1.0 / sum;
        oi.iter_mut().for_each(|a| *a *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::softmax::x86::exp_shifted_in_place;
    use super::KvElem;
    use std::arch::x86_64::*;

    /// [`super::cached_head_scalar`] in AVX2 registers, for a head size `d` in whole chunks of
    /// eight. The same operations in the same order: each score's eight lanes accumulate the
    /// chunks in turn and are then summed left to right (plus `dot`'s empty remainder); each
    /// output sums `p_j·v_j` over the keys in order from zero (`mul` then `add`, never a fused
    /// FMA); then one multiplication by `1/Σ`. Four keys' scores are made together, so that
    /// four independent chains fill the adders, and the outputs stay in registers across
    /// every key.
    ///
    /// An f16 cache (`T::HALF`) is widened eight values at a time by F16C, exactly, so the
    /// arithmetic after the load is the f32 cache's.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (`kernels::has_wide`), and F16C for an f16 cache.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cached_head<T: KvElem>(q: &[f32], kc: &[T], vc: &[T], start: usize, [h, kvh, d]: [usize; 3], hh: usize, i0: usize, o: &mut [f32], p: &mut [f32]) {
        let (w, scale, chunks) = (kvh * d, 1.0 / (d as f32).sqrt(), d / 8);
        let g = hh / (h / kvh);
        let rows = o.len() / d;
        // Eight cached values at `p` as f32.
        let ld = |p: *const T| if T::HALF { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) } else { _mm256_loadu_ps(p as *const f32) };
        let last = start + i0 + rows;
        assert!(kc.len() >= last * w && vc.len() >= last * w && q.len() >= (i0 + rows) * h * d && hh < h && p.len() >= last);
        let empty: f32 = std::iter::empty::<f32>().sum();
        let lanes_sum = |v: __m256| {
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), v);
            l.iter().sum::<f32>() + empty
        };
        for (i, oi) in o.chunks_exact_mut(d).enumerate().map(|(i, oi)| (i0 + i, oi)) {
            let qp = q.as_ptr().add(i * h * d + hh * d);
            let n = start + i + 1;
            let kp = |j: usize| kc.as_ptr().add(j * w + g * d);
            let mut j = 0;
            // Eight keys at a time: their eight lane sums are one 8×8 transposition and seven
            // vertical additions in `lanes_sum`'s order (lane 0 first), instead of a store and
            // eight scalar additions per key, which made the scores most of a decode step's
            // attention.
            let (zero, emptyv, scalev) = (_mm256_set1_ps(std::iter::empty::<f32>().sum()), _mm256_set1_ps(empty), _mm256_set1_ps(scale));
            while j + 8 <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in 0..chunks {
                    let x = _mm256_loadu_ps(qp.add(c * 8));
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(x, ld(kp(j + k).add(c * 8))));
                    }
                }
                let lanes = transpose8(acc);
                let sums = lanes.iter().fold(zero, |s, &l| _mm256_add_ps(s, l));
                _mm256_storeu_ps(p.as_mut_ptr().add(j), _mm256_mul_ps(_mm256_add_ps(sums, emptyv), scalev));
                j += 8;
            }
            while j + 4 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..chunks {
                    let x = _mm256_loadu_ps(qp.add(c * 8));
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(x, ld(kp(j + k).add(c * 8))));
                    }
                }
                for (k, a) in acc.iter().enumerate() {
                    p[j + k] = lanes_sum(*a) * scale;
                }
                j += 4;
            }
            while j < n {
                let mut a = _mm256_setzero_ps();
                for c in 0..chunks {
                    a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(qp.add(c * 8)), ld(kp(j).add(c * 8))));
                }
                p[j] = lanes_sum(a) * scale;
                j += 1;
            }
            let (_, sum) = exp_shifted_in_place(&mut p[..n]);
            let inv = _mm256_set1_ps(1.0 / sum);
            // Outputs in groups of up to eight registers, each held across all keys.
            let mut c0 = 0;
            while c0 < chunks {
                let m = (chunks - c0).min(8);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (jj, &pj) in p[..n].iter().enumerate() {
                    let pv = _mm256_set1_ps(pj);
                    let vp = vc.as_ptr().add(jj * w + g * d + c0 * 8);
                    for (c, a) in acc.iter_mut().enumerate().take(m) {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, ld(vp.add(c * 8))));
                    }
                }
                for (c, a) in acc.iter().enumerate().take(m) {
                    _mm256_storeu_ps(oi.as_mut_ptr().add((c0 + c) * 8), _mm256_mul_ps(*a, inv));
                }
                c0 += m;
            }
        }
    }

    /// Lane `l` of output `k` is lane `k` of input `l`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::kernels) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ]
    }
}

/// `Σ aᵢ·bᵢ` in eight lanes (one f32 chain would not vectorise).
#[inline(always)]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.widen()).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].widen();
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The context `[B, T, heads·head_dim]` composed from burn ops, for any backend and dtype:
/// queries `q` `[B, heads, T, head_dim]` at positions `start..start+T` over keys and values
/// `k`/`v` `[B, kv_heads, K, head_dim]` (positions `0..K`, everything cached included), both
/// after RoPE. The shared K/V heads are repeated and burn's `attention` runs with the causal
/// mask, scores scaled by `1/√head_dim`.
pub fn attention_composed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, start: usize) -> Tensor<3> {
    let [b, h, t, d] = q.dims();
    let kvh = k.dims()[1];
    let k_len = k.dims()[2];
    let k = repeat_kv(k, h / kvh);
    let v = repeat_kv(v, h / kvh);
    // A causal flag means "query i sees keys ≤ i" counted from the top-left, which is only
    // right when queries and keys start together; with a cache the mask must be explicit.
    let (mask, is_causal) = if t == 1 {
        (None, false)
    } else if start == 0 && k_len == t {
        (None, true)
    } else {
        (Some(causal_mask(t, k_len, start, &q.device()).expand([b, h, t, k_len])), false)
    };
    let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal };
    let ctx = attention(q, k, v, mask, None, opts);
    ctx.swap_dims(1, 2).reshape([b, t, h * d])
}

/// Shares each key/value head among `groups` query heads.
fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kvh, groups, t, d]).reshape([b, kvh * groups, t, d])
}

/// `true` where key position > query position, for queries at `start..start+t`.
fn causal_mask(t: usize, k_len: usize, start: usize, device: &burn::tensor::Device) -> Tensor<4, Bool> {
    let v: Vec<bool> = (0..t).flat_map(|i| (0..k_len).map(move |j| j > start + i)).collect();
    Tensor::from_data(TensorData::new(v, [1, 1, t, k_len]), device)
}

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
use super::softmax::{exp_minus_in_place, exp_shifted_in_place, exp_shifted_in_place_scalar};
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
                        exp_minus_in_place(&mut pr[..n], lh[i]);
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

/// Keys per block of a [`KvStore`]: one AVX2 vector's lanes.
pub const KV_BLOCK: usize = 8;

/// One layer's cached keys and values (keys after RoPE), laid out for [`cached_attention`].
/// Each shared K/V head has its own two buffers, so that attention over one head streams two
/// contiguous runs of memory (token-major rows put the other heads' values between every two
/// keys, and a decode step of several sequences waits on reading the cache once it has left
/// the CPU caches):
/// - keys in blocks of [`KV_BLOCK`] positions, each block dimension-major (`[d][8]`): the
///   eight keys' values for one dimension are one vector, so a query's eight scores come out
///   of one chain of multiply-adds per block with no horizontal sums;
/// - values position-major (`[pos][d]`), a row per position.
///
/// Both grow a whole block at a time (zeros past the last position, never read as a key or
/// value). `T` is the storage type: f32, or f16 ([`KvElem`]) rounded once when appended.
#[derive(Clone, Debug, Default)]
pub struct KvStore<T> {
    kvh: usize,
    d: usize,
    len: usize,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: KvElem> KvStore<T> {
    pub fn new() -> Self {
        KvStore { kvh: 0, d: 0, len: 0, k: Vec::new(), v: Vec::new() }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `t` positions: `k` and `v` `[t, kv_heads·head_dim]` row-major, head after head.
    pub fn append(&mut self, k: &[f32], v: &[f32], kvh: usize, d: usize) {
        assert!(kvh > 0 && d > 0 && k.len() == v.len() && k.len().is_multiple_of(kvh * d), "keys and values are [t, {kvh}·{d}] rows");
        if self.kvh == 0 {
            (self.kvh, self.d) = (kvh, d);
            self.k = vec![Vec::new(); kvh];
            self.v = vec![Vec::new(); kvh];
        }
        assert!(self.kvh == kvh && self.d == d, "one layer's cache keeps one shape: [{}, {}], not [{kvh}, {d}]", self.kvh, self.d);
        let block = KV_BLOCK * d;
        for (kr, vr) in k.chunks_exact(kvh * d).zip(v.chunks_exact(kvh * d)) {
            let (j, lane) = (self.len, self.len % KV_BLOCK);
            for g in 0..kvh {
                let (kg, vg) = (&mut self.k[g], &mut self.v[g]);
                if lane == 0 {
                    kg.resize(kg.len() + block, T::ZERO);
                    vg.resize(vg.len() + block, T::ZERO);
                }
                let kb = &mut kg[j / KV_BLOCK * block..][..block];
                for (dd, &x) in kr[g * d..][..d].iter().enumerate() {
                    kb[dd * KV_BLOCK + lane] = T::narrow(x);
                }
                for (o, &x) in vg[j * d..][..d].iter_mut().zip(&vr[g * d..][..d]) {
                    *o = T::narrow(x);
                }
            }
            self.len += 1;
        }
    }

    /// The cached keys and values as f32 rows `[len, kv_heads·head_dim]` (copies).
    pub fn rows(&self) -> (Vec<f32>, Vec<f32>) {
        let (w, d) = (self.kvh * self.d, self.d);
        let (mut k, mut v) = (vec![0f32; self.len * w], vec![0f32; self.len * w]);
        for j in 0..self.len {
            for g in 0..self.kvh {
                for dd in 0..d {
                    k[j * w + g * d + dd] = self.key(g, j, dd).widen();
                    v[j * w + g * d + dd] = self.v[g][j * d + dd].widen();
                }
            }
        }
        (k, v)
    }

    #[inline(always)]
    fn key(&self, g: usize, j: usize, dd: usize) -> T {
        self.k[g][j / KV_BLOCK * KV_BLOCK * self.d + dd * KV_BLOCK + j % KV_BLOCK]
    }
}

/// A layer's host cache in either storage type.
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    F32(&'a KvStore<f32>),
    F16(&'a KvStore<half::f16>),
}

/// A cache element: f32, or f16 read back as f32 without rounding.
pub trait KvElem: Copy + Send + Sync + std::fmt::Debug {
    /// Stored as IEEE half precision (F16C widens eight at a time).
    const HALF: bool;
    const ZERO: Self;
    fn widen(self) -> f32;
    /// Rounds to nearest even where the storage is narrower.
    fn narrow(x: f32) -> Self;
}

impl KvElem for f32 {
    const HALF: bool = false;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        x
    }
}

impl KvElem for half::f16 {
    const HALF: bool = true;
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Causal grouped-query attention of `t` new positions of batch 1 over a host cache `kv` that
/// holds `start + t` positions (every cached one, the new ones last). `q` `[t, heads·d]` holds
/// the new queries after RoPE; query `i` sits at position `start + i` and sees every key up to
/// it. Returns the context `[t, heads·d]`, scores scaled by `1/√d` as burn's `attention` does.
pub fn cached_attention(q: &[f32], kv: KvRef<'_>, start: usize, [h, kvh, d]: [usize; 3]) -> Vec<f32> {
    match kv {
        KvRef::F32(s) => cached_attention_of(q, s, start, [h, kvh, d]),
        KvRef::F16(s) => cached_attention_of(q, s, start, [h, kvh, d]),
    }
}

/// [`cached_attention`] over a cache stored as `T`.
fn cached_attention_of<T: KvElem>(q: &[f32], kv: &KvStore<T>, start: usize, [h, kvh, d]: [usize; 3]) -> Vec<f32> {
    let (t, gs) = (q.len() / (h * d), h / kvh);
    assert!(h.is_multiple_of(kvh) && q.len() == t * h * d && kv.len() == start + t && kv.kvh == kvh && kv.d == d, "queries [{t}, {h}·{d}] over a cache of {} positions × [{}, {}], {start} of them before", kv.len(), kv.kvh, kv.d);
    // Group-major [kvh, t, gs·d]: each task writes one K/V head's query heads for a run of
    // queries; for one token that is already [t, h·d].
    let mut out = vec![0f32; h * t * d];
    // Spread (K/V head, block of queries) tasks over threads only when there is real work (a
    // prompt), not for one token. The quantized products' spinning team runs them: its helpers
    // are awake between two products, where rayon's would have to be woken (perf on the 2-core
    // machine: the caller computed every head alone while a team helper spun).
    if t * (start + t) * d >= 1 << 16 {
        const QB: usize = 16;
        let tasks: Vec<(usize, usize, &mut [f32])> = out.chunks_mut(t * gs * d).enumerate().flat_map(|(g, o)| o.chunks_mut(QB * gs * d).enumerate().map(move |(c, oc)| (g, c * QB, oc))).collect();
        crate::ggml::team::for_each(rayon::current_num_threads(), tasks, |(g, i0, o)| cached_group(q, kv, start, [h, kvh, d], g, i0, o, &mut Vec::new()));
    } else {
        // One scores buffer for every head: decoding calls this per layer and token.
        let mut p = Vec::new();
        out.chunks_mut(t * gs * d).enumerate().for_each(|(g, o)| cached_group(q, kv, start, [h, kvh, d], g, 0, o, &mut p));
    }
    if t == 1 {
        return out;
    }
    let mut ctx = vec![0f32; t * h * d];
    for g in 0..kvh {
        for i in 0..t {
            ctx[i * h * d + g * gs * d..][..gs * d].copy_from_slice(&out[(g * t + i) * gs * d..][..gs * d]);
        }
    }
    ctx
}

/// [`cached_attention`]'s queries `i0..` of the query heads that share K/V head `g`, into `o`
/// (rows `[gs·d]`, one per query). The queries are `start + i0 + i` positions in and see the keys
/// up to their own. With AVX2 and FMA (and a head size in whole eight-lane chunks)
/// [`x86::cached_group`] does the same arithmetic in registers; [`cached_group_scalar`] is the
/// reference it equals bit for bit (`cached_attention_avx2_equals_scalar`). `p` is scratch for
/// the scores, grown as needed (its contents are overwritten before they are read).
#[allow(clippy::too_many_arguments)]
fn cached_group<T: KvElem>(q: &[f32], kv: &KvStore<T>, start: usize, dims: [usize; 3], g: usize, i0: usize, o: &mut [f32], p: &mut Vec<f32>) {
    let gs = dims[0] / dims[1];
    // Every head's scores over whole blocks (the kernel writes the lanes past the last key).
    let need = gs * (start + i0 + o.len() / (gs * dims[2])).div_ceil(KV_BLOCK) * KV_BLOCK;
    if p.len() < need {
        p.resize(need, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if dims[2].is_multiple_of(8) && super::has_wide() && (!T::HALF || std::arch::is_x86_feature_detected!("f16c")) {
        // SAFETY: `has_wide` checked that the CPU has AVX2 and FMA, and F16C where the cache
        // is f16.
        return unsafe { x86::cached_group(q, kv, start, dims, g, i0, o, p) };
    }
    cached_group_scalar(q, kv, start, dims, g, i0, o, p)
}

/// The reference arithmetic of [`cached_group`], per query and head: each score one chain of
/// fused multiply-adds over the dimensions in order from zero, then scaled; the softmax
/// numerators and their sum ([`exp_shifted_in_place_scalar`]); each output value one chain of fused
/// multiply-adds over the keys in order from zero, then one multiplication by the inverse sum.
#[allow(clippy::too_many_arguments)]
fn cached_group_scalar<T: KvElem>(q: &[f32], kv: &KvStore<T>, start: usize, [h, kvh, d]: [usize; 3], g: usize, i0: usize, o: &mut [f32], p: &mut [f32]) {
    let (gs, scale) = (h / kvh, 1.0 / (d as f32).sqrt());
    for (i, oi) in o.chunks_exact_mut(gs * d).enumerate().map(|(i, oi)| (i0 + i, oi)) {
        let n = start + i + 1;
        for (hl, ohl) in oi.chunks_exact_mut(d).enumerate() {
            let qi = &q[i * h * d + (g * gs + hl) * d..][..d];
            for (j, pj) in p[..n].iter_mut().enumerate() {
                *pj = qi.iter().enumerate().fold(0f32, |s, (dd, &x)| x.mul_add(kv.key(g, j, dd).widen(), s)) * scale;
            }
            let (_, sum) = exp_shifted_in_place_scalar(&mut p[..n]);
            let inv = 1.0 / sum;
            for (dd, a) in ohl.iter_mut().enumerate() {
                *a = p[..n].iter().enumerate().fold(0f32, |s, (j, &pj)| pj.mul_add(kv.v[g][j * d + dd].widen(), s)) * inv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::softmax::x86::exp_shifted_in_place;
    use super::{KvElem, KvStore, KV_BLOCK};
    use std::arch::x86_64::*;

    /// Eight cached values at `p` as f32: F16C widens f16 exactly.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld<T: KvElem>(p: *const T) -> __m256 {
        if T::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// A software prefetch cursor over the byte ranges a head's attention reads next. Each
    /// group's keys and values are short runs (16 KB each at 64 positions in f32), in pages of
    /// their own that the hardware prefetcher starts cold at every page; in a decode step of
    /// several sequences they come from memory (the weights evict them between two visits of
    /// a layer), so the loads wait on memory latency unless someone asks ahead.
    struct Ahead {
        ranges: [(*const u8, *const u8); 3],
        at: usize,
    }

    impl Ahead {
        /// Requests the next `lines` cache lines into L1.
        #[inline(always)]
        fn pull(&mut self, lines: usize) {
            for _ in 0..lines {
                while self.at < 3 && self.ranges[self.at].0 >= self.ranges[self.at].1 {
                    self.at += 1;
                }
                if self.at == 3 {
                    return;
                }
                let r = &mut self.ranges[self.at];
                // SAFETY: a prefetch of an address inside the range never faults or reads
                // into the program.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(r.0 as *const i8) };
                r.0 = r.0.wrapping_add(64);
            }
        }
    }

    /// The byte range of a slice.
    fn span<T>(x: &[T]) -> (*const u8, *const u8) {
        let r = x.as_ptr_range();
        (r.start as *const u8, r.end as *const u8)
    }

    /// [`super::cached_group_scalar`] in AVX2 registers, for a head size `d` in whole chunks of
    /// eight: the same fused multiply-adds in the same order, so the same bits. Up to three
    /// query heads of the group go together, so that each key and value vector is loaded once
    /// for all of them:
    /// - scores: the lanes of a key block are its eight keys, so `nh` heads × four blocks are
    ///   twelve independent accumulator chains, each one multiply-add per dimension (enough to
    ///   fill both FMA pipes while the next blocks load);
    /// - outputs: `nh` heads × four eight-value chunks, each one multiply-add per key, over
    ///   every key with the accumulators in registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (`kernels::has_wide`), and F16C for an f16 cache.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cached_group<T: KvElem>(q: &[f32], kv: &KvStore<T>, start: usize, [h, kvh, d]: [usize; 3], g: usize, i0: usize, o: &mut [f32], p: &mut [f32]) {
        let (gs, scale) = (h / kvh, 1.0 / (d as f32).sqrt());
        let rows = o.len() / (gs * d);
        let nbk = (start + i0 + rows).div_ceil(KV_BLOCK);
        let (kg, vg) = (&kv.k[g], &kv.v[g]);
        assert!(d.is_multiple_of(8) && kg.len() >= nbk * KV_BLOCK * d && vg.len() >= nbk * KV_BLOCK * d && q.len() >= (i0 + rows) * h * d && g < kvh && p.len() >= gs * nbk * KV_BLOCK);
        let stride = nbk * KV_BLOCK;
        let used = nbk * KV_BLOCK * d;
        let none = (std::ptr::null::<u8>(), std::ptr::null::<u8>());
        for (i, oi) in o.chunks_exact_mut(gs * d).enumerate().map(|(i, oi)| (i0 + i, oi)) {
            let n = start + i + 1;
            // The task's first query and head set read this group's keys and values from
            // memory; the others find them in cache. Ask ahead for the keys past the first
            // four blocks, the values, and the next group's keys.
            let mut ahead = Ahead { ranges: [none; 3], at: 0 };
            if i == i0 {
                let next = if g + 1 < kvh && rows == 1 { span(&kv.k[g + 1][..used]) } else { none };
                ahead.ranges = [span(&kg[(4 * KV_BLOCK * d).min(used)..used]), span(&vg[..used]), next];
            }
            let mut h0 = 0;
            while h0 < gs {
                let nh = (gs - h0).min(3);
                let qs: [*const f32; 3] = std::array::from_fn(|x| q.as_ptr().add(i * h * d + (g * gs + h0 + x.min(nh - 1)) * d));
                let ps: [*mut f32; 3] = std::array::from_fn(|x| p.as_mut_ptr().add((h0 + x.min(nh - 1)) * stride));
                match nh {
                    3 => scores::<T, 3>(qs, kg.as_ptr(), n, d, scale, ps, &mut ahead),
                    2 => scores::<T, 2>(qs, kg.as_ptr(), n, d, scale, ps, &mut ahead),
                    _ => scores::<T, 1>(qs, kg.as_ptr(), n, d, scale, ps, &mut ahead),
                }
                let mut inv = [0f32; 3];
                for (x, iv) in inv.iter_mut().enumerate().take(nh) {
                    let (_, sum) = exp_shifted_in_place(std::slice::from_raw_parts_mut(ps[x], n));
                    *iv = 1.0 / sum;
                }
                let os: [*mut f32; 3] = std::array::from_fn(|x| oi.as_mut_ptr().add((h0 + x.min(nh - 1)) * d));
                match nh {
                    3 => outputs::<T, 3>(ps, vg.as_ptr(), n, d, inv, os, &mut ahead),
                    2 => outputs::<T, 2>(ps, vg.as_ptr(), n, d, inv, os, &mut ahead),
                    _ => outputs::<T, 1>(ps, vg.as_ptr(), n, d, inv, os, &mut ahead),
                }
                h0 += nh;
            }
        }
    }

    /// Scaled scores of `NH` heads' queries `qs` (`d` values each) against the first `n` keys
    /// of one K/V head's blocks `kb`, into `ps` (whole blocks: the lanes past `n` get the
    /// padding's scores).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    // Register blocks indexed on both axes read more plainly than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn scores<T: KvElem, const NH: usize>(qs: [*const f32; 3], kb: *const T, n: usize, d: usize, scale: f32, ps: [*mut f32; 3], ahead: &mut Ahead) {
        let (blocks, sv) = (n.div_ceil(KV_BLOCK), _mm256_set1_ps(scale));
        // Lines read per dimension of four blocks.
        let per = (4 * KV_BLOCK * std::mem::size_of::<T>()).div_ceil(64);
        let mut b0 = 0;
        while b0 + 4 <= blocks {
            let mut acc = [[_mm256_setzero_ps(); 4]; NH];
            let base = kb.add(b0 * KV_BLOCK * d);
            for dd in 0..d {
                ahead.pull(per);
                let qv: [__m256; NH] = std::array::from_fn(|x| _mm256_broadcast_ss(&*qs[x].add(dd)));
                for b in 0..4 {
                    let kv = ld(base.add(b * KV_BLOCK * d + dd * KV_BLOCK));
                    for x in 0..NH {
                        acc[x][b] = _mm256_fmadd_ps(qv[x], kv, acc[x][b]);
                    }
                }
            }
            for x in 0..NH {
                for (b, a) in acc[x].iter().enumerate() {
                    _mm256_storeu_ps(ps[x].add((b0 + b) * KV_BLOCK), _mm256_mul_ps(*a, sv));
                }
            }
            b0 += 4;
        }
        while b0 < blocks {
            let mut acc = [_mm256_setzero_ps(); NH];
            let base = kb.add(b0 * KV_BLOCK * d);
            for dd in 0..d {
                ahead.pull(1);
                let kv = ld(base.add(dd * KV_BLOCK));
                for x in 0..NH {
                    acc[x] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*qs[x].add(dd)), kv, acc[x]);
                }
            }
            for (x, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(ps[x].add(b0 * KV_BLOCK), _mm256_mul_ps(*a, sv));
            }
            b0 += 1;
        }
    }

    /// `NH` heads' outputs `os` (`d` values each): the first `n` value rows `vr` weighted by
    /// the heads' numerators `ps`, each sum times its head's `inv`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn outputs<T: KvElem, const NH: usize>(ps: [*mut f32; 3], vr: *const T, n: usize, d: usize, inv: [f32; 3], os: [*mut f32; 3], ahead: &mut Ahead) {
        let mut c0 = 0;
        while c0 < d {
            match (d - c0) / 8 {
                1 => output_chunks::<T, NH, 1>(ps, vr.add(c0), n, d, inv, os.map(|o| o.add(c0)), ahead),
                2 => output_chunks::<T, NH, 2>(ps, vr.add(c0), n, d, inv, os.map(|o| o.add(c0)), ahead),
                3 => output_chunks::<T, NH, 3>(ps, vr.add(c0), n, d, inv, os.map(|o| o.add(c0)), ahead),
                _ => output_chunks::<T, NH, 4>(ps, vr.add(c0), n, d, inv, os.map(|o| o.add(c0)), ahead),
            }
            c0 += 32;
        }
    }

    /// [`outputs`] for `M` eight-value chunks of each row, from `vr` on (row stride `d`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    // Register blocks indexed on both axes read more plainly than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn output_chunks<T: KvElem, const NH: usize, const M: usize>(ps: [*mut f32; 3], vr: *const T, n: usize, d: usize, inv: [f32; 3], os: [*mut f32; 3], ahead: &mut Ahead) {
        let mut acc = [[_mm256_setzero_ps(); M]; NH];
        let per = (M * 8 * std::mem::size_of::<T>()).div_ceil(64);
        for j in 0..n {
            ahead.pull(per);
            let pv: [__m256; NH] = std::array::from_fn(|x| _mm256_broadcast_ss(&*ps[x].add(j)));
            let row = vr.add(j * d);
            for c in 0..M {
                let v = ld(row.add(c * 8));
                for x in 0..NH {
                    acc[x][c] = _mm256_fmadd_ps(pv[x], v, acc[x][c]);
                }
            }
        }
        for x in 0..NH {
            let iv = _mm256_set1_ps(inv[x]);
            for (c, a) in acc[x].iter().enumerate() {
                _mm256_storeu_ps(os[x].add(c * 8), _mm256_mul_ps(*a, iv));
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

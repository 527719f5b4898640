//! Grouped-query self-attention with RoPE. The score/softmax/value product goes through
//! burn's `attention` op, which libtorch maps to its fused SDPA kernel and other backends to a
//! NaN-safe reference implementation.
//!
//! Inference on flex in f32 with a KV cache (generation, chat, serving) takes a fused host
//! path instead: RoPE, the cache append and the attention of batch 1 run in one pass over host
//! buffers ([`host_attention`]). Decoding one token otherwise costs some thirty small burn ops
//! per layer (narrow/cat/neg for RoPE, a concatenation of the whole cache, the expansion of
//! the shared K/V heads, softmax), whose dispatch and allocations took a large share of a
//! ~10 ms token.
//!
//! Training and other calls without a cache on flex in f32 take
//! [`super::fused_attention::causal_attention`]: RoPE, the causal softmax and the value product
//! in one op with a hand-written backward. Everything else (libtorch, f16/bf16, caches of
//! batch > 1) runs [`Attention::composed_context`], the reference both fused paths are tested
//! against.

use super::cache::{HostKv, LayerCache};
use super::fused::{flex_f32, from_plain, new_tensor, values, FlexF32};
use super::fused_attention::causal_attention;
use super::linear::Linear;
use super::rope::{rotate_rows, RopeTables};
use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};
use rayon::prelude::*;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>, rope: &RopeTables, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let b = x.dims()[0];
        let sizes = [self.num_heads, self.num_kv_heads, self.head_dim];
        // One pass over the input for the three projections that read it (see
        // `Linear::forward_shared`).
        let [q, k, v] = Linear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let ctx = match cache {
            Some(c) if b == 1 => match self.fused(&q, &k, &v, rope, &mut *c) {
                Some(ctx) => ctx,
                None => Self::composed_context(q, k, v, rope, Some(c), sizes),
            },
            Some(c) => Self::composed_context(q, k, v, rope, Some(c), sizes),
            // Without a cache (training, batched scoring) the positions start at 0: one fused
            // op on f32 flex (see `fused_attention`), the composition elsewhere.
            None => match if rope.start == 0 { causal_attention(&q, &k, &v, &rope.cos_host, &rope.sin_host, sizes) } else { None } {
                Some(ctx) => ctx,
                None => Self::composed_context(q, k, v, rope, None, sizes),
            },
        };
        self.o_proj.forward(ctx)
    }

    /// The context `[B, T, heads·head_dim]` from the projections `q` `[B, T, heads·head_dim]`,
    /// `k`/`v` `[B, T, kv_heads·head_dim]`, composed from burn ops: RoPE, the cache append,
    /// shared K/V heads repeated, and burn's `attention`. Any backend and dtype; the reference
    /// the fused paths are tested against.
    pub fn composed_context(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, rope: &RopeTables, cache: Option<&mut LayerCache>, [h, kvh, d]: [usize; 3]) -> Tensor<3> {
        let [b, t, _] = q.dims();
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
        let q = rope.apply(heads(q, h));
        let k = rope.apply(heads(k, kvh));
        let v = heads(v, kvh);
        let (k, v) = match cache {
            Some(c) => c.append(k, v),
            None => (k, v),
        };
        let k_len = k.dims()[2];
        let k = repeat_kv(k, h / kvh);
        let v = repeat_kv(v, h / kvh);
        let start = rope.start;
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

    /// The fused host path for batch 1: the context `[1, T, heads·head_dim]`, or `None` when
    /// the projections are not plain f32 flex tensors (autodiff, another backend or dtype).
    fn fused(&self, q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, rope: &RopeTables, cache: &mut LayerCache) -> Option<Tensor<3>> {
        let (FlexF32::Plain(qp), FlexF32::Plain(kp), FlexF32::Plain(vp)) = (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?) else {
            return None;
        };
        let hc = cache.host()?;
        let t = q.dims()[1];
        let mut qh = values(&qp).into_owned();
        let mut kh = values(&kp).into_owned();
        let ctx = host_attention(&mut qh, &mut kh, &values(&vp), &rope.cos_host, &rope.sin_host, hc, [self.num_heads, self.num_kv_heads, self.head_dim]);
        Some(from_plain(new_tensor(ctx, vec![1, t, self.num_heads * self.head_dim])))
    }
}

/// Causal grouped-query attention of `t` new positions of batch 1 over a host cache, which
/// gets their keys and values appended. `q` `[t, heads·d]`, `k`/`v` `[t, kv_heads·d]` are the
/// projections before RoPE (rotated here in place with `cos`/`sin` `[t, d]`); query `i` sits
/// at position `cache.len() + i` and sees every key up to it. Returns the context
/// `[t, heads·d]`, scores scaled by `1/√d` as burn's `attention` does.
pub fn host_attention(q: &mut [f32], k: &mut [f32], v: &[f32], cos: &[f32], sin: &[f32], cache: &mut HostKv, [h, kvh, d]: [usize; 3]) -> Vec<f32> {
    let t = q.len() / (h * d);
    rotate_rows(q, cos, sin, h, d);
    rotate_rows(k, cos, sin, kvh, d);
    let start = cache.len();
    cache.append(k, v, kvh * d);
    let (w, groups, scale) = (kvh * d, h / kvh, 1.0 / (d as f32).sqrt());
    let (kc, vc) = (&cache.k, &cache.v);
    // Head-major [h, t, d]; for one token that is already [t, h·d].
    let mut out = vec![0f32; h * t * d];
    let head = |hh: usize, o: &mut [f32]| {
        let g = hh / groups;
        let mut p = vec![0f32; start + t];
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            let qi = &q[i * h * d + hh * d..][..d];
            let n = start + i + 1;
            for (j, pj) in p[..n].iter_mut().enumerate() {
                *pj = dot(qi, &kc[j * w + g * d..][..d]) * scale;
            }
            let m = super::fused::max_of(&p[..n]);
            let mut sum = 0f32;
            for pj in &mut p[..n] {
                *pj = super::fused::exp_approx(*pj - m);
                sum += *pj;
            }
            for (j, &pj) in p[..n].iter().enumerate() {
                for (a, &b) in oi.iter_mut().zip(&vc[j * w + g * d..][..d]) {
                    *a += pj * b;
                }
            }
            let inv = 1.0 / sum;
            oi.iter_mut().for_each(|a| *a *= inv);
        }
    };
    // Spread heads over threads only when there is real work (a prompt), not for one token.
    if t * (start + t) * d >= 1 << 16 {
        out.par_chunks_mut(t * d).enumerate().for_each(|(hh, o)| head(hh, o));
    } else {
        out.chunks_mut(t * d).enumerate().for_each(|(hh, o)| head(hh, o));
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

/// `Σ aᵢ·bᵢ` in eight lanes (one f32 chain would not vectorise).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + rest
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::model::cache::LayerCache;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 1001) as f32 / 500.0 - 1.0) * 0.5).collect()
    }

    /// The fused host path with a cache (a 5-token prompt, one token, then three) gives what
    /// the composed path gives on the whole sequence without a cache, position by position;
    /// and a cache filled by composed calls carries on in the fused path and back.
    #[test]
    fn host_attention_matches_composed() {
        let device = crate::device::parse("cpu").unwrap();
        let (hidden, h, kvh) = (32, 4, 2);
        let cfg = LlamaConfig::synthetic(hidden, 1, h, kvh, 64, 16);
        let d = cfg.head_dim;
        let lin = |o: usize, seed: usize| Linear::new(Tensor::from_data(TensorData::new(values(o * hidden, seed), [o, hidden]), &device));
        let attn = Attention { q_proj: lin(h * d, 1), k_proj: lin(kvh * d, 2), v_proj: lin(kvh * d, 3), o_proj: lin(hidden, 4), num_heads: h, num_kv_heads: kvh, head_dim: d };
        let total = 9;
        let x: Tensor<3> = Tensor::from_data(TensorData::new(values(total * hidden, 5), [1, total, hidden]), &device);
        let rope_all = RopeTables::new(&cfg, 0, total, &device, burn::tensor::DType::F32);
        let want = attn.forward(x.clone(), &rope_all, None).into_data().try_into_vec::<f32>().unwrap();
        let run = |pieces: &[(usize, usize)], composed_first: bool| {
            let mut cache = LayerCache::default();
            let mut got = Vec::new();
            for (n, &(s, len)) in pieces.iter().enumerate() {
                let rope = RopeTables::new(&cfg, s, len, &device, burn::tensor::DType::F32);
                let xs = x.clone().narrow(1, s, len);
                if composed_first && n == 0 {
                    // What a composed call (another dtype, say) leaves in the cache.
                    let heads = |y: Tensor<3>, k: usize| y.reshape([1, len, k, d]).swap_dims(1, 2);
                    let _ = cache.append(rope.apply(heads(attn.k_proj.forward(xs.clone()), kvh)), heads(attn.v_proj.forward(xs.clone()), kvh));
                    got.extend(attn.forward(xs, &rope, None).into_data().try_into_vec::<f32>().unwrap());
                } else {
                    got.extend(attn.forward(xs, &rope, Some(&mut cache)).into_data().try_into_vec::<f32>().unwrap());
                }
            }
            got
        };
        for (pieces, composed_first) in [(&[(0, 5), (5, 1), (6, 3)][..], false), (&[(0, 4), (4, 1), (5, 1), (6, 3)][..], true)] {
            let got = run(pieces, composed_first);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{pieces:?} [{i}]: {a} vs {b}");
            }
        }
        // Host rows read back as tensors by a composed append: cache length carries over.
        let mut cache = LayerCache::default();
        let rope = RopeTables::new(&cfg, 0, 3, &device, burn::tensor::DType::F32);
        let _ = attn.forward(x.clone().narrow(1, 0, 3), &rope, Some(&mut cache));
        let k1: Tensor<4> = Tensor::zeros([1, kvh, 1, d], &device);
        let (k, _) = cache.append(k1.clone(), k1);
        assert_eq!(k.dims(), [1, kvh, 4, d]);
    }

    #[test]
    fn host_rotation_equals_tensor_rotation() {
        let device = crate::device::parse("cpu").unwrap();
        let cfg = LlamaConfig::synthetic(32, 1, 4, 2, 64, 16);
        let rope = RopeTables::new(&cfg, 7, 3, &device, burn::tensor::DType::F32);
        let x = values(3 * 4 * 8, 9);
        let t: Tensor<4> = Tensor::from_data(TensorData::new(x.clone(), [1, 3, 4, 8]), &device);
        let want = rope.apply(t.swap_dims(1, 2)).swap_dims(1, 2).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        let mut got = x;
        rotate_rows(&mut got, &rope.cos_host, &rope.sin_host, 4, 8);
        assert_eq!(got, want, "same products, same sum: bit-identical");
    }
}

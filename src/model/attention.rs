//! Grouped-query self-attention with RoPE. The score/softmax/value product goes through
//! burn's `attention` op, which libtorch maps to its fused SDPA kernel and other backends to a
//! NaN-safe reference implementation.
//!
//! Inference on flex in f32 with a KV cache (generation, chat, serving) takes a fused host
//! path instead: RoPE, the cache append and the attention of batch 1 run in one pass over host
//! buffers ([`crate::kernels::attention::cached_attention`]). Decoding one token otherwise
//! costs some thirty small burn ops per layer (narrow/cat/neg for RoPE, a concatenation of the
//! whole cache, the expansion of the shared K/V heads, softmax), whose dispatch and allocations
//! took a large share of a ~10 ms token.
//!
//! Training and other calls without a cache on flex in f32 take
//! [`crate::kernels::attention::causal_attention`]: RoPE, the causal softmax and the value
//! product in one op with a hand-written backward. Everything else (libtorch, f16/bf16, caches
//! of batch > 1) runs [`Attention::composed_context`], the reference both fused paths are
//! tested against (the kernels' tests are here, beside it).

use super::cache::{HostKv, LayerCache};
use super::linear::Linear;
use super::rope::RopeTables;
use crate::kernels::attention::{attention_composed, cached_attention, causal_attention, rotate_rows};
use crate::kernels::{flex_f32, from_plain, new_tensor, values, FlexF32};
use burn::module::Module;
use burn::tensor::Tensor;

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

/// Where the rows of an attention input sit.
pub enum Positions<'a> {
    /// Every sequence of the batch at `rope`'s positions, with an optional cache (training,
    /// scoring, `generate`).
    One(&'a RopeTables, Option<&'a mut LayerCache>),
    /// Several sequences one after another along `T` of a batch of one (batched decoding):
    /// `(rows, positions, cache)` each, every sequence with its own positions and cache.
    Ragged(Vec<(usize, &'a RopeTables, &'a mut LayerCache)>),
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>, rope: &RopeTables, cache: Option<&mut LayerCache>) -> Tensor<3> {
        self.forward_at(x, Positions::One(rope, cache))
    }

    /// [`Self::forward`] with the rows placed by `pos`. For [`Positions::Ragged`] the four
    /// projections run once over every sequence's rows (one product per weight for all of
    /// them); each sequence's attention is then exactly the one it would get alone (the same
    /// context computation over its own rows, positions and cache).
    pub fn forward_at(&self, x: Tensor<3>, pos: Positions<'_>) -> Tensor<3> {
        // One pass over the input for the three projections that read it (see
        // `Linear::forward_shared`).
        let [q, k, v] = Linear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let ctx = match pos {
            Positions::One(rope, cache) => self.context(q, k, v, rope, cache),
            Positions::Ragged(mut segs) if segs.len() == 1 => {
                let (_, rope, cache) = segs.pop().expect("one segment");
                self.context(q, k, v, rope, Some(cache))
            }
            Positions::Ragged(mut segs) => match self.fused_ragged(&q, &k, &v, &mut segs) {
                Some(ctx) => ctx,
                None => {
                    let mut off = 0;
                    let mut parts = Vec::with_capacity(segs.len());
                    for (len, rope, cache) in segs {
                        let rows = |t: &Tensor<3>| t.clone().narrow(1, off, len);
                        parts.push(self.context(rows(&q), rows(&k), rows(&v), rope, Some(cache)));
                        off += len;
                    }
                    Tensor::cat(parts, 1)
                }
            },
        };
        self.o_proj.forward(ctx)
    }

    /// The attention context of the projections `q`, `k`, `v` of one batch at `rope`'s
    /// positions: the fused host path where it applies, else the composition.
    fn context(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, rope: &RopeTables, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let b = q.dims()[0];
        let sizes = [self.num_heads, self.num_kv_heads, self.head_dim];
        match cache {
            Some(c) if b == 1 => match self.fused(&q, &k, &v, rope, &mut *c) {
                Some(ctx) => ctx,
                None => Self::composed_context(q, k, v, rope, Some(c), sizes),
            },
            Some(c) => Self::composed_context(q, k, v, rope, Some(c), sizes),
            // Without a cache (training, batched scoring) the positions start at 0: one fused
            // op on f32 flex (see `kernels::attention`), the composition elsewhere.
            None => match if rope.start == 0 { causal_attention(&q, &k, &v, &rope.cos_host, &rope.sin_host, sizes) } else { None } {
                Some(ctx) => ctx,
                None => Self::composed_context(q, k, v, rope, None, sizes),
            },
        }
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
        attention_composed(q, k, v, rope.start)
    }

    /// The fused host path for several sequences along `T` of a batch of one (batched
    /// decoding): each sequence's context is exactly [`Self::fused`]'s for its rows alone (the
    /// same rotation, cache append and [`cached_attention`]), and the sequences run side by side
    /// on the quantized products' spinning team, whose helper would otherwise spin while one
    /// thread walked every sequence's cache. `None` where [`Self::fused`] would not apply.
    fn fused_ragged(&self, q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, segs: &mut [(usize, &RopeTables, &mut LayerCache)]) -> Option<Tensor<3>> {
        let (FlexF32::Plain(qp), FlexF32::Plain(kp), FlexF32::Plain(vp)) = (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?) else {
            return None;
        };
        for (_, _, cache) in segs.iter_mut() {
            cache.host()?;
        }
        let t = q.dims()[1];
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (qv, kv, vv) = (values(&qp), values(&kp), values(&vp));
        let mut out = vec![0f32; t * h * d];
        let mut tasks = Vec::with_capacity(segs.len());
        let mut rest: &mut [f32] = &mut out;
        let mut off = 0;
        for (len, rope, cache) in segs.iter_mut() {
            let (o, r) = std::mem::take(&mut rest).split_at_mut(*len * h * d);
            rest = r;
            tasks.push((off, *len, &rope.cos_host, &rope.sin_host, &mut **cache, o));
            off += *len;
        }
        let (qv, kv, vv) = (&*qv, &*kv, &*vv);
        crate::ggml::team::for_each(rayon::current_num_threads(), tasks, |(off, len, cos, sin, cache, o)| {
            let hc = cache.host().expect("checked above");
            let (q, k, v) = (&qv[off * h * d..(off + len) * h * d], &kv[off * kvh * d..(off + len) * kvh * d], &vv[off * kvh * d..(off + len) * kvh * d]);
            o.copy_from_slice(&self.host_context(q, k, v, cos, sin, hc));
        });
        Some(from_plain(new_tensor(out, vec![1, t, h * d])))
    }

    /// One sequence's context `[t, heads·head_dim]` on the host, for both fused paths: RoPE on
    /// the new rows `q` `[t, heads·d]` and `k` `[t, kv_heads·d]`, their keys and `v` appended to
    /// the cache, then batch 1 over the whole cache.
    fn host_context(&self, q: &[f32], k: &[f32], v: &[f32], cos: &[f32], sin: &[f32], hc: &mut HostKv) -> Vec<f32> {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut qh = q.to_vec();
        let mut kh = k.to_vec();
        rotate_rows(&mut qh, cos, sin, h, d);
        rotate_rows(&mut kh, cos, sin, kvh, d);
        let start = hc.len();
        hc.append(&kh, v, kvh, d);
        cached_attention(&qh, hc.as_ref(), start, [h, kvh, d])
    }

    /// The fused host path for batch 1: the context `[1, T, heads·head_dim]`, or `None` when
    /// the projections are not plain f32 flex tensors (autodiff, another backend or dtype).
    fn fused(&self, q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, rope: &RopeTables, cache: &mut LayerCache) -> Option<Tensor<3>> {
        let (FlexF32::Plain(qp), FlexF32::Plain(kp), FlexF32::Plain(vp)) = (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?) else {
            return None;
        };
        let hc = cache.host()?;
        let t = q.dims()[1];
        let ctx = self.host_context(&values(&qp), &values(&kp), &values(&vp), &rope.cos_host, &rope.sin_host, hc);
        let (h, d) = (self.num_heads, self.head_dim);
        Some(from_plain(new_tensor(ctx, vec![1, t, h * d])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::model::cache::LayerCache;
    use burn::tensor::TensorData;

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
        // 9 positions in small pieces (the second split starts from a composed call); and a
        // 96-token prompt, which spreads (head, query block) tasks over threads: the serial and
        // the parallel path of `cached_attention`.
        type Splits<'a> = &'a [&'a [(usize, usize)]];
        let cases: [(usize, Splits); 2] = [(9, &[&[(0, 5), (5, 1), (6, 3)], &[(0, 4), (4, 1), (5, 1), (6, 3)]]), (100, &[&[(0, 96), (96, 1), (97, 3)]])];
        for (total, splits) in cases {
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
            for (n, pieces) in splits.iter().enumerate() {
                let got = run(pieces, n == 1);
                assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{pieces:?} [{i}]: {a} vs {b}");
                }
            }
        }
        let x: Tensor<3> = Tensor::from_data(TensorData::new(values(9 * hidden, 5), [1, 9, hidden]), &device);
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

/// The attention kernels ([`crate::kernels::attention`]) against the composed path here.
#[cfg(test)]
mod kernel_tests {
    use super::Attention;
    use crate::config::LlamaConfig;
    use crate::kernels::attention::{causal_attention, rotate_into, unrotate};
    use crate::kernels::testing::{assert_close, normal};
    use crate::model::rope::RopeTables;
    use burn::tensor::{Device, Tensor};

    fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }

    /// Output and the gradients of q, k and v equal the composed path (RoPE ops, repeated K/V
    /// heads, burn's causal attention), for several row-block splits and GQA group sizes.
    #[test]
    fn matches_composed_forward_and_gradients() {
        for &(b, t, h, kvh, d) in &[(2, 5, 4, 2, 8), (1, 70, 3, 1, 16), (2, 130, 6, 3, 8), (1, 64, 2, 2, 4)] {
            let dev = Device::flex().autodiff();
            let cfg = LlamaConfig::synthetic(h * d, 1, h, kvh, 64, 256);
            let rope = RopeTables::new(&cfg, 0, t, &dev, burn::tensor::DType::F32);
            let q0: Tensor<3> = normal([b, t, h * d], 0.0, 1.5, 1, &dev);
            let k0: Tensor<3> = normal([b, t, kvh * d], 0.0, 1.5, 2, &dev);
            let v0: Tensor<3> = normal([b, t, kvh * d], 0.0, 1.0, 3, &dev);
            let up: Tensor<3> = normal([b, t, h * d], 0.0, 1.0, 4, &dev);
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
        let q: Tensor<3> = normal([1, 6, 16], 0.0, 1.0, 5, &dev).require_grad();
        let k: Tensor<3> = normal([1, 6, 8], 0.0, 1.0, 6, &dev);
        let v: Tensor<3> = normal([1, 6, 8], 0.0, 1.0, 7, &dev).require_grad();
        let g = causal_attention(&q, &k, &v, &rope.cos_host, &rope.sin_host, [2, 1, 8]).unwrap().sum().backward();
        assert!(q.grad(&g).is_some() && v.grad(&g).is_some());
        assert!(k.grad(&g).is_none());
    }

    /// The AVX2 version of the cached path gives its scalar reference's bits (see
    /// `kernels::has_wide`), for one token (key counts off the four-block and one-block steps,
    /// a partly filled last block) and for prompts, one of which takes the parallel path; and
    /// over a head size with a chunk count off the four-chunk step and a group of four heads
    /// (three, then one).
    #[test]
    fn cached_attention_avx2_equals_scalar() {
        use crate::kernels::attention::{cached_attention, KvRef, KvStore};
        let vals = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1001) as f32 / 250.0 - 2.0).sin()).collect() };
        let cases = [(9, 3, 64, 0, 1), (9, 3, 64, 6, 1), (9, 3, 64, 12, 1), (9, 3, 64, 37, 1), (9, 3, 64, 80, 1), (9, 3, 64, 0, 70), (9, 3, 64, 5, 40), (8, 2, 40, 29, 1), (8, 2, 40, 3, 9)];
        for (h, kvh, d, start, t) in cases {
            let q = vals(t * h * d, 1);
            let (k, v) = (vals((start + t) * kvh * d, 2), vals((start + t) * kvh * d, 3));
            // Appended in two parts, as a prompt and then the new positions.
            let store = |k: &[f32], v: &[f32]| {
                let (mut s16, mut s32) = (KvStore::<half::f16>::new(), KvStore::<f32>::new());
                for (a, b) in [(0, start * kvh * d), (start * kvh * d, k.len())] {
                    s16.append(&k[a..b], &v[a..b], kvh, d);
                    s32.append(&k[a..b], &v[a..b], kvh, d);
                }
                (s32, s16)
            };
            let (s32, s16) = store(&k, &v);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (kv, ty) in [(KvRef::F32(&s32), "f32"), (KvRef::F16(&s16), "f16")] {
                let wide = cached_attention(&q, kv, start, [h, kvh, d]);
                let base = crate::kernels::baseline_on_this_thread(|| cached_attention(&q, kv, start, [h, kvh, d]));
                // The prompt's tasks may also run on the team's threads, in the wide build whatever
                // this thread asked: the two builds must agree there too.
                assert_eq!(bits(&wide), bits(&base), "{ty} cache: h {h}, d {d}, start {start}, t {t}");
            }
            // An f16 cache is the f32 computation on the rounded values: bit for bit, and close
            // to the f32 cache's result.
            let (kw, vw) = s16.rows();
            let half_cache = cached_attention(&q, KvRef::F16(&s16), start, [h, kvh, d]);
            assert_eq!(bits(&half_cache), bits(&cached_attention(&q, KvRef::F32(&store(&kw, &vw).0), start, [h, kvh, d])), "f16 = f32 of the rounded values");
            let full = cached_attention(&q, KvRef::F32(&s32), start, [h, kvh, d]);
            let err = full.iter().zip(&half_cache).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-2 && err > 0.0, "f16 cache error {err} (start {start}, t {t})");
        }
    }

    /// A cache's rows come back as appended, in any split into appends.
    #[test]
    fn kv_store_round_trips_rows() {
        use crate::kernels::attention::KvStore;
        let (kvh, d, n) = (3, 16, 21);
        let k: Vec<f32> = (0..n * kvh * d).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let mut s = KvStore::<f32>::new();
        for (a, b) in [(0, 5), (5, 6), (6, 17), (17, 21)] {
            s.append(&k[a * kvh * d..b * kvh * d], &v[a * kvh * d..b * kvh * d], kvh, d);
        }
        assert_eq!(s.len(), n);
        assert_eq!(s.rows(), (k, v));
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

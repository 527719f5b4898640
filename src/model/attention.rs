//! Grouped-query self-attention with RoPE. The score/softmax/value product goes through
//! burn's `attention` op, which libtorch maps to its fused SDPA kernel and other backends to a
//! NaN-safe reference implementation.

use super::cache::LayerCache;
use super::linear::Linear;
use super::rope::RopeTables;
use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};

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
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
        let q = rope.apply(heads(self.q_proj.forward(x.clone()), h));
        let k = rope.apply(heads(self.k_proj.forward(x.clone()), kvh));
        let v = heads(self.v_proj.forward(x), kvh);
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
        self.o_proj.forward(ctx.swap_dims(1, 2).reshape([b, t, h * d]))
    }
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

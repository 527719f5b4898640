//! The key/value cache for incremental decoding. Keys are stored after RoPE, so a cached
//! position is never rotated twice.

use burn::tensor::Tensor;

/// One layer's keys and values, `[B, kv_heads, T, head_dim]`.
#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Appends new keys/values and returns the full sequences.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| LayerCache::default()).collect(), len: 0, max_len }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The model's context length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn layer(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.kv = None;
        }
        self.len = 0;
    }
}

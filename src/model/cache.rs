//! The key/value cache for incremental decoding. Keys are stored after RoPE, so a cached
//! position is never rotated twice.
//!
//! A layer's cache is either burn tensors (the composed attention, any backend or dtype) or
//! host f32 rows (the fused host attention of f32 flex inference, see
//! [`super::attention`]). The host form is appended in place: one token adds one row of
//! `kv_heads·head_dim` values to a growing buffer, instead of concatenating the whole cache
//! into a new tensor every step.

use burn::tensor::{Device, Tensor, TensorData};

/// Host keys and values, token-major: row `j` holds position `j`'s `kv_heads·head_dim` values
/// (head after head).
#[derive(Default)]
pub struct HostKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// `kv_heads·head_dim`.
    pub width: usize,
}

impl HostKv {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.k.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `t` positions of keys and values, each `[t, width]` row-major.
    pub fn append(&mut self, k: &[f32], v: &[f32], width: usize) {
        assert!(self.width == 0 || self.width == width, "one layer's cache keeps one width");
        assert_eq!(k.len(), v.len());
        self.width = width;
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }
}

/// One layer's keys and values: `[B, kv_heads, T, head_dim]` tensors, or host rows.
#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
    host: Option<HostKv>,
}

impl LayerCache {
    /// Appends new keys/values and returns the full sequences.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let prev = match self.host.take() {
            Some(h) if !h.is_empty() => Some(host_to_tensors(&h, k.dims()[1], &k.device(), &k)),
            _ => self.kv.take(),
        };
        let (k, v) = match prev {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// The host form for batch size 1, converting tensors already cached (a composed call
    /// before this one) once; `None` when the cached tensors cannot be read as f32.
    pub fn host(&mut self) -> Option<&mut HostKv> {
        if let Some((k, v)) = self.kv.take() {
            let [b, kvh, t, d] = k.dims();
            if b != 1 {
                self.kv = Some((k, v));
                return None;
            }
            // [1, kvh, t, d] → [t, kvh·d].
            let rows = |x: Tensor<4>| x.swap_dims(1, 2).reshape([t, kvh * d]).into_data().convert::<f32>().try_into_vec::<f32>().ok();
            let (Some(hk), Some(hv)) = (rows(k.clone()), rows(v.clone())) else {
                self.kv = Some((k, v));
                return None;
            };
            self.host = Some(HostKv { k: hk, v: hv, width: kvh * d });
        }
        Some(self.host.get_or_insert_with(HostKv::default))
    }
}

/// Host rows back to `[1, kv_heads, T, head_dim]` tensors (in `like`'s dtype), for a composed
/// call after fused ones.
fn host_to_tensors(h: &HostKv, kvh: usize, device: &Device, like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let (t, d) = (h.len(), h.width / kvh);
    let mk = |v: &[f32]| {
        let x: Tensor<4> = Tensor::from_data(TensorData::new(v.to_vec(), [1, t, kvh, d]), device);
        let x = x.swap_dims(1, 2);
        if like.dtype() != x.dtype() { x.cast(crate::kernels::float_dtype(like.dtype())) } else { x }
    };
    (mk(&h.k), mk(&h.v))
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
            l.host = None;
        }
        self.len = 0;
    }
}

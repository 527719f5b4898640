//! The key/value cache for incremental decoding. Keys are stored after RoPE, so a cached
//! position is never rotated twice.
//!
//! A layer's cache is either burn tensors (the composed attention, any backend or dtype) or
//! host buffers (the fused host attention of f32 flex inference, see [`super::attention`]).
//! The host form is appended in place, one position at a time into per-head blocks
//! ([`KvStore`]), instead of concatenating the whole cache into a new tensor every step.

use crate::kernels::attention::{KvRef, KvStore};
use burn::tensor::{Device, Tensor, TensorData};

/// How the host cache stores keys and values. f32 keeps inference exact against the
/// reference model; f16 halves the bytes attention reads per cached position, which is what a
/// decode step of several sequences waits on once their caches outgrow the CPU caches (the
/// weights evict them between two visits of a layer). llama.cpp keeps its cache in f16 by
/// default. A value is rounded to f16 once, when it is appended; attention reads it back
/// exactly and computes in f32 as before. Only the host cache (f32 activations on the CPU, the
/// quantized and f32 models' inference path) has a storage type: the tensor cache of the
/// composed path (`--dtype f16`/`bf16`, a GPU) already keeps the activations' dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl std::str::FromStr for KvType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            _ => anyhow::bail!("unknown KV cache type {s:?}: use f32 (exact) or f16 (half the memory traffic)"),
        }
    }
}

/// A layer's host keys and values in their storage type ([`KvStore`] keeps the layout cached
/// attention reads).
pub enum HostKv {
    F32(KvStore<f32>),
    F16(KvStore<half::f16>),
}

impl HostKv {
    pub fn new(ty: KvType) -> Self {
        match ty {
            KvType::F32 => HostKv::F32(KvStore::new()),
            KvType::F16 => HostKv::F16(KvStore::new()),
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        match self {
            HostKv::F32(s) => s.len(),
            HostKv::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `t` positions of keys and values, each `[t, kv_heads·head_dim]` row-major
    /// (rounded to f16 in an f16 cache).
    pub fn append(&mut self, k: &[f32], v: &[f32], kvh: usize, d: usize) {
        match self {
            HostKv::F32(s) => s.append(k, v, kvh, d),
            HostKv::F16(s) => s.append(k, v, kvh, d),
        }
    }

    /// Keys and values as f32 rows `[len, kv_heads·head_dim]` (copies).
    pub fn rows(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            HostKv::F32(s) => s.rows(),
            HostKv::F16(s) => s.rows(),
        }
    }

    /// The cache for [`crate::kernels::attention::cached_attention`].
    pub fn as_ref(&self) -> KvRef<'_> {
        match self {
            HostKv::F32(s) => KvRef::F32(s),
            HostKv::F16(s) => KvRef::F16(s),
        }
    }
}

/// One layer's keys and values: `[B, kv_heads, T, head_dim]` tensors, or host rows.
#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
    host: Option<HostKv>,
    /// The host form's storage. The tensor form keeps the activations' dtype.
    ty: KvType,
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
            let mut h = HostKv::new(self.ty);
            h.append(&hk, &hv, kvh, d);
            self.host = Some(h);
        }
        let ty = self.ty;
        Some(self.host.get_or_insert_with(|| HostKv::new(ty)))
    }
}

/// Host rows back to `[1, kv_heads, T, head_dim]` tensors (in `like`'s dtype), for a composed
/// call after fused ones.
fn host_to_tensors(h: &HostKv, kvh: usize, device: &Device, like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let t = h.len();
    let (k, v) = h.rows();
    let d = k.len() / (t * kvh);
    let mk = |v: Vec<f32>| {
        let x: Tensor<4> = Tensor::from_data(TensorData::new(v, [1, t, kvh, d]), device);
        let x = x.swap_dims(1, 2);
        if like.dtype() != x.dtype() { x.cast(crate::kernels::float_dtype(like.dtype())) } else { x }
    };
    (mk(k), mk(v))
}

pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self::of(KvType::F32, num_layers, max_len)
    }

    /// An empty cache whose host form stores `ty`.
    pub fn of(ty: KvType, num_layers: usize, max_len: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| LayerCache { ty, ..Default::default() }).collect(), len: 0, max_len }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An f16 cache holds each appended value rounded to nearest even, once; an f32 cache holds
    /// it as given; both count positions alike, and `--kv-cache` parses both names only.
    #[test]
    fn host_cache_storage_round_trips() {
        let k: Vec<f32> = (0..2 * 24).map(|i| (i as f32 * 0.37).sin() * 3.0 + 1e-5).collect();
        let v: Vec<f32> = k.iter().map(|x| -x * 0.5).collect();
        for ty in [KvType::F32, KvType::F16] {
            let mut h = HostKv::new(ty);
            h.append(&k[..24], &v[..24], 2, 12);
            h.append(&k[24..], &v[24..], 2, 12);
            assert_eq!(h.len(), 2);
            let want: Vec<f32> = match ty {
                KvType::F32 => k.clone(),
                KvType::F16 => k.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            };
            let wantv: Vec<f32> = want.iter().map(|x| -x * 0.5).collect();
            assert_eq!(h.rows(), (want, wantv), "{ty:?}");
            assert!(matches!((ty, h.as_ref()), (KvType::F32, KvRef::F32(_)) | (KvType::F16, KvRef::F16(_))));
        }
        assert_eq!("f16".parse::<KvType>().unwrap(), KvType::F16);
        assert_eq!("f32".parse::<KvType>().unwrap(), KvType::F32);
        assert!("bf16".parse::<KvType>().is_err());
    }
}

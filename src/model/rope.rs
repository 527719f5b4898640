//! Rotary position embeddings in HF's "rotate half" layout, with linear and LLaMA-3 frequency
//! scaling. Tables are built per call for the positions in use, so memory does not grow with
//! the configured context length.

use crate::config::{llama3_band, rope_base_freq, Llama3Band, LlamaConfig, RopeScaling};
use burn::tensor::{DType, Device, Tensor, TensorData};

/// Inverse frequencies, computed in f32 exactly as transformers does so that logits match
/// the reference to f32 rounding.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2).map(|i| rope_base_freq::<f32>(i, head_dim, theta)).collect();
    match *scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, lo, hi, orig) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
            base.iter()
                .map(|&f| match llama3_band(f, lo, hi, orig) {
                    Llama3Band::Low => f / factor,
                    Llama3Band::High => f,
                    Llama3Band::Mid { smooth } => (1.0 - smooth) * f / factor + smooth * f,
                })
                .collect()
        }
    }
}

/// cos/sin tables `[1, 1, T, head_dim]` for positions `start..start+T`, as tensors for the
/// composed attention and as host rows `[T, head_dim]` for the fused kernels (which rotate with
/// [`crate::kernels::attention::rotate_rows`], bit for bit [`RopeTables::apply`]).
pub struct RopeTables {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    pub cos_host: Vec<f32>,
    pub sin_host: Vec<f32>,
    pub start: usize,
}

impl RopeTables {
    pub fn new(cfg: &LlamaConfig, start: usize, len: usize, device: &Device, dtype: DType) -> Self {
        let (cos_host, sin_host) = tables(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, start, len);
        let mk = |v: &[f32]| {
            let t: Tensor<4> = Tensor::from_data(TensorData::new(v.to_vec(), [1, 1, len, cfg.head_dim]), device);
            if dtype != DType::F32 { t.cast(crate::kernels::float_dtype(dtype)) } else { t }
        };
        RopeTables { cos: mk(&cos_host), sin: mk(&sin_host), cos_host, sin_host, start }
    }

    /// Applies the rotation to `x` `[B, H, T, head_dim]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Host-side cos/sin, `[len, head_dim]` row-major, with the half-frequencies repeated as in
/// `torch.cat((freqs, freqs), dim=-1)`.
pub fn tables(head_dim: usize, theta: f64, scaling: &RopeScaling, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(head_dim, theta, scaling);
    let half = head_dim / 2;
    let mut cos = vec![0f32; len * head_dim];
    let mut sin = vec![0f32; len * head_dim];
    for p in 0..len {
        let pos = (start + p) as f32;
        for (i, f) in inv.iter().enumerate() {
            let a = pos * f;
            let (s, c) = a.sin_cos();
            cos[p * head_dim + i] = c;
            cos[p * head_dim + half + i] = c;
            sin[p * head_dim + i] = s;
            sin[p * head_dim + half + i] = s;
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies() {
        let f = inv_freq(4, 10000.0, &RopeScaling::None);
        assert_eq!(f, vec![1.0, 0.01]);
    }

    #[test]
    fn linear_divides() {
        let f = inv_freq(4, 10000.0, &RopeScaling::Linear { factor: 4.0 });
        assert_eq!(f, vec![0.25, 0.0025]);
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        let base = inv_freq(128, 500000.0, &RopeScaling::None);
        let scaled = inv_freq(128, 500000.0, &s);
        // Wavelength 2π < 2048: high frequency, untouched.
        assert_eq!(scaled[0], base[0]);
        // The lowest frequency has a wavelength far above 8192: divided by the factor.
        assert!((scaled[63] - base[63] / 8.0).abs() < 1e-12);
        // In between, the smooth interpolation lies between the two.
        for (b, s) in base.iter().zip(&scaled) {
            assert!(*s <= *b && *s >= b / 8.0 - 1e-12);
        }
    }

    #[test]
    fn tables_at_position_zero() {
        let (c, s) = tables(4, 10000.0, &RopeScaling::None, 0, 2);
        assert_eq!(&c[..4], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(&s[..4], &[0.0, 0.0, 0.0, 0.0]);
        assert!((c[4] - 1f32.cos()).abs() < 1e-7 && (s[6] - 1f32.sin()).abs() < 1e-7);
    }
}

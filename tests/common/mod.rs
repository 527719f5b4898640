//! Shared helpers for the integration tests: the reference fixture and error measures.
#![allow(dead_code)]

use linly_lora::io::safetensors::SafetensorsFile;
use std::path::PathBuf;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub fn tiny() -> PathBuf {
    fixture("tiny_llama")
}

/// The reference values produced by HF transformers + PEFT.
pub struct Expected(SafetensorsFile);

impl Expected {
    pub fn load() -> Self {
        Expected(SafetensorsFile::open(&tiny().join("expected.safetensors")).unwrap())
    }
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let r = self.0.require(name).unwrap();
        (r.to_f32().unwrap(), r.shape.to_vec())
    }
    pub fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        let r = self.0.require(name).unwrap();
        let v = r.to_i64().unwrap();
        let t = r.shape[1];
        v.chunks(t).map(|c| c.iter().map(|&x| x as u32).collect()).collect()
    }
    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let r = self.0.require(name).unwrap();
        (r.to_i64().unwrap(), r.shape.to_vec())
    }
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn cpu() -> burn::tensor::Device {
    linly_lora::device::parse("cpu").unwrap()
}

/// Logits of `model` on each row of `ids`, flattened in [B, T, V] order.
pub fn logits_of(model: &linly_lora::model::Llama, ids: &[Vec<u32>]) -> Vec<f32> {
    let device = cpu();
    let mut out = Vec::new();
    for row in ids {
        let l = model.forward(linly_lora::infer::ids_tensor(row, &device), None);
        out.extend(linly_lora::io::weights::tensor_to_f32(l));
    }
    out
}

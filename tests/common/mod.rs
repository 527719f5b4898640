//! Shared helpers for the integration tests: the reference fixture and error measures.
#![allow(dead_code)]

use linly_lora::io::safetensors::SafetensorsFile;
use std::path::PathBuf;

pub mod hostile;

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

/// The device of the fixture-parity tests: the CPU unless `LINLY_TEST_DEVICE` names another
/// (`cuda:0` in a `--features tch` build), so the GPU path is held to the same HF+PEFT numbers
/// by the same tests instead of a second copy of them.
pub fn dev() -> burn::tensor::Device {
    let name = std::env::var("LINLY_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    linly_lora::device::parse(&name).unwrap_or_else(|e| panic!("LINLY_TEST_DEVICE={name}: {e:#}"))
}

/// Logits of `model` on each row of `ids`, flattened in [B, T, V] order.
pub fn logits_of(model: &linly_lora::model::Llama, ids: &[Vec<u32>]) -> Vec<f32> {
    use burn::module::Module;
    let device = model.devices().into_iter().next().expect("a model holds tensors");
    let mut out = Vec::new();
    for row in ids {
        let l = model.forward(linly_lora::infer::ids_tensor(row, &device), None);
        out.extend(linly_lora::io::weights::tensor_to_f32(l));
    }
    out
}

/// Writes a random-weight LLaMA folder with `vocab` rows and (optionally) a tokenizer copied
/// from `tokenizer_dir`, for CLI tests that need text in and out.
pub fn random_model(dir: &std::path::Path, vocab: usize, tokenizer_dir: Option<&std::path::Path>) {
    random_model_ctx(dir, vocab, tokenizer_dir, 128)
}

/// [`random_model`] with a chosen context length (`max_position_embeddings`).
pub fn random_model_ctx(dir: &std::path::Path, vocab: usize, tokenizer_dir: Option<&std::path::Path>, ctx: usize) {
    use linly_lora::io::safetensors::{encode_f32, write_all, FloatType};
    let (h, ffn, layers, heads, kv) = (32usize, 64usize, 2usize, 4usize, 2usize);
    let hd = h / heads;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": ctx,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut state: u64 = 0x9E3779B97F4A7C15;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    };
    let mut t = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, v: Vec<f32>| t.push((name, "F32".to_string(), shape, encode_f32(&v, FloatType::F32)));
    add("model.embed_tokens.weight".into(), vec![vocab, h], rnd(vocab * h, 0.5));
    add("lm_head.weight".into(), vec![vocab, h], rnd(vocab * h, 0.5));
    add("model.norm.weight".into(), vec![h], vec![1.0; h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, o, i) in [("self_attn.q_proj", heads * hd, h), ("self_attn.k_proj", kv * hd, h), ("self_attn.v_proj", kv * hd, h), ("self_attn.o_proj", h, heads * hd), ("mlp.gate_proj", ffn, h), ("mlp.up_proj", ffn, h), ("mlp.down_proj", h, ffn)] {
            add(format!("{p}.{n}.weight"), vec![o, i], rnd(o * i, 0.2));
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], vec![1.0; h]);
    }
    write_all(&dir.join("model.safetensors"), &t, None).unwrap();
    if let Some(td) = tokenizer_dir {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            if td.join(f).exists() {
                std::fs::copy(td.join(f), dir.join(f)).unwrap();
            }
        }
    }
}

/// Runs the built binary; returns (success, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_linly-lora"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Rewrites a safetensors file tensor by tensor: `edit(name, shape, values)` returns the tensor
/// to write (name, storage type, shape, values) or `None` to drop it.
pub fn rewrite_safetensors(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(String, linly_lora::io::safetensors::FloatType, Vec<usize>, Vec<f32>)>,
) {
    use linly_lora::io::safetensors::{encode_f32, write_all, SafetensorsFile};
    let f = SafetensorsFile::open(src).unwrap();
    let tensors: Vec<_> = f
        .names()
        .into_iter()
        .filter_map(|n| {
            let r = f.require(&n).unwrap();
            edit(&n, r.shape.to_vec(), r.to_f32().unwrap()).map(|(name, ty, shape, v)| (name, ty.safetensors_name().to_string(), shape, encode_f32(&v, ty)))
        })
        .collect();
    write_all(dst, &tensors, None).unwrap();
}

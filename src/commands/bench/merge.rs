//! The merge benchmark: a synthetic f16 model of a named shape plus a rank-r adapter on all
//! seven projections, merged by a child `linly-lora merge` process. Reports merge time ÷ the
//! time to copy the same files, and the child's peak RSS against the largest tensor.

use crate::config::LlamaConfig;
use crate::io::safetensors::{encode_f32, FloatType, StreamWriter, TensorSpec};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Deterministic, fast pseudo-random values in (−scale, scale).
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

/// Every weight of an HF LLaMA checkpoint with its shape.
pub fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".to_string(), vec![h])];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![f, h]),
            ("mlp.up_proj", vec![f, h]),
            ("mlp.down_proj", vec![h, f]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            out.push((format!("{p}.{n}.weight"), s));
        }
    }
    out
}

/// Writes a random-weight HF folder, one tensor at a time.
pub fn write_random_model(cfg: &LlamaConfig, dir: &Path, dtype: FloatType, seed: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    cfg.to_hf().save(dir)?;
    let shapes = weight_shapes(cfg);
    let specs = shapes.iter().map(|(n, s)| TensorSpec { name: n.clone(), dtype: dtype.safetensors_name().into(), shape: s.clone() }).collect();
    let mut w = StreamWriter::create(&dir.join("model.safetensors"), specs, None)?;
    let mut rng = XorShift(seed | 1);
    let by_name: std::collections::HashMap<_, _> = shapes.into_iter().collect();
    let mut total = 0u64;
    for name in w.order() {
        let shape = &by_name[&name];
        let n: usize = shape.iter().product();
        let v = if shape.len() == 1 { vec![1.0; n] } else { rng.fill(n, 0.03) };
        let bytes = encode_f32(&v, dtype);
        total += bytes.len() as u64;
        w.write(&name, &bytes)?;
    }
    w.finish()?;
    Ok(total)
}

/// Writes a random rank-`r` PEFT adapter on all seven projections (B non-zero).
pub fn write_random_adapter(cfg: &LlamaConfig, dir: &Path, r: usize, alpha: f64, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let targets: Vec<String> = crate::lora::config::TARGETS.iter().map(|s| s.to_string()).collect();
    let acfg = crate::lora::config::AdapterConfig::new(r, alpha, 0.0, false, &targets);
    crate::io::atomic::write(&dir.join("adapter_config.json"), acfg.to_json()?.as_bytes())?;
    let mut rng = XorShift(seed | 1);
    let mut t = Vec::new();
    for (name, shape) in weight_shapes(cfg) {
        if shape.len() != 2 || !name.starts_with("model.layers.") {
            continue;
        }
        let m = name.strip_suffix(".weight").unwrap();
        let (out, inp) = (shape[0], shape[1]);
        t.push((format!("base_model.model.{m}.lora_A.weight"), "F32".to_string(), vec![r, inp], encode_f32(&rng.fill(r * inp, 0.02), FloatType::F32)));
        t.push((format!("base_model.model.{m}.lora_B.weight"), "F32".to_string(), vec![out, r], encode_f32(&rng.fill(out * r, 0.02), FloatType::F32)));
    }
    crate::io::safetensors::write_all(&dir.join("adapter_model.safetensors"), &t, None)
}

#[derive(Debug, Serialize)]
pub struct MergeBench {
    pub shape: String,
    pub rank: usize,
    pub model_gb: f64,
    pub copy_s: f64,
    pub merge_s: f64,
    /// merge time ÷ copy time (goal ≤ 1.2)
    pub ratio: f64,
    pub merge_peak_rss_mb: f64,
    pub largest_tensor_mb: f64,
}

/// The peer: copy every file and fsync it, as the merge does before its rename — a merge
/// that returns before its bytes are durable would not be crash-safe.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        std::fs::copy(e.path(), &dst)?;
        std::fs::File::open(&dst)?.sync_all()?;
    }
    Ok(())
}

fn children_max_rss_kb() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and has no other effects.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru.ru_maxrss as f64
    }
}

/// Runs the benchmark in `workdir` (created, and removed afterwards unless `keep`, also when
/// the benchmark fails).
pub fn merge(shape: &str, rank: usize, workdir: &Path, keep: bool) -> Result<MergeBench> {
    let cfg = super::shape(shape, None)?;
    if workdir.exists() {
        bail!("{} exists; pass a fresh --workdir", workdir.display());
    }
    let result = run(&cfg, shape, rank, workdir);
    if !keep {
        let _ = std::fs::remove_dir_all(workdir);
    }
    result
}

fn run(cfg: &crate::config::LlamaConfig, shape: &str, rank: usize, workdir: &Path) -> Result<MergeBench> {
    let base = workdir.join("base");
    eprintln!("writing a random {shape} f16 model to {} ...", base.display());
    let bytes = write_random_model(cfg, &base, FloatType::F16, 7)?;
    write_random_adapter(cfg, &workdir.join("adapter"), rank, 2.0 * rank as f64, 11)?;
    let largest = weight_shapes(cfg).iter().map(|(_, s)| s.iter().product::<usize>() * 2).max().unwrap_or(0);
    let time_copy = |k: usize| -> Result<f64> {
        let t = Instant::now();
        copy_dir(&base, &workdir.join(format!("copy{k}")))?;
        let s = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(workdir.join(format!("copy{k}")))?;
        Ok(s)
    };
    let c1 = time_copy(1)?;
    eprintln!("copy: {c1:.2} s; merging ...");
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let status = std::process::Command::new(exe)
        .args(["merge", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(workdir.join("adapter"))
        .arg("--out")
        .arg(workdir.join("merged"))
        .status()
        .context("running linly-lora merge")?;
    let merge_s = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the merge being timed failed (its error is above)");
    }
    let rss = children_max_rss_kb() / 1024.0;
    std::fs::remove_dir_all(workdir.join("merged"))?;
    let c2 = time_copy(2)?;
    let copy_s = c1.min(c2);
    Ok(MergeBench {
        shape: shape.into(),
        rank,
        model_gb: bytes as f64 / 1e9,
        copy_s,
        merge_s,
        ratio: merge_s / copy_s,
        merge_peak_rss_mb: rss,
        largest_tensor_mb: largest as f64 / 1e6,
    })
}

//! `bench quant`: prompt and generation tokens/s of a model folder (quantized or not) at a given
//! thread count, measured the way `llama-bench` measures `pp` and `tg`: `pp N` processes an
//! N-token prompt in one batch from an empty cache, `tg N` generates N tokens one at a time
//! from an empty cache. Best of `reps` runs after a warm-up.

use crate::infer::generate::last_logits;
use crate::infer::ids_tensor;
use crate::io::safetensors::FloatType;
use crate::model::Llama;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct QuantBench {
    pub model: String,
    /// `linly_quantization.format` from config.json, or `dense`.
    pub format: String,
    pub kernels: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub pp_tokens_per_s: f64,
    pub gen_tokens: usize,
    pub tg_tokens_per_s: f64,
}

pub fn run(dir: &Path, prompt: usize, gen: usize, reps: usize, threads: usize) -> Result<QuantBench> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| measure(dir, prompt, gen, reps, threads))
}

fn measure(dir: &Path, prompt: usize, gen: usize, reps: usize, threads: usize) -> Result<QuantBench> {
    let device = crate::device::parse("cpu")?;
    let model = Llama::load(dir, &device, FloatType::F32)?;
    let cfg = crate::config::HfConfig::load(dir)?;
    let format = cfg.extra.get("linly_quantization").and_then(|q| q.get("format")).and_then(|f| f.as_str()).unwrap_or("dense").to_string();
    let v = model.vocab_size();
    let ids: Vec<u32> = (0..prompt).map(|i| (i * 7919 % v) as u32).collect();
    let _ = last_logits(model.forward_last(ids_tensor(&ids[..prompt.min(8)], &device), None));
    let (mut best_pp, mut best_tg) = (f64::MAX, f64::MAX);
    for _ in 0..reps.max(1) {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let _ = last_logits(model.forward_last(ids_tensor(&ids, &device), Some(&mut cache)));
        best_pp = best_pp.min(t0.elapsed().as_secs_f64());
        let mut cache = model.new_cache();
        let mut next = ids[0];
        let t1 = Instant::now();
        for _ in 0..gen {
            next = crate::infer::sample::argmax(&last_logits(model.forward_last(ids_tensor(&[next], &device), Some(&mut cache))));
        }
        best_tg = best_tg.min(t1.elapsed().as_secs_f64());
    }
    Ok(QuantBench {
        model: dir.display().to_string(),
        format,
        kernels: crate::quant::Kernels::best().name.to_string(),
        threads,
        prompt_tokens: prompt,
        pp_tokens_per_s: prompt as f64 / best_pp,
        gen_tokens: gen,
        tg_tokens_per_s: gen as f64 / best_tg,
    })
}

//! `bench`: benchmarks, mostly on randomly initialised models of named shapes (no weights
//! needed). Each prints its result as JSON (and the multi-row ones a Markdown table first), for
//! BENCHMARKS.md and scripts.

pub mod merge;
pub mod quant;
pub mod scaler;
pub mod serve;
pub mod train;

use super::{Json, Report};
use crate::config::LlamaConfig;
use crate::infer::generate::last_logits;
use crate::infer::ids_tensor;
use crate::io::safetensors::FloatType;
use crate::model::Llama;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// A named model shape.
pub fn shape(name: &str, vocab: Option<usize>) -> Result<LlamaConfig> {
    let mut c = match name {
        "tiny" => LlamaConfig::synthetic(64, 2, 4, 2, 176, 320),
        "smollm2-135m" | "135m" => {
            let mut c = LlamaConfig::synthetic(576, 30, 9, 3, 1536, 49152);
            c.tie_word_embeddings = true;
            c.rope_theta = 100000.0;
            c
        }
        "160m" => LlamaConfig::synthetic(768, 12, 12, 12, 2048, 55296),
        "1b" => LlamaConfig::synthetic(2048, 22, 32, 4, 5632, 55296),
        "7b" => LlamaConfig::synthetic(4096, 32, 32, 32, 11008, 55296),
        _ => bail!("unknown shape `{name}`: use tiny, smollm2-135m, 160m, 1b or 7b"),
    };
    if let Some(v) = vocab {
        c.vocab_size = v;
    }
    Ok(c)
}

#[derive(Debug, Serialize)]
pub struct ForwardBench {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
}

/// Prefill `prompt` tokens, then decode `decode` tokens one at a time with the KV cache.
pub fn forward(shape_name: &str, device_name: &str, dtype: FloatType, prompt: usize, decode: usize, reps: usize) -> Result<ForwardBench> {
    let cfg = shape(shape_name, None)?;
    let device = crate::device::parse(device_name)?;
    let model = Llama::random(&cfg, &device, dtype);
    let ids: Vec<u32> = (0..prompt).map(|i| (i * 7919 % cfg.vocab_size) as u32).collect();
    // Warm-up: first calls allocate and spin up the thread pool.
    let _ = last_logits(model.forward_last(ids_tensor(&ids[..prompt.min(8)], &device), None));
    let mut best_prefill = f64::MAX;
    let mut best_decode = f64::MAX;
    for _ in 0..reps.max(1) {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let mut next = crate::infer::sample::argmax(&last_logits(model.forward_last(ids_tensor(&ids, &device), Some(&mut cache))));
        best_prefill = best_prefill.min(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        for _ in 0..decode {
            next = crate::infer::sample::argmax(&last_logits(model.forward_last(ids_tensor(&[next], &device), Some(&mut cache))));
        }
        best_decode = best_decode.min(t1.elapsed().as_secs_f64());
    }
    Ok(ForwardBench {
        shape: shape_name.into(),
        device: device_name.into(),
        dtype: dtype.name().into(),
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        prompt_tokens: prompt,
        prefill_tokens_per_s: prompt as f64 / best_prefill,
        decode_tokens: decode,
        decode_tokens_per_s: decode as f64 / best_decode,
    })
}

/// The random-weight model a benchmark runs.
#[derive(Debug, Clone)]
pub struct RandomModel {
    /// A name [`shape`] knows.
    pub shape: String,
    pub device: String,
    pub dtype: FloatType,
}

#[derive(Debug, Clone)]
pub struct ForwardOptions {
    pub model: RandomModel,
    pub prompt: usize,
    pub decode: usize,
    pub reps: usize,
}

/// `bench forward`.
pub fn forward_command(o: &ForwardOptions) -> Result<Json<ForwardBench>> {
    let m = &o.model;
    Ok(Json(forward(&m.shape, &m.device, m.dtype, o.prompt, o.decode, o.reps)?))
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: RandomModel,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
    pub warmup: usize,
    pub steps: usize,
}

/// `bench train`.
pub fn train_command(o: &TrainOptions) -> Result<Json<train::TrainBench>> {
    let m = &o.model;
    Ok(Json(train::train(&m.shape, &m.device, m.dtype, o.rank, o.batch, o.seq, o.warmup, o.steps)?))
}

#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub model: std::path::PathBuf,
    pub prompt: usize,
    pub gen: usize,
    pub reps: usize,
    pub threads: usize,
}

/// `bench quant`.
pub fn quant_command(o: &QuantOptions) -> Result<Json<quant::QuantBench>> {
    Ok(Json(quant::run(&o.model, o.prompt, o.gen, o.reps, o.threads)?))
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub shape: String,
    pub rank: usize,
    /// Scratch folder (must not exist; removed afterwards unless `keep`).
    pub workdir: std::path::PathBuf,
    pub keep: bool,
}

/// `bench merge`.
pub fn merge_command(o: &MergeOptions) -> Result<Json<merge::MergeBench>> {
    Ok(Json(merge::merge(&o.shape, o.rank, &o.workdir, o.keep)?))
}

/// `bench scaler`.
pub fn scaler_command(o: &scaler::ScalerBenchOptions) -> Result<Table<scaler::ScalerRun>> {
    let rows = scaler::run(o)?;
    Ok(Table { markdown: scaler::markdown(&rows), rows })
}

/// `bench serve`.
pub fn serve_command(o: &serve::ServeBenchOptions) -> Result<Table<serve::ServeBenchRow>> {
    let rows = serve::run(o)?;
    Ok(Table { markdown: serve::markdown(&rows), rows })
}

/// Rows shown as a Markdown table for reading, then as one line of JSON for scripts.
#[derive(Debug)]
pub struct Table<R> {
    pub rows: Vec<R>,
    pub markdown: String,
}

impl<R: Serialize> std::fmt::Display for Table<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.markdown)?;
        f.write_str(&serde_json::to_string(&self.rows).map_err(|_| std::fmt::Error)?)
    }
}

impl<R: Serialize> Report for Table<R> {}

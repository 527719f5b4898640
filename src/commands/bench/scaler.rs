//! The fp16 loss-scaler experiment: the same LoRA + embedding/head run on real Chinese/English
//! text, with the new vocabulary rows initialised randomly, by the mean, or by the sub-token
//! mean, each under a GradScaler-style scaler (new rows in fp16 like everything else) and under
//! linly-lora's (group-aware, floored, new rows in f32). Reports the loss curve, skipped steps
//! and the scale trajectory per run.

use super::merge::write_random_model;
use crate::io::safetensors::FloatType;
use crate::train::run::{train, TrainOptions};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct ScalerRun {
    pub init: String,
    pub scaler: String,
    pub loss_first5: f64,
    pub loss_last5: f64,
    pub skipped: u64,
    pub min_scale: f64,
    pub final_scale: f64,
    pub overflow_steps: usize,
    pub nonfinite_loss_steps: usize,
    /// log2(scale) every 10 steps.
    pub scale_log2_trajectory: Vec<f64>,
}

pub struct ScalerBenchOptions {
    pub workdir: PathBuf,
    /// Default: the source tree's `tests/fixtures/llama2-tokenizer`.
    pub tokenizer: Option<PathBuf>,
    /// Default: the source tree's `tests/fixtures/zh/jieba_dict.txt`.
    pub wordlist: Option<PathBuf>,
    /// Folder with hsk_zh_en_sample.tsv, alpaca_sample.json, text_sample.txt. Default: the
    /// source tree's `tests/fixtures/data`.
    pub data: Option<PathBuf>,
    pub steps: usize,
    pub lr: f64,
    pub random_std: f32,
    /// Subset of `random`, `mean`, `subtoken-mean`.
    pub inits: Vec<String>,
}

const INITS: [&str; 3] = ["random", "mean", "subtoken-mean"];

fn p(x: &Path) -> String {
    x.display().to_string()
}

/// A file of the source tree's test fixtures, for flags whose default is one: resolved from the
/// crate's folder rather than the working directory, so the benchmark runs from anywhere.
fn fixture(flag: &str, given: &Option<PathBuf>, rel: &str) -> Result<PathBuf> {
    let p = given.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel));
    if !p.exists() {
        anyhow::bail!("{flag} {}: not found; pass {flag} (the default is the source tree's tests/fixtures/{rel})", p.display());
    }
    Ok(p)
}

pub fn run(o: &ScalerBenchOptions) -> Result<Vec<ScalerRun>> {
    let tokenizer = fixture("--tokenizer", &o.tokenizer, "llama2-tokenizer")?;
    let wordlist = fixture("--wordlist", &o.wordlist, "zh/jieba_dict.txt")?;
    let data = fixture("--data", &o.data, "data")?;
    if let Some(bad) = o.inits.iter().find(|i| !INITS.contains(&i.as_str())) {
        anyhow::bail!("--inits: unknown init `{bad}`; choose from {}", INITS.join(", "));
    }
    if o.workdir.exists() {
        anyhow::bail!("{} exists; pass a fresh --workdir", o.workdir.display());
    }
    std::fs::create_dir_all(&o.workdir)?;
    let data = std::fs::canonicalize(&data).with_context(|| format!("--data {}", data.display()))?;
    let mut cfg = crate::config::LlamaConfig::synthetic(128, 4, 4, 2, 352, 32000);
    cfg.max_position_embeddings = 1024;
    let base = std::fs::canonicalize(&o.workdir)?.join("base");
    write_random_model(&cfg, &base, FloatType::F16, 3)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if tokenizer.join(f).exists() {
            std::fs::copy(tokenizer.join(f), base.join(f))?;
        }
    }
    let tok = base.with_file_name("tok");
    crate::vocab::extend(
        &base,
        &crate::vocab::PieceSource::Select(crate::vocab::SelectConfig { wordlist: Some(wordlist.clone()), max_chars: 3000, max_words: 2000, ..Default::default() }),
        &tok,
        false,
    )?;
    let mut out = Vec::new();
    for init in o.inits.iter().map(String::as_str) {
        for scaler in ["naive", "linly"] {
            let dir = o.workdir.join(format!("{init}-{scaler}"));
            std::fs::create_dir_all(&dir)?;
            let recipe = format!(
                r#"
[model]
path = "{base}"
[vocab]
extension = "{ext}"
init = "{init}"
init_std = {std}
[lora]
r = 8
alpha = 16
[trainable]
embed_tokens = "all"
lm_head = "all"
[[data]]
kind = "parallel"
path = "{data}/hsk_zh_en_sample.tsv"
[[data]]
kind = "alpaca"
path = "{data}/alpaca_sample.json"
[[data]]
kind = "text"
path = "{data}/text_sample.txt"
[train]
seq_len = 128
batch_size = 8
grad_accum = 1
steps = {steps}
lr = {lr}
embed_lr = {lr}
warmup_ratio = 0.05
schedule = "cosine"
weight_decay = 0.0
max_grad_norm = 1.0
seed = 7
[precision]
dtype = "fp16"
scaler = "{scaler}"
growth_interval = 50
new_rows_f32 = {f32rows}
[output]
dir = "out"
save_every = 100000
plots = true
"#,
                base = p(&base),
                ext = p(&tok.join("vocab_extension.json")),
                data = p(&data),
                steps = o.steps,
                lr = o.lr,
                std = if init == "random" { o.random_std } else { 0.02 },
                f32rows = scaler == "linly",
            );
            let rp = dir.join("recipe.toml");
            std::fs::write(&rp, recipe)?;
            eprintln!("running {init} / {scaler} ...");
            train(&TrainOptions { recipe: rp, ..Default::default() }).with_context(|| format!("{init}/{scaler}"))?;
            let text = std::fs::read_to_string(dir.join("out/metrics.jsonl"))?;
            let ms: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v: &serde_json::Value| v.get("loss").is_some()).collect();
            let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap_or(f64::NAN);
            let mean = |s: &[serde_json::Value]| s.iter().map(loss).sum::<f64>() / s.len().max(1) as f64;
            let scales: Vec<f64> = ms.iter().map(|v| v["loss_scale"].as_f64().unwrap_or(0.0)).collect();
            out.push(ScalerRun {
                init: init.into(),
                scaler: scaler.into(),
                loss_first5: mean(&ms[..5.min(ms.len())]),
                loss_last5: mean(&ms[ms.len().saturating_sub(5)..]),
                skipped: ms.iter().filter(|v| v["skipped"].as_bool() == Some(true)).count() as u64,
                min_scale: scales.iter().cloned().fold(f64::MAX, f64::min),
                final_scale: *scales.last().unwrap_or(&0.0),
                overflow_steps: ms.iter().filter(|v| v["overflow"].as_array().is_some_and(|a| !a.is_empty())).count(),
                nonfinite_loss_steps: ms.iter().filter(|v| !loss(v).is_finite()).count(),
                scale_log2_trajectory: scales.iter().step_by(10).map(|s| s.max(1e-30).log2()).collect(),
            });
        }
    }
    Ok(out)
}

pub fn markdown(rows: &[ScalerRun]) -> String {
    let mut s = String::from("| init | scaler | loss (first 5) | loss (last 5) | skipped | overflow steps | lowest scale | final scale |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {} | {} | 2^{:.0} | 2^{:.0} |\n",
            r.init, r.scaler, r.loss_first5, r.loss_last5, r.skipped, r.overflow_steps, r.min_scale.max(1e-30).log2(), r.final_scale.max(1e-30).log2()
        ));
    }
    s
}

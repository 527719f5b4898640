//! `vocab resize --init fit`: the new rows trained end to end against the base model, the
//! layers frozen.
//!
//! The model starts from sub-token means and trains only its new rows (one row per piece on a
//! tied table, both tables' new rows on an untied one; no LoRA, so every layer and every old row
//! stays the base's) on the init texts, with the cross-tokenizer distillation term of training
//! (`[[data]] chain_distill`, [`super::chain_teacher`]) at a weight that makes it the main signal:
//! at every position the base's own probability of every piece, read from its chain of
//! sub-token probabilities on the old tokenization. Where `distill` fits the input rows to the
//! base's hidden states and then the head rows by a regression on frozen states, here both sides
//! move together through the frozen network towards the base's distribution, which is what the
//! evaluation measures. It is a short training run, so it reuses the training loop as it is. The
//! output folder keeps it as a recipe (`fit_recipe.toml`, starting from the base model, which
//! training resizes in-run with the same sub-token means), to read or to run with other settings.
//! Its work files stay inside the unfinished output folder, and go with it.

use super::run::{train, TrainOptions};
use crate::data::SourceKind;
use crate::vocab::{resize_model, FitReport, InitMethod, ResizeReport};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// The recipe's name in the output folder.
pub const FIT_RECIPE: &str = "fit_recipe.toml";

/// Weight of the distillation term against the next-piece label (weight 1): the base's
/// distribution is the target; the label keeps the loss defined where the teacher is flat. Set
/// once, not tuned (BENCHMARKS.md, "New rows fitted end to end").
pub const FIT_CHAIN_WEIGHT: f64 = 20.0;
/// Adam learning rate of the new rows, falling linearly to zero over the fit. Not tuned either:
/// twice the quickstart's rate for the same rows, as the fit has fewer steps to move them.
pub const FIT_LR: f64 = 4e-3;
/// Rows of 256 tokens when `--init-steps` is not given. On validation 150 / 400 / 800 rows were
/// better each time; 800 is what met the step-0 target held out (~30 min on 2 CPU cores).
pub const FIT_STEPS: usize = 800;

#[derive(Debug, Clone)]
pub struct FitOptions {
    /// The texts the rows are fitted on, with equal weights (training text of the new language,
    /// never evaluation text). `Tokenized` sources hold ids of the extended vocabulary.
    pub sources: Vec<(PathBuf, SourceKind)>,
    pub steps: usize,
    pub seq_len: usize,
    /// Adam learning rate of the new rows at its peak ([`FIT_LR`]).
    pub lr: f64,
    pub seed: u64,
    pub device: String,
}

impl FitOptions {
    pub fn texts(texts: &[PathBuf], steps: usize, seed: u64, device: &str) -> FitOptions {
        FitOptions { sources: texts.iter().map(|t| (t.clone(), SourceKind::Text)).collect(), steps, seq_len: 256, lr: FIT_LR, seed, device: device.into() }
    }
}

/// Resizes `model` for `extension` into `out` (which must not exist) with fitted new rows.
/// Work files go to a folder inside `out` that is removed whatever happens.
pub fn fit_model(model: &Path, extension: &Path, o: &FitOptions, out: &Path) -> Result<(ResizeReport, FitReport)> {
    ensure!(!o.sources.is_empty(), "--init fit trains the new rows on a text of the new language: pass --init-text FILE (once per file; never the text you evaluate on)");
    ensure!(o.steps > 0, "--init-steps must be at least 1");
    for (p, _) in &o.sources {
        ensure!(p.is_file(), "--init-text {}: no such file", p.display());
    }
    // The output is staged, with the work files inside it: a failed or killed fit leaves no
    // output folder, and its work files go with the staging folder.
    let staged = crate::io::atomic::StagedDir::new(out, false)?;
    let work = staged.path().join(".fit-work");
    let start = work.join("start");
    let resized = resize_model(model, extension, InitMethod::SubtokenMean, o.seed, None, &start)?;

    let extension = abs(extension)?;
    // Rows no longer than the model's context (a small model may have fewer than 256 positions).
    let ctx = crate::config::HfConfig::load(model)?.to_runtime()?.max_position_embeddings;
    let o = &FitOptions { seq_len: o.seq_len.min(ctx), ..o.clone() };
    let recipe_path = work.join(FIT_RECIPE);
    let recipe = fit_recipe(&abs(&start)?, &extension, o, &abs(&work.join("run"))?)?;
    std::fs::write(&recipe_path, &recipe).with_context(|| format!("cannot write {}", recipe_path.display()))?;
    let t0 = std::time::Instant::now();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let run = train(&TrainOptions { recipe: recipe_path.clone(), progress, ..Default::default() }).context("--init fit: training the new rows")?;
    let seconds = t0.elapsed().as_secs_f64();

    let merged_dir = work.join("merged");
    let merged = crate::lora::merge::merge(&crate::lora::merge::MergeOptions {
        base: start.clone(),
        adapters: vec![work.join("run").join("adapter")],
        out: merged_dir.clone(),
        dtype: None,
        tokenizer: None,
        shard_size: u64::MAX,
        allow_vocab_padding: false,
    })?;
    ensure!(merged.lora_pairs_merged == 0, "internal: the fit trained {} LoRA pairs; it trains the new rows only", merged.lora_pairs_merged);
    for e in std::fs::read_dir(&merged_dir).with_context(|| format!("cannot read {}", merged_dir.display()))? {
        let e = e?;
        std::fs::rename(e.path(), staged.path().join(e.file_name())).with_context(|| format!("cannot move {} into {}", e.path().display(), staged.path().display()))?;
    }
    // The copy kept with the model starts from the base itself (training resizes it in-run with
    // the same sub-token means) and writes beside the recipe, so `train` repeats the fit from it.
    let kept = fit_recipe(&abs(model)?, &extension, o, Path::new("fit-run"))?;
    std::fs::write(staged.path().join(FIT_RECIPE), kept).context("cannot write the fit's recipe into the output")?;
    let (kl_first, kl_last) = kl_ends(&work.join("run").join("metrics.jsonl"))?;
    std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    staged.commit()?;
    let report = ResizeReport { out: out.to_path_buf(), init: InitMethod::Fit.as_str().into(), ..resized };
    Ok((report, FitReport { steps: run.end_step, seconds, kl_first, kl_last, texts: o.sources.iter().map(|(p, _)| p.clone()).collect() }))
}

/// The fit as a recipe: the rows alone, the distillation term on every source. Paths are
/// written as given (the sources made absolute).
fn fit_recipe(model: &Path, extension: &Path, o: &FitOptions, run: &Path) -> Result<String> {
    let q = |p: &Path| -> Result<String> { Ok(toml::Value::String(p.to_string_lossy().into_owned()).to_string()) };
    let mut data = String::new();
    for (p, kind) in &o.sources {
        data.push_str(&format!("[[data]]\nkind = \"{}\"\npath = {}\nweight = 1.0\nchain_distill = {FIT_CHAIN_WEIGHT:?}\n\n", kind.as_str(), q(&abs(p)?)?));
    }
    Ok(format!(
        "# Written by `linly-lora vocab resize --init fit`: the new rows trained against the base\n\
         # (LoRA off, old rows and layers frozen). `linly-lora train` runs it again.\n\
         [model]\npath = {model}\ndevice = {device}\n\n[vocab]\nextension = {ext}\n\n[lora]\nenabled = false\n\n\
         [trainable]\nembed_tokens = \"new_rows\"\nlm_head = \"new_rows\"\n\n{data}\
         [train]\nseq_len = {seq}\nbatch_size = 1\nsteps = {steps}\nlr = {lr:?}\nembed_lr = {lr:?}\nwarmup_ratio = 0.03\n\
         schedule = \"linear\"\nweight_decay = 0.0\nmax_grad_norm = 1.0\nseed = {seed}\n\n\
         [output]\ndir = {run}\nsave_every = {never}\nkeep_last = 1\nplots = false\n",
        model = q(model)?,
        device = toml::Value::String(o.device.clone()),
        ext = q(extension)?,
        seq = o.seq_len,
        lr = o.lr,
        steps = o.steps,
        seed = o.seed,
        run = q(run)?,
        never = o.steps + 1,
    ))
}

/// Mean `chain_distill` ÷ its weight (the KL per position) over the first and last tenth.
fn kl_ends(metrics: &Path) -> Result<(Option<f64>, Option<f64>)> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let kl: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["chain_distill"].as_f64()).map(|v| v / FIT_CHAIN_WEIGHT).collect();
    let tenth = (kl.len() / 10).max(1);
    let mean = |s: &[f64]| (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64);
    Ok((mean(&kl[..tenth.min(kl.len())]), mean(&kl[kl.len().saturating_sub(tenth)..])))
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}

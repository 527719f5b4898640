//! `linly-lora train recipe.toml`: builds the model (base, vocabulary growth, LoRA), the data
//! mixer, and runs the stages, writing metrics, checkpoints and the final adapter.

use super::chain_teacher::{self_targets, ChainTeacher};
use super::teacher::BaseModel;
use super::checkpoint::{self, TrainState};
use super::optim::AdamW;
use super::row_map::RowMaps;
use super::recipe::{FrozenProducts, Recipe, Stage, TeacherWeights};
use super::scaler::Scaler;
use super::schedule::{lr_factor, replanned_ramp, steps_within};
use super::step::{train_step, MicroBatch, StepHparams};
use crate::data::{self, MixConfig, Mixer};
use crate::kernels::frozen::FrozenPacked;
use crate::lora::save::TableSave;
use crate::lora::{self, set_table_modes, TableMode};
use crate::model::Llama;
use crate::vocab::VocabExtension;
use anyhow::{bail, ensure, Context, Result};
use burn::module::Param;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub recipe: PathBuf,
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Stop after this many steps in this invocation (as if killed), for resume tests.
    pub stop_after: Option<usize>,
    /// Set it (from another thread) to end the run at the next step boundary with a checkpoint
    /// there, as Ctrl-C does for the `train` command ([`super::interrupt`]); the run then
    /// returns an error that says how to resume.
    pub stop: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub out_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    pub start_step: usize,
    pub end_step: usize,
    pub total_steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub skipped_steps: u64,
    pub packing_efficiency: f64,
    pub tokens_per_s: f64,
    pub old_vocab: usize,
    pub new_vocab: usize,
    /// The steps a `[train] minutes` budget planned (then also `total_steps`); absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planned_steps: Option<usize>,
    /// Wall seconds of this invocation, loading included.
    pub wall_s: f64,
    /// The arithmetic the frozen products ran in (`f32`, `bf16` or `int8`; `[train]
    /// frozen_products`).
    pub frozen_products: &'static str,
}

/// Steps of an invocation after which a `[train] minutes` budget first plans the run. The first
/// step carries one-time costs (allocations, the first teacher pass), so the rate is the mean
/// from the second step on: seven steps at the first plan, enough for the mix's sources to show
/// their different costs (a Chinese row with the chain teacher costs about twice an English
/// one). The plan is then made again after every step, from the mean of all steps so far: on a
/// shared 2-core machine the first eight steps of the quickstart ran at 21.5 s a step and the
/// next thirty at 16.7, and one plan left 2.7 of its 14 minutes unused.
const PLAN_AFTER: usize = 8;

/// The model as the recipe wants it before any step, plus what saving needs.
pub struct Prepared {
    pub model: Llama,
    pub tokenizer: Option<PathBuf>,
    pub extension: Option<PathBuf>,
    pub old_vocab: usize,
    /// Old head rows that differ from the unresized base (saved with the new rows).
    pub head_moved: Vec<usize>,
}

/// Base model + vocabulary growth + adapter (`adapter_dir`: `init_from` or a checkpoint), or
/// fresh LoRA branches.
pub fn prepare(recipe: &Recipe, device: &burn::tensor::Device, out: &Path, adapter_dir: Option<&Path>) -> Result<Prepared> {
    let dtype = recipe.dtype();
    let model_dir = recipe.resolve(&recipe.model.path);
    let mut model = Llama::load(&model_dir, device, dtype)?;
    let mut tokenizer = super::prepare_data::model_tokenizer(recipe, &model_dir);
    let mut extension = None;
    let mut old_vocab = model.vocab_size();
    let mut head_moved = crate::vocab::moved_head_rows(&model_dir)?;
    if let (Some(v), Some((ext_path, tok_dir))) = (&recipe.vocab, super::prepare_data::vocab_extension(recipe, tokenizer.as_deref(), out)?) {
        let ext = VocabExtension::load(&ext_path)?;
        tokenizer = tok_dir.or(tokenizer);
        let init = v.init;
        if model.vocab_size() == ext.old_vocab {
            let std = match v.init_std {
                Some(s) => s,
                None => crate::vocab::init_std(&crate::config::HfConfig::load(&model_dir)?),
            };
            crate::vocab::resize_loaded(&mut model, &ext, init, v.seed, std)?;
            if let Some(sides) = init.distill_sides() {
                let text = match &v.init_text {
                    Some(t) => recipe.resolve(t),
                    None => default_init_text(recipe).context("[vocab] init = \"distill*\" needs a text of the new language: set [vocab] init_text or add a `text` source")?,
                };
                let tok_dir = ext_path.parent().filter(|d| d.join("tokenizer.json").exists()).context("[vocab] init = \"distill*\" needs the extended tokenizer.json beside the extension")?;
                let mut opts = crate::vocab::distill::DistillOptions { sides, seed: v.seed, ..Default::default() };
                if let Some(n) = v.init_tokens {
                    opts.tokens = n;
                }
                let r = crate::vocab::distill::distill_model(&mut model, &ext, tok_dir, &text, &opts, |s| eprintln!("[vocab] init: {s}"))?;
                head_moved = r.head_rows_moved.iter().map(|&i| i as usize).collect();
                eprintln!("[vocab] init {}: {}", init, serde_json::to_string(&r)?);
            }
        } else if model.vocab_size() != ext.new_vocab {
            bail!(
                "[vocab] extension: the model has {} rows but the extension goes {} -> {}: use the extension made from this model's tokenizer",
                model.vocab_size(),
                ext.old_vocab,
                ext.new_vocab
            );
        }
        old_vocab = ext.old_vocab;
        extension = Some(ext_path);
    }
    match adapter_dir {
        Some(a) => model = lora::adapter::apply(model, a, device)?,
        None if recipe.lora.enabled => lora::inject(
            &mut model,
            &lora::LoraSettings {
                r: recipe.lora.r,
                alpha: recipe.lora.alpha,
                dropout: recipe.lora.dropout,
                rslora: recipe.lora.rslora,
                targets: recipe.lora.targets.clone(),
                init: recipe.lora.init,
                seed: recipe.train.seed,
            },
            device,
        )?,
        None => {}
    }
    for (_, lin) in lora::adapter::linears_mut(&mut model) {
        for br in lin.lora.iter_mut() {
            br.dropout = recipe.lora.dropout;
        }
    }
    Ok(Prepared { model, tokenizer, extension, old_vocab, head_moved })
}

/// The text a `distill*` init reads when the recipe names none: the first `text` source in
/// Chinese, else the first `text` source.
fn default_init_text(recipe: &Recipe) -> Option<PathBuf> {
    let texts: Vec<_> = recipe.data.iter().filter(|d| d.kind == data::SourceKind::Text).collect();
    let pick = texts.iter().find(|d| d.lang.as_deref() == Some("zh")).or(texts.first())?;
    Some(recipe.resolve(&pick.path))
}

/// Applies a stage's choices: which tables train, whether LoRA trains. The tables are rebuilt,
/// so with `bf16` or `int8` products (see [`pack_frozen`]) the head's frozen rows are packed
/// here.
pub fn enter_stage(model: &mut Llama, stage: &Stage, old_vocab: usize, new_rows_f32: bool, products: &str) -> Result<()> {
    model.embed_tokens.extra_f32 = new_rows_f32;
    if let Some(h) = model.lm_head.as_mut() {
        h.extra_f32 = new_rows_f32;
    }
    set_table_modes(model, stage.embed, stage.head, old_vocab)?;
    model.lm_head.as_mut().unwrap_or(&mut model.embed_tokens).pack_base(products)?;
    for (_, lin) in lora::adapter::linears_mut(model) {
        for br in lin.lora.iter_mut() {
            for p in [&mut br.a, &mut br.b] {
                let v = p.val().detach().cast(burn::tensor::FloatDType::F32);
                // The flag is set on the Param itself: a Param made from a tensor that is merely
                // not tracked still asks for a gradient, so a `lora = false` stage trained LoRA.
                *p = Param::initialized(p.id, v).set_require_grad(stage.lora);
            }
        }
    }
    Ok(())
}

/// `all` > `new_rows` > `frozen`: what an adapter must carry after the stages so far.
fn widest(a: TableMode, b: TableMode) -> TableMode {
    use TableMode::*;
    match (a, b) {
        (All, _) | (_, All) => All,
        (NewRows, _) | (_, NewRows) => NewRows,
        _ => Frozen,
    }
}

fn table_save(stages: &[Stage], upto: usize, old_vocab: usize, head_moved: &[usize]) -> TableSave {
    let (mut e, mut h) = (TableMode::Frozen, TableMode::Frozen);
    for s in &stages[..=upto.min(stages.len() - 1)] {
        e = widest(e, s.embed);
        h = widest(h, s.head);
    }
    TableSave { embed: e, lm_head: h, old_vocab, head_moved: head_moved.to_vec() }
}

fn stage_at(stages: &[Stage], step: usize) -> (usize, usize) {
    let mut start = 0;
    for (i, s) in stages.iter().enumerate() {
        if step < start + s.steps {
            return (i, start);
        }
        start += s.steps;
    }
    (stages.len() - 1, start - stages.last().map(|s| s.steps).unwrap_or(0))
}

fn recipe_hash(text: &str) -> u64 {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The base's values of old head rows that `vocab resize --init distill` refitted. The resize
/// unties a tied table to fit the head, so the base's head is the embedding: that holds when
/// every other old head row still equals its embedding row, which is checked.
fn refitted_rows_base_values(model: &Llama, moved: &[usize], old_vocab: usize) -> Result<burn::tensor::Tensor<2>> {
    let head = model.lm_head.as_ref().context("old head rows are listed as refitted but the model has no separate lm_head")?;
    let d = model.embed_tokens.hidden();
    let read = |t: burn::tensor::Tensor<2>| t.slice([0..old_vocab, 0..d]).cast(burn::tensor::FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading a table: {e:?}"));
    let (h, e) = (read(head.weight())?, read(model.embed_tokens.weight())?);
    let is_moved: std::collections::HashSet<usize> = moved.iter().copied().collect();
    let same = (0..old_vocab).filter(|r| !is_moved.contains(r)).all(|r| h[r * d..(r + 1) * d] == e[r * d..(r + 1) * d]);
    if !same {
        bail!("its old head rows were refitted by `vocab resize --init distill` and the base's head was not tied to the embedding, so the base's values of those rows are gone: resize with --init subtoken-mean or distill-input for chain_distill");
    }
    let vals: Vec<f32> = moved.iter().flat_map(|&r| e[r * d..(r + 1) * d].iter().copied()).collect();
    let device = model.embed_tokens.weight().device();
    Ok(burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(vals, [moved.len(), d]), &device))
}

/// `[train] frozen_products`: every dense frozen projection copied once for its products
/// ([`crate::kernels::frozen`]): bf16 packings, or int8 copies for the quantized kernels; the f32
/// weights stay the model's and are what is saved. The LM head's frozen old rows are copied too,
/// by [`enter_stage`], which rebuilds the tables. `bf16` and `int8` refuse a model
/// they cannot run on; `auto` picks what is faster on this CPU ([`crate::kernels::frozen::auto`])
/// and keeps the f32 products where the copies cannot run. Returns the arithmetic the products
/// run in: `f32`, `bf16` or `int8`.
fn pack_frozen(model: &mut Llama, mode: FrozenProducts) -> Result<&'static str> {
    let wanted = match mode {
        FrozenProducts::F32 => return Ok("f32"),
        FrozenProducts::Auto => match crate::kernels::frozen::auto() {
            "f32" => return Ok("f32"),
            w => w,
        },
        FrozenProducts::Bf16 => "bf16",
        FrozenProducts::Int8 => "int8",
    };
    let strict = mode != FrozenProducts::Auto;
    if wanted == "bf16" && !crate::kernels::bf16::available() {
        ensure!(!strict, "[train] frozen_products = \"bf16\" needs a CPU with AVX512-BF16 and this one has none; set it to \"auto\" (or remove the key) to train with f32 products");
        return Ok("f32");
    }
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let head_f32 = head.quant.is_none() && crate::kernels::flex_f32(&head.base.val()).is_some();
    let all_f32 = head_f32 && lora::adapter::linears_mut(model).into_iter().all(|(_, lin)| lin.weight.as_dense().is_none_or(|p| crate::kernels::flex_f32(&p.val()).is_some()));
    if !all_f32 {
        ensure!(!strict, "[train] frozen_products = \"{wanted}\" runs on the CPU's f32 weights and this model's are not (a GPU device, a quantized folder or [precision] dtype); set it to \"auto\" or remove the key");
        return Ok("f32");
    }
    let mut copied = 0;
    for (name, lin) in lora::adapter::linears_mut(model) {
        let Some(p) = lin.weight.as_dense() else { continue };
        let w = p.val();
        let [out, inp] = w.dims();
        let v = w.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading {name} for its {wanted} copies: {e:?}"))?;
        lin.packed = match wanted {
            "bf16" => Some(FrozenPacked::Bf16(crate::kernels::bf16::FrozenBf16::new(&v, out, inp))),
            // A projection whose dimensions are not whole blocks keeps its f32 products.
            _ => crate::kernels::frozen::FrozenInt8::new(&v, out, inp).map(FrozenPacked::Int8),
        }
        .map(Arc::new);
        copied += lin.packed.is_some() as usize;
    }
    ensure!(copied > 0 || !strict, "[train] frozen_products = \"{wanted}\": no projection of this model has dimensions in whole 32-value blocks; remove the key");
    // `auto` on a model none of whose projections could be copied trains with f32 products.
    Ok(if copied > 0 { wanted } else { "f32" })
}

/// The layer `[[data]] hidden_distill` compares after (`[train] hidden_distill_layer`, or half
/// the model's layers), checked against the model's `config.json` before any output exists;
/// `None` when no source sets the term.
fn hidden_distill_layer(recipe: &Recipe) -> Result<Option<usize>> {
    if !recipe.data.iter().any(|d| d.hidden_distill > 0.0) {
        return Ok(None);
    }
    let dir = recipe.resolve(&recipe.model.path);
    let layers = crate::config::LlamaConfig::load(&dir)?.num_layers;
    let layer = recipe.train.hidden_distill_layer.unwrap_or(layers / 2);
    ensure!((1..=layers).contains(&layer), "[train] hidden_distill_layer = {layer}: {} has {layers} layers; the stream is compared after 1 to {layers} of them", dir.display());
    Ok(Some(layer))
}

/// `[train] row_map_rank` checked against the model's `config.json` before any output exists:
/// a map wider than the hidden size adds nothing a full-rank one lacks and only costs memory.
fn check_row_map_rank(recipe: &Recipe) -> Result<()> {
    let rank = recipe.train.row_map_rank;
    if rank == 0 {
        return Ok(());
    }
    let dir = recipe.resolve(&recipe.model.path);
    let hidden = crate::config::LlamaConfig::load(&dir)?.hidden_size;
    ensure!(rank <= hidden, "[train] row_map_rank = {rank}: {} has hidden size {hidden}; use a rank from 1 to {hidden} (16 is plenty)", dir.display());
    Ok(())
}

pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    let t_entry = Instant::now();
    let recipe = Recipe::load(&opts.recipe)?;
    let out = recipe.resolve(&recipe.output.dir);
    // A run that logged steps or wrote a checkpoint keeps them: they explain the failure, or
    // resume it.
    let ran = |out: &Path| std::fs::metadata(out.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0) || out.join("checkpoints").exists();
    crate::io::atomic::remove_made_on_error(&out, ran, || run(opts, t_entry, recipe, &out))
}

fn run(opts: &TrainOptions, t_entry: Instant, recipe: Recipe, out: &Path) -> Result<TrainReport> {
    // The parsed recipe, not its text: comments and formatting may change between resumes.
    let recipe_text = serde_json::to_string(&recipe)?;
    let out = out.to_path_buf();
    super::prepare_data::check_output_dir(&recipe, &opts.recipe, &out, opts.resume)?;
    let hidden_layer = hidden_distill_layer(&recipe)?;
    check_row_map_rank(&recipe)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create [output] dir {}", out.display()))?;
    let mut stages = recipe.stages()?;
    // The recipe's steps; a `minutes` budget may end the run sooner (`total`).
    let upper = recipe.total_steps()?;
    let mut total = upper;
    let base_device = crate::device::parse(&recipe.model.device)?;
    let device = base_device.clone().autodiff();
    let hash = recipe_hash(&recipe_text);

    let Resume { checkpoint, state, mut opt, mut row_maps } = resume_point(&recipe, &out, opts.resume, &base_device, hash)?;
    let adapter_dir = match &checkpoint {
        Some(d) => Some(d.join("adapter")),
        None => recipe.lora.init_from.as_ref().map(|p| recipe.resolve(p)),
    };
    let Prepared { mut model, tokenizer, extension, old_vocab, head_moved } = prepare(&recipe, &device, &out, adapter_dir.as_deref())?;
    let context = model.config.max_position_embeddings;
    ensure!(
        recipe.train.seq_len <= context,
        "[train] seq_len = {} is longer than the model's context of {context} tokens ({} config.json max_position_embeddings): positions beyond it were never trained; set seq_len = {context} or less",
        recipe.train.seq_len,
        recipe.model.path.display()
    );
    let products = pack_frozen(&mut model, recipe.train.frozen_products)?;
    let new_vocab = model.vocab_size();
    let added_from = extension.as_ref().map(|_| old_vocab as u32);

    // Data.
    let eos = model.config.eos_token_ids.first().copied().unwrap_or(2);
    let all_tokenized = recipe.data.iter().all(|d| d.kind == data::SourceKind::Tokenized);
    // The same encoder as `data prepare` builds, so its stores are found here.
    let enc = super::prepare_data::data_encoder(tokenizer.as_deref(), model.config.bos_token_id, eos, new_vocab, all_tokenized, extension.is_some())?;
    let sources = data::load_sources_with(&recipe.data, &recipe.root, &enc, Some(&super::prepare_data::store_dir(&out)), opts.progress)?;
    let weights = SourceWeights::new(&recipe);
    let chains = weights.chain.iter().any(|&w| w > 0.0);
    // The base model the distillation terms read: the chain term's teacher, and on the CPU
    // self-distillation's too, whose targets it then makes on the host (elsewhere that term
    // runs the training model with LoRA off inside the step).
    let self_on_host = weights.self_distills_plain() && BaseModel::host_device(&base_device) && same_rounding(products, recipe.train.teacher);
    let base = if chains || self_on_host {
        let refitted = if head_moved.is_empty() { Ok(None) } else { refitted_rows_base_values(&model, &head_moved, old_vocab).map(Some) };
        match refitted {
            Ok(refitted) => {
                let base = BaseModel::new(&model, old_vocab, recipe.train.teacher, refitted.as_ref().map(|v| (head_moved.as_slice(), v)), &device).with_context(|| format!("the distillation teacher: the base model of {}", recipe.model.path.display()))?;
                eprintln!("[teacher] the distillation terms read {}", base.describe());
                Some(base)
            }
            Err(e) if chains => return Err(e.context(format!("chain_distill on {}", recipe.model.path.display()))),
            // Self-distillation alone keeps its composed term, which reads the model's own head.
            Err(_) => None,
        }
    } else {
        None
    };
    let teacher = match (&base, chains) {
        (Some(base), true) => Some((chain_teacher(&model, &sources, &weights.chain, extension.as_deref(), hidden_layer)?, base)),
        _ => None,
    };
    let self_teacher = base.as_ref().filter(|_| self_on_host);
    let mut mixer = Mixer::new(sources, mix_config(&recipe, model.config.eos_token_ids.first().copied().unwrap_or(0)))?;
    let source_names = super::metrics::source_labels(&recipe.data);

    let mut scaler = Scaler::new(recipe.scaler()?);
    // The maps read each new row's spelling; they are built once the first stage has split
    // the tables into old and new rows.
    let row_map_spelling = match (recipe.train.row_map_rank, &extension) {
        (0, _) => None,
        (_, None) => bail!("[train] row_map_rank needs a [vocab] extension: the map reads each new row's sub-tokens"),
        (_, Some(p)) => Some(VocabExtension::load(p)?.subtokens),
    };
    let start = match &state {
        Some(st) => {
            mixer.restore(serde_json::from_value(st.data.clone())?)?;
            scaler = st.scaler.clone();
            st.step
        }
        None => 0,
    };
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, start)?;
    if start == 0 {
        // A recipe kept in its own [output] dir is that copy already (copying a file onto
        // itself would truncate it).
        let copy = out.join("recipe.toml");
        if !copy.exists() || !crate::io::atomic::same_file(&opts.recipe, &copy) {
            crate::io::atomic::write(&copy, &std::fs::read(&opts.recipe).with_context(|| format!("cannot read {}", opts.recipe.display()))?)?;
        }
    }

    // A resumed run keeps the plan it was given and makes no new one: the budget's clock
    // started in an invocation this one cannot see. (A recipe with a budget has one stage:
    // `Recipe::check`.)
    let mut planned = state.as_ref().and_then(|s| s.planned_steps);
    // The step of the first plan (checkpoints from before it was kept planned after the
    // first `PLAN_AFTER` steps of a run that started at 0).
    let mut planned_at = planned.map(|_| state.as_ref().and_then(|s| s.planned_at).unwrap_or(PLAN_AFTER));
    let replan = planned.is_none();
    if let Some(p) = planned {
        stages[0].steps = p;
        total = p;
    }
    let budget_s = recipe.train.minutes.map(|m| m * 60.0);
    let schedule = recipe.train.schedule;
    let bar = if opts.progress { Some(progress_bar(total, start)) } else { None };
    let mut current_stage = usize::MAX;
    let (mut first_loss, mut last_loss) = (None, None);
    let t_run = Instant::now();
    let mut tokens_run = 0usize;
    let end_at = |total: usize| opts.stop_after.map(|n| (start + n).min(total)).unwrap_or(total);
    let mut end = end_at(total);
    let mut first_step_done: Option<Instant> = None;
    let fp32 = recipe.dtype() == crate::io::safetensors::FloatType::F32;
    // The files beside the tensors (recipe, extended tokenizer): a checkpoint's adapter carries
    // them too, so that `eval --adapter` reads text with the pieces its rows belong to.
    let extra = adapter_extras(&opts.recipe, tokenizer.as_deref(), extension.as_deref());
    let extra: Vec<&Path> = extra.iter().map(|p| p.as_path()).collect();
    let stop_requested = || super::interrupt::requested() || opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
    let mut writer = checkpoint::Writer::default();
    let mut step = start;
    while step < end {
        if step == start && stop_requested() {
            bail!("stopped by a signal before the first step; nothing was trained or saved");
        }
        let (si, stage_start) = stage_at(&stages, step);
        if si != current_stage {
            enter_stage(&mut model, &stages[si], old_vocab, recipe.precision.new_rows_f32, products)?;
            current_stage = si;
            let trains_new_rows = [stages[si].embed, stages[si].head].contains(&TableMode::NewRows);
            if let (Some(spelling), true) = (&row_map_spelling, trains_new_rows) {
                row_maps.start(&model, spelling, recipe.train.row_map_rank, recipe.train.seed, &device)?;
            }
        }
        // A copy: a budget may replan `stages` below, in this step.
        let stage = stages[si].clone();
        // After a budget's plan, warm-up and decay are those of the planned steps: `steps` may
        // be a loose upper bound ("as many as fit").
        let warmup = (recipe.train.warmup_ratio * stage.steps as f64).ceil() as usize;
        let mut f = lr_factor(schedule, step - stage_start, stage.steps, warmup);
        if let (Some(_), Some(at)) = (budget_s, planned_at) {
            // The plan shortened the warm-up under way: go on from where it was.
            let before = (recipe.train.warmup_ratio * upper as f64).ceil() as usize;
            f = f.min(replanned_ramp(step, at, before, warmup));
        }
        let hp = StepHparams { lr: stage.lr * f, lora_b_lr: stage.lr * f * recipe.train.loraplus_lr_ratio, embed_lr: stage.embed_lr * f, weight_decay: recipe.train.weight_decay, max_grad_norm: recipe.train.max_grad_norm };
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        device.seed(recipe.train.seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
        let mut batches = Vec::with_capacity(recipe.train.grad_accum);
        let mut source_of_row = Vec::new();
        let (mut teacher_s, mut self_teacher_s) = (0.0, 0.0);
        for _ in 0..recipe.train.grad_accum {
            let b = mixer.next_batch(recipe.train.batch_size, step as u64, total as u64)?;
            source_of_row.extend(b.source_of_row.iter().copied());
            let mut mb = weights.micro_batch(b);
            if let Some((t, base)) = teacher.as_ref().filter(|_| mb.chain_distill.iter().any(|&w| w > 0.0)) {
                let t0 = Instant::now();
                mb.chain = Some(Arc::new(t.targets(base, &mb.input_ids, &mb.labels, &mb.chain_distill)?));
                teacher_s += t0.elapsed().as_secs_f64();
            }
            if let Some(base) = self_teacher.filter(|_| self_targets_fit(&mb, old_vocab)) {
                let t0 = Instant::now();
                mb.self_targets = Some(Arc::new(self_targets(base, &mb.input_ids, &mb.labels, &mb.self_distill, old_vocab, new_vocab)?));
                self_teacher_s += t0.elapsed().as_secs_f64();
            }
            batches.push(mb);
        }
        let t0 = Instant::now();
        let r = train_step(&mut model, &mut opt, &mut row_maps, &mut scaler, &batches, &hp, &device)?;
        // In fp32 no loss scale can explain a non-finite loss: skipping steps would only hide a
        // NaN weight or corrupt data until the run ends with nothing learned.
        if fp32 && !r.loss.is_finite() {
            bail!(
                "step {}: the loss is {} in fp32, so the model or the data is broken (a NaN or huge weight in {}, or a learning rate that diverged); nothing was saved for this step",
                step + 1,
                r.loss,
                recipe.model.path.display()
            );
        }
        let dt = t0.elapsed().as_secs_f64();
        let positions: usize = batches.iter().map(|b| b.input_ids.len() * b.input_ids[0].len()).sum();
        tokens_run += positions;
        first_loss.get_or_insert(r.loss);
        last_loss = Some(r.loss);
        let (loss_by_source, tokens_by_source) = super::metrics::by_source(&source_names, &source_of_row, &r.row_nll, &r.row_tokens);
        let done = step + 1;
        let mut plan = None;
        if let (Some(budget), true) = (budget_s, replan) {
            match first_step_done {
                None => first_step_done = Some(Instant::now()),
                Some(t1) if done - start >= PLAN_AFTER => {
                    let s_per_step = t1.elapsed().as_secs_f64() / (done - start - 1) as f64;
                    let elapsed = t_entry.elapsed().as_secs_f64();
                    let p = steps_within(budget, elapsed, s_per_step, done, upper);
                    if planned != Some(p) {
                        planned = Some(p);
                        planned_at.get_or_insert(done);
                        stages[0].steps = p;
                        total = p;
                        end = end_at(total);
                        if let Some(b) = &bar {
                            b.set_length(total as u64);
                        }
                        plan = Some(serde_json::json!({"steps": p, "upper": upper, "s_per_step": s_per_step, "elapsed_s": elapsed, "budget_s": budget}));
                    }
                }
                Some(_) => {}
            }
        }
        let mut line = serde_json::json!({
            "step": step + 1, "stage": stage.name, "loss": r.loss, "lr": hp.lr, "embed_lr": hp.embed_lr,
            "loss_scale": r.loss_scale, "grad_norm": finite_or_null(r.grad_norm),
            "grad_norm_by_group": {"lora": finite_or_null(r.grad_norm_by_group[0]), "old_rows": finite_or_null(r.grad_norm_by_group[1]), "new_rows": finite_or_null(r.grad_norm_by_group[2])},
            "skipped": r.skipped, "overflow": r.overflow_groups, "tokens": r.tokens, "tokens_per_s": positions as f64 / dt, "step_s": dt,
            "events": r.events, "self_distill": r.self_distill, "chain_distill": r.chain_distill, "hidden_distill": r.hidden_distill, "chain_teacher_s": teacher.as_ref().map(|_| teacher_s), "self_teacher_s": self_teacher.map(|_| self_teacher_s), "loss_by_source": loss_by_source, "tokens_by_source": tokens_by_source,
        });
        if let Some(p) = plan {
            line["plan"] = p;
        }
        append_line(&mut metrics, &line)?;
        if let Some(b) = &bar {
            b.set_position((step + 1) as u64);
            b.set_message(format!("loss {:.4} scale {} {}", r.loss, r.loss_scale, if r.skipped { "skipped" } else { "" }));
            for e in &r.events {
                b.println(format!("step {}: {e}", step + 1));
            }
        } else {
            for e in &r.events {
                eprintln!("step {}: {e}", step + 1);
            }
        }
        if recipe.output.eval_every > 0 && done % recipe.output.eval_every == 0 && !recipe.eval.is_empty() {
            let ev = evaluate(&recipe, &model, tokenizer.as_deref(), added_from, &base_device)?;
            append_line(&mut metrics, &serde_json::json!({"step": done, "eval": ev}))?;
        }
        // A stop asked for while the run still has steps to go: a checkpoint here, then an error,
        // so that a script does not go on to merge an adapter that was never written.
        let stop = done < end && stop_requested();
        if done % recipe.output.save_every == 0 || done == total || stop {
            let ts = table_save(&stages, si, old_vocab, &head_moved);
            let st = TrainState { step: done, scaler: scaler.clone(), data: serde_json::to_value(mixer.state())?, adam_t: Default::default(), recipe_hash: hash, planned_steps: planned, planned_at };
            let cfg = adapter_config(&recipe);
            // One checkpoint in memory at a time: the one in flight is written before the next
            // is read.
            writer.wait()?;
            let pending = checkpoint::encode(&st, &opt, &row_maps, lora::save::encode(&model, &cfg, ts, &extra)?)?;
            // The invocation's last checkpoint is written here: the run's report, a resume or
            // `merge` may read it next. The others are written while training goes on.
            if !(stop || done == end) {
                writer.submit(&out, recipe.output.keep_last, pending)?;
            } else {
                let dir = pending.write(&out, recipe.output.keep_last)?;
                if stop {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    bail!(
                        "stopped by a signal after step {done} of {total}: the checkpoint is {} (its LoRA and rows in {}); continue with `linly-lora train {} --resume`",
                        dir.display(),
                        dir.join("adapter").display(),
                        opts.recipe.display()
                    );
                }
            }
        }
        step = done;
    }
    writer.wait()?;
    if let Some(b) = &bar {
        b.finish();
    }
    let mut adapter_out = None;
    if end == total {
        let ts = table_save(&stages, stages.len() - 1, old_vocab, &head_moved);
        let dir = out.join("adapter");
        lora::save::save(&model, &adapter_config(&recipe), ts, &dir, &extra)?;
        adapter_out = Some(dir);
        if !recipe.eval.is_empty() {
            let ev = evaluate(&recipe, &model, tokenizer.as_deref(), added_from, &base_device)?;
            append_line(&mut metrics, &serde_json::json!({"step": total, "eval": ev}))?;
        }
        if recipe.output.plots {
            if let Err(e) = super::plot::plot_metrics(&metrics_path, &out, &source_names) {
                eprintln!("warning: plots not drawn: {e:#}");
            }
        }
    }
    let secs = t_run.elapsed().as_secs_f64();
    let report = TrainReport {
        frozen_products: products,
        out_dir: out.clone(),
        adapter_dir: adapter_out,
        start_step: start,
        end_step: end,
        total_steps: total,
        first_loss,
        last_loss,
        skipped_steps: scaler.skipped_steps,
        packing_efficiency: mixer.stats().efficiency(),
        tokens_per_s: tokens_run as f64 / secs.max(1e-9),
        old_vocab,
        new_vocab,
        planned_steps: planned,
        wall_s: t_entry.elapsed().as_secs_f64(),
    };
    crate::io::atomic::write(&out.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

/// Where an invocation starts: a fresh run, or the last checkpoint in `[output] dir`.
struct Resume {
    /// The checkpoint folder resumed from.
    checkpoint: Option<PathBuf>,
    state: Option<TrainState>,
    opt: AdamW,
    row_maps: RowMaps,
}

/// Clears what a killed run left, then starts fresh (an error when `out` already holds a run's
/// checkpoints and `--resume` was not given) or loads the last checkpoint, which must come from
/// this recipe.
fn resume_point(recipe: &Recipe, out: &Path, resume: bool, device: &burn::tensor::Device, hash: u64) -> Result<Resume> {
    checkpoint::clean(out, recipe.output.keep_last);
    let ckpts = checkpoint::list(out);
    if !resume {
        if !ckpts.is_empty() {
            bail!("{} already holds checkpoints of a run: pass --resume to continue it, or choose another [output] dir", out.display());
        }
        return Ok(Resume { checkpoint: None, state: None, opt: AdamW::new(recipe.train.adam()), row_maps: RowMaps::default() });
    }
    let (_, dir) = ckpts.last().cloned().with_context(|| format!("--resume: no checkpoint in {}/checkpoints", out.display()))?;
    let (state, opt, row_maps) = checkpoint::load(&dir, device, recipe.train.adam())?;
    if state.recipe_hash != hash {
        bail!("{}: the recipe changed since this checkpoint was written; resume with the same recipe", dir.display());
    }
    Ok(Resume { checkpoint: Some(dir), state: Some(state), opt, row_maps })
}

/// Each `[[data]]` source's loss-term weights, by source index.
struct SourceWeights {
    self_distill: Vec<f32>,
    renormalize: Vec<bool>,
    chain: Vec<f32>,
    hidden: Vec<f32>,
}

impl SourceWeights {
    fn new(recipe: &Recipe) -> Self {
        let d = &recipe.data;
        SourceWeights {
            self_distill: d.iter().map(|d| d.self_distill as f32).collect(),
            renormalize: d.iter().map(|d| d.self_distill_renormalize).collect(),
            chain: d.iter().map(|d| d.chain_distill as f32).collect(),
            hidden: d.iter().map(|d| d.hidden_distill as f32).collect(),
        }
    }

    /// Whether some source has self-distillation without renormalisation (the term whose
    /// targets the host's base model can make).
    fn self_distills_plain(&self) -> bool {
        self.self_distill.iter().zip(&self.renormalize).any(|(&w, &r)| w > 0.0 && !r)
    }

    /// The mixer's rows with each row's weights (no chain targets yet).
    fn micro_batch(&self, b: data::Batch) -> MicroBatch {
        let per_row = |w: &[f32]| b.source_of_row.iter().map(|&s| w[s]).collect::<Vec<f32>>();
        let (self_distill, chain_distill, hidden_distill) = (per_row(&self.self_distill), per_row(&self.chain), per_row(&self.hidden));
        let self_distill_renormalize = b.source_of_row.iter().map(|&s| self.renormalize[s]).collect();
        MicroBatch { input_ids: b.input_ids, labels: b.labels, self_distill, self_distill_renormalize, chain_distill, hidden_distill, chain: None, self_targets: None }
    }
}

/// Whether the distillation snapshot ([`BaseModel`] with `[train] teacher = teacher`) rounds
/// the base as training's own products (`frozen_products`, as [`pack_frozen`] resolved it) do:
/// both int8 (the snapshot's `auto` quantizes exactly as [`crate::kernels::frozen::FrozenInt8`]
/// packs) or both f32. Only then can self-distillation read the snapshot: its term must be zero
/// on a model the step computes as the base. Measured on SmolLM2 at step 1 (no LoRA update yet,
/// so the term is only the mass on the new rows): 0.006 nats either way when the two agree,
/// 0.028 when one side rounds to 8 bits and the other does not.
fn same_rounding(products: &str, teacher: TeacherWeights) -> bool {
    matches!((products, teacher), ("int8", TeacherWeights::Auto) | ("f32", TeacherWeights::Dense))
}

/// Whether self-distillation's targets for `mb` can come from the host's base model
/// ([`self_targets`]): some row has a weight, none of those renormalises, and they hold old ids
/// only (the base model has no new rows to read). Otherwise the step composes the term.
fn self_targets_fit(mb: &MicroBatch, old_vocab: usize) -> bool {
    let weighted: Vec<usize> = (0..mb.input_ids.len()).filter(|&r| mb.self_distill.get(r).is_some_and(|&w| w > 0.0)).collect();
    !weighted.is_empty() && weighted.iter().all(|&r| !mb.self_distill_renormalize.get(r).copied().unwrap_or(false) && mb.input_ids[r].iter().all(|&id| (id as usize) < old_vocab))
}

/// The chain teacher of `[[data]] chain_distill`: the extension's trie, counted on the sources
/// with a weight (the base model that reads their old tokenization is made beside it).
fn chain_teacher(model: &Llama, sources: &[data::TokenizedSource], weights: &[f32], extension: Option<&Path>, hidden_layer: Option<usize>) -> Result<ChainTeacher> {
    let ext_path = extension.context("chain_distill needs a [vocab] extension")?;
    // The trie's counts only estimate conditionals below the depth the base is read exactly: a
    // bounded prefix of each source is enough, and keeps RAM flat on any corpus.
    const COUNT_TOKENS: usize = 4 << 20;
    let texts: Vec<Vec<u32>> = sources
        .iter()
        .zip(weights)
        .filter(|(_, &w)| w > 0.0)
        .map(|(s, _)| {
            let (mut ids, mut loss) = (Vec::new(), Vec::new());
            s.docs.read(0, s.docs.tokens().min(COUNT_TOKENS), &mut ids, &mut loss);
            ids
        })
        .collect();
    let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
    let ext = VocabExtension::load(ext_path)?;
    ensure!(model.vocab_size() == ext.new_vocab, "chain_distill: the model has {} rows but the extension {} names {}", model.vocab_size(), ext_path.display(), ext.new_vocab);
    let mut teacher = ChainTeacher::new(ext, &refs);
    if let Some(layer) = hidden_layer {
        teacher = teacher.with_hidden_layer(layer);
    }
    Ok(teacher)
}

fn mix_config(recipe: &Recipe, pad_id: u32) -> MixConfig {
    let mut c = MixConfig::new(recipe.train.seq_len, recipe.train.seed);
    c.bucketed = recipe.mix.bucketed;
    if let Some(b) = recipe.mix.bins {
        c.bins = b;
    }
    c.packing = recipe.mix.packing;
    c.pad_id = pad_id;
    c
}

/// One line of `metrics.jsonl` in one write: `writeln!` on the file wrote a JSON value in
/// pieces, ~160 system calls a step.
fn append_line(f: &mut std::fs::File, v: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write;
    f.write_all(format!("{v}\n").as_bytes())
}

/// `metrics.jsonl` open for appending, holding exactly the lines up to step `start`, as an
/// uninterrupted run has them (a resumed run drops what its killed predecessor logged later).
fn open_metrics(path: &Path, start: usize) -> Result<std::fs::File> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| (s as usize) <= start))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::atomic::write(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot append to {}", path.display()))
}

/// What the final adapter carries beside its weights, so that `merge` needs nothing else: the
/// recipe, and with a vocabulary extension the extended tokenizer and the extension.
fn adapter_extras(recipe: &Path, tokenizer: Option<&Path>, extension: Option<&Path>) -> Vec<PathBuf> {
    let mut extra = vec![recipe.to_path_buf()];
    if let (Some(t), Some(_)) = (tokenizer, extension) {
        extra.extend(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"].map(|f| t.join(f)).into_iter().filter(|p| p.exists()));
    }
    extra.extend(extension.map(Path::to_path_buf));
    extra
}

fn adapter_config(recipe: &Recipe) -> crate::lora::config::AdapterConfig {
    let mut c = crate::lora::config::AdapterConfig::new(recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.rslora, &recipe.lora.targets);
    c.base_model_name_or_path = Some(recipe.resolve(&recipe.model.path).display().to_string());
    c
}

/// bits/char of the current model on each [[eval]] file.
fn evaluate(recipe: &Recipe, model: &Llama, tokenizer: Option<&Path>, first_added_id: Option<u32>, device: &burn::tensor::Device) -> Result<Vec<serde_json::Value>> {
    use burn::module::Module;
    let tok = crate::tokenizer::Tok::load(tokenizer.context("[[eval]] needs a tokenizer")?)?;
    let plain = model.valid();
    let loaded = crate::infer::Loaded { model: plain, tok: Some(tok), device: device.clone(), first_added_id };
    let mut out = Vec::new();
    for e in &recipe.eval {
        let path = recipe.resolve(&e.path);
        let text = crate::tokenizer::read_text(&path)?;
        let window = recipe.train.seq_len.max(256).min(loaded.model.config.max_position_embeddings);
        let r = crate::infer::eval::eval_text(&loaded, &text, Some(window))?;
        let mut v = serde_json::json!({"name": e.name.clone().unwrap_or_else(|| path.display().to_string()), "lang": e.lang, "bits_per_char": r.bits_per_char, "mean_nll": r.mean_nll, "tokens": r.tokens});
        if let Some(sp) = &r.by_vocab {
            v["added_bits_per_char"] = serde_json::json!(sp.added.bits_per_char);
            v["added_mean_nll"] = serde_json::json!(sp.added.mean_nll);
        }
        out.push(v);
    }
    Ok(out)
}

fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta} {msg}").unwrap().progress_chars("=> "));
    b.set_position(start as u64);
    b
}

/// JSON has no inf or NaN: an overflowing step logs `null`.
fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage rebuilds the tables, so the head's packing is made where a stage is entered:
    /// with bf16 or int8 products the head that comes out of `enter_stage` holds a packing of
    /// exactly its frozen old rows, a head that trains whole holds none, and f32 products pack
    /// nothing.
    #[test]
    fn entering_a_stage_packs_the_heads_frozen_rows() {
        let (old, hidden) = (32, 64);
        let cfg = crate::config::LlamaConfig::synthetic(hidden, 1, 4, 2, 176, 40);
        let device = crate::device::parse("cpu").unwrap().autodiff();
        let mut model = Llama::random(&cfg, &device, crate::io::safetensors::FloatType::F32);
        let stage = |head| Stage { name: "s".into(), steps: 1, lr: 1e-3, embed_lr: 1e-3, lora: true, embed: TableMode::NewRows, head };
        let packed = |m: &Llama| m.lm_head.as_ref().unwrap_or(&m.embed_tokens).packed.as_ref().map(|p| (p.dims(), matches!(**p, FrozenPacked::Int8(_))));
        enter_stage(&mut model, &stage(TableMode::NewRows), old, true, "bf16").unwrap();
        assert_eq!(packed(&model), Some(([old, hidden], false)));
        enter_stage(&mut model, &stage(TableMode::All), old, true, "bf16").unwrap();
        assert_eq!(packed(&model), None, "a head that trains whole");
        enter_stage(&mut model, &stage(TableMode::NewRows), old, true, "int8").unwrap();
        assert_eq!(packed(&model), Some(([old, hidden], true)));
        enter_stage(&mut model, &stage(TableMode::NewRows), old, true, "f32").unwrap();
        assert_eq!(packed(&model), None, "f32 products");
    }
}

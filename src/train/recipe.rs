//! `recipe.toml`: every key documented in recipes/README.md. Parsing rejects unknown keys;
//! [`Recipe::load`] then checks values and files before any training starts, and each error
//! names the key and the fix. Relative paths are relative to the recipe's folder.

use crate::io::safetensors::FloatType;
use crate::lora::{LoraInit, TableMode};
use crate::train::scaler::{ScalerConfig, ScalerKind};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::Schedule;
use crate::vocab::InitMethod;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    #[serde(default)]
    pub vocab: Option<VocabSection>,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub trainable: TrainableSection,
    #[serde(default)]
    pub data: Vec<crate::data::SourceSpec>,
    #[serde(default)]
    pub mix: MixSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub precision: PrecisionSection,
    pub output: OutputSection,
    #[serde(default)]
    pub eval: Vec<EvalSection>,
    #[serde(default)]
    pub stage: Vec<StageSection>,
    /// The recipe's folder, for relative paths (not a key).
    #[serde(skip)]
    pub root: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: PathBuf,
    /// Tokenizer folder, when not the model's own (and no `[vocab]` brings one).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabSection {
    /// vocab_extension.json from `linly-lora vocab extend` (its folder holds the new tokenizer).
    #[serde(default)]
    pub extension: Option<PathBuf>,
    /// Or: a file of new pieces, one per line, to extend with in-run.
    #[serde(default)]
    pub add: Option<PathBuf>,
    #[serde(default = "subtoken_mean")]
    pub init: InitMethod,
    #[serde(default)]
    pub seed: u64,
    /// Std of `random` / scale of `noisy-mean` rows (default: the model's initializer_range).
    #[serde(default)]
    pub init_std: Option<f32>,
    /// Training text of the new language that `distill*` inits draw contexts from (default: the
    /// first `text` source with `lang = "zh"`, else the first `text` source).
    #[serde(default)]
    pub init_text: Option<PathBuf>,
    /// Tokens of context for the `distill*` inits.
    #[serde(default)]
    pub init_tokens: Option<usize>,
}

fn subtoken_mean() -> InitMethod {
    InitMethod::SubtokenMean
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "r8")]
    pub r: usize,
    #[serde(default = "a16")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// `kaiming` (PEFT's default) or `gaussian`.
    #[serde(default = "kaiming")]
    pub init: LoraInit,
    /// `false` trains no LoRA (embeddings-only runs).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn r8() -> usize {
    8
}
fn a16() -> f64 {
    16.0
}
fn yes() -> bool {
    true
}
fn kaiming() -> LoraInit {
    LoraInit::Kaiming
}
fn all_targets() -> Vec<String> {
    crate::lora::config::TARGETS.iter().map(|s| s.to_string()).collect()
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { r: 8, alpha: 16.0, dropout: 0.0, rslora: false, targets: all_targets(), init_from: None, init: kaiming(), enabled: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainableSection {
    #[serde(default = "all")]
    pub embed_tokens: TableMode,
    #[serde(default = "all")]
    pub lm_head: TableMode,
}

fn all() -> TableMode {
    TableMode::All
}

impl Default for TrainableSection {
    fn default() -> Self {
        TrainableSection { embed_tokens: all(), lm_head: all() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSection {
    /// Colossal-LLaMA-2's bucketed mixing: bucket k takes bin k of every source.
    #[serde(default)]
    pub bucketed: bool,
    #[serde(default)]
    pub bins: Option<usize>,
    /// Whole-document packing (Linly); false puts one document per sequence.
    #[serde(default = "yes")]
    pub packing: bool,
}

// Written out, not derived: a recipe without a [mix] section must pack too (a derived Default
// would say `packing = false`, silently wasting two thirds of every row on short documents).
impl Default for MixSection {
    fn default() -> Self {
        MixSection { bucketed: false, bins: None, packing: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub seq_len: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub steps: usize,
    /// A wall-clock budget for the whole `train` command: after its first steps the run
    /// measures its seconds per step and stops at the step that fits (`steps` stays the upper
    /// bound), with the decay of the schedule ending there. Left out of the serialized recipe
    /// when unset, so that checkpoints written before the key existed still resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minutes: Option<f64>,
    pub lr: f64,
    pub embed_lr: Option<f64>,
    /// LoRA+ (Hayou, Ghosh and Yu, 2024; PEFT's `loraplus_lr_ratio`): the B factors train at
    /// `lr` times this, the A factors at `lr`. B starts at zero and holds the update's output
    /// side, and with one rate for both the pair learns slowly in wide layers. Left out of the
    /// serialized recipe at 1 (off), so that older checkpoints still resume.
    #[serde(skip_serializing_if = "is_one")]
    pub loraplus_lr_ratio: f64,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// AdamW's moment decays and epsilon, under the names of HF's `TrainingArguments`
    /// (defaults 0.9, 0.999, 1e-8, torch's). Each is left out of the serialized recipe at its
    /// default, so that older checkpoints still resume.
    #[serde(skip_serializing_if = "is_default_beta1")]
    pub adam_beta1: f64,
    #[serde(skip_serializing_if = "is_default_beta2")]
    pub adam_beta2: f64,
    #[serde(skip_serializing_if = "is_default_eps")]
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// How the distillation teacher (the base model `chain_distill` reads) holds its weights.
    /// Left out of the serialized recipe when `auto`, so that checkpoints written before the
    /// key existed still resume (the resume check hashes the serialized recipe).
    #[serde(skip_serializing_if = "TeacherWeights::is_auto")]
    pub teacher: TeacherWeights,
    /// How the student multiplies by its frozen projections; left out of the serialized recipe
    /// when `f32`, as `teacher` is, so that older checkpoints still resume.
    #[serde(skip_serializing_if = "FrozenProducts::is_f32")]
    pub frozen_products: FrozenProducts,
    /// Where `[[data]] hidden_distill` compares the model's residual stream with the base's:
    /// after this many layers (1 to the model's layer count; unset: half of them, rounded
    /// down). Left out of the serialized recipe when unset, as `minutes` is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_distill_layer: Option<usize>,
    /// The rank of a map shared by the new rows ([`super::row_map`]); 0 (the default) trains
    /// each row on its own gradient only. Left out of the serialized recipe when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub row_map_rank: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn is_default_beta1(x: &f64) -> bool {
    *x == AdamWConfig::default().beta1
}

fn is_default_beta2(x: &f64) -> bool {
    *x == AdamWConfig::default().beta2
}

fn is_default_eps(x: &f64) -> bool {
    *x == AdamWConfig::default().eps
}

impl TrainSection {
    /// The optimizer's constants from `adam_beta1`, `adam_beta2` and `adam_epsilon`.
    pub fn adam(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.adam_beta1, beta2: self.adam_beta2, eps: self.adam_epsilon }
    }
}

/// `[train] frozen_products`: the arithmetic of the products with the frozen projections in
/// training's forward and backward (see [`crate::kernels::frozen`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenProducts {
    /// f32, the exact products (the reference; the default).
    #[default]
    F32,
    /// The frozen weights (the projections and the LM head's old rows) packed in bf16 once and
    /// the activations rounded to bf16 as they are read, with f32 sums: ~1.5–1.8× the f32
    /// product on an AMD CPU with AVX512-BF16 (which it needs), no faster on Intel's Xeons.
    Bf16,
    /// What is faster on this CPU ([`crate::kernels::frozen::auto`]): `int8` on a CPU with
    /// AVX-512 VNNI (Intel or AMD), `bf16` on an AMD CPU with AVX512-BF16 and no VNNI, `f32`
    /// elsewhere and wherever the weights are not f32 on the CPU: what the quickstart's recipe
    /// sets, so that one recipe trains fastest on every machine.
    Auto,
    /// The projections and the LM head's old rows in the quantized kernels that inference
    /// uses: forward on the weights' own Q4_1 grid where they lie on one (else Q8_0; SmolLM2's
    /// table is Q8_0 in its GGUF, so its rows are held exactly), backward on a Q8_0 copy of
    /// `Wᵀ`, the activations and output gradients rounded to 8 bits per 32-value block. The
    /// head's new rows, which train, stay f32. ~2–3.4× the f32 product on a 256-token row on
    /// an Intel Xeon with AVX-512 VNNI; needs f32 weights on the CPU and dimensions that are
    /// whole 32-value blocks (others stay f32).
    Int8,
}

impl FrozenProducts {
    fn is_f32(&self) -> bool {
        *self == FrozenProducts::F32
    }
}

/// `[train] teacher`: the weights of the base model that `chain_distill` reads (see
/// [`super::teacher`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherWeights {
    /// Quantized where the frozen weights are f32 on the CPU (each projection in Q4_1 where
    /// that holds it exactly, else Q8_0), `dense` elsewhere.
    #[default]
    Auto,
    /// The frozen weights as they are: the exact base.
    Dense,
    /// Every projection and the old vocabulary rows in Q8_0, run by the quantized kernels.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl TeacherWeights {
    fn is_auto(&self) -> bool {
        *self == TeacherWeights::Auto
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            seq_len: 512,
            batch_size: 8,
            grad_accum: 1,
            steps: 1000,
            minutes: None,
            lr: 2e-4,
            embed_lr: None,
            loraplus_lr_ratio: 1.0,
            warmup_ratio: 0.05,
            schedule: Schedule::Cosine,
            weight_decay: 0.01,
            adam_beta1: AdamWConfig::default().beta1,
            adam_beta2: AdamWConfig::default().beta2,
            adam_epsilon: AdamWConfig::default().eps,
            max_grad_norm: 1.0,
            seed: 42,
            teacher: TeacherWeights::Auto,
            frozen_products: FrozenProducts::F32,
            hidden_distill_layer: None,
            row_map_rank: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecisionSection {
    /// fp32 | fp16 | bf16: the compute dtype and the storage of frozen weights.
    pub dtype: Dtype,
    /// linly | naive (GradScaler semantics, for comparison).
    pub scaler: Scaler,
    pub init_scale: f32,
    pub growth_interval: u32,
    pub hysteresis: u32,
    pub min_scale: f32,
    /// New vocabulary rows compute in f32 (default true). `false` is the DeepSpeed/GradScaler
    /// setup (everything in the low dtype), kept for the scaler benchmark.
    pub new_rows_f32: bool,
}

impl Default for PrecisionSection {
    fn default() -> Self {
        let d = ScalerConfig::default();
        PrecisionSection { dtype: Dtype::Fp32, scaler: Scaler::Linly, init_scale: d.init_scale, growth_interval: d.growth_interval, hysteresis: d.hysteresis, min_scale: d.min_scale, new_rows_f32: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    #[serde(default = "n500")]
    pub save_every: usize,
    #[serde(default = "n2")]
    pub keep_last: usize,
    /// Score the `[[eval]]` files every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Draw the loss, eval and loss-scale PNGs at the end.
    #[serde(default = "yes")]
    pub plots: bool,
}

fn n500() -> usize {
    500
}
fn n2() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub path: PathBuf,
    #[serde(default)]
    pub name: Option<String>,
    /// A free label (`zh`, `en`) carried into metrics.jsonl and the eval plot's legend.
    /// Not serialized when absent, so recipes without it keep their resume hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    #[serde(default)]
    pub name: Option<String>,
    pub steps: usize,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub embed_lr: Option<f64>,
    /// Whether LoRA trains in this stage.
    #[serde(default)]
    pub lora: Option<bool>,
    #[serde(default)]
    pub trainable: Option<TrainableSection>,
}

/// `[precision] dtype`. `f32` and `f16` are kept apart from `fp32` and `fp16` (rather than
/// serde aliases) so that a recipe serializes as it was written: the resume check hashes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    F32,
    Fp16,
    F16,
    Bf16,
}

impl Dtype {
    pub fn float_type(self) -> FloatType {
        match self {
            Dtype::Fp32 | Dtype::F32 => FloatType::F32,
            Dtype::Fp16 | Dtype::F16 => FloatType::F16,
            Dtype::Bf16 => FloatType::BF16,
        }
    }
}

/// `[precision] scaler`: the recipe's spelling of a [`ScalerKind`] (whose own serde names are
/// part of the checkpoint format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaler {
    /// Group-aware, floored (this crate's).
    Linly,
    /// torch.cuda.amp.GradScaler semantics, for comparison.
    Naive,
}

/// A stage resolved against the recipe's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub steps: usize,
    pub lr: f64,
    pub embed_lr: f64,
    pub lora: bool,
    pub embed: TableMode,
    pub head: TableMode,
}

impl Recipe {
    /// Parses and checks a recipe. Nothing is loaded or trained here.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("recipe {}", path.display()))
    }

    pub fn parse(text: &str, root: &Path) -> Result<Self> {
        let mut r: Recipe = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        r.root = root.to_path_buf();
        r.check()?;
        Ok(r)
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.root.join(p) }
    }

    /// Every number in the recipe against its range, before files or anything else: TOML reads
    /// `nan` and `inf` as floats, and a NaN learning rate trains without a single error into an
    /// all-NaN adapter. Integer keys are typed, so TOML itself refuses NaN or negatives there.
    fn check_numbers(&self) -> Result<()> {
        use Range::*;
        let t = &self.train;
        let p = &self.precision;
        let mut keys: Vec<(String, f64, Range)> = vec![
            ("[lora] alpha".into(), self.lora.alpha, Positive),
            ("[lora] dropout".into(), self.lora.dropout, Fraction),
            ("[train] lr".into(), t.lr, Positive),
            ("[train] loraplus_lr_ratio".into(), t.loraplus_lr_ratio, Positive),
            ("[train] warmup_ratio".into(), t.warmup_ratio, Fraction),
            ("[train] weight_decay".into(), t.weight_decay, NonNegative),
            ("[train] max_grad_norm".into(), t.max_grad_norm, NonNegative),
            ("[train] adam_beta1".into(), t.adam_beta1, Fraction),
            ("[train] adam_beta2".into(), t.adam_beta2, Fraction),
            ("[train] adam_epsilon".into(), t.adam_epsilon, Positive),
            ("[precision] init_scale".into(), p.init_scale as f64, Positive),
            ("[precision] min_scale".into(), p.min_scale as f64, NonNegative),
        ];
        keys.extend(t.embed_lr.map(|x| ("[train] embed_lr".into(), x, NonNegative)));
        keys.extend(t.minutes.map(|x| ("[train] minutes".into(), x, Positive)));
        if let Some(v) = &self.vocab {
            keys.extend(v.init_std.map(|x| ("[vocab] init_std".into(), x as f64, NonNegative)));
            keys.extend(v.init_tokens.map(|x| ("[vocab] init_tokens".into(), x as f64, Positive)));
        }
        for (i, d) in self.data.iter().enumerate() {
            keys.push((format!("[[data]] #{} self_distill", i + 1), d.self_distill, NonNegative));
            keys.push((format!("[[data]] #{} chain_distill", i + 1), d.chain_distill, NonNegative));
            keys.push((format!("[[data]] #{} hidden_distill", i + 1), d.hidden_distill, NonNegative));
            let weights: &[f64] = match &d.weight {
                crate::data::Weight::Fixed(w) => std::slice::from_ref(w),
                crate::data::Weight::Ramp(r) => r,
            };
            keys.extend(weights.iter().map(|&w| (format!("[[data]] #{} weight", i + 1), w, NonNegative)));
            keys.extend(d.limit.map(|n| (format!("[[data]] #{} limit", i + 1), n as f64, Positive)));
        }
        for (i, st) in self.stage.iter().enumerate() {
            keys.extend(st.lr.map(|x| (format!("[[stage]] #{} lr", i + 1), x, Positive)));
            keys.extend(st.embed_lr.map(|x| (format!("[[stage]] #{} embed_lr", i + 1), x, NonNegative)));
        }
        for (key, v, range) in keys {
            range.check(&key, v)?;
        }
        // Sizes that are allocated (a batch is batch_size × seq_len tokens, a step holds
        // grad_accum of them, bucketed mixing one slot per bin): bounded, so that a typo cannot
        // ask for terabytes or overflow, and the error comes before any output exists.
        let sizes = [
            ("[train] seq_len", t.seq_len, MAX_SEQ_LEN),
            ("[train] batch_size", t.batch_size, MAX_BATCH),
            ("[train] grad_accum", t.grad_accum, MAX_BATCH),
            ("[mix] bins", self.mix.bins.unwrap_or(0), MAX_BINS),
        ];
        for (key, v, max) in sizes {
            if v > max {
                bail!("{key} = {v}: must be at most {max}");
            }
        }
        if t.seq_len * t.batch_size > MAX_BATCH_TOKENS {
            bail!(
                "[train] batch_size × seq_len = {} tokens per micro-batch: must be at most {MAX_BATCH_TOKENS}; use grad_accum for larger batches",
                t.seq_len * t.batch_size
            );
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        self.check_numbers()?;
        for (i, d) in self.data.iter().enumerate() {
            d.check().with_context(|| format!("[[data]] #{}", i + 1))?;
        }
        let must_exist = |key: &str, p: &Path| -> Result<()> {
            let full = self.resolve(p);
            if !full.exists() {
                bail!("{key} = {:?}: {} does not exist (paths are relative to the recipe's folder)", p, full.display());
            }
            Ok(())
        };
        if self.train.minutes.is_some() && !self.stage.is_empty() {
            bail!("[train] minutes with [[stage]]: a time budget plans the steps of one stage; give each [[stage]] its steps, or drop the stages");
        }
        must_exist("[model] path", &self.model.path)?;
        if let Some(t) = self.vocab.as_ref().and_then(|v| v.init_text.as_ref()) {
            must_exist("[vocab] init_text", t)?;
        }
        if self.vocab.as_ref().is_some_and(|v| v.init == InitMethod::Fit) {
            bail!("[vocab] init = \"fit\" trains the new rows in a run of its own: run `linly-lora vocab resize --init fit --init-text FILE` first and point [model] path at its output (a resized model trains without an in-run resize)");
        }
        if !self.resolve(&self.model.path).join("config.json").exists() {
            bail!("[model] path = {:?}: no config.json there; point it at an HF model folder (for GGUF, run `linly-lora import gguf` first)", self.model.path);
        }
        if let Some(t) = &self.model.tokenizer {
            must_exist("[model] tokenizer", t)?;
        }
        crate::device::parse(&self.model.device).context("[model] device")?;
        if let Some(v) = &self.vocab {
            match (&v.extension, &v.add) {
                (Some(e), None) => must_exist("[vocab] extension", e)?,
                (None, Some(a)) => must_exist("[vocab] add", a)?,
                (Some(_), Some(_)) => bail!("[vocab]: give either `extension` or `add`, not both"),
                (None, None) => bail!("[vocab]: give `extension = \"vocab_extension.json\"` or `add = \"words.txt\"`"),
            }
        }
        let l = &self.lora;
        if l.r == 0 {
            bail!("[lora] r = 0: the rank must be at least 1 (use `enabled = false` to train no LoRA)");
        }
        if !(0.0..1.0).contains(&l.dropout) {
            bail!("[lora] dropout = {}: must be in [0, 1)", l.dropout);
        }
        if l.alpha <= 0.0 {
            bail!("[lora] alpha = {}: must be positive", l.alpha);
        }
        for t in &l.targets {
            if !crate::lora::config::TARGETS.contains(&t.as_str()) {
                bail!("[lora] targets: `{t}` is not a projection; choose from {:?}", crate::lora::config::TARGETS);
            }
        }
        if l.targets.is_empty() && l.enabled {
            bail!("[lora] targets is empty; list projections or set `enabled = false`");
        }
        if let Some(p) = &l.init_from {
            must_exist("[lora] init_from", p)?;
            if !self.resolve(p).join("adapter_config.json").exists() {
                bail!("[lora] init_from = {:?}: no adapter_config.json there; point it at a PEFT adapter folder", p);
            }
            // The run saves its adapter with [lora]'s r and alpha, while the branches it trains
            // are the ones loaded from init_from: the two must agree, or the saved scale is wrong.
            let c = crate::lora::config::AdapterConfig::load(&self.resolve(p)).with_context(|| format!("[lora] init_from = {p:?}"))?;
            if c.r != l.r || c.lora_alpha != l.alpha || c.use_rslora != l.rslora {
                bail!(
                    "[lora] init_from = {:?} holds r = {}, alpha = {}, rslora = {}, but [lora] says r = {}, alpha = {}, rslora = {}: set [lora] to the adapter's values (training continues its branches as they are)",
                    p, c.r, c.lora_alpha, c.use_rslora, l.r, l.alpha, l.rslora
                );
            }
        }
        if self.data.is_empty() {
            bail!("no [[data]] blocks: add at least one, e.g. [[data]] kind = \"text\" path = \"zh.txt\"");
        }
        for (i, d) in self.data.iter().enumerate() {
            must_exist(&format!("[[data]] #{} path", i + 1), &d.path)?;
        }
        if let Some((i, _)) = self.data.iter().enumerate().find(|(_, d)| d.chain_distill > 0.0) {
            if self.vocab.is_none() {
                bail!("[[data]] #{} chain_distill: distils the base's probability of the *new* pieces, so it needs a [vocab] extension; without one use self_distill", i + 1);
            }
            let mut modes = std::iter::once(&self.trainable).chain(self.stage.iter().filter_map(|s| s.trainable.as_ref()));
            if modes.any(|t| t.embed_tokens == TableMode::All || t.lm_head == TableMode::All) {
                bail!("[[data]] #{} chain_distill: the teacher is the model with LoRA off, which is the base only while the old rows stay fixed; set [trainable] embed_tokens and lm_head (and every [[stage]]'s) to \"new_rows\" or \"frozen\"", i + 1);
            }
        }
        if let Some((i, _)) = self.data.iter().enumerate().find(|(_, d)| d.hidden_distill > 0.0 && d.chain_distill <= 0.0) {
            bail!("[[data]] #{} hidden_distill: the base's hidden states come from chain_distill's teacher pass; set chain_distill on this block too (e.g. chain_distill = 3.0)", i + 1);
        }
        if self.train.hidden_distill_layer == Some(0) {
            bail!("[train] hidden_distill_layer = 0: the stream is compared after 1 to the model's layer count of layers");
        }
        if self.train.row_map_rank > 0 {
            if self.vocab.is_none() {
                bail!("[train] row_map_rank = {}: the map reads each new row's spelling in the base vocabulary, which a [vocab] extension gives; add [vocab] extension = \"…/vocab_extension.json\" or remove the key", self.train.row_map_rank);
            }
            let mut modes = std::iter::once(&self.trainable).chain(self.stage.iter().filter_map(|s| s.trainable.as_ref()));
            if !modes.any(|t| t.embed_tokens == TableMode::NewRows || t.lm_head == TableMode::NewRows) {
                bail!("[train] row_map_rank = {}: the map moves the new rows, which train only with [trainable] embed_tokens or lm_head = \"new_rows\"; set one of them, or remove the key", self.train.row_map_rank);
            }
        }
        if self.mix.bucketed && self.mix.bins.unwrap_or(0) < 1 {
            bail!("[mix] bucketed = true needs `bins` ≥ 1");
        }
        let t = &self.train;
        if t.seq_len < 8 {
            bail!("[train] seq_len = {}: must be at least 8", t.seq_len);
        }
        for (key, v) in [("batch_size", t.batch_size), ("grad_accum", t.grad_accum)] {
            if v == 0 {
                bail!("[train] {key} = 0: must be at least 1");
            }
        }
        if t.lr <= 0.0 || t.embed_lr.is_some_and(|x| x < 0.0) {
            bail!("[train] lr must be positive (embed_lr ≥ 0)");
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            bail!("[train] warmup_ratio = {}: must be in [0, 1)", t.warmup_ratio);
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            bail!("[train] weight_decay and max_grad_norm must be ≥ 0 (max_grad_norm 0 = no clipping)");
        }
        if self.stage.is_empty() && t.steps == 0 {
            bail!("[train] steps = 0: train at least one step");
        }
        self.scaler()?;
        let o = &self.output;
        for (key, v) in [("save_every", o.save_every), ("keep_last", o.keep_last)] {
            if v == 0 {
                bail!("[output] {key} = 0: must be at least 1");
            }
        }
        for (i, e) in self.eval.iter().enumerate() {
            must_exist(&format!("[[eval]] #{} path", i + 1), &e.path)?;
        }
        for (i, s) in self.stage.iter().enumerate() {
            if s.steps == 0 {
                bail!("[[stage]] #{} steps = 0: every stage trains at least one step", i + 1);
            }
        }
        self.total_steps()?;
        Ok(())
    }

    pub fn dtype(&self) -> FloatType {
        self.precision.dtype.float_type()
    }

    pub fn scaler(&self) -> Result<ScalerConfig> {
        let p = &self.precision;
        let base = match p.scaler {
            Scaler::Linly => ScalerConfig::default(),
            Scaler::Naive => ScalerConfig::naive(),
        };
        if !(p.init_scale.is_finite() && p.init_scale > 0.0) {
            bail!("[precision] init_scale = {}: must be a finite number above 0", p.init_scale);
        }
        if p.growth_interval == 0 {
            bail!("[precision] growth_interval = 0: must be at least 1");
        }
        let mut c = ScalerConfig { init_scale: p.init_scale, growth_interval: p.growth_interval, ..base };
        if c.kind == ScalerKind::Linly {
            c.hysteresis = p.hysteresis.max(1);
            c.min_scale = p.min_scale;
        }
        // Only fp16 needs scaling; bf16 and fp32 have fp32's range.
        if self.dtype() != FloatType::F16 {
            c.init_scale = 1.0;
            c.growth_interval = u32::MAX;
        }
        Ok(c)
    }

    /// The training stages: the `[[stage]]` blocks, or one stage from `[train]` and `[trainable]`.
    pub fn stages(&self) -> Result<Vec<Stage>> {
        let t = &self.train;
        let embed_lr = t.embed_lr.unwrap_or(t.lr);
        let (base_embed, base_head) = (self.trainable.embed_tokens, self.trainable.lm_head);
        if self.stage.is_empty() {
            return Ok(vec![Stage { name: "train".into(), steps: t.steps, lr: t.lr, embed_lr, lora: self.lora.enabled, embed: base_embed, head: base_head }]);
        }
        self.stage
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (embed, head) = match &s.trainable {
                    Some(tr) => (tr.embed_tokens, tr.lm_head),
                    None => (base_embed, base_head),
                };
                let lora = s.lora.unwrap_or(self.lora.enabled);
                if lora && !self.lora.enabled {
                    bail!("[[stage]] #{} lora = true but [lora] enabled = false", i + 1);
                }
                if !lora && embed == TableMode::Frozen && head == TableMode::Frozen {
                    bail!("[[stage]] #{}: nothing trains (no LoRA, both tables frozen)", i + 1);
                }
                Ok(Stage { name: s.name.clone().unwrap_or(format!("stage{}", i + 1)), steps: s.steps, lr: s.lr.unwrap_or(t.lr), embed_lr: s.embed_lr.or(t.embed_lr).unwrap_or(s.lr.unwrap_or(t.lr)), lora, embed, head })
            })
            .collect()
    }

    /// Steps of all stages; an error when they do not add up in a `usize`.
    pub fn total_steps(&self) -> Result<usize> {
        self.stages()?
            .iter()
            .try_fold(0usize, |n, s| n.checked_add(s.steps))
            .with_context(|| format!("[[stage]] steps add up to more than {}", usize::MAX))
    }
}

/// Upper bounds for recipe sizes that are allocated (see `check_numbers`).
pub const MAX_SEQ_LEN: usize = 1 << 20;
pub const MAX_BATCH: usize = 1 << 16;
pub const MAX_BATCH_TOKENS: usize = 1 << 24;
pub const MAX_BINS: usize = 1 << 20;

/// What a numeric recipe key may hold; every range excludes NaN and ±inf.
#[derive(Debug, Clone, Copy)]
enum Range {
    /// > 0: learning rates, alpha, the initial loss scale.
    Positive,
    /// ≥ 0, where 0 means "off" or "frozen": weight decay, clipping, embed_lr.
    NonNegative,
    /// [0, 1): dropout, warmup_ratio, Adam's betas.
    Fraction,
}

impl Range {
    fn check(self, key: &str, v: f64) -> Result<()> {
        let (ok, want) = match self {
            Range::Positive => (v > 0.0, "a finite number above 0"),
            Range::NonNegative => (v >= 0.0, "a finite number ≥ 0"),
            Range::Fraction => ((0.0..1.0).contains(&v), "a number in [0, 1)"),
        };
        if !(ok && v.is_finite()) {
            bail!("{key} = {v}: must be {want}; see recipes/README.md for typical values");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The modes keep their spellings through serde (the resume check hashes the serialized
    /// recipe), and a misspelling is refused with the choices.
    #[test]
    fn modes_serialize_as_written_and_misspellings_list_the_choices() {
        for d in ["fp32", "f32", "fp16", "f16", "bf16"] {
            let p: PrecisionSection = toml::from_str(&format!("dtype = \"{d}\"")).unwrap();
            assert_eq!(serde_json::to_value(p.dtype).unwrap(), d);
        }
        for m in InitMethod::ALL {
            let v: VocabSection = toml::from_str(&format!("init = \"{m}\"")).unwrap();
            assert_eq!(v.init, m);
        }
        for (text, want) in [("auto", TeacherWeights::Auto), ("dense", TeacherWeights::Dense), ("q8_0", TeacherWeights::Q8_0)] {
            let t: TrainSection = toml::from_str(&format!("teacher = \"{text}\"")).unwrap();
            assert_eq!(t.teacher, want);
            // `auto` is not written, so the hash of a recipe without the key is unchanged.
            assert_eq!(serde_json::to_value(&t).unwrap().get("teacher").and_then(|v| v.as_str()), (want != TeacherWeights::Auto).then_some(text));
        }
        for (text, want) in [("f32", FrozenProducts::F32), ("bf16", FrozenProducts::Bf16), ("auto", FrozenProducts::Auto), ("int8", FrozenProducts::Int8)] {
            let t: TrainSection = toml::from_str(&format!("frozen_products = \"{text}\"")).unwrap();
            assert_eq!(t.frozen_products, want);
            assert_eq!(serde_json::to_value(&t).unwrap().get("frozen_products").and_then(|v| v.as_str()), (want != FrozenProducts::F32).then_some(text));
        }
        // Adam's constants: written only when set away from torch's defaults (so older
        // checkpoints' hashes hold), read back as written, and refused outside their ranges.
        let t: TrainSection = toml::from_str("").unwrap();
        let j = serde_json::to_value(&t).unwrap();
        assert!(["adam_beta1", "adam_beta2", "adam_epsilon", "loraplus_lr_ratio"].iter().all(|k| j.get(k).is_none()), "{j}");
        let t: TrainSection = toml::from_str("loraplus_lr_ratio = 4").unwrap();
        assert_eq!(serde_json::to_value(&t).unwrap()["loraplus_lr_ratio"].as_f64(), Some(4.0));
        let t: TrainSection = toml::from_str("adam_beta2 = 0.95\nadam_epsilon = 1e-6").unwrap();
        let (a, j) = (t.adam(), serde_json::to_value(&t).unwrap());
        assert_eq!((a.beta1, a.beta2, a.eps), (0.9, 0.95, 1e-6));
        assert_eq!((j.get("adam_beta1"), j["adam_beta2"].as_f64(), j["adam_epsilon"].as_f64()), (None, Some(0.95), Some(1e-6)));
        for (key, bad) in [("adam_beta1", "1.0"), ("adam_beta2", "-0.1"), ("adam_beta2", "nan"), ("adam_epsilon", "0.0"), ("loraplus_lr_ratio", "0.0"), ("loraplus_lr_ratio", "inf")] {
            let text = format!("[model]\npath = \"m\"\n[output]\ndir = \"o\"\n[train]\n{key} = {bad}");
            let e = Recipe::parse(&text, Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(&format!("[train] {key}")), "{key} = {bad}: {e}");
        }
        let t: TrainableSection = toml::from_str("embed_tokens = \"new_rows\"").unwrap();
        assert_eq!((t.embed_tokens, t.lm_head), (TableMode::NewRows, TableMode::All));
        for (text, want) in [
            ("[train]\nschedule = \"cosin\"", "cosine"),
            ("[precision]\ndtype = \"fp8\"", "bf16"),
            ("[precision]\nscaler = \"grad\"", "naive"),
            ("[lora]\ninit = \"xavier\"", "gaussian"),
            ("[trainable]\nlm_head = \"some\"", "new_rows"),
            ("[vocab]\ninit = \"zeros\"", "distill-head"),
            ("[train]\nteacher = \"q4_0\"", "q8_0"),
            ("[train]\nfrozen_products = \"f16\"", "bf16"),
        ] {
            let e = toml::from_str::<Recipe>(&format!("[model]\npath = \"m\"\n[output]\ndir = \"o\"\n{text}")).unwrap_err().to_string();
            let line = text.lines().last().unwrap();
            assert!(e.contains(line) && e.contains(want), "{text}: {e}");
        }
    }
}

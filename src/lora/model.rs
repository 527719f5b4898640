//! Putting fresh LoRA branches into a model and choosing which token rows train — PEFT's
//! `LoraModel` injection, for the one model definition.

use super::adapter::linears_mut;
use super::LoraBranch;
use crate::model::{Llama, TokenTable};
use anyhow::{bail, Result};
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

/// How A is initialised (B is always zero, so a fresh adapter changes nothing). The recipe's
/// `[lora] init` spellings are the serde names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// PEFT's default: kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in).
    Kaiming,
    /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r).
    Gaussian,
}

#[derive(Debug, Clone)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub init: LoraInit,
    pub seed: u64,
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// PEFT's kaiming-uniform(a=√5) bound for A: gain·√(3/fan_in) with gain = √(2/(1+5)).
pub fn kaiming_bound(fan_in: usize) -> f64 {
    (2.0f64 / 6.0).sqrt() * (3.0 / fan_in as f64).sqrt()
}

/// Adds one fresh LoRA branch to every targeted projection.
pub fn inject(model: &mut Llama, s: &LoraSettings, device: &Device) -> Result<()> {
    for t in &s.targets {
        if !super::config::TARGETS.contains(&t.as_str()) {
            bail!("unknown LoRA target `{t}`; choose from {:?}", super::config::TARGETS);
        }
    }
    // SplitMix, not `rand`'s StdRng: a seeded adapter must start the same after a dependency
    // update (StdRng's stream is not stable across `rand` releases).
    let mut rng = crate::rng::SplitMix::new(s.seed);
    for (path, lin) in linears_mut(model) {
        let target = path.rsplit('.').next().unwrap_or_default();
        if !s.targets.iter().any(|x| x == target) {
            continue;
        }
        let (out, inp) = (lin.out_features(), lin.in_features());
        let a: Vec<f32> = match s.init {
            LoraInit::Kaiming => {
                let b = kaiming_bound(inp);
                (0..s.r * inp).map(|_| ((2.0 * rng.unit() - 1.0) * b) as f32).collect()
            }
            LoraInit::Gaussian => {
                let std = 1.0 / s.r as f64;
                (0..s.r * inp).map(|_| (std * rng.normal()) as f32).collect()
            }
        };
        let a = Tensor::from_data(TensorData::new(a, [s.r, inp]), device);
        let b = Tensor::zeros([out, s.r], device);
        lin.lora.push(LoraBranch::new(a, b, s.scale(), s.dropout));
    }
    Ok(())
}

/// What trains in a token table. The recipe's `[trainable]` spellings are the serde names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableMode {
    Frozen,
    /// The whole table (PEFT `modules_to_save`).
    All,
    /// Only rows added by vocabulary extension (PEFT `trainable_token_indices`).
    NewRows,
}

fn retable(t: &TokenTable, mode: TableMode, old_vocab: usize) -> Result<TokenTable> {
    // Detached: at a stage switch the table's tensors belong to the last stage's graph, and a
    // new stage's parameters must be fresh leaves (libtorch refuses to track a non-leaf).
    let w = t.weight().detach();
    let master = |x: Tensor<2>| Param::from_tensor(x.cast(burn::tensor::FloatDType::F32)).set_require_grad(true);
    let [rows, hidden] = w.dims();
    // Old rows and new rows as they are stored: when the table already keeps the new rows
    // apart (a stage switch), take them from there, so their f32 masters are not rounded
    // through the joined table's (possibly f16) dtype.
    let split = || match &t.extra {
        Some(e) if t.base.val().dims()[0] == old_vocab => (t.base.val().detach(), e.val().detach()),
        _ => (w.clone().slice([0..old_vocab, 0..hidden]), w.clone().slice([old_vocab..rows, 0..hidden])),
    };
    Ok(match mode {
        TableMode::Frozen => TokenTable { base: Param::from_tensor(w).set_require_grad(false), extra: None, extra_f32: t.extra_f32, quant: None, packed: None },
        // In `all` mode the table still keeps new rows apart when there are any, so they keep
        // their f32 path (see TokenTable) and their own overflow group.
        TableMode::All if rows > old_vocab && old_vocab > 0 => {
            let (base, extra) = split();
            TokenTable { base: master(base), extra: Some(master(extra)), extra_f32: t.extra_f32, quant: None, packed: None }
        }
        TableMode::All => TokenTable { base: master(w), extra: None, extra_f32: t.extra_f32, quant: None, packed: None },
        TableMode::NewRows => {
            if rows <= old_vocab {
                bail!("new_rows: the table has {rows} rows, no more than the old vocabulary of {old_vocab}; extend the vocabulary first or use `all`");
            }
            let (base, extra) = split();
            TokenTable { base: Param::from_tensor(base).set_require_grad(false), extra: Some(master(extra)), extra_f32: t.extra_f32, quant: None, packed: None }
        }
    })
}

/// Sets what trains in the embedding and the head. A tied model stays tied when both tables
/// train the same way (one table, as `ensure_weight_tying`), and is untied when they differ.
pub fn set_table_modes(model: &mut Llama, embed: TableMode, head: TableMode, old_vocab: usize) -> Result<()> {
    if model.lm_head.is_none() && embed != head {
        model.lm_head = Some(retable(&model.embed_tokens, head, old_vocab)?);
        model.config.tie_word_embeddings = false;
    } else if let Some(h) = &model.lm_head {
        model.lm_head = Some(retable(h, head, old_vocab)?);
    }
    model.embed_tokens = retable(&model.embed_tokens, embed, old_vocab)?;
    Ok(())
}

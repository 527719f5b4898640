//! `adapter_config.json`, PEFT's LoRA configuration.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The projections LoRA can target, by PEFT module name.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `model.layers.N.self_attn.q_proj` → (N, "q_proj").
pub fn parse_module(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let name = rest.strip_prefix("self_attn.").or_else(|| rest.strip_prefix("mlp."))?;
    TARGETS.contains(&name).then_some((n, name))
}

/// PEFT's `trainable_token_indices`: one list for the embedding (and a tied head), or one per module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIndices {
    List(Vec<usize>),
    PerModule(BTreeMap<String, Vec<usize>>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub trainable_token_indices: Option<TokenIndices>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "causal")]
    pub task_type: Option<String>,
    /// Everything else PEFT writes, kept so a round trip loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}
fn causal() -> Option<String> {
    Some("CAUSAL_LM".into())
}

/// PEFT's `target_modules = "all-linear"`: every linear layer except the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// A string `target_modules` as PEFT reads it: `re.fullmatch(pattern, module_name)`. Python's
/// syntax, lookarounds included, hence fancy-regex (bounded nesting and backtracking, so a
/// hostile pattern is an error, not a hang).
fn target_regex(pat: &str) -> Result<fancy_regex::Regex> {
    let invalid = |e: fancy_regex::Error| anyhow::anyhow!("target_modules {pat:?} is not a valid regex: {e}");
    // Alone first, so that a pattern with unbalanced groups cannot escape the anchoring below.
    fancy_regex::Regex::new(pat).map_err(invalid)?;
    fancy_regex::Regex::new(&format!(r"\A(?:{pat})\z")).map_err(invalid)
}

/// PEFT accepts a list of names or a single regex string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(vec![])
    }
}

impl AdapterConfig {
    /// A fresh config as PEFT would write it for these settings.
    pub fn new(r: usize, alpha: f64, dropout: f64, rslora: bool, targets: &[String]) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("inference_mode".into(), true.into());
        extra.insert("init_lora_weights".into(), true.into());
        extra.insert("peft_version".into(), "0.21.0".into());
        AdapterConfig {
            peft_type: lora(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::List(targets.to_vec()),
            modules_to_save: None,
            trainable_token_indices: None,
            use_rslora: rslora,
            use_dora: false,
            fan_in_fan_out: false,
            bias: none(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
            task_type: causal(),
            extra,
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}: an adapter folder needs PEFT's adapter_config.json", p.display()))?;
        let c: AdapterConfig = serde_json::from_str(&text).with_context(|| format!("{} is not a valid PEFT adapter config", p.display()))?;
        c.check().with_context(|| format!("in {}", p.display()))?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if self.peft_type.to_uppercase() != "LORA" {
            bail!("peft_type `{}` is not supported; only LORA adapters", self.peft_type);
        }
        if self.use_dora {
            bail!("DoRA adapters (use_dora = true) are not supported");
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out = true (GPT-2 Conv1D layout) does not apply to LLaMA projections");
        }
        if self.bias != "none" {
            bail!("bias = `{}` is not supported; LLaMA projections have no bias (use bias = \"none\")", self.bias);
        }
        if self.r == 0 {
            bail!("r must be positive");
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            bail!("rank_pattern.{k} = 0: a rank must be at least 1");
        }
        if let TargetModules::Regex(pat) = &self.target_modules {
            target_regex(pat)?;
        }
        for (key, a) in std::iter::once(("lora_alpha".to_string(), self.lora_alpha)).chain(self.alpha_pattern.iter().map(|(k, a)| (format!("alpha_pattern.{k}"), *a))) {
            if !(a.is_finite() && a > 0.0) {
                bail!("{key} = {a} must be a finite number above 0");
            }
        }
        Ok(())
    }

    /// Checks that LoRA tensors of rank `rank` on `module` (`model.layers.N.self_attn.q_proj`)
    /// are what this config describes: the module among `target_modules` (a list: the name or
    /// its last components; a string: PEFT's full-match regex on the whole module name, or
    /// `all-linear`), its layer among `layers_to_transform`, its rank `r` or its `rank_pattern`
    /// entry. An adapter whose config disagrees with its tensors was edited or assembled by hand,
    /// and its scale (alpha / r) is then a guess.
    pub fn check_module(&self, module: &str, rank: usize) -> Result<()> {
        let matches = |pat: &str| module == pat || module.ends_with(&format!(".{pat}"));
        match &self.target_modules {
            TargetModules::List(list) => {
                if !list.iter().any(|t| matches(t)) {
                    bail!("`{module}` has LoRA weights but is not in target_modules {list:?}");
                }
            }
            // PEFT's shorthand for every linear layer but the output head: every projection.
            TargetModules::Regex(pat) if pat == ALL_LINEAR => {}
            TargetModules::Regex(pat) => {
                let found = target_regex(pat)?
                    .is_match(module)
                    .map_err(|e| anyhow::anyhow!("target_modules regex {pat:?} on `{module}`: {e}"))?;
                if !found {
                    bail!("`{module}` has LoRA weights but does not match target_modules {pat:?} (a regex that must match the whole module name)");
                }
            }
        }
        let layer = parse_module(module).map(|(n, _)| n);
        if let (Some(layers), Some(n)) = (self.extra.get("layers_to_transform"), layer) {
            let listed: Option<Vec<u64>> = match layers {
                serde_json::Value::Number(x) => x.as_u64().map(|x| vec![x]),
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64()).collect(),
                serde_json::Value::Null => None,
                other => bail!("layers_to_transform = {other} is neither a layer number nor a list of them"),
            };
            if let Some(listed) = listed {
                if !listed.contains(&(n as u64)) {
                    bail!("`{module}` has LoRA weights but its layer {n} is not in layers_to_transform {listed:?}");
                }
            }
        }
        let want = self.rank_pattern.iter().find(|(p, _)| matches(p)).map(|(_, r)| *r).unwrap_or(self.r);
        if rank != want {
            let source = if want == self.r { format!("r = {want}") } else { format!("rank_pattern gives {want}") };
            bail!("`{module}` has rank {rank} but {source}");
        }
        Ok(())
    }

    /// The scale for a module: `alpha/r` (or `alpha/√r` with rsLoRA), with PEFT's per-module
    /// `rank_pattern` / `alpha_pattern` overrides matched on the module name's suffix.
    pub fn scale_for(&self, module: &str, rank: usize) -> f64 {
        let matches = |pat: &str| module == pat || module.ends_with(&format!(".{pat}"));
        let alpha = self.alpha_pattern.iter().find(|(p, _)| matches(p)).map(|(_, a)| *a).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// Token rows trained in `new_rows` mode, for the embedding and the head.
    pub fn token_indices(&self, module: &str) -> Option<Vec<usize>> {
        match self.trainable_token_indices.as_ref()? {
            TokenIndices::List(v) => Some(v.clone()),
            TokenIndices::PerModule(m) => m.get(module).cloned(),
        }
    }

    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

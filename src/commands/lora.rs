//! `merge` and `adapter pack`.

use super::{write_out, Report, Written};
use crate::io::atomic::OutKind;
use crate::io::safetensors::FloatType;
use crate::lora::merge::{MergeOptions, MergeReport};
use crate::lora::save::PackReport;
use anyhow::{Context, Result};
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct MergeCommand {
    pub base: PathBuf,
    /// Applied in order (Chinese-LLaMA-Alpaca Plus style stacking).
    pub adapters: Vec<PathBuf>,
    pub out: PathBuf,
    pub force: bool,
    /// Storage dtype of the output (default: each tensor keeps the base's dtype).
    pub dtype: Option<FloatType>,
    pub tokenizer: Option<PathBuf>,
    /// Maximum shard size as written on the command line (`5GB`, `500MB`).
    pub shard_size: String,
    pub allow_vocab_padding: bool,
}

pub fn merge(o: &MergeCommand) -> Result<Written<MergeReport>> {
    let mut inputs = vec![o.base.clone()];
    inputs.extend(o.adapters.iter().cloned());
    inputs.extend(o.tokenizer.iter().cloned());
    let mut opts = MergeOptions {
        base: o.base.clone(),
        adapters: o.adapters.clone(),
        out: o.out.clone(),
        dtype: o.dtype,
        tokenizer: o.tokenizer.clone(),
        shard_size: crate::lora::merge::parse_size(&o.shard_size).context("--shard-size")?,
        allow_vocab_padding: o.allow_vocab_padding,
    };
    let report = write_out(&o.out, &inputs, o.force, OutKind::Folder, |staged| {
        opts.out = staged.to_path_buf();
        crate::lora::merge::merge(&opts)
    })?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<MergeReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "merged {} LoRA pairs into {} tensors ({} shard(s), vocab {}, tied {}) -> {}",
            r.lora_pairs_merged,
            r.tensors,
            r.shards,
            r.vocab_size,
            r.tie_word_embeddings,
            self.out.display()
        )
    }
}

impl Report for Written<MergeReport> {}

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub adapter: PathBuf,
    pub out: PathBuf,
    pub dtype: FloatType,
    /// Lower the LoRA pairs to this rank (`lora::save::pack`).
    pub rank: Option<usize>,
    pub force: bool,
}

pub fn pack(o: &PackOptions) -> Result<Written<PackReport>> {
    let report = write_out(&o.out, std::slice::from_ref(&o.adapter), o.force, OutKind::Folder, |staged| crate::lora::save::pack(&o.adapter, staged, o.dtype, o.rank))?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<PackReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "packed {} tensors: {:.1} MB -> {:.1} MB{}{} -> {}",
            r.tensors,
            r.bytes_in as f64 / 1e6,
            r.bytes_out as f64 / 1e6,
            if r.deduplicated_head { " (tied lm_head stored once)" } else { "" },
            match &r.rank_cut {
                Some(c) => format!(
                    "; rank {} -> {} on {} pairs, left out {:.2} % of an update's energy (median; worst pair {:.2} %)",
                    c.from,
                    c.to,
                    c.pairs,
                    100.0 * c.dropped_energy_median,
                    100.0 * c.dropped_energy_max
                ),
                None => String::new(),
            },
            self.out.display()
        )
    }
}

impl Report for Written<PackReport> {}

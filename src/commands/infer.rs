//! `eval`, `generate` and `chat`.

use super::Report;
use crate::infer::eval::EvalReport;
use crate::infer::generate::{self, GenerateOptions};
use crate::infer::sample::SamplingParams;
use crate::infer::{self as engine, chat, ModelSpec};
use anyhow::{anyhow, Result};
use std::fmt;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// What `eval` scores.
#[derive(Debug, Clone)]
pub enum EvalInput {
    /// A UTF-8 text (needs a tokenizer; bits/char are reported too).
    Text(PathBuf),
    /// Token ids: safetensors with int64 `input_ids` [B, T], or JSONL of id arrays.
    Ids(PathBuf),
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub spec: ModelSpec,
    pub input: EvalInput,
    /// Window length for long inputs (default: the model's context).
    pub window: Option<usize>,
    /// Keep the report's per-token scores (`EvalReport::per_token`).
    pub per_token: bool,
}

pub fn eval(o: &EvalOptions) -> Result<EvalReport> {
    // Every window allocates and frees logits of the same size (see `heap`).
    crate::heap::reuse_large_buffers();
    let loaded = engine::load(&o.spec)?;
    let mut r = match &o.input {
        EvalInput::Text(t) => engine::eval::eval_text(&loaded, &crate::tokenizer::read_text(t)?, o.window),
        EvalInput::Ids(i) => engine::eval::eval_ids(&loaded, &engine::read_ids_file(i)?, o.window),
    }?;
    if !o.per_token {
        r.per_token = None;
    }
    Ok(r)
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokens scored: {}\nmean NLL:      {:.6} nats/token\nperplexity:    {:.4}", self.tokens, self.mean_nll, self.perplexity)?;
        if let (Some(c), Some(b)) = (self.chars, self.bits_per_char) {
            write!(f, "\ncharacters:    {c}\nbits/char:     {b:.6}")?;
        }
        if let Some(sp) = &self.by_vocab {
            for (name, p) in [("base-vocabulary targets", &sp.base), ("added-token targets", &sp.added)] {
                let share = p.bits_per_char.map(|b| format!(", {b:.4} bits/char")).unwrap_or_default();
                write!(f, "\n{name}: {} tokens, {:.4} nats/token{share}", p.tokens, p.mean_nll)?;
            }
        }
        Ok(())
    }
}

impl Report for EvalReport {}

/// The sampling flags as given. Sampling is on only when one of temperature, top-p or top-k is
/// given (and `greedy` is not): a bare `generate` should be reproducible without a seed.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub greedy: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f32,
    pub seed: u64,
    pub no_cache: bool,
    pub kv: crate::model::KvType,
}

impl Sampling {
    pub fn options(&self) -> GenerateOptions {
        let sampling_requested = self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some();
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                greedy: self.greedy || !sampling_requested,
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            no_cache: self.no_cache,
            stop_ids: vec![],
            kv: self.kv,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, encoded with the model's tokenizer.
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerateCommand {
    pub spec: ModelSpec,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// Print the prompt and generated ids after the text.
    pub print_ids: bool,
}

/// What `generate` prints after the streamed text: the ids, when asked for or when there is
/// no tokenizer to show text with (empty otherwise).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateReport {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    #[serde(skip)]
    pub show_ids: bool,
}

impl fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.show_ids {
            let j = |v: &[u32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
            write!(f, "prompt_ids: {}\ngenerated_ids: {}", j(&self.prompt_ids), j(&self.generated_ids))?;
        }
        Ok(())
    }
}

impl Report for GenerateReport {}

/// Streams the prompt (when it is text) and the continuation into `out` as it is produced.
pub fn generate(o: &GenerateCommand, out: &mut dyn Write) -> Result<GenerateReport> {
    let loaded = engine::load(&o.spec)?;
    let mut opts = o.sampling.options();
    opts.stop_ids = generate::default_stop_ids(&loaded);
    let prompt = match &o.prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(p) => generate::text_prompt(&loaded, p)?,
    };
    if let (Some(_), Prompt::Text(p)) = (&loaded.tok, &o.prompt) {
        write!(out, "{p}")?;
    }
    let new = generate::stream(&loaded, &prompt, &opts, out)?;
    writeln!(out)?;
    let context = loaded.model.config.max_position_embeddings;
    let ended_on_stop = new.last().is_some_and(|id| opts.stop_ids.contains(id));
    if prompt.len() + new.len() >= context && new.len() < opts.max_new_tokens && !ended_on_stop {
        eprintln!("generation stopped after {} new tokens: the model's context of {context} tokens is full", new.len());
    }
    Ok(GenerateReport { prompt_ids: prompt, generated_ids: new, show_ids: o.print_ids || loaded.tok.is_none() })
}

#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub spec: ModelSpec,
    /// Default: chatml if the tokenizer has <|im_start|>, else alpaca.
    pub template: Option<chat::Template>,
    pub system: Option<String>,
    pub sampling: Sampling,
}

/// The REPL over `input` and `out` until `/quit` or end of input.
pub fn chat(o: &ChatOptions, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let loaded = engine::load(&o.spec)?;
    let tok = loaded.tok.as_ref().ok_or_else(|| anyhow!("chat needs a tokenizer.json in the model folder (or --tokenizer)"))?;
    let template = o.template.unwrap_or_else(|| chat::default_template(tok));
    chat::repl(&loaded, template, o.system.as_deref(), &o.sampling.options(), input, out)
}

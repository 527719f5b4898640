//! Autoregressive decoding with the KV cache (or, for checking the cache, without it).

use super::ids_tensor;
use super::sample::{Sampler, SamplingParams};
use crate::model::Llama;
use anyhow::{bail, Result};
use burn::tensor::{Device, FloatDType, Tensor};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Recompute the whole prefix every step instead of using the KV cache.
    pub no_cache: bool,
    /// Generation ends after emitting any of these.
    pub stop_ids: Vec<u32>,
}

/// The last position's logits as host f32.
pub fn last_logits(logits: Tensor<3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits.slice([0..1, t - 1..t, 0..v]).cast(FloatDType::F32).try_into_vec_as::<f32>().expect("f32 logits")
}

/// Generates after `prompt`; `on_token` sees each new id as it is chosen and may return
/// `false` to stop. Returns the new ids (the stop id included when one ended generation).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &Device,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt is empty: generation needs at least one token (e.g. BOS)");
    }
    let vocab = model.vocab_size() as u32;
    if let Some(bad) = prompt.iter().find(|&&x| x >= vocab) {
        bail!("prompt token id {bad} is outside the model's vocabulary of {vocab}");
    }
    let ctx = model.config.max_position_embeddings;
    if prompt.len() >= ctx {
        bail!("the prompt has {} tokens but the model's context is {ctx}", prompt.len());
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut all = prompt.to_vec();
    let mut out = Vec::new();
    let mut cache = if opts.no_cache { None } else { Some(model.new_cache()) };
    let mut pending: Vec<u32> = prompt.to_vec();
    while out.len() < opts.max_new_tokens && all.len() < ctx {
        let logits = match cache.as_mut() {
            Some(c) => model.forward(ids_tensor(&pending, device), Some(c)),
            None => model.forward(ids_tensor(&all, device), None),
        };
        let mut last = last_logits(logits);
        let id = sampler.next(&mut last, &all);
        all.push(id);
        out.push(id);
        pending = vec![id];
        let go_on = on_token(id)?;
        if !go_on || opts.stop_ids.contains(&id) {
            break;
        }
    }
    Ok(out)
}

/// Tokenizes a plain-text prompt: special tokens as the tokenizer adds them, and the model's BOS
/// first when the tokenizer normally adds it.
pub fn text_prompt(loaded: &super::Loaded, text: &str) -> Result<Vec<u32>> {
    let tok = loaded.tok.as_ref().ok_or_else(|| anyhow::anyhow!("a text prompt needs a tokenizer.json in the model folder (or --tokenizer); use --prompt-ids"))?;
    let mut ids = tok.encode(text, true)?;
    if let Some(bos) = loaded.model.config.bos_token_id {
        if ids.first() != Some(&bos) && tok.adds_bos(bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// The model's EOS ids plus the tokenizer's end-of-text markers.
pub fn default_stop_ids(loaded: &super::Loaded) -> Vec<u32> {
    let mut v = loaded.model.config.eos_token_ids.clone();
    if let Some(tok) = &loaded.tok {
        v.extend(["</s>", "<|endoftext|>", "<|eot_id|>"].iter().filter_map(|p| tok.token_id(p)));
    }
    v.sort();
    v.dedup();
    v
}

/// Generates and writes the new text to `out` as it becomes printable (nothing when the model
/// has no tokenizer). Stop ids are not printed. Returns the new ids.
pub fn stream(loaded: &super::Loaded, prompt: &[u32], opts: &GenerateOptions, out: &mut dyn std::io::Write) -> Result<Vec<u32>> {
    let mut dec = crate::tokenizer::StreamDecoder::new();
    generate(&loaded.model, prompt, opts, &loaded.device, |id| {
        if let Some(tok) = &loaded.tok {
            if !opts.stop_ids.contains(&id) {
                if let Some(s) = dec.push(tok, id)? {
                    write!(out, "{s}")?;
                    out.flush()?;
                }
            }
        }
        Ok(true)
    })
}

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

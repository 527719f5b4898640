//! Autoregressive decoding with the KV cache (or, for checking the cache, without it).

use super::ids_tensor;
use super::sample::{Sampler, SamplingParams};
use crate::model::{KvCache, Llama};
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
    /// How the KV cache stores keys and values (f32: exact; f16: half the bytes to read).
    pub kv: crate::model::KvType,
}

/// The last position's logits as host f32.
pub fn last_logits(logits: Tensor<3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits.slice([0..1, t - 1..t, 0..v]).cast(FloatDType::F32).try_into_vec_as::<f32>().expect("f32 logits")
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop id was emitted.
    Stop,
    /// `max_new_tokens` or the model's context was reached.
    Length,
}

/// One generation advanced a token at a time: the prefill is the first [`Stepper::step`], each
/// later step feeds the previous token through the KV cache. [`generate`] is a loop over it, so
/// a caller that interleaves several steppers on one model (the server) makes exactly the same
/// forward calls per sequence as `generate` and gets the same tokens.
pub struct Stepper {
    sampler: Sampler,
    all: Vec<u32>,
    prompt_len: usize,
    cache: Option<KvCache>,
    pending: Vec<u32>,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    finish: Option<Finish>,
}

impl Stepper {
    /// Checks the prompt against the model and prepares an empty cache.
    pub fn new(model: &Llama, prompt: &[u32], opts: &GenerateOptions) -> Result<Self> {
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
        Ok(Stepper {
            sampler: Sampler::new(opts.sampling.clone()),
            all: prompt.to_vec(),
            prompt_len: prompt.len(),
            cache: if opts.no_cache { None } else { Some(model.new_cache_of(opts.kv)) },
            pending: prompt.to_vec(),
            max_new_tokens: opts.max_new_tokens,
            stop_ids: opts.stop_ids.clone(),
            finish: None,
        })
    }

    /// Runs one forward pass and returns the chosen id, or `None` once generation has ended
    /// (see [`Stepper::finish`]). A stop id is returned, then the next call yields `None`.
    pub fn step(&mut self, model: &Llama, device: &Device) -> Option<u32> {
        if self.ended(model) {
            return None;
        }
        // The forward pass runs on a rayon worker (`scope` moves it there when the caller is not
        // one): a matrix product started from a worker shares the work with the other workers
        // and takes part itself, while one started from outside the pool parks the caller and
        // wakes it again, twice per product — 200+ times per token.
        let (cache, pending, all) = (self.cache.as_mut(), &self.pending, &self.all);
        let logits = rayon::scope(|_| match cache {
            Some(c) => model.forward_last(ids_tensor(pending, device), Some(c)),
            None => model.forward_last(ids_tensor(all, device), None),
        });
        Some(self.choose(&mut last_logits(logits)))
    }

    /// Whether generation has ended; it ends here (as [`Finish::Length`]) when the answer or
    /// the context is full. [`Self::step`] asks this first.
    pub fn ended(&mut self, model: &Llama) -> bool {
        if self.finish.is_some() {
            return true;
        }
        if self.generated().len() >= self.max_new_tokens || self.all.len() >= model.config.max_position_embeddings {
            self.finish = Some(Finish::Length);
            return true;
        }
        false
    }

    /// For a caller that runs the forward passes itself ([`Llama::forward_batch`]): the ids
    /// not yet fed (the prompt, or what is left of it, else the last chosen id) and the cache
    /// they continue; `None` without a cache (`no_cache`: use [`Self::step`]).
    pub fn input(&mut self) -> Option<(&[u32], &mut KvCache)> {
        Some((&self.pending, self.cache.as_mut()?))
    }

    /// The first `n` ids of [`Self::input`] were fed. Once all are, `logits` (the last fed
    /// position's, `[vocab]`) choose the next id, as [`Self::step`] does with its own pass.
    pub fn fed(&mut self, n: usize, logits: Option<&mut [f32]>) -> Option<u32> {
        self.pending.drain(..n);
        if !self.pending.is_empty() {
            return None;
        }
        let logits = logits.expect("the logits of the last pending id");
        Some(self.choose(logits))
    }

    /// The ids the next forward pass feeds.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// Positions held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map(|c| c.len()).unwrap_or(0)
    }

    fn choose(&mut self, logits: &mut [f32]) -> u32 {
        let id = self.sampler.next(logits, &self.all);
        self.all.push(id);
        self.pending = vec![id];
        if self.stop_ids.contains(&id) {
            self.finish = Some(Finish::Stop);
        }
        id
    }

    /// Ends the generation early (the caller stopped it, e.g. on a stop string).
    pub fn stop(&mut self) {
        self.finish.get_or_insert(Finish::Stop);
    }

    /// `Some` once generation has ended.
    pub fn finish(&self) -> Option<Finish> {
        self.finish
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The new ids so far (a stop id included when one ended generation).
    pub fn generated(&self) -> &[u32] {
        &self.all[self.prompt_len..]
    }
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
    let mut s = Stepper::new(model, prompt, opts)?;
    while let Some(id) = s.step(model, device) {
        if !on_token(id)? {
            break;
        }
    }
    Ok(s.generated().to_vec())
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

//! Scoring text or ids: mean next-token NLL, perplexity and bits per character.
//!
//! bits/char (total NLL in bits ÷ characters) is what compares models whose tokenizers differ,
//! which is the whole point of vocabulary extension: per-token perplexity rewards a tokenizer
//! for cutting text into more, easier pieces.

use super::{ids_tensor, Loaded};
use crate::model::Llama;
use anyhow::{bail, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Positions scored.
    pub tokens: usize,
    /// Nats per token.
    pub mean_nll: f64,
    pub perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chars: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_char: Option<f64>,
    pub sequences: usize,
    /// Total NLL in nats.
    pub total_nll: f64,
}

/// Sum of −log p(ids[t] | ids[..t]) for t in `from..ids.len()`, with `ids` fitting the context.
fn window_nll(model: &Llama, ids: &[u32], from: usize, device: &burn::tensor::Device) -> f64 {
    let t = ids.len();
    let logits = model.forward(ids_tensor(ids, device), None).cast(burn::tensor::FloatDType::F32);
    let v = logits.dims()[2];
    // Position p predicts ids[p+1]; we need p in from-1 .. t-1.
    let n = t - from;
    let logp = log_softmax(logits.slice([0..1, from - 1..t - 1, 0..v]), 2);
    let targets: Vec<i64> = ids[from..].iter().map(|&x| x as i64).collect();
    let idx: Tensor<3, Int> = Tensor::from_data(TensorData::new(targets, [1, n, 1]), device);
    let picked = logp.gather(2, idx);
    -(picked.sum().into_scalar::<f32>() as f64)
}

/// Total NLL and count over all next-token positions 1..T-1 of one sequence. Sequences longer
/// than `window` are scored in overlapping windows: each window re-reads half a window of
/// context and scores only positions not scored before.
pub fn sequence_nll(model: &Llama, ids: &[u32], window: usize, device: &burn::tensor::Device) -> (f64, usize) {
    if ids.len() < 2 {
        return (0.0, 0);
    }
    let window = window.max(2);
    if ids.len() <= window {
        return (window_nll(model, ids, 1, device), ids.len() - 1);
    }
    let stride = (window / 2).max(1);
    let mut total = 0.0;
    let mut scored_to = 1; // next position to score
    let mut start = 0;
    loop {
        let end = (start + window).min(ids.len());
        total += window_nll(model, &ids[start..end], scored_to - start, device);
        scored_to = end;
        if end == ids.len() {
            break;
        }
        start = end.saturating_sub(window - stride).max(start + 1);
    }
    (total, ids.len() - 1)
}

/// Scores id sequences.
pub fn eval_ids(loaded: &Loaded, seqs: &[Vec<u32>], window: Option<usize>) -> Result<EvalReport> {
    let vocab = loaded.model.vocab_size() as u32;
    let window = window.unwrap_or(loaded.model.config.max_position_embeddings);
    let (mut nll, mut n) = (0.0, 0usize);
    for (i, s) in seqs.iter().enumerate() {
        if let Some(bad) = s.iter().find(|&&x| x >= vocab) {
            bail!("sequence {i}: token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let (a, b) = sequence_nll(&loaded.model, s, window, &loaded.device);
        nll += a;
        n += b;
    }
    if n == 0 {
        bail!("nothing to score: every sequence needs at least 2 tokens");
    }
    let mean = nll / n as f64;
    Ok(EvalReport { tokens: n, mean_nll: mean, perplexity: mean.exp(), chars: None, bits_per_char: None, sequences: seqs.len(), total_nll: nll })
}

/// Scores a text: tokenized with BOS first (so the first character is scored too), NLL over
/// all its tokens, and bits per Unicode character.
pub fn eval_text(loaded: &Loaded, text: &str, window: Option<usize>) -> Result<EvalReport> {
    let tok = loaded
        .tok
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the model folder has no tokenizer.json: use --ids, or pass --tokenizer DIR"))?;
    let mut ids = tok.encode(text, true)?;
    if let Some(bos) = loaded.model.config.bos_token_id {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    let mut r = eval_ids(loaded, &[ids], window)?;
    let chars = text.chars().count();
    r.chars = Some(chars);
    r.bits_per_char = Some(r.total_nll / std::f64::consts::LN_2 / chars.max(1) as f64);
    Ok(r)
}

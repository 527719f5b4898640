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
    /// Where the loss sits when the vocabulary was extended: targets below the extension's
    /// `old_vocab` against the added ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_vocab: Option<VocabSplit>,
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
    /// Every scored target in order (all sequences', one after another); `eval --per-token`
    /// prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_token: Option<Vec<TokenScore>>,
}

/// One scored target.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenScore {
    pub id: u32,
    /// −log p(id | what came before), nats.
    pub nll: f32,
    /// Its bytes in the scored text, `[start, end)` (a text input only). The pieces of one
    /// character that a byte-level tokenizer splits all name that character's span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span: Option<[usize; 2]>,
}

/// NLL of the targets that were in the base vocabulary and of the added ones. A model that extends
/// the vocabulary predicts fewer tokens, each harder: this says whether the added rows or the old
/// ones carry the loss (bits/char of each part add up to the total).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VocabSplit {
    /// First added id (`old_vocab` of the extension).
    pub first_added_id: u32,
    pub base: PartScore,
    pub added: PartScore,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PartScore {
    pub tokens: usize,
    /// Total NLL in nats.
    pub total_nll: f64,
    /// Nats per token of this part (0 when it has none).
    pub mean_nll: f64,
    /// This part's share of bits/char, when characters are known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_char: Option<f64>,
}

impl VocabSplit {
    fn new(first_added_id: u32) -> Self {
        VocabSplit { first_added_id, ..Default::default() }
    }

    fn add(&mut self, target: u32, nll: f64) {
        let part = if target >= self.first_added_id { &mut self.added } else { &mut self.base };
        part.tokens += 1;
        part.total_nll += nll;
    }

    fn finish(&mut self, chars: Option<usize>) {
        for p in [&mut self.base, &mut self.added] {
            p.mean_nll = if p.tokens > 0 { p.total_nll / p.tokens as f64 } else { 0.0 };
            p.bits_per_char = chars.map(|c| p.total_nll / std::f64::consts::LN_2 / c.max(1) as f64);
        }
    }
}

/// −log p(ids[t] | ids[..t]) for each t in `from..ids.len()`, with `ids` fitting the context.
fn window_nll(model: &Llama, ids: &[u32], from: usize, device: &burn::tensor::Device) -> Result<Vec<f32>> {
    let t = ids.len();
    // Position p predicts ids[p+1]; we need p in from-1 .. t-1. Only those go through the LM
    // head: a window after the first re-reads half a window as context, and projecting it onto
    // the vocabulary too cost ~10 % of an evaluation.
    let hidden = model.hidden(ids_tensor(ids, device), None);
    let d = hidden.dims()[2];
    let logits = model.logits(hidden.slice([0..1, from - 1..t - 1, 0..d])).cast(burn::tensor::FloatDType::F32);
    let n = t - from;
    let logp = log_softmax(logits, 2);
    let targets: Vec<i64> = ids[from..].iter().map(|&x| x as i64).collect();
    let idx: Tensor<3, Int> = Tensor::from_data(TensorData::new(targets, [1, n, 1]), device);
    let picked = logp.gather(2, idx);
    let picked = picked.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading log-probabilities: {e:?}"))?;
    Ok(picked.into_iter().map(|x| -x).collect())
}

/// `−log p(ids[t] | ids[..t])` for every t in 1..T. Sequences longer than `window` are scored in
/// overlapping windows: each window re-reads half a window of context and scores only positions
/// not scored before.
pub fn token_nll(model: &Llama, ids: &[u32], window: usize, device: &burn::tensor::Device) -> Result<Vec<f32>> {
    if ids.len() < 2 {
        return Ok(Vec::new());
    }
    let window = window.max(2);
    if ids.len() <= window {
        return window_nll(model, ids, 1, device);
    }
    let stride = (window / 2).max(1);
    let mut out = Vec::with_capacity(ids.len() - 1);
    let mut scored_to = 1; // next position to score
    let mut start = 0;
    loop {
        let end = (start + window).min(ids.len());
        out.extend(window_nll(model, &ids[start..end], scored_to - start, device)?);
        scored_to = end;
        if end == ids.len() {
            break;
        }
        start = end.saturating_sub(window - stride).max(start + 1);
    }
    Ok(out)
}

/// Scores id sequences. When the tokenizer came with a vocabulary extension, the report also
/// splits the loss between base and added targets.
pub fn eval_ids(loaded: &Loaded, seqs: &[Vec<u32>], window: Option<usize>) -> Result<EvalReport> {
    let vocab = loaded.model.vocab_size() as u32;
    let context = loaded.model.config.max_position_embeddings;
    if let Some(w) = window.filter(|&w| w > context) {
        bail!("--window {w} is longer than the model's context of {context} tokens (config.json max_position_embeddings): positions beyond it were never trained; use --window {context} or less");
    }
    let window = window.unwrap_or(context);
    let (mut nll, mut n) = (0.0, 0usize);
    let mut split = loaded.first_added_id.map(VocabSplit::new);
    let mut scores = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        if let Some(bad) = s.iter().find(|&&x| x >= vocab) {
            bail!("sequence {i}: token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let per_token = token_nll(&loaded.model, s, window, &loaded.device)?;
        // An empty sequence (a `[]` line, a [B, 0] tensor) has no targets: skipped like a
        // one-token one, and the "nothing to score" check below catches an input of only these.
        let targets = s.get(1..).unwrap_or(&[]);
        for (&target, &x) in targets.iter().zip(&per_token) {
            nll += x as f64;
            scores.push(TokenScore { id: target, nll: x, span: None });
            if let Some(sp) = split.as_mut() {
                sp.add(target, x as f64);
            }
        }
        n += per_token.len();
    }
    if n == 0 {
        bail!("nothing to score: every sequence needs at least 2 tokens");
    }
    if let Some(sp) = split.as_mut() {
        sp.finish(None);
    }
    let mean = nll / n as f64;
    Ok(EvalReport {
        tokens: n,
        mean_nll: mean,
        perplexity: mean.exp(),
        chars: None,
        bits_per_char: None,
        sequences: seqs.len(),
        total_nll: nll,
        by_vocab: split,
        per_token: Some(scores),
    })
}

/// Scores a text: tokenized with BOS first (so the first character is scored too), NLL over
/// all its tokens, and bits per Unicode character.
pub fn eval_text(loaded: &Loaded, text: &str, window: Option<usize>) -> Result<EvalReport> {
    let tok = loaded
        .tok
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the model folder has no tokenizer.json: use --ids, or pass --tokenizer DIR"))?;
    let (mut ids, mut spans) = tok.encode_with_spans(text, true)?;
    let before = ids.len();
    super::prepend_bos(loaded, &mut ids);
    if ids.len() > before {
        spans.insert(0, [0, 0]);
    }
    let mut r = eval_ids(loaded, &[ids], window)?;
    // Target t is token t + 1 of the row.
    for (s, span) in r.per_token.iter_mut().flatten().zip(spans.into_iter().skip(1)) {
        s.span = Some(span);
    }
    let chars = text.chars().count();
    r.chars = Some(chars);
    if let Some(sp) = r.by_vocab.as_mut() {
        sp.finish(Some(chars));
    }
    r.bits_per_char = Some(r.total_nll / std::f64::consts::LN_2 / chars.max(1) as f64);
    Ok(r)
}

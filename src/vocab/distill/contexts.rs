//! Fitting contexts: the training text in both tokenizations, aligned piece by piece.

use super::DistillOptions;
use crate::vocab::VocabExtension;
use anyhow::{ensure, Result};

/// One context: the new-tokenization ids and, for each, the index of its last sub-token in the
/// old-tokenization expansion.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillContext {
    pub new_ids: Vec<u32>,
    pub old_ids: Vec<u32>,
    pub aligned: Vec<usize>,
}

/// Expands a new-tokenization sequence into old ids (each new piece replaced by its sub-tokens)
/// and records where each new position ends. `None` if a piece has no sub-tokens (it cannot be
/// read by the base).
pub fn expand(new_ids: &[u32], ext: &VocabExtension) -> Option<DistillContext> {
    let old = ext.old_vocab as u32;
    let mut old_ids = Vec::with_capacity(new_ids.len() * 2);
    let mut aligned = Vec::with_capacity(new_ids.len());
    for &id in new_ids {
        if id < old {
            old_ids.push(id);
        } else {
            let subs = ext.subtokens.get((id - old) as usize)?;
            if subs.is_empty() {
                return None;
            }
            old_ids.extend_from_slice(subs);
        }
        aligned.push(old_ids.len() - 1);
    }
    Some(DistillContext { new_ids: new_ids.to_vec(), old_ids, aligned })
}

/// Cuts `ids` (the new tokenization of the training text) into contexts of `seq_len` that
/// contain at least one new piece, at most `budget` tokens in all.
pub fn contexts_from_ids(ids: &[u32], ext: &VocabExtension, seq_len: usize, budget: usize) -> Vec<DistillContext> {
    let mut out = Vec::new();
    let mut used = 0;
    for chunk in ids.chunks_exact(seq_len) {
        if used + seq_len > budget {
            break;
        }
        if !chunk.iter().any(|&i| i as usize >= ext.old_vocab) {
            continue;
        }
        if let Some(c) = expand(chunk, ext) {
            used += seq_len;
            out.push(c);
        }
    }
    out
}

/// Contexts from a training text: its paragraphs (lines) in a seeded order, tokenized with the
/// extended tokenizer in `tokenizer_dir`, cut into `opts.seq_len` pieces up to `opts.tokens`.
pub fn contexts_from_text(text: &str, tokenizer_dir: &std::path::Path, ext: &VocabExtension, opts: &DistillOptions) -> Result<Vec<DistillContext>> {
    Ok(fitting_text(text, tokenizer_dir, ext, opts, false)?.0)
}

/// [`contexts_from_text`], and with `counts` the old tokenization of the whole text (for the
/// chain targets' frequencies).
pub(super) fn fitting_text(text: &str, tokenizer_dir: &std::path::Path, ext: &VocabExtension, opts: &DistillOptions, counts: bool) -> Result<(Vec<DistillContext>, Vec<u32>)> {
    opts.validate()?;
    let tok = crate::tokenizer::Tok::load(tokenizer_dir)?;
    ensure!(tok.vocab_size() <= ext.new_vocab, "{}: the tokenizer has {} tokens but the extension {}: use the tokenizer written by `vocab extend`", tokenizer_dir.display(), tok.vocab_size(), ext.new_vocab);
    let mut paras: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    crate::rng::SplitMix::new(opts.seed).shuffle(&mut paras);
    let budget = opts.tokens + if opts.sides.output { opts.head_tokens } else { 0 };
    // Enough text for the budget at ≥ 0.5 tokens per character, with room for contexts that
    // hold no new piece.
    let want_chars = budget.saturating_mul(3);
    let mut joined = String::new();
    for p in &paras {
        if joined.chars().count() >= want_chars {
            break;
        }
        joined.push_str(p);
        joined.push('\n');
    }
    let ids = tok.encode(&joined, false)?;
    let mut old_ids = Vec::new();
    if counts {
        let all = paras.join("\n");
        let ids = tok.encode(&all, false)?;
        // Pieces without sub-tokens cannot be expanded; the count skips over them.
        for &i in &ids {
            match (i as usize).checked_sub(ext.old_vocab) {
                None => old_ids.push(i),
                Some(k) => old_ids.extend_from_slice(ext.subtokens.get(k).map(Vec::as_slice).unwrap_or(&[])),
            }
        }
    }
    Ok((contexts_from_ids(&ids, ext, opts.seq_len, budget), old_ids))
}

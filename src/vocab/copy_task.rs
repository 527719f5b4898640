//! A copying task for the added pieces: "repeat this text" examples made of random new pieces.
//!
//! Why: a model reads a repeated name or term again almost for free, because attention finds
//! its earlier occurrence and copies what followed it (induction heads). The base model does
//! that for its own tokens, so it copies a Chinese character through its byte pieces. Rows
//! added by `vocab resize` are not copied at all at step 0, and ordinary training text teaches
//! it only for the pieces it shows often. SmolLM2 on the quickstart: a random string of 60
//! Chinese characters, repeated, costs the base 0.8 nats a character the second time. The
//! extended model with sub-token-mean rows pays 8.4, and after the quickstart's training still
//! 2.5 for frequent characters and 7.2 for rare ones. On the validation text, pieces that had
//! already occurred in the window carried most of the trained model's excess over the base
//! (BENCHMARKS.md, "Repeats"). The trained model is at the base's level on first occurrences.
//!
//! Each example asks the model to repeat a random sequence of added pieces. The instruction
//! templates mask the prompt, so the loss falls only on the copy, and every added row learns to
//! be read back. Pieces are drawn uniformly over the extension rather than by corpus frequency,
//! since the rare rows are the ones the text does not teach. The file is an Alpaca JSON, so a
//! recipe trains on it as any other `kind = "alpaca"` block.
//!
//! Measured on the quickstart at weight 0.1: the copy is learnt (a repeated random string of rare
//! characters 430 → 190 nats), but natural repeats gain less, and the texts' bits/char moved
//! within the spread of runs (valid_zh 7.798 and 7.872 against 7.867 / 7.876 without it). So
//! the quickstart does not use it; it is here to build on and to measure with.

use super::VocabExtension;
use crate::rng::SplitMix;
use crate::tokenizer::Tok;
use anyhow::{ensure, Result};
use serde::Serialize;

/// The instruction the quickstart was measured with ("repeat the text below word for word").
/// The prompt is masked, so its language matters little; what the rows learn is the copy.
pub const DEFAULT_INSTRUCTION: &str = "逐字重复下面的文字。";

#[derive(Debug, Clone, PartialEq)]
pub struct CopyTaskConfig {
    pub examples: usize,
    /// Pieces per example, drawn uniformly in `min_pieces..=max_pieces`.
    pub min_pieces: usize,
    pub max_pieces: usize,
    /// Probability that a drawn piece is a single character rather than a longer piece. The
    /// characters are a seventh of the quickstart's extension but carry most of the repeats' cost.
    pub char_share: f64,
    pub seed: u64,
    pub instruction: String,
}

impl Default for CopyTaskConfig {
    fn default() -> Self {
        CopyTaskConfig { examples: 6000, min_pieces: 20, max_pieces: 60, char_share: 0.6, seed: 7, instruction: DEFAULT_INSTRUCTION.to_string() }
    }
}

/// One Alpaca record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CopyExample {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// The added pieces a copy can exercise, split into single characters and longer pieces: those
/// that decode to text the extended tokenizer encodes back into that one token. Intermediate
/// pieces that exist only for the merges (a byte-level fragment of a character) are left out,
/// since no text spells them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyablePieces {
    pub chars: Vec<String>,
    pub longer: Vec<String>,
    /// Added rows with no text of their own.
    pub skipped: usize,
}

pub fn copyable_pieces(tok: &Tok, ext: &VocabExtension) -> Result<CopyablePieces> {
    let mut out = CopyablePieces::default();
    for id in ext.old_vocab..ext.new_vocab {
        let id = id as u32;
        let text = tok.decode(&[id])?;
        if text.trim().is_empty() || text.contains('\u{FFFD}') || !encodes_to(tok, &text, id)? {
            out.skipped += 1;
            continue;
        }
        if text.chars().count() == 1 { out.chars.push(text) } else { out.longer.push(text) }
    }
    Ok(out)
}

/// Whether `text` encodes to the one token `id`, after whatever a SentencePiece normalizer puts
/// in front of every text (LLaMA-2's dummy-prefix `▁`, which decodes to nothing).
fn encodes_to(tok: &Tok, text: &str, id: u32) -> Result<bool> {
    let ids = tok.encode(text, false)?;
    let Some((&last, before)) = ids.split_last() else { return Ok(false) };
    Ok(last == id && before.iter().map(|&p| tok.decode(&[p])).collect::<Result<Vec<_>>>()?.iter().all(|t| t.trim().is_empty()))
}

/// `cfg.examples` seeded examples whose output is their input.
pub fn copy_task(pieces: &CopyablePieces, cfg: &CopyTaskConfig) -> Result<Vec<CopyExample>> {
    ensure!(!pieces.chars.is_empty() || !pieces.longer.is_empty(), "the extension has no added piece that text can spell; nothing to copy");
    ensure!(cfg.min_pieces >= 1 && cfg.min_pieces <= cfg.max_pieces, "pieces per example must satisfy 1 ≤ min ({}) ≤ max ({})", cfg.min_pieces, cfg.max_pieces);
    ensure!((0.0..=1.0).contains(&cfg.char_share), "the characters' share must be within 0..1, got {}", cfg.char_share);
    let mut rng = SplitMix::new(cfg.seed);
    let draw = |rng: &mut SplitMix| -> &str {
        let chars = pieces.longer.is_empty() || (!pieces.chars.is_empty() && rng.uniform() < cfg.char_share);
        let from = if chars { &pieces.chars } else { &pieces.longer };
        &from[rng.below(from.len())]
    };
    Ok((0..cfg.examples)
        .map(|_| {
            let n = cfg.min_pieces + rng.below(cfg.max_pieces - cfg.min_pieces + 1);
            let text: String = (0..n).map(|_| draw(&mut rng)).collect();
            CopyExample { instruction: cfg.instruction.clone(), input: text.clone(), output: text }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces() -> CopyablePieces {
        CopyablePieces { chars: ["国", "我", "年"].map(String::from).to_vec(), longer: ["我们", "国家"].map(String::from).to_vec(), skipped: 0 }
    }

    #[test]
    fn examples_repeat_their_input_from_the_given_pieces() {
        let cfg = CopyTaskConfig { examples: 200, min_pieces: 3, max_pieces: 7, ..Default::default() };
        let ex = copy_task(&pieces(), &cfg).unwrap();
        assert_eq!(ex.len(), 200);
        let (mut chars, mut drawn) = (0usize, 0usize);
        for e in &ex {
            assert_eq!(e.input, e.output);
            assert_eq!(e.instruction, DEFAULT_INSTRUCTION);
            // Greedy split back into pieces (longer ones first) to check what was drawn.
            let mut rest = e.input.as_str();
            let mut n = 0;
            while !rest.is_empty() {
                let p = pieces().longer.into_iter().chain(pieces().chars).find(|p| rest.starts_with(p.as_str())).expect("a piece from the list");
                chars += (p.chars().count() == 1) as usize;
                rest = &rest[p.len()..];
                n += 1;
            }
            drawn += n;
            assert!((3..=7).contains(&n), "{n} pieces in {:?}", e.input);
        }
        // 0.6 of the draws are characters; the greedy re-split can only join 我+们 / 国+家.
        let share = chars as f64 / drawn as f64;
        assert!((0.4..0.75).contains(&share), "{share}");
    }

    #[test]
    fn seeded_and_checked() {
        let cfg = CopyTaskConfig { examples: 20, ..Default::default() };
        assert_eq!(copy_task(&pieces(), &cfg).unwrap(), copy_task(&pieces(), &cfg).unwrap());
        assert_ne!(copy_task(&pieces(), &cfg).unwrap(), copy_task(&pieces(), &CopyTaskConfig { seed: 8, ..cfg.clone() }).unwrap());
        assert!(copy_task(&CopyablePieces::default(), &cfg).is_err());
        assert!(copy_task(&pieces(), &CopyTaskConfig { min_pieces: 5, max_pieces: 4, ..cfg.clone() }).is_err());
        assert!(copy_task(&pieces(), &CopyTaskConfig { char_share: 1.5, ..cfg.clone() }).is_err());
        // Only characters, or only longer pieces: the other kind is never needed.
        let only_chars = CopyablePieces { longer: vec![], ..pieces() };
        assert!(copy_task(&only_chars, &cfg).unwrap().iter().all(|e| e.input.chars().all(|c| "国我年".contains(c))));
    }
}

//! `vocab extend`, `vocab resize`, `vocab copy-task`, `vocab cover`, `vocab stats` and `vocab encode`.

use super::{check_out, write_out, Report, Written};
use crate::io::atomic::OutKind;
use crate::train::fit_rows::{fit_model, FitOptions};
use crate::vocab::distill::DistillOptions;
use crate::vocab::{self, Encoded, ExtendReport, InitMethod, ResizeReport, TokenizerStats};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// Where `vocab extend` takes its pieces from.
#[derive(Debug, Clone)]
pub enum Pieces {
    /// A file of pieces, one per line.
    List(PathBuf),
    /// Frequent characters and words of a corpus (or of the word list's frequency column).
    Select {
        corpus: Vec<PathBuf>,
        wordlist: Option<PathBuf>,
        /// Pieces to add in all, split 8:20 between characters and words as Linly's 8k
        /// characters and 20k words.
        max_new: usize,
        /// The characters' share of `max_new` when it is not 8:20.
        max_chars: Option<usize>,
        min_freq: u64,
        max_word_chars: usize,
        pairs: bool,
        /// SentencePiece ▁-prefixed variants, taken from the word budget.
        prefixed: usize,
    },
}

#[derive(Debug, Clone)]
pub struct ExtendOptions {
    pub tokenizer: PathBuf,
    pub pieces: Pieces,
    pub out: PathBuf,
    pub force: bool,
}

pub fn extend(o: &ExtendOptions) -> Result<Written<ExtendReport>> {
    let mut inputs = vec![o.tokenizer.clone()];
    let source = match &o.pieces {
        Pieces::List(f) => {
            inputs.push(f.clone());
            vocab::PieceSource::List(f.clone())
        }
        Pieces::Select { corpus, wordlist, max_new, max_chars, min_freq, max_word_chars, pairs, prefixed } => {
            inputs.extend(wordlist.iter().chain(corpus).cloned());
            let chars = max_chars.unwrap_or(max_new * 8 / 28).min(*max_new);
            vocab::PieceSource::Select(vocab::SelectConfig {
                corpus: corpus.clone(),
                // Without a word list there are no words to spend a word budget on.
                max_words: if wordlist.is_some() { max_new.saturating_sub(chars + prefixed) } else { 0 },
                max_chars: if wordlist.is_some() { chars } else { max_chars.unwrap_or(*max_new).min(*max_new) },
                wordlist: wordlist.clone(),
                min_freq: *min_freq,
                max_word_chars: *max_word_chars,
                pairs: *pairs,
                max_prefixed: *prefixed,
            })
        }
    };
    let report = write_out(&o.out, &inputs, o.force, OutKind::Folder, |staged| vocab::extend(&o.tokenizer, &source, staged, false))?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<ExtendReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} ({}): {} -> {} tokens ({} requested pieces added, {} intermediate, {} already present, {} duplicates, {} unreachable) in {:.2} s -> {}",
            r.tokenizer, r.family, r.old_vocab, r.new_vocab, r.added_requested, r.added_intermediate, r.skipped_present, r.skipped_duplicate, r.unreachable.len(), r.seconds, self.out.display()
        )?;
        if r.space_split {
            write!(f, "\n(a space before a Chinese or Japanese character is now its own token, so that the new pieces also form after a space)")?;
        }
        Ok(())
    }
}

impl Report for Written<ExtendReport> {}

#[derive(Debug, Clone)]
pub struct ResizeOptions {
    pub model: PathBuf,
    pub extension: PathBuf,
    pub init: InitMethod,
    pub seed: u64,
    /// The texts the model-based methods read (`distill*`: exactly one; `fit`: one or more);
    /// without one they are refused.
    pub init_text: Vec<PathBuf>,
    /// `fit`: rows the new rows train on.
    pub fit_steps: usize,
    /// The `distill*` settings (`sides` comes from `init`, `seed` from `seed`).
    pub distill: DistillOptions,
    /// Device the model-based methods run on.
    pub device: String,
    pub out: PathBuf,
    pub force: bool,
}

pub fn resize(o: &ResizeOptions) -> Result<Written<ResizeReport>> {
    let mut inputs = vec![o.model.clone(), o.extension.clone()];
    inputs.extend(o.init_text.iter().cloned());
    if o.init == InitMethod::Fit {
        // The fit is a training run: its steps allocate and free the same large tensors.
        crate::heap::reuse_large_buffers();
        let fit = FitOptions::texts(&o.init_text, o.fit_steps, o.seed, &o.device);
        let (mut report, fit) = write_out(&o.out, &inputs, o.force, OutKind::Folder, |staged| fit_model(&o.model, &o.extension, &fit, staged))?;
        report.out = o.out.clone();
        report.fit = Some(fit);
        return Ok(Written { report, out: o.out.clone() });
    }
    ensure!(o.init_text.len() <= 1, "--init {} reads one --init-text (got {}); join the files, or use --init fit, which takes several", o.init, o.init_text.len());
    let spec = match o.init_text.first() {
        Some(text) => Some(vocab::DistillSpec { text: text.clone(), opts: DistillOptions { seed: o.seed, ..o.distill.clone() }, device: crate::device::parse(&o.device)? }),
        None => None,
    };
    let report = write_out(&o.out, &inputs, o.force, OutKind::Folder, |staged| vocab::resize_model(&o.model, &o.extension, o.init, o.seed, spec.as_ref(), staged))?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<ResizeReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        let empty = if r.empty_subtokens > 0 { format!(", {} pieces without sub-tokens got the mean row", r.empty_subtokens) } else { String::new() };
        write!(f, "resized {} -> {} rows ({} init{empty}, tied {}) -> {}", r.old_vocab, r.new_vocab, r.init, r.tied, self.out.display())
    }
}

impl Report for Written<ResizeReport> {
    fn notes(&self) -> Vec<String> {
        let distill = self.report.distill.iter().map(|d| format!("distill: {}", serde_json::to_string(d).unwrap_or_default()));
        let fit = self.report.fit.iter().map(|f| format!("fit: {}", serde_json::to_string(f).unwrap_or_default()));
        distill.chain(fit).collect()
    }
}

#[derive(Debug, Clone)]
pub struct CopyTaskOptions {
    /// The extended tokenizer's folder (tokenizer.json + vocab_extension.json).
    pub tokenizer: PathBuf,
    pub cfg: vocab::CopyTaskConfig,
    pub out: PathBuf,
    pub force: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyTaskReport {
    pub examples: usize,
    pub chars: usize,
    pub longer: usize,
    /// Added rows no text spells (merge intermediates), left out of the task.
    pub skipped: usize,
}

pub fn copy_task(o: &CopyTaskOptions) -> Result<Written<CopyTaskReport>> {
    let ext_path = o.tokenizer.join("vocab_extension.json");
    check_out(&o.out, std::slice::from_ref(&o.tokenizer), o.force, OutKind::File)?;
    let ext = vocab::VocabExtension::load(&ext_path).with_context(|| format!("--tokenizer {} must be the folder `vocab extend` wrote", o.tokenizer.display()))?;
    let tok = crate::tokenizer::Tok::load(&o.tokenizer)?;
    ensure!(tok.vocab_size() == ext.new_vocab, "{} has {} tokens but {} was made for {}; pass the folder `vocab extend` wrote", o.tokenizer.display(), tok.vocab_size(), ext_path.display(), ext.new_vocab);
    let pieces = vocab::copyable_pieces(&tok, &ext)?;
    let examples = vocab::copy_task(&pieces, &o.cfg)?;
    vocab::write_atomic(&o.out, &serde_json::to_vec_pretty(&examples)?)?;
    Ok(Written { report: CopyTaskReport { examples: examples.len(), chars: pieces.chars.len(), longer: pieces.longer.len(), skipped: pieces.skipped }, out: o.out.clone() })
}

impl fmt::Display for Written<CopyTaskReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(f, "{} copy examples from {} characters and {} longer pieces ({} merge-only rows left out) -> {}", r.examples, r.chars, r.longer, r.skipped, self.out.display())
    }
}

impl Report for Written<CopyTaskReport> {}

#[derive(Debug, Clone)]
pub struct CoverOptions {
    /// The extended tokenizer's folder (tokenizer.json + vocab_extension.json).
    pub tokenizer: PathBuf,
    /// A blank-line-separated text, as a `kind = "text"` source reads it.
    pub text: PathBuf,
    pub cfg: vocab::CoverConfig,
    /// Documents shorter than this many characters are not candidates.
    pub min_chars: usize,
    pub out: PathBuf,
    pub force: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoverReport {
    pub documents: usize,
    /// Documents of at least `min_chars` characters.
    pub candidates: usize,
    pub chosen: usize,
    /// Training tokens of the chosen documents (BOS and EOS counted, as training packs them).
    pub tokens: usize,
    /// Added pieces the chosen documents show at all, and at least `min_count` times.
    pub pieces_shown: usize,
    pub pieces_at_min_count: usize,
    /// The same two figures for candidates drawn at random up to the same tokens.
    pub random_shown: usize,
    pub random_at_min_count: usize,
    pub min_count: usize,
}

/// `vocab cover`: the documents of `text` that show the most added pieces, up to a token budget.
pub fn cover(o: &CoverOptions) -> Result<Written<CoverReport>> {
    use crate::data::{read_examples, Example, SourceKind};
    use rayon::prelude::*;
    check_out(&o.out, &[o.text.clone(), o.tokenizer.clone()], o.force, OutKind::File)?;
    ensure!(o.cfg.tokens > 0 && o.cfg.min_count > 0, "--tokens and --min-count must be above 0");
    let ext_path = o.tokenizer.join("vocab_extension.json");
    let ext = vocab::VocabExtension::load(&ext_path).with_context(|| format!("--tokenizer {} must be the folder `vocab extend` wrote", o.tokenizer.display()))?;
    let tok = crate::tokenizer::Tok::load(&o.tokenizer)?;
    ensure!(tok.vocab_size() == ext.new_vocab, "{} has {} tokens but {} was made for {}; pass the folder `vocab extend` wrote", o.tokenizer.display(), tok.vocab_size(), ext_path.display(), ext.new_vocab);
    let texts: Vec<String> = read_examples(SourceKind::Text, crate::template::Template::Alpaca, &o.text)?
        .into_iter()
        .map(|(line, e)| match e {
            Example::Text(t) => Ok(t),
            _ => Err(anyhow::anyhow!("{}:{line}: not a text document", o.text.display())),
        })
        .collect::<Result<_>>()?;
    let candidates: Vec<usize> = (0..texts.len()).filter(|&i| texts[i].chars().count() >= o.min_chars).collect();
    let old = ext.old_vocab as u32;
    let docs = candidates
        .par_iter()
        .map(|&i| {
            let ids = tok.encode(&texts[i], false).with_context(|| format!("tokenizing {}", o.text.display()))?;
            Ok(vocab::CoverDoc { new_ids: ids.iter().copied().filter(|&id| id >= old).collect(), tokens: ids.len() + 2 })
        })
        .collect::<Result<Vec<_>>>()?;
    let n_new = ext.added();
    let c = vocab::cover(&docs, old, n_new, &o.cfg);
    ensure!(!c.chosen.is_empty(), "no document of {} with at least --min-chars {} characters shows an added piece of {}; is it the text the extension was made for?", o.text.display(), o.min_chars, o.tokenizer.display());
    let (pieces_shown, pieces_at_min_count) = vocab::shown(&c.counts, o.cfg.min_count);
    let random = vocab::random_draw(&docs, c.tokens, 0);
    let (random_shown, random_at_min_count) = vocab::shown(&vocab::cover_counts(&docs, &random, old, n_new), o.cfg.min_count);
    let mut body = String::new();
    for &k in &c.chosen {
        body.push_str(&texts[candidates[k]]);
        body.push_str("\n\n");
    }
    crate::io::atomic::write(&o.out, body.as_bytes())?;
    let report = CoverReport { documents: texts.len(), candidates: docs.len(), chosen: c.chosen.len(), tokens: c.tokens, pieces_shown, pieces_at_min_count, random_shown, random_at_min_count, min_count: o.cfg.min_count };
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<CoverReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} of {} documents ({} candidates), {} tokens: {} added pieces shown, {} at least {} times (a random draw of the same tokens: {}, {}) -> {}",
            r.chosen, r.documents, r.candidates, r.tokens, r.pieces_shown, r.pieces_at_min_count, r.min_count, r.random_shown, r.random_at_min_count, self.out.display()
        )
    }
}

impl Report for Written<CoverReport> {}

#[derive(Debug, Clone)]
pub struct StatsOptions {
    pub tokenizers: Vec<PathBuf>,
    pub texts: Vec<PathBuf>,
}

/// One row per tokenizer × text.
#[derive(Debug, Clone)]
pub struct StatsReport {
    pub results: Vec<TokenizerStats>,
}

pub fn stats(o: &StatsOptions) -> Result<StatsReport> {
    Ok(StatsReport { results: vocab::stats(&o.tokenizers, &o.texts)? })
}

// Through a `serde_json::Value`, as the command always printed it (keys sorted).
impl Serialize for StatsReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serde_json::json!({ "results": self.results }).serialize(s)
    }
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = vocab::render_table(&self.results);
        f.write_str(table.strip_suffix('\n').unwrap_or(&table))
    }
}

impl Report for StatsReport {}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub tokenizer: PathBuf,
    pub text: String,
}

pub fn encode(o: &EncodeOptions) -> Result<Encoded> {
    let tok = vocab::load_tokenizer(&o.tokenizer)?;
    vocab::encode(&tok, &o.text, false)
}

impl fmt::Display for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ids:     {:?}\npieces:  {:?}\ndecoded: {:?}", self.ids, self.pieces, self.decoded)
    }
}

impl Report for Encoded {}

//! Examples → token ids with a loss mask, in parallel, through the on-disk cache.

use super::cache;
use super::sources::{read_examples, Example, SourceKind, SourceSpec};
use crate::template::{Template, CHATML_END, CHATML_START};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A tokenizer plus the special ids the data needs.
pub struct Encoder {
    tokenizer: tokenizers::Tokenizer,
    /// Identifies the tokenizer in cache keys: a hash of tokenizer.json's bytes.
    fingerprint: String,
    /// Put before every text and prompted example (`None` for models without a BOS, e.g. Qwen).
    pub bos: Option<u32>,
    /// Ends every text document and every response, so the model learns to stop.
    pub eos: u32,
    /// Ids of `tokenized` sources must be below this. Defaults to the tokenizer's size with added
    /// tokens; raise it to the model's `vocab_size` when the embedding is padded beyond it.
    pub vocab_size: usize,
}

impl Encoder {
    /// Loads `tokenizer.json` (a file, or a folder holding one).
    pub fn from_file(path: &Path, bos: Option<u32>, eos: u32) -> Result<Self> {
        let (tokenizer, bytes) = crate::tokenizer::read_tokenizer(path)?;
        Ok(Self::with_fingerprint(tokenizer, format!("{:032x}", cache::hash128(&bytes)), bos, eos))
    }

    /// Wraps a tokenizer already in memory; its cache identity is the hash of its serialized
    /// JSON (stable for an unchanged tokenizer, though not equal to the file's hash).
    pub fn new(tokenizer: tokenizers::Tokenizer, bos: Option<u32>, eos: u32) -> Result<Self> {
        let json = tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialize tokenizer: {e}"))?;
        Ok(Self::with_fingerprint(tokenizer, format!("{:032x}", cache::hash128(json.as_bytes())), bos, eos))
    }

    fn with_fingerprint(tokenizer: tokenizers::Tokenizer, fingerprint: String, bos: Option<u32>, eos: u32) -> Self {
        let vocab_size = tokenizer.get_vocab_size(true);
        Encoder { tokenizer, fingerprint, bos, eos, vocab_size }
    }

    /// The wrapped tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Tokenizes one example into `(ids, loss)` where `loss[t]` says whether `labels[t] =
    /// ids[t]` (HF-aligned) or `-100`.
    pub fn encode(&self, ex: &Example) -> Result<(Vec<u32>, Vec<bool>)> {
        let bos: Vec<u32> = self.bos.into_iter().collect();
        match ex {
            Example::Text(s) => {
                let enc = self.tokenizer.encode_fast(s.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
                let mut ids = bos.clone();
                ids.extend_from_slice(enc.get_ids());
                ids.push(self.eos);
                // BOS is never a prediction target; everything after it is.
                let mut loss = vec![true; ids.len()];
                if !bos.is_empty() {
                    loss[0] = false;
                }
                Ok((ids, loss))
            }
            Example::Prompted { prompt, response } => {
                // Tokenizing prompt + response as one string gives the ids the model sees when
                // it continues the prompt at inference (separate tokenization would start the
                // answer with a spurious `▁`). The split is found from byte offsets; a token that
                // straddles the boundary counts as prompt.
                let full = format!("{prompt}{response}");
                let enc = self.tokenizer.encode(full.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
                let spelled_bos = self.bos.is_some_and(|b| enc.get_ids().first() == Some(&b));
                let mut ids = if spelled_bos { Vec::new() } else { bos.clone() };
                let mut loss = vec![false; ids.len()];
                for (&id, &(start, _)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                    ids.push(id);
                    loss.push(start >= prompt.len());
                }
                if ids.last() != Some(&self.eos) || !loss.last().copied().unwrap_or(false) {
                    ids.push(self.eos);
                    loss.push(true);
                }
                Ok((ids, loss))
            }
            Example::Ids { ids, labels } => {
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
                    bail!("input id {bad} is outside the vocabulary (size {}); the file was tokenized with another tokenizer", self.vocab_size);
                }
                let loss = match labels {
                    None => vec![true; ids.len()],
                    Some(l) => {
                        let mut loss = Vec::with_capacity(l.len());
                        for (t, (&lab, &id)) in l.iter().zip(ids).enumerate() {
                            if lab == -100 {
                                loss.push(false);
                            } else if lab == id as i64 {
                                loss.push(true);
                            } else {
                                bail!("labels[{t}] = {lab} but input_ids[{t}] = {id}: labels must be HF-aligned (equal to input_ids, or -100 for no loss; the trainer shifts them)");
                            }
                        }
                        loss
                    }
                };
                Ok((ids.clone(), loss))
            }
        }
    }
}

/// Tokenized documents of one source, concatenated: document `d` is
/// `ids[offsets[d]..offsets[d + 1]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Docs {
    /// All documents' ids, back to back.
    pub ids: Vec<u32>,
    /// `true` where the label is the token itself, `false` where it is -100.
    pub loss: Vec<bool>,
    /// `len() + 1` boundaries into `ids`, starting at 0.
    pub offsets: Vec<usize>,
}

impl Docs {
    /// Number of documents.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// No documents.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids and loss mask of document `d` (panics if `d >= len()`).
    pub fn doc(&self, d: usize) -> (&[u32], &[bool]) {
        let (a, b) = (self.offsets[d], self.offsets[d + 1]);
        (&self.ids[a..b], &self.loss[a..b])
    }

    /// Number of tokens over all documents.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// A source ready for the [`Mixer`](super::Mixer).
#[derive(Debug, Clone)]
pub struct TokenizedSource {
    /// The `[[data]]` block it came from.
    pub spec: SourceSpec,
    /// `spec.path` resolved against the recipe folder.
    pub path: PathBuf,
    /// The tokenized documents, in file order.
    pub docs: Docs,
    /// Whether the documents came from the cache (no tokenization ran).
    pub from_cache: bool,
}

impl TokenizedSource {
    /// The name used in reports.
    pub fn name(&self) -> String {
        self.spec.display_name()
    }
}

fn block(index: usize, spec: &SourceSpec) -> String {
    format!("[[data]] #{} (kind = \"{}\", path = \"{}\")", index + 1, spec.kind, spec.path.display())
}

/// Reads and tokenizes every `[[data]]` block, using `cache_dir` when given. `base_dir` is the
/// folder relative paths are resolved against (the recipe's).
pub fn load_sources(specs: &[SourceSpec], base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>) -> Result<Vec<TokenizedSource>> {
    if specs.is_empty() {
        bail!("the recipe has no [[data]] blocks; add at least one (kind, path, weight)");
    }
    specs.iter().enumerate().map(|(i, s)| load_source(i, s, base_dir, enc, cache_dir)).collect()
}

/// Reads and tokenizes one `[[data]]` block (`index` is 0-based, used in error messages).
pub fn load_source(index: usize, spec: &SourceSpec, base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>) -> Result<TokenizedSource> {
    let ctx = || block(index, spec);
    spec.check().with_context(ctx)?;
    if spec.template() == Template::ChatMl {
        for marker in [CHATML_START, CHATML_END] {
            if enc.tokenizer().token_to_id(marker).is_none() {
                return Err(anyhow::anyhow!(
                    "`template = \"chatml\"` but the tokenizer has no `{marker}` token, so the markers would be split into ordinary pieces; use `template = \"alpaca\"` (or a tokenizer with ChatML tokens)"
                ))
                .with_context(ctx);
            }
        }
    }
    let path = if spec.path.is_absolute() { spec.path.clone() } else { base_dir.join(&spec.path) };
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("data file {} not found; fix `path` (relative paths start at {})", path.display(), base_dir.display()))
        .with_context(ctx)?;
    if !meta.is_file() {
        return Err(anyhow::anyhow!("{} is not a file; `path` must name one data file", path.display())).with_context(ctx);
    }
    let key = cache::key(spec.kind, spec.template(), &path, &meta, spec.limit, enc);
    if let Some(dir) = cache_dir {
        if let Some(docs) = cache::load(dir, &path, &key) {
            return Ok(TokenizedSource { spec: spec.clone(), path, docs, from_cache: true });
        }
    }
    let docs = tokenize_file(spec.kind, spec.template(), &path, spec.limit, enc).with_context(ctx)?;
    if let Some(dir) = cache_dir {
        cache::store(dir, &path, &key, &docs)
            .with_context(|| format!("cannot write the token cache in {}; check the folder is writable", dir.display()))?;
    }
    Ok(TokenizedSource { spec: spec.clone(), path, docs, from_cache: false })
}

fn tokenize_file(kind: SourceKind, template: Template, path: &Path, limit: Option<usize>, enc: &Encoder) -> Result<Docs> {
    let mut examples = read_examples(kind, template, path)?;
    if let Some(n) = limit {
        // A parallel pair is three examples; the limit counts pairs.
        let per = if kind == SourceKind::Parallel { 3 } else { 1 };
        examples.truncate(n.saturating_mul(per));
        if examples.is_empty() {
            bail!("limit = 0 leaves no examples; remove `limit` or the block");
        }
    }
    let file = path.display().to_string();
    // with_min_len keeps rayon's per-item overhead small; collect() keeps file order.
    let encoded: Vec<(Vec<u32>, Vec<bool>)> = examples
        .par_iter()
        .with_min_len(64)
        .map(|(line, ex)| enc.encode(ex).map_err(|e| anyhow::anyhow!("{file}:{line}: {e:#}")))
        .collect::<Result<_>>()?;
    let total: usize = encoded.iter().map(|(i, _)| i.len()).sum();
    let mut docs = Docs { ids: Vec::with_capacity(total), loss: Vec::with_capacity(total), offsets: Vec::with_capacity(encoded.len() + 1) };
    docs.offsets.push(0);
    for (ids, loss) in encoded {
        docs.ids.extend_from_slice(&ids);
        docs.loss.extend_from_slice(&loss);
        docs.offsets.push(docs.ids.len());
    }
    Ok(docs)
}

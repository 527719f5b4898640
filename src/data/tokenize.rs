//! Examples → token ids with a loss mask: files streamed in bounded pieces, each piece
//! tokenized in parallel, into a token store (`store.rs`) or, without a store folder, memory.

use super::cache;
use super::sources::{stream_examples, Example, SourceKind, SourceSpec};
use super::store::{Store, StoreWriter};
use crate::template::{Template, CHATML_END, CHATML_START};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Bytes of a data file read, parsed and tokenized at a time: large enough that every core has
/// thousands of documents to share, small enough that the pieces in flight (at most 3) stay
/// a few tens of MB whatever the file's size.
const CHUNK: usize = 4 << 20;

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

    #[cfg(test)]
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// What a token store's key records of the encoder (`cache::key`): a store made with another
    /// tokenizer, BOS, EOS or vocabulary size is not reused.
    pub(crate) fn key_text(&self) -> String {
        format!("tokenizer={}\nbos={:?}\neos={}\nvocab={}\n", self.fingerprint, self.bos, self.eos, self.vocab_size)
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

/// A source's tokens: in a token store (training) or in memory (sources loaded without a
/// store folder, and tests).
#[derive(Debug, Clone)]
pub enum Tokens {
    /// Everything in RAM.
    Memory(Docs),
    /// Memory-mapped from a verified store.
    Stored(Arc<Store>),
}

impl From<Docs> for Tokens {
    fn from(d: Docs) -> Self {
        Tokens::Memory(d)
    }
}

impl Tokens {
    /// Number of documents.
    pub fn len(&self) -> usize {
        match self {
            Tokens::Memory(d) => d.len(),
            Tokens::Stored(s) => s.docs(),
        }
    }

    /// No documents.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        match self {
            Tokens::Memory(d) => d.tokens(),
            Tokens::Stored(s) => s.tokens(),
        }
    }

    /// Token range `start..end` of document `d`.
    pub fn bounds(&self, d: usize) -> (usize, usize) {
        match self {
            Tokens::Memory(x) => (x.offsets[d], x.offsets[d + 1]),
            Tokens::Stored(s) => (s.offset(d), s.offset(d + 1)),
        }
    }

    /// Whether any token in `a..b` has a label.
    pub fn any_loss(&self, a: usize, b: usize) -> bool {
        match self {
            Tokens::Memory(d) => d.loss[a..b].iter().any(|&l| l),
            Tokens::Stored(s) => s.any_loss(a, b),
        }
    }

    /// Appends the ids and loss mask of tokens `start..start + len`.
    pub fn read(&self, start: usize, len: usize, ids: &mut Vec<u32>, loss: &mut Vec<bool>) {
        match self {
            Tokens::Memory(d) => {
                ids.extend_from_slice(&d.ids[start..start + len]);
                loss.extend_from_slice(&d.loss[start..start + len]);
            }
            Tokens::Stored(s) => s.read(start, len, ids, loss),
        }
    }

    /// Lets the OS take back the pages of a store read so far (a no-op in memory).
    pub fn release(&self) {
        if let Tokens::Stored(s) = self {
            s.release();
        }
    }

    /// For a scan over every document: releases a store's pages every 2^20 documents, so the
    /// scan's peak RSS does not grow with the store.
    pub(crate) fn scanned(&self, d: usize) {
        if let Tokens::Stored(s) = self {
            s.touch_index(d);
        }
    }

    /// All documents in memory (for tests and small sources).
    pub fn to_docs(&self) -> Docs {
        match self {
            Tokens::Memory(d) => d.clone(),
            Tokens::Stored(_) => {
                let mut d = Docs { offsets: vec![0], ..Default::default() };
                for k in 0..self.len() {
                    let (a, b) = self.bounds(k);
                    self.read(a, b - a, &mut d.ids, &mut d.loss);
                    d.offsets.push(d.ids.len());
                }
                d
            }
        }
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
    pub docs: Tokens,
    /// Whether the documents came from an existing store (no tokenization ran).
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

/// Reads and tokenizes every `[[data]]` block, through token stores in `cache_dir` when given
/// (see [`load_sources_with`]). `base_dir` is the folder relative paths are resolved against
/// (the recipe's).
pub fn load_sources(specs: &[SourceSpec], base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>) -> Result<Vec<TokenizedSource>> {
    load_sources_with(specs, base_dir, enc, cache_dir, false)
}

/// [`load_sources`], with a progress bar and a summary line per source on stderr when
/// `progress`. A source whose store in `cache_dir` is present and valid is opened without
/// tokenizing; a missing, stale, truncated or corrupt one is (re)built first.
pub fn load_sources_with(specs: &[SourceSpec], base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>, progress: bool) -> Result<Vec<TokenizedSource>> {
    if specs.is_empty() {
        bail!("the recipe has no [[data]] blocks; add at least one (kind, path, weight)");
    }
    specs.iter().enumerate().map(|(i, s)| load_source_with(i, s, base_dir, enc, cache_dir, progress)).collect()
}

/// Reads and tokenizes one `[[data]]` block (`index` is 0-based, used in error messages).
pub fn load_source(index: usize, spec: &SourceSpec, base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>) -> Result<TokenizedSource> {
    load_source_with(index, spec, base_dir, enc, cache_dir, false)
}

/// [`load_source`] with an optional progress display (see [`load_sources_with`]).
pub fn load_source_with(index: usize, spec: &SourceSpec, base_dir: &Path, enc: &Encoder, cache_dir: Option<&Path>, progress: bool) -> Result<TokenizedSource> {
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
    let name = spec.display_name();
    let (kind, template, limit) = (spec.kind, spec.template(), spec.limit);
    let Some(dir) = cache_dir else {
        let mut docs = Docs { offsets: vec![0], ..Default::default() };
        tokenize_into(kind, template, &path, limit, enc, &mut docs, &Progress::new(&name, meta.len(), progress)).with_context(ctx)?;
        return Ok(TokenizedSource { spec: spec.clone(), path, docs: Tokens::Memory(docs), from_cache: false });
    };
    let key = cache::key(kind, template, &path, &meta, limit, &enc.key_text());
    let dest = cache::file_for(dir, &path, &key);
    match Store::open(&dest, &key.text) {
        Ok(s) => {
            if progress {
                eprintln!("[data] {name}: {} documents, {} tokens from the token store {}", s.docs(), s.tokens(), dest.display());
            }
            return Ok(TokenizedSource { spec: spec.clone(), path, docs: Tokens::Stored(Arc::new(s)), from_cache: true });
        }
        Err(e) if dest.exists() => eprintln!("[data] the token store {} cannot be used ({e:#}); rebuilding it", dest.display()),
        Err(_) => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the token store folder {}; check the folder is writable", dir.display()))?;
    crate::io::atomic::clean_stale_in(dir, None);
    let mut w = StoreWriter::create(&dest, &key.text, enc.vocab_size)?;
    let bar = Progress::new(&name, meta.len(), progress);
    tokenize_into(kind, template, &path, limit, enc, &mut w, &bar).with_context(ctx)?;
    w.finish()?;
    let s = Store::open(&dest, &key.text).with_context(|| format!("the token store {} just written does not verify; check the disk", dest.display()))?;
    bar.done(&dest);
    Ok(TokenizedSource { spec: spec.clone(), path, docs: Tokens::Stored(Arc::new(s)), from_cache: false })
}

/// Where tokenized documents go: memory or a store being written.
trait Sink {
    fn push(&mut self, ids: &[u32], loss: &[bool]) -> Result<()>;
}

impl Sink for Docs {
    fn push(&mut self, ids: &[u32], loss: &[bool]) -> Result<()> {
        self.ids.extend_from_slice(ids);
        self.loss.extend_from_slice(loss);
        self.offsets.push(self.ids.len());
        Ok(())
    }
}

impl Sink for StoreWriter {
    fn push(&mut self, ids: &[u32], loss: &[bool]) -> Result<()> {
        StoreWriter::push(self, ids, loss)
    }
}

/// Bytes, documents and tokens done, as a bar with throughput and ETA (hidden when off).
struct Progress {
    bar: indicatif::ProgressBar,
    name: String,
    on: bool,
    t0: Instant,
    bytes: std::cell::Cell<u64>,
    docs: std::cell::Cell<u64>,
    tokens: std::cell::Cell<u64>,
}

impl Progress {
    fn new(name: &str, len: u64, on: bool) -> Self {
        let bar = if on { indicatif::ProgressBar::new(len) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, ETA {eta}, {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("[data] {name}"));
        Progress { bar, name: name.to_string(), on, t0: Instant::now(), bytes: 0.into(), docs: 0.into(), tokens: 0.into() }
    }

    fn add(&self, bytes: u64, docs: u64, tokens: u64) {
        self.bytes.set(self.bytes.get() + bytes);
        self.docs.set(self.docs.get() + docs);
        self.tokens.set(self.tokens.get() + tokens);
        self.bar.set_position(self.bytes.get());
        self.bar.set_message(format!("{} documents, {} tokens", self.docs.get(), self.tokens.get()));
    }

    fn done(&self, dest: &Path) {
        self.bar.finish_and_clear();
        if self.on {
            let s = self.t0.elapsed().as_secs_f64();
            let mb = self.bytes.get() as f64 / 1e6;
            eprintln!(
                "[data] {}: {} documents, {} tokens from {mb:.1} MB in {s:.1} s ({:.1} MB/s) into {}",
                self.name,
                self.docs.get(),
                self.tokens.get(),
                mb / s.max(1e-9),
                dest.display()
            );
        }
    }
}

/// Streams the file through the tokenizer into `sink`: a reader thread reads and parses the
/// next piece while every core tokenizes the current one, and the bounded channel keeps at
/// most three pieces in memory.
fn tokenize_into(kind: SourceKind, template: Template, path: &Path, limit: Option<usize>, enc: &Encoder, sink: &mut dyn Sink, bar: &Progress) -> Result<()> {
    // A parallel pair is three examples; the limit counts pairs.
    let per = if kind == SourceKind::Parallel { 3 } else { 1 };
    let max = limit.map(|n| n.saturating_mul(per));
    let file = path.display().to_string();
    type Piece = Result<(Vec<(usize, Example)>, u64)>;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(1);
    let (seen, kept) = std::thread::scope(|s| -> Result<(usize, usize)> {
        s.spawn(move || {
            let r = stream_examples(kind, template, path, CHUNK, |ex, bytes| tx.send(Ok((ex, bytes))).map_err(|_| anyhow::anyhow!("tokenization stopped")));
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        });
        let (mut seen, mut kept) = (0usize, 0usize);
        // Leaving this loop early drops `rx`, which ends the reader at its next send.
        for piece in rx {
            let (mut examples, bytes) = piece?;
            seen += examples.len();
            if let Some(m) = max {
                // Records past the limit are still read, so the whole file is validated.
                examples.truncate(m.saturating_sub(kept));
            }
            kept += examples.len();
            // with_min_len keeps rayon's per-item overhead small; collect() keeps file order.
            let encoded: Vec<(Vec<u32>, Vec<bool>)> = examples
                .par_iter()
                .with_min_len(64)
                .map(|(line, ex)| enc.encode(ex).map_err(|e| anyhow::anyhow!("{file}:{line}: {e:#}")))
                .collect::<Result<_>>()?;
            let mut tokens = 0;
            for (ids, loss) in &encoded {
                sink.push(ids, loss)?;
                tokens += ids.len() as u64;
            }
            bar.add(bytes, encoded.len() as u64, tokens);
        }
        Ok((seen, kept))
    })?;
    if seen == 0 {
        bail!("{file}: no examples found; the file is empty or has only blank lines: fill it, or leave it out (in a recipe, its [[data]] block)");
    }
    if kept == 0 {
        bail!("limit = 0 leaves no examples; remove `limit` or the block");
    }
    Ok(())
}

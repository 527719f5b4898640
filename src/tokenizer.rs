//! The model's tokenizer (`tokenizer.json` through the `tokenizers` crate) and its
//! `tokenizer_config.json` (chat template, special tokens). Models without one — the test
//! fixtures — are driven by token ids.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

// Every `tokenizer.json` the crate reads comes through here, so that a missing file or one the
// `tokenizers` library refuses gets the same message and the same fix wherever it is named.

/// `path` itself if it is a file, `path/tokenizer.json` if it is a folder.
pub fn resolve_tokenizer_file(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join("tokenizer.json");
        if !file.is_file() {
            bail!(
                "folder {} has no tokenizer.json; pass the tokenizer.json file itself or the folder \
                 that holds it (a SentencePiece tokenizer.model must first be converted to \
                 tokenizer.json, e.g. by loading it once with transformers' LlamaTokenizerFast and \
                 saving it)",
                path.display()
            );
        }
        Ok(file)
    } else if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        bail!("tokenizer {} does not exist; pass a tokenizer.json file or the folder that holds it", path.display())
    }
}

/// Loads a `tokenizer.json` (or the folder holding one).
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    read_tokenizer(path).map(|(t, _)| t)
}

/// [`load_tokenizer`], also returning the file's bytes (for callers that fingerprint it).
pub fn read_tokenizer(path: &Path) -> Result<(tokenizers::Tokenizer, Vec<u8>)> {
    let file = resolve_tokenizer_file(path)?;
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read tokenizer {}", file.display()))?;
    let tok = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| anyhow!("{} is not a tokenizer.json that the tokenizers library can load: {e}", file.display()))?;
    Ok((tok, bytes))
}

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    /// `chat_template` from tokenizer_config.json, if any.
    pub chat_template: Option<String>,
}

impl Tok {
    /// The text of every special added token (`<|im_start|>`, `</s>`): what a prompt template
    /// writes and what text from outside must not smuggle in.
    pub fn special_token_texts(&self) -> Vec<String> {
        self.inner.get_added_tokens_decoder().into_values().filter(|t| t.special && !t.content.is_empty()).map(|t| t.content).collect()
    }

    /// Loads `tokenizer.json` from a folder (or the file itself). `Ok(None)` when the folder
    /// has none.
    pub fn load_optional(path: &Path) -> Result<Option<Self>> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Ok(None);
        }
        Self::load(&file).map(Some)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let file = resolve_tokenizer_file(path)?;
        let inner = load_tokenizer(&file)?;
        let cfg_path = file.with_file_name("tokenizer_config.json");
        let chat_template = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("chat_template").and_then(|t| t.as_str()).map(String::from));
        Ok(Tok { inner, chat_template })
    }

    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Self::encode`] with each token's byte span `[start, end)` in `text` (special tokens
    /// the tokenizer adds get an empty span).
    pub fn encode_with_spans(&self, text: &str, add_special: bool) -> Result<(Vec<u32>, Vec<[usize; 2]>)> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().iter().map(|&(a, b)| [a, b]).collect()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether encoding with special tokens already puts `bos` first.
    pub fn adds_bos(&self, bos: u32) -> bool {
        self.encode("a", true).map(|ids| ids.first() == Some(&bos)).unwrap_or(false)
    }
}

/// Turns a growing list of ids into text chunks as they become printable: multi-byte
/// characters split over several byte-fallback tokens are held back until complete.
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder { ids: Vec::new(), printed: 0 }
    }

    /// Adds one id and returns the newly printable text, if any.
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(None);
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(if new.is_empty() { None } else { Some(new) })
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads a text file for scoring, with a clear error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))
}

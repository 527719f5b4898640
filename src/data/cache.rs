//! Which token store belongs to a source: its key and file name.
//!
//! One store per source (format in `store.rs`), named `{file stem}-{key hash}.tok`, keyed by:
//! the data file's absolute path, size and mtime; a hash of tokenizer.json's bytes; the kind
//! and `limit`; BOS/EOS/vocab size; the prompt templates; and [`FORMAT`] (bump it when encoding
//! rules change). The full key text is stored in the file and compared on open, so a hash
//! collision cannot return wrong data, and a changed file or tokenizer gets a new store.

use super::sources::{instruction_answer, instruction_prompt, SourceKind, EN_TO_ZH_INSTRUCTION, ZH_TO_EN_INSTRUCTION};
use crate::template::{Template, Turn};
use std::path::{Path, PathBuf};

/// Version of the encoding rules (the store layout has its own, [`super::store::VERSION`]).
pub const FORMAT: u32 = 3;

/// FNV-1a, 128-bit: stable across Rust releases, unlike `DefaultHasher`, so caches survive a
/// toolchain upgrade.
pub(crate) fn hash128(bytes: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for &b in bytes {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

pub(crate) struct Key {
    pub(crate) text: String,
    hash: u128,
}

/// `encoder` is [`super::tokenize::Encoder::key_text`].
pub(crate) fn key(kind: SourceKind, template: Template, path: &Path, meta: &std::fs::Metadata, limit: Option<usize>, encoder: &str) -> Key {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|| "unknown".into());
    // A rendered sample stands for the template code: editing a template invalidates the cache.
    let history = [Turn { user: "u".into(), assistant: "a".into() }];
    let sample = format!(
        "{}\0{}\0{ZH_TO_EN_INSTRUCTION}\0{EN_TO_ZH_INSTRUCTION}",
        instruction_prompt(template, "i", "x", &history),
        instruction_answer(template, "o")
    );
    let templates = hash128(sample.as_bytes());
    let text = format!(
        "linly-lora data cache v{FORMAT} store v{}\nkind={kind}\ntemplate={template}\nlimit={limit:?}\npath={}\nsize={}\nmtime={mtime}\n{encoder}templates={templates:032x}\n",
        super::store::VERSION,
        abs.display(),
        meta.len(),
    );
    let hash = hash128(text.as_bytes());
    Key { text, hash }
}

pub(crate) fn file_for(dir: &Path, data_path: &Path, key: &Key) -> PathBuf {
    let stem: String = data_path
        .file_stem()
        .map(|s| s.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect())
        .unwrap_or_default();
    dir.join(format!("{stem}-{:016x}.tok", (key.hash >> 64) as u64 ^ key.hash as u64))
}

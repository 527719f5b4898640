//! On-disk cache of tokenized sources, so re-runs and `--resume` skip tokenization.
//!
//! One file per source, named `{file stem}-{key hash}.tok`, keyed by: the data file's absolute
//! path, size and mtime; a hash of tokenizer.json's bytes; the kind and `limit`; BOS/EOS/vocab size; the
//! prompt templates; and [`FORMAT`] (bump it when encoding rules change). The full key text is
//! stored in the file and compared on load, so a hash collision cannot return wrong data.
//!
//! Layout (little-endian): magic `LLDATA\0\x01`, key length u32 + key bytes, n_docs u64,
//! n_tokens u64, offsets u64 × (n_docs + 1), ids u32 × n_tokens, loss u8 × n_tokens, checksum u64.
//! A file that is truncated, corrupt or stale is a cache miss and is rewritten; files are written
//! to a temporary name and renamed, so a killed run never leaves a half file under the real name.

use super::sources::{instruction_answer, instruction_prompt, SourceKind, EN_TO_ZH_INSTRUCTION, ZH_TO_EN_INSTRUCTION};
use super::tokenize::{Docs, Encoder};
use crate::template::{Template, Turn};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the encoding rules and file layout.
pub const FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"LLDATA\0\x01";

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

/// Word-at-a-time checksum of the payload: fast enough for hundreds of millions of tokens and
/// enough to catch a torn or bit-rotted file (not adversarial input).
#[derive(Default)]
struct Checksum(u64);

impl Checksum {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9E3779B97F4A7C15);
    }
}

pub(crate) struct Key {
    text: String,
    hash: u128,
}

pub(crate) fn key(kind: SourceKind, template: Template, path: &Path, meta: &std::fs::Metadata, limit: Option<usize>, enc: &Encoder) -> Key {
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
        "linly-lora data cache v{FORMAT}\nkind={kind}\ntemplate={template}\nlimit={limit:?}\npath={}\nsize={}\nmtime={mtime}\ntokenizer={}\nbos={:?}\neos={}\nvocab={}\ntemplates={templates:032x}\n",
        abs.display(),
        meta.len(),
        enc.fingerprint(),
        enc.bos,
        enc.eos,
        enc.vocab_size,
    );
    let hash = hash128(text.as_bytes());
    Key { text, hash }
}

fn file_for(dir: &Path, data_path: &Path, key: &Key) -> PathBuf {
    let stem: String = data_path
        .file_stem()
        .map(|s| s.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect())
        .unwrap_or_default();
    dir.join(format!("{stem}-{:016x}.tok", (key.hash >> 64) as u64 ^ key.hash as u64))
}

/// The cached documents, or `None` on any miss (absent, stale, corrupt).
pub(crate) fn load(dir: &Path, data_path: &Path, key: &Key) -> Option<Docs> {
    let bytes = std::fs::read(file_for(dir, data_path, key)).ok()?;
    parse(&bytes, key)
}

fn parse(bytes: &[u8], key: &Key) -> Option<Docs> {
    let mut r = Reader { b: bytes, i: 0 };
    if r.take(8)? != MAGIC {
        return None;
    }
    let klen = r.u32()? as usize;
    if r.take(klen)? != key.text.as_bytes() {
        return None;
    }
    let n_docs = usize::try_from(r.u64()?).ok()?;
    let n_tok = usize::try_from(r.u64()?).ok()?;
    // Reject sizes the file cannot hold before allocating for them.
    let need = n_docs.checked_add(1)?.checked_mul(8)?.checked_add(n_tok.checked_mul(5)?)?.checked_add(8)?;
    if r.b.len() - r.i != need {
        return None;
    }
    let mut ck = Checksum::default();
    let mut offsets = Vec::with_capacity(n_docs + 1);
    for _ in 0..=n_docs {
        let o = r.u64()?;
        ck.add(o);
        offsets.push(usize::try_from(o).ok()?);
    }
    if offsets[0] != 0 || offsets[n_docs] != n_tok || offsets.windows(2).any(|w| w[0] > w[1]) {
        return None;
    }
    let mut ids = Vec::with_capacity(n_tok);
    for c in r.take(n_tok * 4)?.chunks_exact(4) {
        let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        ck.add(v as u64);
        ids.push(v);
    }
    let mut loss = Vec::with_capacity(n_tok);
    for &b in r.take(n_tok)? {
        ck.add(b as u64);
        loss.push(b != 0);
    }
    if r.u64()? != ck.0 {
        return None;
    }
    Some(Docs { ids, loss, offsets })
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.i.checked_add(n)?;
        let s = self.b.get(self.i..end)?;
        self.i = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
}

/// Writes the cache file atomically (temporary name in the same folder, then rename).
pub(crate) fn store(dir: &Path, data_path: &Path, key: &Key, docs: &Docs) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    let dest = file_for(dir, data_path, key);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = dest.with_extension(format!("tok.tmp-{}-{nanos}", std::process::id()));
    let res = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut ck = Checksum::default();
        w.write_all(MAGIC)?;
        w.write_all(&(key.text.len() as u32).to_le_bytes())?;
        w.write_all(key.text.as_bytes())?;
        w.write_all(&(docs.len() as u64).to_le_bytes())?;
        w.write_all(&(docs.ids.len() as u64).to_le_bytes())?;
        for &o in &docs.offsets {
            ck.add(o as u64);
            w.write_all(&(o as u64).to_le_bytes())?;
        }
        for &id in &docs.ids {
            ck.add(id as u64);
            w.write_all(&id.to_le_bytes())?;
        }
        for &l in &docs.loss {
            ck.add(l as u64);
            w.write_all(&[l as u8])?;
        }
        w.write_all(&ck.0.to_le_bytes())?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

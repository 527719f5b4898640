//! Tokenizer efficiency on text: tokens per character, byte-fallback tokens, round-trip failures.

use super::bpe::byte_level_to_bytes;
use super::load_tokenizer;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use tokenizers::Tokenizer;

/// Counts for one tokenizer on some text. Every non-empty line is a separate document; line
/// breaks are neither tokenized nor counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TextStats {
    /// Non-empty lines.
    pub documents: u64,
    /// Unicode scalar values.
    pub chars: u64,
    /// Tokens, without special tokens.
    pub tokens: u64,
    /// SentencePiece-style: tokens like `<0xE4>`. Byte-level BPE has no fallback, so there this
    /// counts the analogous waste: tokens whose bytes are not valid UTF-8 on their own, i.e. that
    /// hold a fragment of a character.
    pub byte_fallback_tokens: u64,
    /// Documents where `decode(encode(x)) != x` (special tokens skipped on decode).
    pub roundtrip_failures: u64,
}

/// One row of [`stats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizerStats {
    /// The tokenizer path as given.
    pub tokenizer: String,
    /// The text file as given.
    pub file: String,
    /// Unicode chars (line breaks excluded).
    pub chars: u64,
    /// Tokens without special tokens.
    pub tokens: u64,
    /// `tokens / chars` (0 for an empty file).
    pub tokens_per_char: f64,
    /// See [`TextStats::byte_fallback_tokens`].
    pub byte_fallback_tokens: u64,
    /// Lines where `decode(encode(x)) != x`.
    pub roundtrip_failures: u64,
}

fn json_has_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => m.get("type").and_then(|t| t.as_str()) == Some(ty) || m.values().any(|x| json_has_type(x, ty)),
        serde_json::Value::Array(xs) => xs.iter().any(|x| json_has_type(x, ty)),
        _ => false,
    }
}

fn is_byte_level(tok: &Tokenizer) -> bool {
    let pre = tok.get_pre_tokenizer().and_then(|p| serde_json::to_value(p).ok());
    pre.is_some_and(|v| json_has_type(&v, "ByteLevel"))
}

fn is_byte_fallback_piece(piece: &str) -> bool {
    let b = piece.as_bytes();
    b.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') && b[3].is_ascii_hexdigit() && b[4].is_ascii_hexdigit()
}

/// Measures `tok` on `lines` (empty lines are skipped).
pub fn measure_lines<'a>(tok: &Tokenizer, lines: impl IntoIterator<Item = &'a str>) -> Result<TextStats> {
    let byte_level = is_byte_level(tok);
    let mut st = TextStats::default();
    let lines: Vec<&str> = lines.into_iter().filter(|l| !l.is_empty()).collect();
    // Batches let tokenizers use its thread pool without holding a whole corpus of encodings.
    for chunk in lines.chunks(1024) {
        let encodings = tok.encode_batch(chunk.to_vec(), false).map_err(|e| anyhow!("encoding failed: {e}"))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        let decoded = tok.decode_batch(&ids, true).map_err(|e| anyhow!("decoding failed: {e}"))?;
        for ((line, enc), dec) in chunk.iter().zip(&encodings).zip(&decoded) {
            st.documents += 1;
            st.chars += line.chars().count() as u64;
            st.tokens += enc.get_ids().len() as u64;
            st.byte_fallback_tokens += enc
                .get_tokens()
                .iter()
                .filter(|t| {
                    if byte_level {
                        byte_level_to_bytes(t).is_none_or(|b| std::str::from_utf8(&b).is_err())
                    } else {
                        is_byte_fallback_piece(t)
                    }
                })
                .count() as u64;
            if dec != line {
                st.roundtrip_failures += 1;
            }
        }
    }
    Ok(st)
}

/// Every tokenizer × every text file. Paths are reported as given.
pub fn stats(tokenizers: &[PathBuf], files: &[PathBuf]) -> Result<Vec<TokenizerStats>> {
    let texts = files
        .iter()
        .map(|f| std::fs::read_to_string(f).with_context(|| format!("cannot read text file {} (must be UTF-8)", f.display())))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for tp in tokenizers {
        let tok = load_tokenizer(tp)?;
        for (file, text) in files.iter().zip(&texts) {
            let st = measure_lines(&tok, text.lines())
                .with_context(|| format!("tokenizer {} on {}", tp.display(), file.display()))?;
            rows.push(TokenizerStats {
                tokenizer: tp.display().to_string(),
                file: file.display().to_string(),
                chars: st.chars,
                tokens: st.tokens,
                tokens_per_char: if st.chars == 0 { 0.0 } else { st.tokens as f64 / st.chars as f64 },
                byte_fallback_tokens: st.byte_fallback_tokens,
                roundtrip_failures: st.roundtrip_failures,
            });
        }
    }
    Ok(rows)
}

/// A Markdown table of [`stats`] rows, columns padded for reading in a terminal.
pub fn render_table(rows: &[TokenizerStats]) -> String {
    let header = ["tokenizer", "file", "chars", "tokens", "tokens/char", "byte-fallback", "roundtrip failures"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.tokenizer.clone(),
                r.file.clone(),
                r.chars.to_string(),
                r.tokens.to_string(),
                format!("{:.3}", r.tokens_per_char),
                r.byte_fallback_tokens.to_string(),
                r.roundtrip_failures.to_string(),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<String>| -> String {
        let padded: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(width[i] - c.chars().count());
                // Text left, numbers right.
                if i < 2 { format!("{c}{pad}") } else { format!("{pad}{c}") }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push_str(&format!(
        "|{}|\n",
        width.iter().enumerate().map(|(i, w)| if i < 2 { format!(":{}", "-".repeat(w + 1)) } else { format!("{}:", "-".repeat(w + 1)) }).collect::<Vec<_>>().join("|")
    ));
    for row in cells {
        out.push_str(&line(row.to_vec()));
    }
    out
}

/// Result of [`encode`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Vocab spelling of each token (`▁Hello`, `<0xE4>`, `ä¸Ń`).
    pub pieces: Vec<String>,
    /// `decode(ids)` with special tokens skipped, to check the round trip by eye.
    pub decoded: String,
}

/// Encodes `text`, with or without the tokenizer's special tokens (e.g. LLaMA's BOS).
pub fn encode(tok: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Encoded> {
    let enc = tok.encode(text, add_special_tokens).map_err(|e| anyhow!("encoding {text:?} failed: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let decoded = tok.decode(&ids, true).map_err(|e| anyhow!("decoding failed: {e}"))?;
    Ok(Encoded { ids, pieces: enc.get_tokens().to_vec(), decoded })
}

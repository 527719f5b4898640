//! HF tokenizer files → GGUF `tokenizer.ggml.*` metadata: the inverse of [`super::tokenizer`],
//! for the same two kinds of vocabulary.
//!
//! * Byte-level BPE (GPT-2, SmolLM2, LLaMA-3) → `gpt2`: tokens in id order, merges as `"a b"`
//!   strings in rank order, and `tokenizer.ggml.pre` chosen by matching the tokenizer's split
//!   regexes against llama.cpp's table.
//! * SentencePiece-style BPE with byte fallback (LLaMA-1/2, Chinese-LLaMA) → `llama`: llama.cpp
//!   merges the adjacent pair whose result has the highest score, so each piece scores
//!   `−rank` of the first merge that makes it. Pieces added by `vocab extend` come with merges
//!   ranked after all old ones, so they keep their place. `<0xNN>` pieces are byte tokens.
//!
//! An extended vocabulary needs nothing special: its pieces are real BPE entries with merges.
//! Special added tokens become control tokens, other added tokens user-defined ones; ids the
//! tokenizer does not cover up to the embedding's row count are `[PADn]` unused tokens, as
//! convert_hf_to_gguf.py pads them, because llama.cpp wants one token per row.

use super::reader::{GgufArray, GgufValue};
use super::tokenizer::{pre_tokenizer, SPACE_BEFORE_UNSPACED, TYPE_BYTE as BYTE, TYPE_CONTROL as CONTROL, TYPE_NORMAL as NORMAL, TYPE_UNKNOWN as UNKNOWN, TYPE_UNUSED as UNUSED, TYPE_USER_DEFINED as USER_DEFINED};
use super::writer::GgufWriter;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;


/// The vocabulary as GGUF metadata, owned.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `gpt2` or `llama`.
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub scores: Option<Vec<f32>>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: Option<bool>,
    /// `(name, template)`; the name is `None` for the default template.
    pub chat_templates: Vec<(Option<String>, String)>,
    pub warnings: Vec<String>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

/// The regexes a byte-level tokenizer splits with, in order, as llama.cpp's table lists them.
fn split_regexes(pre: &Value) -> Vec<String> {
    let gpt2 = pre_tokenizer("gpt-2").map(|p| p.regexes[0].to_string()).unwrap_or_default();
    let mut out = Vec::new();
    let mut visit = |p: &Value| match p.get("type").and_then(Value::as_str) {
        Some("Split") => {
            if let Some(r) = p.pointer("/pattern/Regex").and_then(Value::as_str) {
                out.push(r.to_string());
            }
        }
        Some("Digits") if p.get("individual_digits").and_then(Value::as_bool) == Some(true) => out.push(r"\p{N}".into()),
        Some("ByteLevel") if p.get("use_regex").and_then(Value::as_bool) != Some(false) => out.push(gpt2.clone()),
        _ => {}
    };
    match pre.get("pretokenizers").and_then(Value::as_array) {
        Some(list) => list.iter().for_each(&mut visit),
        None => visit(pre),
    }
    out
}

/// llama.cpp's `tokenizer.ggml.pre` whose regex list is exactly `regexes`.
fn match_pre(regexes: &[String]) -> Option<&'static str> {
    const CANDIDATES: [&str; 9] = ["gpt-2", "smollm", "llama-bpe", "qwen2", "dbrx", "default", "falcon", "tekken", "starcoder"];
    CANDIDATES.into_iter().find(|name| {
        pre_tokenizer(name).is_some_and(|p| p.regexes.len() == regexes.len() && p.regexes.iter().zip(regexes).all(|(a, b)| *a == b))
    })
}

fn merge_strings(model: &Value) -> Result<Vec<String>> {
    let Some(list) = model.get("merges").and_then(Value::as_array) else { return Ok(vec![]) };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(x), Some(y)) => Ok(format!("{x} {y}")),
                _ => bail!("a merge is not a pair of strings: {m}"),
            },
            _ => bail!("a merge is neither `a b` nor [a, b]: {m}"),
        })
        .collect()
}

fn is_byte_piece(s: &str) -> bool {
    s.len() == 6 && s.starts_with("<0x") && s.ends_with('>') && u8::from_str_radix(&s[3..5], 16).is_ok()
}

/// Reads `tokenizer.json`, `tokenizer_config.json` and `config.json` from `dir` and builds the
/// GGUF vocabulary for a model with `rows` embedding rows. `Ok(None)` without a tokenizer.json.
pub fn gguf_vocab(dir: &Path, rows: usize) -> Result<Option<GgufVocab>> {
    let Some(tj) = read_json(&dir.join("tokenizer.json"))? else { return Ok(None) };
    let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let file = dir.join("tokenizer.json");
    let model = tj.get("model").with_context(|| format!("{}: no `model`", file.display()))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        bail!("{}: only BPE tokenizers (byte-level or SentencePiece-style) can be exported to GGUF", file.display());
    }
    let vocab = model.get("vocab").and_then(Value::as_object).with_context(|| format!("{}: no model.vocab", file.display()))?;
    let mut by_id: HashMap<u32, String> = HashMap::new();
    for (piece, id) in vocab {
        let id = id.as_u64().with_context(|| format!("{}: vocab id of `{piece}` is not an integer", file.display()))?;
        by_id.insert(id as u32, piece.clone());
    }
    let mut added: HashMap<u32, bool> = HashMap::new();
    for t in tj.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        if let (Some(id), Some(content)) = (t.get("id").and_then(Value::as_u64), t.get("content").and_then(Value::as_str)) {
            by_id.insert(id as u32, content.to_string());
            added.insert(id as u32, t.get("special").and_then(Value::as_bool).unwrap_or(false));
        }
    }
    let n_tok = by_id.keys().max().map(|m| *m as usize + 1).unwrap_or(0);
    if n_tok > rows {
        bail!("{}: the tokenizer has {n_tok} tokens but the model has {rows} embedding rows", file.display());
    }
    let mut warnings = Vec::new();
    let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
    let kind = if byte_fallback { "llama" } else { "gpt2" };
    let unk_piece = model.get("unk_token").and_then(Value::as_str).map(str::to_string);
    let mut tokens = Vec::with_capacity(rows);
    let mut types = Vec::with_capacity(rows);
    let mut padded = 0;
    for id in 0..rows as u32 {
        match by_id.get(&id) {
            Some(p) => {
                let ty = match added.get(&id) {
                    Some(true) => CONTROL,
                    Some(false) => USER_DEFINED,
                    None if kind == "llama" && unk_piece.as_deref() == Some(p.as_str()) => UNKNOWN,
                    None if kind == "llama" && is_byte_piece(p) => BYTE,
                    None => NORMAL,
                };
                tokens.push(p.clone());
                types.push(ty);
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
                padded += 1;
            }
        }
    }
    if padded > 0 {
        warnings.push(format!("{padded} embedding rows have no token; written as [PADn] unused tokens"));
    }
    let merges = merge_strings(model).with_context(|| format!("{}: model.merges", file.display()))?;
    let index: HashMap<&str, u32> = by_id.iter().map(|(id, p)| (p.as_str(), *id)).collect();

    let (pre, scores, add_space_prefix) = if kind == "gpt2" {
        let mut regexes = tj.get("pre_tokenizer").map(split_regexes).unwrap_or_default();
        if let Some(i) = regexes.iter().position(|r| r == SPACE_BEFORE_UNSPACED) {
            regexes.remove(i);
            warnings.push(
                "the tokenizer splits a space off a following Chinese character (`vocab extend`); llama.cpp cannot, \
                 so it reads ` 中` as the base's byte pieces: the same text, which the model predicts less well"
                    .into(),
            );
        }
        let pre = match match_pre(&regexes) {
            Some(p) => p.to_string(),
            None => {
                warnings.push(format!(
                    "the tokenizer's split regexes match none of llama.cpp's pre-tokenizers this exporter knows; wrote `default` ({} regexes)",
                    regexes.len()
                ));
                "default".to_string()
            }
        };
        (Some(pre), None, None)
    } else {
        // −rank of the first merge producing each piece; pieces no merge makes come after all
        // merged ones, in id order; byte, control and unknown pieces score 0 as in LLaMA's model.
        let n_merges = merges.len() as f32;
        let mut scores: Vec<f32> = (0..rows).map(|i| -(n_merges + i as f32)).collect();
        let mut set = vec![false; rows];
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else { continue };
            if let Some(&id) = index.get(format!("{a}{b}").as_str()) {
                if !set[id as usize] {
                    set[id as usize] = true;
                    scores[id as usize] = -(rank as f32);
                }
            }
        }
        for (s, t) in scores.iter_mut().zip(&types) {
            if *t != NORMAL && *t != USER_DEFINED {
                *s = 0.0;
            }
        }
        let norm = tj.get("normalizer").map(|n| n.to_string()).unwrap_or_default();
        let pre = tj.get("pre_tokenizer").map(|n| n.to_string()).unwrap_or_default();
        let prefix = norm.contains("\"Prepend\"") || (pre.contains("Metaspace") && !pre.contains("\"never\""));
        (None, Some(scores), Some(prefix))
    };

    let id_of = |key: &str| -> Option<u32> {
        let from_cfg = match cfg.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
            _ => None,
        };
        let name = key.trim_end_matches("_id");
        let from_tc = match tc.get(name) {
            Some(Value::String(s)) => index.get(s.as_str()).copied(),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).and_then(|s| index.get(s).copied()),
            _ => None,
        };
        from_cfg.or(from_tc).filter(|&i| (i as usize) < rows)
    };
    let unk = id_of("unk_token_id").or_else(|| unk_piece.as_deref().and_then(|p| index.get(p).copied()));
    let mut chat_templates = Vec::new();
    match tc.get("chat_template") {
        Some(Value::String(s)) => chat_templates.push((None, s.clone())),
        Some(Value::Array(list)) => {
            for t in list {
                if let (Some(n), Some(s)) = (t.get("name").and_then(Value::as_str), t.get("template").and_then(Value::as_str)) {
                    chat_templates.push(((n != "default").then(|| n.to_string()), s.to_string()));
                }
            }
        }
        _ => {}
    }
    Ok(Some(GgufVocab {
        model: kind.to_string(),
        pre,
        tokens,
        types,
        scores,
        merges,
        bos: id_of("bos_token_id"),
        eos: id_of("eos_token_id"),
        unk,
        pad: id_of("pad_token_id"),
        add_bos: tc.get("add_bos_token").and_then(Value::as_bool).unwrap_or(kind == "llama"),
        add_eos: tc.get("add_eos_token").and_then(Value::as_bool).unwrap_or(false),
        add_space_prefix,
        chat_templates,
        warnings,
    }))
}

impl GgufVocab {
    /// Adds the `tokenizer.*` keys.
    pub fn write(&self, w: &mut GgufWriter) -> Result<()> {
        let strs = |v: &[String]| -> Vec<Vec<u8>> { v.iter().map(|s| s.as_bytes().to_vec()).collect() };
        w.add_kv("tokenizer.ggml.model", &GgufValue::String(self.model.as_bytes()))?;
        if let Some(p) = &self.pre {
            w.add_kv("tokenizer.ggml.pre", &GgufValue::String(p.as_bytes()))?;
        }
        let toks = strs(&self.tokens);
        w.add_kv("tokenizer.ggml.tokens", &GgufValue::Array(GgufArray::String(toks.iter().map(Vec::as_slice).collect())))?;
        w.add_kv("tokenizer.ggml.token_type", &GgufValue::Array(GgufArray::I32(self.types.clone())))?;
        if let Some(s) = &self.scores {
            w.add_kv("tokenizer.ggml.scores", &GgufValue::Array(GgufArray::F32(s.clone())))?;
        }
        if self.model == "gpt2" {
            let m = strs(&self.merges);
            w.add_kv("tokenizer.ggml.merges", &GgufValue::Array(GgufArray::String(m.iter().map(Vec::as_slice).collect())))?;
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos),
            ("tokenizer.ggml.eos_token_id", self.eos),
            ("tokenizer.ggml.unknown_token_id", self.unk),
            ("tokenizer.ggml.padding_token_id", self.pad),
        ] {
            if let Some(id) = id {
                w.add_kv(key, &GgufValue::U32(id))?;
            }
        }
        w.add_kv("tokenizer.ggml.add_bos_token", &GgufValue::Bool(self.add_bos))?;
        w.add_kv("tokenizer.ggml.add_eos_token", &GgufValue::Bool(self.add_eos))?;
        if let Some(b) = self.add_space_prefix {
            w.add_kv("tokenizer.ggml.add_space_prefix", &GgufValue::Bool(b))?;
        }
        for (name, t) in &self.chat_templates {
            let key = match name {
                None => "tokenizer.chat_template".to_string(),
                Some(n) => format!("tokenizer.chat_template.{n}"),
            };
            w.add_kv(&key, &GgufValue::String(t.as_bytes()))?;
        }
        Ok(())
    }
}

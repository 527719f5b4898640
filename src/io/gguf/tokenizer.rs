//! Rebuilds Hugging Face tokenizer files from GGUF `tokenizer.ggml.*` metadata.
//!
//! The goal is that the HF tokenizer splits text the way llama.cpp would for the same GGUF:
//!
//! * `gpt2` (byte-level BPE): the pre-tokenizer is a `Sequence` of `Split(regex, Isolated)`, one
//!   per regex llama.cpp uses for the file's `tokenizer.ggml.pre` (llama.cpp applies its list in
//!   order, each splitting the pieces of the previous one and keeping both matches and gaps;
//!   `Isolated` is exactly that), followed by `ByteLevel` without its own regex. Merges come
//!   straight from `tokenizer.ggml.merges`. Pre-types whose llama.cpp behaviour includes
//!   `ignore_merges` (LLaMA-3 family) set it on the BPE model too.
//! * `llama` (SentencePiece): a BPE model with `byte_fallback`, and merges derived from the
//!   scores the way transformers' `SentencePieceExtractor` does (a pair is ranked by the score
//!   of the piece it makes). SentencePiece merges the adjacent pair whose result scores highest,
//!   so ranking by that score reproduces it. The normalizer prepends `▁` (when
//!   `add_space_prefix`, the default) and replaces spaces with `▁`. HF applies it to each
//!   stretch of text between special tokens, and llama.cpp likewise re-adds the space prefix
//!   after every special token, so the two agree there too.
//!
//! Token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte. Control and unknown tokens become special added tokens and user-defined
//! ones plain added tokens, because those are the kinds llama.cpp matches as whole strings
//! before running BPE.

use super::reader::{GgufArray, GgufFile};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

/// llama.cpp's `tokenizer.ggml.token_type` values (`llama_token_type`), for import and export.
pub(crate) const TYPE_NORMAL: i32 = 1;
pub(crate) const TYPE_UNKNOWN: i32 = 2;
pub(crate) const TYPE_CONTROL: i32 = 3;
pub(crate) const TYPE_USER_DEFINED: i32 = 4;
pub(crate) const TYPE_UNUSED: i32 = 5;
pub(crate) const TYPE_BYTE: i32 = 6;

/// The HF tokenizer files rebuilt from a GGUF, plus what the importer needs to know.
#[derive(Debug, Clone)]
pub struct HfTokenizerFiles {
    /// `tokenizer.json` (HF tokenizers format).
    pub tokenizer_json: Value,
    /// `tokenizer_config.json`, including `chat_template` when the GGUF has one.
    pub tokenizer_config: Value,
    /// `special_tokens_map.json`.
    pub special_tokens_map: Value,
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`, when present.
    pub pre: Option<String>,
    /// Number of tokens in the vocabulary.
    pub n_tokens: usize,
    /// `tokenizer.ggml.bos_token_id`, when present and inside the vocabulary (likewise below).
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// Things that were off but did not stop the rebuild (dropped merges, duplicate tokens, ...).
    pub warnings: Vec<String>,
}

struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Option<Vec<f32>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split `vocab extend` puts in front of a byte-level pre-tokenizer when it adds Chinese or
/// Japanese pieces. llama.cpp has no pre-type with it: the exporter keeps the base's pre-type
/// and warns. GPT-2's regex glues a space to the letters after it (` ?\p{L}+`), and the
/// base merges `Ġ` with the first byte of a CJK character long before any merge of the
/// extension can run, so in text with spaces between words (manual pages, mixed Chinese and
/// code) the first character of every word stayed in byte pieces that training never shows the
/// model in that role. Isolated, the space is one `Ġ` token and the word meets its new pieces.
/// English, and Chinese without spaces, tokenize as before.
pub const SPACE_BEFORE_UNSPACED: &str = r" (?=[\p{Han}\p{Hiragana}\p{Katakana}\x{3000}-\x{303f}\x{ff00}-\x{ffef}])";

/// How llama.cpp pre-tokenizes a byte-level BPE vocab, by `tokenizer.ggml.pre`.
pub(crate) struct PreTokenizer {
    pub(crate) regexes: &'static [&'static str],
    ignore_merges: bool,
    add_bos_default: bool,
}

/// llama.cpp's table (llama-vocab.cpp), for the pre-types this importer knows.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    let p = |regexes, ignore_merges, add_bos_default| Some(PreTokenizer { regexes, ignore_merges, add_bos_default });
    match pre {
        "default" => p(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"], false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            p(&[LLAMA3_REGEX], true, true)
        }
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => p(&[LLAMA3_REGEX], false, false),
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling"
        | "exaone4" | "a.x-4.0" | "mellum" => p(&[GPT2_REGEX], false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            p(&[r"\p{N}", GPT2_REGEX], false, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => p(&[QWEN2_REGEX], false, false),
        "falcon" => p(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"], false, false),
        "tekken" => p(&[TEKKEN_REGEX], true, true),
        _ => None,
    }
}

fn string_array(gguf: &GgufFile<'_>, key: &str, warnings: &mut Vec<String>) -> Result<Option<Vec<String>>> {
    let Some(v) = gguf.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .and_then(GgufArray::as_strings)
        .ok_or_else(|| anyhow!("metadata `{key}` should be an array of strings"))?;
    let mut bad = 0usize;
    let out = arr
        .iter()
        .map(|b| match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => {
                bad += 1;
                String::from_utf8_lossy(b).into_owned()
            }
        })
        .collect();
    if bad > 0 {
        warnings.push(format!("{bad} entries of `{key}` are not valid UTF-8; invalid bytes were replaced with U+FFFD"));
    }
    Ok(Some(out))
}

fn token_id(gguf: &GgufFile<'_>, key: &str, n: usize, warnings: &mut Vec<String>) -> Result<Option<u32>> {
    let Some(v) = gguf.get(key) else { return Ok(None) };
    if let Some(id) = v.as_u64() {
        if id < n as u64 {
            return Ok(Some(id as u32));
        }
        // llama.cpp writes -1 (as 0xFFFFFFFF when unsigned) for "no such token".
        if id != 0xFFFF_FFFF && id != u64::MAX {
            warnings.push(format!("`{key}` = {id} is outside the {n}-token vocabulary; ignored"));
        }
        return Ok(None);
    }
    match v.as_f64() {
        Some(x) if x < 0.0 && x.fract() == 0.0 => Ok(None),
        _ => bail!("metadata `{key}` should be an integer token id"),
    }
}

fn read_vocab(gguf: &GgufFile<'_>, warnings: &mut Vec<String>) -> Result<Option<Vocab>> {
    let Some(tokens) = string_array(gguf, "tokenizer.ggml.tokens", warnings)? else { return Ok(None) };
    let n = tokens.len();
    if n == 0 {
        bail!("`tokenizer.ggml.tokens` is empty");
    }
    if n > u32::MAX as usize {
        bail!("vocabulary of {n} tokens does not fit u32 token ids");
    }
    let types = match gguf.get("tokenizer.ggml.token_type") {
        None => vec![TYPE_NORMAL; n],
        Some(v) => {
            let t = v
                .as_array()
                .and_then(GgufArray::to_i64_vec)
                .ok_or_else(|| anyhow!("`tokenizer.ggml.token_type` should be an array of integers"))?;
            if t.len() != n {
                warnings.push(format!("`tokenizer.ggml.token_type` has {} entries for {n} tokens; ignored", t.len()));
                vec![TYPE_NORMAL; n]
            } else {
                t.into_iter().map(|x| i32::try_from(x).unwrap_or(0)).collect()
            }
        }
    };
    let scores = match gguf.get("tokenizer.ggml.scores") {
        None => None,
        Some(v) => {
            let s = v
                .as_array()
                .and_then(GgufArray::to_f32_vec)
                .ok_or_else(|| anyhow!("`tokenizer.ggml.scores` should be an array of numbers"))?;
            if s.len() != n {
                warnings.push(format!("`tokenizer.ggml.scores` has {} entries for {n} tokens; ignored", s.len()));
                None
            } else {
                Some(s)
            }
        }
    };
    Ok(Some(Vocab {
        bos: token_id(gguf, "tokenizer.ggml.bos_token_id", n, warnings)?,
        eos: token_id(gguf, "tokenizer.ggml.eos_token_id", n, warnings)?,
        unk: token_id(gguf, "tokenizer.ggml.unknown_token_id", n, warnings)?,
        pad: token_id(gguf, "tokenizer.ggml.padding_token_id", n, warnings)?,
        tokens,
        types,
        scores,
    }))
}

/// token → first id with that text. Later duplicates cannot be represented in an HF vocab (a
/// map), so they are reported and left out.
fn vocab_map<'t>(tokens: &'t [String], warnings: &mut Vec<String>) -> (Map<String, Value>, HashMap<&'t str, u32>) {
    let mut map = Map::new();
    let mut index = HashMap::with_capacity(tokens.len());
    let mut dups = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if index.contains_key(t.as_str()) {
            dups.push(id);
            continue;
        }
        index.insert(t.as_str(), id as u32);
        map.insert(t.clone(), json!(id));
    }
    if !dups.is_empty() {
        let shown: Vec<String> = dups.iter().take(5).map(|i| format!("{i} {:?}", tokens[*i])).collect();
        warnings.push(format!(
            "{} token ids repeat an earlier token's text and are left out of the HF vocab (e.g. {})",
            dups.len(),
            shown.join(", ")
        ));
    }
    (map, index)
}

/// Merges for a SentencePiece vocab: every split of a piece into two pieces, ranked by the
/// piece's score (highest first), then by piece id and the two halves' ids, as transformers'
/// `SentencePieceExtractor` orders them.
fn spm_merges(vocab: &Vocab, index: &HashMap<&str, u32>) -> Vec<Value> {
    let n = vocab.tokens.len();
    let is_piece = |id: u32| vocab.types.get(id as usize).copied() == Some(TYPE_NORMAL);
    // Without scores, earlier ids rank first (SentencePiece stores pieces by descending score).
    let score = |id: usize| match &vocab.scores {
        Some(s) => s.get(id).copied().filter(|x| !x.is_nan()).unwrap_or(f32::NEG_INFINITY),
        None => -(id as f32),
    };
    let mut found: Vec<(f32, u32, u32, u32)> = Vec::new();
    for id in 0..n {
        if !is_piece(id as u32) {
            continue;
        }
        let piece = vocab.tokens[id].as_str();
        if index.get(piece) != Some(&(id as u32)) {
            continue; // a duplicate's later copy
        }
        for (k, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(k);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                if is_piece(li) && is_piece(ri) {
                    found.push((score(id), id as u32, li, ri));
                }
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    found.into_iter().map(|(_, _, l, r)| json!([vocab.tokens[l as usize], vocab.tokens[r as usize]])).collect()
}

/// Merges for a byte-level BPE vocab from `tokenizer.ggml.merges`, split as llama.cpp does (at
/// the first space after the first byte). Merges whose parts or result are not in the vocab
/// (HF refuses to load those) and repeats (llama.cpp keeps the first rank) are dropped.
fn bpe_merges(raw: &[String], index: &HashMap<&str, u32>, warnings: &mut Vec<String>) -> Vec<Value> {
    let mut out = Vec::with_capacity(raw.len());
    let mut seen = HashSet::with_capacity(raw.len());
    let (mut malformed, mut unknown, mut repeated) = (0usize, 0usize, 0usize);
    for m in raw {
        let split = m.char_indices().nth(1).and_then(|(start, _)| m[start..].find(' ').map(|p| start + p));
        let Some(pos) = split else {
            malformed += 1;
            continue;
        };
        let (l, r) = (&m[..pos], &m[pos + 1..]);
        if !index.contains_key(l) || !index.contains_key(r) || !index.contains_key(format!("{l}{r}").as_str()) {
            unknown += 1;
            continue;
        }
        if !seen.insert((l, r)) {
            repeated += 1;
            continue;
        }
        out.push(json!([l, r]));
    }
    if malformed + unknown + repeated > 0 {
        warnings.push(format!(
            "dropped {malformed} malformed, {unknown} out-of-vocabulary and {repeated} repeated entries of `tokenizer.ggml.merges`"
        ));
    }
    out
}

fn added_token(id: u32, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special,
    })
}

/// Added tokens by type; when the file has no types, the bos/eos/unk tokens are the specials.
fn added_tokens(vocab: &Vocab, index: &HashMap<&str, u32>, has_types: bool) -> Vec<Value> {
    let mut out = Vec::new();
    for (id, t) in vocab.tokens.iter().enumerate() {
        let id = id as u32;
        if t.is_empty() || index.get(t.as_str()) != Some(&id) {
            continue;
        }
        let ty = vocab.types[id as usize];
        let special = if has_types {
            ty == TYPE_CONTROL || ty == TYPE_UNKNOWN
        } else {
            [vocab.bos, vocab.eos, vocab.unk].contains(&Some(id))
        };
        if special || (has_types && ty == TYPE_USER_DEFINED) {
            out.push(added_token(id, t, special));
        }
    }
    out
}

fn template_processing(vocab: &Vocab, add_bos: bool, add_eos: bool) -> Value {
    let tok = |id: u32| vocab.tokens[id as usize].clone();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    let bos = vocab.bos.filter(|_| add_bos);
    let eos = vocab.eos.filter(|_| add_eos);
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let mut part = Vec::new();
        if let Some(b) = bos {
            part.push(json!({"SpecialToken": {"id": tok(b), "type_id": type_id}}));
        }
        part.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some(e) = eos {
            part.push(json!({"SpecialToken": {"id": tok(e), "type_id": type_id}}));
        }
        if seq == "A" {
            single.extend(part.iter().cloned());
        }
        pair.extend(part);
    }
    for id in [bos, eos].into_iter().flatten() {
        specials.insert(tok(id), json!({"id": tok(id), "ids": [id], "tokens": [tok(id)]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn chat_template(gguf: &GgufFile<'_>) -> Result<Option<Value>> {
    let default = gguf.get_str("tokenizer.chat_template")?;
    let mut named = Vec::new();
    for kv in &gguf.metadata {
        if let Some(name) = kv.key.strip_prefix("tokenizer.chat_template.") {
            let t = kv.value.as_str().ok_or_else(|| anyhow!("metadata `{}` should be a UTF-8 string", kv.key))?;
            named.push(json!({"name": name, "template": t}));
        }
    }
    Ok(match (default, named.is_empty()) {
        (None, true) => None,
        (Some(t), true) => Some(json!(t)),
        (d, false) => {
            let mut all: Vec<Value> = d.map(|t| json!({"name": "default", "template": t})).into_iter().collect();
            all.extend(named);
            Some(Value::Array(all))
        }
    })
}

/// Rebuilds the HF tokenizer files from a GGUF's metadata.
///
/// Returns `Ok(None)` when the file has no `tokenizer.ggml.tokens` (a weights-only GGUF), and an
/// error when the tokenizer is present but of an unsupported kind or malformed.
/// `model_max_length` goes into `tokenizer_config.json` (usually the context length).
pub fn build_tokenizer(gguf: &GgufFile<'_>, model_max_length: Option<u64>) -> Result<Option<HfTokenizerFiles>> {
    let mut warnings = Vec::new();
    let Some(vocab) = read_vocab(gguf, &mut warnings)? else { return Ok(None) };
    let model = gguf.get_str("tokenizer.ggml.model")?.unwrap_or("llama").to_string();
    let pre = gguf.get_str("tokenizer.ggml.pre")?.map(str::to_string);
    let has_types = gguf.get("tokenizer.ggml.token_type").is_some() && vocab.types.iter().any(|&t| t != TYPE_NORMAL);
    let (vocab_json, index) = vocab_map(&vocab.tokens, &mut warnings);
    let added = added_tokens(&vocab, &index, has_types);

    let (tokenizer_json, add_bos, add_eos) = match model.as_str() {
        "gpt2" => {
            let pre_name = pre.as_deref().unwrap_or("default");
            let pt = pre_tokenizer(pre_name).unwrap_or_else(|| {
                warnings.push(format!(
                    "unknown tokenizer.ggml.pre `{pre_name}`: using the GPT-2 split regex, which may split some text differently from llama.cpp"
                ));
                PreTokenizer { regexes: &[GPT2_REGEX], ignore_merges: false, add_bos_default: false }
            });
            let add_bos = gguf.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(pt.add_bos_default);
            let add_eos = gguf.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
            let raw_merges = string_array(gguf, "tokenizer.ggml.merges", &mut warnings)?
                .ok_or_else(|| anyhow!("a `gpt2` tokenizer needs `tokenizer.ggml.merges`"))?;
            let merges = bpe_merges(&raw_merges, &index, &mut warnings);
            let mut pretokenizers: Vec<Value> = pt
                .regexes
                .iter()
                .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
                .collect();
            pretokenizers.push(
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}),
            );
            let post = if (add_bos && vocab.bos.is_some()) || (add_eos && vocab.eos.is_some()) {
                template_processing(&vocab, add_bos, add_eos)
            } else {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
            };
            let tj = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": pt.ignore_merges, "vocab": vocab_json, "merges": merges,
                },
            });
            (tj, add_bos, add_eos)
        }
        "llama" => {
            let add_bos = gguf.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
            let add_eos = gguf.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
            let add_space_prefix = gguf.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            if vocab.scores.is_none() {
                warnings.push("SentencePiece vocab without `tokenizer.ggml.scores`: merges ranked by token id".into());
            }
            let merges = spm_merges(&vocab, &index);
            let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let normalizer = if add_space_prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
            } else {
                replace
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let post = if (add_bos && vocab.bos.is_some()) || (add_eos && vocab.eos.is_some()) {
                template_processing(&vocab, add_bos, add_eos)
            } else {
                Value::Null
            };
            let unk = vocab.unk.map(|u| vocab.tokens[u as usize].clone());
            let tj = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": normalizer,
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                    "ignore_merges": false, "vocab": vocab_json, "merges": merges,
                },
            });
            (tj, add_bos, add_eos)
        }
        other => bail!(
            "tokenizer.ggml.model `{other}` is not supported (only `gpt2` byte-level BPE and `llama` SentencePiece)"
        ),
    };

    let name = |id: Option<u32>| id.map(|i| json!(vocab.tokens[i as usize])).unwrap_or(Value::Null);
    let mut special_map = Map::new();
    for (k, id) in
        [("bos_token", vocab.bos), ("eos_token", vocab.eos), ("unk_token", vocab.unk), ("pad_token", vocab.pad)]
    {
        if id.is_some() {
            special_map.insert(k.to_string(), name(id));
        }
    }
    let mut decoder_map = Map::new();
    if let Some(list) = tokenizer_json["added_tokens"].as_array() {
        for t in list {
            let mut entry = t.clone();
            if let Some(o) = entry.as_object_mut() {
                o.remove("id");
            }
            decoder_map.insert(t["id"].to_string(), entry);
        }
    }
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name(vocab.bos),
        "eos_token": name(vocab.eos),
        "unk_token": name(vocab.unk),
        "pad_token": name(vocab.pad),
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": decoder_map,
    });
    if let Some(t) = chat_template(gguf)? {
        config["chat_template"] = t;
    }
    if let Some(m) = model_max_length {
        config["model_max_length"] = json!(m);
    }

    Ok(Some(HfTokenizerFiles {
        tokenizer_json,
        tokenizer_config: config,
        special_tokens_map: Value::Object(special_map),
        model,
        pre,
        n_tokens: vocab.tokens.len(),
        bos_token_id: vocab.bos,
        eos_token_id: vocab.eos,
        unk_token_id: vocab.unk,
        pad_token_id: vocab.pad,
        warnings,
    }))
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
pub(crate) mod tests;

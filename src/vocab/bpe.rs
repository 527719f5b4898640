//! A mutable mirror of an HF `tokenizers` BPE model, read from `tokenizer.json`.
//!
//! `extend` has to tokenize every new piece against the model *as extended so far* (so that a word
//! can reuse the characters and shorter words added before it). Rebuilding an HF `Tokenizer` after
//! each of 28,000 additions would take minutes, so this module keeps vocab and merges in hash maps
//! that can grow and roll back, and re-implements the HF merge loop for single words. The loop must
//! match `tokenizers::models::bpe::Word::merge_all` exactly: lowest merge rank first, leftmost on
//! ties (the HF heap orders by `(rank, pos)`), later duplicates of a pair overriding earlier ones.
//! `extend` re-checks the final file with the real HF tokenizer, so a divergence would be reported,
//! not silently shipped.

use super::json::Json;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// How the model's symbols relate to text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// GPT-2 style: text bytes are mapped to printable chars before BPE (`ByteLevel`).
    ByteLevel,
    /// SentencePiece style: symbols are text chars; `metaspace` says spaces are written `▁`.
    Char { metaspace: bool },
}

impl Family {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::ByteLevel => "byte-level BPE",
            Family::Char { metaspace: true } => "SentencePiece-style BPE (▁ for spaces)",
            Family::Char { metaspace: false } => "character BPE",
        }
    }
}

/// How merges are written in the file: `"a b"` (legacy) or `["a", "b"]` (tokenizers ≥ 0.20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeFormat {
    Legacy,
    Pairs,
}

/// Vocab + merges of a BPE model that can grow and be rolled back.
pub(crate) struct BpeState {
    pub vocab: HashMap<String, u32>,
    pub id_to_piece: HashMap<u32, String>,
    /// `(left id, right id) -> (rank, merged id)`, as in HF.
    pub merges: HashMap<(u32, u32), (u32, u32)>,
    /// Rank the next appended merge gets (= number of merges in the list).
    pub next_rank: u32,
    /// Id the next appended piece gets: one past every id in vocab and added tokens.
    pub next_id: u32,
    /// `next_id` before anything was added; ids below it are old.
    pub old_next_id: u32,
    pub byte_fallback_ids: Option<Vec<u32>>,
    pub unk: Option<u32>,
    pub fuse_unk: bool,
    pub family: Family,
    pub merge_format: MergeFormat,
    /// Contents of `added_tokens`, which a new piece must not duplicate either.
    pub added_contents: HashMap<String, u32>,
}

/// What `BpeState::push_*` did, so a failed piece can be undone.
#[derive(Default)]
pub(crate) struct Journal {
    pieces: Vec<String>,
    merges: Vec<(u32, u32)>,
}

fn contains_type(v: Option<&Json>, ty: &str) -> bool {
    let Some(v) = v else { return false };
    if v.get("type").and_then(Json::as_str) == Some(ty) {
        return true;
    }
    match v {
        Json::Obj(kv) => kv.iter().any(|(_, x)| contains_type(Some(x), ty)),
        Json::Arr(xs) => xs.iter().any(|x| contains_type(Some(x), ty)),
        _ => false,
    }
}

fn replaces_space_with_metaspace(v: Option<&Json>) -> bool {
    let Some(v) = v else { return false };
    if v.get("type").and_then(Json::as_str) == Some("Replace")
        && v.get("pattern").and_then(|p| p.get("String")).and_then(Json::as_str) == Some(" ")
        && v.get("content").and_then(Json::as_str) == Some("\u{2581}")
    {
        return true;
    }
    match v {
        Json::Obj(kv) => kv.iter().any(|(_, x)| replaces_space_with_metaspace(Some(x))),
        Json::Arr(xs) => xs.iter().any(|x| replaces_space_with_metaspace(Some(x))),
        _ => false,
    }
}

impl BpeState {
    /// Reads the model section of a parsed `tokenizer.json`. `origin` names the file in errors.
    pub(crate) fn from_tokenizer_json(root: &Json, origin: &str) -> Result<Self> {
        let model = root.get("model").with_context(|| {
            format!("{origin}: no \"model\" section; is this an HF tokenizer.json (not tokenizer_config.json)?")
        })?;
        let ty = model.get("type").and_then(Json::as_str);
        match ty {
            Some("BPE") => {}
            None if model.get("merges").is_some() => {}
            Some(other) => bail!(
                "{origin}: model type {other:?} is not supported; vocabulary extension needs a BPE \
                 tokenizer (SentencePiece-BPE like LLaMA-2 or byte-level BPE like GPT-2/LLaMA-3). \
                 Unigram/WordPiece tokenizers must be extended with their own trainers"
            ),
            None => bail!("{origin}: model has no \"type\" and no \"merges\"; expected a BPE model"),
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let Some(v) = model.get(key) {
                if !v.is_null() && v.as_str() != Some("") {
                    bail!("{origin}: BPE option {key} = {v:?} is not supported by vocab extend");
                }
            }
        }

        let vocab_json = match model.get("vocab") {
            Some(Json::Obj(kv)) => kv,
            Some(other) => bail!("{origin}: model.vocab is {}, expected an object", other.kind()),
            None => bail!("{origin}: model.vocab is missing"),
        };
        let mut vocab = HashMap::with_capacity(vocab_json.len() + 32_768);
        let mut id_to_piece = HashMap::with_capacity(vocab_json.len() + 32_768);
        let mut next_id = 0u32;
        for (piece, id) in vocab_json {
            let id = id
                .as_u64()
                .filter(|&i| i < u32::MAX as u64)
                .with_context(|| format!("{origin}: vocab id of {piece:?} is not a valid id: {id:?}"))?
                as u32;
            vocab.insert(piece.clone(), id);
            id_to_piece.insert(id, piece.clone());
            next_id = next_id.max(id + 1);
        }

        let mut added_contents = HashMap::new();
        if let Some(Json::Arr(added)) = root.get("added_tokens") {
            for t in added {
                if let (Some(content), Some(id)) = (t.get("content").and_then(Json::as_str), t.get("id").and_then(Json::as_u64)) {
                    let id = u32::try_from(id).ok().filter(|&i| i < u32::MAX).with_context(|| {
                        format!("{origin}: added token {content:?} has an invalid id {id}")
                    })?;
                    added_contents.insert(content.to_owned(), id);
                    next_id = next_id.max(id + 1);
                }
            }
        }

        let merges_json = match model.get("merges") {
            Some(Json::Arr(m)) => m.as_slice(),
            Some(other) => bail!("{origin}: model.merges is {}, expected an array", other.kind()),
            None => &[],
        };
        let mut merge_format = MergeFormat::Legacy;
        let mut merges = HashMap::with_capacity(merges_json.len() + 65_536);
        let mut rank = 0u32;
        for (i, m) in merges_json.iter().enumerate() {
            let (a, b) = match m {
                Json::Str(s) => {
                    // HF skips these lines before numbering ranks.
                    if s.starts_with("#version") {
                        continue;
                    }
                    let mut parts = s.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => (a, b),
                        _ => bail!("{origin}: merge #{i} {s:?} is not of the form \"left right\""),
                    }
                }
                Json::Arr(p) if p.len() == 2 && p[0].as_str().is_some() && p[1].as_str().is_some() => {
                    merge_format = MergeFormat::Pairs;
                    (p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())
                }
                other => bail!("{origin}: merge #{i} is {}, expected \"a b\" or [\"a\", \"b\"]", other.kind()),
            };
            let id_of = |s: &str| {
                vocab.get(s).copied().with_context(|| format!("{origin}: merge #{i} uses {s:?}, which is not in the vocab"))
            };
            let (ia, ib) = (id_of(a)?, id_of(b)?);
            let joined = format!("{a}{b}");
            let out = id_of(&joined)?;
            merges.insert((ia, ib), (rank, out));
            rank += 1;
        }

        let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool).unwrap_or(false);
        let byte_fallback_ids = if byte_fallback {
            (0..=255u8).map(|b| vocab.get(&format!("<0x{b:02X}>")).copied()).collect::<Option<Vec<_>>>()
        } else {
            None
        };
        let unk = model.get("unk_token").and_then(Json::as_str).and_then(|u| vocab.get(u).copied());
        let family = if contains_type(root.get("pre_tokenizer"), "ByteLevel") || contains_type(root.get("normalizer"), "ByteLevel") {
            Family::ByteLevel
        } else {
            let metaspace = contains_type(root.get("pre_tokenizer"), "Metaspace")
                || replaces_space_with_metaspace(root.get("normalizer"));
            Family::Char { metaspace }
        };

        Ok(BpeState {
            vocab,
            id_to_piece,
            merges,
            next_rank: rank,
            next_id,
            old_next_id: next_id,
            byte_fallback_ids,
            unk,
            fuse_unk: model.get("fuse_unk").and_then(Json::as_bool).unwrap_or(false),
            family,
            merge_format,
            added_contents,
        })
    }

    /// Text → the model's symbol alphabet (what the vocab stores).
    pub(crate) fn to_model_alphabet(&self, text: &str) -> String {
        match self.family {
            Family::ByteLevel => {
                let table = byte_to_char();
                text.bytes().map(|b| table[b as usize]).collect()
            }
            Family::Char { metaspace: true } => text.replace(' ', "\u{2581}"),
            Family::Char { metaspace: false } => text.to_owned(),
        }
    }

    /// Model alphabet → text; `None` when the piece is not valid UTF-8 on its own (a byte-level
    /// fragment of a character).
    pub(crate) fn to_text(&self, piece: &str) -> Option<String> {
        match self.family {
            Family::ByteLevel => {
                let bytes = byte_level_to_bytes(piece)?;
                String::from_utf8(bytes).ok()
            }
            Family::Char { metaspace: true } => Some(piece.replace('\u{2581}', " ")),
            Family::Char { metaspace: false } => Some(piece.to_owned()),
        }
    }

    pub(crate) fn is_old_id(&self, id: u32) -> bool {
        id < self.old_next_id
    }

    /// Whether `piece` (model alphabet) is a byte-fallback token such as `<0xE4>`.
    pub(crate) fn is_byte_fallback_id(&self, id: u32) -> bool {
        self.byte_fallback_ids.as_ref().is_some_and(|ids| ids.contains(&id))
    }

    /// HF `BPE::tokenize` for one pre-tokenized word (no dropout), by merges alone: the
    /// `ignore_merges` whole-word lookup (LLaMA-3) is deliberately skipped, because a new piece
    /// must also be reachable where it occurs inside a longer pre-tokenized word.
    pub(crate) fn tokenize(&self, word: &str) -> Vec<u32> {
        let mut syms: Vec<u32> = Vec::with_capacity(word.len());
        let mut pending_unk = false;
        let mut buf = [0u8; 4];
        for c in word.chars() {
            let s = c.encode_utf8(&mut buf);
            if let Some(&id) = self.vocab.get(&*s) {
                pending_unk = false;
                syms.push(id);
                continue;
            }
            if let Some(bytes) = &self.byte_fallback_ids {
                pending_unk = false;
                syms.extend(s.bytes().map(|b| bytes[b as usize]));
                continue;
            }
            if let Some(unk) = self.unk {
                if !(pending_unk && self.fuse_unk) {
                    syms.push(unk);
                }
                pending_unk = true;
            }
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, out)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, out));
                    }
                }
            }
            let Some((_, i, out)) = best else { break };
            syms[i] = out;
            syms.remove(i + 1);
        }
        syms
    }

    /// Appends a vocab entry; the caller guarantees `piece` is not in the vocab.
    pub(crate) fn push_piece(&mut self, piece: &str, journal: &mut Journal) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.vocab.insert(piece.to_owned(), id);
        self.id_to_piece.insert(id, piece.to_owned());
        journal.pieces.push(piece.to_owned());
        id
    }

    /// Appends a merge with the lowest priority so far. No-op if the pair already merges (HF would
    /// otherwise let the later duplicate override the earlier rank).
    pub(crate) fn push_merge(&mut self, left: u32, right: u32, out: u32, journal: &mut Journal) {
        if self.merges.contains_key(&(left, right)) {
            return;
        }
        self.merges.insert((left, right), (self.next_rank, out));
        self.next_rank += 1;
        journal.merges.push((left, right));
    }

    /// Undoes everything recorded in `journal` (which must be the latest additions).
    pub(crate) fn rollback(&mut self, journal: Journal) {
        for pair in journal.merges.iter().rev() {
            self.merges.remove(pair);
            self.next_rank -= 1;
        }
        for piece in journal.pieces.iter().rev() {
            if let Some(id) = self.vocab.remove(piece) {
                self.id_to_piece.remove(&id);
            }
            self.next_id -= 1;
        }
    }
}

/// GPT-2's `bytes_to_unicode` table: printable bytes map to themselves, the rest to U+0100 onwards.
pub(crate) fn byte_to_char() -> &'static [char; 256] {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(build_byte_to_char)
}

fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
    }
    table
}

/// Inverse of [`byte_to_char`] over a whole piece; `None` if a char is outside the alphabet.
pub(crate) fn byte_level_to_bytes(piece: &str) -> Option<Vec<u8>> {
    static INVERSE: std::sync::OnceLock<[i16; 512]> = std::sync::OnceLock::new();
    let inverse = INVERSE.get_or_init(|| {
        let mut inv = [-1i16; 512];
        for (b, c) in byte_to_char().iter().enumerate() {
            inv[*c as usize] = b as i16;
        }
        inv
    });
    piece
        .chars()
        .map(|c| inverse.get(c as usize).and_then(|&b| u8::try_from(b).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = byte_to_char();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let zh: String = "中".bytes().map(|b| t[b as usize]).collect();
        assert_eq!(zh, "ä¸Ń");
        assert_eq!(byte_level_to_bytes("ä¸Ń").unwrap(), "中".as_bytes());
    }
}

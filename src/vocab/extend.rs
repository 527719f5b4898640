//! Adding pieces to a BPE `tokenizer.json` as real vocab entries with merges.

use super::bpe::{BpeState, Family, Journal, MergeFormat};
use super::json::Json;
use super::resize::VocabExtension;
use super::select::{select_pieces, SelectConfig};
use super::{resolve_tokenizer_file, write_atomic};
use crate::io::gguf::tokenizer::SPACE_BEFORE_UNSPACED;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;
use tokenizers::{Model, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

/// Where the new pieces come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceSource {
    /// A UTF-8 file with one piece per line, taken literally (only the line ending is removed, so
    /// a leading space means "word-initial" for SentencePiece tokenizers); blank lines are ignored.
    List(PathBuf),
    /// Pieces given directly.
    Pieces(Vec<String>),
    /// Chosen by frequency, see [`SelectConfig`].
    Select(SelectConfig),
}

/// What `extend` did. Serializable so the CLI can print it as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ExtendReport {
    /// The tokenizer file that was extended.
    pub tokenizer: String,
    /// Tokenizer family as detected (`SentencePiece-style BPE (▁ for spaces)`, `byte-level BPE`).
    pub family: String,
    /// Tokens before (one past the highest id, added tokens included).
    pub old_vocab: usize,
    /// Tokens after.
    pub new_vocab: usize,
    /// Pieces requested (after dropping blank lines).
    pub requested: usize,
    /// Requested pieces that are now single tokens.
    pub added_requested: usize,
    /// Extra pieces added only because a requested piece needed them (merge intermediates and
    /// characters of words).
    pub added_intermediate: usize,
    /// Requested pieces that were already in the vocab or among the added tokens.
    pub skipped_present: usize,
    /// Repeated requests (after mapping to the model's alphabet).
    pub skipped_duplicate: usize,
    /// Pieces the pre-tokenizer splits, so they can never be one token.
    pub skipped_split: Vec<String>,
    /// Pieces no merge path could make one token without producing an old piece, and pieces
    /// longer than [`MAX_PIECE_CHARS`].
    pub unreachable: Vec<String>,
    /// Requested pieces the real HF tokenizer does not return as one token on their own. Should be
    /// empty; anything here means the BPE mirror diverged from `tokenizers`.
    pub not_single_token: Vec<String>,
    /// The pre-tokenizer now splits a space off a following Chinese or Japanese character
    /// ([`SPACE_BEFORE_UNSPACED`]), so that the new pieces also form after a space.
    pub space_split: bool,
    /// Wall time of the extension, in seconds.
    pub seconds: f64,
}

/// Result of [`extend_json`].
#[derive(Debug, Clone)]
pub struct Extended {
    /// The new `tokenizer.json` text.
    pub tokenizer_json: String,
    /// The matching `vocab_extension.json` content.
    pub extension: VocabExtension,
    /// Counts and skipped pieces.
    pub report: ExtendReport,
}

fn read_piece_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read piece list {}", path.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| anyhow!("piece list {} is not UTF-8 (byte {}); save it as UTF-8", path.display(), e.utf8_error().valid_up_to()))?;
    Ok(text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l)).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// A chosen split of a piece's current tokens: `split[i][j]` is where span `i..j` divides.
struct MergeTree<'a> {
    piece: &'a str,
    offsets: &'a [usize],
    leaves: &'a [u32],
    split: &'a [Vec<usize>],
}

impl MergeTree<'_> {
    /// Appends pieces and merges bottom-up, so children's merges outrank their parent's.
    fn build(&self, state: &mut BpeState, journal: &mut Journal, i: usize, j: usize) -> u32 {
        if j - i == 1 {
            return self.leaves[i];
        }
        let m = self.split[i][j];
        let left = self.build(state, journal, i, m);
        let right = self.build(state, journal, m, j);
        let s = &self.piece[self.offsets[i]..self.offsets[j]];
        let out = match state.vocab.get(s) {
            Some(&id) => id,
            None => state.push_piece(s, journal),
        };
        state.push_merge(left, right, out, journal);
        out
    }
}

/// Finds the binary merge tree over `leaves` (the current tokenization of `piece`) that needs the
/// fewest new intermediate pieces, and appends its pieces and merges. Returns false (state
/// unchanged) if there is none or the result does not tokenize to one token.
fn add_piece(state: &mut BpeState, piece: &str) -> bool {
    let mut journal = Journal::default();
    if matches!(state.family, Family::Char { .. }) && piece.chars().count() == 1 {
        // Single characters are looked up before any merge; a vocab entry is all they need.
        state.push_piece(piece, &mut journal);
        return true;
    }
    let leaves = state.tokenize(piece);
    let mut offsets = vec![0usize];
    for id in &leaves {
        if Some(*id) == state.unk || (matches!(state.family, Family::Char { .. }) && state.is_byte_fallback_id(*id)) {
            return false;
        }
        let Some(s) = state.id_to_piece.get(id) else { return false };
        let at = offsets.last().copied().unwrap_or(0);
        // Leaves must spell the piece exactly, or the spans below would not be pieces (or even
        // char boundaries).
        if piece.get(at..at + s.len()) != Some(s.as_str()) {
            return false;
        }
        offsets.push(at + s.len());
    }
    let k = leaves.len();
    if k < 2 || offsets[k] != piece.len() {
        return false;
    }

    const INF: u32 = u32::MAX / 4;
    let span = |i: usize, j: usize| &piece[offsets[i]..offsets[j]];
    // cost[i][j]: new pieces needed to turn leaves i..j into one token (the root itself not counted).
    let mut cost = vec![vec![INF; k + 1]; k + 1];
    let mut split = vec![vec![0usize; k + 1]; k + 1];
    for i in 0..k {
        cost[i][i + 1] = 0;
    }
    for len in 2..=k {
        for i in 0..=k - len {
            let j = i + len;
            let node = if len == k {
                0
            } else {
                match state.vocab.get(span(i, j)) {
                    // A new merge producing an old piece would change the tokenization of old text.
                    Some(&id) if state.is_old_id(id) => continue,
                    Some(_) => 0,
                    None => 1,
                }
            };
            // Longest left part first: prefixes of Chinese words are more often words themselves.
            for m in (i + 1..j).rev() {
                let c = node + cost[i][m] + cost[m][j];
                if c < cost[i][j] {
                    cost[i][j] = c;
                    split[i][j] = m;
                }
            }
        }
    }
    if cost[0][k] >= INF {
        return false;
    }

    let tree = MergeTree { piece, offsets: &offsets, leaves: &leaves, split: &split };
    let id = tree.build(state, &mut journal, 0, k);
    if state.tokenize(piece) != [id] {
        state.rollback(journal);
        return false;
    }
    true
}

/// Text → model alphabet, as the tokenizer would see the piece inside running text.
fn normalize(state: &BpeState, tok: &Tokenizer, raw: &str) -> Result<String> {
    let text = match (state.family, tok.get_normalizer()) {
        // SentencePiece normalizers prepend `▁`, which a piece inside a word must not get.
        (Family::ByteLevel, Some(n)) => {
            let mut ns = tokenizers::NormalizedString::from(raw);
            n.normalize(&mut ns).map_err(|e| anyhow!("normalizing {raw:?}: {e}"))?;
            ns.get().to_owned()
        }
        _ => raw.to_owned(),
    };
    Ok(state.to_model_alphabet(&text))
}

fn model_mut(root: &mut Json) -> Result<&mut Vec<(String, Json)>> {
    match root.get_mut("model") {
        Some(Json::Obj(kv)) => Ok(kv),
        _ => bail!("model section is not an object"),
    }
}

/// Indentation of the original file, so the rewritten one diffs cleanly (HF Rust writes 2 spaces,
/// Python's `json.dump(indent=1)` 1). `None`: the file was compact.
fn detect_indent(text: &str) -> Option<String> {
    let after = &text[text.find('\n')? + 1..];
    let indent: String = after.chars().take_while(|c| *c == ' ' || *c == '\t').collect();
    Some(if indent.is_empty() { "  ".to_owned() } else { indent })
}

fn to_json_text(root: &Json, indent: Option<&str>) -> Result<String> {
    let bytes = match indent {
        Some(ind) => {
            let mut out = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            root.serialize(&mut ser)?;
            out
        }
        None => serde_json::to_vec(root)?,
    };
    Ok(String::from_utf8(bytes)?)
}

/// Extends the tokenizer in `tokenizer_json` (the text of a `tokenizer.json`; `origin` names it in
/// messages) with the pieces from `source`. Pure apart from reading `source`'s files.
pub fn extend_json(tokenizer_json: &str, origin: &str, source: &PieceSource) -> Result<Extended> {
    let start = Instant::now();
    let mut root: Json = serde_json::from_str(tokenizer_json)
        .with_context(|| format!("{origin} is not valid JSON; pass an HF tokenizer.json"))?;
    let mut state = BpeState::from_tokenizer_json(&root, origin)?;
    let old_tok = Tokenizer::from_str(tokenizer_json)
        .map_err(|e| anyhow!("{origin}: the tokenizers library cannot load it: {e}"))?;
    let old_rank = state.next_rank;

    let raw_pieces = match source {
        PieceSource::List(path) => read_piece_list(path)?,
        PieceSource::Pieces(p) => p.iter().filter(|p| !p.is_empty()).cloned().collect(),
        PieceSource::Select(cfg) => {
            let present = |s: &str| state.vocab.contains_key(&state.to_model_alphabet(s));
            select_pieces(cfg, &present, state.family == Family::Char { metaspace: true })?
        }
    };

    if raw_pieces.is_empty() {
        let what = match source {
            PieceSource::List(path) => format!("{} has no pieces (one per line)", path.display()),
            PieceSource::Pieces(_) => "the list of pieces is empty".to_owned(),
            PieceSource::Select(_) => "no character or word passed the selection (lower --min-freq, or give more text)".to_owned(),
        };
        bail!("nothing to add: {what}; an extension that adds nothing would only change the tokenizer's files");
    }
    let mut report = ExtendReport {
        tokenizer: origin.to_owned(),
        family: state.family.name().to_owned(),
        old_vocab: state.old_next_id as usize,
        new_vocab: 0,
        requested: raw_pieces.len(),
        added_requested: 0,
        added_intermediate: 0,
        skipped_present: 0,
        skipped_duplicate: 0,
        skipped_split: Vec::new(),
        unreachable: Vec::new(),
        not_single_token: Vec::new(),
        space_split: false,
        seconds: 0.0,
    };

    let splits_in_one = |raw: &str| -> Result<bool> {
        let Some(pre) = old_tok.get_pre_tokenizer() else { return Ok(true) };
        let mut pts = PreTokenizedString::from(raw);
        pre.pre_tokenize(&mut pts).map_err(|e| anyhow!("pre-tokenizing {raw:?}: {e}"))?;
        Ok(pts.get_splits(OffsetReferential::Original, OffsetType::Byte).len() == 1)
    };

    // (raw text, model-alphabet piece), deduplicated, shortest first.
    let mut seen: HashSet<String> = HashSet::new();
    let mut todo: Vec<(String, String)> = Vec::new();
    for raw in &raw_pieces {
        let piece = normalize(&state, &old_tok, raw)?;
        if !seen.insert(piece.clone()) {
            report.skipped_duplicate += 1;
        } else if state.vocab.contains_key(&piece) || state.added_contents.contains_key(raw) || state.added_contents.contains_key(&piece) {
            report.skipped_present += 1;
        } else if raw.chars().count() > MAX_PIECE_CHARS {
            // The merge search is cubic in the piece's token count; nobody needs such a token.
            report.unreachable.push(raw.clone());
        } else if !splits_in_one(raw)? {
            report.skipped_split.push(raw.clone());
        } else {
            todo.push((raw.clone(), piece));
        }
    }
    // Word-initial pieces (`▁他`) last: their merges must only absorb the space/dummy prefix, never
    // compete with the merges that segment the word itself.
    todo.sort_by_key(|(raw, _)| (raw.starts_with(' '), raw.chars().count()));

    let mut requested: HashSet<String> = HashSet::new();
    for (raw, piece) in todo {
        let mut ok = true;
        if raw.chars().count() > 1 {
            let mut buf = [0u8; 4];
            for c in raw.chars() {
                let cp = normalize(&state, &old_tok, c.encode_utf8(&mut buf))?;
                if !state.vocab.contains_key(&cp) && !add_piece(&mut state, &cp) {
                    ok = false;
                    break;
                }
            }
        }
        if ok && (state.vocab.contains_key(&piece) || add_piece(&mut state, &piece)) {
            requested.insert(piece);
        } else {
            report.unreachable.push(raw);
        }
    }
    report.added_requested = requested.len();

    let new_ids = state.old_next_id..state.next_id;
    let new_pieces: Vec<String> = new_ids.clone().map(|id| state.id_to_piece[&id].clone()).collect();
    report.added_intermediate = new_pieces.len() - report.added_requested;
    report.new_vocab = state.next_id as usize;

    // Rewrite vocab and merges in place so every other key keeps its order and spelling.
    let mut new_merges: Vec<(u32, (u32, u32))> =
        state.merges.iter().filter(|(_, &(rank, _))| rank >= old_rank).map(|(&pair, &(rank, _))| (rank, pair)).collect();
    new_merges.sort_unstable();
    let needs_pairs = state.merge_format == MergeFormat::Pairs
        || new_pieces.iter().any(|p| p.contains(' '));
    {
        let model = model_mut(&mut root)?;
        for (key, value) in model.iter_mut() {
            match (key.as_str(), value) {
                ("vocab", Json::Obj(vocab)) => {
                    for (id, piece) in new_ids.clone().zip(&new_pieces) {
                        vocab.push((piece.clone(), Json::Num(id.into())));
                    }
                }
                ("merges", Json::Arr(merges)) => {
                    if needs_pairs && state.merge_format == MergeFormat::Legacy {
                        // Legacy "a b" cannot hold a piece with a space; switch the whole list.
                        let old = std::mem::take(merges);
                        for m in old {
                            if let Json::Str(s) = &m {
                                if let Some((a, b)) = s.split_once(' ') {
                                    merges.push(Json::Arr(vec![Json::Str(a.into()), Json::Str(b.into())]));
                                }
                            }
                        }
                    }
                    for (_, (a, b)) in &new_merges {
                        let (a, b) = (state.id_to_piece[a].clone(), state.id_to_piece[b].clone());
                        merges.push(if needs_pairs { Json::Arr(vec![Json::Str(a), Json::Str(b)]) } else { Json::Str(format!("{a} {b}")) });
                    }
                }
                _ => {}
            }
        }
        if !model.iter().any(|(k, _)| k == "merges") && !new_merges.is_empty() {
            let merges = new_merges
                .iter()
                .map(|(_, (a, b))| Json::Arr(vec![Json::Str(state.id_to_piece[a].clone()), Json::Str(state.id_to_piece[b].clone())]))
                .collect();
            model.push(("merges".to_owned(), Json::Arr(merges)));
        }
    }
    if state.family == Family::ByteLevel
        && new_pieces.iter().any(|p| state.to_text(p).and_then(|t| t.chars().next()).is_some_and(is_unspaced_script))
        && !raw_pieces.iter().any(|r| r.strip_prefix(' ').and_then(|t| t.chars().next()).is_some_and(is_unspaced_script))
    {
        report.space_split = isolate_space_before_unspaced(&mut root);
    }
    let tokenizer_json = to_json_text(&root, detect_indent(tokenizer_json).as_deref())?;

    // Check the output with the real library: it must load and give each requested piece one id.
    let new_tok = Tokenizer::from_str(&tokenizer_json)
        .map_err(|e| anyhow!("internal error: the extended tokenizer does not load: {e}"))?;
    for (id, piece) in new_ids.clone().zip(&new_pieces) {
        if requested.contains(piece) {
            let toks = new_tok.get_model().tokenize(piece).map_err(|e| anyhow!("tokenizing {piece:?}: {e}"))?;
            if toks.len() != 1 || toks[0].id != id {
                report.not_single_token.push(state.to_text(piece).unwrap_or_else(|| piece.clone()));
            }
        }
    }

    let mut subtokens = Vec::with_capacity(new_pieces.len());
    let mut texts = Vec::with_capacity(new_pieces.len());
    for piece in &new_pieces {
        let toks = old_tok.get_model().tokenize(piece).map_err(|e| anyhow!("old tokenizer on {piece:?}: {e}"))?;
        subtokens.push(toks.iter().map(|t| t.id).filter(|&id| Some(id) != state.unk).collect());
        // A byte-level fragment of a character has no text; keep its vocab spelling.
        texts.push(state.to_text(piece).unwrap_or_else(|| piece.clone()));
    }
    let extension = VocabExtension {
        old_vocab: state.old_next_id as usize,
        new_vocab: state.next_id as usize,
        subtokens,
        pieces: Some(texts),
    };
    extension.validate()?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(Extended { tokenizer_json, extension, report })
}

/// Scripts written without spaces between words, as [`SPACE_BEFORE_UNSPACED`] names them.
fn is_unspaced_script(c: char) -> bool {
    matches!(c as u32, 0x3000..=0x30ff | 0x3400..=0x4dbf | 0x4e00..=0x9fff | 0xf900..=0xfaff | 0xff00..=0xffef | 0x20000..=0x3134f)
}

/// Puts the [`SPACE_BEFORE_UNSPACED`] split first in the pre-tokenizer (wrapping a single one in
/// a sequence). False when it is there already or there is no pre-tokenizer to extend.
fn isolate_space_before_unspaced(root: &mut Json) -> bool {
    let split = Json::Obj(vec![
        ("type".into(), Json::Str("Split".into())),
        ("pattern".into(), Json::Obj(vec![("Regex".into(), Json::Str(SPACE_BEFORE_UNSPACED.into()))])),
        ("behavior".into(), Json::Str("Isolated".into())),
        ("invert".into(), Json::Bool(false)),
    ]);
    let Some(pre) = root.get_mut("pre_tokenizer") else { return false };
    if pre.is_null() || has_space_split(pre) {
        return false;
    }
    let is_sequence = pre.get("type").and_then(Json::as_str) == Some("Sequence");
    match pre.get_mut("pretokenizers") {
        Some(Json::Arr(list)) if is_sequence => list.insert(0, split),
        _ => {
            let old = std::mem::replace(pre, Json::Null);
            *pre = Json::Obj(vec![("type".into(), Json::Str("Sequence".into())), ("pretokenizers".into(), Json::Arr(vec![split, old]))]);
        }
    }
    true
}

fn has_space_split(pre: &Json) -> bool {
    let is_it = |p: &Json| p.get("pattern").and_then(|r| r.get("Regex")).and_then(Json::as_str) == Some(SPACE_BEFORE_UNSPACED);
    match pre.get("pretokenizers") {
        Some(Json::Arr(list)) => list.iter().any(is_it),
        _ => is_it(pre),
    }
}

/// Longer pieces are reported as unreachable rather than searched for a merge path.
pub const MAX_PIECE_CHARS: usize = 64;

/// Files `extend` writes; an existing output folder holding only these may be replaced.
const OUTPUT_FILES: [&str; 4] = ["tokenizer.json", "vocab_extension.json", "tokenizer_config.json", "special_tokens_map.json"];
/// Files copied unchanged from the input folder when present.
const COPIED_FILES: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];

/// Extends the tokenizer at `input` (a `tokenizer.json` or a folder holding one) and writes
/// `out_dir/{tokenizer.json, vocab_extension.json}` plus copies of `tokenizer_config.json` and
/// `special_tokens_map.json` from the input folder. The folder is assembled beside `out_dir` and
/// renamed into place, so a failure leaves nothing half-made. An existing `out_dir` is an error
/// unless `overwrite` is set, and even then only if it holds nothing but the files above (so a
/// model folder is never deleted by mistake).
pub fn extend(input: &Path, source: &PieceSource, out_dir: &Path, overwrite: bool) -> Result<ExtendReport> {
    let file = resolve_tokenizer_file(input)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {} as UTF-8 text", file.display()))?;
    let in_dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));

    if out_dir.exists() {
        if !overwrite {
            bail!("output folder {} already exists; choose a new folder or allow overwriting", out_dir.display());
        }
        if !out_dir.is_dir() {
            bail!("output path {} exists and is not a folder", out_dir.display());
        }
        let same = std::fs::canonicalize(out_dir).ok() == std::fs::canonicalize(&in_dir).ok();
        let foreign: Vec<String> = std::fs::read_dir(out_dir)
            .with_context(|| format!("cannot list {}", out_dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !OUTPUT_FILES.contains(&n.as_str()))
            .collect();
        if same || !foreign.is_empty() {
            bail!(
                "refusing to replace {}: it is the input folder or holds other files ({}); write to a new folder",
                out_dir.display(),
                foreign.join(", ")
            );
        }
    }

    let extended = extend_json(&text, &file.display().to_string(), source)?;

    let staged = crate::io::atomic::StagedDir::new(out_dir, true)?;
    write_atomic(&staged.path().join("tokenizer.json"), extended.tokenizer_json.as_bytes())?;
    extended.extension.save(&staged.path().join("vocab_extension.json"))?;
    for f in COPIED_FILES {
        let src = in_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, staged.path().join(f)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    staged.commit()?;
    Ok(extended.report)
}

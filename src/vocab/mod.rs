//! Vocabulary extension for teaching an English LLaMA-family model Chinese (issue #4).
//!
//! LLaMA-2's tokenizer has 32,000 SentencePiece-BPE pieces but only ~700 CJK characters, so
//! Chinese costs ~1.6 tokens per character (most characters fall back to 3 byte tokens). Linly /
//! Chinese-LLaMA / Colossal-LLaMA-2 add ~8k characters and ~20k words to get below 0.8. This module
//! provides the three steps of that recipe:
//!
//! * [`extend()`] — add pieces to a HF `tokenizer.json` as *real BPE vocab entries with merges*
//!   (not "added tokens"), and write `vocab_extension.json` ([`VocabExtension`]).
//! * [`init_new_rows`] / [`resize_table`] — initial embedding / LM-head rows for the new tokens.
//! * [`stats()`] / [`render_table`] / [`encode`] — tokens per character, byte-fallback tokens and
//!   round-trip failures of one or more tokenizers on text files.
//! * [`copy_task`] — "repeat this text" training examples over the added pieces, so that the new
//!   rows learn to be copied from earlier in the context (which the base model does for its own
//!   tokens and the new rows cannot at first).
//! * [`cover()`] — which documents of a training text a short run should read so that it shows
//!   as many added pieces as it can.
//!
//! # Decisions
//!
//! * **Merges are appended after all existing merges** and every appended merge produces a *new*
//!   piece. Text that contains none of the new pieces therefore tokenizes to exactly the old ids: no
//!   old merge changes rank, and no new merge can fire without its output, a new piece, occurring
//!   in the text.
//! * **Merge paths.** Pieces are processed shortest first (characters, then 2-char words, …), each
//!   tokenized with the model as extended so far, so `中华人民` is built from `中华` + `人民` when
//!   those were added. When no split of the current tokens reaches the piece through existing
//!   pieces, the fewest possible *intermediate* pieces are added (found by a small dynamic program);
//!   they are ordinary new tokens and appear in `vocab_extension.json`. A merge may never produce an
//!   old piece (that would change old text). Characters a word needs but that are not single tokens
//!   are added first, so words are built from whole characters (this also keeps byte-level words
//!   from being stitched together from byte fragments). A piece that still cannot be made one token
//!   is skipped and listed in [`ExtendReport::unreachable`].
//! * **Order and ids.** Ids are `old_vocab + i` in the order pieces were added: stable-sorted by
//!   length in characters, otherwise input order (file order for lists, descending frequency for
//!   selections); an intermediate comes right before the first piece that needed it. Within one
//!   length, earlier pieces get higher merge priority, like BPE training. Pieces that start with a
//!   space (`▁他`) go last, so their merges only absorb the space / dummy prefix and never change
//!   how the word after it is segmented.
//! * **`▁`-prefixed pieces.** LLaMA's normalizer prepends `▁` to every text and Chinese has no
//!   spaces, so each Chinese sentence starts with a lone `▁` token (0.12 tokens/char on the short
//!   HSK sentences). [`SelectConfig::max_prefixed`] adds `▁`+word pieces for the most frequent
//!   text-initial words; ~1,000 of them (taken from the word budget) bring HSK from 0.83 to 0.76.
//! * **`subtokens[i]`** is the old *model's* tokenization of the piece (no normalizer, so no
//!   SentencePiece dummy-prefix `▁`, no BOS), including byte-fallback tokens like `<0xE4>` — for a
//!   CJK character those bytes are its only sub-tokens. A `▁` that is part of the piece itself
//!   (`▁他`) is listed like any other sub-token. `<unk>` ids are left out (their row says
//!   nothing about the piece), which may leave a list empty; [`init_new_rows`] then uses the mean
//!   of all rows.
//! * **Piece text.** Pieces are plain text. For SentencePiece-style tokenizers a space is written
//!   `▁`; for byte-level ones the UTF-8 bytes are mapped to the byte alphabet (`中` → `ä¸Ń`). A
//!   piece the pre-tokenizer would split (e.g. `你好！` under GPT-2's regex) can never be one token
//!   and is skipped ([`ExtendReport::skipped_split`]).
//! * **Choosing pieces** ([`SelectConfig`]): characters (Han, CJK punctuation, full-width forms)
//!   and words (all-Han, 2..=`max_word_chars` chars, from a word list such as jieba's
//!   `word freq POS` dict) that are not single tokens yet, most frequent first. Frequencies come
//!   from the corpus when one is given (words counted by forward-maximum-matching segmentation
//!   with the word list), otherwise from the word list's own frequency column (a character's
//!   frequency is the sum of the frequencies of the words containing it). Words are only chosen if
//!   all their characters are in the old vocab or among the chosen characters.
//! * **Output.** `tokenizer.json` keeps the original key order, indentation and merge notation
//!   (`"a b"` strings or `["a", "b"]` pairs; a string list becomes pairs only if a new piece
//!   contains a literal space, which `"a b"` cannot express); `tokenizer_config.json` and
//!   `special_tokens_map.json` are copied, `tokenizer.model` deliberately is not (a stale
//!   SentencePiece model would let `transformers` load the unextended slow tokenizer). The output
//!   folder is built beside the target and renamed into place.

mod bpe;
pub mod chain;
mod copy_task;
mod cover;
pub mod distill;
mod extend;
mod model;
mod json;
mod resize;
mod select;
mod stats;
#[cfg(test)]
mod tests;

pub use cover::{counts as cover_counts, cover, random_draw, shown, Cover, CoverConfig, CoverDoc};
pub use copy_task::{copy_task, copyable_pieces, CopyExample, CopyTaskConfig, CopyablePieces, DEFAULT_INSTRUCTION};
pub use extend::{extend, extend_json, ExtendReport, Extended, PieceSource, MAX_PIECE_CHARS};
pub use resize::{init_new_rows, resize_table, InitMethod, VocabExtension};
pub use model::{init_std, moved_head_rows, resize_loaded, resize_model, resize_tables, DistillSpec, FitReport, ResizeReport, MOVED_ROWS_FILE};
pub use select::SelectConfig;
pub use crate::tokenizer::{load_tokenizer, resolve_tokenizer_file};
pub use stats::{encode, measure_lines, render_table, stats, Encoded, TextStats, TokenizerStats};

use anyhow::Result;
use std::path::Path;

/// Atomic write (temp file + rename), shared with the rest of the crate.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::atomic::write(path, bytes)
}

/// Han ideographs (CJK Unified Ideographs incl. extensions, compatibility ideographs).
pub(crate) fn is_han(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FFFF | 0x30000..=0x3134F)
}

/// Characters worth adding for Chinese: Han plus CJK punctuation and full-width forms (`，。！？`).
pub(crate) fn is_cjk(c: char) -> bool {
    is_han(c) || matches!(c as u32, 0x3000..=0x303F | 0xFF00..=0xFFEF)
}

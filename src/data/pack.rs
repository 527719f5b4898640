//! Full-sentence packing: rows of `seq_len` filled with whole documents.
//!
//! Documents are cut (in `pieces.rs`) only when longer than `seq_len`, into chunks of `seq_len` that overlap by
//! one token: the first position of every packed piece has label -100 (see below), so the
//! overlap lets the token at a cut still be predicted, from the end of the previous chunk.
//! Pieces with no loss left after that masking are dropped (they would cost compute and teach
//! nothing).
//!
//! Rows are filled from a window of pending pieces: the oldest first (so the stream always
//! advances and the source's order, which bucketed mixing relies on, is roughly kept), then
//! repeatedly the longest piece that still fits (best fit), until nothing in the window fits.
//! The rest is padding with label -100.
//!
//! Documents in a row attend to each other (no block-diagonal mask, as in Linly and most
//! packers), but the label of each piece's first token is -100: with the HF shift the logits at
//! position t are scored against `labels[t + 1]`, so this keeps the last token of one document
//! from being trained to predict the first token of the next. The first piece of a document
//! starts with BOS (text and prompted kinds), which is never a target anyway, so nothing is lost.

use super::pieces::Pieces;
use super::tokenize::Tokens;
use serde::{Deserialize, Serialize};

/// One packed row before it joins a batch.
pub(crate) struct Row {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub non_pad: usize,
    pub loss_tokens: usize,
    pub pieces: usize,
}

/// Fills one row from `window` (indices into `segs`). `refill` tops the window up from the
/// source's stream; it is called after every removal so best fit always sees a full window.
pub(crate) fn fill_row(
    seq_len: usize,
    pad_id: u32,
    packing: bool,
    docs: &Tokens,
    segs: &Pieces,
    window: &mut Vec<u32>,
    mut refill: impl FnMut(&mut Vec<u32>),
) -> Row {
    let mut row = Row { ids: Vec::with_capacity(seq_len), labels: Vec::with_capacity(seq_len), non_pad: 0, loss_tokens: 0, pieces: 0 };
    let mut loss = Vec::with_capacity(seq_len);
    refill(window);
    let mut next = if window.is_empty() { None } else { Some(0) };
    while let Some(w) = next {
        let seg = segs.get(window.remove(w) as usize);
        let first = row.ids.len();
        loss.clear();
        docs.read(seg.start, seg.len, &mut row.ids, &mut loss);
        for (k, &l) in loss.iter().enumerate() {
            let id = row.ids[first + k];
            let lab = if k > 0 && l { id as i64 } else { -100 };
            if lab != -100 {
                row.loss_tokens += 1;
            }
            row.labels.push(lab);
        }
        row.pieces += 1;
        refill(window);
        let room = seq_len - row.ids.len();
        next = if packing { best_fit(window, segs, room) } else { None };
    }
    row.non_pad = row.ids.len();
    row.ids.resize(seq_len, pad_id);
    row.labels.resize(seq_len, -100);
    row
}

/// Window index of the longest piece of at most `room` tokens (earliest on ties).
fn best_fit(window: &[u32], segs: &Pieces, room: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, &s) in window.iter().enumerate() {
        let len = segs.get(s as usize).len;
        if len <= room && best.is_none_or(|(_, bl)| len > bl) {
            best = Some((i, len));
            if len == room {
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Packing counters of one source (part of the mixer state, so they survive `--resume`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStats {
    /// [`SourceSpec::display_name`](super::SourceSpec::display_name).
    pub name: String,
    /// Rows (sequences) drawn from this source.
    pub rows: u64,
    /// `rows × seq_len`.
    pub positions: u64,
    /// Positions holding a token (not padding).
    pub non_pad: u64,
    /// Positions with a label (not -100).
    pub loss_tokens: u64,
    /// Document pieces packed.
    pub pieces: u64,
    /// The epoch (0-based pass over the source) its stream is reading. The stream runs up to
    /// `pack_window` pieces ahead of the rows, so this turns slightly before the last pieces of
    /// the previous epoch are packed.
    pub epoch: u64,
}

impl SourceStats {
    /// Fraction of non-pad positions (1.0 before any row).
    pub fn efficiency(&self) -> f64 {
        if self.positions == 0 {
            1.0
        } else {
            self.non_pad as f64 / self.positions as f64
        }
    }
}

/// Packing efficiency, overall and per source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackStats {
    /// In the order of the sources given to the mixer.
    pub sources: Vec<SourceStats>,
}

impl PackStats {
    /// Fraction of non-pad positions over all rows drawn so far.
    pub fn efficiency(&self) -> f64 {
        let pos: u64 = self.sources.iter().map(|s| s.positions).sum();
        let np: u64 = self.sources.iter().map(|s| s.non_pad).sum();
        if pos == 0 {
            1.0
        } else {
            np as f64 / pos as f64
        }
    }

    /// One line per source plus a total, for logs.
    pub fn summary(&self) -> String {
        let mut s = format!("packing efficiency {:.1}%", 100.0 * self.efficiency());
        for src in &self.sources {
            s.push_str(&format!(
                "\n  {}: {:.1}% of {} rows, {} loss tokens, epoch {}",
                src.name,
                100.0 * src.efficiency(),
                src.rows,
                src.loss_tokens,
                src.epoch
            ));
        }
        s
    }
}

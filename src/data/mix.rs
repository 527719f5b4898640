//! The mixer: which source each packed row comes from, with curriculum weights, optional
//! Colossal-LLaMA-2 bucketed ordering, epochs, and a serialisable state for `--resume`.

use super::pack::{fill_row, PackStats, SourceStats};
use super::pieces::{pieces, Pieces};
use super::sources::{SourceKind, Weight};
use super::tokenize::{Tokens, TokenizedSource};
use crate::rng::SplitMix;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Mixer options (a recipe can deserialize them from its `[mix]`/`[train]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    /// Tokens per row.
    pub seq_len: usize,
    /// Seeds the source choice and every epoch's shuffle.
    #[serde(default)]
    pub seed: u64,
    /// Id written into padding (its label is always -100). Padding sits at the end of a row, so
    /// under causal attention no real token attends to it and no attention mask is needed.
    #[serde(default)]
    pub pad_id: u32,
    /// Colossal-LLaMA-2 bucketed mixing: see [`Mixer`].
    #[serde(default)]
    pub bucketed: bool,
    /// Number of bins per source when `bucketed`.
    #[serde(default = "default_bins")]
    pub bins: usize,
    /// Whole-document packing (Linly). `false` puts one document piece per row, padded.
    #[serde(default = "yes")]
    pub packing: bool,
    /// Pending pieces per source that best-fit packing chooses from. Larger packs tighter but
    /// strays further from the source's order.
    #[serde(default = "default_window")]
    pub pack_window: usize,
}

fn yes() -> bool {
    true
}
fn default_bins() -> usize {
    10
}
fn default_window() -> usize {
    64
}

impl MixConfig {
    /// Packing on, unbucketed, pad id 0, window 64.
    pub fn new(seq_len: usize, seed: u64) -> Self {
        MixConfig { seq_len, seed, pad_id: 0, bucketed: false, bins: default_bins(), packing: true, pack_window: default_window() }
    }
}

/// One training batch. `labels` are HF-aligned (`labels[r][t]` is the token at `t`, or -100):
/// the trainer shifts, scoring the logits at `t` against `labels[r][t + 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[batch_size][seq_len]`.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch_size][seq_len]`, -100 where there is no loss (prompt, padding, piece starts).
    pub labels: Vec<Vec<i64>>,
    /// Index (into the sources given to [`Mixer::new`]) each row was drawn from.
    pub source_of_row: Vec<usize>,
    /// Number of labels that are not -100: exactly the loss terms after the shift (the loss's
    /// denominator), since every row's first label is -100.
    pub tokens: usize,
}

/// Where one source's stream stands (private: only serialized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CursorState {
    /// Identity checks on restore.
    name: String,
    segments: usize,
    tokens: usize,
    epoch: u64,
    cursor: usize,
    window: Vec<u32>,
    stats: SourceStats,
}

/// Everything needed to continue the exact same sequence of batches. Save it with the
/// checkpoint (it is serde) and hand it to [`Mixer::restore`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    format: u32,
    config: MixConfig,
    rng: u64,
    /// Current bucket and full passes over all buckets (bucketed mode only).
    bucket: usize,
    pass: u64,
    sources: Vec<CursorState>,
}

const STATE_FORMAT: u32 = 1;

struct Src {
    kind: SourceKind,
    weight: Weight,
    docs: Tokens,
    segs: Pieces,
    /// Contiguous ranges of `segs` (one range covering everything when not bucketed).
    bins: Vec<(usize, usize)>,
}

/// The shuffled order of the current (epoch, bin) of a source; derived from the seed, so it is
/// rebuilt rather than saved.
#[derive(Default)]
struct Perm {
    key: Option<(u64, usize)>,
    order: Vec<u32>,
}

/// Draws packed rows from several sources.
///
/// Each row comes from one source, chosen with probability proportional to the sources'
/// weights at the current progress (`step / total_steps`), using the mixer's seeded RNG.
///
/// Unbucketed: each source is read in a fresh seeded permutation per epoch; when it runs out it
/// starts its next epoch with a new permutation, so small sources repeat (as their weight asks)
/// without ever stalling the others.
///
/// Bucketed (`bucketed = true, bins = N`, after Colossal-LLaMA-2): every source is cut into `N`
/// contiguous bins in file order (the topic order), and bucket k holds bin k of every source.
/// Rows come from bucket 0 until every source with a positive weight has used up its bin 0,
/// then bucket 1, and so on; after bucket N-1 the next pass starts again at bucket 0. Within a
/// bin, documents are shuffled (per pass); packing never reaches into the next bin. Weights
/// here set how sources interleave inside a bucket; over a full pass each source contributes
/// its whole data once. A source whose weight is 0 when its bucket ends skips the rest of that
/// bin.
///
/// All randomness comes from [`crate::rng::SplitMix`] rather than `rand`'s `StdRng`, whose
/// stream may change between `rand` releases: a checkpoint must replay identically after a
/// dependency update.
pub struct Mixer {
    cfg: MixConfig,
    srcs: Vec<Src>,
    perms: Vec<Perm>,
    st: MixerState,
}

impl std::fmt::Debug for Mixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixer").field("config", &self.cfg).field("sources", &self.source_names()).finish_non_exhaustive()
    }
}

impl Mixer {
    /// Builds the mixer at the start of training (use [`Mixer::restore`] to continue one).
    pub fn new(sources: Vec<TokenizedSource>, cfg: MixConfig) -> Result<Self> {
        if sources.is_empty() {
            bail!("no data sources: add [[data]] blocks to the recipe");
        }
        if cfg.seq_len < 2 {
            bail!("seq_len = {} is too short; use at least 2 (typically 512–4096)", cfg.seq_len);
        }
        if cfg.pack_window == 0 {
            bail!("pack_window = 0: use at least 1 (default 64)");
        }
        if cfg.bucketed && cfg.bins == 0 {
            bail!("bucketed mixing with bins = 0: set bins to 1 or more (e.g. 10)");
        }
        let nbins = if cfg.bucketed { cfg.bins } else { 1 };
        let mut srcs = Vec::with_capacity(sources.len());
        let mut cursors = Vec::with_capacity(sources.len());
        for (i, s) in sources.into_iter().enumerate() {
            let name = s.name();
            let what = format!("[[data]] #{} `{name}` ({})", i + 1, s.path.display());
            if let Err(e) = s.spec.weight.check() {
                bail!("{what}: {e}");
            }
            let segs = pieces(&s.docs, cfg.seq_len).with_context(|| format!("{what}: cannot prepare its pieces"))?;
            if segs.is_empty() {
                bail!("{what}: no document has a token to learn (all labels are -100 or documents are 1 token long); fix the data or remove the block");
            }
            let n = segs.len();
            let bins = (0..nbins).map(|k| (k * n / nbins, (k + 1) * n / nbins)).collect();
            cursors.push(CursorState {
                name: name.clone(),
                segments: n,
                tokens: s.docs.tokens(),
                epoch: 0,
                cursor: 0,
                window: Vec::new(),
                stats: SourceStats { name, ..Default::default() },
            });
            srcs.push(Src { kind: s.spec.kind, weight: s.spec.weight, docs: s.docs, segs, bins });
        }
        for p in [0.0, 1.0] {
            if srcs.iter().map(|s| s.weight.at(p)).sum::<f64>() <= 0.0 {
                let when = if p == 0.0 { "start" } else { "end" };
                bail!("the weights of all [[data]] blocks are 0 at the {when} of training; give at least one source a positive weight there");
            }
        }
        let perms = srcs.iter().map(|_| Perm::default()).collect();
        let mut rng = SplitMix::new(cfg.seed);
        rng.next_u64();
        let st = MixerState { format: STATE_FORMAT, config: cfg.clone(), rng: rng.state(), bucket: 0, pass: 0, sources: cursors };
        Ok(Mixer { cfg, srcs, perms, st })
    }

    /// The state to save with a checkpoint.
    pub fn state(&self) -> MixerState {
        self.st.clone()
    }

    /// Continues from a saved state. Fails, leaving the mixer unchanged, when the state belongs
    /// to other data or options (a source added, a file changed, another seq_len or seed).
    /// Weights, `packing` and `pad_id` are not checked: changing them on resume is allowed and only
    /// changes the draws from then on.
    pub fn restore(&mut self, state: MixerState) -> Result<()> {
        let fix = "resume with the same [[data]] files and mixing options as the checkpoint, or start training afresh";
        if state.format != STATE_FORMAT {
            bail!("the checkpoint's data state has format {} (this build reads {STATE_FORMAT}); {fix}", state.format);
        }
        let (a, b) = (&state.config, &self.cfg);
        if (a.seq_len, a.seed, a.bucketed, a.bins, a.pack_window) != (b.seq_len, b.seed, b.bucketed, b.bins, b.pack_window) {
            bail!(
                "the checkpoint's data state was made with seq_len {}, seed {}, bucketed {}, bins {}, pack_window {}; now seq_len {}, seed {}, bucketed {}, bins {}, pack_window {}; {fix}",
                a.seq_len, a.seed, a.bucketed, a.bins, a.pack_window, b.seq_len, b.seed, b.bucketed, b.bins, b.pack_window
            );
        }
        if state.sources.len() != self.srcs.len() {
            bail!("the checkpoint has {} data sources, the recipe {}; {fix}", state.sources.len(), self.srcs.len());
        }
        let nbins = if self.cfg.bucketed { self.cfg.bins } else { 1 };
        if state.bucket >= nbins {
            bail!("the checkpoint's data state is corrupt (bucket {} of {nbins}); {fix}", state.bucket);
        }
        for (i, (c, mine)) in state.sources.iter().zip(&self.st.sources).enumerate() {
            if (c.name.as_str(), c.segments, c.tokens) != (mine.name.as_str(), mine.segments, mine.tokens) {
                bail!(
                    "data source #{} was `{}` with {} pieces / {} tokens at the checkpoint and is `{}` with {} / {} now; {fix}",
                    i + 1, c.name, c.segments, c.tokens, mine.name, mine.segments, mine.tokens
                );
            }
            let bin = if self.cfg.bucketed { state.bucket } else { 0 };
            let (lo, hi) = self.srcs[i].bins[bin];
            if c.cursor > hi - lo || c.window.iter().any(|&w| w as usize >= c.segments) {
                bail!("the checkpoint's data state for source #{} is corrupt; {fix}", i + 1);
            }
        }
        self.st = state;
        self.st.config.pad_id = self.cfg.pad_id;
        Ok(())
    }

    /// Packing efficiency so far, overall and per source.
    pub fn stats(&self) -> PackStats {
        PackStats { sources: self.st.sources.iter().map(|c| c.stats.clone()).collect() }
    }

    /// Each source's share of rows at `progress` in `[0, 1]` (normalised weights).
    pub fn shares(&self, progress: f64) -> Vec<f64> {
        let w: Vec<f64> = self.srcs.iter().map(|s| s.weight.at(progress)).collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// Source names, in the order of `Batch::source_of_row` indices.
    pub fn source_names(&self) -> Vec<String> {
        self.st.sources.iter().map(|c| c.name.clone()).collect()
    }

    /// The kind of each source.
    pub fn source_kinds(&self) -> Vec<SourceKind> {
        self.srcs.iter().map(|s| s.kind).collect()
    }

    /// The next `batch_size` packed rows, with source weights taken at `step / total_steps`.
    pub fn next_batch(&mut self, batch_size: usize, step: u64, total_steps: u64) -> Result<Batch> {
        let progress = if total_steps == 0 { 0.0 } else { (step as f64 / total_steps as f64).min(1.0) };
        let mut b = Batch { input_ids: Vec::with_capacity(batch_size), labels: Vec::with_capacity(batch_size), source_of_row: Vec::with_capacity(batch_size), tokens: 0 };
        for _ in 0..batch_size {
            let (s, ids, labels, loss) = self.next_row(progress)?;
            b.input_ids.push(ids);
            b.labels.push(labels);
            b.source_of_row.push(s);
            b.tokens += loss;
        }
        Ok(b)
    }

    fn next_row(&mut self, progress: f64) -> Result<(usize, Vec<u32>, Vec<i64>, usize)> {
        let w: Vec<f64> = self.srcs.iter().map(|s| s.weight.at(progress)).collect();
        if !self.cfg.bucketed {
            let s = self.choose(&w);
            return Ok(self.pack(s));
        }
        // A bucket with nothing left for the weighted sources ends; every source has data in
        // some bin and some weight is positive (checked in new), so a full cycle finds a row.
        for _ in 0..=self.cfg.bins {
            let avail: Vec<f64> = (0..self.srcs.len()).map(|i| if w[i] > 0.0 && self.has_pending(i) { w[i] } else { 0.0 }).collect();
            if avail.iter().any(|&x| x > 0.0) {
                let s = self.choose(&avail);
                return Ok(self.pack(s));
            }
            self.st.bucket += 1;
            if self.st.bucket == self.cfg.bins {
                self.st.bucket = 0;
                self.st.pass += 1;
            }
            for c in &mut self.st.sources {
                c.cursor = 0;
                c.window.clear();
                c.epoch = self.st.pass;
                c.stats.epoch = self.st.pass;
            }
        }
        bail!("internal error: no data source has rows at progress {progress:.3}; please report this with the recipe")
    }

    fn choose(&mut self, w: &[f64]) -> usize {
        let total: f64 = w.iter().sum();
        let mut rng = SplitMix::new(self.st.rng);
        let r = rng.unit() * total;
        self.st.rng = rng.state();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                acc += x;
                last = i;
                if r < acc {
                    return i;
                }
            }
        }
        last
    }

    fn has_pending(&mut self, i: usize) -> bool {
        let (src, perm, cur) = (&self.srcs[i], &mut self.perms[i], &mut self.st.sources[i]);
        let mut window = std::mem::take(&mut cur.window);
        refill(&self.cfg, self.st.bucket, self.st.pass, i, src, perm, cur, &mut window);
        cur.window = window;
        !cur.window.is_empty()
    }

    fn pack(&mut self, i: usize) -> (usize, Vec<u32>, Vec<i64>, usize) {
        let (cfg, bucket, pass) = (&self.cfg, self.st.bucket, self.st.pass);
        let (src, perm, cur) = (&self.srcs[i], &mut self.perms[i], &mut self.st.sources[i]);
        let mut window = std::mem::take(&mut cur.window);
        let row = fill_row(cfg.seq_len, cfg.pad_id, cfg.packing, &src.docs, &src.segs, &mut window, |w| refill(cfg, bucket, pass, i, src, perm, cur, w));
        cur.window = window;
        let st = &mut cur.stats;
        st.rows += 1;
        st.positions += cfg.seq_len as u64;
        st.non_pad += row.non_pad as u64;
        st.loss_tokens += row.loss_tokens as u64;
        st.pieces += row.pieces as u64;
        (i, row.ids, row.labels, row.loss_tokens)
    }
}

/// Tops `window` up to `pack_window` pieces from the source's stream: the current epoch's
/// permutation (unbucketed, wrapping into the next epoch) or the current bin's (bucketed, which
/// stops at the bin's end).
#[allow(clippy::too_many_arguments)]
fn refill(cfg: &MixConfig, bucket: usize, pass: u64, i: usize, src: &Src, perm: &mut Perm, cur: &mut CursorState, window: &mut Vec<u32>) {
    while window.len() < cfg.pack_window {
        let (epoch, bin) = if cfg.bucketed { (pass, bucket) } else { (cur.epoch, 0) };
        if perm.key != Some((epoch, bin)) {
            let (lo, hi) = src.bins[bin];
            perm.order.clear();
            perm.order.extend(lo as u32..hi as u32);
            let s = cfg.seed ^ (i as u64).wrapping_mul(0xD1B54A32D192ED03) ^ epoch.wrapping_mul(0x8CB92BA72F3D8DD7) ^ (bin as u64).wrapping_mul(0xA24BAED4963EE407);
            SplitMix::new(s).shuffle(&mut perm.order);
            perm.key = Some((epoch, bin));
        }
        if cur.cursor < perm.order.len() {
            window.push(perm.order[cur.cursor]);
            cur.cursor += 1;
        } else if cfg.bucketed || perm.order.is_empty() {
            return;
        } else {
            cur.epoch += 1;
            cur.stats.epoch = cur.epoch;
            cur.cursor = 0;
        }
    }
}

//! New rows that start where the base model is: initialisation from the base model's own
//! computation, not only from its tables.
//!
//! Sub-token-mean rows keep a new piece's *table* neighbourhood but not what the model computes
//! after reading the piece's old sub-tokens. For a byte-level tokenizer that is everything: the
//! mean of three UTF-8 byte rows says almost nothing about which Chinese character they spell,
//! and SmolLM2-135M pays +2.6 bits/char for it before any training. Two fits fix the two sides,
//! both against the frozen base model reading the *old* tokenization of the same text:
//!
//! * **Input rows: Token Distillation** (Dobler, Elliott, de Melo, ICLR 2026). Each new input
//!   row is optimised so that the final hidden states of the model reading the new tokenization
//!   match the base model's hidden states at the aligned positions of the old tokenization (the
//!   last sub-token of each new piece). All new rows that occur in a batch of contexts are fitted
//!   together, with the model frozen: a forward and backward pass per batch, nothing else trains.
//! * **Output rows: the base's own probability of every piece** ([`HeadTargets::Chain`], the
//!   default). At each position of the fitting text the base, reading the old tokenization,
//!   gives a distribution over the next old token; a new piece's probability is the chain of
//!   its sub-tokens' conditionals (exact along the path the text takes, from counts of the
//!   whole fitting text elsewhere), and the mass of an expansion that goes on into a longer
//!   token moves to the longer one ([`super::chain`]). The new head rows, and the head rows of
//!   the 186 (for SmolLM2's Chinese extension) old first sub-tokens whose mass moves, are
//!   fitted by mini-batch Adam to that distribution on the model's own hidden states (after the
//!   input fit), the other old rows fixed. Every fitted row gets a target at every position, so
//!   a fit on 20k positions does not memorise them as the one-hot [`HeadTargets::Labels`]
//!   regression (the first version) did.
//!
//! The two sides want different values for one piece (what it means when read vs. when to
//! predict it), so fitting both unties a tied table: the new rows are stored twice (embedding and
//! head), 2 × `added` × `hidden` values, and a merged tied model gets an `lm_head` of its own.
//! Old input rows are never touched; of the old head rows only the first sub-tokens' move (and
//! `vocab resize` lists them in [`super::MOVED_ROWS_FILE`] so an adapter carries them).
//!
//! Contexts come from the training text (`text`), never from evaluation text.

mod adam;
mod cache;
pub mod contexts;
mod head;
mod input;

pub use contexts::{contexts_from_ids, contexts_from_text, expand, DistillContext};

pub use head::MovedRows;

use cache::{chain_cache_load, chain_cache_save, teacher_cache_load, teacher_cache_save};
use super::chain::{ChainData, Trie};
use super::VocabExtension;
use crate::model::{Llama, TokenTable};
use anyhow::{bail, ensure, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;
use std::time::Instant;

/// Which side(s) of the table to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sides {
    pub input: bool,
    pub output: bool,
}

/// Settings of [`distill_rows`]. The defaults are what the quickstart uses; they were chosen on
/// a validation text (the part of Lu Xun's *Call to Arms* after the held-out part), never on the
/// reported text.
#[derive(Debug, Clone, Serialize)]
pub struct DistillOptions {
    pub sides: Sides,
    /// New-tokenization tokens of context the input rows are distilled on (each costs a
    /// teacher forward pass on its old tokenization and a forward/backward per pass).
    pub tokens: usize,
    /// Further tokens of context whose positions the head is fitted on (a forward pass each;
    /// the head needs many occurrences per piece more than it needs a teacher).
    pub head_tokens: usize,
    /// Tokens per context (new tokenization).
    pub seq_len: usize,
    /// Contexts per input-side step.
    pub batch: usize,
    /// Passes over the contexts for the input rows.
    pub input_epochs: usize,
    /// Adam step of the input rows, as a fraction of the old rows' RMS (so that one setting
    /// fits tables of any scale).
    pub input_lr: f64,
    /// Passes over the cached positions for the head rows.
    pub head_epochs: usize,
    /// Adam step of the head rows in nats: the learning rate is this over the mean L1 norm of
    /// the hidden states, so one step moves a logit by about this much whatever their scale.
    pub head_lr: f64,
    /// Positions per head-side step.
    pub head_batch: usize,
    /// Shuffles the contexts.
    pub seed: u64,
    /// What the head rows are fitted to (see [`HeadTargets`]).
    pub head_targets: HeadTargets,
    /// With chain targets, fit the head rows of the new pieces' first sub-tokens too (old rows):
    /// the base gives them the mass of every piece they start, which after the extension mostly
    /// belongs to the pieces. Costs those rows (186 for SmolLM2's Chinese extension) in the
    /// adapter; the input rows stay untouched.
    pub move_old_rows: bool,
}

/// Targets of the head fit (`--init-head-targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HeadTargets {
    /// The next piece of the text (one-hot): only rows that occur as labels learn.
    Labels,
    /// The base's own probability of every token of the extended vocabulary at the position
    /// (chain of sub-token probabilities, mass moved to the longest token; [`super::chain`]).
    Chain,
}

impl DistillOptions {
    /// Every setting where it enters: a zero length would panic in the chunking, a NaN rate
    /// would write NaN rows.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [("tokens", self.tokens), ("seq_len", self.seq_len), ("batch", self.batch), ("head_batch", self.head_batch)] {
            ensure!(v > 0, "distill {key} = 0: must be at least 1");
        }
        ensure!(self.seq_len >= 2, "distill seq_len = {}: a context needs at least 2 tokens", self.seq_len);
        for (key, v) in [("input_lr (--init-input-lr)", self.input_lr), ("head_lr (--init-head-lr)", self.head_lr)] {
            ensure!(v.is_finite() && v > 0.0, "distill {key} = {v}: must be a finite number above 0");
        }
        Ok(())
    }
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            sides: Sides { input: true, output: true },
            tokens: 4096,
            head_tokens: 16384,
            seq_len: 128,
            batch: 4,
            input_epochs: 3,
            input_lr: 0.25,
            head_epochs: 5,
            head_lr: 2.0,
            head_batch: 1024,
            seed: 0,
            head_targets: HeadTargets::Chain,
            move_old_rows: true,
        }
    }
}

/// What the fit did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DistillReport {
    pub contexts: usize,
    pub student_tokens: usize,
    pub teacher_tokens: usize,
    /// Distinct new pieces that occur in the contexts (only these get an input-side gradient).
    pub pieces_seen: usize,
    pub teacher_secs: f64,
    /// Mean squared distance of final hidden states, first and last input-side pass.
    pub input_mse_first: Option<f64>,
    pub input_mse_last: Option<f64>,
    pub input_secs: f64,
    /// Mean NLL (nats) of the next piece at the cached positions, before and after the head fit.
    pub head_nll_first: Option<f64>,
    pub head_nll_last: Option<f64>,
    pub head_secs: f64,
    /// Old head rows the head fit moved (first sub-tokens of new pieces).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub head_rows_moved: Vec<u32>,
}

/// The new rows, row-major `[ext.added(), hidden]`, fitted or (for the side not fitted) as they
/// started. The two differ, so the table is untied.
pub struct DistilledRows {
    pub embed: Vec<f32>,
    pub head: Vec<f32>,
    /// Old head rows that the fit moved (the first sub-tokens whose mass went to new pieces),
    /// as `(id, row)`.
    pub head_old: MovedRows,
    pub report: DistillReport,
}

fn host(t: Tensor<3>) -> Result<Vec<f32>> {
    t.cast(burn::tensor::FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading hidden states: {e:?}"))
}

pub(super) fn ids_tensor(rows: &[&[u32]], device: &burn::tensor::Device) -> Tensor<2, Int> {
    let t = rows[0].len();
    let v: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&x| x as i64)).collect();
    Tensor::from_data(TensorData::new(v, [rows.len(), t]), device)
}

/// Fits new rows for `ext` against `model`, which must already hold the resized tables (new
/// rows at their starting values, e.g. sub-token mean) on an autodiff device. Returns the new
/// input rows (and head rows when `opts.sides.output`); the model is left as it was given.
///
/// `counts` is the old tokenization of the whole fitting text (the expansions' frequencies
/// below the levels the base gives exactly come from it); empty: the contexts' own.
pub fn distill_rows(model: &Llama, ext: &VocabExtension, contexts: &[DistillContext], counts: &[u32], opts: &DistillOptions, mut log: impl FnMut(&str)) -> Result<DistilledRows> {
    ensure!(model.vocab_size() == ext.new_vocab, "distill: the model has {} rows, the extension {} -> {}: resize first", model.vocab_size(), ext.old_vocab, ext.new_vocab);
    opts.validate()?;
    ensure!(!contexts.is_empty(), "distill: no context holds a new piece; give a text in the new language (the training text)");
    let all_contexts = contexts;
    let n_td = (opts.tokens / opts.seq_len.max(1)).clamp(1, contexts.len());
    let contexts = &all_contexts[..n_td];
    let d = model.config.hidden_size;
    let old = ext.old_vocab;
    let n_new = ext.added();
    let device = model.embed_tokens.base.val().device();
    let mut report = DistillReport { contexts: contexts.len(), ..Default::default() };
    report.student_tokens = contexts.iter().map(|c| c.new_ids.len()).sum();
    report.teacher_tokens = contexts.iter().map(|c| c.old_ids.len()).sum();
    let mut seen = vec![false; n_new];
    for c in contexts {
        for &i in &c.new_ids {
            if i as usize >= old {
                seen[i as usize - old] = true;
            }
        }
    }
    report.pieces_seen = seen.iter().filter(|&&s| s).count();

    // Teacher: the base reading the old tokenization (old ids only, so the new rows play no
    // part); its hidden state at each aligned position is the target of the input fit, and its
    // next-token distributions over all contexts are the head's chain targets.
    let t0 = Instant::now();
    let teacher = model.valid();
    let inner = device.clone().inner();
    let need_chain = opts.sides.output && opts.head_targets == HeadTargets::Chain;
    let head_table = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let old_head = old_rows_of(head_table, old)?;
    let mut trie = Trie::new(ext);
    if need_chain {
        let seqs: Vec<&[u32]> = if counts.is_empty() { all_contexts.iter().map(|c| c.old_ids.as_slice()).collect() } else { vec![counts] };
        trie.count(&seqs);
    }
    let mut targets = teacher_cache_load(contexts, d);
    let mut chain = if need_chain { chain_cache_load(all_contexts) } else { None };
    if targets.is_none() || (need_chain && chain.is_none()) {
        let want_chain = need_chain && chain.is_none();
        let upto = if want_chain { all_contexts.len() } else { contexts.len() };
        let mut tds: Vec<Vec<f32>> = Vec::with_capacity(contexts.len());
        let mut cd = ChainData::default();
        for (k, c) in all_contexts[..upto].iter().enumerate() {
            let h = host(teacher.hidden(ids_tensor(&[&c.old_ids], &inner), None))?;
            if k < contexts.len() {
                let mut t = Vec::with_capacity(c.aligned.len() * d);
                for &a in &c.aligned {
                    t.extend_from_slice(&h[a * d..(a + 1) * d]);
                }
                tds.push(t);
            }
            if want_chain {
                let probs = head::next_token_probs(&h, &old_head, d, old);
                cd.push_context(&trie, &c.old_ids, &c.aligned, c.new_ids.len().saturating_sub(1), &probs, old);
            }
            if (k + 1) % 32 == 0 {
                log(&format!("teacher {}/{upto} contexts", k + 1));
            }
        }
        if targets.is_none() {
            teacher_cache_save(contexts, &tds);
            targets = Some(tds);
        }
        if want_chain {
            chain_cache_save(all_contexts, &cd);
            chain = Some(cd);
        }
    }
    let targets = targets.context("distill: teacher targets")?;
    report.teacher_secs = t0.elapsed().as_secs_f64();

    let start_embed = new_rows_of(&model.embed_tokens, old)?;
    let mut embed = start_embed.clone();
    if opts.sides.input {
        let t0 = Instant::now();
        embed = input::fit_input_rows(&teacher_free(model), contexts, &targets, embed, opts, &mut report, &mut log)?;
        report.input_secs = t0.elapsed().as_secs_f64();
    }
    let mut head = new_rows_of(head_table, old)?;
    let mut head_old = Vec::new();
    if opts.sides.output {
        let t0 = Instant::now();
        // The head is fitted to the hidden states the model will really have: the student's
        // with the input rows as they now are, not the teacher's it only approximates.
        let student = with_new_input_rows(&teacher, &embed, old)?;
        let mut feats = Vec::with_capacity(all_contexts.len());
        for (k, batch) in all_contexts.chunks(opts.batch.max(1)).enumerate() {
            let seqs: Vec<&[u32]> = batch.iter().map(|c| c.new_ids.as_slice()).collect();
            let h = host(student.hidden(ids_tensor(&seqs, &inner), None))?;
            let per = h.len() / batch.len();
            feats.extend(h.chunks_exact(per).map(<[f32]>::to_vec));
            if (k + 1) % 16 == 0 {
                log(&format!("head features {}/{} contexts", (k + 1) * batch.len(), all_contexts.len()));
            }
        }
        let target = match &chain {
            Some(chain) => head::Target::Chain { trie: &trie, chain, move_roots: opts.move_old_rows },
            None => head::Target::Labels,
        };
        (head, head_old) = head::fit_head(&old_head, head, d, old, all_contexts, &feats, target, opts, &mut report, &mut log)?;
        report.head_rows_moved = head_old.iter().map(|(t, _)| *t).collect();
        report.head_secs = t0.elapsed().as_secs_f64();
    }
    Ok(DistilledRows { embed, head, head_old, report })
}

/// A copy of `model` whose new input rows are `rows` (for plain, non-autodiff forward passes).
fn with_new_input_rows(model: &Llama, rows: &[f32], old: usize) -> Result<Llama> {
    let d = model.config.hidden_size;
    let n_new = rows.len() / d;
    let mut m = model.clone();
    let device = m.embed_tokens.base.val().device();
    let base = Param::from_tensor(m.embed_tokens.weight().slice([0..old, 0..d])).set_require_grad(false);
    let extra = Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [n_new, d]), &device);
    m.embed_tokens = TokenTable { base, extra: Some(Param::from_tensor(extra).set_require_grad(false)), extra_f32: true, quant: None, packed: None };
    Ok(m)
}

/// The model with its LoRA branches removed, for the input fit (it fits rows for the base).
fn teacher_free(model: &Llama) -> Llama {
    let mut m = model.clone();
    for (_, lin) in crate::lora::adapter::linears_mut(&mut m) {
        lin.lora.clear();
    }
    m
}

fn table_values(t: &TokenTable) -> Result<Vec<f32>> {
    t.weight().cast(burn::tensor::FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading a token table: {e:?}"))
}

fn new_rows_of(t: &TokenTable, old: usize) -> Result<Vec<f32>> {
    let d = t.hidden();
    let all = table_values(t)?;
    ensure!(all.len() / d > old, "the table has no new rows");
    Ok(all[old * d..].to_vec())
}

pub(super) fn old_rows_of(t: &TokenTable, old: usize) -> Result<Vec<f32>> {
    let d = t.hidden();
    let mut all = table_values(t)?;
    all.truncate(old * d);
    Ok(all)
}

/// Replaces the new rows of a resized model (tables grown, new rows at their start values) with
/// distilled ones. Fitting the head unties a tied table (see the module docs).
pub fn apply_distilled(model: &mut Llama, ext: &VocabExtension, rows: &DistilledRows) -> Result<()> {
    let d = model.config.hidden_size;
    let device = model.embed_tokens.base.val().device();
    let dt = model.dtype;
    let old = ext.old_vocab;
    let build = |old_rows: Vec<f32>, new_rows: &[f32]| -> TokenTable {
        let mut all = old_rows;
        all.extend_from_slice(new_rows);
        TokenTable::new(Tensor::from_data(crate::io::weights::f32_data(&all, [ext.new_vocab, d], dt), (&device, dt.burn())))
    };
    let old_embed = old_rows_of(&model.embed_tokens, old)?;
    let mut old_head = match &model.lm_head {
        Some(h) => old_rows_of(h, old)?,
        None => old_embed.clone(),
    };
    for (t, row) in &rows.head_old {
        old_head[*t as usize * d..(*t as usize + 1) * d].copy_from_slice(row);
    }
    model.lm_head = Some(build(old_head, &rows.head));
    model.config.tie_word_embeddings = false;
    model.embed_tokens = build(old_embed, &rows.embed);
    Ok(())
}

/// Everything between a resized model and distilled rows: contexts from `text`, the fit, and the
/// tables replaced in `model`.
pub fn distill_model(model: &mut Llama, ext: &VocabExtension, tokenizer_dir: &std::path::Path, text_path: &std::path::Path, opts: &DistillOptions, log: impl FnMut(&str)) -> Result<DistillReport> {
    let text = crate::tokenizer::read_text(text_path)?;
    let want_counts = opts.sides.output && opts.head_targets == HeadTargets::Chain;
    let (contexts, counts) = contexts::fitting_text(&text, tokenizer_dir, ext, opts, want_counts).with_context(|| format!("distill contexts from {}", text_path.display()))?;
    if contexts.is_empty() {
        bail!("{}: no context of {} tokens holds a new piece; give the training text of the new language (init_text)", text_path.display(), opts.seq_len);
    }
    let rows = distill_rows(model, ext, &contexts, &counts, opts, log)?;
    apply_distilled(model, ext, &rows)?;
    Ok(rows.report)
}

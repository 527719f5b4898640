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

use super::chain::{ChainData, Trie};
use super::VocabExtension;
use crate::model::{Llama, TokenTable};
use crate::model::gemm::{gemm, View};
use anyhow::{bail, ensure, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;
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

/// One context: the new-tokenization ids and, for each, the index of its last sub-token in the
/// old-tokenization expansion.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillContext {
    pub new_ids: Vec<u32>,
    pub old_ids: Vec<u32>,
    pub aligned: Vec<usize>,
}

/// Expands a new-tokenization sequence into old ids (each new piece replaced by its sub-tokens)
/// and records where each new position ends. `None` if a piece has no sub-tokens (it cannot be
/// read by the base).
pub fn expand(new_ids: &[u32], ext: &VocabExtension) -> Option<DistillContext> {
    let old = ext.old_vocab as u32;
    let mut old_ids = Vec::with_capacity(new_ids.len() * 2);
    let mut aligned = Vec::with_capacity(new_ids.len());
    for &id in new_ids {
        if id < old {
            old_ids.push(id);
        } else {
            let subs = ext.subtokens.get((id - old) as usize)?;
            if subs.is_empty() {
                return None;
            }
            old_ids.extend_from_slice(subs);
        }
        aligned.push(old_ids.len() - 1);
    }
    Some(DistillContext { new_ids: new_ids.to_vec(), old_ids, aligned })
}

/// Cuts `ids` (the new tokenization of the training text) into contexts of `seq_len` that
/// contain at least one new piece, at most `budget` tokens in all.
pub fn contexts_from_ids(ids: &[u32], ext: &VocabExtension, seq_len: usize, budget: usize) -> Vec<DistillContext> {
    let mut out = Vec::new();
    let mut used = 0;
    for chunk in ids.chunks_exact(seq_len) {
        if used + seq_len > budget {
            break;
        }
        if !chunk.iter().any(|&i| i as usize >= ext.old_vocab) {
            continue;
        }
        if let Some(c) = expand(chunk, ext) {
            used += seq_len;
            out.push(c);
        }
    }
    out
}

fn host(t: Tensor<3>) -> Result<Vec<f32>> {
    t.cast(burn::tensor::FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading hidden states: {e:?}"))
}

fn ids_tensor(rows: &[&[u32]], device: &burn::tensor::Device) -> Tensor<2, Int> {
    let t = rows[0].len();
    let v: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&x| x as i64)).collect();
    Tensor::from_data(TensorData::new(v, [rows.len(), t]), device)
}

/// Adam on host rows: the tables are small enough that a host update is cheaper than building
/// an optimizer state per step.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }
    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f64) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        let lr = lr as f32;
        w.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(self.m.par_chunks_mut(4096)).zip(self.v.par_chunks_mut(4096)).for_each(|(((w, g), m), v)| {
            for i in 0..w.len() {
                // Sparse Adam: a row that is not in this batch does not move (no momentum
                // carried into steps that have nothing to say about it).
                if g[i] == 0.0 {
                    continue;
                }
                m[i] = B1 * m[i] + (1.0 - B1) * g[i];
                v[i] = B2 * v[i] + (1.0 - B2) * g[i] * g[i];
                w[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
            }
        });
    }
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
                let probs = next_token_probs(&h, &old_head, d, old);
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
        embed = fit_input_rows(&teacher_free(model), contexts, &targets, embed, opts, &mut report, &mut log)?;
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
        match &chain {
            Some(chain) => {
                (head, head_old) = fit_head_rows_chain(&old_head, head, d, old, all_contexts, &feats, &trie, chain, opts, &mut report, &mut log)?;
                report.head_rows_moved = head_old.iter().map(|(t, _)| *t).collect();
            }
            None => head = fit_head_rows(&old_head, head, d, old, all_contexts, &feats, opts, &mut report, &mut log)?,
        }
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
    m.embed_tokens = TokenTable { base, extra: Some(Param::from_tensor(extra).set_require_grad(false)), extra_f32: true, quant: None };
    Ok(m)
}

/// Teacher targets cached in the file named by `LINLY_DISTILL_CACHE` (for experiments that
/// vary only the fits): keyed by the contexts' ids, ignored when they differ.
fn cache_key(contexts: &[DistillContext]) -> u64 {
    contexts.iter().flat_map(|c| c.old_ids.iter()).fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn teacher_cache_load(contexts: &[DistillContext], d: usize) -> Option<Vec<Vec<f32>>> {
    let path = std::env::var_os("LINLY_DISTILL_CACHE")?;
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 8 || u64::from_le_bytes(bytes[..8].try_into().ok()?) != cache_key(contexts) {
        return None;
    }
    let v: Vec<f32> = bytes[8..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut out = Vec::new();
    let mut off = 0;
    for c in contexts {
        let n = c.new_ids.len() * d;
        out.push(v.get(off..off + n)?.to_vec());
        off += n;
    }
    Some(out)
}

fn teacher_cache_save(contexts: &[DistillContext], targets: &[Vec<f32>]) {
    let Some(path) = std::env::var_os("LINLY_DISTILL_CACHE") else { return };
    let mut bytes = cache_key(contexts).to_le_bytes().to_vec();
    for t in targets {
        for x in t {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    let _ = crate::io::atomic::write(std::path::Path::new(&path), &bytes);
}

/// The base's next-token distribution at every position of one context: `[T × old]`, from its
/// final hidden states `h` (`[T × d]`) and the old head rows.
fn next_token_probs(h: &[f32], old_head: &[f32], d: usize, old: usize) -> Vec<f32> {
    let t = h.len() / d;
    let mut z = vec![0f32; t * old];
    gemm(&mut z, old, [t, old, d], View::rows(h, 0, d), View::t(old_head, 0, d), 1.0, false, true);
    z.par_chunks_mut(old).for_each(|row| {
        let l = lse(row);
        row.iter_mut().for_each(|v| *v = (*v - l).exp());
    });
    z
}

fn chain_cache_path() -> Option<std::path::PathBuf> {
    let mut p = std::env::var_os("LINLY_DISTILL_CACHE")?;
    p.push(".chain");
    Some(p.into())
}

fn chain_cache_load(contexts: &[DistillContext]) -> Option<ChainData> {
    let bytes = std::fs::read(chain_cache_path()?).ok()?;
    let mut r = bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if r.next()? != cache_key(contexts) {
        return None;
    }
    let (n_roots, n_p1, n_path, n_off) = (r.next()? as usize, r.next()? as usize, r.next()? as usize, r.next()? as usize);
    let body = &bytes[40..];
    let f = |i: usize| f32::from_le_bytes(body[i * 4..i * 4 + 4].try_into().unwrap());
    let u = |i: usize| u32::from_le_bytes(body[i * 4..i * 4 + 4].try_into().unwrap());
    if body.len() != (n_p1 + 2 * n_path + n_off) * 4 {
        return None;
    }
    let p1 = (0..n_p1).map(f).collect();
    let path = (0..n_path).map(|k| (u(n_p1 + 2 * k), f(n_p1 + 2 * k + 1))).collect();
    let path_off = (0..n_off).map(|k| u(n_p1 + 2 * n_path + k) as usize).collect();
    Some(ChainData { n_roots, p1, path, path_off })
}

fn chain_cache_save(contexts: &[DistillContext], cd: &ChainData) {
    let Some(path) = chain_cache_path() else { return };
    let mut b = Vec::new();
    for v in [cache_key(contexts), cd.n_roots as u64, cd.p1.len() as u64, cd.path.len() as u64, cd.path_off.len() as u64] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    cd.p1.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    cd.path.iter().for_each(|(n, p)| {
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
    });
    cd.path_off.iter().for_each(|&o| b.extend_from_slice(&(o as u32).to_le_bytes()));
    let _ = crate::io::atomic::write(&path, &b);
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

fn old_rows_of(t: &TokenTable, old: usize) -> Result<Vec<f32>> {
    let d = t.hidden();
    let mut all = table_values(t)?;
    all.truncate(old * d);
    Ok(all)
}

/// Token Distillation of the input rows: minimise the squared distance between the model's
/// final hidden states on the new tokenization and the base's at the aligned positions.
#[allow(clippy::too_many_arguments)]
fn fit_input_rows(
    base: &Llama,
    contexts: &[DistillContext],
    targets: &[Vec<f32>],
    mut rows: Vec<f32>,
    opts: &DistillOptions,
    report: &mut DistillReport,
    log: &mut impl FnMut(&str),
) -> Result<Vec<f32>> {
    let d = base.config.hidden_size;
    let n_new = rows.len() / d;
    let device = base.embed_tokens.base.val().device();
    let mut student = base.clone();
    // The resized table holds every row in `base`; split it so the new rows are the `extra`
    // that the lookup takes ids ≥ old_vocab from.
    let old_vocab = student.embed_tokens.rows() - n_new;
    let base_table = Param::from_tensor(student.embed_tokens.weight().slice([0..old_vocab, 0..d]).detach()).set_require_grad(false);
    let old_rms = {
        let v = old_rows_of(&student.embed_tokens, old_vocab)?;
        crate::model::embedding::mean_row_rms(&v, d).unwrap_or(1.0) as f64
    };
    let lr = opts.input_lr * old_rms;
    let mut adam = Adam::new(rows.len());
    let mut order: Vec<usize> = (0..contexts.len()).collect();
    let mut rng = crate::rng::SplitMix::new(opts.seed ^ 0x7d15_7111);
    for epoch in 0..opts.input_epochs {
        rng.shuffle(&mut order);
        let (mut sse, mut n) = (0f64, 0usize);
        for batch in order.chunks(opts.batch.max(1)) {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| contexts[i].new_ids.as_slice()).collect();
            if seqs.iter().any(|s| s.len() != seqs[0].len()) {
                bail!("distill: contexts of one batch must have one length");
            }
            let t = seqs[0].len();
            let extra = Tensor::<2>::from_data(TensorData::new(rows.clone(), [n_new, d]), &device);
            student.embed_tokens = TokenTable { base: base_table.clone(), extra: Some(Param::from_tensor(extra).set_require_grad(true)), extra_f32: true, quant: None };
            let h = student.hidden(ids_tensor(&seqs, &device), None);
            let tgt: Vec<f32> = batch.iter().flat_map(|&i| targets[i].iter().copied()).collect();
            let tgt = Tensor::<3>::from_data(TensorData::new(tgt, [batch.len(), t, d]), &device);
            let diff = h - tgt;
            let loss = diff.clone().square().sum();
            let grads = loss.clone().backward();
            let l: f32 = loss.into_scalar();
            sse += l as f64;
            n += batch.len() * t;
            let Some(extra) = student.embed_tokens.extra.as_ref() else { bail!("distill: lost the new rows") };
            let g = extra.val().grad(&grads).context("distill: the new input rows got no gradient")?;
            let mut g: Vec<f32> = g.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading gradients: {e:?}"))?;
            // Per position, not per batch: a row's step does not depend on how often it occurs.
            let k = 1.0 / (batch.len() * t) as f32;
            g.iter_mut().for_each(|x| *x *= k);
            adam.step(&mut rows, &g, lr);
        }
        let mse = sse / (n.max(1) * d) as f64;
        if epoch == 0 {
            report.input_mse_first = Some(mse);
        }
        report.input_mse_last = Some(mse);
        log(&format!("input rows: pass {}/{}, hidden-state MSE {mse:.5}", epoch + 1, opts.input_epochs));
    }
    Ok(rows)
}

/// Cached base hidden states and their next-piece labels, for the head fit.
struct HeadData {
    x: Vec<f32>,
    labels: Vec<u32>,
    /// log Σ exp over the old rows, per position.
    lse_old: Vec<f32>,
    /// The old row's logit of the label (when the label is old), else unused.
    logit_old_label: Vec<f32>,
}

fn head_data(old_head: &[f32], d: usize, old: usize, contexts: &[DistillContext], targets: &[Vec<f32>]) -> HeadData {
    head_data_without(old_head, d, old, contexts, targets, &[])
}

/// [`head_data`] with the old rows in `exclude` left out of the cached log-sum-exp (they are
/// fitted too, so their logits change).
fn head_data_without(old_head: &[f32], d: usize, old: usize, contexts: &[DistillContext], targets: &[Vec<f32>], exclude: &[u32]) -> HeadData {
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for (c, t) in contexts.iter().zip(targets) {
        for i in 0..c.new_ids.len().saturating_sub(1) {
            x.extend_from_slice(&t[i * d..(i + 1) * d]);
            labels.push(c.new_ids[i + 1]);
        }
    }
    let n = labels.len();
    let mut lse_old = vec![0f32; n];
    let mut logit_old_label = vec![0f32; n];
    const CH: usize = 256;
    let mut z = vec![0f32; CH * old];
    for s in (0..n).step_by(CH) {
        let m = CH.min(n - s);
        gemm(&mut z[..m * old], old, [m, old, d], View::rows(&x, s * d, d), View::t(old_head, 0, d), 1.0, false, true);
        if !exclude.is_empty() {
            z[..m * old].par_chunks_mut(old).for_each(|row| exclude.iter().for_each(|&e| row[e as usize] = f32::NEG_INFINITY));
        }
        lse_old[s..s + m].par_iter_mut().zip(logit_old_label[s..s + m].par_iter_mut()).enumerate().for_each(|(r, (l, ll))| {
            let row = &z[r * old..(r + 1) * old];
            *l = lse(row);
            let y = labels[s + r] as usize;
            if y < old {
                *ll = row[y];
            }
        });
    }
    HeadData { x, labels, lse_old, logit_old_label }
}

/// log(eᵃ + eᵇ): the log-sum-exp over old ∪ new rows from the two parts'.
fn log_add_exp(a: f32, b: f32) -> f32 {
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

fn lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

/// Mini-batch Adam on the new head rows, old rows fixed: full-vocabulary cross-entropy of the
/// next piece given the base's hidden state.
#[allow(clippy::too_many_arguments)]
fn fit_head_rows(
    old_head: &[f32],
    mut rows: Vec<f32>,
    d: usize,
    old: usize,
    contexts: &[DistillContext],
    targets: &[Vec<f32>],
    opts: &DistillOptions,
    report: &mut DistillReport,
    log: &mut impl FnMut(&str),
) -> Result<Vec<f32>> {
    let n_new = rows.len() / d;
    let data = head_data(old_head, d, old, contexts, targets);
    let n = data.labels.len();
    ensure!(n > 0, "distill: no positions to fit the head on");
    let mut adam = Adam::new(rows.len());
    let bs = opts.head_batch.max(1);
    // Rows that never occur as a label keep their start: the fit has nothing to say about them
    // but "lower", and Adam would lower every one of them by a full step each time.
    let mut seen = vec![false; n_new];
    for &y in &data.labels {
        if y as usize >= old {
            seen[y as usize - old] = true;
        }
    }
    let l1 = data.x.chunks_exact(d).map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>()).sum::<f64>() / n as f64;
    let lr = opts.head_lr / l1.max(1e-6);
    log(&format!("head rows: {} of {n_new} occur in {n} positions; mean |h|_1 {l1:.1}, lr {lr:.2e}", seen.iter().filter(|&&s| s).count()));
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::SplitMix::new(opts.seed ^ 0x4ead);
    let mut xb = vec![0f32; bs * d];
    let mut z = vec![0f32; bs * n_new];
    let mut g = vec![0f32; n_new * d];
    for epoch in 0..opts.head_epochs.max(1) {
        rng.shuffle(&mut order);
        let mut nll = 0f64;
        for (bi, batch) in order.chunks(bs).enumerate() {
            let m = batch.len();
            for (r, &p) in batch.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&data.x[p * d..(p + 1) * d]);
            }
            gemm(&mut z[..m * n_new], n_new, [m, n_new, d], View::rows(&xb, 0, d), View::t(&rows, 0, d), 1.0, false, true);
            // Softmax over old ∪ new per position; z becomes dL/dz for the new rows.
            let batch_nll: f64 = z[..m * n_new]
                .par_chunks_mut(n_new)
                .enumerate()
                .map(|(r, zr)| {
                    let p = batch[r];
                    let total = log_add_exp(lse(zr), data.lse_old[p]);
                    let y = data.labels[p] as usize;
                    let logit_y = if y >= old { zr[y - old] } else { data.logit_old_label[p] };
                    for v in zr.iter_mut() {
                        *v = (*v - total).exp();
                    }
                    if y >= old {
                        zr[y - old] -= 1.0;
                    }
                    (total - logit_y) as f64
                })
                .sum();
            nll += batch_nll;
            // g = zᵀ·x / m.
            gemm(&mut g, d, [n_new, d, m], View::t(&z, 0, n_new), View::rows(&xb, 0, d), 1.0 / m as f32, false, true);
            g.par_chunks_mut(d).zip(seen.par_iter()).for_each(|(gr, &s)| {
                if !s {
                    gr.fill(0.0);
                }
            });
            adam.step(&mut rows, &g, lr);
            if epoch == 0 && bi == 0 {
                report.head_nll_first = Some(batch_nll / m as f64);
            }
        }
        let mean = nll / n as f64;
        report.head_nll_last = Some(mean);
        log(&format!("head rows: pass {}/{}, next-piece NLL {mean:.4} nats ({n} positions)", epoch + 1, opts.head_epochs));
    }
    Ok(rows)
}

/// Old head rows a fit moved, as `(id, row)`.
type MovedRows = Vec<(u32, Vec<f32>)>;

/// Mini-batch Adam on the new head rows (and, with `move_old_rows`, the first sub-tokens' rows), the other old rows fixed: cross-entropy of the model's
/// full-vocabulary distribution against the base's chain targets ([`super::chain`]). Every row
/// whose first sub-token the base expects gets a target at every position, so rows the text
/// never shows as a label still learn where they belong.
#[allow(clippy::too_many_arguments)]
fn fit_head_rows_chain(
    old_head: &[f32],
    rows: Vec<f32>,
    d: usize,
    old: usize,
    contexts: &[DistillContext],
    feats: &[Vec<f32>],
    trie: &Trie,
    chain: &ChainData,
    opts: &DistillOptions,
    report: &mut DistillReport,
    log: &mut impl FnMut(&str),
) -> Result<(Vec<f32>, MovedRows)> {
    let n_new = rows.len() / d;
    let fit_roots = opts.move_old_rows;
    let root_tok: Vec<u32> = if fit_roots { trie.root_tokens() } else { Vec::new() };
    let nr = root_tok.len();
    let root_index: std::collections::HashMap<u32, usize> = root_tok.iter().enumerate().map(|(k, &t)| (t, k)).collect();
    let data = head_data_without(old_head, d, old, contexts, feats, &root_tok);
    let n = data.labels.len();
    ensure!(n > 0, "distill: no positions to fit the head on");
    ensure!(chain.positions() == n, "distill: {} chain targets for {n} head positions", chain.positions());
    // The fitted rows: the new ones, then (when the roots are fitted) the roots' old rows.
    let nf = n_new + nr;
    let mut rows = rows;
    for &t in &root_tok {
        rows.extend_from_slice(&old_head[t as usize * d..(t as usize + 1) * d]);
    }
    let mut adam = Adam::new(rows.len());
    let bs = opts.head_batch.max(1);
    let l1 = data.x.chunks_exact(d).map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>()).sum::<f64>() / n as f64;
    let lr = opts.head_lr / l1.max(1e-6);
    log(&format!("head rows (chain targets): {} of {n_new} have a trie node; {} roots (fitted: {fit_roots}); {n} positions; lr {lr:.2e}", trie.owns_node.iter().filter(|&&s| s).count(), trie.roots.len()));
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::SplitMix::new(opts.seed ^ 0x4ead);
    let mut xb = vec![0f32; bs * d];
    let mut z = vec![0f32; bs * nf];
    let mut q = vec![0f32; bs * n_new];
    let mut qr = vec![0f32; bs * chain.n_roots.max(1)];
    let mut g = vec![0f32; nf * d];
    for epoch in 0..opts.head_epochs.max(1) {
        rng.shuffle(&mut order);
        let (mut nll, mut ce) = (0f64, 0f64);
        for (bi, batch) in order.chunks(bs).enumerate() {
            let m = batch.len();
            for (r, &p) in batch.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&data.x[p * d..(p + 1) * d]);
            }
            chain.targets(trie, batch, &mut q[..m * n_new], Some(&mut qr[..m * chain.n_roots]));
            gemm(&mut z[..m * nf], nf, [m, nf, d], View::rows(&xb, 0, d), View::t(&rows, 0, d), 1.0, false, true);
            // z becomes dL/dz = p - q for the fitted rows (new rows without a node: 0).
            let (batch_nll, batch_ce) = z[..m * nf]
                .par_chunks_mut(nf)
                .zip(q[..m * n_new].par_chunks(n_new))
                .zip(qr[..m * chain.n_roots.max(1)].par_chunks(chain.n_roots.max(1)))
                .enumerate()
                .map(|(r, ((zr, qn), qo))| {
                    let p = batch[r];
                    let total = log_add_exp(lse(zr), data.lse_old[p]);
                    let y = data.labels[p] as usize;
                    let logit_y = if y >= old {
                        zr[y - old]
                    } else if let Some(&k) = root_index.get(&(y as u32)) {
                        zr[n_new + k]
                    } else {
                        data.logit_old_label[p]
                    };
                    let mut ce = 0f64;
                    for (k, v) in zr.iter_mut().enumerate() {
                        let (qv, fitted) = if k < n_new { (qn[k], trie.owns_node[k]) } else { (qo[k - n_new], true) };
                        ce -= qv as f64 * (*v - total) as f64;
                        *v = if fitted { (*v - total).exp() - qv } else { 0.0 };
                    }
                    ((total - logit_y) as f64, ce)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            nll += batch_nll;
            ce += batch_ce;
            gemm(&mut g, d, [nf, d, m], View::t(&z, 0, nf), View::rows(&xb, 0, d), 1.0 / m as f32, false, true);
            adam.step(&mut rows, &g, lr);
            if epoch == 0 && bi == 0 {
                report.head_nll_first = Some(batch_nll / m as f64);
            }
        }
        let mean = nll / n as f64;
        report.head_nll_last = Some(mean);
        log(&format!("head rows: pass {}/{}, next-piece NLL {mean:.4} nats, chain cross-entropy (fitted rows) {:.4} ({n} positions)", epoch + 1, opts.head_epochs, ce / n as f64));
    }
    let roots = root_tok.iter().enumerate().map(|(k, &t)| (t, rows[(n_new + k) * d..(n_new + k + 1) * d].to_vec())).collect();
    rows.truncate(n_new * d);
    Ok((rows, roots))
}

/// Contexts from a training text: its paragraphs (lines) in a seeded order, tokenized with the
/// extended tokenizer in `tokenizer_dir`, cut into `opts.seq_len` pieces up to `opts.tokens`.
pub fn contexts_from_text(text: &str, tokenizer_dir: &std::path::Path, ext: &VocabExtension, opts: &DistillOptions) -> Result<Vec<DistillContext>> {
    Ok(fitting_text(text, tokenizer_dir, ext, opts, false)?.0)
}

/// [`contexts_from_text`], and with `counts` the old tokenization of the whole text (for the
/// chain targets' frequencies).
fn fitting_text(text: &str, tokenizer_dir: &std::path::Path, ext: &VocabExtension, opts: &DistillOptions, counts: bool) -> Result<(Vec<DistillContext>, Vec<u32>)> {
    opts.validate()?;
    let tok = crate::tokenizer::Tok::load(tokenizer_dir)?;
    ensure!(tok.vocab_size() <= ext.new_vocab, "{}: the tokenizer has {} tokens but the extension {}: use the tokenizer written by `vocab extend`", tokenizer_dir.display(), tok.vocab_size(), ext.new_vocab);
    let mut paras: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    crate::rng::SplitMix::new(opts.seed).shuffle(&mut paras);
    let budget = opts.tokens + if opts.sides.output { opts.head_tokens } else { 0 };
    // Enough text for the budget at ≥ 0.5 tokens per character, with room for contexts that
    // hold no new piece.
    let want_chars = budget.saturating_mul(3);
    let mut joined = String::new();
    for p in &paras {
        if joined.chars().count() >= want_chars {
            break;
        }
        joined.push_str(p);
        joined.push('\n');
    }
    let ids = tok.encode(&joined, false)?;
    let mut old_ids = Vec::new();
    if counts {
        let all = paras.join("\n");
        let ids = tok.encode(&all, false)?;
        // Pieces without sub-tokens cannot be expanded; the count skips over them.
        for &i in &ids {
            match (i as usize).checked_sub(ext.old_vocab) {
                None => old_ids.push(i),
                Some(k) => old_ids.extend_from_slice(ext.subtokens.get(k).map(Vec::as_slice).unwrap_or(&[])),
            }
        }
    }
    Ok((contexts_from_ids(&ids, ext, opts.seq_len, budget), old_ids))
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
    let (contexts, counts) = fitting_text(&text, tokenizer_dir, ext, opts, want_counts).with_context(|| format!("distill contexts from {}", text_path.display()))?;
    if contexts.is_empty() {
        bail!("{}: no context of {} tokens holds a new piece; give the training text of the new language (init_text)", text_path.display(), opts.seq_len);
    }
    let rows = distill_rows(model, ext, &contexts, &counts, opts, log)?;
    apply_distilled(model, ext, &rows)?;
    Ok(rows.report)
}

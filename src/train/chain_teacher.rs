//! Cross-tokenizer distillation from the base model (`[[data]] chain_distill`).
//!
//! One-hot labels teach a new piece only where it is the next token, and ~100k training tokens
//! show most of 16k new pieces a handful of times. The base model already knows the language
//! through its old sub-tokens: reading the same text in the old tokenization, it gives every
//! token of the extended vocabulary a probability at every position (the chain of its
//! sub-tokens' probabilities, [`crate::vocab::chain`]). Training against that distribution
//! gives every new row a target at every position, where the labels give one.
//!
//! The teacher is the base ([`BaseModel`]: the frozen weights without LoRA branches or new
//! rows, snapshotted when training starts, with the base's values of any head rows that
//! `vocab resize --init distill` refitted) reading the row's old-token expansion.

use super::teacher::BaseModel;
use crate::vocab::chain::{ChainData, Trie};
use crate::vocab::distill::contexts::expand;
use crate::vocab::VocabExtension;
use anyhow::{ensure, Context, Result};
use burn::tensor::activation::softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;

/// Old positions the device path sends through the base in one pass: the logits and their
/// softmax are `[positions, old vocabulary]` f32 each (1.6 GB at SmolLM2's 49,152), and a
/// GPU-sized micro-batch (16 rows of ~1,000 old positions) takes two passes.
pub const POSITIONS_PER_PASS: usize = 8192;

/// The extension's trie, with its conditionals counted on the training text.
pub struct ChainTeacher {
    ext: VocabExtension,
    trie: Trie,
    /// The old token of each of the trie's roots (their target is what stays on them).
    roots: Vec<u32>,
    /// Where the targets also carry the base's residual stream (`[train] hidden_distill_layer`).
    hidden_layer: Option<usize>,
}

/// Dense soft targets for one micro-batch: `[B, T−1, V]` (position `t` of a row predicts the
/// token after it), and Σ q·ln q over the weighted positions, so that the loss reports KL
/// rather than cross-entropy.
///
/// Dense on purpose: every piece's own target is what teaches the rows the labels do not
/// reach. Keeping the 64 likeliest pieces per position and one bucket for the rest of the mass
/// ended 0.26 bit/char worse on validation (BENCHMARKS.md, "Cross-tokenizer distillation").
#[derive(Debug, Clone)]
pub struct ChainTargets {
    pub q: TargetTable,
    pub dims: [usize; 3],
    /// Σ over positions of `weight · Σ_v q ln q` (nats; ≤ 0).
    pub neg_entropy: f64,
    /// With [`ChainTeacher::with_hidden_layer`]: the base's residual stream there.
    pub hidden: Option<BaseStates>,
}

/// The base's residual stream after `layer` layers at the old position that ends each new
/// position's piece: what the model's stream at the same layer should be after reading the
/// same text in pieces (`[[data]] hidden_distill`).
#[derive(Debug, Clone)]
pub struct BaseStates {
    pub layer: usize,
    /// `[B, T−1, hidden]` f32 on the teacher's device (zeros in rows without a weight).
    pub states: Tensor<3>,
}

/// Where the targets live: on the host for the CPU's fused loss ([`crate::kernels::soft_ce`]
/// reads them in place), on the teacher's device elsewhere (a GPU), so that neither the base's
/// distributions nor the targets cross the bus (each is gigabytes per step at 16 × 512).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per micro-batch; boxing buys nothing
pub enum TargetTable {
    Host(std::sync::Arc<Vec<f32>>),
    /// `[B, T−1, V]` f32 on the teacher's (plain) device.
    Device(Tensor<3>),
}

impl ChainTargets {
    /// The targets on the host, row-major `[B, T−1, V]` (a copy from a device).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.q {
            TargetTable::Host(q) => Ok(q.to_vec()),
            TargetTable::Device(q) => q.clone().try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading the chain targets: {e:?}")),
        }
    }
}

impl ChainTeacher {
    /// `texts`: the new-tokenization ids of the sources that distil, for the trie's counts
    /// (the conditionals below the depth the base is read exactly).
    pub fn new(ext: VocabExtension, texts: &[&[u32]]) -> Self {
        let mut trie = Trie::new(&ext);
        let expanded: Vec<Vec<u32>> = texts.iter().map(|ids| expand_lossy(ids, &ext)).collect();
        let refs: Vec<&[u32]> = expanded.iter().map(Vec::as_slice).collect();
        trie.count(&refs);
        let roots = trie.root_tokens();
        ChainTeacher { ext, trie, roots, hidden_layer: None }
    }

    /// Targets that also carry the base's residual stream after `layers` layers
    /// ([`ChainTargets::hidden`]), read from the same teacher pass.
    pub fn with_hidden_layer(mut self, layers: usize) -> Self {
        self.hidden_layer = Some(layers);
        self
    }

    pub fn old_vocab(&self) -> usize {
        self.ext.old_vocab
    }

    /// The base's distribution over the extended vocabulary after each position of each row in
    /// `rows` with a positive `weight` (other rows get zeros and cost nothing); `labels` are the
    /// rows' labels (−100: no loss), which say where the KL counts. Built on the host where the
    /// teacher runs on the CPU's fused kernels, on the teacher's device elsewhere
    /// ([`Self::targets_on_device`]).
    pub fn targets(&self, base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32]) -> Result<ChainTargets> {
        if base.on_host() {
            self.targets_on_host(base, rows, labels, weight)
        } else {
            self.targets_on_device(base, rows, labels, weight)
        }
    }

    fn targets_on_host(&self, base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32]) -> Result<ChainTargets> {
        let (b, t) = (rows.len(), rows[0].len());
        let v = self.ext.new_vocab;
        let old = self.ext.old_vocab;
        let n = t.saturating_sub(1);
        let mut q = vec![0f32; b * n * v];
        let mut hidden: Option<(Vec<f32>, usize)> = None;
        let mut neg_entropy = 0.0;
        let roots = &self.roots;
        for r in 0..b {
            let w = weight.get(r).copied().unwrap_or(0.0);
            if w <= 0.0 || n == 0 {
                continue;
            }
            let ctx = self.expand_row(&rows[r])?;
            let (probs, tap) = self.teacher_probs(base, &ctx.old_ids)?;
            if let Some(tap) = tap {
                let d = tap.len() / ctx.old_ids.len();
                let (states, _) = hidden.get_or_insert_with(|| (vec![0f32; b * n * d], d));
                for (i, &a) in ctx.aligned[..n].iter().enumerate() {
                    states[(r * n + i) * d..(r * n + i + 1) * d].copy_from_slice(&tap[a * d..(a + 1) * d]);
                }
            }
            let mut cd = ChainData::default();
            cd.push_context(&self.trie, &ctx.old_ids, &ctx.aligned, n, &probs, old);
            let (new_mass, root_mass) = self.trie_mass(&cd, n);
            let (n_new, nr) = (self.ext.added(), roots.len().max(1));
            let row_q = &mut q[r * n * v..(r + 1) * n * v];
            neg_entropy += row_q
                .par_chunks_mut(v)
                .enumerate()
                .map(|(i, out)| {
                    let a = ctx.aligned[i];
                    out[..old].copy_from_slice(&probs[a * old..(a + 1) * old]);
                    for (j, &tok) in roots.iter().enumerate() {
                        out[tok as usize] = root_mass[i * nr + j];
                    }
                    out[old..].copy_from_slice(&new_mass[i * n_new..(i + 1) * n_new]);
                    if labels[r].get(i + 1).is_some_and(|&l| l >= 0) {
                        w as f64 * out.iter().map(|&x| x_ln_x(x)).sum::<f64>()
                    } else {
                        0.0
                    }
                })
                .sum::<f64>();
        }
        let hidden = hidden.zip(self.hidden_layer).map(|((states, d), layer)| BaseStates { layer, states: Tensor::from_data(TensorData::new(states, [b, n, d]), base.device()) });
        Ok(ChainTargets { q: TargetTable::Host(std::sync::Arc::new(q)), dims: [b, n, v], neg_entropy, hidden })
    }

    /// [`Self::targets`] built on the teacher's device: the base's softmax stays there, only the
    /// few probabilities the trie reads come to the host (the roots' and the path's, a few
    /// hundred per position), and the new pieces' mass goes back (`T−1` rows of the added
    /// pieces). The same values as the host path within float rounding (a test compares them);
    /// the CPU uses it only in tests.
    ///
    /// The rows go through the base together (in passes of at most [`POSITIONS_PER_PASS`] old
    /// positions, which bounds the device memory of the logits and their softmax), the host
    /// reads what the trie needs once per micro-batch, and the rows' trie work runs in
    /// parallel. The first GPU run built each row alone: a pass, a read and the trie in turn,
    /// 0.8 s of a 1.37 s step on an H200 (BENCHMARKS.md, "The GPU run").
    pub fn targets_on_device(&self, base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32]) -> Result<ChainTargets> {
        self.targets_on_device_in_passes(base, rows, labels, weight, POSITIONS_PER_PASS)
    }

    /// [`Self::targets_on_device`] with passes of at most `positions_per_pass` old positions (a
    /// row longer than that goes alone); tests split a micro-batch with it.
    pub fn targets_on_device_in_passes(&self, base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32], positions_per_pass: usize) -> Result<ChainTargets> {
        let (b, t) = (rows.len(), rows[0].len());
        let (v, old, n_new) = (self.ext.new_vocab, self.ext.old_vocab, self.ext.added());
        let n = t.saturating_sub(1);
        let device = base.device().clone();
        let nr = self.roots.len();
        let chained: Vec<usize> = (0..b).filter(|&r| n > 0 && weight.get(r).is_some_and(|&w| w > 0.0)).collect();
        if chained.is_empty() {
            let hidden = self.hidden_layer.map(|layer| BaseStates { layer, states: Tensor::zeros([b, n, base.hidden_size()], &device) });
            return Ok(ChainTargets { q: TargetTable::Device(Tensor::zeros([b, n, v], &device)), dims: [b, n, v], neg_entropy: 0.0, hidden });
        }
        let ctxs: Vec<_> = chained.par_iter().map(|&r| self.expand_row(&rows[r])).collect::<Result<_>>()?;
        // Where the trie reads the base, per row: (old position, old token), in the order
        // `push_context_with` asks for them.
        let wants: Vec<Vec<(usize, u32)>> = ctxs
            .par_iter()
            .map(|ctx| {
                let mut want = Vec::new();
                ChainData::default().push_context_with(&self.trie, &ctx.old_ids, &ctx.aligned, n, |a, o| {
                    want.push((a, o));
                    0.0
                });
                want
            })
            .collect();
        // The passes: the read values and each row's aligned positions `[n, old]`.
        let mut got_parts = Vec::new();
        let mut at_parts = Vec::new();
        let mut tap_parts = Vec::new();
        let mut start = 0;
        while start < ctxs.len() {
            let mut end = start + 1;
            let longest = |e: usize| ctxs[start..e].iter().map(|c| c.old_ids.len()).max().unwrap_or(0);
            while end < ctxs.len() && (end + 1 - start) * longest(end + 1) <= positions_per_pass {
                end += 1;
            }
            let l = longest(end);
            let ids: Vec<&[u32]> = ctxs[start..end].iter().map(|c| c.old_ids.as_slice()).collect();
            let (logits, tap) = base.logits_rows(&ids, self.hidden_layer);
            ensure!(logits.dims()[2] == old, "chain_distill: the teacher's head holds {} rows, the extension's old vocabulary {old}", logits.dims()[2]);
            let k = end - start;
            let probs = softmax(logits.reshape([k * l, old]), 1);
            let want: Vec<i64> = (start..end).flat_map(|j| wants[j].iter().map(move |&(a, o)| (((j - start) * l + a) * old + o as usize) as i64)).collect();
            let m = want.len();
            got_parts.push(probs.clone().reshape([k * l * old]).select(0, Tensor::<1, Int>::from_data(TensorData::new(want, [m]), &device)));
            let aligned: Vec<i64> = (start..end).flat_map(|j| ctxs[j].aligned[..n].iter().map(move |&a| ((j - start) * l + a) as i64)).collect();
            let aligned = Tensor::<1, Int>::from_data(TensorData::new(aligned, [k * n]), &device);
            if let Some(tap) = tap {
                let d = tap.dims()[2];
                tap_parts.push(tap.reshape([k * l, d]).select(0, aligned.clone()));
            }
            at_parts.push(probs.select(0, aligned));
            start = end;
        }
        let got = Tensor::cat(got_parts, 0).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("chain_distill: reading the teacher's probabilities: {e:?}"))?;
        let mut offsets = Vec::with_capacity(ctxs.len());
        let mut off = 0;
        for w in &wants {
            offsets.push(off);
            off += w.len();
        }
        // The trie's mass, each row into its own part of one buffer, rows in parallel (each
        // row's positions are parallel too).
        let k = ctxs.len();
        let (mut new_mass, mut root_mass) = (vec![0f32; k * n * n_new], vec![0f32; k * n * nr.max(1)]);
        new_mass.par_chunks_mut(n * n_new).zip(root_mass.par_chunks_mut(n * nr.max(1))).zip(ctxs.par_iter()).enumerate().for_each(|(j, ((new_out, root_out), ctx))| {
            let mut next = got[offsets[j]..offsets[j] + wants[j].len()].iter().copied();
            let mut cd = ChainData::default();
            cd.push_context_with(&self.trie, &ctx.old_ids, &ctx.aligned, n, |_, _| next.next().unwrap_or(0.0));
            self.trie_mass_into(&cd, n, new_out, root_out);
        });
        let at = Tensor::cat(at_parts, 0);
        // The roots' columns take the mass the trie leaves on them; the rest keep the base's.
        let old_part = if nr > 0 {
            let mut keep = vec![1f32; old];
            for &r in &self.roots {
                keep[r as usize] = 0.0;
            }
            let keep: Tensor<2> = Tensor::from_data(TensorData::new(keep, [1, old]), &device);
            let cols = Tensor::<2, Int>::from_data(TensorData::new(self.roots.iter().map(|&r| r as i64).collect::<Vec<_>>(), [1, nr]), &device).repeat_dim(0, k * n);
            let mass: Tensor<2> = Tensor::from_data(TensorData::new(root_mass, [k * n, nr]), &device);
            at * keep + Tensor::<2>::zeros([k * n, old], &device).scatter(1, cols, mass, IndexingUpdateOp::Add)
        } else {
            at
        };
        let q = Tensor::cat(vec![old_part, Tensor::from_data(TensorData::new(new_mass, [k * n, n_new]), &device)], 1);
        let counted: Vec<f32> = chained.iter().flat_map(|&r| (0..n).map(move |i| if labels[r].get(i + 1).is_some_and(|&l| l >= 0) { weight[r] } else { 0.0 })).collect();
        let counted: Tensor<2> = Tensor::from_data(TensorData::new(counted, [k * n, 1]), &device);
        // x ln x with 0 ln 0 = 0: the clamp keeps the log finite where q is 0.
        let neg_entropy = (q.clone() * q.clone().clamp_min(1e-30).log()).sum_dim(1).mul(counted).sum().into_scalar::<f32>() as f64;
        let q = in_row_places(q.reshape([k, n, v]), &chained, b);
        let hidden = self.hidden_layer.filter(|_| !tap_parts.is_empty()).map(|layer| {
            let tap = Tensor::cat(tap_parts, 0);
            let d = tap.dims()[1];
            BaseStates { layer, states: in_row_places(tap.reshape([k, n, d]), &chained, b) }
        });
        Ok(ChainTargets { q: TargetTable::Device(q), dims: [b, n, v], neg_entropy, hidden })
    }

    fn expand_row(&self, row: &[u32]) -> Result<crate::vocab::distill::DistillContext> {
        expand(row, &self.ext).with_context(|| format!("chain_distill: a row holds a new piece without sub-tokens (the extension {} lists none for it)", self.ext.old_vocab))
    }

    /// The trie's target mass of the added pieces `[n × added]` and of the roots' old tokens
    /// `[n × roots]` at the first `n` positions of `cd`.
    fn trie_mass(&self, cd: &ChainData, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut new_mass = vec![0f32; n * self.ext.added()];
        let mut root_mass = vec![0f32; n * self.roots.len().max(1)];
        self.trie_mass_into(cd, n, &mut new_mass, &mut root_mass);
        (new_mass, root_mass)
    }

    /// [`Self::trie_mass`] into `new_out` `[n × added]` and `root_out` `[n × max(roots, 1)]`.
    fn trie_mass_into(&self, cd: &ChainData, n: usize, new_out: &mut [f32], root_out: &mut [f32]) {
        let positions: Vec<usize> = (0..n).collect();
        cd.targets(&self.trie, &positions, new_out, Some(root_out));
    }

    /// The base's next-token distribution over the old vocabulary at each old position (the
    /// softmax runs on the host, where the targets are built, in one pass per position), and
    /// its residual stream `[positions, hidden]` at the hidden layer when one is asked for.
    fn teacher_probs(&self, base: &BaseModel, old_ids: &[u32]) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        base_probs(base, old_ids, self.ext.old_vocab, self.hidden_layer)
    }
}

/// The base's next-token distribution over its `old` rows after each of `old_ids`, on the host
/// (one softmax pass per position), and its residual stream `[positions, hidden]` after `tap`
/// layers when asked for.
fn base_probs(base: &BaseModel, old_ids: &[u32], old: usize, tap: Option<usize>) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (logits, tapped) = base.logits_rows(&[old_ids], tap);
    let mut l = logits.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading the base model's logits: {e:?}"))?;
    ensure!(l.len() == old_ids.len() * old, "the base model's head holds {} rows, the old vocabulary {old}", l.len() / old_ids.len().max(1));
    l.par_chunks_mut(old).for_each(softmax_in_place);
    let tapped = tapped.map(|t| t.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("hidden_distill: reading the base model's hidden states: {e:?}"))).transpose()?;
    Ok((l, tapped))
}

/// `x ln x`, 0 at 0: a term of a distribution's Σ q ln q (the KL's constant part).
fn x_ln_x(x: f32) -> f64 {
    if x > 0.0 {
        x as f64 * (x as f64).ln()
    } else {
        0.0
    }
}

/// Self-distillation's targets (`[[data]] self_distill`) built on the host from the snapshot
/// `base`, for the CPU's fused soft cross-entropy: `[B, T−1, new_vocab]`, the base's softmax
/// over its `old_vocab` rows after each position of each row with a positive `weight`, zeros on
/// the new rows (mass the model gives them counts against it, as in
/// [`super::loss::self_distill_sum`], the composed term these replace), and Σ w·q ln q over the
/// positions whose label is an old token, the positions the term counts.
///
/// The base reads each row as it is, so rows with a weight must hold old ids only (the replay
/// text the term is for; the caller keeps the composed term for any other row). The snapshot
/// is the one the chain teacher reads, in the quantized kernels: the composed term ran the
/// training model with LoRA off in f32 autodiff ops, ~0.8 s of an English row's 1.8 s on 2
/// cores (BENCHMARKS.md, "Self-distillation's teacher in the quantized kernels").
pub fn self_targets(base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32], old_vocab: usize, new_vocab: usize) -> Result<ChainTargets> {
    ensure!(base.on_host(), "self_distill: host targets need the base model on the CPU");
    ensure!(new_vocab >= old_vocab, "self_distill: {new_vocab} rows in the model, fewer than the base's {old_vocab}");
    let (b, t) = (rows.len(), rows.first().map_or(0, Vec::len));
    let (n, v) = (t.saturating_sub(1), new_vocab);
    let mut q = vec![0f32; b * n * v];
    let mut neg_entropy = 0.0;
    for r in 0..b {
        let w = weight.get(r).copied().unwrap_or(0.0);
        if w <= 0.0 || n == 0 {
            continue;
        }
        if let Some(&id) = rows[r].iter().find(|&&id| id as usize >= old_vocab) {
            anyhow::bail!("self_distill: row {r} holds id {id}, a new piece the base model cannot read (it has {old_vocab} rows)");
        }
        let (probs, _) = base_probs(base, &rows[r], old_vocab, None).context("self_distill")?;
        neg_entropy += q[r * n * v..(r + 1) * n * v]
            .par_chunks_mut(v)
            .zip(probs.par_chunks(old_vocab))
            .enumerate()
            .map(|(i, (out, p))| {
                out[..old_vocab].copy_from_slice(p);
                if labels[r].get(i + 1).is_some_and(|&l| l >= 0 && (l as usize) < old_vocab) {
                    w as f64 * p.iter().map(|&x| x_ln_x(x)).sum::<f64>()
                } else {
                    0.0
                }
            })
            .sum::<f64>();
    }
    Ok(ChainTargets { q: TargetTable::Host(std::sync::Arc::new(q)), dims: [b, n, v], neg_entropy, hidden: None })
}

/// `x` `[chained rows, ..]` spread over a micro-batch of `b` rows: chained row `j` goes to row
/// `chained[j]`, the rows without a weight get zeros.
fn in_row_places(x: Tensor<3>, chained: &[usize], b: usize) -> Tensor<3> {
    let [k, n, w] = x.dims();
    if k == b {
        return x;
    }
    let device = x.device();
    let mut parts = Vec::with_capacity(b);
    let mut next = 0;
    for r in 0..b {
        if chained.get(next) == Some(&r) {
            parts.push(x.clone().slice([next..next + 1, 0..n, 0..w]));
            next += 1;
        } else {
            parts.push(Tensor::zeros([1, n, w], &device));
        }
    }
    Tensor::cat(parts, 0)
}

/// `x ← softmax(x)`.
fn softmax_in_place(row: &mut [f32]) {
    let (_, sum) = crate::kernels::softmax::exp_shifted_in_place(row);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Old-token expansion of a whole text; pieces without sub-tokens are skipped (the counts only
/// need the expansions that exist).
fn expand_lossy(ids: &[u32], ext: &VocabExtension) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() * 2);
    for &i in ids {
        match (i as usize).checked_sub(ext.old_vocab) {
            None => out.push(i),
            Some(k) => out.extend_from_slice(ext.subtokens.get(k).map(Vec::as_slice).unwrap_or(&[])),
        }
    }
    out
}

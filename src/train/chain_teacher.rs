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
use rayon::prelude::*;

/// The extension's trie, with its conditionals counted on the training text.
pub struct ChainTeacher {
    ext: VocabExtension,
    trie: Trie,
    /// The old token of each of the trie's roots (their target is what stays on them).
    roots: Vec<u32>,
}

/// Dense soft targets for one micro-batch: `[B, T−1, V]` row-major (position `t` of a row
/// predicts the token after it), and Σ q·ln q over the weighted positions, so that the loss
/// reports KL rather than cross-entropy.
///
/// Dense on purpose: every piece's own target is what teaches the rows the labels do not
/// reach. Keeping the 64 likeliest pieces per position and one bucket for the rest of the mass
/// ended 0.26 bit/char worse on validation (BENCHMARKS.md, "Cross-tokenizer distillation").
#[derive(Debug, Clone)]
pub struct ChainTargets {
    pub q: std::sync::Arc<Vec<f32>>,
    pub dims: [usize; 3],
    /// Σ over positions of `weight · Σ_v q ln q` (nats; ≤ 0).
    pub neg_entropy: f64,
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
        ChainTeacher { ext, trie, roots }
    }

    pub fn old_vocab(&self) -> usize {
        self.ext.old_vocab
    }

    /// The base's distribution over the extended vocabulary after each position of each row in
    /// `rows` with a positive `weight` (other rows get zeros and cost nothing); `labels` are the
    /// rows' labels (−100: no loss), which say where the KL counts.
    pub fn targets(&self, base: &BaseModel, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32]) -> Result<ChainTargets> {
        let (b, t) = (rows.len(), rows[0].len());
        let v = self.ext.new_vocab;
        let old = self.ext.old_vocab;
        let n = t.saturating_sub(1);
        let mut q = vec![0f32; b * n * v];
        let mut neg_entropy = 0.0;
        let roots = &self.roots;
        for r in 0..b {
            let w = weight.get(r).copied().unwrap_or(0.0);
            if w <= 0.0 || n == 0 {
                continue;
            }
            let ctx = expand(&rows[r], &self.ext).with_context(|| format!("chain_distill: a row holds a new piece without sub-tokens (the extension {} lists none for it)", self.ext.old_vocab))?;
            let probs = self.teacher_probs(base, &ctx.old_ids)?;
            let mut cd = ChainData::default();
            cd.push_context(&self.trie, &ctx.old_ids, &ctx.aligned, n, &probs, old);
            let positions: Vec<usize> = (0..n).collect();
            let n_new = self.ext.added();
            let mut new_mass = vec![0f32; n * n_new];
            let nr = roots.len().max(1);
            let mut root_mass = vec![0f32; n * nr];
            cd.targets(&self.trie, &positions, &mut new_mass, Some(&mut root_mass));
            let xlnx = |x: f32| if x > 0.0 { x as f64 * (x as f64).ln() } else { 0.0 };
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
                        w as f64 * out.iter().map(|&x| xlnx(x)).sum::<f64>()
                    } else {
                        0.0
                    }
                })
                .sum::<f64>();
        }
        Ok(ChainTargets { q: std::sync::Arc::new(q), dims: [b, n, v], neg_entropy })
    }

    /// The base's next-token distribution over the old vocabulary at each old position (the
    /// softmax runs on the host, where the targets are built, in one pass per position).
    fn teacher_probs(&self, base: &BaseModel, old_ids: &[u32]) -> Result<Vec<f32>> {
        let old = self.ext.old_vocab;
        let mut l = base.logits(old_ids).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("chain_distill: reading the teacher's logits: {e:?}"))?;
        ensure!(l.len() == old_ids.len() * old, "chain_distill: the teacher's head holds {} rows, the extension's old vocabulary {old}", l.len() / old_ids.len().max(1));
        l.par_chunks_mut(old).for_each(softmax_in_place);
        Ok(l)
    }
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

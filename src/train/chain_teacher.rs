//! Cross-tokenizer distillation from the base model (`[[data]] chain_distill`).
//!
//! One-hot labels teach a new piece only where it is the next token, and ~100k training tokens
//! show most of 16k new pieces a handful of times. The base model already knows the language
//! through its old sub-tokens: reading the same text in the old tokenization, it gives every
//! token of the extended vocabulary a probability at every position (the chain of its
//! sub-tokens' probabilities, [`crate::vocab::chain`]). Training against that distribution
//! gives every new row a target at every position, where the labels give one.
//!
//! The teacher is the same weights with the LoRA branches off, reading the row's old-token
//! expansion: on old ids the new input rows are never read, and the old head rows are the
//! base's as long as training keeps them (tables `new_rows` or `frozen`). A head whose first
//! sub-token rows were refitted by `vocab resize --init distill` gets those rows' base values
//! back for the teacher ([`ChainTeacher::with_base_head_rows`]).

use super::step::without_lora;
use crate::model::Llama;
use crate::vocab::chain::{ChainData, Trie};
use crate::vocab::distill::contexts::expand;
use crate::vocab::VocabExtension;
use anyhow::{ensure, Context, Result};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// The extension's trie, with its conditionals counted on the training text.
pub struct ChainTeacher {
    ext: VocabExtension,
    trie: Trie,
    /// The old token of each of the trie's roots (their target is what stays on them).
    roots: Vec<u32>,
    /// Old head rows the model holds refitted values for, and the base's values `[n, hidden]`.
    base_rows: Option<(Vec<usize>, Tensor<2>)>,
}

/// Dense soft targets for one micro-batch: `[B, T−1, V]` row-major (position `t` of a row
/// predicts the token after it), and Σ q·ln q over the weighted positions, so that the loss
/// reports KL rather than cross-entropy.
#[derive(Debug, Clone)]
pub struct ChainTargets {
    pub q: Vec<f32>,
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
        ChainTeacher { ext, trie, roots, base_rows: None }
    }

    /// The base's values of old head rows that the model holds refitted (`rows`, `[n, hidden]`),
    /// so that the teacher reads the base's distribution there.
    pub fn with_base_head_rows(mut self, rows: Vec<usize>, values: Tensor<2>) -> Self {
        self.base_rows = (!rows.is_empty()).then_some((rows, values));
        self
    }

    pub fn old_vocab(&self) -> usize {
        self.ext.old_vocab
    }

    /// The base's distribution over the extended vocabulary after each position of each row in
    /// `rows` with a positive `weight` (other rows get zeros and cost nothing); `labels` are the
    /// rows' labels (−100: no loss), which say where the KL counts.
    pub fn targets(&self, model: &mut Llama, rows: &[Vec<u32>], labels: &[Vec<i64>], weight: &[f32], device: &Device) -> Result<ChainTargets> {
        let (b, t) = (rows.len(), rows[0].len());
        let v = self.ext.new_vocab;
        ensure!(model.vocab_size() == v, "chain_distill: the model has {} rows but the extension {}", model.vocab_size(), v);
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
            let probs = self.teacher_probs(model, &ctx.old_ids, device)?;
            let mut cd = ChainData::default();
            cd.push_context(&self.trie, &ctx.old_ids, &ctx.aligned, n, &probs, old);
            let idx: Vec<usize> = (0..n).collect();
            let n_new = self.ext.added();
            let mut new_mass = vec![0f32; n * n_new];
            let mut root_mass = vec![0f32; n * roots.len().max(1)];
            cd.targets(&self.trie, &idx, &mut new_mass, Some(&mut root_mass));
            let nr = roots.len().max(1);
            for i in 0..n {
                let out = &mut q[(r * n + i) * v..(r * n + i + 1) * v];
                let a = ctx.aligned[i];
                out[..old].copy_from_slice(&probs[a * old..(a + 1) * old]);
                for (k, &tok) in roots.iter().enumerate() {
                    out[tok as usize] = root_mass[i * nr + k];
                }
                out[old..].copy_from_slice(&new_mass[i * n_new..(i + 1) * n_new]);
                if labels[r].get(i + 1).is_some_and(|&l| l >= 0) {
                    neg_entropy += w as f64 * out.iter().filter(|&&x| x > 0.0).map(|&x| x as f64 * (x as f64).ln()).sum::<f64>();
                }
            }
        }
        Ok(ChainTargets { q, dims: [b, n, v], neg_entropy })
    }

    /// The base's next-token distribution over the old vocabulary at each old position.
    fn teacher_probs(&self, model: &mut Llama, old_ids: &[u32], device: &Device) -> Result<Vec<f32>> {
        let ids: Vec<i64> = old_ids.iter().map(|&x| x as i64).collect();
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [1, old_ids.len()]), device);
        let old = self.ext.old_vocab;
        let t = old_ids.len();
        let f32 = burn::tensor::FloatDType::F32;
        let read = |x: Tensor<3>| x.cast(f32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("chain_distill: reading the teacher's logits: {e:?}"));
        let Some((rows, values)) = &self.base_rows else {
            let logits = without_lora(model, |m| m.forward(ids, None).detach());
            return read(softmax(logits.slice([0..1, 0..t, 0..old]).cast(f32), 2));
        };
        // Refitted rows: their logits come from the base's values of those rows.
        let (logits, fixed) = without_lora(model, |m| {
            let h = m.hidden(ids, None).detach();
            let fixed = h.clone().cast(f32).matmul(values.clone().cast(f32).transpose().unsqueeze::<3>());
            (m.logits(h).detach().slice([0..1, 0..t, 0..old]), fixed)
        });
        let (mut l, fixed) = (read(logits)?, read(fixed)?);
        let n = rows.len();
        for (row, fx) in l.chunks_mut(old).zip(fixed.chunks(n)) {
            for (&r, &v) in rows.iter().zip(fx) {
                row[r] = v;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                sum += *x as f64;
            }
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(l)
    }
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

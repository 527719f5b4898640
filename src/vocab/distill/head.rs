//! The head fit: a softmax regression of the fitted head rows on the model's own hidden states,
//! every other old row fixed (their log-sum-exp cached once), against one of two targets.

use super::adam::Adam;
use super::{DistillContext, DistillOptions, DistillReport};
use crate::kernels::gemm::{gemm, View};
use crate::vocab::chain::{ChainData, Trie};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Old head rows a fit moved, as `(id, row)`.
pub type MovedRows = Vec<(u32, Vec<f32>)>;

/// What the fitted rows are pulled towards at each position.
pub enum Target<'a> {
    /// The next piece of the text, one-hot. Only rows that occur as a label move: the fit has
    /// nothing to say about the others but "lower", and Adam would lower every one of them by a
    /// full step each time.
    Labels,
    /// The base's chain probability of every token ([`crate::vocab::chain`]); rows with a trie
    /// node get a target at every position. With `move_roots`, the first sub-tokens' old rows
    /// are fitted too.
    Chain { trie: &'a Trie, chain: &'a ChainData, move_roots: bool },
}

/// Cached hidden states and their next-piece labels.
struct HeadData {
    x: Vec<f32>,
    labels: Vec<u32>,
    /// log Σ exp over the fixed old rows, per position.
    lse_old: Vec<f32>,
    /// The old row's logit of the label (when the label is a fixed old row), else unused.
    logit_old_label: Vec<f32>,
}

/// [`HeadData`] of the contexts, with the old rows in `exclude` left out of the cached
/// log-sum-exp (they are fitted, so their logits change).
fn head_data(old_head: &[f32], d: usize, old: usize, contexts: &[DistillContext], feats: &[Vec<f32>], exclude: &[u32]) -> HeadData {
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for (c, t) in contexts.iter().zip(feats) {
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

pub(super) fn lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

/// The base's next-token distribution at every position of one context: `[T × old]`, from its
/// final hidden states `h` (`[T × d]`) and the old head rows.
pub(super) fn next_token_probs(h: &[f32], old_head: &[f32], d: usize, old: usize) -> Vec<f32> {
    let t = h.len() / d;
    let mut z = vec![0f32; t * old];
    gemm(&mut z, old, [t, old, d], View::rows(h, 0, d), View::t(old_head, 0, d), 1.0, false, true);
    z.par_chunks_mut(old).for_each(|row| {
        let l = lse(row);
        row.iter_mut().for_each(|v| *v = (*v - l).exp());
    });
    z
}

/// Mini-batch Adam on the new head rows `rows` (`[n_new × d]`, and with chain targets and
/// `move_roots` the first sub-tokens' old rows), every other old row fixed: cross-entropy of the
/// model's full-vocabulary distribution at the hidden states `feats` against `target`. Returns
/// the new rows and the moved old rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_head(
    old_head: &[f32],
    rows: Vec<f32>,
    d: usize,
    old: usize,
    contexts: &[DistillContext],
    feats: &[Vec<f32>],
    target: Target<'_>,
    opts: &DistillOptions,
    report: &mut DistillReport,
    log: &mut impl FnMut(&str),
) -> Result<(Vec<f32>, MovedRows)> {
    let n_new = rows.len() / d;
    let root_tok: Vec<u32> = match &target {
        Target::Chain { trie, move_roots: true, .. } => trie.root_tokens(),
        _ => Vec::new(),
    };
    let nr = root_tok.len();
    let root_index: std::collections::HashMap<u32, usize> = root_tok.iter().enumerate().map(|(k, &t)| (t, k)).collect();
    let data = head_data(old_head, d, old, contexts, feats, &root_tok);
    let n = data.labels.len();
    ensure!(n > 0, "distill: no positions to fit the head on");
    // Which new rows the fit moves; the roots always move.
    let fitted: Vec<bool> = match &target {
        Target::Labels => {
            let mut seen = vec![false; n_new];
            for &y in &data.labels {
                if y as usize >= old {
                    seen[y as usize - old] = true;
                }
            }
            seen
        }
        Target::Chain { trie, chain, .. } => {
            ensure!(chain.positions() == n, "distill: {} chain targets for {n} head positions", chain.positions());
            trie.owns_node.clone()
        }
    };
    let n_roots_q = match &target {
        Target::Chain { chain, .. } => chain.n_roots.max(1),
        Target::Labels => 1,
    };
    // The fitted rows: the new ones, then the roots' old rows.
    let nf = n_new + nr;
    let mut rows = rows;
    for &t in &root_tok {
        rows.extend_from_slice(&old_head[t as usize * d..(t as usize + 1) * d]);
    }
    let mut adam = Adam::new(rows.len());
    let bs = opts.head_batch.max(1);
    let l1 = data.x.chunks_exact(d).map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>()).sum::<f64>() / n as f64;
    let lr = opts.head_lr / l1.max(1e-6);
    log(&format!("head rows: {} of {n_new} fitted, {nr} old first sub-token rows; {n} positions; mean |h|_1 {l1:.1}, lr {lr:.2e}", fitted.iter().filter(|&&s| s).count()));
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::SplitMix::new(opts.seed ^ 0x4ead);
    let mut xb = vec![0f32; bs * d];
    let mut z = vec![0f32; bs * nf];
    // Chain targets are dense per position; a label's is one-hot and stays implicit.
    let dense = matches!(target, Target::Chain { .. });
    let qw = if dense { n_new } else { 1 };
    let mut q = vec![0f32; bs * qw];
    let mut qr = vec![0f32; bs * n_roots_q];
    let mut g = vec![0f32; nf * d];
    for epoch in 0..opts.head_epochs.max(1) {
        rng.shuffle(&mut order);
        let (mut nll, mut ce) = (0f64, 0f64);
        for (bi, batch) in order.chunks(bs).enumerate() {
            let m = batch.len();
            for (r, &p) in batch.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&data.x[p * d..(p + 1) * d]);
            }
            match &target {
                Target::Chain { trie, chain, .. } => chain.targets(trie, batch, &mut q[..m * n_new], Some(&mut qr[..m * chain.n_roots])),
                Target::Labels => {}
            }
            gemm(&mut z[..m * nf], nf, [m, nf, d], View::rows(&xb, 0, d), View::t(&rows, 0, d), 1.0, false, true);
            // z becomes dL/dz = p − q for the fitted rows, 0 for the others.
            let (batch_nll, batch_ce) = z[..m * nf]
                .par_chunks_mut(nf)
                .zip(q[..m * qw].par_chunks(qw))
                .zip(qr[..m * n_roots_q].par_chunks(n_roots_q))
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
                    let label_new = if dense { None } else { y.checked_sub(old) };
                    let q_new = |k: usize| if dense { qn[k] } else if label_new == Some(k) { 1.0 } else { 0.0 };
                    let mut ce = 0f64;
                    for (k, v) in zr.iter_mut().enumerate() {
                        let (qv, fit) = if k < n_new { (q_new(k), fitted[k]) } else { (qo[k - n_new], true) };
                        ce -= qv as f64 * (*v - total) as f64;
                        *v = if fit { (*v - total).exp() - qv } else { 0.0 };
                    }
                    ((total - logit_y) as f64, ce)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            nll += batch_nll;
            ce += batch_ce;
            // g = zᵀ·x / m.
            gemm(&mut g, d, [nf, d, m], View::t(&z, 0, nf), View::rows(&xb, 0, d), 1.0 / m as f32, false, true);
            adam.step(&mut rows, &g, lr);
            if epoch == 0 && bi == 0 {
                report.head_nll_first = Some(batch_nll / m as f64);
            }
        }
        let mean = nll / n as f64;
        report.head_nll_last = Some(mean);
        log(&format!("head rows: pass {}/{}, next-piece NLL {mean:.4} nats, cross-entropy against the targets {:.4} ({n} positions)", epoch + 1, opts.head_epochs, ce / n as f64));
    }
    let roots = root_tok.iter().enumerate().map(|(k, &t)| (t, rows[(n_new + k) * d..(n_new + k + 1) * d].to_vec())).collect();
    rows.truncate(n_new * d);
    Ok((rows, roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_exp_is_the_log_sum_exp_of_the_parts() {
        let row = [0.3f32, -1.2, 2.5, 0.0, -7.0];
        let whole = lse(&row);
        let parts = log_add_exp(lse(&row[..2]), lse(&row[2..]));
        assert!((whole - parts).abs() < 1e-6, "{whole} vs {parts}");
        // A part with no mass adds nothing.
        assert_eq!(log_add_exp(1.5, f32::NEG_INFINITY), 1.5);
    }
}

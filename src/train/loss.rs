//! The causal-LM loss, shifted as HF does: position t predicts `labels[t+1]`; −100 is ignored.
//!
//! On flex in f32 the loss is one fused op over the `[B·T, V]` logits
//! ([`crate::kernels::cross_entropy`]), which never writes a softmax tensor; elsewhere
//! (libtorch, f16/bf16 logits) it is that kernel's composition from `log_softmax` and `gather`.
//!
//! [`nll_sum_rows`] also splits the sum by batch row, for per-source loss in metrics.jsonl: the
//! fused sweep has the per-row values on the host already; the composed path keeps them as a
//! `[B]` tensor for the step's single host read.

use super::chain_teacher::{ChainTargets, TargetTable};
use crate::kernels::cross_entropy;
use crate::kernels::soft_ce::{self, SoftTargets};
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Tensor, TensorData};
use std::sync::Arc;

/// Sum of next-token NLL over unmasked positions (f32 scalar tensor `[1]`), and their count.
pub fn nll_sum(logits: Tensor<3>, labels: &[Vec<i64>]) -> (Tensor<1>, usize) {
    let r = nll_sum_rows(logits, labels);
    (r.sum, r.tokens)
}

/// Per batch row NLL sums: where the loss already has them on the host (fused flex path), or
/// a `[B]` tensor not yet read, so that the step can fetch it with its one host read.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per micro-batch; boxing buys nothing
pub enum RowSums {
    Host(Vec<f64>),
    Device(Tensor<1>),
}

/// [`nll_sum`] with the split by batch row that per-source loss logging needs.
#[derive(Debug, Clone)]
pub struct NllRows {
    /// Σ NLL over the batch (f32 `[1]`, on the autodiff graph).
    pub sum: Tensor<1>,
    /// Unmasked positions in the batch.
    pub tokens: usize,
    /// Σ NLL of each batch row; the rows add up to `sum` (up to f32 rounding).
    pub rows: RowSums,
    /// Unmasked positions of each batch row.
    pub row_tokens: Vec<usize>,
}

/// Unmasked positions per batch row after the shift.
pub fn row_loss_tokens(labels: &[Vec<i64>]) -> Vec<usize> {
    labels.iter().map(|r| r.iter().skip(1).filter(|&&l| l >= 0).count()).collect()
}

/// [`nll_sum`] plus the per-row sums (no extra device work on the fused path; one `[B]`
/// reduction on the composed path).
pub fn nll_sum_rows(logits: Tensor<3>, labels: &[Vec<i64>]) -> NllRows {
    let [b, t, v] = logits.dims();
    let row_tokens = row_loss_tokens(labels);
    let tokens = row_tokens.iter().sum();
    if logits.dtype() == burn::tensor::DType::F32 {
        if let Some((sum, rows)) = cross_entropy::sum_rows(logits.clone().reshape([b * t, v]), Arc::new(shifted_targets(labels, t)), t) {
            return NllRows { sum, tokens, rows: RowSums::Host(rows), row_tokens };
        }
    }
    let rows = composed_nll_rows(logits, labels);
    NllRows { sum: rows.clone().sum(), tokens, rows: RowSums::Device(rows.detach()), row_tokens }
}

/// The composed reference: `−Σ log_softmax(logits)[target]` over unmasked positions.
pub fn composed_nll_sum(logits: Tensor<3>, labels: &[Vec<i64>]) -> Tensor<1> {
    composed_nll_rows(logits, labels).sum()
}

/// The composed loss per batch row, `[B]`: the kernel's composed reference over the rows that
/// have a target position (each sequence's last row never enters it, so a non-finite logit
/// there cannot reach the loss or its gradient).
pub fn composed_nll_rows(logits: Tensor<3>, labels: &[Vec<i64>]) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    if t < 2 {
        return Tensor::zeros([b], &logits.device());
    }
    let targets: Vec<i64> = labels.iter().flat_map(|row| row[1..t].iter().map(|&l| if l >= 0 { l } else { -1 })).collect();
    cross_entropy::composed_rows(logits.slice([0..b, 0..t - 1, 0..v]).reshape([b * (t - 1), v]), &targets, t - 1)
}

/// Row `b·T + i` of the flattened logits predicts `labels[b][i+1]`; each sequence's last row
/// and masked labels get −1 (no target).
fn shifted_targets(labels: &[Vec<i64>], t: usize) -> Vec<i64> {
    labels.iter().flat_map(|row| (0..t).map(move |i| if i + 1 < t && row[i + 1] >= 0 { row[i + 1] } else { -1 })).collect()
}

/// A distillation term's weight at each shifted position (`[B·(T−1)]`): the row's weight where
/// the label after the position carries loss and passes `keep`, else 0.
fn position_weights(labels: &[Vec<i64>], row_weight: &[f32], t: usize, keep: impl Fn(i64) -> bool) -> Vec<f32> {
    let mut mask = Vec::with_capacity(labels.len() * (t - 1));
    for (r, row) in labels.iter().enumerate() {
        let w = row_weight.get(r).copied().unwrap_or(0.0);
        mask.extend(row[1..t].iter().map(|&l| if l >= 0 && keep(l) { w } else { 0.0 }));
    }
    mask
}

/// Self-distillation against the base: `Σ_rows w_row Σ_pos KL(q ‖ p)` over the positions whose
/// target is an old-vocabulary token, where `q` is the teacher's softmax over the old rows
/// (`teacher_logits[.., ..old_vocab]`, the base model's own prediction) and `p` the student's
/// softmax over the whole vocabulary, restricted to the old rows. Mass the student gives to new
/// rows counts against it, which is right where the base's text is read (English). On rows with
/// `row_renorm` set (text of the new language), `p` is the student's softmax over the old rows
/// alone: the term then holds how the old tokens share their mass and leaves the new pieces'
/// share free. `row_renorm` may be empty (no row renormalises).
///
/// Composed from tensor ops, so it runs on every backend; the teacher logits carry no graph.
pub fn self_distill_sum(student_logits: Tensor<3>, teacher_logits: Tensor<3>, old_vocab: usize, labels: &[Vec<i64>], row_weight: &[f32], row_renorm: &[bool]) -> Tensor<1> {
    let [b, t, v] = student_logits.dims();
    let device = student_logits.device();
    let mask = position_weights(labels, row_weight, t, |l| (l as usize) < old_vocab);
    let z = student_logits.slice([0..b, 0..t - 1, 0..v]).cast(FloatDType::F32);
    let mut logp = log_softmax(z.clone(), 2).slice([0..b, 0..t - 1, 0..old_vocab]);
    if row_renorm.iter().any(|&r| r) {
        let sel: Vec<f32> = (0..b).map(|r| if row_renorm.get(r).copied().unwrap_or(false) { 1.0 } else { 0.0 }).collect();
        let sel: Tensor<3> = Tensor::from_data(TensorData::new(sel, [b, 1, 1]), &device);
        let renorm = log_softmax(z.slice([0..b, 0..t - 1, 0..old_vocab]), 2);
        logp = logp.clone() + (renorm - logp) * sel;
    }
    let logq = log_softmax(teacher_logits.detach().slice([0..b, 0..t - 1, 0..old_vocab]).cast(FloatDType::F32), 2);
    let q = logq.clone().exp();
    let kl = (q * (logq - logp)).sum_dim(2);
    let m: Tensor<3> = Tensor::from_data(TensorData::new(mask, [b, t - 1, 1]), &device);
    (kl * m).sum()
}

/// Cross-tokenizer distillation (`[[data]] chain_distill`): `Σ_rows w_row Σ_pos KL(q ‖ p)`
/// over the positions that carry loss, where `q` is the base's distribution over the whole
/// extended vocabulary ([`super::chain_teacher`], `[B, T−1, V]` on the host) and `p` the
/// student's softmax. Only the cross-entropy part `−Σ q ln p` is on the graph
/// ([`soft_ce`], fused on the CPU, reading `q` where it lies); `neg_entropy` (Σ w·q ln q, from
/// the host) turns it into the KL. Its gradient with respect to the logits is
/// `w·(softmax(z) − q)`.
pub fn chain_distill_sum(student_logits: Tensor<3>, targets: &ChainTargets, labels: &[Vec<i64>], row_weight: &[f32]) -> Tensor<1> {
    soft_targets_sum(student_logits, targets, labels, row_weight, |_| true)
}

/// [`self_distill_sum`] (without renormalised rows) against targets the base model made on
/// the host ([`super::chain_teacher::self_targets`]: its softmax over the old rows, zeros on
/// the new ones): the same KL over the positions whose label is an old token, as one fused
/// soft cross-entropy over the logits instead of the composed softmaxes.
pub fn self_distill_targets_sum(student_logits: Tensor<3>, targets: &ChainTargets, old_vocab: usize, labels: &[Vec<i64>], row_weight: &[f32]) -> Tensor<1> {
    soft_targets_sum(student_logits, targets, labels, row_weight, |l| (l as usize) < old_vocab)
}

/// `Σ_rows w_row Σ_pos KL(q ‖ softmax(z))` over the loss positions whose label passes `keep`,
/// `q` from `targets` (whose `neg_entropy` must count the same positions).
fn soft_targets_sum(student_logits: Tensor<3>, targets: &ChainTargets, labels: &[Vec<i64>], row_weight: &[f32], keep: impl Fn(i64) -> bool) -> Tensor<1> {
    let [b, t, v] = student_logits.dims();
    assert!(targets.dims == [b, t - 1, v], "soft targets {:?} do not fit logits [{b}, {t}, {v}]", targets.dims);
    let mask = position_weights(labels, row_weight, t, keep);
    let table = match &targets.q {
        TargetTable::Host(q) => q.clone(),
        TargetTable::Device(q) => {
            // Composed where the targets were made (a GPU): −Σ w·q·log_softmax(z).
            let device = student_logits.device();
            let q = if q.device() == device { q.clone() } else { Tensor::from_inner(q.clone()) };
            let logp = log_softmax(student_logits.slice([0..b, 0..t - 1, 0..v]).cast(FloatDType::F32), 2);
            let m: Tensor<3> = Tensor::from_data(TensorData::new(mask, [b, t - 1, 1]), &device);
            return (q * logp).sum_dim(2).mul(m).sum().neg() + targets.neg_entropy as f32;
        }
    };
    // Logits row `r·T + i` reads target row `r·(T−1) + i`; each sequence's last one predicts nothing.
    let (mut row, mut weight) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for r in 0..b {
        for i in 0..t {
            let src = (i + 1 < t).then_some(r * (t - 1) + i);
            row.push(src);
            weight.push(src.map_or(0.0, |s| mask[s]));
        }
    }
    let soft = SoftTargets { table, row, weight };
    soft_ce::sum(student_logits.cast(FloatDType::F32).reshape([b * t, v]), Arc::new(soft)) + targets.neg_entropy as f32
}

/// Hidden-state distillation (`[[data]] hidden_distill`): `Σ_rows w_row Σ_pos e / (‖h‖² + e)`
/// with `e = ‖s − h‖²`, over the loss positions, where `s` is the model's residual stream
/// after the tap layer at a position (`tap` `[B, T, hidden]`) and `h` the base's at the old
/// position that ends the same piece (`base_states` `[B, T−1, hidden]`,
/// [`ChainTargets::hidden`]). Token Distillation's objective, kept through training: the
/// layers above the tap then read the new pieces as the base reads their sub-tokens.
///
/// Relative to `‖h‖²`, so that positions whose streams are far larger than the rest do not
/// outweigh them, and bounded: `r / (1 + r)` of the relative error `r = e / ‖h‖²` is `r` where
/// the stream is near (a stream off by half its norm costs 0.2 a position, on the NLL's scale)
/// and at most 1, with a vanishing gradient, where it cannot be compared. That happens where
/// one side carries a massive activation and the other does not: a row's first position (the
/// attention sink; the base's aligned position is the *last* sub-token of the first piece, no
/// sink when the piece has several), which is left out, and now and then a position inside a
/// row. Unbounded, such a position cost up to ~20,000 on SmolLM2 every few dozen steps, and the
/// clipped step then only tried to take the activation away.
pub fn hidden_distill_sum(tap: Tensor<3>, base_states: &Tensor<3>, labels: &[Vec<i64>], row_weight: &[f32]) -> Tensor<1> {
    let [b, t, d] = tap.dims();
    assert!(base_states.dims() == [b, t - 1, d], "base hidden states {:?} do not fit the model's [{b}, {t}, {d}]", base_states.dims());
    let device = tap.device();
    let h = if base_states.device() == device { base_states.clone() } else { Tensor::from_inner(base_states.clone()) };
    let s = tap.slice([0..b, 0..t - 1, 0..d]).cast(FloatDType::F32);
    let err = (s - h.clone()).square().sum_dim(2);
    let norm = h.square().sum_dim(2).clamp_min(1e-12);
    let mut mask = position_weights(labels, row_weight, t, |_| true);
    if t > 1 {
        mask.iter_mut().step_by(t - 1).for_each(|w| *w = 0.0);
    }
    let mask: Tensor<3> = Tensor::from_data(TensorData::new(mask, [b, t - 1, 1]), &device);
    (err.clone() / (norm + err) * mask).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::normal;
    use burn::tensor::Device;

    fn labels(b: usize, t: usize, v: usize) -> Vec<Vec<i64>> {
        (0..b).map(|i| (0..t).map(|j| if (i + j) % 5 == 3 { -100 } else { ((i * 31 + j * 17) % v) as i64 }).collect()).collect()
    }

    #[test]
    fn fused_loss_and_gradient_match_log_softmax() {
        let dev = Device::flex().autodiff();
        let (b, t, v) = (2, 6, 37);
        let x0: Tensor<3> = normal([b, t, v], 0.0, 4.0, 1, &dev);
        let lab = labels(b, t, v);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            // Scale the loss as the step does, so the upstream gradient is not 1.
            let (sum, n) = if fused { nll_sum(x.clone() * 1.0, &lab) } else { (composed_nll_sum(x.clone() * 1.0, &lab), 0) };
            let g = (sum.clone() * 0.37).backward();
            (sum.into_scalar::<f32>(), n, x.grad(&g).unwrap())
        };
        let (lf, n, gf) = run(true);
        let (lc, _, gc) = run(false);
        assert_eq!(n, lab.iter().map(|r| r[1..].iter().filter(|&&l| l >= 0).count()).sum::<usize>());
        assert!((lf - lc).abs() <= 1e-5 * lc.abs(), "{lf} vs {lc}");
        let (gf, gc) = (gf.into_data().try_to_vec::<f32>().unwrap(), gc.into_data().try_to_vec::<f32>().unwrap());
        for (a, c) in gf.iter().zip(&gc) {
            assert!((a - c).abs() <= 1e-6 + 1e-4 * c.abs(), "{a} vs {c}");
        }
        // The last position of each row and masked labels get no gradient.
        assert!(gf[(t - 1) * v..t * v].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn row_sums_add_up_to_the_total_and_match_each_row_alone_on_both_paths() {
        let dev = Device::flex().autodiff();
        let (b, t, v) = (3, 7, 29);
        let x: Tensor<3> = normal([b, t, v], 0.0, 3.0, 2, &dev).require_grad();
        let lab = labels(b, t, v);
        // Each row on its own through the composed reference.
        let alone: Vec<f64> = (0..b).map(|i| composed_nll_sum(x.clone().slice([i..i + 1, 0..t, 0..v]), &lab[i..i + 1]).into_scalar::<f32>() as f64).collect();
        let want_tokens: Vec<usize> = lab.iter().map(|r| r[1..].iter().filter(|&&l| l >= 0).count()).collect();
        // Fused (f32 flex) and composed (f16 logits) paths.
        for half in [false, true] {
            let logits = if half { x.clone().cast(FloatDType::F16) } else { x.clone() * 1.0 };
            let r = nll_sum_rows(logits, &lab);
            let rows: Vec<f64> = match (&r.rows, half) {
                (RowSums::Host(v), false) => v.clone(),
                (RowSums::Device(t), true) => t.clone().into_data().try_to_vec::<f32>().unwrap().into_iter().map(|x| x as f64).collect(),
                (other, _) => panic!("half={half}: unexpected path {other:?}"),
            };
            let total = r.sum.into_scalar::<f32>() as f64;
            let tol = if half { 2e-3 } else { 1e-5 };
            assert!((rows.iter().sum::<f64>() - total).abs() <= 1e-6 * total.abs(), "half={half}: rows {rows:?} vs total {total}");
            for (got, want) in rows.iter().zip(&alone) {
                assert!((got - want).abs() <= tol * want.abs(), "half={half}: row {got} vs alone {want}");
            }
            assert_eq!(r.row_tokens, want_tokens);
            assert_eq!(r.tokens, want_tokens.iter().sum::<usize>());
        }
    }

    #[test]
    fn inference_path_gives_the_same_sum() {
        let dev = Device::flex();
        let (b, t, v) = (1, 5, 11);
        let x: Tensor<3> = normal([b, t, v], 0.0, 2.0, 3, &dev);
        let lab = labels(b, t, v);
        let (f, _) = nll_sum(x.clone(), &lab);
        let c = composed_nll_sum(x, &lab);
        let (f, c) = (f.into_scalar::<f32>(), c.into_scalar::<f32>());
        assert!((f - c).abs() <= 1e-5 * c.abs(), "{f} vs {c}");
    }

    #[test]
    fn self_distill_value_and_gradient_match_the_closed_form() {
        // KL(q ‖ p) over the old rows: value Σ q (log q − log p); gradient w.r.t. the student's
        // logits w·(softmax(z) − q) on old columns and w·softmax(z) on new ones (q sums to 1).
        let dev = Device::flex().autodiff();
        let (b, t, v, old) = (2, 5, 13, 9);
        let z0: Tensor<3> = normal([b, t, v], 0.0, 2.0, 4, &dev);
        let tl: Tensor<3> = normal([b, t, v], 0.0, 2.0, 5, &dev);
        // One position targets a new row (11): it must not count.
        let labels: Vec<Vec<i64>> = vec![vec![1, 2, 11, 4, 5], vec![0, 3, 3, -100, 8]];
        let w = [0.5f32, 2.0];
        let z = z0.clone().detach().require_grad();
        let sum = self_distill_sum(z.clone(), tl.clone(), old, &labels, &w, &[]);
        let g = sum.clone().backward();
        let got = sum.into_scalar::<f32>() as f64;
        let grad = z.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        let zs = z0.into_data().try_to_vec::<f32>().unwrap();
        let ts = tl.into_data().try_to_vec::<f32>().unwrap();
        let sm = |row: &[f32]| -> Vec<f64> {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
            let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            row.iter().map(|&x| (x as f64 - m).exp() / s).collect()
        };
        let mut want = 0.0;
        for r in 0..b {
            for i in 0..t {
                let o = (r * t + i) * v;
                let counted = i + 1 < t && labels[r][i + 1] >= 0 && (labels[r][i + 1] as usize) < old;
                let p = sm(&zs[o..o + v]);
                let q = sm(&ts[o..o + old]);
                for c in 0..v {
                    let want_g = if counted { w[r] as f64 * (p[c] - if c < old { q[c] } else { 0.0 }) } else { 0.0 };
                    assert!((grad[o + c] as f64 - want_g).abs() < 1e-5, "grad[{r},{i},{c}] {} vs {want_g}", grad[o + c]);
                }
                if counted {
                    want += w[r] as f64 * (0..old).map(|c| q[c] * (q[c].ln() - p[c].ln())).sum::<f64>();
                }
            }
        }
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
    }

    #[test]
    fn renormalised_rows_leave_the_new_pieces_mass_free() {
        // Student = teacher on the old rows, plus new rows with real mass: the plain term is
        // positive (that mass counts against it), the renormalised one is zero, value and
        // gradient; on a row without the flag nothing changes.
        let dev = Device::flex().autodiff();
        let (b, t, v, old) = (2, 4, 11, 8);
        let tl: Tensor<3> = normal([b, t, v], 0.0, 2.0, 6, &dev);
        let extra: Tensor<3> = normal([b, t, v - old], 1.0, 1.0, 7, &dev);
        let z0 = Tensor::cat(vec![tl.clone().slice([0..b, 0..t, 0..old]), extra], 2);
        let labels: Vec<Vec<i64>> = vec![vec![1, 2, 3, 4], vec![0, 5, 6, 7]];
        let w = [1.0f32, 1.0];
        let plain = self_distill_sum(z0.clone(), tl.clone(), old, &labels, &w, &[]).into_scalar::<f32>();
        assert!(plain > 1e-3, "the new rows' mass should count against the plain term: {plain}");
        let z = z0.clone().detach().require_grad();
        let renorm = self_distill_sum(z.clone(), tl.clone(), old, &labels, &w, &[true, true]);
        let g = renorm.clone().backward();
        let r = renorm.into_scalar::<f32>();
        assert!(r.abs() < 1e-5, "renormalised term {r} should be 0 when the old rows agree");
        let grad = z.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert!(grad.iter().all(|x| x.abs() < 1e-5), "renormalised gradient should vanish");
        let one = self_distill_sum(z0, tl, old, &labels, &w, &[false, true]).into_scalar::<f32>();
        assert!(one > 1e-3 && one < plain, "only row 0 counts its new rows' mass: {one} vs {plain}");
    }

    #[test]
    fn chain_distill_value_and_gradient_match_the_closed_form() {
        // KL(q ‖ p) over the whole vocabulary at loss positions: value Σ q (ln q − ln p),
        // gradient w·(softmax(z) − q); nothing at masked positions or each row's last one.
        let dev = Device::flex().autodiff();
        let (b, t, v) = (2, 5, 11);
        let z0: Tensor<3> = normal([b, t, v], 0.0, 2.0, 8, &dev);
        let zs = z0.clone().into_data().try_to_vec::<f32>().unwrap();
        // Targets with exact zeros (pieces the base cannot reach), normalised per position.
        let mut q = vec![0f32; b * (t - 1) * v];
        for (k, row) in q.chunks_mut(v).enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = if (k + c) % 4 == 0 { 0.0 } else { 1.0 + ((k * 7 + c * 3) % 5) as f32 };
            }
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s);
        }
        let labels: Vec<Vec<i64>> = vec![vec![1, 2, -100, 4, 5], vec![0, 3, 3, 9, 8]];
        let w = [0.5f32, 2.0];
        let counted = |r: usize, i: usize| labels[r][i + 1] >= 0;
        let neg_entropy: f64 = (0..b).flat_map(|r| (0..t - 1).map(move |i| (r, i))).filter(|&(r, i)| counted(r, i)).map(|(r, i)| w[r] as f64 * q[(r * (t - 1) + i) * v..][..v].iter().filter(|&&x| x > 0.0).map(|&x| x as f64 * (x as f64).ln()).sum::<f64>()).sum();
        // The host table (the CPU's fused kernel) and a table on the teacher's plain device
        // (a GPU's composed path) give the same value and gradient.
        let on_device: Tensor<3> = Tensor::from_data(TensorData::new(q.clone(), [b, t - 1, v]), &Device::flex());
        for table in [TargetTable::Host(Arc::new(q.clone())), TargetTable::Device(on_device)] {
            let z = z0.clone().detach().require_grad();
            let targets = ChainTargets { q: table, dims: [b, t - 1, v], neg_entropy, hidden: None };
            let sum = chain_distill_sum(z.clone(), &targets, &labels, &w);
            let g = sum.clone().backward();
            let got = sum.into_scalar::<f32>() as f64;
            let grad = z.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
            let mut want = 0.0;
            for r in 0..b {
                for i in 0..t {
                    let o = (r * t + i) * v;
                    let m = zs[o..o + v].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
                    let s: f64 = zs[o..o + v].iter().map(|&x| (x as f64 - m).exp()).sum();
                    let p: Vec<f64> = zs[o..o + v].iter().map(|&x| (x as f64 - m).exp() / s).collect();
                    let on = i + 1 < t && counted(r, i);
                    for c in 0..v {
                        let qc = if i + 1 < t { q[(r * (t - 1) + i) * v + c] as f64 } else { 0.0 };
                        let want_g = if on { w[r] as f64 * (p[c] - qc) } else { 0.0 };
                        assert!((grad[o + c] as f64 - want_g).abs() < 1e-5, "grad[{r},{i},{c}] {} vs {want_g}", grad[o + c]);
                        if on && qc > 0.0 {
                            want += w[r] as f64 * qc * (qc.ln() - p[c].ln());
                        }
                    }
                }
            }
            assert!(want > 0.1, "random logits are far from the targets: {want}");
            assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn hidden_distill_value_and_gradient_match_the_closed_form() {
        // Σ w e / (‖h‖² + e), e = ‖s − h‖², at loss positions; gradient
        // 2·w·(s − h)·‖h‖² / (‖h‖² + e)²; nothing at masked positions, each row's first (the
        // sink) or its last one; zero when the model's stream is the base's.
        let dev = Device::flex().autodiff();
        let (b, t, d) = (2, 5, 6);
        let s0: Tensor<3> = normal([b, t, d], 0.0, 1.0, 3, &dev);
        let ss = s0.clone().into_data().try_to_vec::<f32>().unwrap();
        let h: Vec<f32> = (0..b * (t - 1) * d).map(|k| ((k * 7 % 11) as f32 - 5.0) * 0.3 + if k % d == 0 { 4.0 } else { 0.0 }).collect();
        let base: Tensor<3> = Tensor::from_data(TensorData::new(h.clone(), [b, t - 1, d]), &Device::flex());
        let labels: Vec<Vec<i64>> = vec![vec![1, 2, -100, 4, 5], vec![0, 3, 3, 9, 8]];
        let w = [0.5f32, 2.0];
        let s = s0.clone().detach().require_grad();
        let sum = hidden_distill_sum(s.clone(), &base, &labels, &w);
        let g = sum.clone().backward();
        let got = sum.into_scalar::<f32>() as f64;
        let grad = s.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        let mut want = 0.0;
        for r in 0..b {
            for i in 0..t {
                let o = (r * t + i) * d;
                let on = i > 0 && i + 1 < t && labels[r][i + 1] >= 0;
                let hv = |c: usize| if i + 1 < t { h[(r * (t - 1) + i) * d + c] as f64 } else { 0.0 };
                let n2: f64 = (0..d).map(|c| hv(c) * hv(c)).sum();
                let e: f64 = (0..d).map(|c| (ss[o + c] as f64 - hv(c)).powi(2)).sum();
                for c in 0..d {
                    let diff = ss[o + c] as f64 - hv(c);
                    let want_g = if on { 2.0 * w[r] as f64 * diff * n2 / (n2 + e).powi(2) } else { 0.0 };
                    assert!((grad[o + c] as f64 - want_g).abs() < 1e-5, "grad[{r},{i},{c}] {} vs {want_g}", grad[o + c]);
                }
                if on {
                    want += w[r] as f64 * e / (n2 + e);
                }
            }
        }
        assert!(want > 0.1, "a random stream is far from the base's: {want}");
        assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
        // The base's own stream (and anything at the last position) costs nothing.
        let mut own = vec![9f32; b * t * d];
        for r in 0..b {
            for i in 0..t - 1 {
                own[(r * t + i) * d..(r * t + i + 1) * d].copy_from_slice(&h[(r * (t - 1) + i) * d..(r * (t - 1) + i + 1) * d]);
            }
        }
        let own: Tensor<3> = Tensor::from_data(TensorData::new(own, [b, t, d]), &dev);
        assert_eq!(hidden_distill_sum(own, &base, &labels, &w).into_scalar::<f32>(), 0.0);
    }
}

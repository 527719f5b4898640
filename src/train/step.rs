//! One optimizer step: forward/backward over the micro-batches, gradients accumulated per
//! parameter, one host sync for loss (total and per batch row), finiteness and norms, the
//! scaler's decision, global-norm clipping and AdamW.

use super::chain_teacher::ChainTargets;
use super::loss::{chain_distill_sum, hidden_distill_sum, nll_sum_rows, self_distill_sum, self_distill_targets_sum, RowSums};
use super::optim::AdamW;
use super::params::{trainable, LrGroup};
use super::row_map::RowMaps;
use super::scaler::{Action, Group, Scaler, GROUPS, RESCUE_RMS_FACTOR};
use crate::model::Llama;
use anyhow::{bail, Result};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One micro-batch: ids and HF-aligned labels (−100 = no loss), `[B][T]`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MicroBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// Per row: the weight of the self-distillation term (`[[data]] self_distill` of the row's
    /// source); empty or all zero: no teacher pass for this micro-batch.
    #[serde(default)]
    pub self_distill: Vec<f32>,
    /// Per row: whether the term compares the old rows' renormalised softmax
    /// (`[[data]] self_distill_renormalize`); empty means no row does.
    pub self_distill_renormalize: Vec<bool>,
    /// Per row: the weight of the cross-tokenizer distillation term (`[[data]] chain_distill`).
    #[serde(default)]
    pub chain_distill: Vec<f32>,
    /// Per row: the weight of the hidden-state term (`[[data]] hidden_distill`), whose targets
    /// come with `chain` (rows with a weight here have a `chain_distill` weight too).
    #[serde(default)]
    pub hidden_distill: Vec<f32>,
    /// The base's targets for the rows with a `chain_distill` weight, made by
    /// [`super::chain_teacher::ChainTeacher::targets`] before the step (not checkpointed: a
    /// resumed run recomputes them from the same rows).
    #[serde(skip)]
    pub chain: Option<Arc<ChainTargets>>,
    /// Self-distillation's targets, when the base model made them on the host before the step
    /// ([`super::chain_teacher::self_targets`]): the step then reads them in the fused soft
    /// cross-entropy instead of running the model with LoRA off ([`base_logits`]). They must
    /// cover every row with a `self_distill` weight, and no such row may renormalise.
    #[serde(skip)]
    pub self_targets: Option<Arc<ChainTargets>>,
}

impl MicroBatch {
    /// A micro-batch without self-distillation.
    pub fn new(input_ids: Vec<Vec<u32>>, labels: Vec<Vec<i64>>) -> Self {
        MicroBatch { input_ids, labels, self_distill: Vec::new(), self_distill_renormalize: Vec::new(), chain_distill: Vec::new(), hidden_distill: Vec::new(), chain: None, self_targets: None }
    }

    /// Positions that carry loss after the shift.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().map(|r| r.iter().skip(1).filter(|&&l| l >= 0).count()).sum()
    }
}

#[derive(Debug, Clone)]
pub struct StepHparams {
    /// LoRA's A factors.
    pub lr: f64,
    /// LoRA's B factors: `lr` times `[train] loraplus_lr_ratio`.
    pub lora_b_lr: f64,
    pub embed_lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepOutput {
    /// Mean NLL over the step's unmasked tokens, before the update.
    pub loss: f64,
    pub tokens: usize,
    /// Global gradient norm after unscaling (before clipping); inf/NaN on overflow.
    pub grad_norm: f64,
    /// The same per parameter group, in the order of [`GROUPS`] (LoRA, old rows, new rows): where
    /// a spike comes from.
    pub grad_norm_by_group: [f64; 3],
    pub skipped: bool,
    pub loss_scale: f32,
    pub events: Vec<String>,
    pub overflow_groups: Vec<Group>,
    /// Σ NLL of each batch row, micro-batches concatenated in order (the order of
    /// `Batch::source_of_row`); they add up to `loss · tokens`.
    pub row_nll: Vec<f64>,
    /// Loss tokens of each batch row, in the same order.
    pub row_tokens: Vec<usize>,
    /// Σ weight · KL(base ‖ model) of the self-distillation term over the step, per loss token
    /// (it is added to the loss on the same scale as the NLL); `None` when no row had a weight.
    pub self_distill: Option<f64>,
    /// Σ weight · KL(base's chain ‖ model) of the cross-tokenizer term, per loss token; `None`
    /// when no row had a `chain_distill` weight.
    pub chain_distill: Option<f64>,
    /// Σ weight · bounded relative error of the hidden-state term, per loss token; `None` when
    /// no row had a `hidden_distill` weight.
    pub hidden_distill: Option<f64>,
}

/// Gradients of the trainable parameters, by name, summed over micro-batches.
pub type Grads = BTreeMap<String, Tensor<2>>;

/// What [`forward_backward_rows`] leaves for the step's host read.
pub struct Forward {
    /// Σ NLL per micro-batch (`[1]` tensors, not yet read).
    pub sums: Vec<Tensor<1>>,
    /// Per batch row Σ NLL, per micro-batch: on the host already, or a `[B]` tensor to read.
    pub rows: Vec<RowSums>,
    /// Loss tokens per batch row, micro-batches concatenated.
    pub row_tokens: Vec<usize>,
    pub total: usize,
    pub grads: Grads,
    /// Σ of the self-distillation term (`[1]`, not yet read), when any row had a weight.
    pub kd: Option<Tensor<1>>,
    /// Σ of the cross-tokenizer term (`[1]`, not yet read), when any micro-batch had targets.
    pub chain: Option<Tensor<1>>,
    /// Σ of the hidden-state term (`[1]`, not yet read), when any micro-batch had a weight.
    pub hidden: Option<Tensor<1>>,
}

/// Forward and backward over `batches`; returns the loss sum (as a tensor, not yet read) and
/// the accumulated gradients of `loss_sum · scale / total_tokens`.
pub fn forward_backward(model: &mut Llama, batches: &[MicroBatch], scale: f32, device: &Device) -> Result<(Vec<Tensor<1>>, usize, Grads)> {
    let f = forward_backward_rows(model, batches, scale, device)?;
    Ok((f.sums, f.total, f.grads))
}

/// [`forward_backward`] that also keeps the loss of each batch row.
pub fn forward_backward_rows(model: &mut Llama, batches: &[MicroBatch], scale: f32, device: &Device) -> Result<Forward> {
    let total: usize = batches.iter().map(|b| b.loss_tokens()).sum();
    if total == 0 {
        bail!("a training step has no unmasked label: check the data's labels");
    }
    let mut acc: Grads = BTreeMap::new();
    let mut sums = Vec::new();
    let mut rows = Vec::new();
    let mut row_tokens = Vec::new();
    let mut kd: Option<Tensor<1>> = None;
    let mut chain: Option<Tensor<1>> = None;
    let mut hidden: Option<Tensor<1>> = None;
    for mb in batches {
        let (b, t) = (mb.input_ids.len(), mb.input_ids[0].len());
        let ids: Vec<i64> = mb.input_ids.iter().flatten().map(|&x| x as i64).collect();
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [b, t]), device);
        let distils = mb.self_distill.iter().any(|&w| w > 0.0);
        let teacher = if distils && mb.self_targets.is_none() { Some(base_logits(model, ids.clone())) } else { None };
        // The base's stream at the tap layer, where this micro-batch's rows ask for the term.
        let base_states = mb.chain.as_ref().and_then(|c| c.hidden.as_ref()).filter(|_| mb.hidden_distill.iter().any(|&w| w > 0.0));
        let (h, tapped) = model.hidden_tapped(model.embed_tokens.embed(ids), None, base_states.map(|b| b.layer));
        let logits = model.logits(h);
        let hidden_sum = tapped.zip(base_states).map(|(s, b)| hidden_distill_sum(s, &b.states, &mb.labels, &mb.hidden_distill));
        let old = model.lm_head.as_ref().unwrap_or(&model.embed_tokens).base_rows();
        let kd_sum = match (&mb.self_targets, teacher) {
            (Some(q), _) if distils => {
                if mb.self_distill_renormalize.iter().zip(&mb.self_distill).any(|(&r, &w)| r && w > 0.0) {
                    bail!("self_distill: host targets cannot renormalise; leave `self_targets` empty for such rows");
                }
                Some(self_distill_targets_sum(logits.clone(), q, old, &mb.labels, &mb.self_distill))
            }
            (_, Some(tl)) => Some(self_distill_sum(logits.clone(), tl, old, &mb.labels, &mb.self_distill, &mb.self_distill_renormalize)),
            _ => None,
        };
        let chain_sum = mb.chain.as_ref().map(|c| chain_distill_sum(logits.clone(), c, &mb.labels, &mb.chain_distill));
        let r = nll_sum_rows(logits, &mb.labels);
        let mut objective = r.sum.clone();
        for (extra, acc) in [(kd_sum, &mut kd), (chain_sum, &mut chain), (hidden_sum, &mut hidden)] {
            if let Some(k) = extra {
                objective = objective + k.clone();
                let k = k.detach().inner();
                *acc = Some(match acc.take() {
                    Some(prev) => prev + k,
                    None => k,
                });
            }
        }
        let loss = objective * (scale as f64 / total as f64);
        sums.push(r.sum.detach().inner());
        rows.push(match r.rows {
            RowSums::Device(t) => RowSums::Device(t.inner()),
            host => host,
        });
        row_tokens.extend(r.row_tokens);
        let grads = loss.backward();
        for p in trainable(model) {
            if let Some(g) = p.param.val().grad(&grads) {
                let g = g.cast(burn::tensor::FloatDType::F32);
                match acc.remove(&p.name) {
                    Some(prev) => acc.insert(p.name, prev + g),
                    None => acc.insert(p.name, g),
                };
            }
        }
    }
    Ok(Forward { sums, rows, row_tokens, total, grads: acc, kd, chain, hidden })
}

/// The teacher of self-distillation where the step runs it (a micro-batch without
/// `self_targets`): the same model with every LoRA branch taken out, on the same ids, projected
/// onto the frozen head rows only (`[B, T, base rows]`). On text of the old
/// vocabulary the new input rows are never read: that is the base model, at the cost of one
/// forward pass and no second copy of the weights. The embeddings are detached, so the pass
/// records no graph.
pub fn base_logits(model: &mut Llama, ids: Tensor<2, Int>) -> Tensor<3> {
    without_lora(model, |m| {
        let h = m.hidden_from_embeddings(m.embed_tokens.embed(ids).detach(), None);
        m.lm_head.as_ref().unwrap_or(&m.embed_tokens).project_base(h).detach()
    })
}

/// Runs `f` on the model with every LoRA branch taken out, then puts them back.
pub fn without_lora<T>(model: &mut Llama, f: impl FnOnce(&Llama) -> T) -> T {
    let mut saved = Vec::new();
    for (_, lin) in crate::lora::adapter::linears_mut(model) {
        saved.push(std::mem::take(&mut lin.lora));
    }
    let out = f(model);
    for ((_, lin), br) in crate::lora::adapter::linears_mut(model).into_iter().zip(saved) {
        lin.lora = br;
    }
    out
}

/// The full step. Exactly one host read: loss sums, per-group finiteness and squared norms.
pub fn train_step(model: &mut Llama, opt: &mut AdamW, row_maps: &mut RowMaps, scaler: &mut Scaler, batches: &[MicroBatch], hp: &StepHparams, device: &Device) -> Result<StepOutput> {
    let scale = scaler.scale;
    let Forward { sums, rows, row_tokens, total, mut grads, kd, chain, hidden } = forward_backward_rows(model, batches, scale, device)?;
    let groups: BTreeMap<String, (Group, LrGroup)> = trainable(model).into_iter().map(|p| (p.name, (p.group, p.lr_group))).collect();
    // Device-side summaries: [loss sums..., finite(g) per group, sumsq per group, row sums of
    // the composed loss...].
    let inner = device.clone().inner();
    let mut parts: Vec<Tensor<1>> = sums;
    let mut finite: Vec<Tensor<1>> = Vec::new();
    let mut sumsq: Vec<Tensor<1>> = Vec::new();
    for g in GROUPS {
        let gs: Vec<&Tensor<2>> = grads.iter().filter(|(n, _)| groups.get(*n).map(|x| x.0) == Some(g)).map(|(_, t)| t).collect();
        if gs.is_empty() {
            finite.push(Tensor::ones([1], &inner));
            sumsq.push(Tensor::zeros([1], &inner));
            continue;
        }
        let f = gs.iter().map(|t| (*t).clone().is_finite().all().float()).fold(Tensor::<1>::ones([1], &inner), |a, b| a * b);
        // Row sums first: flex sums a tensor of 4M values or more as parallel chunks whose
        // partial sums rayon's reduce adds along a split tree that work stealing shapes (the
        // new rows' gradient, 16,640 × 576, is one), so the norm and the clipping could differ
        // in the last bits between runs. A row's sum runs on one thread in a fixed order.
        let s = gs.iter().map(|t| (*t).clone().square().sum_dim(1).sum()).fold(Tensor::<1>::zeros([1], &inner), |a, b| a + b);
        finite.push(f);
        sumsq.push(s);
    }
    let (has_kd, has_chain, has_hidden) = (kd.is_some(), chain.is_some(), hidden.is_some());
    // The objective's sum (NLL + distillation terms) decides finiteness; the NLL alone is the
    // reported loss.
    let n_sums = parts.len();
    parts.extend(kd);
    parts.extend(chain);
    parts.extend(hidden);
    parts.extend(finite);
    parts.extend(sumsq);
    let n_fixed = parts.len();
    parts.extend(rows.iter().filter_map(|r| if let RowSums::Device(t) = r { Some(t.clone()) } else { None }));
    let host: Vec<f32> = Tensor::cat(parts, 0).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading step summaries: {e:?}"))?;
    let mut device_rows = host[n_fixed..].iter().map(|&x| x as f64);
    let mut row_nll = Vec::with_capacity(row_tokens.len());
    for r in rows {
        match r {
            RowSums::Host(v) => row_nll.extend(v),
            RowSums::Device(t) => row_nll.extend(device_rows.by_ref().take(t.dims()[0])),
        }
    }
    let loss_sum: f64 = host[..n_sums].iter().map(|&x| x as f64).sum();
    let self_distill = has_kd.then(|| host[n_sums] as f64 / total as f64);
    let chain_distill = has_chain.then(|| host[n_sums + has_kd as usize] as f64 / total as f64);
    let hidden_distill = has_hidden.then(|| host[n_sums + has_kd as usize + has_chain as usize] as f64 / total as f64);
    let off = n_sums + has_kd as usize + has_chain as usize + has_hidden as usize;
    let flags: Vec<(Group, bool)> = GROUPS.iter().enumerate().map(|(i, g)| (*g, host[off + i] > 0.5)).collect();
    let sq: Vec<f64> = (0..3).map(|i| host[off + 3 + i] as f64).collect();
    let inv = 1.0 / scale as f64;
    let grad_norm_by_group = [sq[0].sqrt() * inv, sq[1].sqrt() * inv, sq[2].sqrt() * inv];
    if !loss_sum.is_finite() && scaler.rescues_rows() {
        if let Some(what) = rescue_new_rows(model) {
            let event = scaler.skip_for_row_rescue(&what);
            let overflow_groups = flags.iter().filter(|(_, ok)| !ok).map(|(g, _)| *g).collect();
            return Ok(StepOutput { loss: loss_sum / total as f64, tokens: total, grad_norm: f64::NAN, grad_norm_by_group, skipped: true, loss_scale: scaler.scale, events: vec![event], overflow_groups, row_nll, row_tokens, self_distill, chain_distill, hidden_distill });
        }
    }
    let (action, log) = scaler.update(&flags);
    let mut events: Vec<String> = log.into_iter().collect();
    let overflow_groups: Vec<Group> = flags.iter().filter(|(_, ok)| !ok).map(|(g, _)| *g).collect();
    let finite_sq: f64 = sq.iter().zip(&flags).filter(|(_, (_, ok))| *ok).map(|(s, _)| *s).sum();
    let raw_norm: f64 = sq.iter().sum::<f64>().sqrt() * inv;
    let mut out = StepOutput { loss: loss_sum / total as f64, tokens: total, grad_norm: raw_norm, grad_norm_by_group, skipped: false, loss_scale: scaler.scale, events: vec![], overflow_groups, row_nll, row_tokens, self_distill, chain_distill, hidden_distill };
    let sanitize: Vec<Group> = match &action {
        Action::Skip => {
            out.skipped = true;
            out.events = events;
            return Ok(out);
        }
        Action::Step => vec![],
        Action::StepSanitized(g) => g.clone(),
    };
    // Norm for clipping: over the finite groups as they are, zeroed entries count as zero.
    let norm = if sanitize.is_empty() { raw_norm } else { finite_sq.sqrt() * inv };
    let clip = if hp.max_grad_norm > 0.0 && norm > hp.max_grad_norm { hp.max_grad_norm / (norm + 1e-6) } else { 1.0 };
    if clip < 1.0 && !sanitize.is_empty() {
        events.push(format!("clipped sanitized step by {clip:.3e}"));
    }
    let mut params = trainable(model);
    for p in params.iter_mut() {
        let Some(mut g) = grads.remove(&p.name) else { continue };
        if sanitize.contains(&p.group) {
            let bad: Tensor<2, Bool> = g.clone().is_finite().bool_not();
            g = g.mask_fill(bad, 0.0);
        }
        let g = g * (inv * clip);
        let (lr, wd) = match p.lr_group {
            LrGroup::Lora => (hp.lr, hp.weight_decay),
            LrGroup::LoraB => (hp.lora_b_lr, hp.weight_decay),
            // No decay on embeddings (as for norms): it would pull trained rows towards zero.
            LrGroup::Table => (hp.embed_lr, 0.0),
        };
        match row_maps.take(&p.name) {
            None => opt.step(&p.name, p.param, g, lr, wd),
            Some(mut map) => {
                // The map's factors take AdamW steps at the rows' rate, without decay.
                let delta = map.step(&g, |name, factor, grad| opt.step(name, factor, grad, lr, 0.0));
                opt.step(&p.name, p.param, g, lr, wd);
                let id = p.param.id;
                let rows = p.param.val().inner() + delta;
                *p.param = burn::module::Param::initialized(id, Tensor::from_inner(rows).require_grad());
                row_maps.put(map);
            }
        }
    }
    out.events = events;
    Ok(out)
}

/// Scales outlier new rows of the embedding and the (untied) head down to the old rows' RMS;
/// a description of what changed, or `None` when no new row was an outlier.
fn rescue_new_rows(model: &mut Llama) -> Option<String> {
    let mut done = Vec::new();
    if let Some(r) = model.embed_tokens.rescue_new_rows(RESCUE_RMS_FACTOR) {
        done.push(("embed_tokens", r));
    }
    if let Some(r) = model.lm_head.as_mut().and_then(|h| h.rescue_new_rows(RESCUE_RMS_FACTOR)) {
        done.push(("lm_head", r));
    }
    if done.is_empty() {
        return None;
    }
    let parts: Vec<String> = done.iter().map(|(t, r)| format!("{} new {t} rows with RMS up to {:.3e} scaled to the old rows' mean RMS {:.3e}", r.rows, r.max_rms, r.target_rms)).collect();
    Some(parts.join(", "))
}

//! Token Distillation of the new input rows (Dobler, Elliott, de Melo, ICLR 2026).

use super::adam::Adam;
use super::{ids_tensor, old_rows_of, DistillContext, DistillOptions, DistillReport};
use crate::model::{Llama, TokenTable};
use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

/// Token Distillation of the input rows: minimise the squared distance between the model's
/// final hidden states on the new tokenization and the base's at the aligned positions.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_input_rows(
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
            student.embed_tokens = TokenTable { base: base_table.clone(), extra: Some(Param::from_tensor(extra).set_require_grad(true)), extra_f32: true, quant: None, packed: None };
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

//! The trainable parameters of a model, by name and group, with mutable access for the
//! optimizer. Names follow PEFT's, so logs and gradient checks line up with the reference.

use super::scaler::Group;
use crate::model::{Llama, TokenTable};
use burn::module::Param;
use burn::tensor::Tensor;

/// Which learning rate the parameter takes: LoRA's (the A factors), LoRA's times
/// `loraplus_lr_ratio` (the B factors), or the embedding/head one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrGroup {
    Lora,
    LoraB,
    Table,
}

pub struct Trainable<'a> {
    pub name: String,
    pub group: Group,
    pub lr_group: LrGroup,
    pub param: &'a mut Param<Tensor<2>>,
}

fn tables<'a>(t: &'a mut TokenTable, prefix: &str, out: &mut Vec<Trainable<'a>>) {
    let TokenTable { base, extra, .. } = t;
    if base.val().is_require_grad() {
        out.push(Trainable { name: format!("{prefix}.base"), group: Group::OldRows, lr_group: LrGroup::Table, param: base });
    }
    if let Some(e) = extra {
        if e.val().is_require_grad() {
            out.push(Trainable { name: format!("{prefix}.new_rows"), group: Group::NewRows, lr_group: LrGroup::Table, param: e });
        }
    }
}

/// Every trainable parameter, in a fixed order (so optimizer state lines up across runs).
pub fn trainable(model: &mut Llama) -> Vec<Trainable<'_>> {
    let mut out = Vec::new();
    let Llama { embed_tokens, layers, lm_head, .. } = model;
    for (i, layer) in layers.iter_mut().enumerate() {
        for (t, lin) in layer.projections_mut() {
            for (k, br) in lin.lora.iter_mut().enumerate() {
                let suffix = if k == 0 { String::new() } else { format!(".{k}") };
                if br.a.val().is_require_grad() {
                    out.push(Trainable { name: format!("model.layers.{i}.{t}.lora_A{suffix}"), group: Group::Lora, lr_group: LrGroup::Lora, param: &mut br.a });
                    out.push(Trainable { name: format!("model.layers.{i}.{t}.lora_B{suffix}"), group: Group::Lora, lr_group: LrGroup::LoraB, param: &mut br.b });
                }
            }
        }
    }
    tables(embed_tokens, "model.embed_tokens", &mut out);
    if let Some(h) = lm_head {
        tables(h, "lm_head", &mut out);
    }
    out
}

//! Training against the HF + PEFT reference: the step-1 SFT loss and its gradients.

mod common;
use common::*;
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::tensor_to_f32;
use linly_lora::lora::adapter::apply;
use linly_lora::lora::{set_table_modes, TableMode};
use linly_lora::model::Llama;
use linly_lora::train::step::{forward_backward, MicroBatch};

fn fixture_batch() -> MicroBatch {
    let e = Expected::load();
    let (labels, shape) = e.i64("sft_labels");
    MicroBatch { input_ids: e.ids("resized_input_ids"), labels: labels.chunks(shape[1]).map(|c| c.to_vec()).collect() }
}

#[test]
fn sft_loss_and_gradients_match_peft() {
    let device = cpu().autodiff();
    let base = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
    let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
    set_table_modes(&mut model, TableMode::All, TableMode::All, 320).unwrap();
    let (sums, total, grads) = forward_backward(&mut model, &[fixture_batch()], 1.0, &device).unwrap();
    let loss = sums.into_iter().map(|s| s.into_scalar::<f32>() as f64).sum::<f64>() / total as f64;
    let exp = Expected::load();
    let want = exp.f32("sft_loss").0[0] as f64;
    assert!((loss - want).abs() / want <= 1e-4, "sft loss {loss} vs {want}");
    let cat = |a: &str, b: &str| {
        let mut v = tensor_to_f32(grads[a].clone());
        v.extend(tensor_to_f32(grads[b].clone()));
        v
    };
    let checks: Vec<(&str, Vec<f32>)> = vec![
        ("grad.base_model.model.model.embed_tokens.modules_to_save.default.weight", cat("model.embed_tokens.base", "model.embed_tokens.new_rows")),
        ("grad.base_model.model.lm_head.modules_to_save.default.weight", cat("lm_head.base", "lm_head.new_rows")),
        ("grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", tensor_to_f32(grads["model.layers.0.self_attn.q_proj.lora_A"].clone())),
        ("grad.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", tensor_to_f32(grads["model.layers.0.self_attn.q_proj.lora_B"].clone())),
        ("grad.base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight", tensor_to_f32(grads["model.layers.1.mlp.down_proj.lora_A"].clone())),
        ("grad.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight", tensor_to_f32(grads["model.layers.1.mlp.down_proj.lora_B"].clone())),
    ];
    for (name, got) in checks {
        let (want, _) = exp.f32(name);
        let e = rel_err(&got, &want);
        eprintln!("{name}: rel err {e:e}");
        assert!(e <= 1e-3, "{name}: relative error {e:e} > 1e-3");
    }
}

//! LoRA and PEFT adapters against the HF + PEFT reference fixture.

mod common;
use common::*;
use linly_lora::infer::{self, ModelSpec};
use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
use linly_lora::lora::adapter::apply;
use linly_lora::model::Llama;

#[test]
fn adapter_unmerged_matches_peft_logits() {
    let exp = Expected::load();
    let base = Llama::load(&tiny().join("base"), &cpu(), FloatType::F32).unwrap();
    let model = apply(base, &tiny().join("adapter"), &cpu()).unwrap();
    assert_eq!(model.vocab_size(), 384);
    let got = logits_of(&model, &exp.ids("resized_input_ids"));
    let (want, shape) = exp.f32("adapter_logits");
    assert_eq!(shape, vec![2, 24, 384]);
    let e = rel_err(&got, &want);
    assert!(e <= 1e-4, "adapter logits relative error {e:e} > 1e-4");
}

#[test]
fn saved_adapter_round_trips_bit_exactly() {
    use linly_lora::lora::config::AdapterConfig;
    use linly_lora::lora::save::{save, TableSave};
    use linly_lora::lora::TableMode;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ours");
    let base = Llama::load(&tiny().join("base"), &cpu(), FloatType::F32).unwrap();
    let model = apply(base, &tiny().join("adapter"), &cpu()).unwrap();
    let cfg = AdapterConfig::load(&tiny().join("adapter")).unwrap();
    save(&model, &cfg, TableSave { embed: TableMode::All, lm_head: TableMode::All, old_vocab: 320 }, &out, &[]).unwrap();
    let theirs = SafetensorsFile::open(&tiny().join("adapter/adapter_model.safetensors")).unwrap();
    let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for n in theirs.names() {
        let (a, b) = (ours.require(&n).unwrap(), theirs.require(&n).unwrap());
        assert_eq!(a.shape, b.shape, "{n}");
        assert_eq!(a.dtype, b.dtype, "{n}");
        assert!(a.bytes == b.bytes, "{n} differs");
    }
    let c2 = AdapterConfig::load(&out).unwrap();
    assert_eq!(c2.r, 8);
    assert_eq!(c2.lora_alpha, 16.0);
    assert_eq!(c2.modules_to_save, Some(vec!["embed_tokens".to_string(), "lm_head".to_string()]));
    // And it still gives PEFT's logits.
    let exp = Expected::load();
    let base = Llama::load(&tiny().join("base"), &cpu(), FloatType::F32).unwrap();
    let again = apply(base, &out, &cpu()).unwrap();
    let got = logits_of(&again, &exp.ids("resized_input_ids"));
    let (want, _) = exp.f32("adapter_logits");
    assert!(rel_err(&got, &want) <= 1e-4);
}

#[test]
fn adapter_flag_on_eval() {
    let spec = ModelSpec { adapters: vec![tiny().join("adapter")], ..ModelSpec::new(tiny().join("base")) };
    let loaded = infer::load(&spec).unwrap();
    let exp = Expected::load();
    let r = infer::eval::eval_ids(&loaded, &exp.ids("resized_input_ids"), None).unwrap();
    assert_eq!(r.tokens, 46);
}

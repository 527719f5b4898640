//! Vocabulary extension and resize, end to end.

mod common;
use common::*;
use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
use linly_lora::model::Llama;
use linly_lora::vocab::{resize_model, InitMethod};

#[test]
fn resize_reproduces_reference_rows_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("resized");
    let r = resize_model(&tiny().join("base"), &tiny().join("vocab_extension.json"), InitMethod::SubtokenMean, 0, None, &out).unwrap();
    assert_eq!((r.old_vocab, r.new_vocab, r.tied), (320, 384, false));
    let exp = Expected::load();
    let f = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    for (name, key) in [("model.embed_tokens.weight", "resized_embed_new_rows"), ("lm_head.weight", "resized_lm_head_new_rows")] {
        let t = f.require(name).unwrap();
        assert_eq!(t.shape, &[384, 64]);
        let v = t.to_f32().unwrap();
        let (want, _) = exp.f32(key);
        let e = rel_err(&v[320 * 64..], &want);
        assert!(e <= 1e-5, "{name} new rows: relative error {e:e}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 384);
    let model = Llama::load(&out, &cpu(), FloatType::F32).unwrap();
    let got = logits_of(&model, &exp.ids("resized_input_ids"));
    let (want, _) = exp.f32("resized_logits");
    let e = rel_err(&got, &want);
    assert!(e <= 1e-5, "resized logits relative error {e:e}");
}

#[test]
fn resize_rejects_mismatched_extension_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ext.json");
    let mut ext: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny().join("vocab_extension.json")).unwrap()).unwrap();
    ext["old_vocab"] = 32000.into();
    ext["new_vocab"] = (32000 + 64).into();
    std::fs::write(&bad, ext.to_string()).unwrap();
    let out = dir.path().join("out");
    let e = format!("{:#}", resize_model(&tiny().join("base"), &bad, InitMethod::SubtokenMean, 0, None, &out).unwrap_err());
    assert!(e.contains("320") && e.contains("32000"), "{e}");
    assert!(!out.exists());
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_extend_stats_encode_resize() {
    let dir = tempfile::tempdir().unwrap();
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "中国\n中国人\n你好\n学习\n我们\n").unwrap();
    let out = dir.path().join("tok");
    let (ok, stdout, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&fixture("llama2-tokenizer")), "--add", s(&words), "--out", s(&out), "--json"], None);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["old_vocab"], 32000);
    assert!(r["new_vocab"].as_u64().unwrap() >= 32005);
    let ext: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("vocab_extension.json")).unwrap()).unwrap();
    assert_eq!(ext["old_vocab"], 32000);
    assert_eq!(ext["pieces"].as_array().unwrap().len(), ext["subtokens"].as_array().unwrap().len());
    assert!(out.join("tokenizer_config.json").exists());
    // Running text: the new word is one token; English ids unchanged.
    let (ok, stdout, err) = run_cli(&["vocab", "encode", "--tokenizer", s(&out), "--text", "我们在中国学习。Hello world"], None);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"中国\"") && stdout.contains("\"学习\"") && stdout.contains("10994, 3186]"), "{stdout}");
    // Stats JSON contract.
    let text = dir.path().join("zh.txt");
    std::fs::write(&text, "我们在中国学习。\n你好！\n").unwrap();
    let (ok, stdout, err) = run_cli(&["vocab", "stats", "--tokenizer", s(&fixture("llama2-tokenizer")), "--tokenizer", s(&out), "--text", s(&text), "--json"], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for key in ["tokenizer", "file", "chars", "tokens", "tokens_per_char", "byte_fallback_tokens", "roundtrip_failures"] {
        assert!(rows[0].get(key).is_some(), "missing {key}");
    }
    // Unwrapped so that a missing field fails instead of comparing as `None < Some(_)`.
    assert!(rows[1]["tokens"].as_u64().unwrap() < rows[0]["tokens"].as_u64().unwrap());
    assert_eq!(rows[1]["roundtrip_failures"], 0);
    // Resize through the CLI on the fixture.
    let m = dir.path().join("m");
    let (ok, stdout, err) = run_cli(&["vocab", "resize", "--model", s(&tiny().join("base")), "--extension", s(&tiny().join("vocab_extension.json")), "--out", s(&m)], None);
    assert!(ok, "{err}");
    assert!(stdout.contains("320 -> 384"), "{stdout}");
    let (ok, _, err) = run_cli(&["vocab", "resize", "--model", s(&tiny().join("base")), "--extension", s(&tiny().join("vocab_extension.json")), "--init", "bogus", "--out", s(&dir.path().join("m2"))], None);
    assert!(!ok && err.contains("bogus"), "{err}");
    // The model-based inits name what they lack, and leave no output behind.
    let (model, extension) = (tiny().join("base"), tiny().join("vocab_extension.json"));
    let base = ["vocab", "resize", "--model", s(&model), "--extension", s(&extension)];
    let m3 = dir.path().join("m3");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "你好世界。\n").unwrap();
    for (extra, want) in [
        (vec!["--init", "fit"], "--init-text"),
        (vec!["--init", "fit", "--init-text", "missing.txt"], "missing.txt"),
        (vec!["--init", "fit", "--init-text", s(&text), "--init-steps", "0"], "--init-steps"),
        (vec!["--init", "distill", "--init-text", s(&text), "--init-text", s(&text)], "one --init-text"),
        // Fails inside the training run (the fixture has no tokenizer for a text source), after
        // the output was begun.
        (vec!["--init", "fit", "--init-text", s(&text), "--init-steps", "2"], "tokenizer"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).chain(["--out", s(&m3)]).collect();
        let (ok, _, err) = run_cli(&args, None);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("m3")).collect();
        assert!(left.is_empty(), "{extra:?} left output behind: {left:?}");
    }
}

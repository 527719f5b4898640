//! The quickstart's pipeline in miniature, so its wiring cannot rot: a small model with a real
//! tokenizer → `vocab extend` → `vocab resize` (sub-token mean) → `train` (Chinese text +
//! parallel pairs + English replay + instructions, curriculum, packing) → `merge` → `eval`
//! before and after on held-out text, all through the CLI.

mod common;
use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn bits_per_char(model: &std::path::Path, text: &std::path::Path) -> f64 {
    let (ok, out, err) = run_cli(&["eval", "--model", s(model), "--text", s(text), "--json"], None);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["bits_per_char"].as_f64().unwrap()
}

#[test]
fn extend_resize_train_merge_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base");
    std::fs::create_dir(&base).unwrap();
    random_model(&base, 32000, Some(&fixture("llama2-tokenizer")));
    let data = fixture("data");
    // Held-out Chinese: the last lines of the parallel sample's Chinese side, never trained on
    // (the recipe below uses `limit` to stop before them).
    let tsv = std::fs::read_to_string(data.join("hsk_zh_en_sample.tsv")).unwrap();
    let lines: Vec<&str> = tsv.lines().collect();
    let held_out: Vec<&str> = lines[24..].iter().map(|l| l.split('\t').next().unwrap()).collect();
    let zh_eval = d.join("zh_eval.txt");
    std::fs::write(&zh_eval, held_out.join("\n")).unwrap();
    // 1. extend with characters and words from the training side.
    let words = d.join("words.txt");
    let mut pieces: Vec<String> = lines[..24].iter().flat_map(|l| l.split('\t').next().unwrap().chars().filter(|c| !c.is_ascii()).map(String::from)).collect();
    pieces.extend(["我们", "你好", "中国", "学习", "老师"].iter().map(|x| x.to_string()));
    std::fs::write(&words, pieces.join("\n")).unwrap();
    let tok = d.join("tok");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&base), "--add", s(&words), "--out", s(&tok)], None);
    assert!(ok, "{err}");
    // 2. resize.
    let resized = d.join("resized");
    let (ok, out, err) = run_cli(&["vocab", "resize", "--model", s(&base), "--extension", s(&tok.join("vocab_extension.json")), "--out", s(&resized)], None);
    assert!(ok, "{err}");
    assert!(out.contains("32000 ->"), "{out}");
    // 2b. the same with the rows fitted against the base on the training side's Chinese text
    // (a few steps: the wiring, not the gain, which tests/distill.rs measures).
    let zh_train = d.join("zh_train.txt");
    let train_side: Vec<&str> = lines[..24].iter().map(|l| l.split('\t').next().unwrap()).collect();
    std::fs::write(&zh_train, train_side.join("\n\n")).unwrap();
    let fitted = d.join("fitted");
    let (ok, out, err) = run_cli(&["vocab", "resize", "--model", s(&base), "--extension", s(&tok.join("vocab_extension.json")), "--init", "fit", "--init-text", s(&zh_train), "--init-steps", "3", "--out", s(&fitted)], None);
    assert!(ok, "{err}");
    assert!(out.contains("fit init") && fitted.join("fit_recipe.toml").is_file() && fitted.join("tokenizer.json").is_file(), "{out}");
    assert!(bits_per_char(&fitted, &zh_eval).is_finite());
    let (ok, stats, err) = run_cli(&["vocab", "stats", "--tokenizer", s(&base), "--tokenizer", s(&resized), "--text", s(&zh_eval), "--json"], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stats.trim()).unwrap();
    // Unwrapped so that a missing field fails instead of comparing as `None < Some(_)`.
    assert!(v["results"][1]["tokens_per_char"].as_f64().unwrap() < v["results"][0]["tokens_per_char"].as_f64().unwrap());
    let before = bits_per_char(&resized, &zh_eval);
    // Per-token scores add up to the total, and their spans walk through the text's bytes.
    let (ok, out, err) = run_cli(&["eval", "--model", s(&resized), "--text", s(&zh_eval), "--json", "--per-token"], None);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let toks = r["per_token"].as_array().unwrap();
    assert_eq!(toks.len() as u64, r["tokens"].as_u64().unwrap());
    let sum: f64 = toks.iter().map(|t| t["nll"].as_f64().unwrap()).sum();
    assert!((sum - r["total_nll"].as_f64().unwrap()).abs() < 1e-3 * toks.len() as f64, "{sum} vs {}", r["total_nll"]);
    let ends: Vec<u64> = toks.iter().map(|t| t["span"][1].as_u64().unwrap()).collect();
    assert!(ends.windows(2).all(|w| w[0] <= w[1]), "spans out of order: {ends:?}");
    assert_eq!(*ends.last().unwrap() as usize, std::fs::read_to_string(&zh_eval).unwrap().trim_end().len());
    assert!(toks.iter().any(|t| t["id"].as_u64().unwrap() >= 32000), "no added piece was scored");
    // 3. train.
    let recipe = d.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"
[model]
path = "{resized}"
[lora]
r = 4
alpha = 8
[trainable]
embed_tokens = "all"
lm_head = "all"
[[data]]
kind = "parallel"
path = "{data}/hsk_zh_en_sample.tsv"
limit = 24
weight = [0.5, 1.0]
[[data]]
kind = "text"
path = "{data}/text_sample.txt"
weight = [0.5, 0.2]
lang = "en"
[[data]]
kind = "alpaca"
path = "{data}/alpaca_sample.json"
weight = 0.5
[mix]
packing = true
[train]
seq_len = 64
batch_size = 4
steps = 40
lr = 5e-3
warmup_ratio = 0.1
[output]
dir = "run"
save_every = 20
[[eval]]
path = "{zh_eval}"
name = "zh held-out"
"#,
            resized = s(&resized),
            data = s(&data),
            zh_eval = s(&zh_eval)
        ),
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["train", s(&recipe), "--quiet"], None);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["end_step"], 40);
    // 4. merge and 5. evaluate after.
    let merged = d.join("merged");
    let (ok, _, err) = run_cli(&["merge", "--base", s(&resized), "--adapter", s(&d.join("run/adapter")), "--out", s(&merged)], None);
    assert!(ok, "{err}");
    // The adapter's tables are the resized model's, larger than the base's, and its folder has no
    // tokenizer (the recipe trained a model resized beforehand): on the base, the base's own
    // tokenizer would never write the added rows, so that is refused; with the extended one it runs.
    let on_base = |tok_flag: &[&str]| run_cli(&[&["eval", "--model", s(&base), "--adapter", s(&d.join("run/adapter")), "--text", s(&zh_eval)], tok_flag].concat(), None);
    let (ok, _, err) = on_base(&[]);
    assert!(!ok && err.contains("grow the vocabulary from 32000"), "{err}");
    let (ok, _, err) = on_base(&["--tokenizer", s(&tok)]);
    assert!(ok, "{err}");
    let after = bits_per_char(&merged, &zh_eval);
    eprintln!("held-out Chinese bits/char: {before:.3} -> {after:.3}");
    assert!(after < before, "held-out Chinese bits/char did not fall: {before} -> {after}");
    // The eval hook wrote the held-out figure into metrics.jsonl.
    let m = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert!(m.contains("zh held-out"));
}

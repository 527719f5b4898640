//! Hostile and careless input (issue #20): no panic, no silent NaN, no unbounded allocation.
//! Each test covers a class of input, not one example of it. Outputs (nothing overwritten) are
//! in `hostile_outputs.rs`.

mod common;
use common::hostile::*;
use common::*;
use std::path::{Path, PathBuf};

#[test]
fn empty_id_sequences_are_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let jl = dir.path().join("e.jsonl");
    std::fs::write(&jl, "[]\n").unwrap();
    let st = dir.path().join("e.safetensors");
    linly_lora::io::safetensors::write_all(&st, &[("input_ids".to_string(), "I64".to_string(), vec![2, 0], vec![])], None).unwrap();
    for ids in [&jl, &st] {
        let (ok, _, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--ids", s(ids)], None);
        assert!(!ok && !err.contains("panicked") && err.contains("nothing to score"), "{err}");
    }
    // Rows of nothing, as many as a u64 header can claim: no allocation per claimed row.
    linly_lora::io::safetensors::write_all(&st, &[("input_ids".to_string(), "I64".to_string(), vec![1 << 62, 0], vec![])], None).unwrap();
    let r = run_bounded(&["eval", "--model", s(&tiny().join("base")), "--ids", s(&st)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.code().is_some() && !r.status.success() && err.contains("nothing to score"), "{:?}: {err}", r.status);
    // An empty sequence among scorable ones is skipped.
    std::fs::write(&jl, "[]\n[1, 2, 3]\n").unwrap();
    let (ok, out, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--ids", s(&jl), "--json"], None);
    assert!(ok, "{err}");
    assert!(out.contains("\"tokens\":2"), "{out}");
}
/// Runs the CLI under a 2 GiB address-space limit and a CPU-seconds limit, so "bounded time and
/// memory" is enforced by the kernel rather than measured: a run that allocates by a corrupt
/// header's word, or loops on it, is killed and fails the test.
fn run_bounded(args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_linly-lora"));
    cmd.args(args).env("RAYON_NUM_THREADS", "1");
    // SAFETY: only async-signal-safe setrlimit calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = |r, v| libc::setrlimit(r, &libc::rlimit { rlim_cur: v, rlim_max: v });
            lim(libc::RLIMIT_AS, 2 << 30);
            lim(libc::RLIMIT_CPU, 120);
            Ok(())
        });
    }
    cmd.output().unwrap()
}
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("{:?} not in file", String::from_utf8_lossy(needle)))
}
/// GGUF with a tokenizer (string arrays and all), its every count, length, dimension, type and
/// offset pushed in turn to its type's maximum: `import gguf` ends (never killed, never panics),
/// with an error for every size field.
#[test]
fn gguf_fields_at_their_maximum_end_in_bounded_memory() {
    use linly_lora::io::gguf::reader::{parse, GgufArray, GgufValue};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    random_model(&model, 32000, Some(&fixture("llama2-tokenizer")));
    let src = dir.path().join("m.gguf");
    let (ok, _, err) = run_cli(&["export", "gguf", "--model", s(&model), "--out", s(&src)], None);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&src).unwrap();
    // (what, offset, width, must fail)
    let mut fields: Vec<(String, usize, usize, bool)> = vec![("tensor count".into(), 8, 8, true), ("kv count".into(), 16, 8, true)];
    {
        let g = parse(&bytes).unwrap();
        for kv in &g.metadata {
            let mut key = (kv.key.len() as u64).to_le_bytes().to_vec();
            key.extend_from_slice(kv.key.as_bytes());
            let at = find(&bytes, &key) + key.len() + 4;
            match &kv.value {
                GgufValue::U32(_) | GgufValue::I32(_) => fields.push((kv.key.to_string(), at, 4, false)),
                GgufValue::U64(_) | GgufValue::I64(_) => fields.push((kv.key.to_string(), at, 8, false)),
                GgufValue::String(_) => fields.push((format!("{} length", kv.key), at, 8, true)),
                GgufValue::Array(a) => {
                    fields.push((format!("{} element type", kv.key), at, 4, true));
                    fields.push((format!("{} length", kv.key), at + 4, 8, true));
                    if let GgufArray::String(_) = a {
                        fields.push((format!("{} first string length", kv.key), at + 12, 8, true));
                    }
                }
                _ => {}
            }
        }
        for t in g.tensors.iter().take(3).chain(g.tensors.last()) {
            let mut name = (t.name.len() as u64).to_le_bytes().to_vec();
            name.extend_from_slice(t.name.as_bytes());
            let at = find(&bytes, &name) + name.len();
            fields.push((format!("{} n_dims", t.name), at, 4, true));
            for d in 0..t.dims.len() {
                fields.push((format!("{} dim {d}", t.name), at + 4 + 8 * d, 8, true));
            }
            let after = at + 4 + 8 * t.dims.len();
            fields.push((format!("{} type", t.name), after, 4, true));
            fields.push((format!("{} offset", t.name), after + 4, 8, true));
        }
    }
    let bad = dir.path().join("bad.gguf");
    for (what, at, width, must_fail) in fields {
        let mut b = bytes.clone();
        b[at..at + width].fill(0xff);
        std::fs::write(&bad, &b).unwrap();
        let out = dir.path().join("out");
        let r = run_bounded(&["import", "gguf", s(&bad), "--out", s(&out)]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.code().is_some(), "{what} = max: killed ({:?}): {err}", r.status);
        assert!(!err.contains("panicked"), "{what} = max: {err}");
        if must_fail {
            assert!(!r.status.success(), "{what} = max was imported");
            assert!(!out.exists(), "{what}: a failed import left {}", out.display());
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
/// Puts `key = value` into `section` of `recipe` (a `[[stage]]` block is appended for stage keys).
fn with_key(recipe: &str, section: &str, key: &str, value: &str) -> String {
    if section == "[[stage]]" {
        let steps = if key == "steps" { String::new() } else { "steps = 1\n".into() };
        return format!("{recipe}[[stage]]\n{steps}{key} = {value}\n");
    }
    recipe.replacen(&format!("{section}\n"), &format!("{section}\n{key} = {value}\n"), 1)
}
/// Every numeric recipe key, set in turn to NaN, ±inf, 0 and a negative value: a clean error
/// naming the key, unless the value is legal for it (only 0, for the keys listed as such), and
/// never an output folder.
#[test]
fn every_numeric_recipe_key_rejects_non_finite_and_out_of_range() {
    use linly_lora::train::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let base = base_recipe(dir.path());
    Recipe::parse(&base, dir.path()).expect("the base recipe loads");
    // (section, key, is 0 legal)
    let keys = [
        ("[vocab]", "seed", true),
        ("[vocab]", "init_std", true),
        ("[vocab]", "init_tokens", false),
        ("[[data]]", "self_distill", true),
        ("[[data]]", "chain_distill", true),
        ("[[data]]", "hidden_distill", true),
        ("[[data]]", "weight", true),
        ("[[data]]", "limit", false),
        ("[lora]", "r", false),
        ("[lora]", "alpha", false),
        ("[lora]", "dropout", true),
        ("[mix]", "bins", true),
        ("[train]", "seq_len", false),
        ("[train]", "batch_size", false),
        ("[train]", "grad_accum", false),
        ("[train]", "steps", false),
        ("[train]", "lr", false),
        ("[train]", "embed_lr", true),
        ("[train]", "warmup_ratio", true),
        ("[train]", "weight_decay", true),
        ("[train]", "max_grad_norm", true),
        ("[train]", "seed", true),
        ("[train]", "hidden_distill_layer", false),
        ("[precision]", "init_scale", false),
        ("[precision]", "growth_interval", false),
        ("[precision]", "hysteresis", true),
        ("[precision]", "min_scale", true),
        ("[output]", "save_every", false),
        ("[output]", "keep_last", false),
        ("[output]", "eval_every", true),
        ("[[stage]]", "steps", false),
        ("[[stage]]", "lr", false),
        ("[[stage]]", "embed_lr", true),
    ];
    for (section, key, zero_ok) in keys {
        for value in ["nan", "inf", "-inf", "0", "-1", "-0.5"] {
            let text = with_key(&base, section, key, value);
            let r = Recipe::parse(&text, dir.path());
            if value == "0" && zero_ok {
                assert!(r.is_ok(), "{section} {key} = 0 should be accepted: {:#}", r.unwrap_err());
                continue;
            }
            let e = format!("{:#}", r.expect_err(&format!("{section} {key} = {value} was accepted")));
            assert!(e.contains(&format!("{key} =")), "{section} {key} = {value}: error does not name the key: {e}");
        }
    }
    // Through the CLI: the error comes before the [output] folder is created.
    let rp = dir.path().join("recipe.toml");
    std::fs::write(&rp, with_key(&base, "[train]", "lr", "nan")).unwrap();
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("[train] lr = NaN") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("out").exists());
}
/// The numeric keys of config.json, set to what Python's json.dump writes for NaN and ±inf, to
/// 0, negatives and absurd sizes: an error naming the key.
#[test]
fn every_numeric_config_key_rejects_non_finite_and_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny().join("base/config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    const WHOLE: &[&str] = &["NaN", "Infinity", "0", "-1", "1.5", "1000000000000", "18446744073709551615"];
    let cases: [(&str, &[&str]); 11] = [
        ("rms_norm_eps", &["NaN", "Infinity", "-Infinity", "0", "-1e-6", "1e999", "2"]),
        ("rope_theta", &["NaN", "Infinity", "-Infinity", "0", "-10000", "1e999"]),
        ("initializer_range", &["NaN", "Infinity", "-Infinity", "-0.02", "1e999"]),
        ("max_position_embeddings", WHOLE),
        ("hidden_size", WHOLE),
        ("intermediate_size", WHOLE),
        ("num_hidden_layers", WHOLE),
        ("num_attention_heads", WHOLE),
        ("num_key_value_heads", WHOLE),
        ("head_dim", WHOLE),
        ("vocab_size", WHOLE),
    ];
    for (key, values) in cases {
        for value in values {
            let mut c = cfg.clone();
            c[key] = serde_json::json!("PLACEHOLDER");
            let raw = serde_json::to_string_pretty(&c).unwrap().replace("\"PLACEHOLDER\"", value);
            std::fs::write(dir.path().join("config.json"), raw).unwrap();
            let e = match linly_lora::config::LlamaConfig::load(dir.path()) {
                Ok(_) => panic!("config.json {key} = {value} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(key), "{key} = {value}: error does not name the key: {e}");
        }
    }
}
/// Sampling and window flags: NaN, ±inf, 0 and negatives are refused by the parser, naming the flag.
#[test]
fn sampling_flags_reject_non_finite_and_out_of_range() {
    let base = tiny().join("base");
    let gen = |flag: &str, v: &str| run_cli(&["generate", "--model", s(&base), "--prompt-ids", "1,2", "--max-new-tokens", "2", &format!("{flag}={v}")], None);
    for flag in ["--temperature", "--top-p", "--repetition-penalty"] {
        for v in ["NaN", "inf", "-inf", "0", "-1"] {
            let (ok, _, err) = gen(flag, v);
            assert!(!ok && err.contains(flag) && !err.contains("panicked"), "{flag} {v}: {err}");
        }
    }
    let (ok, _, err) = gen("--top-p", "1.5");
    assert!(!ok && err.contains("--top-p"), "{err}");
    for v in ["0", "1", "-1"] {
        let (ok, _, err) = run_cli(&["eval", "--model", s(&base), "--ids", s(&tiny().join("expected.safetensors")), &format!("--window={v}")], None);
        assert!(!ok && err.contains("--window") && !err.contains("panicked"), "--window {v}: {err}");
    }
    let (ok, _, err) = run_cli(&["serve", "--model", s(&base), "--default-max-tokens", "0"], None);
    assert!(!ok && err.contains("--default-max-tokens"), "{err}");
    // Legal values still work.
    let (ok, _, err) = gen("--temperature", "0.7");
    assert!(ok, "{err}");
}
/// A copy of the fixture adapter with its config edited and its tensors rewritten: `edit` gets
/// (name, dtype, shape, bytes) and returns the tensor to write.
fn adapter_variant(dir: &Path, cfg_edit: impl FnOnce(&mut serde_json::Value), edit: impl Fn(&str, String, Vec<usize>, Vec<u8>) -> (String, Vec<usize>, Vec<u8>)) -> PathBuf {
    use linly_lora::io::safetensors::SafetensorsFile;
    let out = dir.join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    let src = tiny().join("adapter");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg_edit(&mut cfg);
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
    let f = SafetensorsFile::open(&src.join("adapter_model.safetensors")).unwrap();
    let tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = f
        .names()
        .into_iter()
        .map(|n| {
            let r = f.require(&n).unwrap();
            let (dtype, shape, bytes) = edit(&n, format!("{:?}", r.dtype), r.shape.to_vec(), r.bytes.to_vec());
            (n.clone(), dtype, shape, bytes)
        })
        .collect();
    linly_lora::io::safetensors::write_all(&out.join("adapter_model.safetensors"), &tensors, None).unwrap();
    out
}
/// Adapters whose config disagrees with their tensors, or whose table would shrink the base's
/// vocabulary: `merge` and applying at load time both refuse, naming the file and what differs.
#[test]
fn adapters_that_disagree_with_their_config_are_refused() {
    let same = |_: &str, d: String, s: Vec<usize>, b: Vec<u8>| (d, s, b);
    type Case = (&'static str, Box<dyn Fn(&mut serde_json::Value)>, &'static str);
    let cases: Vec<Case> = vec![
        ("target_modules", Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj"])), "not in target_modules"),
        ("r", Box::new(|c| c["r"] = serde_json::json!(4)), "r = 4"),
        ("rank_pattern", Box::new(|c| c["rank_pattern"] = serde_json::json!({"q_proj": 2})), "rank_pattern gives 2"),
        ("layers_to_transform", Box::new(|c| c["layers_to_transform"] = serde_json::json!([0])), "layers_to_transform"),
        // A string is PEFT's regex, matched against the whole module name.
        ("target_modules regex", Box::new(|c| c["target_modules"] = serde_json::json!(r"model\.layers\.\d+\.self_attn\.(q|v)_proj")), "does not match target_modules"),
        ("target_modules regex, not anchored", Box::new(|c| c["target_modules"] = serde_json::json!("q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")), "does not match target_modules"),
        ("target_modules regex, invalid", Box::new(|c| c["target_modules"] = serde_json::json!("(q_proj")), "not a valid regex"),
        ("rank_pattern 0", Box::new(|c| c["rank_pattern"] = serde_json::json!({"q_proj": 0})), "rank_pattern.q_proj = 0"),
    ];
    let base = tiny().join("merged"); // 384 rows, as the adapter's tables
    for (what, cfg_edit, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter_variant(dir.path(), cfg_edit, same);
        let out = dir.path().join("out");
        let (ok, _, err) = run_cli(&["merge", "--base", s(&base), "--adapter", s(&a), "--out", s(&out)], None);
        assert!(!ok && err.contains(want) && err.contains("adapter_config.json"), "{what}: {err}");
        assert!(!out.exists());
        let (ok, _, err) = run_cli(&["eval", "--model", s(&base), "--adapter", s(&a), "--ids", s(&tiny().join("expected.safetensors"))], None);
        assert!(!ok && err.contains(want), "{what} (eval): {err}");
    }
    // Regexes that match every module the tensors have, and PEFT's "all-linear", load.
    for targets in [r".*\.(q|k|v|o|gate|up|down)_proj", r"model\.layers\.(?!9)\d+\.(self_attn|mlp)\.\w+", "all-linear"] {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter_variant(dir.path(), |c| c["target_modules"] = serde_json::json!(targets), same);
        let out = dir.path().join("out");
        let (ok, _, err) = run_cli(&["merge", "--base", s(&base), "--adapter", s(&a), "--out", s(&out)], None);
        assert!(ok, "target_modules = {targets:?}: {err}");
    }
    // Fewer table rows than the base: would silently drop the base's last tokens.
    let dir = tempfile::tempdir().unwrap();
    let a = adapter_variant(dir.path(), |_| {}, |n, d, mut shape, mut b| {
        if n.ends_with("embed_tokens.weight") || n.ends_with("lm_head.weight") {
            shape[0] = 300;
            b.truncate(300 * shape[1] * 4);
        }
        (d, shape, b)
    });
    let out = dir.path().join("out");
    let (ok, _, err) = run_cli(&["merge", "--base", s(&base), "--adapter", s(&a), "--out", s(&out)], None);
    assert!(!ok && err.contains("300 rows") && err.contains("384"), "{err}");
    assert!(!out.exists());
    // Integer LoRA weights: the error names the file and the tensor.
    let dir = tempfile::tempdir().unwrap();
    let a = adapter_variant(dir.path(), |_| {}, |n, d, s, b| if n.ends_with("layers.0.self_attn.q_proj.lora_A.weight") { ("I32".into(), s, b) } else { (d, s, b) });
    let (ok, _, err) = run_cli(&["merge", "--base", s(&base), "--adapter", s(&a), "--out", s(&dir.path().join("out"))], None);
    assert!(!ok && err.contains("adapter_model.safetensors") && err.contains("layers.0.self_attn.q_proj.lora_A.weight") && err.contains("I32"), "{err}");
}
/// `vocab resize` with an extension made from another tokenizer of the same size is refused.
#[test]
fn resize_refuses_an_extension_from_another_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixture("llama2-tokenizer");
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "你好\n世界\n中国\n").unwrap();
    // The model's tokenizer: llama2's with two ids swapped (same size, other text per id).
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tok.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = j["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["▁the"].clone(), vocab["▁a"].clone());
    vocab.insert("▁the".into(), b);
    vocab.insert("▁a".into(), a);
    let other = dir.path().join("other-tok");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("tokenizer.json"), j.to_string()).unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    random_model(&model, 32000, Some(&other));
    let ext = dir.path().join("ext");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&tok), "--add", s(&words), "--out", s(&ext)], None);
    assert!(ok, "{err}");
    let out = dir.path().join("resized");
    let (ok, _, err) = run_cli(&["vocab", "resize", "--model", s(&model), "--extension", s(&ext.join("vocab_extension.json")), "--out", s(&out)], None);
    assert!(!ok && err.contains("another tokenizer"), "{err}");
    assert!(!out.exists());
    // The extension made from the model's own tokenizer resizes.
    let ext2 = dir.path().join("ext2");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&other), "--add", s(&words), "--out", s(&ext2)], None);
    assert!(ok, "{err}");
    let (ok, _, err) = run_cli(&["vocab", "resize", "--model", s(&model), "--extension", s(&ext2.join("vocab_extension.json")), "--out", s(&out)], None);
    assert!(ok, "{err}");
}
#[test]
fn empty_word_list_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "\n\n").unwrap();
    let out = dir.path().join("ext");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&fixture("llama2-tokenizer")), "--add", s(&words), "--out", s(&out)], None);
    assert!(!ok && err.contains("nothing to add") && err.contains("words.txt"), "{err}");
    assert!(!out.exists());
}
/// In fp32 a non-finite loss is an error at once, not a skipped step that trains nothing. The
/// weights are finite (NaN weights are refused at load) but overflow: the final norm's gain
/// is f32::MAX, so the logits are ±inf.
#[test]
fn non_finite_fp32_loss_is_an_error() {
    use linly_lora::io::safetensors::FloatType;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(tiny().join("base/config.json"), model.join("config.json")).unwrap();
    rewrite_safetensors(&tiny().join("base/model.safetensors"), &model.join("model.safetensors"), |n, shape, mut v| {
        if n == "model.norm.weight" {
            v.fill(f32::MAX);
        }
        Some((n.to_string(), FloatType::F32, shape, v))
    });
    let recipe = format!(
        r#"[model]
path = "{model}"
[lora]
r = 2
[[data]]
kind = "tokenized"
path = "{ids}"
[train]
seq_len = 16
batch_size = 1
steps = 2
[output]
dir = "out"
plots = false
"#,
        model = s(&model),
        ids = s(&dir.path().join("ids.jsonl"))
    );
    let lines: Vec<String> = (0..4).map(|k| serde_json::json!({ "input_ids": (1..20).map(|i| i * 7 + k).collect::<Vec<u32>>() }).to_string()).collect();
    std::fs::write(dir.path().join("ids.jsonl"), lines.join("\n")).unwrap();
    let rp = dir.path().join("recipe.toml");
    std::fs::write(&rp, recipe).unwrap();
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("step 1") && err.contains("NaN") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("out/adapter").exists() && !dir.path().join("out/checkpoints/step-00000001").exists());
}
/// Trainable-token indices that would grow the table by an index's word (one near usize::MAX,
/// or a gap beyond the table): a clean error from `merge` and at load time, in bounded memory.
#[test]
fn trainable_token_indices_beyond_the_table_are_refused() {
    use linly_lora::io::safetensors::SafetensorsFile;
    let base = tiny().join("merged"); // 384 rows of 64
    let src = tiny().join("adapter");
    let f = SafetensorsFile::open(&src.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = f
        .names()
        .into_iter()
        .filter(|n| n.contains(".lora_"))
        .map(|n| {
            let r = f.require(&n).unwrap();
            (n.clone(), format!("{:?}", r.dtype), r.shape.to_vec(), r.bytes.to_vec())
        })
        .collect();
    for t in ["model.embed_tokens", "lm_head"] {
        tensors.push((format!("base_model.model.{t}.token_adapter.trainable_tokens_delta"), "F32".into(), vec![2, 64], vec![0u8; 2 * 64 * 4]));
    }
    let cases = [(serde_json::json!([384, 385]), true), (serde_json::json!([384, u64::MAX]), false), (serde_json::json!([384, 386]), false), (serde_json::json!([u64::MAX - 1, u64::MAX]), false)];
    for (indices, good) in cases {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("adapter");
        std::fs::create_dir(&a).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        cfg["modules_to_save"] = serde_json::Value::Null;
        cfg["trainable_token_indices"] = indices.clone();
        std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
        linly_lora::io::safetensors::write_all(&a.join("adapter_model.safetensors"), &tensors, None).unwrap();
        let out = dir.path().join("out");
        let ids = tiny().join("expected.safetensors");
        for cmd in [["merge", "--base", s(&base), "--adapter", s(&a), "--out", s(&out)], ["eval", "--model", s(&base), "--adapter", s(&a), "--ids", s(&ids)]] {
            let r = run_bounded(&cmd);
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(r.status.code().is_some() && !err.contains("panicked"), "{indices} {}: {:?}: {err}", cmd[0], r.status);
            if good {
                assert!(r.status.success(), "{indices} {}: {err}", cmd[0]);
            } else {
                assert!(!r.status.success() && err.contains("trainable token indices go up to"), "{indices} {}: {err}", cmd[0]);
            }
        }
        assert_eq!(out.exists(), good);
    }
}
/// Recipe sizes that are allocated (tokens per micro-batch, micro-batches per step, mixing bins)
/// and step counts that would overflow: an error naming the key, before any output exists.
#[test]
fn recipe_sizes_are_bounded() {
    use linly_lora::train::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let base = base_recipe(dir.path());
    let huge = "9223372036854775807";
    let cases = [
        (with_key(&base, "[train]", "seq_len", huge), "[train] seq_len ="),
        (with_key(&base, "[train]", "batch_size", huge), "[train] batch_size ="),
        (with_key(&base, "[train]", "grad_accum", huge), "[train] grad_accum ="),
        (with_key(&base, "[mix]", "bins", huge), "[mix] bins ="),
        (with_key(&with_key(&base, "[train]", "seq_len", "1048576"), "[train]", "batch_size", "64"), "batch_size × seq_len"),
        (format!("{base}[[stage]]\nsteps = {huge}\n[[stage]]\nsteps = {huge}\n[[stage]]\nsteps = {huge}\n"), "[[stage]] steps add up"),
    ];
    for (text, want) in cases {
        let e = format!("{:#}", Recipe::parse(&text, dir.path()).expect_err(want));
        assert!(e.contains(want), "{want}: {e}");
    }
    // The largest values allowed still load.
    let text = with_key(&with_key(&with_key(&base, "[train]", "seq_len", "1048576"), "[train]", "batch_size", "16"), "[train]", "grad_accum", "65536");
    Recipe::parse(&text, dir.path()).expect("the bounds themselves are legal");
    let rp = dir.path().join("recipe.toml");
    std::fs::write(&rp, with_key(&base, "[train]", "grad_accum", huge)).unwrap();
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("grad_accum") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("out").exists());
}
/// NaN or ±inf inside weights or adapter tensors, in each float storage type: every command
/// that reads them refuses, naming the file and the tensor, and writes nothing.
#[test]
fn non_finite_weights_and_adapter_tensors_are_refused() {
    use linly_lora::io::safetensors::FloatType;
    let dir = tempfile::tempdir().unwrap();
    let ids = tiny().join("expected.safetensors");
    let ext = tiny().join("vocab_extension.json");
    let adapter = tiny().join("adapter");
    for (k, (bad, ty)) in [(f32::NAN, FloatType::F32), (f32::INFINITY, FloatType::F16), (f32::NEG_INFINITY, FloatType::BF16)].into_iter().enumerate() {
        let model = dir.path().join(format!("model{k}"));
        std::fs::create_dir(&model).unwrap();
        std::fs::copy(tiny().join("base/config.json"), model.join("config.json")).unwrap();
        rewrite_safetensors(&tiny().join("base/model.safetensors"), &model.join("model.safetensors"), |n, shape, mut v| {
            if n == "model.layers.1.mlp.up_proj.weight" {
                v[7] = bad;
            }
            Some((n.to_string(), ty, shape, v))
        });
        let out = dir.path().join("out");
        let cmds: Vec<Vec<&str>> = vec![
            vec!["eval", "--model", s(&model), "--ids", s(&ids)],
            vec!["generate", "--model", s(&model), "--prompt-ids", "1,2", "--max-new-tokens", "2"],
            vec!["merge", "--base", s(&model), "--adapter", s(&adapter), "--out", s(&out)],
            vec!["export", "gguf", "--model", s(&model), "--out", s(&out)],
            vec!["quantize", "--model", s(&model), "--format", "q8_0", "--out", s(&out)],
            vec!["vocab", "resize", "--model", s(&model), "--extension", s(&ext), "--out", s(&out)],
        ];
        for cmd in cmds {
            let (ok, _, err) = run_cli(&cmd, None);
            assert!(!ok && err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("NaN or ±inf") && !err.contains("panicked"), "{ty} {bad} {cmd:?}: {err}");
            assert!(!out.exists(), "{cmd:?} wrote {}", out.display());
        }
    }
    // An adapter with one non-finite value in a LoRA B.
    let bad_b = |n: &str, d: String, s: Vec<usize>, mut b: Vec<u8>| {
        if n.ends_with("layers.0.mlp.down_proj.lora_B.weight") {
            b[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
        }
        (d, s, b)
    };
    let a = adapter_variant(dir.path(), |_| {}, bad_b);
    let out = dir.path().join("out");
    for cmd in [vec!["merge", "--base", s(&tiny().join("merged")), "--adapter", s(&a), "--out", s(&out)], vec!["eval", "--model", s(&tiny().join("merged")), "--adapter", s(&a), "--ids", s(&ids)]] {
        let (ok, _, err) = run_cli(&cmd, None);
        assert!(!ok && err.contains("adapter_model.safetensors") && err.contains("layers.0.mlp.down_proj.lora_B.weight") && err.contains("NaN or ±inf"), "{cmd:?}: {err}");
        assert!(!out.exists());
    }
}

/// `[vocab] init = "fit"` is a run of its own (`vocab resize --init fit`); a recipe that names
/// it is refused with the command to run instead of training from sub-token means unawares.
#[test]
fn a_recipe_cannot_name_the_fit_init() {
    use linly_lora::train::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let text = base_recipe(dir.path()).replace("[vocab]\n", "[vocab]\ninit = \"fit\"\n");
    let e = format!("{:#}", Recipe::parse(&text, dir.path()).expect_err("init = fit in a recipe"));
    assert!(e.contains("vocab resize --init fit"), "{e}");
}

/// `chain_distill` distils the base's probabilities of the new pieces, read by the model with
/// LoRA off: a recipe without `[vocab]`, or with a table whose old rows train (in any stage),
/// would distil from something other than the base, and is refused before any output exists.
#[test]
fn chain_distill_needs_an_extension_and_fixed_old_rows_in_every_stage() {
    use linly_lora::train::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let base = base_recipe(dir.path()).replace("path = \"zh.txt\"\n", "path = \"zh.txt\"\nchain_distill = 1.0\n");
    let ok = base.replace("[lora]\n", "[trainable]\nembed_tokens = \"new_rows\"\nlm_head = \"frozen\"\n[lora]\n");
    Recipe::parse(&ok, dir.path()).expect("new_rows / frozen tables are fine");
    let cases = [
        ("no [vocab]", ok.replace("[vocab]\n", "").replace(&format!("extension = \"{}\"\n", tiny().join("vocab_extension.json").display()), ""), "needs a [vocab] extension"),
        ("tables train whole (the default)", base.clone(), "new_rows"),
        ("a stage trains the whole head", format!("{ok}[[stage]]\nsteps = 1\n[stage.trainable]\nembed_tokens = \"new_rows\"\nlm_head = \"all\"\n"), "every [[stage]]"),
    ];
    for (what, text, want) in cases {
        let e = format!("{:#}", Recipe::parse(&text, dir.path()).expect_err(what));
        assert!(e.contains("chain_distill") && e.contains(want), "{what}: {e}");
    }
    // The hidden-state term reads the chain's teacher pass: on a block without it, refused.
    Recipe::parse(&ok.replace("chain_distill = 1.0\n", "chain_distill = 1.0\nhidden_distill = 1.0\n"), dir.path()).expect("hidden_distill beside chain_distill");
    let e = format!("{:#}", Recipe::parse(&ok.replace("chain_distill = 1.0\n", "hidden_distill = 1.0\n"), dir.path()).expect_err("hidden_distill alone"));
    assert!(e.contains("hidden_distill") && e.contains("set chain_distill"), "{e}");
    assert!(!dir.path().join("out").exists());
    // A layer the model does not have (the fixture has 2): refused from its config.json,
    // before any output exists.
    let rp = dir.path().join("hidden.toml");
    let text = ok.replace("chain_distill = 1.0\n", "chain_distill = 1.0\nhidden_distill = 1.0\n").replace("[train]\n", "[train]\nhidden_distill_layer = 3\n");
    std::fs::write(&rp, text).unwrap();
    let (ran, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ran && err.contains("hidden_distill_layer = 3") && err.contains("2 layers") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("out").exists());
}

/// `[train] row_map_rank` moves the new rows through their spelling in the base vocabulary: a
/// recipe without `[vocab]`, or one where no table trains its new rows, is refused by name
/// before anything runs.
#[test]
fn row_map_needs_an_extension_and_trained_new_rows() {
    use linly_lora::train::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    let base = base_recipe(dir.path()).replace("[train]\n", "[train]\nrow_map_rank = 4\n");
    let ok = base.replace("[lora]\n", "[trainable]\nembed_tokens = \"new_rows\"\nlm_head = \"new_rows\"\n[lora]\n");
    Recipe::parse(&ok, dir.path()).expect("new rows that train");
    let cases = [
        ("no [vocab]", ok.replace("[vocab]\n", "").replace(&format!("extension = \"{}\"\n", tiny().join("vocab_extension.json").display()), ""), "[vocab] extension"),
        ("tables train whole (the default)", base.clone(), "\"new_rows\""),
        ("tables frozen", base.replace("[lora]\n", "[trainable]\nembed_tokens = \"frozen\"\nlm_head = \"frozen\"\n[lora]\n"), "\"new_rows\""),
    ];
    for (what, text, want) in cases {
        let e = format!("{:#}", Recipe::parse(&text, dir.path()).expect_err(what));
        assert!(e.contains("row_map_rank = 4") && e.contains(want), "{what}: {e}");
    }
    // A rank above the model's hidden size: refused from its config.json, before any output.
    let rp = dir.path().join("wide.toml");
    std::fs::write(&rp, ok.replace("row_map_rank = 4", "row_map_rank = 100000")).unwrap();
    let (ran, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ran && err.contains("row_map_rank = 100000") && err.contains("hidden size") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("out").exists());
}

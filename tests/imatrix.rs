//! Importance matrices (`linly-lora imatrix`, `quantize --imatrix`): collection through the one
//! model gives the column means of x² computed independently from the weights, quantizing with
//! one weights the error as intended and still runs, and a wrong file is refused by name. GPTQ
//! (`quantize --gptq`) lowers the calibration output error of the weights it is used for and
//! leaves every other tensor as importance-weighted rounding makes it.

mod common;
use common::*;
use linly_lora::infer::{load, ModelSpec};
use linly_lora::io::gguf::{dequantize, gguf_to_hf_name, unpermute_qk_rows, GgufMmap};
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::WeightStore;
use linly_lora::model::Llama;
use linly_lora::quant::imatrix::{collect, collect_with_hessians, Imatrix};
use linly_lora::quant::{store, QType};
use std::collections::HashMap;

/// The tiny fixture's imatrix over its reference ids (two rows, run one after the other).
fn tiny_imatrix() -> Imatrix {
    let mut loaded = load(&ModelSpec::new(tiny().join("base"))).unwrap();
    let ids: Vec<u32> = Expected::load().ids("input_ids").concat();
    collect(&mut loaded, &ids, 1 << 20).unwrap()
}

#[test]
fn collection_matches_column_means_computed_from_the_weights() {
    let ids: Vec<u32> = Expected::load().ids("input_ids").concat();
    let m = tiny_imatrix();
    assert_eq!(m.tokens, ids.len() as u64);
    assert_eq!(m.columns.len(), 2 * 7, "seven projections in each of two layers");
    // Layer 0's q/k/v input is RMSNorm(embedding rows) · input_layernorm, computed here on the
    // host from the stored weights (eps from config.json: 1e-6).
    let w = WeightStore::open(&tiny().join("base")).unwrap();
    let (emb, shape) = w.f32("model.embed_tokens.weight").unwrap();
    let (g, _) = w.f32("model.layers.0.input_layernorm.weight").unwrap();
    let h = shape[1];
    let mut want = vec![0f64; h];
    for &id in &ids {
        let row = &emb[id as usize * h..(id as usize + 1) * h];
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
        let r = 1.0 / (ms + 1e-6).sqrt();
        for j in 0..h {
            want[j] += (row[j] as f64 * r * g[j] as f64).powi(2);
        }
    }
    let want: Vec<f32> = want.iter().map(|s| (s / ids.len() as f64) as f32).collect();
    let q = &m.columns["model.layers.0.self_attn.q_proj.weight"];
    assert!(rel_err(q, &want) < 1e-5, "q_proj: {:?} vs {:?}", &q[..4], &want[..4]);
    // k and v read the same normed input; gate and up read the same one too.
    assert_eq!(q, &m.columns["model.layers.0.self_attn.k_proj.weight"]);
    assert_eq!(q, &m.columns["model.layers.0.self_attn.v_proj.weight"]);
    assert_eq!(m.columns["model.layers.1.mlp.gate_proj.weight"], m.columns["model.layers.1.mlp.up_proj.weight"]);
    // down_proj sees the SwiGLU product: one value per intermediate column.
    assert_eq!(m.columns["model.layers.1.mlp.down_proj.weight"].len(), 176);
    assert_ne!(m.columns["model.layers.0.mlp.gate_proj.weight"], m.columns["model.layers.0.self_attn.q_proj.weight"]);
    // The taps are gone afterwards: the same model runs unchanged (collection is read-only).
    let mut loaded = load(&ModelSpec::new(tiny().join("base"))).unwrap();
    let before = logits_of(&loaded.model, std::slice::from_ref(&ids));
    collect(&mut loaded, &ids, 7).unwrap();
    assert!(loaded.model.layers.iter().all(|l| l.projections().iter().all(|(_, p)| p.tap.is_none())));
    assert_eq!(logits_of(&loaded.model, std::slice::from_ref(&ids)), before);
    // Windows are independent passes, as llama-imatrix's chunks: a different window gives
    // different attention outputs (o_proj) but the same first-layer q input.
    let mut loaded = load(&ModelSpec::new(tiny().join("base"))).unwrap();
    let m7 = collect(&mut loaded, &ids, 7).unwrap();
    assert!(rel_err(&m7.columns["model.layers.0.self_attn.q_proj.weight"], &want) < 1e-5);
    assert_ne!(m7.columns["model.layers.0.self_attn.o_proj.weight"], m.columns["model.layers.0.self_attn.o_proj.weight"]);
}

/// Σ_rows Σ_j imp_j·(w − ŵ)² of every Q4_0 tensor in a quantized folder, against the f32 source.
fn weighted_errors(dir: &std::path::Path, m: &Imatrix) -> HashMap<String, f64> {
    let src = WeightStore::open(&tiny().join("base")).unwrap();
    let map = GgufMmap::open(&dir.join(store::MODEL_FILE)).unwrap();
    let g = map.parse().unwrap();
    let mut out = HashMap::new();
    for t in g.tensors.iter().filter(|t| t.ggml_type.name() == "Q4_0") {
        let name = gguf_to_hf_name(t.name).unwrap();
        if name.layer.is_none() {
            continue; // the untied token table is Q4_0 too, and has no importance
        }
        let (w, shape) = src.f32(&name.hf_name).unwrap();
        let mut y = dequantize(t.ggml_type, t.data, w.len()).unwrap();
        // Q and K rows are in llama.cpp's order in the GGUF (fixture: 4 heads, 2 KV heads).
        match name.kind {
            "attn_q" => y = unpermute_qk_rows(&y, shape[0], shape[1], 4).unwrap(),
            "attn_k" => y = unpermute_qk_rows(&y, shape[0], shape[1], 2).unwrap(),
            _ => {}
        }
        let imp = &m.columns[&name.hf_name];
        let e = w.chunks(shape[1]).zip(y.chunks(shape[1])).map(|(a, b)| a.iter().zip(b).zip(imp).map(|((a, b), i)| *i as f64 * ((a - b) as f64).powi(2)).sum::<f64>()).sum();
        out.insert(name.hf_name, e);
    }
    out
}

#[test]
fn quantize_with_imatrix_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = tiny_imatrix();
    let file = tmp.path().join("tiny.imatrix");
    m.save(&file).unwrap();
    let m = Imatrix::load(&file).unwrap();
    let base = tiny().join("base");
    let (plain, with) = (tmp.path().join("plain"), tmp.path().join("with"));
    store::quantize_model(&base, &plain, QType::Q4_0, false, false).unwrap();
    store::quantize_model_imatrix(&base, &with, QType::Q4_0, false, false, Some(&m), None).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(with.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["linly_quantization"]["imatrix"]["tokens"], m.tokens);
    // The importance changes the rounding of the Q4_0 layer weights and leaves the rest (the
    // f16 down_proj, the norms, the Q6_K/Q8_0 table) byte for byte.
    let (a, b) = (GgufMmap::open(&plain.join(store::MODEL_FILE)).unwrap(), GgufMmap::open(&with.join(store::MODEL_FILE)).unwrap());
    let (ga, gb) = (a.parse().unwrap(), b.parse().unwrap());
    let mut changed = 0;
    for (ta, tb) in ga.tensors.iter().zip(&gb.tensors) {
        assert_eq!((ta.name, ta.ggml_type), (tb.name, tb.ggml_type));
        if ta.data != tb.data {
            assert_eq!(ta.ggml_type.name(), "Q4_0", "{} changed", ta.name);
            changed += 1;
        }
    }
    assert!(changed >= 10, "only {changed} Q4_0 tensors changed");
    // What the importance is for: the importance-weighted squared error of the Q4_0 weights is
    // lower in total than the unit-importance search's.
    let (ea, eb) = (weighted_errors(&plain, &m), weighted_errors(&with, &m));
    let (sa, sb): (f64, f64) = (ea.values().sum(), eb.values().sum());
    eprintln!("importance-weighted error: unit {sa:.5}, imatrix {sb:.5}");
    // Measured on the fixture (19 tokens, random init): 0.1621 against 0.1631.
    assert!(sb < sa, "imatrix {sb} vs unit {sa}");
    // And the model runs close to f32.
    let ids = Expected::load().ids("input_ids");
    let want = logits_of(&Llama::load(&base, &cpu(), FloatType::F32).unwrap(), &ids);
    let got = logits_of(&Llama::load(&with, &cpu(), FloatType::F32).unwrap(), &ids);
    assert!(rel_err(&got, &want) < 0.2, "{}", rel_err(&got, &want));
}

#[test]
fn imatrix_cli_and_its_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    random_model(&model, 32000, Some(&fixture("llama2-tokenizer")));
    let text = tmp.path().join("calib.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. 我们在北京学习汉语。".repeat(8)).unwrap();
    let im = tmp.path().join("m.imatrix");
    let (ok, stdout, stderr) = run_cli(&["imatrix", "--model", &s(&model), "--text", &s(&text), "--window", "32", "--max-tokens", "100", "--out", &s(&im)], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("14 tensors, 100 tokens in 4 windows"), "{stdout}");
    let q = tmp.path().join("q");
    let (ok, stdout, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--imatrix", &s(&im), "--out", &s(&q)], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Q4_0"), "{stdout}");
    // From a quantized folder: refused, pointing at the original.
    let (ok, _, stderr) = run_cli(&["imatrix", "--model", &s(&q), "--text", &s(&text), "--out", &s(&tmp.path().join("x"))], None);
    assert!(!ok && stderr.contains("already quantized"), "{stderr}");
    // A file without one tensor, and one with a wrong width: refused naming the tensor and the fix,
    // before anything is written.
    let mut m = Imatrix::load(&im).unwrap();
    m.columns.remove("model.layers.1.mlp.down_proj.weight");
    let missing = tmp.path().join("missing.imatrix");
    m.save(&missing).unwrap();
    let out = tmp.path().join("q2");
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--imatrix", &s(&missing), "--out", &s(&out)], None);
    assert!(!ok && stderr.contains("model.layers.1.mlp.down_proj.weight") && stderr.contains("linly-lora imatrix"), "{stderr}");
    assert!(!out.exists());
    m.columns.insert("model.layers.1.mlp.down_proj.weight".into(), vec![1.0; 32]);
    let wide = tmp.path().join("wide.imatrix");
    m.save(&wide).unwrap();
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--imatrix", &s(&wide), "--out", &s(&out)], None);
    assert!(!ok && stderr.contains("32 columns but the weight has 64"), "{stderr}");
    // Not an importance matrix at all.
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--imatrix", &s(&model.join("model.safetensors")), "--out", &s(&out)], None);
    assert!(!ok && stderr.contains("not an importance matrix"), "{stderr}");
    // q8_0 has no importance path: the option would change nothing, so it is refused rather
    // than silently ignored, and nothing is written.
    let q8 = tmp.path().join("q8");
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q8_0", "--imatrix", &s(&im), "--out", &s(&q8)], None);
    assert!(!ok && stderr.contains("changes nothing in q8_0"), "{stderr}");
    assert!(!q8.exists());
    // GPTQ from the CLI: q4_0 only, and not together with --imatrix.
    let g = tmp.path().join("g");
    let (ok, stdout, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--gptq", &s(&text), "--calib-window", "32", "--out", &s(&g)], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Q4_0") && stderr.contains("calibrated on"), "{stdout}{stderr}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(g.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["linly_quantization"]["gptq"], true);
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q8_0", "--gptq", &s(&text), "--out", &s(&out)], None);
    assert!(!ok && stderr.contains("--format q4_0"), "{stderr}");
    let (ok, _, stderr) = run_cli(&["quantize", "--model", &s(&model), "--format", "q4_0", "--gptq", &s(&text), "--imatrix", &s(&im), "--out", &s(&out)], None);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    assert!(!out.exists());
    // export gguf takes the same calibration; its GGUF equals the quantized folder's.
    let gg = tmp.path().join("g.gguf");
    let (ok, _, stderr) = run_cli(&["export", "gguf", "--model", &s(&model), "--type", "q4_0", "--gptq", &s(&text), "--calib-window", "32", "--out", &s(&gg)], None);
    assert!(ok, "{stderr}");
    let (a, b) = (GgufMmap::open(&gg).unwrap(), GgufMmap::open(&g.join(store::MODEL_FILE)).unwrap());
    let (ga, gb) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(ga.tensors.iter().zip(&gb.tensors).all(|(x, y)| x.name == y.name && x.data == y.data));
    let (ok, _, stderr) = run_cli(&["export", "gguf", "--model", &s(&model), "--type", "q8_0", "--gptq", &s(&text), "--out", &s(&tmp.path().join("g2.gguf"))], None);
    assert!(!ok && stderr.contains("--format q4_0"), "{stderr}");
}

/// `Σ_rows (w − ŵ) H (w − ŵ)ᵀ / tokens`: the mean squared change of the weight's outputs on the
/// calibration inputs.
fn output_error(w: &[f32], q: &[f32], cols: usize, h: &[f64], tokens: u64) -> f64 {
    let mut e = 0.0;
    for (a, b) in w.chunks(cols).zip(q.chunks(cols)) {
        let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| (a - b) as f64).collect();
        for i in 0..cols {
            e += d[i] * (0..cols).map(|j| h[i * cols + j] * d[j]).sum::<f64>();
        }
    }
    e / tokens as f64
}

#[test]
fn gptq_lowers_the_output_error_of_gate_and_up_only() {
    let base = tiny().join("base");
    let ids: Vec<u32> = Expected::load().ids("input_ids").concat();
    let mut loaded = load(&ModelSpec::new(&base)).unwrap();
    let (m, h) = collect_with_hessians(&mut loaded, &ids, 1 << 20, true).unwrap();
    // One Hessian per layer, of gate_proj's input (up_proj reads the same), symmetric, and its
    // diagonal per token is the importance matrix's column means (no token is 10× the median here).
    assert_eq!(h.grams.keys().collect::<Vec<_>>(), ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight"]);
    assert_eq!(h.tokens, ids.len() as u64);
    for l in 0..2 {
        let up = format!("model.layers.{l}.mlp.up_proj.weight");
        let g = h.get(&up, 64).unwrap();
        assert!((0..64).all(|i| (0..64).all(|j| (g[i * 64 + j] - g[j * 64 + i]).abs() <= 1e-9 * g[i * 64 + i].abs().max(1.0))));
        assert!(rel_err(&h.importance(&up, 64).unwrap(), &m.columns[&up]) < 1e-5);
        assert!(h.get(&format!("model.layers.{l}.self_attn.q_proj.weight"), 64).is_none());
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rtn, gptq) = (tmp.path().join("rtn"), tmp.path().join("gptq"));
    store::quantize_model_imatrix(&base, &rtn, QType::Q4_0, false, false, Some(&m), None).unwrap();
    store::quantize_model_imatrix(&base, &gptq, QType::Q4_0, false, false, Some(&m), Some(&h)).unwrap();
    let src = WeightStore::open(&base).unwrap();
    let (a, b) = (GgufMmap::open(&rtn.join(store::MODEL_FILE)).unwrap(), GgufMmap::open(&gptq.join(store::MODEL_FILE)).unwrap());
    let (ga, gb) = (a.parse().unwrap(), b.parse().unwrap());
    let mut seen = 0;
    for (ta, tb) in ga.tensors.iter().zip(&gb.tensors) {
        assert_eq!((ta.name, ta.ggml_type), (tb.name, tb.ggml_type));
        let hf = gguf_to_hf_name(ta.name).unwrap().hf_name;
        if !linly_lora::quant::gptq::applies_to(&hf) {
            assert!(ta.data == tb.data, "{} changed", ta.name);
            continue;
        }
        assert_eq!(ta.ggml_type.name(), "Q4_0");
        assert_ne!(ta.data, tb.data, "{}", ta.name);
        // What GPTQ is for: on the calibration inputs, the outputs move less.
        let (w, _) = src.f32(&hf).unwrap();
        let (qa, qb) = (dequantize(ta.ggml_type, ta.data, w.len()).unwrap(), dequantize(tb.ggml_type, tb.data, w.len()).unwrap());
        let (ea, eb) = (output_error(&w, &qa, 64, h.get(&hf, 64).unwrap(), h.tokens), output_error(&w, &qb, 64, h.get(&hf, 64).unwrap(), h.tokens));
        eprintln!("{hf}: output error rounding {ea:.3e}, GPTQ {eb:.3e}");
        assert!(eb < 0.8 * ea, "{hf}: GPTQ {eb} vs rounding {ea}");
        seen += 1;
    }
    assert_eq!(seen, 4, "gate and up of two layers");
    // And the model runs close to f32.
    let ids = Expected::load().ids("input_ids");
    let want = logits_of(&Llama::load(&base, &cpu(), FloatType::F32).unwrap(), &ids);
    let got = logits_of(&Llama::load(&gptq, &cpu(), FloatType::F32).unwrap(), &ids);
    assert!(rel_err(&got, &want) < 0.2, "{}", rel_err(&got, &want));
}

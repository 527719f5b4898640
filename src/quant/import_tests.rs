//! Tests of `import.rs`.

use crate::io::gguf::layout::permute_qk_rows;
use crate::io::gguf::reader::{GgufArray, GgufValue};
use crate::io::gguf::writer::GgufWriter;
use super::*;

struct Dims {
    embd: usize,
    ff: usize,
    heads: usize,
    kv: usize,
    layers: usize,
    vocab: usize,
}

const D: Dims = Dims { embd: 64, ff: 96, heads: 4, kv: 2, layers: 2, vocab: 24 };

fn values(n: usize, seed: usize) -> Vec<f32> {
    // Multiples of 1/64 below 2 in magnitude: exact in f16 and bf16 alike.
    (0..n).map(|i| (((i * 7919 + seed * 104729) % 255) as f32 - 127.0) / 64.0).collect()
}

/// HF name → (row-major shape, values).
type HfWeights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A tiny LLaMA GGUF and the HF weights it should import to.
pub(crate) fn tiny_llama(tied: bool, with_tokenizer: bool) -> (Vec<u8>, HfWeights) {
    let mut w = GgufWriter::new();
    let s = |x: &'static str| GgufValue::String(x.as_bytes());
    w.add_kv("general.architecture", &s("llama")).unwrap();
    w.add_kv("llama.block_count", &GgufValue::U32(D.layers as u32)).unwrap();
    w.add_kv("llama.context_length", &GgufValue::U32(256)).unwrap();
    w.add_kv("llama.embedding_length", &GgufValue::U32(D.embd as u32)).unwrap();
    w.add_kv("llama.feed_forward_length", &GgufValue::U32(D.ff as u32)).unwrap();
    w.add_kv("llama.attention.head_count", &GgufValue::U32(D.heads as u32)).unwrap();
    w.add_kv("llama.attention.head_count_kv", &GgufValue::U32(D.kv as u32)).unwrap();
    w.add_kv("llama.rope.freq_base", &GgufValue::F32(100000.0)).unwrap();
    w.add_kv("llama.attention.layer_norm_rms_epsilon", &GgufValue::F32(1e-5)).unwrap();
    w.add_kv("llama.rope.dimension_count", &GgufValue::U32((D.embd / D.heads) as u32)).unwrap();
    if with_tokenizer {
        crate::io::gguf::tokenizer::tests::add_tiny_gpt2_vocab(&mut w);
    }
    let hd = D.embd / D.heads;
    let mut hf = BTreeMap::new();
    let mut seed = 0;
    let mut add = |w: &mut GgufWriter, gname: String, hname: String, shape: Vec<usize>, permute: Option<usize>| {
        seed += 1;
        let n = shape.iter().product();
        let v = values(n, seed);
        let stored = match permute {
            Some(h) => permute_qk_rows(&v, shape[0], shape[1], h).unwrap(),
            None => v.clone(),
        };
        // 2-D weights go through the F16 dequantizer; the values are exact in f16.
        if shape.len() == 1 {
            w.add_f32(&gname, &shape, &stored).unwrap();
        } else {
            w.add_f16(&gname, &shape, &stored).unwrap();
        }
        hf.insert(hname, (shape, v));
    };
    add(&mut w, "token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![D.vocab, D.embd], None);
    for l in 0..D.layers {
        let p = |x: &str| format!("model.layers.{l}.{x}.weight");
        let g = |x: &str| format!("blk.{l}.{x}.weight");
        add(&mut w, g("attn_norm"), p("input_layernorm"), vec![D.embd], None);
        add(&mut w, g("attn_q"), p("self_attn.q_proj"), vec![D.heads * hd, D.embd], Some(D.heads));
        add(&mut w, g("attn_k"), p("self_attn.k_proj"), vec![D.kv * hd, D.embd], Some(D.kv));
        add(&mut w, g("attn_v"), p("self_attn.v_proj"), vec![D.kv * hd, D.embd], None);
        add(&mut w, g("attn_output"), p("self_attn.o_proj"), vec![D.embd, D.heads * hd], None);
        add(&mut w, g("ffn_norm"), p("post_attention_layernorm"), vec![D.embd], None);
        add(&mut w, g("ffn_gate"), p("mlp.gate_proj"), vec![D.ff, D.embd], None);
        add(&mut w, g("ffn_up"), p("mlp.up_proj"), vec![D.ff, D.embd], None);
        add(&mut w, g("ffn_down"), p("mlp.down_proj"), vec![D.embd, D.ff], None);
    }
    add(&mut w, "output_norm.weight".into(), "model.norm.weight".into(), vec![D.embd], None);
    if !tied {
        add(&mut w, "output.weight".into(), "lm_head.weight".into(), vec![D.vocab, D.embd], None);
    }
    (w.to_bytes().unwrap(), hf)
}

pub(crate) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gguf-import-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let raw = crate::io::safetensors::RawTensor { dtype: t.dtype(), shape: t.shape(), bytes: t.data() };
    (t.shape().to_vec(), raw.to_f32().unwrap())
}

#[test]
fn imports_tiny_llama_exactly() {
    let dir = scratch("exact");
    let (bytes, hf) = tiny_llama(true, true);
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, &bytes).unwrap();
    let out = dir.join("out");
    let report = import_gguf(&src, &out, OutDType::F32).unwrap();
    assert!(report.tied_embeddings);
    assert_eq!(report.n_tensors, hf.len());
    assert_eq!(report.vocab_size, D.vocab);
    assert_eq!(report.tokenizer.as_deref(), Some("gpt2 (pre-tokenizer smollm)"));
    assert!(report.chat_template);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.len(), hf.len());
    assert!(st.tensor("lm_head.weight").is_err());
    for (name, (shape, want)) in &hf {
        let (s, v) = read_f32(&st, name);
        assert_eq!(&s, shape, "{name}");
        assert_eq!(&v, want, "{name}: values differ (Q/K un-permutation or dequantization)");
    }

    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 16);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["max_position_embeddings"], 256);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.encode("Hello world", true).unwrap().get_ids(), &[14, 19]);
    let tc: Value = serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("im_start"));
    // Nothing left behind next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn untied_bf16_keeps_norms_f32() {
    let dir = scratch("bf16");
    let (bytes, hf) = tiny_llama(false, false);
    let src = dir.join("tiny.gguf");
    std::fs::write(&src, &bytes).unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap(); // an empty folder may be replaced
    let report = import_gguf(&src, &out, OutDType::BF16).unwrap();
    assert!(!report.tied_embeddings);
    assert!(report.tokenizer.is_none() && report.warnings.iter().any(|w| w.contains("no tokenizer")));
    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.tensor("model.norm.weight").unwrap().dtype(), safetensors::Dtype::F32);
    assert_eq!(st.tensor("lm_head.weight").unwrap().dtype(), safetensors::Dtype::BF16);
    let (_, v) = read_f32(&st, "model.layers.1.self_attn.k_proj.weight");
    let want = &hf["model.layers.1.self_attn.k_proj.weight"].1;
    // The test values have 7 significant bits, so bf16 keeps them exactly.
    assert_eq!(&v, want);
    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(!out.join("tokenizer.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failures_leave_no_output() {
    let dir = scratch("fail");
    let (bytes, _) = tiny_llama(true, true);
    // Truncated file.
    let src = dir.join("trunc.gguf");
    std::fs::write(&src, &bytes[..bytes.len() - 100]).unwrap();
    let out = dir.join("out");
    let e = format!("{:#}", import_gguf(&src, &out, OutDType::F32).unwrap_err());
    assert!(e.contains("trunc.gguf") && e.contains("runs past the end"), "{e}");
    assert!(!out.exists());
    // Existing non-empty output.
    let src = dir.join("ok.gguf");
    std::fs::write(&src, &bytes).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("x"), b"x").unwrap();
    assert!(format!("{:#}", import_gguf(&src, &out, OutDType::F32).unwrap_err()).contains("not empty"));
    std::fs::remove_dir_all(&out).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn import_bytes(bytes: &[u8], name: &str) -> Result<ImportReport> {
    let dir = scratch(name);
    let src = dir.join("m.gguf");
    std::fs::write(&src, bytes).unwrap();
    let r = import_gguf(&src, &dir.join("out"), OutDType::F32);
    std::fs::remove_dir_all(&dir).unwrap();
    r
}

/// Rebuilds the tiny model's file with one metadata entry replaced or one tensor dropped.
fn tweak(edit_kv: Option<(&str, GgufValue<'static>)>, drop_tensor: Option<&str>) -> Vec<u8> {
    let (bytes, _) = tiny_llama(true, false);
    let f = crate::io::gguf::reader::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for kv in &f.metadata {
        match &edit_kv {
            Some((k, v)) if *k == kv.key => w.add_kv(kv.key, v).unwrap(),
            _ => w.add_kv(kv.key, &kv.value).unwrap(),
        }
    }
    if let Some((k, v)) = &edit_kv {
        if f.get(k).is_none() {
            w.add_kv(k, v).unwrap();
        }
    }
    for t in &f.tensors {
        if Some(t.name) != drop_tensor {
            w.add_tensor_raw(t.name, &t.dims, t.ggml_type, t.data.to_vec()).unwrap();
        }
    }
    w.to_bytes().unwrap()
}

#[test]
fn metadata_problems_are_named() {
    type Case = (Option<(&'static str, GgufValue<'static>)>, Option<&'static str>, &'static str);
    let cases: Vec<Case> = vec![
        (Some(("general.architecture", GgufValue::String(b"qwen2"))), None, "architecture `qwen2`"),
        (Some(("llama.attention.head_count", GgufValue::U32(3))), None, "head_count 3 is not a multiple"),
        (Some(("llama.feed_forward_length", GgufValue::U32(97))), None, "blk.0.ffn_gate.weight"),
        (Some(("llama.block_count", GgufValue::U32(3))), None, "model.layers.2"),
        (Some(("llama.block_count", GgufValue::U32(1))), None, "beyond block_count"),
        (Some(("llama.expert_count", GgufValue::U32(8))), None, "mixture-of-experts"),
        (
            Some(("llama.feed_forward_length", GgufValue::Array(GgufArray::U32(vec![96, 96])))),
            None,
            "feed_forward_length",
        ),
        (None, Some("blk.1.ffn_up.weight"), "model.layers.1.mlp.up_proj.weight"),
        (Some(("llama.rope.dimension_count", GgufValue::U32(8))), None, "partial rotary"),
    ];
    for (i, (kv, drop, want)) in cases.into_iter().enumerate() {
        let e = format!("{:#}", import_bytes(&tweak(kv, drop), &format!("meta{i}")).unwrap_err());
        assert!(e.contains(want), "case {i}: {e}");
    }
}

#[test]
fn unknown_tensors_and_types_are_refused() {
    let (bytes, _) = tiny_llama(true, false);
    let f = crate::io::gguf::reader::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for kv in &f.metadata {
        w.add_kv(kv.key, &kv.value).unwrap();
    }
    for t in &f.tensors {
        w.add_tensor_raw(t.name, &t.dims, t.ggml_type, t.data.to_vec()).unwrap();
    }
    let mut w2 = GgufWriter::new();
    for kv in &f.metadata {
        w2.add_kv(kv.key, &kv.value).unwrap();
    }
    for t in &f.tensors {
        if t.name == "blk.0.ffn_up.weight" {
            // Same shape stored as IQ4_NL (32-element blocks of 18 bytes): parses, cannot import.
            let n = t.n_elements() as usize;
            w2.add_tensor_raw(t.name, &t.dims, GgmlType::IQ4_NL, vec![0; n / 32 * 18]).unwrap();
        } else {
            w2.add_tensor_raw(t.name, &t.dims, t.ggml_type, t.data.to_vec()).unwrap();
        }
    }
    w.add_f32("blk.0.attn_q.bias", &[64], &[0.0; 64]).unwrap();
    let e = format!("{:#}", import_bytes(&w.to_bytes().unwrap(), "bias").unwrap_err());
    assert!(e.contains("blk.0.attn_q.bias") && e.contains("not a LLaMA weight"), "{e}");
    let e = format!("{:#}", import_bytes(&w2.to_bytes().unwrap(), "iq4").unwrap_err());
    assert!(e.contains("IQ4_NL") && e.contains("blk.0.ffn_up.weight"), "{e}");
}

#[test]
fn rope_scaling_from_metadata_and_rope_freqs() {
    let (bytes, _) = tiny_llama(true, false);
    let f = crate::io::gguf::reader::parse(&bytes).unwrap();
    let meta = |extra: &[(&str, GgufValue<'static>)], freqs: Option<Vec<f32>>| {
        let mut w = GgufWriter::new();
        for kv in &f.metadata {
            w.add_kv(kv.key, &kv.value).unwrap();
        }
        for (k, v) in extra {
            w.add_kv(k, v).unwrap();
        }
        if let Some(fr) = freqs {
            w.add_f32("rope_freqs.weight", &[fr.len()], &fr).unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let g = crate::io::gguf::reader::parse(&bytes).unwrap();
        let mut warnings = Vec::new();
        let m = read_meta(&g, &mut warnings).unwrap();
        (m.rope_scaling, warnings)
    };
    assert_eq!(meta(&[], None).0, None);
    let (r, _) = meta(
        &[
            ("llama.rope.scaling.type", GgufValue::String(b"linear")),
            ("llama.rope.scaling.factor", GgufValue::F32(4.0)),
        ],
        None,
    );
    assert_eq!(r, Some(json!({"rope_type": "linear", "factor": 4.0})));
    // LLaMA-3 factors exactly as convert_hf_to_gguf.py computes them (factor 8, head_dim 16).
    let (hd, theta, factor, old_ctx) = (16usize, 100000.0f64, 8.0f64, 8192.0f64);
    let fr: Vec<f32> = (0..hd / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
            let wl = 2.0 * std::f64::consts::PI / freq;
            if wl < old_ctx / 4.0 {
                1.0
            } else if wl > old_ctx {
                factor as f32
            } else {
                let s = (old_ctx / wl - 1.0) / 3.0;
                (1.0 / ((1.0 - s) / factor + s)) as f32
            }
        })
        .collect();
    let (r, w) = meta(&[], Some(fr));
    assert_eq!(r.unwrap()["rope_type"], "llama3", "{w:?}");
    let (r, w) = meta(&[], Some(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]));
    assert!(r.is_none() && w.iter().any(|x| x.contains("rope_freqs")));
}

#[test]
fn dtype_parsing() {
    assert_eq!("BF16".parse::<OutDType>().unwrap(), OutDType::BF16);
    assert_eq!("f16".parse::<OutDType>().unwrap(), OutDType::F16);
    assert_eq!("float32".parse::<OutDType>().unwrap(), OutDType::F32);
    assert!("q8".parse::<OutDType>().is_err());
    assert_eq!(crate::io::safetensors::encode_f32(&[1.0, -2.0], OutDType::BF16), vec![0x80, 0x3F, 0x00, 0xC0]);
}

//! Tests of `tokenizer.rs`.

use super::super::reader::{parse, GgufValue};
use super::super::writer::GgufWriter;
use super::*;

fn strs(v: &[&str]) -> GgufValue<'static> {
    let owned: Vec<&'static [u8]> =
        v.iter().map(|s| &*Box::leak(s.as_bytes().to_vec().into_boxed_slice())).collect();
    GgufValue::Array(GgufArray::String(owned))
}

/// A tiny byte-level BPE vocab that spells "Hello world" in two tokens.
pub(crate) fn add_tiny_gpt2_vocab(w: &mut GgufWriter) {
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "H",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "He",
        "ll",
        "Hell",
        "Hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
        "1",
        "2",
        "12",
        "!",
    ];
    let merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"];
    let mut types = vec![1i32; tokens.len()];
    types[..3].copy_from_slice(&[3, 3, 3]);
    w.add_kv("tokenizer.ggml.model", &GgufValue::String(b"gpt2")).unwrap();
    w.add_kv("tokenizer.ggml.pre", &GgufValue::String(b"smollm")).unwrap();
    w.add_kv("tokenizer.ggml.tokens", &strs(&tokens)).unwrap();
    w.add_kv("tokenizer.ggml.token_type", &GgufValue::Array(GgufArray::I32(types))).unwrap();
    w.add_kv("tokenizer.ggml.merges", &strs(&merges)).unwrap();
    w.add_kv("tokenizer.ggml.bos_token_id", &GgufValue::U32(1)).unwrap();
    w.add_kv("tokenizer.ggml.eos_token_id", &GgufValue::U32(2)).unwrap();
    w.add_kv("tokenizer.ggml.unknown_token_id", &GgufValue::U32(0)).unwrap();
    w.add_kv("tokenizer.ggml.padding_token_id", &GgufValue::U32(2)).unwrap();
    w.add_kv("tokenizer.ggml.add_bos_token", &GgufValue::Bool(false)).unwrap();
    w.add_kv(
        "tokenizer.chat_template",
        &GgufValue::String(b"{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"),
    )
    .unwrap();
}

/// A tiny SentencePiece vocab: scores favour longer pieces; a few byte tokens.
fn add_tiny_llama_vocab(w: &mut GgufWriter, add_space_prefix: Option<bool>) {
    let pieces: Vec<(&str, f32, i32)> = vec![
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<0x21>", 0.0, 6), // '!'
        ("<0x69>", 0.0, 6), // 'i'
        ("▁", -1.0, 1),
        ("H", -2.0, 1),
        ("e", -2.0, 1),
        ("l", -2.0, 1),
        ("o", -2.0, 1),
        ("w", -2.0, 1),
        ("r", -2.0, 1),
        ("d", -2.0, 1),
        ("▁H", -1.5, 1),
        ("ll", -1.4, 1),
        ("▁He", -1.3, 1),
        ("▁Hell", -1.2, 1),
        ("▁Hello", -1.1, 1),
        ("▁w", -1.5, 1),
        ("or", -1.4, 1),
        ("▁wor", -1.3, 1),
        ("ld", -1.3, 1),
        ("▁world", -1.0, 1),
        ("<user>", 0.0, 4),
    ];
    w.add_kv("tokenizer.ggml.model", &GgufValue::String(b"llama")).unwrap();
    w.add_kv("tokenizer.ggml.tokens", &strs(&pieces.iter().map(|p| p.0).collect::<Vec<_>>())).unwrap();
    w.add_kv("tokenizer.ggml.scores", &GgufValue::Array(GgufArray::F32(pieces.iter().map(|p| p.1).collect())))
        .unwrap();
    w.add_kv("tokenizer.ggml.token_type", &GgufValue::Array(GgufArray::I32(pieces.iter().map(|p| p.2).collect())))
        .unwrap();
    w.add_kv("tokenizer.ggml.bos_token_id", &GgufValue::U32(1)).unwrap();
    w.add_kv("tokenizer.ggml.eos_token_id", &GgufValue::U32(2)).unwrap();
    w.add_kv("tokenizer.ggml.unknown_token_id", &GgufValue::U32(0)).unwrap();
    if let Some(b) = add_space_prefix {
        w.add_kv("tokenizer.ggml.add_space_prefix", &GgufValue::Bool(b)).unwrap();
    }
}

fn build(w: &GgufWriter) -> HfTokenizerFiles {
    let bytes = w.to_bytes().unwrap();
    let f = parse(&bytes).unwrap();
    build_tokenizer(&f, Some(2048)).unwrap().unwrap()
}

fn load(files: &HfTokenizerFiles) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&files.tokenizer_json).unwrap()).unwrap()
}

fn ids(t: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    t.encode(text, true).unwrap().get_ids().to_vec()
}

#[test]
fn gpt2_vocab_encodes_like_llama_cpp() {
    let mut w = GgufWriter::new();
    add_tiny_gpt2_vocab(&mut w);
    let files = build(&w);
    assert!(files.warnings.is_empty(), "{:?}", files.warnings);
    let t = load(&files);
    assert_eq!(ids(&t, "Hello world"), vec![14, 19]);
    // Control tokens are matched whole; digits are split one by one (smollm's \p{N} rule),
    // so the "1 2" merge never applies.
    assert_eq!(ids(&t, "<|im_start|>Hello<|im_end|>"), vec![1, 14, 2]);
    assert_eq!(ids(&t, "12"), vec![20, 21]);
    assert_eq!(t.decode(&[14, 19], false).unwrap(), "Hello world");
    let cfg = &files.tokenizer_config;
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["add_bos_token"], false);
    assert!(cfg["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(cfg["added_tokens_decoder"]["1"]["content"], "<|im_start|>");
    assert_eq!(files.special_tokens_map["pad_token"], "<|im_end|>");
}

#[test]
fn gpt2_pre_types_change_the_split() {
    // The same vocab read as "gpt-2": digits stay together, so the "1 2" merge applies.
    let mut w = GgufWriter::new();
    add_tiny_gpt2_vocab_with_pre(&mut w, "gpt-2");
    let t = load(&build(&w));
    assert_eq!(ids(&t, "12"), vec![22]);
    let mut w = GgufWriter::new();
    add_tiny_gpt2_vocab_with_pre(&mut w, "no-such-pre");
    let files = build(&w);
    assert!(files.warnings.iter().any(|w| w.contains("no-such-pre")));
}

fn add_tiny_gpt2_vocab_with_pre(w: &mut GgufWriter, pre: &'static str) {
    let mut tmp = GgufWriter::new();
    add_tiny_gpt2_vocab(&mut tmp);
    let bytes = tmp.to_bytes().unwrap();
    let f = parse(&bytes).unwrap();
    for kv in &f.metadata {
        if kv.key == "tokenizer.ggml.pre" {
            w.add_kv(kv.key, &GgufValue::String(pre.as_bytes())).unwrap();
        } else {
            w.add_kv(kv.key, &kv.value).unwrap();
        }
    }
}

#[test]
fn llama_vocab_encodes_like_llama_cpp() {
    let mut w = GgufWriter::new();
    add_tiny_llama_vocab(&mut w, None);
    let files = build(&w);
    assert!(files.warnings.is_empty(), "{:?}", files.warnings);
    let t = load(&files);
    // BOS is added by default for SentencePiece vocabs; " " before "Hello" comes from the
    // add_space_prefix normalizer.
    assert_eq!(ids(&t, "Hello world"), vec![1, 17, 22]);
    // 'i' and '!' are not pieces: byte fallback.
    assert_eq!(ids(&t, "Hi!"), vec![1, 13, 4, 3]);
    // User-defined tokens are matched whole; after a special token llama.cpp re-adds the
    // space prefix, which the per-segment normalizer also does.
    assert_eq!(ids(&t, "<user>Hello"), vec![1, 23, 17]);
    assert_eq!(ids(&t, "</s>Hello"), vec![1, 2, 17]);
    assert_eq!(t.decode(&[1, 17, 22], true).unwrap(), "Hello world");
    assert_eq!(files.tokenizer_config["add_bos_token"], true);
    assert_eq!(files.tokenizer_config["unk_token"], "<unk>");
}

#[test]
fn llama_vocab_without_space_prefix() {
    let mut w = GgufWriter::new();
    add_tiny_llama_vocab(&mut w, Some(false));
    let t = load(&build(&w));
    // No ▁ before "Hello": H, e, ll, o.
    assert_eq!(ids(&t, "Hello world"), vec![1, 6, 7, 14, 9, 22]);
}

#[test]
fn spm_merge_order_follows_scores() {
    let mut w = GgufWriter::new();
    add_tiny_llama_vocab(&mut w, None);
    let files = build(&w);
    let merges = files.tokenizer_json["model"]["merges"].as_array().unwrap();
    // "▁world" (-1.0) is the best-scoring piece with a split, then "▁Hello" (-1.1).
    let firsts: Vec<String> =
        merges.iter().map(|m| format!("{}{}", m[0].as_str().unwrap(), m[1].as_str().unwrap())).collect();
    assert_eq!(firsts[0], "▁world");
    assert_eq!(firsts[1], "▁Hello");
    assert!(!firsts.iter().any(|m| m.starts_with('<')), "control/byte tokens are not merge results");
}

#[test]
fn hostile_tokenizer_metadata_is_an_error_not_a_panic() {
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", &GgufValue::String(b"gpt2")).unwrap();
    w.add_kv("tokenizer.ggml.tokens", &strs(&["a", "b", "a", "ab", "\u{0}"])).unwrap();
    w.add_kv("tokenizer.ggml.token_type", &GgufValue::Array(GgufArray::I32(vec![1, 2]))).unwrap();
    w.add_kv("tokenizer.ggml.merges", &strs(&["a b", "ab", "a c", "", " ", "a b"])).unwrap();
    w.add_kv("tokenizer.ggml.bos_token_id", &GgufValue::U32(99)).unwrap();
    w.add_kv("tokenizer.ggml.eos_token_id", &GgufValue::I32(-1)).unwrap();
    let files = build(&w);
    assert_eq!(files.bos_token_id, None);
    assert_eq!(files.eos_token_id, None);
    assert!(files.warnings.len() >= 3, "{:?}", files.warnings);
    let t = load(&files);
    assert_eq!(ids(&t, "ab"), vec![3]);

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", &GgufValue::String(b"bert")).unwrap();
    w.add_kv("tokenizer.ggml.tokens", &strs(&["a"])).unwrap();
    let bytes = w.to_bytes().unwrap();
    assert!(build_tokenizer(&parse(&bytes).unwrap(), None).unwrap_err().to_string().contains("bert"));

    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.tokens", &GgufValue::U32(3)).unwrap();
    let bytes = w.to_bytes().unwrap();
    assert!(build_tokenizer(&parse(&bytes).unwrap(), None).is_err());

    let bytes = GgufWriter::new().to_bytes().unwrap();
    assert!(build_tokenizer(&parse(&bytes).unwrap(), None).unwrap().is_none());
}

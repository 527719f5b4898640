//! End-to-end tests of the vocab module on the real LLaMA-2 tokenizer and a byte-level BPE.

use super::*;
use crate::io::gguf::tokenizer::SPACE_BEFORE_UNSPACED;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use tokenizers::Tokenizer;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

fn hsk_zh() -> Vec<String> {
    read("zh/hsk_zh_en.tsv").lines().filter_map(|l| l.split('\t').next()).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap().get_ids().to_vec()
}

fn roundtrip(tok: &Tokenizer, text: &str) -> String {
    tok.decode(&ids(tok, text), true).unwrap()
}

const MIXED: &[&str] = &[
    "我爱北京天安门。",
    "今天天气很好，我们去公园散步吧！",
    "中华人民共和国成立于1949年10月1日。",
    "Hello 世界! 这是一个 mixed 句子, with English words 和中文。",
    "emoji 😀🎉👍🏽 表情 🇨🇳 and 𠮷野家 (a rare CJK Ext-B char)",
    "  前后有空格  ",
    "繁體中文也應該能正確往返。",
    "數學公式：E = mc²，π ≈ 3.14159。",
    "日本語のテキストと한국어 텍스트",
    "\t制表符\t和换行\n第二行",
];

/// LLaMA-2 extended once with 28,000 pieces chosen by jieba-dict frequency (shared by the tests
/// below): 8,000 characters, 19,000 words and 1,000 `▁`+word pieces for sentence starts. With
/// 8,000 + 20,000 and no `▁` pieces HSK measures 0.832 tokens/char; the lone `▁` that opens every
/// sentence is what the last 1,000 pieces remove.
struct Llama {
    old: Tokenizer,
    new: Tokenizer,
    ext: Extended,
}

/// The pieces [`llama`] asks for.
fn llama_source() -> PieceSource {
    PieceSource::Select(SelectConfig {
        wordlist: Some(fixture("zh/jieba_dict.txt")),
        max_chars: 8_000,
        max_words: 19_000,
        max_prefixed: 1_000,
        ..SelectConfig::default()
    })
}

fn llama() -> &'static Llama {
    static CELL: OnceLock<Llama> = OnceLock::new();
    CELL.get_or_init(|| {
        let text = read("llama2-tokenizer/tokenizer.json");
        let source = llama_source();
        let ext = extend_json(&text, "llama2-tokenizer/tokenizer.json", &source).unwrap();
        let r = &ext.report;
        eprintln!(
            "llama2 extend: {} requested, {} added + {} intermediate, {} unreachable, vocab {} -> {}, {:.2} s",
            r.requested, r.added_requested, r.added_intermediate, r.unreachable.len(), r.old_vocab, r.new_vocab, r.seconds
        );
        Llama { old: Tokenizer::from_str(&text).unwrap(), new: Tokenizer::from_str(&ext.tokenizer_json).unwrap(), ext }
    })
}

#[test]
fn llama2_extension_is_consistent() {
    let l = llama();
    let r = &l.ext.report;
    assert_eq!(r.old_vocab, 32_000);
    assert_eq!(r.requested, 28_000);
    assert!(r.not_single_token.is_empty(), "{:?}", &r.not_single_token[..r.not_single_token.len().min(20)]);
    assert!(r.unreachable.len() < 50, "{} unreachable: {:?}", r.unreachable.len(), &r.unreachable[..20]);
    assert_eq!(r.new_vocab, l.new.get_vocab_size(true));
    let e = &l.ext.extension;
    e.validate().unwrap();
    assert_eq!(e.new_vocab, r.new_vocab);
    let pieces = e.pieces.as_ref().unwrap();
    let unique: std::collections::HashSet<&String> = pieces.iter().collect();
    assert_eq!(unique.len(), pieces.len(), "duplicate new pieces");
    // New piece i is id old_vocab + i in the new tokenizer, and its sub-tokens are what the old
    // tokenizer made of it: byte-fallback ids for an unknown character, no dummy-prefix `▁`.
    for (i, p) in pieces.iter().enumerate().step_by(97) {
        assert_eq!(l.new.token_to_id(&p.replace(' ', "\u{2581}")), Some((e.old_vocab + i) as u32), "{p}");
        if p.starts_with(' ') {
            assert_eq!(e.subtokens[i][0], 29871, "{p}: `▁` first");
            continue;
        }
        let old_ids: Vec<u32> = l.old.encode(p.as_str(), false).unwrap().get_ids().to_vec();
        let old_ids = if old_ids.first() == Some(&29871) { old_ids[1..].to_vec() } else { old_ids };
        assert_eq!(e.subtokens[i], old_ids, "{p}");
    }
    let qi = pieces.iter().position(|p| p == "气").unwrap();
    assert_eq!(e.subtokens[qi], vec![0xE6 + 3, 0xB0 + 3, 0x94 + 3], "气 = <0xE6><0xB0><0x94>");
}

#[test]
fn llama2_english_ids_unchanged() {
    let l = llama();
    let english = read("text/english.txt");
    for line in english.lines().chain(std::iter::once(english.as_str())) {
        assert_eq!(ids(&l.old, line), ids(&l.new, line), "{line:?}");
    }
    // 4,354 more English sentences: the English column of the HSK pairs.
    for en in read("zh/hsk_zh_en.tsv").lines().filter_map(|l| l.split('\t').nth(1)) {
        assert_eq!(ids(&l.old, en), ids(&l.new, en), "{en:?}");
    }
    assert_eq!(ids(&l.new, "Hello world!"), vec![1, 15043, 3186, 29991]);
}

#[test]
fn llama2_roundtrip_and_words_in_running_text() {
    let l = llama();
    for text in MIXED.iter().copied().chain(hsk_zh().iter().map(String::as_str).step_by(7)) {
        assert_eq!(roundtrip(&l.new, text), text);
        assert_eq!(roundtrip(&l.old, text), text);
    }
    let enc = l.new.encode("今天我们去北京，看看中国的首都。", false).unwrap();
    for word in ["我们", "北京", "中国", "首都"] {
        let id = l.new.token_to_id(word).unwrap_or_else(|| panic!("{word} not added"));
        assert!(enc.get_ids().contains(&id), "{word} is not one token in {:?}", enc.get_tokens());
    }
}

#[test]
fn llama2_hsk_tokens_per_char() {
    let l = llama();
    let zh = hsk_zh();
    let before = measure_lines(&l.old, zh.iter().map(String::as_str)).unwrap();
    let after = measure_lines(&l.new, zh.iter().map(String::as_str)).unwrap();
    let tpc = |s: &TextStats| s.tokens as f64 / s.chars as f64;
    eprintln!(
        "HSK zh ({} sentences, {} chars): before {:.3} tokens/char ({} byte-fallback), after {:.3} ({} byte-fallback)",
        before.documents, before.chars, tpc(&before), before.byte_fallback_tokens, tpc(&after), after.byte_fallback_tokens
    );
    assert!((1.4..1.8).contains(&tpc(&before)), "{}", tpc(&before));
    assert!(tpc(&after) <= 0.8, "tokens/char after extension: {:.3}", tpc(&after));
    assert_eq!(after.roundtrip_failures, 0);
    assert_eq!(before.roundtrip_failures, 0);
}

#[test]
fn extend_writes_output_folder_and_stats_work() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("pieces.txt");
    std::fs::write(&list, "中国\n人民\n中华人民共和国\n中国\n的\n\nHello\n你好\r\n天气\n").unwrap();
    let out = dir.path().join("ext");
    let report = extend(&fixture("llama2-tokenizer"), &PieceSource::List(list.clone()), &out, false).unwrap();
    assert_eq!(report.requested, 8);
    assert_eq!(report.skipped_duplicate, 1);
    assert_eq!(report.skipped_present, 2, "的 and Hello are LLaMA-2 tokens"); // 的 is one of its 700 CJK chars
    assert!(report.unreachable.is_empty() && report.not_single_token.is_empty());
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab_extension.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(std::fs::read(out.join("tokenizer_config.json")).unwrap(), std::fs::read(fixture("llama2-tokenizer/tokenizer_config.json")).unwrap());
    let ext = VocabExtension::load(&out.join("vocab_extension.json")).unwrap();
    assert_eq!(ext.old_vocab, 32_000);
    assert_eq!(ext.new_vocab, report.new_vocab);
    let tok = load_tokenizer(&out).unwrap();
    let e = encode(&tok, "中华人民共和国和中国人民", false).unwrap();
    assert_eq!(e.decoded, "中华人民共和国和中国人民");
    assert!(e.pieces.contains(&"中华人民共和国".to_string()), "{:?}", e.pieces);
    // Key order, indentation and merge notation are kept.
    let orig = read("llama2-tokenizer/tokenizer.json");
    let new = std::fs::read_to_string(out.join("tokenizer.json")).unwrap();
    assert_eq!(orig[..orig.find("\"model\"").unwrap()], new[..new.find("\"model\"").unwrap()]);
    assert!(new.contains("\"中 国\""), "legacy \"a b\" merges expected");

    // Refuses to clobber; replacing works when allowed; a failure leaves nothing behind.
    assert!(extend(&fixture("llama2-tokenizer"), &PieceSource::List(list.clone()), &out, false).is_err());
    extend(&fixture("llama2-tokenizer"), &PieceSource::List(list.clone()), &out, true).unwrap();
    let bad_out = dir.path().join("never");
    assert!(extend(&fixture("llama2-tokenizer"), &PieceSource::List(dir.path().join("nope.txt")), &bad_out, false).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    std::fs::write(out.join("model.safetensors"), b"x").unwrap();
    let err = extend(&fixture("llama2-tokenizer"), &PieceSource::List(list), &out, true).unwrap_err();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");

    // stats over two tokenizers × one file
    let text = dir.path().join("zh.txt");
    std::fs::write(&text, "中华人民共和国\n\n中国人民\n天气\n").unwrap();
    let rows = stats(&[fixture("llama2-tokenizer"), out.clone()], std::slice::from_ref(&text)).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].chars, 13);
    assert_eq!(rows[1].tokens, 2 + 3 + 2, "▁ 中华人民共和国 | ▁ 中国 人民 | ▁ 天气");
    assert!(rows[0].byte_fallback_tokens > 0 && rows[1].byte_fallback_tokens == 0);
    let table = render_table(&rows);
    assert!(table.contains("tokens/char") && table.lines().count() == 4, "{table}");
    let json = serde_json::to_value(&rows).unwrap();
    assert!(json[0]["tokens_per_char"].as_f64().unwrap() > 1.0);
    assert!(stats(&[fixture("llama2-tokenizer")], &[dir.path().join("missing.txt")]).is_err());
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let pieces = PieceSource::Pieces(vec!["中国".into()]);
    let out = dir.path().join("out");
    let msg = |r: anyhow::Result<ExtendReport>| format!("{:#}", r.unwrap_err());

    assert!(msg(extend(&dir.path().join("missing.json"), &pieces, &out, false)).contains("does not exist"));
    assert!(msg(extend(dir.path(), &pieces, &out, false)).contains("has no tokenizer.json"));
    let bad = write(dir.path(), "bad.json", "{\"model\": [1, 2");
    assert!(msg(extend(&bad, &pieces, &out, false)).contains("not valid JSON"));
    let cfg = write(dir.path(), "cfg.json", "{\"bos_token\": \"<s>\"}");
    assert!(msg(extend(&cfg, &pieces, &out, false)).contains("no \"model\" section"));
    let wordpiece = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordPiece","unk_token":"[UNK]",
        "continuing_subword_prefix":"##","max_input_chars_per_word":100,"vocab":{"[UNK]":0,"a":1}}}"###;
    let wp = write(dir.path(), "wp.json", wordpiece);
    assert!(msg(extend(&wp, &pieces, &out, false)).contains("\"WordPiece\" is not supported"));
    let unigram = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":null,"post_processor":null,"decoder":null,
        "model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["a",-1.0]]}}"#;
    let ug = write(dir.path(), "ug.json", unigram);
    assert!(msg(extend(&ug, &pieces, &out, false)).contains("\"Unigram\" is not supported"));
    let broken_merge = r#"{"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":["a b"]}}"#;
    let bm = write(dir.path(), "bm.json", broken_merge);
    assert!(msg(extend(&bm, &pieces, &out, false)).contains("\"ab\", which is not in the vocab"));
    assert!(!out.exists());
    assert!(load_tokenizer(&bad).is_err());
    assert!(load_tokenizer(&dir.path().join("nope")).is_err());
    let lying = write(dir.path(), "ext.json", r#"{"old_vocab": 2, "new_vocab": 3, "subtokens": [[2]]}"#);
    assert!(VocabExtension::load(&lying).is_err());
}

/// A byte-level BPE (GPT-2 style) trained on the English fixture: no Chinese merges at all.
fn byte_level_json() -> String {
    byte_level_json_with(&[])
}

/// [`byte_level_json`] trained on `extra` lines as well, with the GPT-2 split regex in its own
/// `Split` (as SmolLM2's tokenizer has it), so that a space and a following CJK lead byte merge.
fn byte_level_json_with(extra: &[&str]) -> String {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder};
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::default()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .unwrap();
    let mut trainer = BpeTrainer::builder().vocab_size(600).initial_alphabet(ByteLevel::alphabet().into_iter().collect()).show_progress(false).build();
    let english = read("text/english.txt");
    tok.train(&mut trainer, english.lines().chain(extra.iter().copied())).unwrap();
    tok.to_string(false).unwrap()
}

#[test]
fn a_word_after_a_space_still_meets_its_new_pieces() {
    // SmolLM2's pre-tokenizer keeps ` 捕` in one pre-token and merges `Ġ` with the character's
    // first byte before the extension's merges can run; mirrored here by a base trained on
    // space-led Chinese.
    let spaced = vec![" 中 国 中 文 中 间"; 1000];
    let gpt2 = r#"{"type":"Split","pattern":{"Regex":"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"},"behavior":"Isolated","invert":false}"#;
    let base = byte_level_json_with(&spaced).replacen(
        r#""pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#,
        &format!(r#""pre_tokenizer":{{"type":"Sequence","pretokenizers":[{gpt2},{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}}]}}"#),
        1,
    );
    assert!(base.contains("\"Sequence\""), "the fixture's pre-tokenizer spelling changed");
    let old = Tokenizer::from_str(&base).unwrap();
    let lead = old.encode(" 中国", false).unwrap();
    assert_ne!(lead.get_tokens()[0], "Ġ", "the base must merge a space with a CJK lead byte");
    let pieces: Vec<String> = ["中", "国", "中国", "天", "气", "天气", "（"].iter().map(|s| s.to_string()).collect();
    let ext = extend_json(&base, "spaced", &PieceSource::Pieces(pieces.clone())).unwrap();
    assert!(ext.report.space_split);
    let new = Tokenizer::from_str(&ext.tokenizer_json).unwrap();
    let id = |t: &str| new.token_to_id(&t.bytes().map(|b| bpe::byte_to_char()[b as usize]).collect::<String>()).unwrap();
    let enc = new.encode("天气 中国 （好）", false).unwrap();
    assert_eq!(&enc.get_ids()[..4], &[id("天气"), id(" "), id("中国"), id(" ")], "{:?}", enc.get_tokens());
    assert_eq!(enc.get_ids()[4], id("（"), "{:?}", enc.get_tokens());
    // Without the split the same vocabulary leaves the word in bytes: what the split is for.
    let unsplit = ext.tokenizer_json.replacen(&serde_json::to_string(SPACE_BEFORE_UNSPACED).unwrap(), r#""x^""#, 1);
    let unsplit = Tokenizer::from_str(&unsplit).unwrap();
    assert!(!unsplit.encode("天气 中国", false).unwrap().get_ids().contains(&id("中国")));
    // English tokenizes as before, and Chinese without spaces as without the split.
    for line in read("text/english.txt").lines() {
        assert_eq!(ids(&old, line), ids(&new, line), "{line:?}");
    }
    for line in ["天气中国", "a 1 b，c", "天气\n中国"] {
        assert_eq!(ids(&unsplit, line), ids(&new, line), "{line:?}");
    }
    for text in MIXED {
        assert_eq!(roundtrip(&new, text), *text);
    }
    // Extending again keeps one split; asking for word-initial pieces (` 中`) keeps the base's way.
    let again = extend_json(&ext.tokenizer_json, "again", &PieceSource::Pieces(vec!["间".into()])).unwrap();
    assert!(!again.report.space_split);
    assert_eq!(again.tokenizer_json.matches("Hiragana").count(), 1);
    let initial = extend_json(&base, "initial", &PieceSource::Pieces(vec!["中".into(), " 中".into()])).unwrap();
    assert!(!initial.report.space_split && !initial.tokenizer_json.contains("Hiragana"));
}

fn to_legacy_merges(json: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    let merges = v["model"]["merges"].as_array_mut().unwrap();
    for m in merges.iter_mut() {
        let s = format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap());
        *m = serde_json::Value::String(s);
    }
    v.to_string()
}

#[test]
fn byte_level_bpe_extension() {
    let trained = byte_level_json();
    let english = read("text/english.txt");
    let words = ["我们", "北京", "中国", "中华人民共和国", "你好", "天气"];
    let mut pieces: Vec<String> = "我们北京中国天气".chars().map(String::from).collect();
    pieces.extend(words.iter().map(|w| w.to_string()));
    pieces.push("你好！".into()); // split by the GPT-2 regex: can never be one token
    pieces.push("e".into()); // already a token
    // LLaMA-3 sets `ignore_merges`: whole pre-tokenized words are looked up before merging.
    let ignore_merges = trained.replace("\"ignore_merges\":false", "\"ignore_merges\":true");
    assert_ne!(ignore_merges, trained);
    for (legacy, json) in [(false, trained.clone()), (true, to_legacy_merges(&trained)), (false, ignore_merges)] {
        let ext = extend_json(&json, "trained", &PieceSource::Pieces(pieces.clone())).unwrap();
        let r = &ext.report;
        assert_eq!(r.family, "byte-level BPE");
        assert_eq!(r.skipped_split, vec!["你好！".to_string()]);
        assert_eq!(r.skipped_present, 1);
        assert!(r.unreachable.is_empty() && r.not_single_token.is_empty(), "{r:?}");
        assert!(r.added_intermediate > 0, "characters and byte pairs must be built up");
        assert_eq!(ext.tokenizer_json.contains("\"merges\":[\""), legacy, "merge notation must be kept");
        let old = Tokenizer::from_str(&json).unwrap();
        let new = Tokenizer::from_str(&ext.tokenizer_json).unwrap();
        for line in english.lines() {
            assert_eq!(ids(&old, line), ids(&new, line), "{line:?}");
        }
        let e = &ext.extension;
        let text_pieces = e.pieces.as_ref().unwrap();
        let zg = text_pieces.iter().position(|p| p == "中国").unwrap();
        assert_eq!(e.subtokens[zg], old.encode("中国", false).unwrap().get_ids());
        assert!(e.subtokens.iter().all(|s| !s.is_empty()));
        let enc = new.encode("今天我们在北京说：中华人民共和国，你好！天气 中国", false).unwrap();
        for w in words {
            let id = new.token_to_id(&w.bytes().map(|b| bpe::byte_to_char()[b as usize]).collect::<String>()).unwrap();
            assert!(enc.get_ids().contains(&id), "{w} not one token in {:?}", enc.get_tokens());
        }
        for text in MIXED {
            assert_eq!(roundtrip(&new, text), roundtrip(&old, text));
            assert_eq!(roundtrip(&new, text), *text);
        }
        let before = measure_lines(&old, ["中华人民共和国"]).unwrap();
        let after = measure_lines(&new, ["中华人民共和国"]).unwrap();
        assert_eq!(before.byte_fallback_tokens, before.tokens, "every old token is a byte fragment");
        assert_eq!((after.tokens, after.byte_fallback_tokens), (1, 0));
    }
}

#[test]
fn extension_is_fast_and_deterministic() {
    let l = llama();
    // Again with the chosen pieces given as a list: times the extension without the selection,
    // and the same input must give the same bytes.
    let text = read("llama2-tokenizer/tokenizer.json");
    let source = llama_source();
    let again = extend_json(&text, "llama2-tokenizer/tokenizer.json", &source).unwrap();
    assert_eq!(again.tokenizer_json, l.ext.tokenizer_json);
    assert_eq!(again.extension, l.ext.extension);
    let requested: Vec<String> = l.ext.extension.pieces.as_ref().unwrap().clone();
    let listed = extend_json(&text, "llama2-tokenizer/tokenizer.json", &PieceSource::Pieces(requested)).unwrap();
    eprintln!(
        "extend timings: select + extend {:.2} s, {} listed pieces {:.2} s",
        again.report.seconds, listed.report.requested, listed.report.seconds
    );
    assert_eq!(listed.report.new_vocab, l.ext.report.new_vocab);
    assert!(listed.report.unreachable.is_empty() && listed.report.not_single_token.is_empty());
    assert!(again.report.seconds < 20.0 && listed.report.seconds < 20.0);
}

#[test]
fn plain_char_bpe_edge_cases() {
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"BPE","dropout":null,
        "unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,
        "byte_fallback":false,"vocab":{"a":0,"b":1,"ab":2,"c":3},"merges":["a b"]}}"#;
    let long = "c".repeat(MAX_PIECE_CHARS + 1);
    let pieces: Vec<String> = ["abc", "ba", "aab", "a b", "x", "ab", "abc", &long].iter().map(|s| s.to_string()).collect();
    let ext = extend_json(json, "tiny", &PieceSource::Pieces(pieces)).unwrap();
    let r = &ext.report;
    assert_eq!(r.family, "character BPE");
    assert_eq!((r.skipped_present, r.skipped_duplicate), (1, 1));
    assert_eq!(r.unreachable, vec![long]);
    assert!(r.not_single_token.is_empty(), "{r:?}");
    // " " is added as the character "a b" needs, and "a " or " b" as an intermediate.
    assert_eq!(r.added_requested, 5);
    assert_eq!(r.added_intermediate, 2);
    // A piece with a space cannot be written as a legacy "a b" merge: the list switches notation.
    let compact: String = ext.tokenizer_json.split_whitespace().collect();
    assert!(compact.contains(r#""merges":[["a","b"],["#), "{}", ext.tokenizer_json);
    let old = Tokenizer::from_str(json).unwrap();
    let new = Tokenizer::from_str(&ext.tokenizer_json).unwrap();
    for text in ["ab", "ccab", "cc"] {
        assert_eq!(ids(&old, text), ids(&new, text), "{text}");
    }
    assert_ne!(ids(&old, "abcab"), ids(&new, "abcab"), "text with a new piece changes");
    for p in ["abc", "ba", "aab", "a b", "x"] {
        assert_eq!(new.encode(p, false).unwrap().get_ids().len(), 1, "{p}");
    }
}

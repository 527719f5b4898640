use super::*;
use crate::template::{render, Template, Turn, ALPACA_PREFIX, ALPACA_SUFFIX};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn enc() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json");
        Encoder::from_file(&p, Some(1), 2).expect("llama2 tokenizer fixture")
    })
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------- sources

#[test]
fn text_txt_is_blank_line_separated_blocks() {
    let ex = read_examples(SourceKind::Text, Template::Alpaca, &fixture("text_sample.txt")).unwrap();
    let lines: Vec<usize> = ex.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, vec![1, 4, 6, 10, 13]);
    assert_eq!(ex[0].1, Example::Text("北京是中华人民共和国的首都，也是全国的政治和文化中心。\n这座城市有三千多年的建城史。".into()));
    assert_eq!(ex[4].1, Example::Text("你好。".into()));
}

#[test]
fn text_jsonl_reads_text_field() {
    let ex = read_examples(SourceKind::Text, Template::Alpaca, &fixture("text_sample.jsonl")).unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[1].1, Example::Text("Tea originated in southwest China.".into()));
    assert_eq!(ex[2].1, Example::Text("汉字是世界上最古老的文字之一。\n它已经有几千年的历史。".into()));
}

#[test]
fn parallel_gives_both_directions_and_text() {
    let ex = read_examples(SourceKind::Parallel, Template::Alpaca, &fixture("hsk_zh_en_sample.tsv")).unwrap();
    assert_eq!(ex.len(), 30 * 3);
    let zh2en = format!("{ALPACA_PREFIX}{ZH_TO_EN_INSTRUCTION}\n\n老师，您好！{ALPACA_SUFFIX}");
    let en2zh = format!("{ALPACA_PREFIX}{EN_TO_ZH_INSTRUCTION}\n\nHello, teacher!{ALPACA_SUFFIX}");
    assert_eq!(ex[0], (1, Example::Prompted { prompt: zh2en, response: "Hello, teacher!".into() }));
    assert_eq!(ex[1], (1, Example::Prompted { prompt: en2zh, response: "老师，您好！".into() }));
    assert_eq!(ex[2], (1, Example::Text("老师，您好！\nHello, teacher!".into())));
    assert_eq!(ex[3].0, 2);
}

#[test]
fn alpaca_records_with_and_without_input() {
    let ex = read_examples(SourceKind::Alpaca, Template::Alpaca, &fixture("alpaca_sample.json")).unwrap();
    assert_eq!(ex.len(), 32);
    // Record 1 (line 2 of the pretty-printed array) has an input.
    assert_eq!(ex[0].0, 2);
    let want = format!("{ALPACA_PREFIX}把下面的句子翻译成英文。\n\n老师，您好！{ALPACA_SUFFIX}");
    assert_eq!(ex[0].1, Example::Prompted { prompt: want, response: "Hello, teacher!".into() });
    // Records 17.. have `"input": ""`: the instruction alone.
    let Example::Prompted { prompt, response } = &ex[16].1 else { panic!() };
    assert_eq!(prompt, &render(Template::Alpaca, None, &[], "什么是ai"));
    assert_eq!(response, "人工智能是工程和科学的分支,致力于构建具有思维的机器。");
}

#[test]
fn alpaca_multi_turn_history_and_conversations() {
    let ex = read_examples(SourceKind::Alpaca, Template::Alpaca, &fixture("multiturn.jsonl")).unwrap();
    assert_eq!(ex.len(), 4);
    let h = format!(
        "{ALPACA_PREFIX}Human:你好，你是谁？\nAssistant:我是一个中文助手。\nHuman:上海在哪里？\nAssistant:上海在中国东部。\nHuman:那北京呢？{ALPACA_SUFFIX}"
    );
    assert_eq!(ex[0].1, Example::Prompted { prompt: h, response: "北京是中国的首都，有很多名胜古迹。".into() });
    let hist = vec![Turn { user: "你好".into(), assistant: "你好！有什么可以帮你的？".into() }];
    let c = render(Template::Alpaca, None, &hist, "今天天气怎么样？");
    assert_eq!(ex[1].1, Example::Prompted { prompt: c, response: "我看不到天气预报，不过希望是个晴天。".into() });
    // `input` missing altogether is the same as empty.
    assert_eq!(ex[3].1, Example::Prompted { prompt: render(Template::Alpaca, None, &[], "写一句关于春天的诗。"), response: "春风又绿江南岸。".into() });
}

#[test]
fn tokenized_records_and_labels() {
    let ex = read_examples(SourceKind::Tokenized, Template::Alpaca, &fixture("tokenized_sample.jsonl")).unwrap();
    assert_eq!(ex.len(), 3);
    let (ids, loss) = enc().encode(&ex[0].1).unwrap();
    assert_eq!(ids, vec![1, 15043, 29892, 3186, 29991, 2]);
    assert!(loss.iter().all(|&l| l));
    let (_, loss) = enc().encode(&ex[1].1).unwrap();
    assert_eq!(loss, vec![false, false, false, true, true, true, true]);
}

#[test]
fn spec_deserializes_weights_and_rejects_unknowns() {
    let s: SourceSpec = serde_json::from_str(r#"{"kind": "parallel", "path": "a.tsv", "weight": [0.2, 0.8], "lang": "zh-en"}"#).unwrap();
    assert_eq!(s.weight, Weight::Ramp([0.2, 0.8]));
    assert!((s.weight.at(0.5) - 0.5).abs() < 1e-12);
    let s: SourceSpec = serde_json::from_str(r#"{"kind": "text", "path": "a.txt", "weight": 3}"#).unwrap();
    assert_eq!(s.weight, Weight::Fixed(3.0));
    let s: SourceSpec = serde_json::from_str(r#"{"kind": "text", "path": "a.txt"}"#).unwrap();
    assert_eq!(s.weight, Weight::Fixed(1.0));
    let e = serde_json::from_str::<SourceSpec>(r#"{"kind": "text", "path": "a", "weight": [1, 2, 3]}"#).unwrap_err().to_string();
    assert!(e.contains("[start, end]"), "{e}");
    let e = serde_json::from_str::<SourceSpec>(r#"{"kind": "text", "path": "a", "weight": "high"}"#).unwrap_err().to_string();
    assert!(e.contains("[start, end]"), "{e}");
    let e = serde_json::from_str::<SourceSpec>(r#"{"kind": "book", "path": "a"}"#).unwrap_err().to_string();
    assert!(e.contains("unknown data kind `book`") && e.contains("parallel"), "{e}");
    let e = serde_json::from_str::<SourceSpec>(r#"{"kind": "text", "path": "a", "weigth": 1}"#).unwrap_err().to_string();
    assert!(e.contains("weigth"), "{e}");
}

/// The LLaMA-2 tokenizer with ChatML markers added, BOS = `<|im_start|>` and EOS = `<|im_end|>`:
/// the arrangement of SmolLM2-Instruct, where the markers are the special tokens.
fn chatml_enc() -> (Encoder, u32, u32) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&p).unwrap();
    // SmolLM2's byte-level tokenizer adds nothing around the text (no `<s>` post-processor).
    tok.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    let _ = tok.add_special_tokens(vec![
        tokenizers::AddedToken::from("<|im_start|>", true),
        tokenizers::AddedToken::from("<|im_end|>", true),
    ]);
    let (start, end) = (tok.token_to_id("<|im_start|>").unwrap(), tok.token_to_id("<|im_end|>").unwrap());
    (Encoder::new(tok, Some(start), end).unwrap(), start, end)
}

#[test]
fn chatml_instructions_are_the_chat_prompt_and_close_the_turn_once() {
    let (e, start, end) = chatml_enc();
    for (kind, f) in [(SourceKind::Alpaca, "alpaca_sample.json"), (SourceKind::Alpaca, "multiturn.jsonl"), (SourceKind::Parallel, "hsk_zh_en_sample.tsv")] {
        for (_, ex) in read_examples(kind, Template::ChatMl, &fixture(f)).unwrap() {
            let Example::Prompted { prompt, response } = &ex else { continue };
            assert!(prompt.starts_with("<|im_start|>user\n") && prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
            assert!(response.ends_with("<|im_end|>") && !response.ends_with("<|im_end|><|im_end|>"), "{response}");
            let (ids, loss) = e.encode(&ex).unwrap();
            // The prompt spells BOS itself and the answer ends in EOS: neither is doubled.
            assert_eq!((ids[0], ids[1] != start), (start, true), "{prompt}");
            assert_eq!((ids[ids.len() - 1], ids[ids.len() - 2] != end), (end, true), "{response}");
            // Chat tokenizes the same rendered prompt, so training ids start with chat's ids.
            let chat_ids = e.tokenizer().encode(prompt.as_str(), true).unwrap().get_ids().to_vec();
            assert_eq!(&ids[..chat_ids.len()], &chat_ids[..]);
            assert!(loss[..chat_ids.len()].iter().all(|&l| !l) && loss[chat_ids.len()..].iter().all(|&l| l));
        }
    }
    let ex = read_examples(SourceKind::Alpaca, Template::ChatMl, &fixture("multiturn.jsonl")).unwrap();
    let hist = vec![Turn { user: "你好".into(), assistant: "你好！有什么可以帮你的？".into() }];
    assert_eq!(ex[1].1, Example::Prompted { prompt: render(Template::ChatMl, None, &hist, "今天天气怎么样？"), response: "我看不到天气预报，不过希望是个晴天。<|im_end|>".into() });
}

#[test]
fn template_key_is_checked_against_kind_and_tokenizer() {
    let s: SourceSpec = serde_json::from_str(r#"{"kind": "alpaca", "path": "a.json", "template": "chatml"}"#).unwrap();
    assert_eq!(s.template(), Template::ChatMl);
    assert_eq!(SourceSpec::new(SourceKind::Alpaca, "a.json").template(), Template::Alpaca);
    let e = serde_json::from_str::<SourceSpec>(r#"{"kind": "alpaca", "path": "a", "template": "chatgpt"}"#).unwrap_err().to_string();
    assert!(e.contains("chatgpt") && e.contains("chatml"), "{e}");
    let s: SourceSpec = serde_json::from_str(r#"{"kind": "text", "path": "a.txt", "template": "chatml"}"#).unwrap();
    let e = format!("{:#}", s.check().unwrap_err());
    assert!(e.contains("only to `alpaca` and `parallel`"), "{e}");
    // ChatML with a tokenizer that lacks the markers would train on split-up `<|im_start|>` text.
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "a.jsonl", "{\"instruction\": \"你好\", \"output\": \"你好！\"}\n");
    let spec = SourceSpec { template: Some(Template::ChatMl), ..SourceSpec::new(SourceKind::Alpaca, &p) };
    let e = err_text(load_source(0, &spec, d.path(), enc(), None));
    assert!(e.contains("no `<|im_start|>` token") && e.contains("template = \"alpaca\""), "{e}");
    let (ce, _, _) = chatml_enc();
    assert_eq!(load_source(0, &spec, d.path(), &ce, None).unwrap().docs.offsets.len(), 2);
}

// ---------------------------------------------------------------- tokenization

#[test]
fn prompted_labels_mask_exactly_the_prompt() {
    let e = enc();
    let mut checked = 0;
    for (kind, f) in [(SourceKind::Alpaca, "alpaca_sample.json"), (SourceKind::Alpaca, "multiturn.jsonl"), (SourceKind::Parallel, "hsk_zh_en_sample.tsv")] {
        for (_, ex) in read_examples(kind, Template::Alpaca, &fixture(f)).unwrap() {
            let Example::Prompted { prompt, response } = &ex else { continue };
            let (ids, loss) = e.encode(&ex).unwrap();
            assert_eq!(ids[0], 1);
            assert_eq!(*ids.last().unwrap(), 2);
            let first = loss.iter().position(|&l| l).unwrap();
            // Masked = BOS + prompt, contiguous; unmasked = response + EOS, contiguous.
            assert!(loss[..first].iter().all(|&l| !l) && loss[first..].iter().all(|&l| l));
            let tok = e.tokenizer();
            assert_eq!(&tok.decode(&ids[1..first], false).unwrap(), prompt);
            assert_eq!(&tok.decode(&ids[first..ids.len() - 1], false).unwrap(), response);
            checked += 1;
        }
    }
    assert_eq!(checked, 32 + 4 + 2 * 30);
}

#[test]
fn in_memory_tokenizer_has_a_stable_cache_identity() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json");
    let a = Encoder::new(tokenizers::Tokenizer::from_file(&p).unwrap(), Some(1), 2).unwrap();
    let b = Encoder::new(tokenizers::Tokenizer::from_file(&p).unwrap(), Some(1), 2).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), enc().fingerprint(), "file hash and serialized hash are different identities");
}

#[test]
fn text_documents_get_bos_and_eos() {
    let (ids, loss) = enc().encode(&Example::Text("你好。".into())).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert!(!loss[0] && loss[1..].iter().all(|&l| l));
    assert_eq!(enc().tokenizer().decode(&ids, true).unwrap(), "你好。");
}

#[test]
fn tokenized_source_validation_errors() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "t.jsonl", "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 99999]}\n");
    let e = err_text(load_source(0, &SourceSpec::new(SourceKind::Tokenized, &p), d.path(), enc(), None));
    assert!(e.contains("t.jsonl:2:") && e.contains("99999") && e.contains("vocabulary"), "{e}");
    let p = write(d.path(), "u.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}\n");
    let e = err_text(load_source(0, &SourceSpec::new(SourceKind::Tokenized, &p), d.path(), enc(), None));
    assert!(e.contains("u.jsonl:1:") && e.contains("equal length"), "{e}");
    let p = write(d.path(), "v.jsonl", "\n{\"input_ids\": [1, 2, 3], \"labels\": [-100, 3, 4]}\n");
    let e = err_text(load_source(0, &SourceSpec::new(SourceKind::Tokenized, &p), d.path(), enc(), None));
    assert!(e.contains("v.jsonl:2:") && e.contains("HF-aligned"), "{e}");
}

// ---------------------------------------------------------------- errors

#[test]
fn malformed_inputs_name_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let cases: Vec<(SourceKind, &str, &str, &str)> = vec![
        (SourceKind::Parallel, "p.tsv", "你好\thello\n\n只有中文\n", "p.tsv:3:"),
        (SourceKind::Parallel, "q.tsv", "a\tb\tc\n", "q.tsv:1:"),
        (SourceKind::Parallel, "r.tsv", "a\tb\n\t b\n", "r.tsv:2:"),
        (SourceKind::Alpaca, "a.json", "[\n {\"instruction\": \"x\", \"output\": \"y\"},\n {\"instruction\": \"x\",\n  \"input\": \"\"}\n]\n", "a.json:3:"),
        (SourceKind::Alpaca, "b.json", "[\n {\"instruction\": \"x\", \"output\": \"y\"},\n {\"instruction\": \"x\",\n  \"output\": 5}\n]\n", "b.json:4:"),
        (SourceKind::Alpaca, "c.jsonl", "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\" \"output\": \"y\"}\n", "c.jsonl:2:"),
        (SourceKind::Alpaca, "d.jsonl", "{\"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"human\", \"value\": \"b\"}]}\n", "d.jsonl:1:"),
        (SourceKind::Alpaca, "e.json", "[\n {\"instruction\": \"x\", \"output\": \"y\"},\n", "e.json:"),
        (SourceKind::Alpaca, "f.jsonl", "{\"instruction\": \"x\", \"output\": \"  \"}\n", "f.jsonl:1:"),
        (SourceKind::Text, "g.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n", "g.jsonl:2:"),
        (SourceKind::Text, "h.txt", "\n\n  \n", "no examples"),
        (SourceKind::Tokenized, "i.jsonl", "{\"input_ids\": [1, -5]}\n", "i.jsonl:1:"),
    ];
    for (kind, name, text, want) in cases {
        let p = write(dir, name, text);
        let e = err_text(load_source(0, &SourceSpec::new(kind, &p), dir, enc(), None));
        assert!(e.contains(want), "{name}: `{e}` lacks `{want}`");
        assert!(e.contains("[[data]] #1"), "{name}: `{e}` does not name the recipe block");
    }
    let p = dir.join("bad-utf8.txt");
    std::fs::write(&p, b"ok\nfine\n\xff\xfe\n").unwrap();
    let e = err_text(load_source(0, &SourceSpec::new(SourceKind::Text, &p), dir, enc(), None));
    assert!(e.contains("bad-utf8.txt:3:") && e.contains("UTF-8"), "{e}");
}

#[test]
fn missing_file_empty_recipe_and_weights() {
    let d = tempfile::tempdir().unwrap();
    let spec = SourceSpec::new(SourceKind::Text, "nope.txt");
    let e = err_text(load_sources(&[spec], d.path(), enc(), None));
    assert!(e.contains("[[data]] #1") && e.contains("nope.txt") && e.contains("not found"), "{e}");
    let e = err_text(load_sources(&[], d.path(), enc(), None));
    assert!(e.contains("no [[data]] blocks"), "{e}");
    let spec = SourceSpec::new(SourceKind::Text, fixture("text_sample.txt")).with_weight(Weight::Fixed(-1.0));
    let e = err_text(load_sources(&[spec], d.path(), enc(), None));
    assert!(e.contains("[[data]] #1") && e.contains("weight"), "{e}");

    let a = synth("a", &[5; 10], 0, Weight::Ramp([0.0, 1.0]));
    let b = synth("b", &[5; 10], 10_000, Weight::Fixed(0.0));
    let e = err_text(Mixer::new(vec![a, b], MixConfig::new(16, 0)));
    assert!(e.contains("weights of all [[data]] blocks are 0 at the start"), "{e}");
    let e = err_text(Mixer::new(vec![synth("a", &[5], 0, Weight::Fixed(1.0))], MixConfig::new(1, 0)));
    assert!(e.contains("seq_len"), "{e}");
}

// ---------------------------------------------------------------- packing

/// A synthetic source: document d has ids `base + 1000·d + k` (unique), BOS-like first token
/// without loss, loss on the rest.
fn synth(name: &str, lens: &[usize], base: u32, weight: Weight) -> TokenizedSource {
    let mut docs = Docs { ids: vec![], loss: vec![], offsets: vec![0] };
    for (d, &n) in lens.iter().enumerate() {
        for k in 0..n {
            docs.ids.push(base + 1000 * d as u32 + k as u32);
            docs.loss.push(k > 0);
        }
        docs.offsets.push(docs.ids.len());
    }
    let spec = SourceSpec { name: Some(name.into()), ..SourceSpec::new(SourceKind::Text, name).with_weight(weight) };
    TokenizedSource { spec, path: PathBuf::from(name), docs, from_cache: false }
}

fn lens(n: usize, seed: u64, max: usize) -> Vec<usize> {
    let mut s = seed;
    (0..n).map(|_| 2 + (mix_test_rand(&mut s) % (max as u64 - 1)) as usize).collect()
}

fn mix_test_rand(s: &mut u64) -> u64 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *s >> 33
}

const PAD: u32 = 9_999_999;

#[test]
fn packing_keeps_fitting_documents_whole_and_masks_boundaries() {
    let seq = 64;
    let mut l = lens(300, 7, 60);
    l[10] = 64; // exactly fits
    l[20] = 150; // must be cut
    l[30] = 65;
    let src = synth("s", &l, 0, Weight::Fixed(1.0));
    let docs = src.docs.clone();
    let mut cfg = MixConfig::new(seq, 3);
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![src], cfg).unwrap();
    // One epoch has at most as many rows as pieces; draw enough rows to cover it fully.
    let mut rows = vec![];
    // The stream reads up to `pack_window` (64) pieces ahead and every row takes the oldest
    // pending piece, so 64 rows after the stream wraps, all of epoch 0 has been packed.
    while m.stats().sources[0].epoch == 0 {
        let b = m.next_batch(4, 0, 1).unwrap();
        rows.extend(b.input_ids.into_iter().zip(b.labels));
    }
    let b = m.next_batch(64, 0, 1).unwrap();
    rows.extend(b.input_ids.into_iter().zip(b.labels));
    let (mut non_pad, mut labelled) = (0usize, vec![0usize; docs.ids.len()]);
    let mut seen_whole = vec![0usize; l.len()];
    for (ids, labels) in &rows {
        assert_eq!(ids.len(), seq);
        assert_eq!(labels.len(), seq);
        let n = ids.iter().position(|&t| t == PAD).unwrap_or(seq);
        assert!(ids[n..].iter().all(|&t| t == PAD) && labels[n..].iter().all(|&x| x == -100));
        non_pad += n;
        let mut t = 0;
        while t < n {
            // A piece: consecutive ids of one document.
            let d = (ids[t] / 1000) as usize;
            let k0 = (ids[t] % 1000) as usize;
            let mut e = t + 1;
            while e < n && ids[e] == ids[e - 1] + 1 && (ids[e] / 1000) as usize == d {
                e += 1;
            }
            assert_eq!(labels[t], -100, "first token of a piece must not be a target");
            for j in t + 1..e {
                assert_eq!(labels[j], ids[j] as i64);
                labelled[docs.offsets[d] + k0 + j - t] += 1;
            }
            if l[d] <= seq {
                assert_eq!((k0, e - t), (0, l[d]), "document {d} fits but was cut");
                seen_whole[d] += 1;
            }
            t = e;
        }
    }
    let st = m.stats();
    assert_eq!(st.sources[0].non_pad as usize, non_pad);
    assert_eq!(st.sources[0].positions as usize, rows.len() * seq);
    assert!((st.efficiency() - non_pad as f64 / (rows.len() * seq) as f64).abs() < 1e-12);
    assert!(st.efficiency() > 0.9, "best-fit packing should fill rows: {}", st.summary());
    // Over one epoch every fitting document appears (the epoch boundary may start a second copy
    // inside the final window), and each token of the long documents except the first is
    // labelled: the one-token overlap of cuts loses nothing.
    for (d, &n) in l.iter().enumerate() {
        if n <= seq {
            assert!(seen_whole[d] >= 1, "document {d} missing");
        } else {
            let a = docs.offsets[d];
            assert!((1..n).all(|k| labelled[a + k] >= 1), "document {d} has unlabelled tokens");
            assert_eq!(labelled[a], 0);
        }
    }
}

#[test]
fn efficiency_per_source_is_counted_separately() {
    let a = synth("full", &[16; 50], 0, Weight::Fixed(1.0));
    let b = synth("half", &[9; 50], 100_000, Weight::Fixed(1.0));
    let mut cfg = MixConfig::new(16, 1);
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    m.next_batch(40, 0, 10).unwrap();
    let st = m.stats();
    assert_eq!(st.sources[0].efficiency(), 1.0);
    assert!((st.sources[1].efficiency() - 9.0 / 16.0).abs() < 1e-12);
    let total = (st.sources[0].non_pad + st.sources[1].non_pad) as f64 / (40.0 * 16.0);
    assert!((st.efficiency() - total).abs() < 1e-12);
    assert!(st.summary().contains("half: 56."), "{}", st.summary());
}

#[test]
fn packing_off_puts_one_piece_per_row() {
    let src = synth("s", &[5; 20], 0, Weight::Fixed(1.0));
    let mut cfg = MixConfig::new(16, 1);
    cfg.packing = false;
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![src], cfg).unwrap();
    let b = m.next_batch(10, 0, 1).unwrap();
    assert!(b.input_ids.iter().all(|r| r[4] != PAD && r[5] == PAD));
    assert!((m.stats().efficiency() - 5.0 / 16.0).abs() < 1e-12);
}

#[test]
fn limit_takes_the_first_records() {
    let mut spec = SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv");
    spec.limit = Some(4);
    let s = load_source(0, &spec, &fixture(""), enc(), None).unwrap();
    assert_eq!(s.docs.len(), 12);
    let all = load_source(0, &SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv"), &fixture(""), enc(), None).unwrap();
    assert_eq!(s.docs.ids[..], all.docs.ids[..s.docs.tokens()]);
}

#[test]
fn batch_token_count_matches_labels() {
    let src = synth("s", &lens(100, 3, 40), 0, Weight::Fixed(1.0));
    let mut m = Mixer::new(vec![src], MixConfig::new(32, 5)).unwrap();
    let b = m.next_batch(8, 0, 10).unwrap();
    let n: usize = b.labels.iter().flatten().filter(|&&x| x != -100).count();
    assert_eq!(b.tokens, n);
    assert!(b.labels.iter().all(|r| r[0] == -100));
}

// ---------------------------------------------------------------- mixing

#[test]
fn curriculum_shares_move_from_start_to_end() {
    let a = synth("a", &[4; 200], 0, Weight::Ramp([0.2, 0.8]));
    let b = synth("b", &[4; 200], 100_000, Weight::Ramp([0.8, 0.2]));
    let mut cfg = MixConfig::new(4, 11);
    cfg.pack_window = 1;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    let n = 4000;
    for (step, want) in [(0u64, 0.2), (1000, 0.8), (500, 0.5)] {
        let batch = m.next_batch(n, step, 1000).unwrap();
        let share = batch.source_of_row.iter().filter(|&&s| s == 0).count() as f64 / n as f64;
        assert!((share - want).abs() < 0.03, "step {step}: share {share}, want {want}");
    }
    assert_eq!(m.shares(0.0), vec![0.2, 0.8]);
}

#[test]
fn bucketed_mixing_goes_bin_by_bin() {
    let bins = 4;
    let na = 40;
    let nb = 24;
    let a = synth("a", &vec![8; na], 0, Weight::Fixed(1.0));
    let b = synth("b", &vec![8; nb], 100_000, Weight::Fixed(3.0));
    let mut cfg = MixConfig::new(8, 2);
    cfg.bucketed = true;
    cfg.bins = bins;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    // One row = one document here, so two passes are exactly 2·(na + nb) rows.
    let rows = m.next_batch(2 * (na + nb), 0, 1).unwrap();
    let bin_of = |id: u32| -> (usize, usize) {
        let (s, d) = if id >= 100_000 { (1, ((id - 100_000) / 1000) as usize) } else { (0, (id / 1000) as usize) };
        let n = [na, nb][s];
        (s, (0..bins).find(|&k| d >= k * n / bins && d < (k + 1) * n / bins).unwrap())
    };
    for pass in 0..2 {
        let chunk = &rows.input_ids[pass * (na + nb)..(pass + 1) * (na + nb)];
        let order: Vec<(usize, usize)> = chunk.iter().map(|r| bin_of(r[0])).collect();
        // Bin k of every source before bin k + 1 of any source.
        assert!(order.windows(2).all(|w| w[0].1 <= w[1].1), "pass {pass}: {order:?}");
        // Each pass covers each source exactly once.
        let mut docs: Vec<u32> = chunk.iter().map(|r| r[0]).collect();
        docs.sort();
        docs.dedup();
        assert_eq!(docs.len(), na + nb);
        // Both sources interleave within a bucket.
        assert!(order.iter().take_while(|o| o.1 == 0).any(|o| o.0 == 0));
        assert!(order.iter().take_while(|o| o.1 == 0).any(|o| o.0 == 1));
    }
    // Within-bin order is reshuffled per pass.
    assert_ne!(rows.input_ids[..na + nb], rows.input_ids[na + nb..]);
    // The second pass's last bucket is used up, but the pass only turns on the next draw.
    assert_eq!(m.stats().sources[0].epoch, 1);
}

#[test]
fn epochs_restart_with_a_new_shuffle() {
    let src = synth("s", &[8; 20], 0, Weight::Fixed(1.0));
    let mut m = Mixer::new(vec![src], MixConfig::new(8, 9)).unwrap();
    let b = m.next_batch(60, 0, 1).unwrap();
    let firsts: Vec<u32> = b.input_ids.iter().map(|r| r[0]).collect();
    for e in 0..3 {
        let mut ep = firsts[e * 20..(e + 1) * 20].to_vec();
        ep.sort();
        assert_eq!(ep, (0..20).map(|d| d * 1000).collect::<Vec<_>>(), "epoch {e} is a permutation");
    }
    assert_ne!(firsts[..20], firsts[20..40]);
    assert!(m.stats().sources[0].epoch >= 2);
}

fn mixed_sources() -> Vec<TokenizedSource> {
    vec![
        synth("a", &lens(80, 1, 90), 0, Weight::Ramp([1.0, 0.2])),
        synth("b", &lens(30, 2, 20), 1_000_000, Weight::Ramp([0.1, 1.0])),
        synth("c", &lens(50, 3, 300), 2_000_000, Weight::Fixed(0.5)),
    ]
}

#[test]
fn deterministic_and_resumable() {
    for bucketed in [false, true] {
        let mut cfg = MixConfig::new(48, 1234);
        cfg.bucketed = bucketed;
        cfg.bins = 3;
        let total = 30u64;
        let run = |cfg: &MixConfig| {
            let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
            (0..total).map(|s| m.next_batch(5, s, total).unwrap()).collect::<Vec<_>>()
        };
        let full = run(&cfg);
        assert_eq!(full, run(&cfg), "same seed, same batches");
        let mut other = cfg.clone();
        other.seed = 99;
        assert_ne!(full, run(&other));

        let k = 11;
        let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
        for s in 0..k {
            assert_eq!(m.next_batch(5, s, total).unwrap(), full[s as usize]);
        }
        let saved = serde_json::to_string(&m.state()).unwrap();
        drop(m);
        let mut r = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
        r.restore(serde_json::from_str(&saved).unwrap()).unwrap();
        for s in k..total {
            assert_eq!(r.next_batch(5, s, total).unwrap(), full[s as usize], "bucketed={bucketed} step {s}");
        }
        let st = r.stats();
        assert_eq!(st.sources.iter().map(|s| s.rows).sum::<u64>(), 5 * total);
    }
}

#[test]
fn restore_rejects_other_data_or_options() {
    let cfg = MixConfig::new(48, 1);
    let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
    m.next_batch(3, 0, 10).unwrap();
    let st = m.state();
    let mut other = cfg.clone();
    other.seq_len = 64;
    let mut r = Mixer::new(mixed_sources(), other).unwrap();
    assert!(err_text(r.restore(st.clone())).contains("seq_len 48"));
    let mut fewer = mixed_sources();
    fewer.pop();
    let mut r = Mixer::new(fewer, cfg.clone()).unwrap();
    assert!(err_text(r.restore(st.clone())).contains("3 data sources"));
    let mut changed = mixed_sources();
    changed[1] = synth("b", &lens(31, 2, 20), 1_000_000, Weight::Fixed(1.0));
    let mut r = Mixer::new(changed, cfg).unwrap();
    let e = err_text(r.restore(st));
    assert!(e.contains("#2") && e.contains("same [[data]] files"), "{e}");
}

// ---------------------------------------------------------------- cache and real data

#[test]
fn cache_hit_on_second_run_and_miss_after_change() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for f in ["hsk_zh_en_sample.tsv", "alpaca_sample.json", "text_sample.txt"] {
        std::fs::copy(fixture(f), data.join(f)).unwrap();
    }
    let specs = vec![
        SourceSpec::new(SourceKind::Parallel, "data/hsk_zh_en_sample.tsv"),
        SourceSpec::new(SourceKind::Alpaca, "data/alpaca_sample.json"),
        SourceSpec::new(SourceKind::Text, "data/text_sample.txt"),
    ];
    let cache = d.path().join("cache");
    let first = load_sources(&specs, d.path(), enc(), Some(&cache)).unwrap();
    assert!(first.iter().all(|s| !s.from_cache));
    let second = load_sources(&specs, d.path(), enc(), Some(&cache)).unwrap();
    assert!(second.iter().all(|s| s.from_cache));
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.docs, b.docs);
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3, "no temporary files left");

    // Another EOS id is another key.
    let other = Encoder::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer"), Some(1), 0).unwrap();
    assert!(!load_source(2, &specs[2], d.path(), &other, Some(&cache)).unwrap().from_cache);

    // An edited file (size changes) misses.
    std::fs::write(data.join("text_sample.txt"), "新的文档。\n").unwrap();
    let s = load_source(2, &specs[2], d.path(), enc(), Some(&cache)).unwrap();
    assert!(!s.from_cache);
    assert_eq!(s.docs.len(), 1);

    // A corrupt cache file is a miss and gets rewritten.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let p = entry.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 20] ^= 0xff;
        std::fs::write(&p, b).unwrap();
    }
    let third = load_sources(&specs[..2], d.path(), enc(), Some(&cache)).unwrap();
    assert!(third.iter().all(|s| !s.from_cache));
    assert_eq!(third[0].docs, first[0].docs);
    assert!(load_sources(&specs[..2], d.path(), enc(), Some(&cache)).unwrap().iter().all(|s| s.from_cache));
}

#[test]
fn real_fixture_data_end_to_end() {
    let dir = fixture("");
    let mut specs = vec![
        SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv").with_weight(Weight::Ramp([0.2, 0.8])),
        SourceSpec::new(SourceKind::Alpaca, "alpaca_sample.json"),
        SourceSpec::new(SourceKind::Alpaca, "multiturn.jsonl"),
        SourceSpec::new(SourceKind::Text, "text_sample.txt"),
        SourceSpec::new(SourceKind::Text, "text_sample.jsonl"),
        SourceSpec::new(SourceKind::Tokenized, "tokenized_sample.jsonl"),
    ];
    specs[0].lang = Some("zh-en".into());
    let sources = load_sources(&specs, &dir, enc(), None).unwrap();
    assert_eq!(sources[0].docs.len(), 90);
    assert_eq!(sources[0].name(), "hsk_zh_en_sample.tsv [zh-en]");
    let mut m = Mixer::new(sources, MixConfig::new(256, 42)).unwrap();
    for step in 0..5 {
        let b = m.next_batch(4, step, 5).unwrap();
        assert!(b.tokens > 0);
        for (ids, labels) in b.input_ids.iter().zip(&b.labels) {
            assert!(ids.len() == 256 && labels.len() == 256);
            for (t, &l) in labels.iter().enumerate() {
                assert!(l == -100 || l == ids[t] as i64);
            }
        }
    }
    let st = m.stats();
    assert!(st.efficiency() > 0.8, "{}", st.summary());
}

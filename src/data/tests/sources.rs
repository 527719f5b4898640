use super::*;

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
    assert_eq!(load_source(0, &spec, d.path(), &ce, None).unwrap().docs.len(), 1);
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

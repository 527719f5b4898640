//! The command line, end to end: the flags and JSON keys that are a contract.

mod common;
use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_lists_commands() {
    let (ok, out, _) = run_cli(&["--help"], None);
    assert!(ok);
    for c in ["eval", "generate", "chat", "train", "merge", "vocab", "bench"] {
        assert!(out.contains(c), "--help lacks {c}:\n{out}");
    }
    let (ok, out, _) = run_cli(&["generate", "--help"], None);
    assert!(ok && out.contains("--device") && out.contains("--adapter") && out.contains("--top-p"), "{out}");
}

#[test]
fn eval_ids_json_contract() {
    let exp = tiny().join("expected.safetensors");
    let (ok, out, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--ids", s(&exp), "--json"], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"], 46);
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-9);
    // The same ids as JSONL give the same answer.
    let e = Expected::load();
    let dir = tempfile::tempdir().unwrap();
    let jl = dir.path().join("ids.jsonl");
    let lines: Vec<String> = e.ids("input_ids").iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    std::fs::write(&jl, lines.join("\n")).unwrap();
    let (ok, out2, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--ids", s(&jl), "--json"], None);
    assert!(ok, "{err}");
    let v2: serde_json::Value = serde_json::from_str(out2.trim()).unwrap();
    assert_eq!(v2["mean_nll"], v["mean_nll"]);
}

/// `linly-lora eval ... | head` ends quietly like a Unix tool: no panic message when the reader
/// has gone before the report is printed.
#[test]
fn closed_stdout_ends_quietly() {
    use std::process::{Command, Stdio};
    let exp = tiny().join("expected.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_linly-lora"))
        .args(["eval", "--model", s(&tiny().join("base")), "--ids", s(&exp)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The model takes milliseconds to load; the pipe is closed long before the first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.status.success(), "writing to a closed pipe cannot succeed");
}

#[test]
fn generate_prompt_ids_greedy() {
    let e = Expected::load();
    let prompt: Vec<String> = e.ids("greedy_prompt")[0].iter().map(|x| x.to_string()).collect();
    let want: Vec<String> = e.ids("greedy_output")[0][8..].iter().map(|x| x.to_string()).collect();
    let (ok, out, err) = run_cli(
        &["generate", "--model", s(&tiny().join("merged")), "--prompt-ids", &prompt.join(","), "--greedy", "--max-new-tokens", "16", "--print-ids"],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains(&format!("generated_ids: {}", want.join(","))), "{out}");
}

#[test]
fn text_eval_generate_and_chat_with_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    random_model(&m, 32000, Some(&fixture("llama2-tokenizer")));
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Hello world. 你好，世界！").unwrap();
    let (ok, out, err) = run_cli(&["eval", "--model", s(&m), "--text", s(&text), "--json"], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["chars"], 19);
    let bpc = v["bits_per_char"].as_f64().unwrap();
    let total_bits = v["mean_nll"].as_f64().unwrap() * v["tokens"].as_f64().unwrap() / std::f64::consts::LN_2;
    assert!((bpc - total_bits / 19.0).abs() < 1e-9);
    // Windowed scoring covers the same positions.
    let (ok, out_w, err) = run_cli(&["eval", "--model", s(&m), "--text", s(&text), "--json", "--window", "8"], None);
    assert!(ok, "{err}");
    let vw: serde_json::Value = serde_json::from_str(out_w.trim()).unwrap();
    assert_eq!(vw["tokens"], v["tokens"]);

    let (ok, out, err) = run_cli(&["generate", "--model", s(&m), "--prompt", "Hello", "--max-new-tokens", "5", "--print-ids"], None);
    assert!(ok, "{err}");
    assert!(out.starts_with("Hello") && out.contains("prompt_ids: 1,15043"), "{out}");
    let (ok, out, err) = run_cli(
        &["generate", "--model", s(&m), "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3"],
        None,
    );
    assert!(ok, "{err}\n{out}");

    let (ok, out, err) = run_cli(&["chat", "--model", s(&m), "--max-new-tokens", "4"], Some("你好\n/reset\nhi\n"));
    assert!(ok, "{err}");
    assert!(out.contains("Alpaca") && out.contains("(history cleared)"), "{out}");
    let (ok, _, err) = run_cli(&["chat", "--model", s(&m), "--template", "chatml", "--max-new-tokens", "2"], Some("hi\n/quit\n"));
    assert!(ok, "{err}");
    // A mistyped command is not sent to the model; a path is; --system under alpaca is named.
    let (ok, out, err) = run_cli(&["chat", "--model", s(&m), "--system", "be brief", "--max-new-tokens", "2"], Some("/rest\n/usr/bin is what\n"));
    assert!(ok, "{err}");
    assert!(out.contains("unknown command /rest") && !out.contains("unknown command /usr") && out.contains("--system is not used"), "{out}");
}

#[test]
fn cli_errors_are_clear() {
    let (ok, _, err) = run_cli(&["eval", "--model", "/nope", "--ids", "/nope.jsonl"], None);
    assert!(!ok && err.contains("/nope/config.json"), "{err}");
    let (ok, _, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--text", "/dev/null"], None);
    assert!(!ok && err.contains("no tokenizer.json"), "{err}");
    let (ok, _, err) = run_cli(&["generate", "--model", s(&tiny().join("base")), "--prompt-ids", "1,999999"], None);
    assert!(!ok && err.contains("999999") && err.contains("vocabulary"), "{err}");
    let (ok, _, err) = run_cli(&["generate", "--model", s(&tiny().join("base")), "--prompt-ids", "1", "--device", "cuda:0"], None);
    assert!(!ok && err.contains("--features tch"), "{err}");
    let (ok, _, err) = run_cli(&["train", "x.toml"], None);
    assert!(!ok && err.contains("cannot read recipe x.toml"), "{err}");
}

#[test]
fn merge_cli_and_adapter_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let (ok, stdout, err) = run_cli(&["merge", "--base", s(&tiny().join("base")), "--adapter", s(&tiny().join("adapter")), "--out", s(&out), "--dtype", "f16"], None);
    assert!(ok, "{err}");
    assert!(stdout.contains("merged 14 LoRA pairs") && stdout.contains("vocab 384"), "{stdout}");
    // Merged and unmerged (adapter on the base) score the resized ids alike.
    let e = Expected::load();
    let jl = dir.path().join("ids.jsonl");
    let lines: Vec<String> = e.ids("resized_input_ids").iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    std::fs::write(&jl, lines.join("\n")).unwrap();
    let (ok, a, err) = run_cli(&["eval", "--model", s(&out), "--ids", s(&jl), "--json"], None);
    assert!(ok, "{err}");
    let (ok, b, err) = run_cli(&["eval", "--model", s(&tiny().join("base")), "--adapter", s(&tiny().join("adapter")), "--ids", s(&jl), "--json"], None);
    assert!(ok, "{err}");
    let na = serde_json::from_str::<serde_json::Value>(a.trim()).unwrap()["mean_nll"].as_f64().unwrap();
    let nb = serde_json::from_str::<serde_json::Value>(b.trim()).unwrap()["mean_nll"].as_f64().unwrap();
    assert!((na - nb).abs() / nb < 1e-3, "{na} vs {nb}");
    // A second merge into the same folder is refused, and the folder is untouched.
    let (ok, _, err) = run_cli(&["merge", "--base", s(&tiny().join("base")), "--adapter", s(&tiny().join("adapter")), "--out", s(&out)], None);
    assert!(!ok && err.contains("already exists"), "{err}");
    // The adapter's 384 rows against the base's 320 without the adapter: a clear error on generate.
    let (ok, _, err) = run_cli(&["generate", "--model", s(&tiny().join("base")), "--prompt-ids", "1,350"], None);
    assert!(!ok && err.contains("350") && err.contains("320"), "{err}");
}

/// `vocab extend --max-chars` caps the single characters and gives the rest of `--max-new` to
/// words; without it the split is Linly's 8:20.
#[test]
fn copy_task_repeats_added_pieces_and_refuses_a_plain_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let list = d.join("pieces.txt");
    std::fs::write(&list, "龘\n靐\n齉\n龘靐\n").unwrap();
    let tok = d.join("tok");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&fixture("llama2-tokenizer")), "--add", s(&list), "--out", s(&tok)], None);
    assert!(ok, "{err}");
    let out = d.join("copy.json");
    let args = ["vocab", "copy-task", "--tokenizer", s(&tok), "--examples", "50", "--min-pieces", "2", "--max-pieces", "5", "--out", s(&out)];
    let (ok, stdout, err) = run_cli(&args, None);
    assert!(ok, "{err}");
    assert!(stdout.contains("50 copy examples from 3 characters and 1 longer pieces"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ex = v.as_array().unwrap();
    assert_eq!(ex.len(), 50);
    for e in ex {
        let input = e["input"].as_str().unwrap();
        assert_eq!(input, e["output"].as_str().unwrap());
        let n = input.chars().count();
        assert!((2..=10).contains(&n) && input.chars().all(|c| "龘靐齉".contains(c)), "{input}");
    }
    // An existing output needs --force; a tokenizer that was not extended is refused by name.
    let (ok, _, err) = run_cli(&args, None);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = run_cli(&["vocab", "copy-task", "--tokenizer", s(&fixture("llama2-tokenizer")), "--out", s(&d.join("x.json"))], None);
    assert!(!ok && err.contains("vocab extend"), "{err}");
}

/// `vocab cover` keeps the documents that show added pieces, densest first, in file order, up
/// to the budget; short documents and documents without added pieces are never chosen.
#[test]
fn cover_chooses_documents_that_show_added_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let list = d.join("pieces.txt");
    std::fs::write(&list, "龘\n靐\n齉\n").unwrap();
    let tok = d.join("tok");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&fixture("llama2-tokenizer")), "--add", s(&list), "--out", s(&tok)], None);
    assert!(ok, "{err}");
    let docs = [
        "plain English text without any of the pieces, long enough to be a candidate",
        "龘靐齉 three added pieces in a document that is long enough to count",
        "龘",
        "龘 one added piece in a much longer document that goes on and on and on and on and on",
    ];
    let text = d.join("news.txt");
    std::fs::write(&text, docs.join("\n\n") + "\n").unwrap();
    let out = d.join("cover.txt");
    let args = ["vocab", "cover", "--tokenizer", s(&tok), "--text", s(&text), "--tokens", "5", "--min-chars", "20", "--out", s(&out)];
    let (ok, stdout, err) = run_cli(&args, None);
    assert!(ok, "{err}");
    assert!(stdout.contains("1 of 4 documents (3 candidates)"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{}\n\n", docs[1]));
    // A larger budget adds the sparser document after it, in file order; never the plain one.
    let (ok, _, err) = run_cli(&["vocab", "cover", "--tokenizer", s(&tok), "--text", s(&text), "--tokens", "1000", "--min-chars", "20", "--out", s(&out), "--force"], None);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{}\n\n{}\n\n", docs[1], docs[3]));
    // An existing output needs --force; a tokenizer that was not extended is refused by name.
    let (ok, _, err) = run_cli(&args, None);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = run_cli(&["vocab", "cover", "--tokenizer", s(&fixture("llama2-tokenizer")), "--text", s(&text), "--out", s(&d.join("x.txt"))], None);
    assert!(!ok && err.contains("vocab extend"), "{err}");
    // A text that shows no added piece is an error, not an empty file.
    std::fs::write(&text, format!("{}\n", docs[0])).unwrap();
    let (ok, _, err) = run_cli(&["vocab", "cover", "--tokenizer", s(&tok), "--text", s(&text), "--min-chars", "20", "--out", s(&d.join("y.txt"))], None);
    assert!(!ok && err.contains("shows an added piece") && !d.join("y.txt").exists(), "{err}");
}

#[test]
fn extend_max_chars_moves_pieces_from_characters_to_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Ten characters no LLaMA-2 piece holds, each more frequent than the next.
    let rare: Vec<char> = "龘靐齉爩麤灥厵籱驫鱻".chars().collect();
    let text: String = rare.iter().enumerate().map(|(i, c)| format!("{}\n", c.to_string().repeat(20 - i))).collect();
    let corpus = d.join("corpus.txt");
    std::fs::write(&corpus, format!("{text}{}", "龘靐\n齉爩\n".repeat(3))).unwrap();
    let dict = d.join("dict.txt");
    std::fs::write(&dict, "龘靐 9 n\n齉爩 9 n\n").unwrap();
    let tok = fixture("llama2-tokenizer");
    let pieces = |extra: &[&str], out: &str| -> Vec<String> {
        let o = d.join(out);
        let mut args = vec!["vocab", "extend", "--tokenizer", s(&tok), "--wordlist", s(&dict), "--from-corpus", s(&corpus), "--max-new", "28", "--out", s(&o)];
        args.extend_from_slice(extra);
        let (ok, _, err) = run_cli(&args, None);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.join("vocab_extension.json")).unwrap()).unwrap();
        v["pieces"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
    };
    let chars = |p: &[String]| p.iter().filter(|x| x.chars().count() == 1 && rare.contains(&x.chars().next().unwrap())).count();
    let default = pieces(&[], "a");
    assert_eq!(chars(&default), 8, "{default:?}");
    let capped = pieces(&["--max-chars", "2"], "b");
    assert_eq!(chars(&capped), 2, "{capped:?}");
    // The two most frequent stay, and their word comes in; 齉 and 爩 are cut, so 齉爩 cannot.
    assert!(capped.iter().any(|p| p == "龘靐") && !capped.iter().any(|p| p == "齉爩"), "{capped:?}");
    // Without a word list every piece is a character, and the cap still holds.
    let o = d.join("c");
    let (ok, _, err) = run_cli(&["vocab", "extend", "--tokenizer", s(&tok), "--from-corpus", s(&corpus), "--max-new", "28", "--max-chars", "3", "--out", s(&o)], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.join("vocab_extension.json")).unwrap()).unwrap();
    assert_eq!(v["pieces"].as_array().unwrap().len(), 3, "{v}");
}

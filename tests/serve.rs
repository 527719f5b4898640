//! `linly-lora serve` over real HTTP on loopback, with reqwest as the client, against a small
//! random model carrying the real LLaMA-2 tokenizer (Alpaca template). Answers are checked
//! against the library's `generate` (and once against the `generate` CLI); every wait is
//! bounded in count and time.

mod common;
use common::*;
use linly_lora::infer::generate::{generate, GenerateOptions};
use linly_lora::infer::sample::SamplingParams;
use linly_lora::infer::{self, chat, ModelSpec};
use linly_lora::serve::{ServeOptions, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VOCAB: usize = 32000;

fn model(ctx: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    random_model_ctx(&m, VOCAB, Some(&fixture("llama2-tokenizer")), ctx);
    (dir, m)
}

fn start(m: &Path, f: impl FnOnce(&mut ServeOptions)) -> Server {
    let mut o = ServeOptions::new(ModelSpec::new(m));
    o.port = 0;
    f(&mut o);
    Server::start(&o).unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// What `generate` answers for a chat message (`chat == true`) or a plain completion prompt.
struct Reference {
    loaded: infer::Loaded,
}

impl Reference {
    fn new(m: &Path) -> Self {
        Reference { loaded: infer::load(&ModelSpec::new(m)).unwrap() }
    }

    /// (prompt ids, generated ids, answer text without stop ids).
    fn answer(&self, text: &str, chat_msg: bool, max_new: usize) -> (Vec<u32>, Vec<u32>, String) {
        self.answer_with(text, chat_msg, max_new, false)
    }

    /// `ignore_eos`: generate with no stop ids, as the server does for `"ignore_eos": true`.
    fn answer_with(&self, text: &str, chat_msg: bool, max_new: usize, ignore_eos: bool) -> (Vec<u32>, Vec<u32>, String) {
        let l = &self.loaded;
        let tok = l.tok.as_ref().unwrap();
        let (ids, stop_ids) = if chat_msg {
            let t = chat::default_template(tok);
            (chat::encode_prompt(l, tok, t, &chat::render(t, None, &[], text)).unwrap(), chat::stop_ids(l, tok, t))
        } else {
            (infer::generate::text_prompt(l, text).unwrap(), infer::generate::default_stop_ids(l))
        };
        let stop_ids = if ignore_eos { vec![] } else { stop_ids };
        let opts = GenerateOptions { max_new_tokens: max_new, sampling: SamplingParams::default(), no_cache: false, stop_ids: stop_ids.clone(), kv: Default::default() };
        let new = generate(&l.model, &ids, &opts, &l.device, |_| Ok(true)).unwrap();
        let kept: Vec<u32> = new.iter().copied().filter(|i| !stop_ids.contains(i)).collect();
        let s = tok.decode(&kept).unwrap();
        (ids, new, s)
    }
}

fn chat_body(msg: &str, max_tokens: usize, stream: bool) -> Value {
    json!({ "model": "x", "messages": [{ "role": "user", "content": msg }], "temperature": 0, "max_tokens": max_tokens, "stream": stream })
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))).map(|s| s.to_string()).collect()
}

/// Concatenated content of a chat or completion stream, the finish reason, and the usage chunk.
fn read_stream(events: &[String]) -> (String, Option<String>, Option<Value>) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {events:?}");
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "error in stream: {v}");
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        let Some(c) = v["choices"].as_array().and_then(|c| c.first()) else { continue };
        assert!(finish.is_none(), "content after the finish chunk: {events:?}");
        if let Some(s) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
            text.push_str(s);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (text, finish, usage)
}

async fn post(c: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn assert_error_body(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_and_stop_like_generate() {
    let (_d, m) = model(256);
    let srv = start(&m, |_| {});
    let r = Reference::new(&m);
    let c = client();
    let u = srv.url();

    let h: Value = c.get(format!("{u}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["status"], "ok");
    let models: Value = c.get(format!("{u}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "model");

    // Completion: the same encoding and stop ids as `generate`.
    let (ids, new, want) = r.answer("Once upon a time", false, 20);
    let (s, v) = post(&c, format!("{u}/v1/completions"), &json!({ "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0 })).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], new.len());
    assert_eq!(v["usage"]["total_tokens"], ids.len() + new.len());
    let finish = if new.len() == 20 { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    // The step counters behind `bench serve`: the prompt read in one pass, then decode-only
    // passes of one sequence, each timed.
    let h = health(&c, &u).await;
    assert_eq!(h["prompt_steps"]["steps"], 1, "{h}");
    assert_eq!(h["prompt_steps"]["prompt_ids"], ids.len(), "{h}");
    assert!(h["prompt_steps"]["seconds"].as_f64().unwrap() > 0.0, "{h}");
    let d = h["decode_steps"].as_array().unwrap();
    assert_eq!(d.len(), 1, "one batch size so far: {h}");
    assert_eq!(d[0][0], 1, "{h}");
    let steps = d[0][1].as_u64().unwrap() as usize;
    assert!(steps + 1 >= new.len() && steps <= new.len(), "{steps} decode passes for {} new tokens: {h}", new.len());
    assert!(d[0][2].as_f64().unwrap() > 0.0, "{h}");

    // Chat, non-stream and stream: the same answer, streamed in order.
    let (_, new, want) = r.answer("你好，请介绍一下你自己。", true, 24);
    let (s, v) = post(&c, format!("{u}/v1/chat/completions"), &chat_body("你好，请介绍一下你自己。", 24, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], new.len());

    let mut body = chat_body("你好，请介绍一下你自己。", 24, true);
    body["stream_options"] = json!({ "include_usage": true });
    let resp = c.post(format!("{u}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_data(&resp.text().await.unwrap());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (text, fin, usage) = read_stream(&events);
    assert_eq!(text, want);
    assert_eq!(fin.as_deref(), Some(if new.len() == 24 { "length" } else { "stop" }));
    assert_eq!(usage.unwrap()["completion_tokens"], new.len());

    // Completion stream.
    let resp = c.post(format!("{u}/v1/completions")).json(&json!({ "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "stream": true })).send().await.unwrap();
    let (text, _, usage) = read_stream(&sse_data(&resp.text().await.unwrap()));
    assert_eq!(text, r.answer("Once upon a time", false, 20).2);
    assert!(usage.is_none(), "usage only when asked for");

    // A stop string cuts the answer before it, in both modes.
    let chars: Vec<char> = want.chars().collect();
    assert!(chars.len() >= 4, "answer too short to pick a stop string from: {want:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &want[..want.find(&stop).unwrap()];
    let mut body = chat_body("你好，请介绍一下你自己。", 24, false);
    body["stop"] = json!([stop]);
    let (_, v) = post(&c, format!("{u}/v1/chat/completions"), &body).await;
    assert_eq!(v["choices"][0]["message"]["content"], cut, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let resp = c.post(format!("{u}/v1/chat/completions")).json(&body).send().await.unwrap();
    let (text, fin, _) = read_stream(&sse_data(&resp.text().await.unwrap()));
    assert_eq!((text.as_str(), fin.as_deref()), (cut, Some("stop")));

    // Sampling with a seed repeats.
    let body = json!({ "prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 42 });
    let (_, a) = post(&c, format!("{u}/v1/completions"), &body).await;
    let (_, b) = post(&c, format!("{u}/v1/completions"), &body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    srv.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_get_generate_answers() {
    // Quantized: batched rows are bit-identical to solo ones there (dense f32 products may
    // differ in the last bits with the batch's size, see `Llama::forward_batch`).
    let (_d, f32_model) = model(256);
    let m = quantized(&f32_model, linly_lora::quant::QType::Q8_0);
    // 4 generate at once, 12 wait: all 16 are accepted, none is refused.
    let srv = start(&m, |o| {
        o.max_concurrent = 4;
        o.queue_size = 12;
    });
    let r = Reference::new(&m);
    let c = client();
    let prompts: Vec<String> = (0..16).map(|i| format!("Question {i}: what is {} plus {}?", i * 7, i + 3)).collect();
    let max_new = 32;
    let futs = prompts.iter().enumerate().map(|(i, p)| {
        let (c, u) = (c.clone(), srv.url());
        let stream = i % 2 == 0;
        let (chat_msg, path) = if i % 4 < 2 { (true, "chat/completions") } else { (false, "completions") };
        // This random model ends most Alpaca-template answers with EOS at once, which would
        // compare empty strings: chat clients generate past it (`ignore_eos`).
        let body = if chat_msg {
            let mut b = chat_body(p, max_new, stream);
            b["ignore_eos"] = json!(true);
            b
        } else {
            json!({ "prompt": p, "max_tokens": max_new, "temperature": 0, "stream": stream })
        };
        async move {
            let resp = c.post(format!("{u}/v1/{path}")).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200, "client {i}");
            let text = resp.text().await.unwrap();
            let got = if stream {
                read_stream(&sse_data(&text)).0
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                v["choices"][0]["message"]["content"].as_str().or(v["choices"][0]["text"].as_str()).unwrap().to_string()
            };
            (i, chat_msg, got)
        }
    });
    let t0 = Instant::now();
    let results = futures_util::future::join_all(futs).await;
    assert!(t0.elapsed() < Duration::from_secs(120));
    for (i, chat_msg, got) in results {
        let want = r.answer_with(&prompts[i], chat_msg, max_new, chat_msg).2;
        assert!(!want.is_empty(), "client {i}: an empty answer checks nothing");
        assert_eq!(got, want, "client {i} (chat {chat_msg})");
    }
    let h: Value = c.get(format!("{}/health", srv.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!((h["completed"].as_u64(), h["rejected"].as_u64(), h["active"].as_u64()), (Some(16), Some(0), Some(0)), "{h}");

    // And the CLI agrees with the server for one prompt.
    let (ok, out, err) = run_cli(&["generate", "--model", m.to_str().unwrap(), "--prompt", &prompts[2], "--greedy", "--max-new-tokens", "32", "--print-ids"], None);
    assert!(ok, "{err}");
    let gen_ids: Vec<u32> = out.lines().find_map(|l| l.strip_prefix("generated_ids: ")).unwrap().split(',').map(|x| x.parse().unwrap()).collect();
    assert_eq!(gen_ids, r.answer(&prompts[2], false, max_new).1);
    srv.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_not_crashed() {
    let (_d, m) = model(128);
    let srv = start(&m, |o| {
        o.api_key = Some("sekret".into());
        o.max_body_bytes = 16 * 1024;
    });
    let c = client();
    let u = srv.url();
    let chat = format!("{u}/v1/chat/completions");
    let send = |body: String| c.post(&chat).bearer_auth("sekret").header("content-type", "application/json").body(body).send();

    // Keys.
    let r = c.post(&chat).json(&chat_body("hi", 4, false)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_error_body(&r.json().await.unwrap());
    let r = c.post(&chat).bearer_auth("wrong").json(&chat_body("hi", 4, false)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(c.get(format!("{u}/v1/models")).send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{u}/health")).send().await.unwrap().status(), 200, "health needs no key");

    let long_prompt = "word ".repeat(400);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("malformed JSON", "{\"messages\": [".into(), None),
        ("wrong type", json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": "ten" }).to_string(), Some("max_tokens")),
        ("wrong type of messages", json!({ "messages": "hi" }).to_string(), Some("messages")),
        ("unknown role", json!({ "messages": [{ "role": "wizard", "content": "hi" }] }).to_string(), Some("messages[0].role")),
        ("empty messages", json!({ "messages": [] }).to_string(), Some("messages")),
        ("max_tokens beyond context", json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 100000 }).to_string(), Some("max_tokens")),
        ("prompt longer than context", json!({ "messages": [{ "role": "user", "content": long_prompt }] }).to_string(), Some("messages")),
        ("temperature out of range", json!({ "messages": [{ "role": "user", "content": "hi" }], "temperature": 9 }).to_string(), Some("temperature")),
        ("n > 1", json!({ "messages": [{ "role": "user", "content": "hi" }], "n": 3 }).to_string(), Some("n")),
    ];
    for (what, body, param) in cases {
        let r = send(body).await.unwrap();
        assert_eq!(r.status(), 400, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_error_body(&v);
        assert_eq!(v["error"]["param"].as_str(), param, "{what}: {v}");
    }
    let r = c.post(format!("{u}/v1/completions")).bearer_auth("sekret").json(&json!({ "prompt": long_prompt })).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["error"]["param"].as_str(), v["error"]["code"].as_str()), (Some("prompt"), Some("context_length_exceeded")));
    // Over the body limit.
    let big = json!({ "messages": [{ "role": "user", "content": "x".repeat(64 * 1024) }] }).to_string();
    let r = send(big).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"), "an unread body must end the connection");
    assert_error_body(&r.json().await.unwrap());
    // Unknown path.
    assert_eq!(c.get(format!("{u}/v2/nothing")).send().await.unwrap().status(), 404);
    // Still serving.
    let r = c.post(&chat).bearer_auth("sekret").json(&chat_body("hi", 4, false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    srv.shutdown().unwrap();
}

async fn health(c: &reqwest::Client, u: &str) -> Value {
    c.get(format!("{u}/health")).send().await.unwrap().json().await.unwrap()
}

/// Reads SSE bytes until `n` content chunks arrived (bounded by the client's timeout).
async fn read_chunks(resp: &mut reqwest::Response, n: usize) -> String {
    let mut buf = String::new();
    for _ in 0..10_000 {
        if sse_data(&buf).iter().filter(|d| d.contains("\"content\"") || d.contains("\"text\"")).count() >= n {
            return buf;
        }
        match resp.chunk().await.unwrap() {
            Some(b) => buf.push_str(&String::from_utf8_lossy(&b)),
            None => break,
        }
    }
    panic!("stream ended before {n} chunks: {buf}");
}

/// Polls `/health` until `ok` holds (at most 200 × 50 ms).
async fn wait_health(c: &reqwest::Client, u: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let h = health(c, u).await;
        if ok(&h) {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within 10 s: {}", health(c, u).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_and_disconnect_frees_the_slot() {
    // A long context and `ignore_eos`, so the long requests run far longer than the test needs.
    let (_d, m) = model(4096);
    let srv = start(&m, |o| {
        o.max_concurrent = 1;
        o.queue_size = 1;
    });
    let c = client();
    let u = srv.url();
    let chat = format!("{u}/v1/chat/completions");
    let mut long = chat_body("Tell me a long story.", 4000, true);
    long["ignore_eos"] = json!(true);
    let mut a = c.post(&chat).json(&long).send().await.unwrap();
    assert_eq!(a.status(), 200);
    read_chunks(&mut a, 3).await;
    // B waits in the queue (its stream is open: the role chunk comes at once).
    let mut b = c.post(&chat).json(&long).send().await.unwrap();
    assert_eq!(b.status(), 200);
    read_chunks(&mut b, 1).await;
    wait_health(&c, &u, "A running, B queued", |h| h["active"] == 1 && h["queued"] == 1).await;

    // One generating, one waiting, no more room: 429 at once, not a hang.
    let t0 = Instant::now();
    let (s, v) = post(&c, chat.clone(), &chat_body("hi", 4, false)).await;
    assert_eq!(s, 429, "{v}");
    assert_error_body(&v);
    assert!(t0.elapsed() < Duration::from_secs(10));

    // The waiting client leaves: its place is freed while A still runs.
    drop(b);
    let h = wait_health(&c, &u, "queued request dropped", |h| h["cancelled"] == 1 && h["queued"] == 0).await;
    assert_eq!((h["active"].as_u64(), h["rejected"].as_u64()), (Some(1), Some(1)), "{h}");

    // The running client leaves mid-stream: the worker notices and frees the slot.
    drop(a);
    let h = wait_health(&c, &u, "running request dropped", |h| h["active"] == 0 && h["cancelled"] == 2).await;
    assert_eq!(h["completed"], 0, "the long requests must have been cancelled, not finished: {h}");
    assert_eq!(h["generated_tokens"], 0, "{h}");
    let (s, v) = post(&c, chat, &chat_body("hi", 4, false)).await;
    assert_eq!(s, 200, "{v}");
    srv.shutdown().unwrap();
}

#[test]
fn sigterm_finishes_running_requests_then_exits() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let (_d, m) = model(1024);
    let mut child = Command::new(env!("CARGO_BIN_EXE_linly-lora"))
        .args(["serve", "--model", m.to_str().unwrap(), "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("no address printed within 60 s");
    assert!(line.contains("127.0.0.1"), "binds loopback by default: {line}");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let text = rt.block_on(async {
        let c = client();
        let mut body = chat_body("Tell me a story.", 300, true);
        body["ignore_eos"] = json!(true);
        let mut resp = c.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
        let mut buf = read_chunks(&mut resp, 2).await;
        // SIGTERM mid-answer: the answer still completes.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        while let Some(b) = resp.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&b));
        }
        buf
    });
    let events = sse_data(&text);
    let (_, fin, _) = read_stream(&events);
    assert_eq!(fin.as_deref(), Some("length"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "server still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

/// A prompt that encodes to no tokens (a tokenizer that adds no BOS, an empty string) is the
/// client's mistake: 400 naming `prompt`, not a 500 from the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prompt_is_a_400() {
    let d = tempfile::tempdir().unwrap();
    let tok = d.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(fixture("llama2-tokenizer/tokenizer.json")).unwrap()).unwrap();
    j["post_processor"] = Value::Null;
    std::fs::write(tok.join("tokenizer.json"), j.to_string()).unwrap();
    let m = d.path().join("model");
    std::fs::create_dir(&m).unwrap();
    random_model_ctx(&m, VOCAB, Some(&tok), 64);
    let srv = start(&m, |_| {});
    let r = client().post(format!("{}/v1/completions", srv.url())).json(&json!({ "prompt": "", "max_tokens": 2 })).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_error_body(&v);
    assert_eq!(v["error"]["param"].as_str(), Some("prompt"), "{v}");
    srv.shutdown().unwrap();
}

/// The fixture model quantized (every tensor of type `ty`: the tiny rows fit no k-quant).
fn quantized(m: &Path, ty: linly_lora::quant::QType) -> PathBuf {
    let out = m.with_file_name(format!("model-{ty}"));
    linly_lora::quant::store::quantize_model(m, &out, ty, false, true).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if !out.join(f).exists() && m.join(f).exists() {
            std::fs::copy(m.join(f), out.join(f)).unwrap();
        }
    }
    out
}

/// `Llama::forward_batch` over sequences at different positions, prompts fed in chunks of
/// five beside others decoding, gives every sequence the ids `generate` gives it alone, and
/// with quantized weights logits bit-identical to the solo ones at every step.
#[test]
fn batched_forward_gives_each_sequence_its_solo_answer() {
    use linly_lora::infer::generate::Stepper;
    use linly_lora::model::BatchSeq;
    let (_d, f32_model) = model(256);
    // (weights, KV cache storage): an f16 cache must keep the batched answers exact too.
    use linly_lora::model::KvType;
    use linly_lora::quant::QType;
    let (q4, q8) = (quantized(&f32_model, QType::Q4_0), quantized(&f32_model, QType::Q8_0));
    for (m, ty, kv) in [(&q4, Some(QType::Q4_0), KvType::F32), (&q4, Some(QType::Q4_0), KvType::F16), (&q8, Some(QType::Q8_0), KvType::F32), (&f32_model, None, KvType::F32)] {
        let l = infer::load(&ModelSpec::new(m)).unwrap();
        let opts = |n| GenerateOptions { max_new_tokens: n, sampling: SamplingParams::default(), no_cache: false, stop_ids: vec![], kv };
        let prompts: Vec<Vec<u32>> = (0..5).map(|i| (0..3 + 9 * i).map(|j| (1 + (j * 37 + i * 101) % 31000) as u32).collect()).collect();
        let max_new: Vec<usize> = vec![12, 3, 9, 15, 6];
        let solo: Vec<Vec<u32>> = prompts.iter().zip(&max_new).map(|(p, &n)| generate(&l.model, p, &opts(n), &l.device, |_| Ok(true)).unwrap()).collect();
        // The logits of every solo step, as `generate` computes them (prompt in one pass,
        // then one id at a time through the cache).
        let solo_logits: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .zip(&solo)
            .map(|(p, ids)| {
                let mut cache = l.model.new_cache_of(kv);
                let mut feed = p.clone();
                ids.iter()
                    .map(|&id| {
                        let r = linly_lora::infer::generate::last_logits(l.model.forward(infer::ids_tensor(&feed, &l.device), Some(&mut cache)));
                        feed = vec![id];
                        r
                    })
                    .collect()
            })
            .collect();
        let mut f32_differs = false;
        // Sequence i joins at step i.
        let mut steppers: Vec<(usize, Stepper)> = Vec::new();
        let mut steps = 0;
        while steps < 200 {
            if steppers.len() < prompts.len() {
                let i = steppers.len();
                steppers.push((i, Stepper::new(&l.model, &prompts[i], &opts(max_new[i])).unwrap()));
            }
            let live: Vec<usize> = (0..steppers.len()).filter(|&k| !steppers[k].1.ended(&l.model)).collect();
            if live.is_empty() && steppers.len() == prompts.len() {
                break;
            }
            let mut fed = Vec::new();
            {
                let mut batch = Vec::new();
                for (k, (_, s)) in steppers.iter_mut().enumerate() {
                    if !live.contains(&k) {
                        continue;
                    }
                    let (pending, cache) = s.input().unwrap();
                    let n = pending.len().min(5);
                    fed.push((k, n, n == pending.len()));
                    batch.push(BatchSeq { ids: &pending[..n], cache, logits: n == pending.len() });
                }
                if batch.is_empty() {
                    steps += 1;
                    continue;
                }
                let logits = l.model.forward_batch(&mut batch, &l.device).map(|t| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()).unwrap_or_default();
                let vocab = l.model.vocab_size();
                let mut rows = logits.chunks_exact(vocab);
                for (k, n, want) in fed.drain(..) {
                    let mut row = if want { rows.next().map(|r| r.to_vec()) } else { None };
                    if let Some(r) = &row {
                        let (i, g) = (steppers[k].0, steppers[k].1.generated().len());
                        let same = r.iter().map(|x| x.to_bits()).eq(solo_logits[i][g].iter().map(|x| x.to_bits()));
                        if ty.is_some() {
                            assert!(same, "{ty:?}, {kv:?} cache: sequence {i}, token {g}: batched logits differ from solo");
                        }
                        f32_differs |= !same;
                    }
                    steppers[k].1.fed(n, row.as_deref_mut());
                }
            }
            steps += 1;
        }
        for (i, s) in &steppers {
            assert_eq!(s.generated(), &solo[*i][..], "{ty:?}, {kv:?} cache: sequence {i}");
        }
        if ty.is_none() {
            eprintln!("f32 fixture: batched logits {} the solo ones bit for bit", if f32_differs { "differ from" } else { "equal" });
        }
    }
}

/// The load test: 16 clients at once on a quantized model, all in one batch, with prompts of
/// different lengths (the longest read in several chunks while others decode), different
/// `max_tokens`, some streaming, some leaving mid-stream. Every answer that completes equals
/// the answer `generate` gives that prompt alone; the server answers `/health` afterwards,
/// holds no sequence and no cached position (every KV cache freed), and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_test_sixteen_clients_exact_answers_and_back_to_idle() {
    let (_d, f32_model) = model(1024);
    let m = quantized(&f32_model, linly_lora::quant::QType::Q4_0);
    let srv = start(&m, |o| {
        o.max_concurrent = 16;
        o.queue_size = 4;
    });
    let r = Reference::new(&m);
    let c = client();
    let u = srv.url();
    let idle = health(&c, &u).await;
    assert_eq!((idle["active"].as_u64(), idle["cached_tokens"].as_u64()), (Some(0), Some(0)), "{idle}");
    // Prompt lengths from a few tokens to ~200 (over three prefill chunks).
    let prompts: Vec<String> = (0..16).map(|i| format!("Client {i} asks: {}what next?", "tell me more about numbers ".repeat((i * 7) % 40))).collect();
    let leaves = |i: usize| i % 5 == 3;
    let futs = prompts.iter().enumerate().map(|(i, p)| {
        let (c, u) = (c.clone(), u.clone());
        let stream = i % 2 == 0 || leaves(i);
        let max_new = 4 + (i * 11) % 29;
        let chat_msg = i % 3 != 0;
        let (path, mut body) = if chat_msg {
            ("chat/completions", chat_body(p, if leaves(i) { 400 } else { max_new }, stream))
        } else {
            ("completions", json!({ "prompt": p, "max_tokens": if leaves(i) { 400 } else { max_new }, "temperature": 0, "stream": stream }))
        };
        // The random model ends most answers at once: generate past EOS so answers are long.
        body["ignore_eos"] = json!(true);
        async move {
            let mut resp = c.post(format!("{u}/v1/{path}")).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200, "client {i}");
            if leaves(i) {
                // Reads a few chunks, then goes away mid-answer.
                read_chunks(&mut resp, 3).await;
                drop(resp);
                return (i, chat_msg, max_new, None);
            }
            let text = resp.text().await.unwrap();
            let got = if stream {
                let (t, fin, _) = read_stream(&sse_data(&text));
                assert_eq!(fin.as_deref(), Some("length"), "client {i}");
                t
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                v["choices"][0]["message"]["content"].as_str().or(v["choices"][0]["text"].as_str()).unwrap().to_string()
            };
            (i, chat_msg, max_new, Some(got))
        }
    });
    let t0 = Instant::now();
    let results = futures_util::future::join_all(futs).await;
    assert!(t0.elapsed() < Duration::from_secs(120));
    let mut completed = 0;
    for (i, chat_msg, max_new, got) in results {
        let Some(got) = got else { continue };
        completed += 1;
        let want = r.answer_with(&prompts[i], chat_msg, max_new, true).2;
        assert!(!want.is_empty(), "client {i}: an empty answer checks nothing");
        assert_eq!(got, want, "client {i} (chat {chat_msg}, max_tokens {max_new})");
    }
    let left = 16 - completed;
    assert_eq!(left, 3);
    let h = wait_health(&c, &u, "all done", |h| h["active"] == 0 && h["completed"] == completed && h["cancelled"] == left).await;
    assert_eq!((h["cached_tokens"].as_u64(), h["rejected"].as_u64(), h["failed"].as_u64()), (Some(0), Some(0), Some(0)), "every cache freed: {h}");
    assert!(h["peak_batch"].as_u64().unwrap() > 1, "the requests must have shared forward passes: {h}");
    // Still serving.
    let (s, v) = post(&c, format!("{u}/v1/completions"), &json!({ "prompt": "hello", "max_tokens": 3, "temperature": 0 })).await;
    assert_eq!(s, 200, "{v}");
    srv.shutdown().unwrap();
}

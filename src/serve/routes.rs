//! HTTP handlers: validation and tokenization happen here (so a bad request is answered at
//! once, even under load; tokenization runs in `block_in_place` so a 1 MiB prompt does not
//! stall other connections); generation is handed to the worker as a [`Job`].

use super::api::{self, ApiError, Checked, Usage};
use super::worker::{Event, Job};
use super::AppState;
use crate::infer::generate::{self, GenerateOptions};
use crate::infer::sample::SamplingParams;
use crate::infer::chat;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

type St = State<Arc<AppState>>;

pub async fn health(State(st): St) -> Json<Value> {
    let s = &st.stats;
    let busy = st.capacity - st.slots.available_permits();
    let active = s.active.load(Ordering::Relaxed);
    Json(json!({
        "status": "ok",
        "model": st.model_id,
        "active": active,
        "queued": busy.saturating_sub(active),
        "max_concurrent": st.max_concurrent,
        "queue_size": st.capacity - st.max_concurrent,
        "completed": s.completed.load(Ordering::Relaxed),
        "cancelled": s.cancelled.load(Ordering::Relaxed),
        "rejected": s.rejected.load(Ordering::Relaxed),
        "failed": s.failed.load(Ordering::Relaxed),
        "generated_tokens": s.generated_tokens.load(Ordering::Relaxed),
        "cached_tokens": s.cached_tokens.load(Ordering::Relaxed),
        "last_batch": s.last_batch.load(Ordering::Relaxed),
        "peak_batch": s.peak_batch.load(Ordering::Relaxed),
        // [batch size, steps, seconds] of the forward passes that only decoded.
        "decode_steps": (1..super::worker::STEP_SIZES)
            .filter_map(|b| {
                let n = s.decode_steps[b].load(Ordering::Relaxed);
                (n > 0).then(|| json!([b, n, s.decode_ns[b].load(Ordering::Relaxed) as f64 * 1e-9]))
            })
            .collect::<Vec<_>>(),
        "prompt_steps": {
            "steps": s.prompt_steps.load(Ordering::Relaxed),
            "seconds": s.prompt_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            "prompt_ids": s.prompt_ids.load(Ordering::Relaxed),
        },
    }))
}

pub async fn models(State(st): St) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": st.model_id, "object": "model", "created": st.created, "owned_by": "linly-lora",
                   "max_model_len": st.loaded.model.config.max_position_embeddings }],
    }))
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "unknown path: the endpoints are /v1/chat/completions, /v1/completions, /v1/models and /health")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", "wrong method: the completions take POST, /v1/models and /health take GET")
}

/// `Authorization: Bearer KEY` on every `/v1` route when the server has a key.
pub async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, key)| key));
        let ok = given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_none() { "missing `Authorization: Bearer <key>` header" } else { "wrong API key" };
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", msg).into_response();
            // The body of a rejected request is never read; a reused connection would fail.
            if has_body(&req) {
                resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            }
            return resp;
        }
    }
    next.run(req).await
}

fn has_body(req: &Request) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING) || h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0")
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large", format!("the request body is over the server's limit: {}", r.body_text()))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()), None)
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

pub async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let bytes = body_bytes(body)?;
        let (req, s): (api::ChatRequest, _) = api::parse_body(&bytes)?;
        let checked = api::check_sampling(&s)?;
        let conv = api::conversation(&req.messages)?;
        let tok = st.loaded.tok.as_ref().expect("checked at start-up");
        // The template writes the turns' markers; a marker inside a message would be read as
        // one (a client could end its turn and write a system one).
        api::check_no_markers(&conv, &tok.special_token_texts())?;
        let text = chat::render(st.template, conv.system.as_deref(), &conv.history, &conv.user);
        let ids = tokio::task::block_in_place(|| chat::encode_prompt(&st.loaded, tok, st.template, &text))
            .map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("messages")))?;
        Ok::<_, ApiError>((ids, checked))
    }
    .await;
    match r {
        Ok((ids, checked)) => submit(st, Kind::Chat, ids, checked, "messages").await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let bytes = body_bytes(body)?;
        let (req, s): (api::CompletionRequest, _) = api::parse_body(&bytes)?;
        let checked = api::check_sampling(&s)?;
        // Exactly `linly-lora generate --prompt`'s encoding.
        let text = req.prompt_text()?;
        let ids = tokio::task::block_in_place(|| generate::text_prompt(&st.loaded, text)).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("prompt")))?;
        Ok::<_, ApiError>((ids, checked))
    }
    .await;
    match r {
        Ok((ids, checked)) => submit(st, Kind::Completion, ids, checked, "prompt").await,
        Err(e) => e.into_response(),
    }
}

/// Budget check, queue admission (429 when full), then the answer as JSON or SSE.
async fn submit(st: Arc<AppState>, kind: Kind, prompt: Vec<u32>, c: Checked, prompt_param: &str) -> Response {
    // The client's mistake, not the server's: without a BOS token an empty prompt encodes to
    // nothing, and the model has no position to predict from.
    if prompt.is_empty() {
        return ApiError::bad_request(format!("`{prompt_param}` encodes to no tokens: send some text"), Some(prompt_param)).into_response();
    }
    let ctx = st.loaded.model.config.max_position_embeddings;
    let max_new = match api::token_budget(prompt.len(), c.max_tokens, st.default_max_tokens, ctx) {
        Ok(m) => m,
        Err(mut e) => {
            if e.param.as_deref() == Some("messages") {
                e.param = Some(prompt_param.to_string());
            }
            return e.into_response();
        }
    };
    let stop_ids = match (c.ignore_eos, kind) {
        (true, _) => vec![],
        (false, Kind::Chat) => st.chat_stop_ids.clone(),
        (false, Kind::Completion) => st.completion_stop_ids.clone(),
    };
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling: SamplingParams {
            greedy: c.temperature == 0.0,
            temperature: c.temperature,
            top_p: c.top_p,
            top_k: 0,
            repetition_penalty: c.repetition_penalty,
            seed: c.seed.unwrap_or_else(rand::random),
        },
        no_cache: false,
        stop_ids,
        kv: st.kv,
    };
    let Ok(permit) = st.slots.clone().try_acquire_owned() else {
        st.stats.rejected.fetch_add(1, Ordering::Relaxed);
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "server_busy",
            format!("the server is busy ({} generating, queue of {} full); retry later", st.max_concurrent, st.capacity - st.max_concurrent),
        )
        .into_response();
    };
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job { prompt, opts, stop_strings: c.stop.clone(), tx, permit };
    if st.jobs.send(job).is_err() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "shutting_down", "the generation worker has stopped").into_response();
    }
    let meta = Meta { id: st.next_id(kind == Kind::Chat), created: super::now_secs(), model: st.model_id.clone(), kind, prompt_tokens };
    if c.stream {
        sse(meta, rx, c.include_usage).into_response()
    } else {
        collect(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

fn worker_error(msg: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "generation_failed", msg)
}

async fn collect(m: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Delta(s)) => text.push_str(&s),
            Some(Event::Done { finish, completion_tokens }) => {
                let usage = Usage::new(m.prompt_tokens, completion_tokens);
                let reason = api::finish_reason(finish);
                let body = match m.kind {
                    Kind::Chat => json!({
                        "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
                        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": reason }],
                        "usage": usage,
                    }),
                    Kind::Completion => json!({
                        "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
                        "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": reason }],
                        "usage": usage,
                    }),
                };
                return Json(body).into_response();
            }
            Some(Event::Error(e)) => return worker_error(e).into_response(),
            None => return worker_error("the generation worker stopped before the answer was complete".into()).into_response(),
        }
    }
}

impl Meta {
    fn chunk(&self, delta: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(s) = delta {
                    d.insert("content".into(), json!(s));
                }
                json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "choices": [{ "index": 0, "delta": d, "logprobs": null, "finish_reason": finish }] })
            }
            Kind::Completion => json!({ "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                        "choices": [{ "index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish }] }),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage })
    }
}

struct SseState {
    rx: UnboundedReceiver<Event>,
    out: VecDeque<SseEvent>,
    done: bool,
    meta: Meta,
    include_usage: bool,
}

/// OpenAI's stream: a role chunk (chat), content chunks, a chunk with the finish reason, an
/// optional usage chunk, then `data: [DONE]`. Dropping the stream (client gone) drops `rx`,
/// which the worker sees as a cancelled request.
fn sse(meta: Meta, rx: UnboundedReceiver<Event>, include_usage: bool) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut out = VecDeque::new();
    if meta.kind == Kind::Chat {
        out.push_back(data(meta.chunk(Some(""), true, None)));
    }
    let st = SseState { rx, out, done: false, meta, include_usage };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(ev) = st.out.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Delta(s)) => {
                    let c = st.meta.chunk(Some(&s), false, None);
                    st.out.push_back(data(c));
                }
                Some(Event::Done { finish, completion_tokens }) => {
                    let c = st.meta.chunk(if st.meta.kind == Kind::Chat { None } else { Some("") }, false, Some(api::finish_reason(finish)));
                    st.out.push_back(data(c));
                    if st.include_usage {
                        let u = st.meta.usage_chunk(Usage::new(st.meta.prompt_tokens, completion_tokens));
                        st.out.push_back(data(u));
                    }
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Event::Error(e)) => {
                    st.out.push_back(data(worker_error(e).body()));
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    st.out.push_back(data(worker_error("the generation worker stopped before the answer was complete".into()).body()));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_comparison() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secreT", b"secret"));
        assert!(!super::constant_time_eq(b"secret1", b"secret"));
        assert!(!super::constant_time_eq(b"", b"secret"));
    }
}

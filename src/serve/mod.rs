//! `linly-lora serve`: an OpenAI-compatible HTTP service (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`) over one loaded model.
//!
//! - [`api`]: the wire format and its validation (pure; unit-tested).
//! - [`routes`]: handlers; requests are validated and tokenized on the async runtime.
//! - [`worker`]: one thread that generates up to `max_concurrent` requests with continuous
//!   batching (one forward pass per decode step for all of them); a bounded queue in front
//!   (full → 429).

pub mod api;
pub mod routes;
pub mod worker;

use crate::infer::{self, chat, generate, Loaded, ModelSpec};
use crate::template::Template;
use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub spec: ModelSpec,
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Requests generating at once (batched: one forward pass per step for all of them).
    pub max_concurrent: usize,
    /// Requests waiting beyond those; one more is answered 429.
    pub queue_size: usize,
    pub api_key: Option<String>,
    /// Chat template; `None` picks it from the tokenizer like `chat` does.
    pub template: Option<Template>,
    /// New tokens for a request without `max_tokens` (cut to what the context leaves).
    pub default_max_tokens: usize,
    pub max_body_bytes: usize,
    /// The id in `/v1/models` and in responses (default: the model folder's name).
    pub model_name: Option<String>,
    /// How every request's KV cache stores keys and values.
    pub kv: crate::model::KvType,
}

impl ServeOptions {
    pub fn new(spec: ModelSpec) -> Self {
        ServeOptions {
            spec,
            host: "127.0.0.1".into(),
            port: 8080,
            max_concurrent: 16,
            queue_size: 64,
            api_key: None,
            template: None,
            default_max_tokens: 256,
            max_body_bytes: 1 << 20,
            model_name: None,
            kv: Default::default(),
        }
    }
}

/// Shared by all handlers.
pub struct AppState {
    pub loaded: Arc<Loaded>,
    jobs: std::sync::mpsc::Sender<worker::Job>,
    /// `max_concurrent + queue_size` permits; each admitted request holds one until the worker
    /// drops it (finished, failed, or its client went away).
    slots: Arc<Semaphore>,
    capacity: usize,
    max_concurrent: usize,
    stats: Arc<worker::Stats>,
    model_id: String,
    template: Template,
    chat_stop_ids: Vec<u32>,
    completion_stop_ids: Vec<u32>,
    api_key: Option<String>,
    default_max_tokens: usize,
    kv: crate::model::KvType,
    created: u64,
    counter: AtomicU64,
}

impl AppState {
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn template(&self) -> Template {
        self.template
    }

    fn next_id(&self, chat: bool) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{:x}{:06x}", if chat { "chatcmpl" } else { "cmpl" }, self.created, n)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Loads the model and starts the worker thread.
fn prepare(opts: &ServeOptions) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>)> {
    if opts.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if opts.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: pass a non-empty key or leave the flag out");
    }
    let loaded = Arc::new(infer::load(&opts.spec)?);
    let tok = loaded
        .tok
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("serve needs a tokenizer: {} has no tokenizer.json (pass --tokenizer DIR)", opts.spec.model.display()))?;
    let template = opts.template.unwrap_or_else(|| chat::default_template(tok));
    let chat_stop_ids = chat::stop_ids(&loaded, tok, template);
    let completion_stop_ids = generate::default_stop_ids(&loaded);
    let model_id = opts.model_name.clone().unwrap_or_else(|| {
        let p = std::fs::canonicalize(&opts.spec.model).unwrap_or_else(|_| opts.spec.model.clone());
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let capacity = opts.max_concurrent + opts.queue_size;
    let (jobs, rx) = std::sync::mpsc::channel();
    let stats = Arc::new(worker::Stats::default());
    let worker = {
        let (loaded, stats, n) = (loaded.clone(), stats.clone(), opts.max_concurrent);
        std::thread::Builder::new().name("linly-serve-worker".into()).spawn(move || worker::run(loaded, rx, n, stats)).context("cannot start the worker thread")?
    };
    let st = AppState {
        loaded,
        jobs,
        slots: Arc::new(Semaphore::new(capacity)),
        capacity,
        max_concurrent: opts.max_concurrent,
        stats,
        model_id,
        template,
        chat_stop_ids,
        completion_stop_ids,
        api_key: opts.api_key.clone(),
        default_max_tokens: opts.default_max_tokens,
        kv: opts.kv,
        created: now_secs(),
        counter: AtomicU64::new(0),
    };
    Ok((Arc::new(st), worker))
}

fn router(st: Arc<AppState>, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), routes::auth));
    Router::new()
        .route("/health", get(routes::health))
        .merge(v1)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            use axum::response::IntoResponse;
            api::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", "internal error while handling the request").into_response()
        }))
        .with_state(st)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two threads are plenty for I/O: the compute runs on the worker thread (and rayon's pool).
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")
}

async fn bind(opts: &ServeOptions) -> Result<tokio::net::TcpListener> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let hint = match opts.host.parse::<std::net::IpAddr>() {
        Ok(_) => "port in use? pick another with --port",
        Err(_) => "--host takes an IP address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
    };
    tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr} ({hint})"))
}

/// Runs the service until Ctrl-C or SIGTERM, then stops taking connections, lets running and
/// queued requests finish, and returns. A second signal exits at once.
pub fn serve(opts: &ServeOptions, on_listening: impl FnOnce(SocketAddr, &AppState)) -> Result<()> {
    let (st, worker) = prepare(opts)?;
    let rt = runtime()?;
    rt.block_on(async {
        let listener = bind(opts).await?;
        on_listening(listener.local_addr()?, &st);
        let app = router(st.clone(), opts.max_body_bytes);
        drop(st);
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.context("HTTP server failed")
    })?;
    // The router (and with it the job sender) is gone: the worker finishes and exits.
    worker.join().map_err(|_| anyhow::anyhow!("the generation worker panicked"))?;
    Ok(())
}

async fn shutdown_signal() {
    wait_signal().await;
    eprintln!("linly-lora serve: shutting down; finishing running requests (signal again to exit now)");
    tokio::spawn(async {
        wait_signal().await;
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// A server running on its own thread, for tests and benchmarks.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Loads the model, binds (use port 0 for a free one) and serves in the background.
    /// Callable from inside an async runtime too (it runs its own on a thread).
    pub fn start(opts: &ServeOptions) -> Result<Server> {
        let (st, worker) = prepare(opts)?;
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = runtime()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let max_body = opts.max_body_bytes;
        let thread = std::thread::spawn(move || -> Result<()> {
            rt.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router(st, max_body))
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
            })?;
            worker.join().map_err(|_| anyhow::anyhow!("the generation worker panicked"))?;
            Ok(())
        });
        Ok(Server { addr, stop: Some(stop), thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: running requests finish first.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

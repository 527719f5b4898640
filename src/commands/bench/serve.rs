//! `bench serve`: aggregate generated tokens/s of `serve` at several client counts, over real
//! HTTP on loopback. The clients are plain blocking HTTP/1.1 over `TcpStream`, one thread
//! each, so the measurement includes the whole server path (parsing, tokenization, queue,
//! worker, JSON) and nothing of a client library's own runtime.

use crate::infer::ModelSpec;
use crate::serve::{ServeOptions, Server};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    pub spec: ModelSpec,
    pub clients: Vec<usize>,
    /// New tokens per request (`ignore_eos`, so every request generates exactly this many).
    pub max_tokens: usize,
    /// Requests each client sends, one after another.
    pub requests_per_client: usize,
}

#[derive(Debug, Serialize)]
pub struct ServeBenchRow {
    pub clients: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Against the 1-client row of the same run.
    pub ratio_vs_1: Option<f64>,
    pub mean_latency_s: f64,
    /// 95th percentile of the per-request latencies (nearest rank).
    pub p95_latency_s: f64,
    /// CPU time of the whole process (server, worker, compute threads, clients) during the row:
    /// on a shared machine, tokens per CPU second show the work a step costs where the wall
    /// clock also shows the other jobs.
    pub cpu_s: f64,
    pub tokens_per_cpu_s: f64,
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the pointer it is given.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    if r != 0 {
        return f64::NAN;
    }
    // SAFETY: initialised by the successful call above.
    let u = unsafe { u.assume_init() };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// One `POST /v1/completions`, non-streaming; returns the completion token count.
fn request(addr: SocketAddr, body: &str) -> Result<usize> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, json) = resp.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("server answered {}: {json}", head.lines().next().unwrap_or(""));
    }
    let v: serde_json::Value = serde_json::from_str(json).context("response body is not JSON")?;
    v["usage"]["completion_tokens"].as_u64().map(|n| n as usize).ok_or_else(|| anyhow::anyhow!("no usage in {v}"))
}

pub fn run(o: &ServeBenchOptions) -> Result<Vec<ServeBenchRow>> {
    let max_clients = o.clients.iter().copied().max().unwrap_or(1);
    let mut so = ServeOptions::new(o.spec.clone());
    so.port = 0;
    so.max_concurrent = max_clients;
    so.queue_size = max_clients;
    let server = Server::start(&so)?;
    let addr = server.addr;
    let body = |c: usize, r: usize| {
        serde_json::json!({ "prompt": format!("Request {r} from client {c}: write a short story about a robot who learns to cook."),
            "max_tokens": o.max_tokens, "temperature": 0, "ignore_eos": true })
        .to_string()
    };
    // Warm-up: first calls allocate and start the thread pools.
    request(addr, &body(0, 0))?;
    let mut rows: Vec<ServeBenchRow> = Vec::new();
    for &n in &o.clients {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|c| {
                let bodies: Vec<String> = (0..o.requests_per_client).map(|r| body(c, r)).collect();
                std::thread::spawn(move || -> Result<(usize, Vec<f64>)> {
                    let (mut tokens, mut latency) = (0, Vec::new());
                    for b in bodies {
                        let t = Instant::now();
                        tokens += request(addr, &b)?;
                        latency.push(t.elapsed().as_secs_f64());
                    }
                    Ok((tokens, latency))
                })
            })
            .collect();
        let (mut tokens, mut lat) = (0, Vec::new());
        for h in handles {
            let (t, l) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            tokens += t;
            lat.extend(l);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        let latency: f64 = lat.iter().sum();
        let p95 = lat.get(((lat.len() as f64 * 0.95).ceil() as usize).clamp(1, lat.len().max(1)) - 1).copied().unwrap_or(0.0);
        let seconds = t0.elapsed().as_secs_f64();
        let cpu_s = cpu_seconds() - c0;
        let requests = n * o.requests_per_client;
        let tps = tokens as f64 / seconds;
        let base = rows.iter().find(|r| r.clients == 1).map(|r| r.tokens_per_s);
        rows.push(ServeBenchRow { clients: n, requests, generated_tokens: tokens, seconds, tokens_per_s: tps, ratio_vs_1: base.map(|b| tps / b), mean_latency_s: latency / requests as f64, p95_latency_s: p95, cpu_s, tokens_per_cpu_s: tokens as f64 / cpu_s });
    }
    server.shutdown()?;
    Ok(rows)
}

pub fn markdown(rows: &[ServeBenchRow]) -> String {
    let mut s = String::from("| clients | requests | tokens | seconds | tokens/s | vs 1 client | mean latency, s | p95 latency, s | tokens per CPU s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        let ratio = r.ratio_vs_1.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
        s.push_str(&format!("| {} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.1} |\n", r.clients, r.requests, r.generated_tokens, r.seconds, r.tokens_per_s, ratio, r.mean_latency_s, r.p95_latency_s, r.tokens_per_cpu_s));
    }
    s
}

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
    /// Sampling temperature of every request (0: greedy).
    pub temperature: f32,
    /// Times the whole sweep of client counts runs, one after another in the same server.
    /// Each round's ratios are against that round's own 1-client row, and the summary takes
    /// their median: on a shared machine a slow patch then spoils one round's pair, not the
    /// comparison of two rows measured a minute apart.
    pub rounds: usize,
    /// The server's KV cache storage (`serve --kv-cache`).
    pub kv: crate::model::KvType,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchRow {
    /// The round this row was measured in (from 1), or `None` for the summary over rounds
    /// (every figure the median over rounds; only when more than one round ran).
    pub round: Option<usize>,
    pub clients: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Against the 1-client row of the same round (summary: the median of the rounds' ratios).
    pub ratio_vs_1: Option<f64>,
    /// Summary rows: the lowest and highest of the rounds' `ratio_vs_1`.
    pub ratio_range: Option<[f64; 2]>,
    pub mean_latency_s: f64,
    /// 95th percentile of the per-request latencies (nearest rank).
    pub p95_latency_s: f64,
    /// CPU time of the whole process (server, worker, compute threads, clients) during the row:
    /// on a shared machine, tokens per CPU second show the work a step costs where the wall
    /// clock also shows the other jobs.
    pub cpu_s: f64,
    pub tokens_per_cpu_s: f64,
    /// Mean wall time of the forward passes that only decoded, with every client's sequence in
    /// the batch (from the server's `/health` counters; `None` when no such step ran).
    pub decode_step_ms: Option<f64>,
    /// Decode-only throughput against 1 client: `clients × step(1) / step(clients)`, what
    /// `ratio_vs_1` would be without prompts and arrivals. Robust to a noisy machine where
    /// the whole-run ratio is not: each step is timed, and the mean spans hundreds of them.
    pub decode_ratio_vs_1: Option<f64>,
    /// Share of the worker's forward time spent in passes that read prompt ids.
    pub prompt_share: f64,
}

/// The server's step counters (`GET /health`): decode-only passes as (batch → steps,
/// seconds), and the prompt passes' seconds.
#[derive(Default, Clone)]
struct StepCounters {
    decode: std::collections::BTreeMap<usize, (f64, f64)>,
    prompt_s: f64,
}

fn step_counters(addr: SocketAddr) -> Result<StepCounters> {
    let v = http_json(addr, "GET /health", "")?;
    let mut c = StepCounters { prompt_s: v["prompt_steps"]["seconds"].as_f64().unwrap_or(0.0), ..Default::default() };
    for e in v["decode_steps"].as_array().into_iter().flatten() {
        if let (Some(b), Some(n), Some(t)) = (e[0].as_u64(), e[1].as_f64(), e[2].as_f64()) {
            c.decode.insert(b as usize, (n, t));
        }
    }
    Ok(c)
}

impl StepCounters {
    /// The counters accumulated since `before`.
    fn since(&self, before: &StepCounters) -> StepCounters {
        let decode = self.decode.iter().map(|(&b, &(n, t))| {
            let (n0, t0) = before.decode.get(&b).copied().unwrap_or((0.0, 0.0));
            (b, (n - n0, t - t0))
        });
        StepCounters { decode: decode.collect(), prompt_s: self.prompt_s - before.prompt_s }
    }

    fn mean_step_s(&self, batch: usize) -> Option<f64> {
        self.decode.get(&batch).filter(|(n, _)| *n > 0.0).map(|(n, t)| t / n)
    }

    fn total_s(&self) -> f64 {
        self.prompt_s + self.decode.values().map(|(_, t)| t).sum::<f64>()
    }
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

/// One HTTP/1.1 request (`line` = method and path) with a JSON body (may be empty); the
/// answer's JSON, or an error unless the status is 200.
fn http_json(addr: SocketAddr, line: &str, body: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(s, "{line} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, json) = resp.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed HTTP response to {line}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{line}: server answered {}: {json}", head.lines().next().unwrap_or(""));
    }
    serde_json::from_str(json).with_context(|| format!("{line}: response body is not JSON"))
}

/// One `POST /v1/completions`, non-streaming; returns the completion token count.
fn request(addr: SocketAddr, body: &str) -> Result<usize> {
    let v = http_json(addr, "POST /v1/completions", body)?;
    v["usage"]["completion_tokens"].as_u64().map(|n| n as usize).ok_or_else(|| anyhow::anyhow!("no usage in {v}"))
}

pub fn run(o: &ServeBenchOptions) -> Result<Vec<ServeBenchRow>> {
    if o.rounds == 0 {
        bail!("bench serve: --rounds must be at least 1");
    }
    let max_clients = o.clients.iter().copied().max().unwrap_or(1);
    let mut so = ServeOptions::new(o.spec.clone());
    so.port = 0;
    so.max_concurrent = max_clients;
    so.queue_size = max_clients;
    so.kv = o.kv;
    let server = Server::start(&so)?;
    let addr = server.addr;
    // Warm-up: first calls allocate and start the thread pools.
    request(addr, &request_body(o, 0, 0))?;
    let mut rounds: Vec<Vec<ServeBenchRow>> = Vec::new();
    for round in 1..=o.rounds {
        let mut rows: Vec<ServeBenchRow> = Vec::new();
        for &n in &o.clients {
            let row = measure(addr, o, n, rows.iter().find(|r| r.clients == 1))?;
            rows.push(ServeBenchRow { round: (o.rounds > 1).then_some(round), ..row });
        }
        rounds.push(rows);
    }
    server.shutdown()?;
    let summary = if o.rounds > 1 { summarize(&rounds) } else { Vec::new() };
    Ok(rounds.into_iter().flatten().chain(summary).collect())
}

fn request_body(o: &ServeBenchOptions, c: usize, r: usize) -> String {
    serde_json::json!({ "prompt": format!("Request {r} from client {c}: write a short story about a robot who learns to cook."),
        "max_tokens": o.max_tokens, "temperature": o.temperature, "seed": (c * 1000 + r) as u64, "ignore_eos": true })
    .to_string()
}

/// One row: `n` clients, each sending its requests one after another; ratios against `base`
/// (the same round's 1-client row) when there is one.
fn measure(addr: SocketAddr, o: &ServeBenchOptions, n: usize, base: Option<&ServeBenchRow>) -> Result<ServeBenchRow> {
    let steps0 = step_counters(addr)?;
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|c| {
            let bodies: Vec<String> = (0..o.requests_per_client).map(|r| request_body(o, c, r)).collect();
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
    let steps = step_counters(addr)?.since(&steps0);
    let step = steps.mean_step_s(n);
    let step1 = base.and_then(|r| r.decode_step_ms);
    let decode_ratio_vs_1 = match (step, step1) {
        (Some(s), Some(s1)) => Some(n as f64 * s1 / (s * 1e3)),
        _ => None,
    };
    let prompt_share = if steps.total_s() > 0.0 { steps.prompt_s / steps.total_s() } else { 0.0 };
    Ok(ServeBenchRow {
        round: None,
        clients: n,
        requests,
        generated_tokens: tokens,
        seconds,
        tokens_per_s: tps,
        ratio_vs_1: base.map(|b| tps / b.tokens_per_s),
        ratio_range: None,
        mean_latency_s: latency / requests as f64,
        p95_latency_s: p95,
        cpu_s,
        tokens_per_cpu_s: tokens as f64 / cpu_s,
        decode_step_ms: step.map(|s| s * 1e3),
        decode_ratio_vs_1,
        prompt_share,
    })
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

/// One row per client count (in the first round's order): each figure the median of that
/// count's rows over the rounds, ratios the median of the rounds' own ratios (each against
/// its round's 1-client row), and the range those ratios spanned. Counts are summed.
fn summarize(rounds: &[Vec<ServeBenchRow>]) -> Vec<ServeBenchRow> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|r0| {
            let rows: Vec<&ServeBenchRow> = rounds.iter().flatten().filter(|r| r.clients == r0.clients).collect();
            let med = |f: &dyn Fn(&ServeBenchRow) -> f64| median(rows.iter().map(|r| f(r)).collect()).unwrap_or(f64::NAN);
            let opt = |f: &dyn Fn(&ServeBenchRow) -> Option<f64>| median(rows.iter().filter_map(|r| f(r)).collect());
            let ratios: Vec<f64> = rows.iter().filter_map(|r| r.ratio_vs_1).collect();
            let range = (!ratios.is_empty()).then(|| [ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max)]);
            ServeBenchRow {
                round: None,
                clients: r0.clients,
                requests: rows.iter().map(|r| r.requests).sum(),
                generated_tokens: rows.iter().map(|r| r.generated_tokens).sum(),
                seconds: rows.iter().map(|r| r.seconds).sum(),
                tokens_per_s: med(&|r| r.tokens_per_s),
                ratio_vs_1: median(ratios),
                ratio_range: range,
                mean_latency_s: med(&|r| r.mean_latency_s),
                p95_latency_s: med(&|r| r.p95_latency_s),
                cpu_s: rows.iter().map(|r| r.cpu_s).sum(),
                tokens_per_cpu_s: med(&|r| r.tokens_per_cpu_s),
                decode_step_ms: opt(&|r| r.decode_step_ms),
                decode_ratio_vs_1: opt(&|r| r.decode_ratio_vs_1),
                prompt_share: med(&|r| r.prompt_share),
            }
        })
        .collect()
}

/// The rows as a Markdown table. With several rounds a first column names each row's round
/// and the summary rows ("median"), whose ratio cell also shows the rounds' range.
pub fn markdown(rows: &[ServeBenchRow]) -> String {
    let rounds = rows.iter().any(|r| r.round.is_some());
    let head = "clients | requests | tokens | seconds | tokens/s | vs 1 client | mean latency, s | p95 latency, s | tokens per CPU s | decode step, ms | decode-only vs 1 client | prompt share |";
    let mut s = if rounds { format!("| round | {head}\n|{}\n", " --- |".repeat(13)) } else { format!("| {head}\n|{}\n", " --- |".repeat(12)) };
    let opt = |x: Option<f64>, p: usize| x.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "–".into());
    for r in rows {
        if rounds {
            s.push_str(&format!("| {} ", r.round.map(|n| n.to_string()).unwrap_or_else(|| "median".into())));
        }
        let ratio = match r.ratio_range {
            Some([lo, hi]) => format!("{} ({lo:.2}–{hi:.2})", opt(r.ratio_vs_1, 2)),
            None => opt(r.ratio_vs_1, 2),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {:.0} % |\n",
            r.clients,
            r.requests,
            r.generated_tokens,
            r.seconds,
            r.tokens_per_s,
            ratio,
            r.mean_latency_s,
            r.p95_latency_s,
            r.tokens_per_cpu_s,
            opt(r.decode_step_ms, 2),
            opt(r.decode_ratio_vs_1, 2),
            r.prompt_share * 100.0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: usize, clients: usize, tps: f64, ratio: Option<f64>) -> ServeBenchRow {
        ServeBenchRow {
            round: Some(round),
            clients,
            requests: 4 * clients,
            generated_tokens: 64 * 4 * clients,
            seconds: 1.0,
            tokens_per_s: tps,
            ratio_vs_1: ratio,
            ratio_range: None,
            mean_latency_s: 0.1 * round as f64,
            p95_latency_s: 0.2,
            cpu_s: 2.0,
            tokens_per_cpu_s: tps / 2.0,
            decode_step_ms: Some(5.0 + round as f64),
            decode_ratio_vs_1: ratio.map(|r| r + 0.5),
            prompt_share: 0.1,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    /// The summary's ratio is the median of the rounds' paired ratios, not the ratio of the
    /// median throughputs: here round 2's slow 1-client row would otherwise decide it.
    #[test]
    fn summary_takes_the_median_of_paired_ratios() {
        let rounds = vec![
            vec![row(1, 1, 100.0, None), row(1, 8, 360.0, Some(3.6))],
            vec![row(2, 1, 80.0, None), row(2, 8, 320.0, Some(4.0))],
            vec![row(3, 1, 110.0, None), row(3, 8, 330.0, Some(3.0))],
        ];
        let s = summarize(&rounds);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].clients, s[1].clients), (1, 8));
        assert!(s.iter().all(|r| r.round.is_none()));
        assert_eq!(s[0].ratio_vs_1, None);
        assert_eq!(s[0].tokens_per_s, 100.0);
        assert_eq!(s[1].tokens_per_s, 330.0);
        assert_eq!(s[1].ratio_vs_1, Some(3.6));
        assert_eq!(s[1].ratio_range, Some([3.0, 4.0]));
        assert_eq!(s[1].decode_ratio_vs_1, Some(4.1));
        assert_eq!(s[1].requests, 3 * 32);
        assert_eq!(s[1].mean_latency_s, 0.2);
        let md = markdown(&rounds.iter().flatten().cloned().chain(s).collect::<Vec<_>>());
        assert!(md.starts_with("| round | clients |"), "{md}");
        assert!(md.contains("| median | 8 | 96 | 6144 |"), "{md}");
        assert!(md.contains("3.60 (3.00–4.00)"), "{md}");
        assert_eq!(md.lines().nth(1).unwrap().matches("---").count(), 13);
    }
}

//! The generation worker: one thread that owns the model's compute, takes jobs from a bounded
//! queue and advances up to `max_concurrent` of them in turn, one decode step each per round.
//!
//! Every sequence makes exactly the forward calls [`crate::infer::generate::generate`] makes
//! (prefill, then one token at a time through its own KV cache), so greedy answers equal
//! `linly-lora generate --greedy` token for token. Decode steps are interleaved, not batched
//! into one matrix product: see `BENCHMARKS.md` for what that means for throughput.

use super::api::{scan_stop, StopScan};
use crate::infer::generate::{Finish, GenerateOptions, Stepper};
use crate::infer::Loaded;
use crate::tokenizer::StreamDecoder;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::OwnedSemaphorePermit;

/// What the worker tells a request's handler, in order: text deltas, then one `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    Delta(String),
    Done { finish: Finish, completion_tokens: usize },
    Error(String),
}

/// A validated request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub stop_strings: Vec<String>,
    pub tx: UnboundedSender<Event>,
    /// The request's place in the queue; dropping the job frees it.
    pub permit: OwnedSemaphorePermit,
}

/// Counters shown by `GET /health`.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub completed: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub generated_tokens: AtomicU64,
}

struct Seq {
    job: Job,
    stepper: Stepper,
    dec: StreamDecoder,
    /// Decoded answer so far (stop ids excluded) and how much of it was sent.
    text: String,
    sent: usize,
    /// Non-stop ids, for the final full decode.
    ids: Vec<u32>,
}

enum Outcome {
    Running,
    Finished,
    Cancelled,
    Failed,
}

/// Runs until every job sender is gone and all admitted work is done.
pub fn run(loaded: Arc<Loaded>, rx: Receiver<Job>, max_concurrent: usize, stats: Arc<Stats>) {
    let mut active: Vec<Seq> = Vec::new();
    // Jobs taken off the channel but not started; kept here so that one whose client left
    // is dropped (and its place freed) at the next round, not when it reaches the front.
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    while open || !active.is_empty() || !waiting.is_empty() {
        // Block only when idle, so a busy worker never waits on the channel.
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => open = false,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        waiting.retain(|j| {
            let gone = j.tx.is_closed();
            if gone {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        while active.len() < max_concurrent {
            match waiting.pop_front() {
                Some(job) => admit(&loaded, job, &mut active, &stats),
                None => break,
            }
        }
        stats.active.store(active.len(), Ordering::Relaxed);
        // One step of each admitted sequence.
        let mut i = 0;
        while i < active.len() {
            let outcome = step(&loaded, &mut active[i], &stats);
            let counter = match outcome {
                Outcome::Running => {
                    i += 1;
                    continue;
                }
                Outcome::Finished => &stats.completed,
                Outcome::Cancelled => &stats.cancelled,
                Outcome::Failed => &stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // `remove`, not `swap_remove`: the turn order stays the order of arrival.
            active.remove(i);
            stats.active.store(active.len(), Ordering::Relaxed);
        }
    }
}

fn admit(loaded: &Loaded, job: Job, active: &mut Vec<Seq>, stats: &Stats) {
    match Stepper::new(&loaded.model, &job.prompt, &job.opts) {
        Ok(stepper) => active.push(Seq { job, stepper, dec: StreamDecoder::new(), text: String::new(), sent: 0, ids: Vec::new() }),
        Err(e) => {
            // The handler validated the prompt already; this is a last line of defence.
            let _ = job.tx.send(Event::Error(format!("{e:#}")));
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn step(loaded: &Loaded, seq: &mut Seq, stats: &Stats) -> Outcome {
    // A closed channel means the client went away (its handler or response stream was
    // dropped): stop here and free the slot.
    if seq.job.tx.is_closed() {
        return Outcome::Cancelled;
    }
    let r = catch_unwind(AssertUnwindSafe(|| advance(loaded, seq)));
    match r {
        Ok(Ok(events)) => {
            let mut done = false;
            for ev in events {
                if let Event::Done { completion_tokens, .. } = ev {
                    stats.generated_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
                    done = true;
                }
                if seq.job.tx.send(ev).is_err() {
                    return Outcome::Cancelled;
                }
            }
            if done {
                Outcome::Finished
            } else {
                Outcome::Running
            }
        }
        Ok(Err(e)) => {
            let _ = seq.job.tx.send(Event::Error(format!("{e:#}")));
            Outcome::Failed
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let _ = seq.job.tx.send(Event::Error(format!("generation failed: {msg}")));
            Outcome::Failed
        }
    }
}

/// One token: returns the events to send, in order (none when the token produced no sendable
/// text yet; a last delta and `Done` at the end).
fn advance(loaded: &Loaded, seq: &mut Seq) -> anyhow::Result<Vec<Event>> {
    let tok = loaded.tok.as_ref().ok_or_else(|| anyhow::anyhow!("the server needs a tokenizer"))?;
    let stops = &seq.job.stop_strings;
    let mut finished = match seq.stepper.step(&loaded.model, &loaded.device) {
        Some(id) => {
            if !seq.job.opts.stop_ids.contains(&id) {
                seq.ids.push(id);
                if let Some(s) = seq.dec.push(tok, id)? {
                    seq.text.push_str(&s);
                }
            }
            seq.stepper.finish()
        }
        None => Some(seq.stepper.finish().unwrap_or(Finish::Length)),
    };
    if finished.is_some() {
        // Bytes the stream decoder held back (an incomplete character at the very end) are
        // flushed as the full decode has them, so the answer equals `decode(ids)`.
        let full = tok.decode(&seq.ids)?;
        if full.len() > seq.text.len() && full.starts_with(seq.text.as_str()) {
            seq.text = full;
        }
    }
    let mut delta = String::new();
    match scan_stop(&seq.text, seq.sent, stops) {
        StopScan::Hit(p) => {
            delta.push_str(&seq.text[seq.sent..p]);
            seq.sent = p;
            seq.stepper.stop();
            finished = Some(Finish::Stop);
        }
        StopScan::Safe(p) => {
            // At the end, text held back as a possible stop-string prefix is sent after all.
            let upto = if finished.is_some() { seq.text.len() } else { p };
            if upto > seq.sent {
                delta.push_str(&seq.text[seq.sent..upto]);
                seq.sent = upto;
            }
        }
    }
    let mut events = Vec::new();
    if !delta.is_empty() {
        events.push(Event::Delta(delta));
    }
    if let Some(finish) = finished {
        events.push(Event::Done { finish, completion_tokens: seq.stepper.generated().len() });
    }
    Ok(events)
}

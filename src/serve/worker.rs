//! The generation worker: one thread that owns the model's compute, takes jobs from a bounded
//! queue and runs up to `max_concurrent` of them with continuous batching.
//!
//! Each step is one forward pass ([`crate::model::Llama::forward_batch`]) over every active
//! sequence: one new token for each sequence that is decoding, and the next chunk of the
//! prompt of each that is not, at most [`PREFILL_CHUNK`] prompt ids per step while others
//! decode, so a new prompt never stalls the running streams for more than a step. Every
//! weight is read once per step for all of them. A request joins at the next step and leaves
//! the batch when it finishes, fails or its client goes away; each keeps its own KV cache.
//!
//! Exactness: every operation on the batch's shared rows computes each row on its own, and the
//! quantized kernels give a token bit for bit the same sum alone or beside others, so with a
//! quantized model a greedy answer equals `linly-lora generate --greedy` token for token
//! whatever else is in the batch (a prompt fed in chunks included: attention treats every
//! query row on its own too). Dense f32 weights go through the `gemm` crate, whose summation
//! order depends on the row count (see `forward_batch`).

use super::api::{scan_stop, StopScan};
use crate::infer::generate::{Finish, GenerateOptions, Stepper};
use crate::infer::Loaded;
use crate::io::safetensors::FloatType;
use crate::model::BatchSeq;
use burn::tensor::FloatDType;
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
    /// Positions held in the KV caches of the active sequences (0 when idle).
    pub cached_tokens: AtomicUsize,
    /// Sequences in the last step's forward pass.
    pub last_batch: AtomicUsize,
    /// The most sequences one forward pass has carried.
    pub peak_batch: AtomicUsize,
    /// Forward passes that only decoded (one new id per sequence), by sequences in the pass
    /// (index = batch size; larger batches are not counted), and their summed wall time. The
    /// throughput of a serving run mixes prompts and arrivals into its ratios; these give the
    /// cost of one decode step at each batch size alone (`bench serve`).
    pub decode_steps: [AtomicU64; STEP_SIZES],
    pub decode_ns: [AtomicU64; STEP_SIZES],
    /// Forward passes that read prompt ids (alone or beside decoding sequences), their summed
    /// wall time and the prompt ids they read.
    pub prompt_steps: AtomicU64,
    pub prompt_ns: AtomicU64,
    pub prompt_ids: AtomicU64,
}

/// Batch sizes `0..STEP_SIZES` are tracked in [`Stats::decode_steps`].
pub const STEP_SIZES: usize = 32;

/// Prompt ids fed per step, over all prompts being read, while other sequences decode.
pub const PREFILL_CHUNK: usize = 64;
/// The same when no sequence is decoding (nobody waits on the step).
pub const PREFILL_IDLE_CHUNK: usize = 512;

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
        let outcomes = step_all(&loaded, &mut active, &stats);
        let mut i = 0;
        active.retain(|_| {
            let o = &outcomes[i];
            i += 1;
            let counter = match o {
                Outcome::Running => return true,
                Outcome::Finished => &stats.completed,
                Outcome::Cancelled => &stats.cancelled,
                Outcome::Failed => &stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            false
        });
        stats.active.store(active.len(), Ordering::Relaxed);
        stats.cached_tokens.store(active.iter().map(|s| s.stepper.cached()).sum(), Ordering::Relaxed);
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

/// What one sequence does in a step.
enum Plan {
    /// Its client went away, or it ended before this step.
    Skip(Outcome),
    /// Feeds this many of its pending ids in the batch.
    Feed(usize),
    /// No cache (`no_cache`): a forward pass of its own.
    Alone,
    /// Waits for the next step (prompt budget spent).
    Wait,
}

/// One step of every active sequence: one forward pass for all of them. Returns each
/// sequence's outcome, in order.
fn step_all(loaded: &Loaded, active: &mut [Seq], stats: &Stats) -> Vec<Outcome> {
    let decoding = active.iter().filter(|s| s.stepper.cached() > 0 && s.stepper.pending().len() == 1).count();
    let full_budget = if decoding > 0 { PREFILL_CHUNK } else { PREFILL_IDLE_CHUNK };
    let mut budget = full_budget;
    let plans: Vec<Plan> = active
        .iter_mut()
        .map(|seq| {
            // A closed channel means the client went away (its handler or response stream
            // was dropped): stop here and free the slot.
            if seq.job.tx.is_closed() {
                return Plan::Skip(Outcome::Cancelled);
            }
            if seq.stepper.ended(&loaded.model) {
                // Ended before a forward (the answer or the context is full).
                return Plan::Skip(report(loaded, seq, None, stats));
            }
            let Some((pending, cache)) = seq.stepper.input() else { return Plan::Alone };
            if cache.is_empty() || pending.len() > 1 {
                // A prompt, read in chunks from the step's budget, first come first served
                // (one that gets none waits for the next step; the first always gets some).
                let n = pending.len().min(budget);
                if n == 0 {
                    return Plan::Wait;
                }
                budget -= n;
                Plan::Feed(n)
            } else {
                Plan::Feed(1)
            }
        })
        .collect();
    // Every prompt id fed this step came out of the budget.
    let prompt_ids = full_budget - budget;
    // The batched forward pass, on a rayon worker as `Stepper::step` runs its own (see there).
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut batch: Vec<BatchSeq> = Vec::new();
        let mut wants = Vec::new();
        for (seq, plan) in active.iter_mut().zip(&plans) {
            if let Plan::Feed(n) = *plan {
                let (pending, cache) = seq.stepper.input().expect("planned with a cache");
                let logits = n == pending.len();
                wants.push(logits);
                batch.push(BatchSeq { ids: &pending[..n], cache, logits });
            }
        }
        // f16/bf16 activations take burn's composed attention and flex's half-precision
        // matmul, where a batched step measured slower than its sequences one after another
        // (BENCHMARKS.md): those run one forward pass per sequence, as before batching.
        let together = if loaded.model.dtype == FloatType::F32 { batch.len().max(1) } else { 1 };
        stats.last_batch.store(together.min(batch.len()), Ordering::Relaxed);
        stats.peak_batch.fetch_max(together.min(batch.len()), Ordering::Relaxed);
        if batch.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let fed = batch.len();
        let t0 = std::time::Instant::now();
        let mut rows: Vec<f32> = Vec::new();
        for group in batch.chunks_mut(together) {
            let logits = rayon::scope(|_| loaded.model.forward_batch(group, &loaded.device));
            if let Some(l) = logits {
                let l = l.cast(FloatDType::F32).try_into_vec_as::<f32>().expect("f32 logits");
                // One group (every f32 step): its rows as they are, not a copy.
                if rows.is_empty() {
                    rows = l;
                } else {
                    rows.extend(l);
                }
            }
        }
        let ns = t0.elapsed().as_nanos() as u64;
        if prompt_ids > 0 {
            stats.prompt_steps.fetch_add(1, Ordering::Relaxed);
            stats.prompt_ns.fetch_add(ns, Ordering::Relaxed);
            stats.prompt_ids.fetch_add(prompt_ids as u64, Ordering::Relaxed);
        } else if fed < STEP_SIZES {
            stats.decode_steps[fed].fetch_add(1, Ordering::Relaxed);
            stats.decode_ns[fed].fetch_add(ns, Ordering::Relaxed);
        }
        (rows, wants)
    }));
    // Each fed sequence's row of the step's logits, in place (a copy per sequence was 1.5 MB
    // a step at eight sequences, on the thread the step waits for).
    let (mut rows, wants) = match r {
        Ok(l) => l,
        Err(panic) => {
            // The caches of the batch are in an unknown state: every sequence in it fails.
            let msg = panic_message(panic);
            return active
                .iter_mut()
                .zip(plans)
                .map(|(seq, plan)| match plan {
                    Plan::Skip(o) => o,
                    Plan::Feed(_) => {
                        let _ = seq.job.tx.send(Event::Error(format!("generation failed: {msg}")));
                        Outcome::Failed
                    }
                    Plan::Alone | Plan::Wait => Outcome::Running,
                })
                .collect();
        }
    };
    let mut chunks = rows.chunks_exact_mut(loaded.model.vocab_size().max(1));
    let mut logits = wants.into_iter().map(|w| if w { chunks.next() } else { None });
    active
        .iter_mut()
        .zip(plans)
        .map(|(seq, plan)| match plan {
            Plan::Skip(o) => o,
            Plan::Wait => Outcome::Running,
            Plan::Feed(n) => {
                let l = logits.next().expect("one entry per fed sequence");
                let id = seq.stepper.fed(n, l);
                match id {
                    // Still reading its prompt.
                    None => Outcome::Running,
                    Some(id) => report(loaded, seq, Some(Some(id)), stats),
                }
            }
            Plan::Alone => {
                let r = catch_unwind(AssertUnwindSafe(|| seq.stepper.step(&loaded.model, &loaded.device)));
                match r {
                    Ok(id) => report(loaded, seq, Some(id), stats),
                    Err(panic) => {
                        let _ = seq.job.tx.send(Event::Error(format!("generation failed: {}", panic_message(panic))));
                        Outcome::Failed
                    }
                }
            }
        })
        .collect()
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into())
}

/// [`emit`] and [`send`]; a panic while decoding fails this request only.
fn report(loaded: &Loaded, seq: &mut Seq, stepped: Option<Option<u32>>, stats: &Stats) -> Outcome {
    let events = match catch_unwind(AssertUnwindSafe(|| emit(loaded, seq, stepped))) {
        Ok(r) => r,
        Err(panic) => Err(anyhow::anyhow!("generation failed: {}", panic_message(panic))),
    };
    send(seq, events, stats)
}

/// Sends a step's events to the client; the sequence's outcome.
fn send(seq: &mut Seq, events: anyhow::Result<Vec<Event>>, stats: &Stats) -> Outcome {
    match events {
        Ok(events) => {
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
        Err(e) => {
            let _ = seq.job.tx.send(Event::Error(format!("{e:#}")));
            Outcome::Failed
        }
    }
}

/// The events of one step: `stepped` is `Some(what the step chose)` after a forward pass
/// (`Some(None)`: generation had ended), `None` when it ended before one. Returns the events
/// to send, in order (none when the token produced no sendable text yet; a last delta and
/// `Done` at the end).
fn emit(loaded: &Loaded, seq: &mut Seq, stepped: Option<Option<u32>>) -> anyhow::Result<Vec<Event>> {
    let tok = loaded.tok.as_ref().ok_or_else(|| anyhow::anyhow!("the server needs a tokenizer"))?;
    let stops = &seq.job.stop_strings;
    let mut finished = match stepped.flatten() {
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

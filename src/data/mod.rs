//! Training data for `linly-lora train`: sources → tokens (streamed, parallel, in a token store) → packed rows →
//! a seeded, resumable mix.
//!
//! ```ignore
//! let enc = Encoder::from_file(&tokenizer_json, Some(bos), eos)?;
//! let sources = load_sources(&recipe.data, recipe_dir, &enc, Some(&cache_dir))?;
//! let mut mixer = Mixer::new(sources, MixConfig::new(2048, 42))?;
//! if let Some(s) = checkpoint.mixer_state { mixer.restore(s)?; }
//! for step in start..total {
//!     let batch = mixer.next_batch(batch_size, step, total)?;   // HF-aligned labels
//!     // ... train; on checkpoint: save serde_json::to_vec(&mixer.state())
//! }
//! eprintln!("{}", mixer.stats().summary());
//! ```
//!
//! # Sources (`[[data]]`: `kind`, `path`, `weight`, `lang`, `name`, `limit`)
//! - `text`: `.txt`, one document per blank-line-separated block (lines inside a block are kept
//!   with their newlines); or `.jsonl` / `.json` array of `{"text": ...}`. Each document is
//!   `[bos] + tokens + [eos]` with loss on every token after BOS: the EOS teaches the model
//!   where documents end, which matters once documents are packed together.
//! - `parallel`: TSV `zh<TAB>en`. Each pair gives three examples, in this order: zh→en
//!   ([`ZH_TO_EN_INSTRUCTION`] + `\n\n` + zh → en), en→zh ([`EN_TO_ZH_INSTRUCTION`] + `\n\n` +
//!   en → zh), both rendered exactly like an alpaca record `{instruction, input}` so the model
//!   sees one prompt format; and the text `"{zh}\n{en}"` (loss on all).
//! - `alpaca`: JSON array or JSONL. Records are `{instruction, input, output}`, `input`
//!   optional; a non-empty input is appended as `{instruction}\n\n{input}`. Multi-turn records
//!   use either `history: [[q, a], ...]` (Chinese-LLaMA-Alpaca / Firefly style; `instruction`
//!   and `output` are the last turn) or `conversations: [{"from": "human"|"gpt", "value"}, ...]`
//!   (ShareGPT/BELLE style; `role`/`content` and `user`/`assistant` also accepted). Both render
//!   with the Linly Alpaca template from [`crate::template`]: earlier turns go into the
//!   instruction as `Human:{q}\nAssistant:{a}\n...Human:{msg}`. Only the final answer has loss
//!   (earlier answers sit inside the instruction, where the template gives them no place to be
//!   a target). The example is `[bos] + prompt + response + [eos]`, labels -100 on BOS and
//!   prompt.
//! - `tokenized`: JSONL (or JSON array) `{"input_ids": [...], "labels": [...]}`, `labels`
//!   optional (= input_ids). Used as given: no BOS/EOS added. Labels must be HF-aligned
//!   (each equal to its input id or -100); ids must be below [`Encoder::vocab_size`].
//!
//! Every malformed record is an error naming `file:line`; nothing is skipped silently.
//!
//! # Labels
//! [`Batch::labels`] follow HF: `labels[t]` is `input_ids[t]` or -100, and the trainer shifts
//! (logits at t are scored against `labels[t + 1]`). The first token of every packed piece is
//! -100, so no loss crosses from one document to the next (see `pack.rs`); documents are not
//! masked from attending to each other.
//!
//! # Packing, mixing, epochs, resume
//! See `pack.rs` (full-sentence best-fit packing; only documents longer than `seq_len` are
//! cut) and [`Mixer`] (curriculum weights, bucketed mode, epochs reshuffled by the seed,
//! [`Mixer::state`] / [`Mixer::restore`]). An instruction example longer than `seq_len` is cut
//! like any document, so its later chunks keep their answer labels without the prompt; keep
//! `seq_len` above the longest examples (or pre-filter) if that matters.
//!
//! # Token store
//! [`load_sources`] with a store folder streams each file in bounded pieces, tokenizes them on
//! all cores and writes a memory-mapped token store (format in `store.rs`, key in `cache.rs`);
//! the mixer reads it through the map, with its pieces in a table beside it (`pieces.rs`), so
//! RAM does not grow with the corpus. [`TokenizedSource::from_cache`] says whether an existing
//! store was reused. Without a folder the tokens stay in memory ([`Tokens::Memory`]).

mod cache;
mod mix;
mod pack;
mod pieces;
mod sources;
mod store;
mod tokenize;

pub use mix::{Batch, MixConfig, Mixer, MixerState};
pub use pack::{PackStats, SourceStats};
pub use sources::{instruction_answer, instruction_prompt, read_examples, Example, SourceKind, SourceSpec, Weight, EN_TO_ZH_INSTRUCTION, ZH_TO_EN_INSTRUCTION};
pub use store::Store;
pub use tokenize::{load_source, load_source_with, load_sources, load_sources_with, Docs, Encoder, TokenizedSource, Tokens};

#[cfg(test)]
mod tests;

//! The clap definitions of the `linly-lora` command line: the subcommands, their flags with
//! their help, and the value parsers that refuse what a flag cannot mean. The binary's
//! `main.rs` turns these into the options of [`linly_lora::commands`].

mod bench;
mod quant;
mod vocab;

pub use bench::{BenchCmd, BenchModel};
pub use quant::{ExportCmd, ImatrixArgs, ImportCmd, QuantizeArgs};
pub use vocab::VocabCmd;

use clap::{Args, Parser, Subcommand};
use linly_lora::commands::infer as cinfer;
use linly_lora::infer::{chat, ModelSpec};
use linly_lora::io::safetensors::FloatType;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "linly-lora",
    version,
    about = "Teach an English LLaMA-family model a new language cheaply",
    long_about = "Teach an English LLaMA-family model a new language (first of all Chinese) cheaply, the \
Linly / Chinese-LLaMA recipe: extend the tokenizer, resize the embedding and LM head with sub-token-mean \
rows, train LoRA adapters with a trainable embedding and head on mixed data (fp16 with a loss scaler that \
survives new rows), merge, and run it.\n\nModels are HF folders (config.json + safetensors [+ tokenizer.json])."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Score text or token ids: mean NLL, perplexity, bits per character
    Eval(EvalArgs),
    /// Generate a continuation of a prompt, streamed as it is produced
    Generate(GenerateArgs),
    /// Interactive chat REPL (/reset clears history, /quit or Ctrl-D exits)
    Chat(ChatArgs),
    /// Train LoRA + embedding/LM head from a recipe.toml (see recipes/README.md)
    #[command(long_about = "Train LoRA + embedding/LM head from a recipe.toml (see recipes/README.md). Writes \
metrics.jsonl, checkpoints every [output] save_every steps and, at the end, the adapter to the recipe's [output] dir. \
Ctrl-C or SIGTERM stops the run after the step under way and writes a checkpoint there (a second signal quits at \
once); continue it with --resume.")]
    Train(TrainArgs),
    /// Merge LoRA adapters (and their embedding/LM-head tables) into the base model, streamed
    Merge(MergeArgs),
    /// Adapter tools: pack a trained adapter for shipping
    Adapter {
        #[command(subcommand)]
        what: AdapterCmd,
    },
    /// Vocabulary tools: extend a tokenizer, resize a model for it, measure tokens/char
    Vocab {
        #[command(subcommand)]
        what: VocabCmd,
    },
    /// Data tools: tokenize a recipe's [[data]] into token stores ahead of training
    Data {
        #[command(subcommand)]
        what: DataCmd,
    },
    /// Import a model from another format (GGUF) into an HF folder
    Import {
        #[command(subcommand)]
        what: ImportCmd,
    },
    /// OpenAI-compatible HTTP service: /v1/chat/completions, /v1/completions, /v1/models, /health
    #[command(long_about = "OpenAI-compatible HTTP service over one loaded model (merged, adapter-applied or \
imported), so any OpenAI client works unchanged.\n\nEndpoints: POST /v1/chat/completions (messages, temperature, \
top_p, max_tokens, stop, seed, stream), POST /v1/completions, GET /v1/models, GET /health (no key needed). The \
chat template comes from the tokenizer as in `chat` (ChatML if it has <|im_start|>, else Alpaca). Requests share \
the model: up to --max-concurrent generate at once, batched (every decode step is one forward pass for all of \
them; a greedy answer stays what `generate --greedy` gives); up to --queue-size \
more wait; beyond that the answer is 429. Ctrl-C or SIGTERM stops taking connections and lets running requests \
finish (a second signal exits at once).")]
    Serve(ServeArgs),
    /// Quantize a model to llama.cpp's Q8_0, Q4_0 or Q4_K (a folder that eval/generate/chat run directly)
    Quantize(QuantizeArgs),
    /// Importance matrix for `quantize --imatrix`: mean x² of every projection's input columns over a calibration text
    #[command(long_about = "Runs the f32/f16/bf16 model over a calibration text and records, for every layer \
projection (q/k/v/o, gate/up/down), the mean over tokens of x_j² for each input column j of what that projection \
multiplies: llama-imatrix's importance matrix. `quantize --imatrix FILE` then weights each weight's rounding error \
by its column's importance (ggml's quant_weights).\n\nIt is a separate command, as in llama.cpp, because one \
matrix serves every format and re-quantization, and collecting it costs a forward pass over the text. Use text \
like what the model will see, and never the text you evaluate on. The file is safetensors: one F32 [in] tensor \
per weight under its HF name, with the token count and sources in the metadata.")]
    Imatrix(ImatrixArgs),
    /// Export a model to another format (GGUF for llama.cpp / ollama)
    Export {
        #[command(subcommand)]
        what: ExportCmd,
    },
    /// Benchmarks on random-weight models of named shapes
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
pub enum AdapterCmd {
    /// Rewrite an adapter folder for shipping: tensors in --dtype (f16 halves a trained f32
    /// adapter) and a tied model's table stored once (training writes it under both
    /// embed_tokens and lm_head). The result loads and merges to the same model up to the
    /// rounding of --dtype. With --rank K, every LoRA pair is replaced by its best rank-K
    /// approximation (SVD of B·A; lora_alpha rescaled so each module's scale is unchanged),
    /// and the output says how much of the updates' energy was left out.
    Pack {
        /// The trained adapter folder (adapter_config.json + adapter_model.safetensors)
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (must not exist unless --force; written atomically; other files such as the tokenizer are copied)
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of every tensor: f32, f16 or bf16
        #[arg(long, default_value = "f16")]
        dtype: FloatType,
        /// Lower every LoRA pair to this rank (below the adapter's r): the closest rank-K update
        /// in the Frobenius norm. Check the result on validation text (`eval --adapter`)
        /// before shipping it; a GPU run's r 64 often keeps its quality at 16 or 32
        #[arg(long)]
        rank: Option<usize>,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// HF model folder (config.json + model.safetensors or sharded safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder, applied unmerged; repeat to stack adapters in order
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Tokenizer folder or tokenizer.json (default: the last adapter's, else the model's)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Device: cpu, or cuda:N in builds with --features tch
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype the weights are converted to: f32, f16 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: FloatType,
}

impl ModelArgs {
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            adapters: self.adapters.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            tokenizer: self.tokenizer.clone(),
        }
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "ids"])))]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// UTF-8 text file to score (needs a tokenizer); reports bits/char too
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Token ids: safetensors with int64 `input_ids` [B, T], or JSONL of id arrays
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Window length for long inputs (default: the model's context; at least 2)
    #[arg(long, value_parser = at_least::<2>)]
    pub window: Option<usize>,
    /// Print one JSON object instead of a summary
    #[arg(long)]
    pub json: bool,
    /// With --json: also list every scored token (id, NLL in nats, and with --text its byte
    /// span in the text), to see where two models or two tokenizers differ
    /// (benches/piece_gap.py compares a base and an extended model this way)
    #[arg(long, requires = "json")]
    pub per_token: bool,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Always take the most likely token (the default unless --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    pub greedy: bool,
    /// Sampling temperature (above 0; for temperature 0 use --greedy)
    #[arg(long, value_parser = positive_f32)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (0 < p ≤ 1)
    #[arg(long, value_parser = probability)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = all)
    #[arg(long)]
    pub top_k: Option<usize>,
    /// HF-style repetition penalty (1.0 = off; above 0)
    #[arg(long, default_value_t = 1.0, value_parser = positive_f32)]
    pub repetition_penalty: f32,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the whole prefix every step instead of using the KV cache
    #[arg(long)]
    pub no_cache: bool,
    /// How the KV cache stores keys and values: f32 (exact) or f16 (half the memory that
    /// attention reads per cached token, as llama.cpp does by default; values rounded once).
    /// For CPU inference in f32 activations; with --dtype f16/bf16 or on a GPU the cache
    /// already keeps the activations' dtype and this changes nothing
    #[arg(long, default_value = "f32", value_name = "f32|f16")]
    pub kv_cache: linly_lora::model::KvType,
}

impl SamplingArgs {
    pub fn sampling(&self) -> cinfer::Sampling {
        cinfer::Sampling {
            max_new_tokens: self.max_new_tokens,
            greedy: self.greedy,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            no_cache: self.no_cache,
            kv: self.kv_cache,
        }
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt text (needs a tokenizer)
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    pub s: SamplingArgs,
    /// Print the prompt and generated ids
    #[arg(long)]
    pub print_ids: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt template (default: chatml if the tokenizer has <|im_start|>, else alpaca)
    #[arg(long)]
    pub template: Option<chat::Template>,
    /// System prompt (chatml and llama2 templates)
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub s: SamplingArgs,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Address to bind; the default answers only this machine (use 0.0.0.0 to expose it, ideally with --api-key)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port (0 picks a free one; the address is printed on start)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests generating at once; every decode step runs them all through one forward pass
    #[arg(long, default_value_t = 16, value_parser = at_least::<1>)]
    pub max_concurrent: usize,
    /// Requests waiting for a generation slot; one more is answered 429 at once
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes (default: no key). Also read from LINLY_API_KEY
    #[arg(long, env = "LINLY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Chat template: alpaca, chatml or llama2 (default: chatml if the tokenizer has <|im_start|>, else alpaca)
    #[arg(long)]
    pub template: Option<chat::Template>,
    /// New tokens for a request that gives no max_tokens (cut to what the context leaves; at least 1)
    #[arg(long, default_value_t = 256, value_parser = at_least::<1>)]
    pub default_max_tokens: usize,
    /// Largest request body in bytes; bigger ones get 413
    #[arg(long, default_value_t = 1 << 20, value_parser = at_least::<1>)]
    pub max_body_bytes: usize,
    /// Model id reported by /v1/models and in responses (default: the model folder's name)
    #[arg(long)]
    pub model_name: Option<String>,
    /// How each request's KV cache stores keys and values: f32 (exact: a request's answer is
    /// `generate`'s) or f16 (half the memory that attention reads per cached token, as
    /// llama.cpp's server does by default; answers are then `generate --kv-cache f16`'s).
    /// For CPU inference in f32 activations; with --dtype f16/bf16 or on a GPU the cache
    /// already keeps the activations' dtype
    #[arg(long, default_value = "f32", value_name = "f32|f16")]
    pub kv_cache: linly_lora::model::KvType,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize every [[data]] block of a recipe into its token store
    #[command(long_about = "Tokenize every [[data]] block of a recipe into its token store, the memory-mapped \
files training reads ([output] dir/token-cache/), without loading the model's weights. Files are streamed \
in bounded pieces and tokenized on all cores, so a corpus of any size prepares in constant memory.\n\n\
A store is keyed by the data file (path, size, mtime), the tokenizer, the template and the kind: a store \
that is already there and valid is reused, a stale, truncated or corrupt one is rebuilt. `train` does the \
same for any store that is missing, so this command only moves the slow part ahead of training.\n\n\
Prints one JSON report: each source's store, documents and tokens.")]
    Prepare {
        /// The recipe (TOML) whose [[data]] blocks to prepare
        recipe: PathBuf,
        /// No progress bars
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe (TOML)
    pub recipe: PathBuf,
    /// Continue from the last checkpoint in the recipe's [output] dir
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (metrics still go to metrics.jsonl)
    #[arg(long)]
    pub quiet: bool,
    /// Stop after N steps of this invocation (checkpoints as usual); resume later with --resume
    #[arg(long)]
    pub stop_after: Option<usize>,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base HF model folder
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter folder; repeat to stack adapters, applied in order (Chinese-LLaMA-Alpaca Plus style)
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// Output folder (must not exist unless --force; written atomically)
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    pub force: bool,
    /// Storage dtype of the output (default: each tensor keeps the base's dtype)
    #[arg(long)]
    pub dtype: Option<FloatType>,
    /// Tokenizer folder to ship with the model (default: the last adapter's, else the base's)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Maximum shard size, e.g. 5GB, 500MB
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    /// Accept a tokenizer with fewer tokens than embedding rows (deliberately padded vocabularies)
    #[arg(long)]
    pub allow_vocab_padding: bool,
}

// Value parsers for numeric flags: clap's own accept `NaN`, `inf` and 0, which either mean
// nothing (a 0-token window or budget, silently raised or answered empty) or turn every
// probability into NaN and sample garbage.

pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{v} is not a finite number above 0"));
    }
    Ok(v)
}

/// A request's sampling temperature as the API takes it: 0 (greedy) to 2.
pub fn api_temperature(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=2.0).contains(&v) {
        return Err(format!("{v} is outside [0, 2] (0 is greedy)"));
    }
    Ok(v)
}

/// Worker threads: 1 to 256 (thousands of threads only stall the machine).
pub fn threads(s: &str) -> Result<usize, String> {
    let v = at_least::<1>(s)?;
    if v > 256 {
        return Err(format!("{v} threads: at most 256"));
    }
    Ok(v)
}

pub fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{v} is not a finite number above 0"));
    }
    Ok(v)
}

pub fn probability(s: &str) -> Result<f32, String> {
    let v = positive_f32(s)?;
    if v > 1.0 {
        return Err(format!("{v} is not a probability in (0, 1]"));
    }
    Ok(v)
}

pub fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v < MIN {
        return Err(format!("{v} is below the minimum of {MIN}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The serving benchmark's temperature takes what the API takes, and nothing that would
    /// reach the server as something else (NaN serialises to `null`, the API's default 1).
    #[test]
    fn api_temperature_takes_the_api_range() {
        for ok in ["0", "0.7", "2"] {
            assert!(api_temperature(ok).is_ok(), "{ok}");
        }
        for bad in ["NaN", "inf", "-0.5", "2.5", "warm"] {
            assert!(api_temperature(bad).is_err(), "{bad}");
        }
    }

    /// Counts of zero (which panicked deep in a benchmark) and thread counts that stall the
    /// machine are refused where the arguments are read; each input-less command names every
    /// input it takes.
    #[test]
    fn counts_threads_and_inputs_are_checked_when_parsed() {
        use clap::Parser;
        let parse = |args: &str| Cli::try_parse_from(std::iter::once("linly-lora").chain(args.split_whitespace()));
        for bad in ["bench forward --prompt 0", "bench forward --reps 0", "bench train --steps 0", "bench train --rank 0", "bench quant --model m --threads 0", "bench quant --model m --threads 100000", "bench merge --rank 0", "vocab copy-task --tokenizer t --out o --examples 0"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("bench quant --model m --threads 8").is_ok());
        let e = parse("eval --model m").err().unwrap().to_string();
        assert!(e.contains("--text") && e.contains("--ids"), "{e}");
        let e = parse("vocab extend --tokenizer t --out o").err().unwrap().to_string();
        assert!(e.contains("--add") && e.contains("--from-corpus") && e.contains("--wordlist"), "{e}");
    }
}

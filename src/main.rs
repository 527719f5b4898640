//! The `linly-lora` command line: clap definitions, and glue that turns each subcommand's
//! flags into the options of its one function in [`linly_lora::commands`] and prints the
//! report. Policy and formatting live there, not here.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use linly_lora::commands::{self, bench, infer as cinfer, quant as cquant, vocab as cvocab, Report};
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
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Score text or token ids: mean NLL, perplexity, bits per character
    Eval(EvalArgs),
    /// Generate a continuation of a prompt, streamed as it is produced
    Generate(GenerateArgs),
    /// Interactive chat REPL (/reset clears history, /quit or Ctrl-D exits)
    Chat(ChatArgs),
    /// Train LoRA + embedding/LM head from a recipe.toml (see recipes/README.md)
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
the model: up to --max-concurrent generate at once, interleaved one decode step at a time; up to --queue-size \
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
enum AdapterCmd {
    /// Rewrite an adapter folder for shipping: tensors in --dtype (f16 halves a trained f32
    /// adapter) and a tied model's table stored once (training writes it under both
    /// embed_tokens and lm_head). The result loads and merges to the same model up to the
    /// rounding of --dtype.
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
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// HF model folder (config.json + model.safetensors or sharded safetensors)
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder, applied unmerged; repeat to stack adapters in order
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Tokenizer folder or tokenizer.json (default: the last adapter's, else the model's)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Device: cpu, or cuda:N in builds with --features tch
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype the weights are converted to: f32, f16 or bf16
    #[arg(long, default_value = "f32")]
    dtype: FloatType,
}

impl ModelArgs {
    fn spec(&self) -> ModelSpec {
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
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// UTF-8 text file to score (needs a tokenizer); reports bits/char too
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<PathBuf>,
    /// Token ids: safetensors with int64 `input_ids` [B, T], or JSONL of id arrays
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Window length for long inputs (default: the model's context; at least 2)
    #[arg(long, value_parser = at_least::<2>)]
    window: Option<usize>,
    /// Print one JSON object instead of a summary
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Always take the most likely token (the default unless --temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature (above 0; for temperature 0 use --greedy)
    #[arg(long, value_parser = positive_f32)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (0 < p ≤ 1)
    #[arg(long, value_parser = probability)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = all)
    #[arg(long)]
    top_k: Option<usize>,
    /// HF-style repetition penalty (1.0 = off; above 0)
    #[arg(long, default_value_t = 1.0, value_parser = positive_f32)]
    repetition_penalty: f32,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute the whole prefix every step instead of using the KV cache
    #[arg(long)]
    no_cache: bool,
}

impl SamplingArgs {
    fn sampling(&self) -> cinfer::Sampling {
        cinfer::Sampling {
            max_new_tokens: self.max_new_tokens,
            greedy: self.greedy,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            no_cache: self.no_cache,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt text (needs a tokenizer)
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    s: SamplingArgs,
    /// Print the prompt and generated ids
    #[arg(long)]
    print_ids: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt template (default: chatml if the tokenizer has <|im_start|>, else alpaca)
    #[arg(long)]
    template: Option<chat::Template>,
    /// System prompt (chatml and llama2 templates)
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    s: SamplingArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Address to bind; the default answers only this machine (use 0.0.0.0 to expose it, ideally with --api-key)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0 picks a free one; the address is printed on start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests generating at once; they take turns one decode step each
    #[arg(long, default_value_t = 16, value_parser = at_least::<1>)]
    max_concurrent: usize,
    /// Requests waiting for a generation slot; one more is answered 429 at once
    #[arg(long, default_value_t = 64)]
    queue_size: usize,
    /// Require `Authorization: Bearer KEY` on /v1 routes (default: no key). Also read from LINLY_API_KEY
    #[arg(long, env = "LINLY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Chat template: alpaca, chatml or llama2 (default: chatml if the tokenizer has <|im_start|>, else alpaca)
    #[arg(long)]
    template: Option<chat::Template>,
    /// New tokens for a request that gives no max_tokens (cut to what the context leaves; at least 1)
    #[arg(long, default_value_t = 256, value_parser = at_least::<1>)]
    default_max_tokens: usize,
    /// Largest request body in bytes; bigger ones get 413
    #[arg(long, default_value_t = 1 << 20, value_parser = at_least::<1>)]
    max_body_bytes: usize,
    /// Model id reported by /v1/models and in responses (default: the model folder's name)
    #[arg(long)]
    model_name: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// The recipe (TOML)
    recipe: PathBuf,
    /// Continue from the last checkpoint in the recipe's [output] dir
    #[arg(long)]
    resume: bool,
    /// No progress bar (metrics still go to metrics.jsonl)
    #[arg(long)]
    quiet: bool,
    /// Stop after N steps of this invocation (checkpoints as usual); resume later with --resume
    #[arg(long)]
    stop_after: Option<usize>,
}

#[derive(Args)]
struct MergeArgs {
    /// Base HF model folder
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter folder; repeat to stack adapters, applied in order (Chinese-LLaMA-Alpaca Plus style)
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Output folder (must not exist unless --force; written atomically)
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    force: bool,
    /// Storage dtype of the output (default: each tensor keeps the base's dtype)
    #[arg(long)]
    dtype: Option<FloatType>,
    /// Tokenizer folder to ship with the model (default: the last adapter's, else the base's)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Maximum shard size, e.g. 5GB, 500MB
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Accept a tokenizer with fewer tokens than embedding rows (deliberately padded vocabularies)
    #[arg(long)]
    allow_vocab_padding: bool,
}

#[derive(Subcommand)]
enum VocabCmd {
    /// Add pieces as real BPE entries with merges (not "added tokens"); writes tokenizer.json and vocab_extension.json
    Extend {
        /// tokenizer.json or the folder holding it (SentencePiece-style or byte-level BPE)
        #[arg(long)]
        tokenizer: PathBuf,
        /// File of new pieces, one per line
        #[arg(long, conflicts_with_all = ["from_corpus", "wordlist"], required_unless_present_any = ["from_corpus", "wordlist"])]
        add: Option<PathBuf>,
        /// Choose frequent characters and words by their counts in this text (repeatable); without it,
        /// by the --wordlist's own frequency column
        #[arg(long)]
        from_corpus: Vec<PathBuf>,
        /// How many pieces to add in corpus mode (split 8:20 between characters and words, as Linly)
        #[arg(long, default_value_t = 28_000)]
        max_new: usize,
        /// Ignore characters/words seen fewer times than this
        #[arg(long, default_value_t = 2)]
        min_freq: u64,
        /// Word list for candidate words (`word freq POS` per line, e.g. jieba's dict.txt)
        #[arg(long)]
        wordlist: Option<PathBuf>,
        /// Longest word, in characters
        #[arg(long, default_value_t = 4)]
        max_word_chars: usize,
        /// Corpus mode: also consider pairs of adjacent words/characters (`我的`, `的人`) as
        /// candidates, counted in the corpus; off keeps to the word list's words
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        pairs: bool,
        /// SentencePiece tokenizers: also add ▁+piece for this many text-initial pieces (taken from the word budget)
        #[arg(long, default_value_t = 0)]
        prefixed: usize,
        /// Output folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Grow embed_tokens and lm_head for a vocab_extension.json (new rows: sub-token mean by default)
    Resize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        extension: PathBuf,
        /// subtoken-mean | mean | noisy-mean | random: table-only. distill | distill-input |
        /// distill-head: fitted against the model on --init-text (input rows by Token
        /// Distillation, head rows to the base's own probability of each piece; fitting the head
        /// unties a tied table). See src/vocab/distill.rs.
        #[arg(long, default_value = "subtoken-mean")]
        init: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training text of the new language that the distill methods draw contexts from (never
        /// the text you evaluate on)
        #[arg(long)]
        init_text: Option<PathBuf>,
        /// Tokens of context (new tokenization) the distill methods fit on
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().tokens)]
        init_tokens: usize,
        /// Further tokens of context whose positions the head rows are fitted on (distill, distill-head)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_tokens)]
        init_head_tokens: usize,
        /// Passes over the contexts for the input rows (distill, distill-input)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().input_epochs)]
        init_input_epochs: usize,
        /// Adam learning rate of the input rows
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().input_lr)]
        init_input_lr: f64,
        /// Passes over the cached positions for the head rows (distill, distill-head)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_epochs)]
        init_head_epochs: usize,
        /// Adam step of the head rows, in nats of logit per step
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_lr)]
        init_head_lr: f64,
        /// What the head rows are fitted to: chain (the base's own probability of every piece,
        /// the mass of a piece's first sub-token moved onto it) or labels (the next piece of the
        /// text, one-hot; only rows that occur learn)
        #[arg(long, value_enum, default_value = "chain")]
        init_head_targets: linly_lora::vocab::distill::HeadTargets,
        /// With chain targets, leave the old head rows of the new pieces' first sub-tokens as they
        /// are (by default they are fitted too, and adapters carry them)
        #[arg(long)]
        init_keep_old_rows: bool,
        /// Device the distill methods run on
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Output model folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
    /// Tokens per character, byte-fallback tokens and round-trip failures, per tokenizer × file
    Stats {
        #[arg(long = "tokenizer", required = true)]
        tokenizers: Vec<PathBuf>,
        #[arg(long = "text", required = true)]
        texts: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the ids and pieces of a string
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: String,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// GGUF v2/v3 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) → HF folder with tokenizer.json
    Gguf {
        file: PathBuf,
        /// Output HF folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the 2-D weights (norms stay f32)
        #[arg(long, default_value = "f32")]
        dtype: FloatType,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct QuantizeArgs {
    /// HF model folder to quantize (f32, f16 or bf16 safetensors)
    #[arg(long)]
    model: PathBuf,
    /// q8_0 (8.5 bits/weight), q4_0 or q4_k, with llama-quantize's mixes (see README):
    /// q4_0 = Q4_0 (error-minimizing scales) + LM head/tied token table in Q6_K (Q8_0 when rows are
    /// not whole 256-blocks); q4_k = Q4_K_M: Q4_K, with attn_v/ffn_down in Q6_K in the first and
    /// last eighth of the layers and every third between, the head as for q4_0, and rows that
    /// cannot hold Q4_K in Q4_1 or Q5_0, whichever reconstructs the tensor better
    #[arg(long)]
    format: linly_lora::quant::QType,
    /// Output folder (must not exist unless --force; written atomically): config.json, tokenizer files, model.gguf
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    q: QuantArgs,
}

/// The quantization flags `quantize` and `export gguf` share.
#[derive(Args)]
struct QuantArgs {
    /// Keep the token embedding and LM head in f16 instead of quantizing them
    #[arg(long)]
    keep_embeddings: bool,
    /// Every 2-D weight in the one format (q5_0 where q4_k does not fit), no llama.cpp mix:
    /// ggml's reference quantizers, like llama-quantize --pure
    #[arg(long)]
    pure: bool,
    /// Importance matrix from `linly-lora imatrix` on this model: Q4_0 weights are rounded to
    /// minimize the error weighted by it (llama-quantize --imatrix)
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// Calibration text for GPTQ (q4_0): the model runs over it once; the MLP's gate/up
    /// projections are quantized by GPTQ (each rounding error is compensated in the row's later
    /// columns, along the inverse of the inputs' XᵀX) and the other Q4_0 weights are rounded with
    /// the importance matrix of the same pass. Replaces --imatrix. Still a plain Q4_0 GGUF
    #[arg(long, value_name = "TEXT", conflicts_with = "imatrix")]
    gptq: Option<PathBuf>,
    /// Tokens per forward pass over the --gptq text
    #[arg(long, default_value_t = 512, requires = "gptq", value_parser = at_least::<1>)]
    calib_window: usize,
    /// Use at most this many tokens of the --gptq text
    #[arg(long, requires = "gptq", value_parser = at_least::<1>)]
    calib_tokens: Option<usize>,
    /// GPTQ's damping of the Hessian, as a fraction of its mean diagonal: larger trusts the
    /// calibration text less (and moves the result towards --imatrix rounding)
    #[arg(long, default_value_t = linly_lora::quant::gptq::DAMP, requires = "gptq", value_parser = positive_f64)]
    gptq_damp: f64,
}

impl QuantArgs {
    fn settings(self) -> cquant::QuantSettings {
        cquant::QuantSettings {
            keep_embeddings: self.keep_embeddings,
            pure: self.pure,
            imatrix: self.imatrix,
            gptq: self.gptq,
            calib_window: self.calib_window,
            calib_tokens: self.calib_tokens,
            gptq_damp: self.gptq_damp,
        }
    }
}

#[derive(Args)]
struct ImatrixArgs {
    /// HF model folder (f32, f16 or bf16 safetensors; not a quantized folder)
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 calibration text (disjoint from any text you evaluate on)
    #[arg(long)]
    text: PathBuf,
    /// Tokens per forward pass (non-overlapping windows, like llama-imatrix's chunks)
    #[arg(long, default_value_t = 512, value_parser = at_least::<1>)]
    window: usize,
    /// Use at most this many tokens of the text
    #[arg(long, value_parser = at_least::<1>)]
    max_tokens: Option<usize>,
    /// Output file (safetensors; must not exist unless --force; written atomically)
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// HF folder → GGUF for llama.cpp: llama metadata, tokenizer (extended vocabularies included),
    /// chat template, Q/K rows in llama.cpp's order
    Gguf {
        /// HF model folder (e.g. the output of `merge`)
        #[arg(long)]
        model: PathBuf,
        /// Output .gguf file (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
        /// Type of the 2-D weights: f16, f32, q8_0, q4_0 or q4_k (norms are always f32)
        #[arg(long = "type", default_value = "f16")]
        ty: linly_lora::quant::ExportType,
        #[command(flatten)]
        q: QuantArgs,
    },
}

/// The random-weight model a benchmark runs.
#[derive(Args)]
struct BenchModel {
    /// tiny, smollm2-135m, 160m, 1b or 7b
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: FloatType,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode tokens/s of a random model (shapes: tiny, smollm2-135m, 160m, 1b, 7b)
    Forward {
        #[command(flatten)]
        m: BenchModel,
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 64)]
        decode: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Training tokens/s and peak RSS: LoRA on all 7 projections + embed/lm_head, AdamW, random tokens
    Train {
        #[command(flatten)]
        m: BenchModel,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// fp16 loss-scaler experiment: random / mean / sub-token-mean new rows × GradScaler-style vs linly scaler
    Scaler {
        #[arg(long, default_value = "runs/bench-scaler")]
        workdir: PathBuf,
        /// Default: tests/fixtures/llama2-tokenizer of the source tree this binary was built from
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Default: tests/fixtures/zh/jieba_dict.txt of the source tree
        #[arg(long)]
        wordlist: Option<PathBuf>,
        /// Folder with hsk_zh_en_sample.tsv, alpaca_sample.json, text_sample.txt (default:
        /// tests/fixtures/data of the source tree)
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        steps: usize,
        #[arg(long, default_value_t = 2e-4)]
        lr: f64,
        /// Std of the `random` rows (the LLama2-chat-13B-Chinese failure used N(0, 1)-scale rows)
        #[arg(long, default_value_t = 1.0)]
        random_std: f32,
        /// Which inits of the new rows to run, comma-separated (each under both scalers)
        #[arg(long, value_delimiter = ',', default_value = "random,mean,subtoken-mean")]
        inits: Vec<String>,
    },
    /// Aggregate generated tokens/s of `serve` at several concurrent client counts, over loopback HTTP
    Serve {
        /// A real model folder with a tokenizer (this benchmark needs text in and out)
        #[command(flatten)]
        m: ModelArgs,
        /// Client counts to measure, in order; ratios are against the 1-client row
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
        clients: Vec<usize>,
        /// New tokens per request (generated past end-of-sequence, so every request costs the same)
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Requests each client sends one after another
        #[arg(long, default_value_t = 2)]
        requests: usize,
    },
    /// pp/tg tokens/s of a model folder (quantized or not), measured like llama-bench's pp N / tg N
    Quant {
        /// Model folder (from `linly-lora quantize`, or any HF folder)
        #[arg(long)]
        model: PathBuf,
        /// Prompt tokens processed in one batch (llama-bench -p)
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens generated one at a time from an empty cache (llama-bench -n)
        #[arg(long, default_value_t = 64)]
        gen: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Worker threads (llama-bench -t)
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Merge wall time ÷ copy time and peak RSS, on a synthetic f16 model + rank-r adapter
    Merge {
        #[arg(long, default_value = "1b")]
        shape: String,
        #[arg(long, default_value_t = 64)]
        rank: usize,
        /// Scratch folder (must not exist; removed afterwards unless --keep)
        #[arg(long, default_value = "runs/bench-merge")]
        workdir: PathBuf,
        #[arg(long)]
        keep: bool,
    },
}

// Value parsers for numeric flags: clap's own accept `NaN`, `inf` and 0, which either mean
// nothing (a 0-token window or budget, silently raised or answered empty) or turn every
// probability into NaN and sample garbage.

fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{v} is not a finite number above 0"));
    }
    Ok(v)
}

fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{v} is not a finite number above 0"));
    }
    Ok(v)
}

fn probability(s: &str) -> Result<f32, String> {
    let v = positive_f32(s)?;
    if v > 1.0 {
        return Err(format!("{v} is not a probability in (0, 1]"));
    }
    Ok(v)
}

fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v < MIN {
        return Err(format!("{v} is below the minimum of {MIN}"));
    }
    Ok(v)
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(..) | Cmd::Bench { what: BenchCmd::Serve { .. } }) {
        // `linly-lora eval ... | head` should end quietly, as Unix tools do, instead of panicking
        // in println! on the closed pipe. Not for `serve`, whose sockets must survive clients
        // that hang up.
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}


/// Prints a finished command's report: its notes on stderr, then the report on stdout. An
/// empty report prints nothing.
fn emit(r: &impl Report) -> Result<()> {
    for n in r.notes() {
        eprintln!("{n}");
    }
    let text = r.to_string();
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}

/// [`emit`], or with `--json` the report as one line of JSON.
fn emit_or_json<R: Report + serde::Serialize>(r: &R, json: bool) -> Result<()> {
    if !json {
        return emit(r);
    }
    for n in r.notes() {
        eprintln!("{n}");
    }
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Eval(a) => {
            let input = match (a.text, a.ids) {
                (Some(t), _) => cinfer::EvalInput::Text(t),
                (_, Some(i)) => cinfer::EvalInput::Ids(i),
                _ => unreachable!("clap requires one"),
            };
            emit_or_json(&cinfer::eval(&cinfer::EvalOptions { spec: a.m.spec(), input, window: a.window })?, a.json)
        }
        Cmd::Generate(a) => {
            let prompt = match (a.prompt, a.prompt_ids) {
                (_, Some(ids)) => cinfer::Prompt::Ids(ids),
                (Some(p), _) => cinfer::Prompt::Text(p),
                _ => unreachable!("clap requires one"),
            };
            let o = cinfer::GenerateCommand { spec: a.m.spec(), prompt, sampling: a.s.sampling(), print_ids: a.print_ids };
            let r = cinfer::generate(&o, &mut std::io::stdout().lock())?;
            emit(&r)
        }
        Cmd::Chat(a) => {
            let o = cinfer::ChatOptions { spec: a.m.spec(), template: a.template, system: a.system, sampling: a.s.sampling() };
            cinfer::chat(&o, &mut std::io::stdin().lock(), &mut std::io::stdout())
        }
        Cmd::Train(a) => {
            let o = commands::train::TrainOptions { recipe: a.recipe, resume: a.resume, progress: !a.quiet, stop_after: a.stop_after };
            emit(&commands::train::train(&o)?)
        }
        Cmd::Merge(a) => {
            let o = commands::lora::MergeCommand {
                base: a.base,
                adapters: a.adapters,
                out: a.out,
                force: a.force,
                dtype: a.dtype,
                tokenizer: a.tokenizer,
                shard_size: a.shard_size,
                allow_vocab_padding: a.allow_vocab_padding,
            };
            emit(&commands::lora::merge(&o)?)
        }
        Cmd::Adapter { what: AdapterCmd::Pack { adapter, out, dtype, force } } => emit(&commands::lora::pack(&commands::lora::PackOptions { adapter, out, dtype, force })?),
        Cmd::Vocab { what } => vocab(what),
        Cmd::Import { what: ImportCmd::Gguf { file, out, dtype, force } } => emit(&commands::gguf::import_gguf(&commands::gguf::ImportOptions { file, out, dtype, force })?),
        Cmd::Serve(a) => commands::serve::serve(&commands::serve::ServeOptions {
            spec: a.m.spec(),
            host: a.host,
            port: a.port,
            max_concurrent: a.max_concurrent,
            queue_size: a.queue_size,
            api_key: a.api_key,
            template: a.template,
            default_max_tokens: a.default_max_tokens,
            max_body_bytes: a.max_body_bytes,
            model_name: a.model_name,
        }),
        Cmd::Quantize(a) => {
            let o = cquant::QuantizeOptions { model: a.model, format: a.format, out: a.out, force: a.force, quant: a.q.settings() };
            emit(&cquant::quantize(&o)?)
        }
        Cmd::Imatrix(a) => {
            let o = cquant::ImatrixOptions { model: a.model, text: a.text, window: a.window, max_tokens: a.max_tokens, out: a.out, force: a.force };
            emit(&cquant::imatrix(&o)?)
        }
        Cmd::Export { what: ExportCmd::Gguf { model, out, force, ty, q } } => emit(&cquant::export_gguf(&cquant::ExportOptions { model, out, force, ty, quant: q.settings() })?),
        Cmd::Bench { what } => bench(what),
    }
}

fn bench(cmd: BenchCmd) -> Result<()> {
    let random = |m: BenchModel| bench::RandomModel { shape: m.shape, device: m.device, dtype: m.dtype };
    match cmd {
        BenchCmd::Forward { m, prompt, decode, reps } => emit(&bench::forward_command(&bench::ForwardOptions { model: random(m), prompt, decode, reps })?),
        BenchCmd::Train { m, rank, batch, seq, warmup, steps } => emit(&bench::train_command(&bench::TrainOptions { model: random(m), rank, batch, seq, warmup, steps })?),
        BenchCmd::Scaler { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits } => {
            emit(&bench::scaler_command(&bench::scaler::ScalerBenchOptions { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits })?)
        }
        BenchCmd::Serve { m, clients, max_tokens, requests } => {
            emit(&bench::serve_command(&bench::serve::ServeBenchOptions { spec: m.spec(), clients, max_tokens, requests_per_client: requests })?)
        }
        BenchCmd::Quant { model, prompt, gen, reps, threads } => emit(&bench::quant_command(&bench::QuantOptions { model, prompt, gen, reps, threads })?),
        BenchCmd::Merge { shape, rank, workdir, keep } => emit(&bench::merge_command(&bench::MergeOptions { shape, rank, workdir, keep })?),
    }
}

fn vocab(cmd: VocabCmd) -> Result<()> {
    match cmd {
        VocabCmd::Extend { tokenizer, add, from_corpus, max_new, min_freq, wordlist, max_word_chars, pairs, prefixed, out, force, json } => {
            let pieces = match add {
                Some(f) => cvocab::Pieces::List(f),
                None => cvocab::Pieces::Select { corpus: from_corpus, wordlist, max_new, min_freq, max_word_chars, pairs, prefixed },
            };
            emit_or_json(&cvocab::extend(&cvocab::ExtendOptions { tokenizer, pieces, out, force })?, json)
        }
        VocabCmd::Resize { model, extension, init, seed, init_text, init_tokens, init_head_tokens, init_input_epochs, init_input_lr, init_head_epochs, init_head_lr, init_head_targets, init_keep_old_rows, device, out, force } => {
            let distill = linly_lora::vocab::distill::DistillOptions {
                tokens: init_tokens,
                head_tokens: init_head_tokens,
                input_epochs: init_input_epochs,
                input_lr: init_input_lr,
                head_epochs: init_head_epochs,
                head_lr: init_head_lr,
                head_targets: init_head_targets,
                move_old_rows: !init_keep_old_rows,
                seed,
                ..Default::default()
            };
            let o = cvocab::ResizeOptions { model, extension, init: init.parse()?, seed, init_text, distill, device, out, force };
            emit(&cvocab::resize(&o)?)
        }
        VocabCmd::Stats { tokenizers, texts, json } => emit_or_json(&cvocab::stats(&cvocab::StatsOptions { tokenizers, texts })?, json),
        VocabCmd::Encode { tokenizer, text } => emit(&cvocab::encode(&cvocab::EncodeOptions { tokenizer, text })?),
    }
}

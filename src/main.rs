//! The `linly-lora` command line: parses arguments and calls into the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use linly_lora::infer::{self, chat, eval, generate, sample::SamplingParams, ModelSpec};
use linly_lora::io::safetensors::FloatType;
use std::io::Write;
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
    fn options(&self) -> generate::GenerateOptions {
        let sampling_requested = self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some();
        generate::GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                greedy: self.greedy || !sampling_requested,
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            no_cache: self.no_cache,
            stop_ids: vec![],
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

#[derive(Args)]
struct StubArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
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
        /// Distillation, head rows by a softmax regression on the model's hidden states; fitting
        /// the head unties a tied table). See src/vocab/distill.rs.
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
        /// Adam learning rate of the head rows
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_lr)]
        init_head_lr: f64,
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
    /// Keep the token embedding and LM head in f16 instead of quantizing them
    #[arg(long)]
    keep_embeddings: bool,
    /// Every 2-D weight in the format (q5_0 where q4_k does not fit) with ggml's reference
    /// quantizers, like llama-quantize --pure
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
        ty: linly_lora::io::gguf::ExportType,
        /// Keep the token embedding and LM head in f16 when quantizing
        #[arg(long)]
        keep_embeddings: bool,
        /// Quantized types: every 2-D weight in the type, no llama.cpp mix (as `quantize --pure`)
        #[arg(long)]
        pure: bool,
        /// Importance matrix from `linly-lora imatrix` (as `quantize --imatrix`)
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// Calibration text for GPTQ with `--type q4_0` (as `quantize --gptq`)
        #[arg(long, value_name = "TEXT", conflicts_with = "imatrix")]
        gptq: Option<PathBuf>,
        /// Tokens per forward pass over the --gptq text
        #[arg(long, default_value_t = 512, requires = "gptq", value_parser = at_least::<1>)]
        calib_window: usize,
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
        #[arg(long, default_value = "tests/fixtures/llama2-tokenizer")]
        tokenizer: PathBuf,
        #[arg(long, default_value = "tests/fixtures/zh/jieba_dict.txt")]
        wordlist: PathBuf,
        /// Folder with hsk_zh_en_sample.tsv, alpaca_sample.json, text_sample.txt
        #[arg(long, default_value = "tests/fixtures/data")]
        data: PathBuf,
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

fn vocab(cmd: VocabCmd) -> Result<()> {
    use linly_lora::vocab;
    match cmd {
        VocabCmd::Extend { tokenizer, add, from_corpus, max_new, min_freq, wordlist, max_word_chars, pairs, prefixed, out, force, json } => {
            let inputs: Vec<PathBuf> = [&tokenizer].into_iter().chain(&add).chain(&wordlist).chain(&from_corpus).cloned().collect();
            let source = match add {
                Some(f) => vocab::PieceSource::List(f),
                None => {
                    let chars = max_new * 8 / 28;
                    vocab::PieceSource::Select(vocab::SelectConfig {
                        corpus: from_corpus,
                        max_words: if wordlist.is_some() { max_new.saturating_sub(chars + prefixed) } else { 0 },
                        max_chars: if wordlist.is_some() { chars } else { max_new },
                        wordlist,
                        min_freq,
                        max_word_chars,
                        pairs,
                        max_prefixed: prefixed,
                    })
                }
            };
            let r = write_out(&out, &inputs, force, |o| vocab::extend(&tokenizer, &source, o, false))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} ({}): {} -> {} tokens ({} requested pieces added, {} intermediate, {} already present, {} duplicates, {} unreachable) in {:.2} s -> {}",
                    r.tokenizer, r.family, r.old_vocab, r.new_vocab, r.added_requested, r.added_intermediate, r.skipped_present, r.skipped_duplicate, r.unreachable.len(), r.seconds, out.display()
                );
            }
        }
        VocabCmd::Resize { model, extension, init, seed, init_text, init_tokens, init_head_tokens, init_input_epochs, init_input_lr, init_head_epochs, init_head_lr, device, out, force } => {
            let init: vocab::InitMethod = init.parse()?;
            let spec = match init_text {
                Some(text) => Some(vocab::DistillSpec {
                    text,
                    opts: vocab::distill::DistillOptions { tokens: init_tokens, head_tokens: init_head_tokens, input_epochs: init_input_epochs, input_lr: init_input_lr, head_epochs: init_head_epochs, head_lr: init_head_lr, seed, ..Default::default() },
                    device: linly_lora::device::parse(&device)?,
                }),
                None => None,
            };
            let mut inputs = vec![model.clone(), extension.clone()];
            inputs.extend(spec.as_ref().map(|s| s.text.clone()));
            let r = write_out(&out, &inputs, force, |o| vocab::resize_model(&model, &extension, init, seed, spec.as_ref(), o))?;
            if let Some(d) = &r.distill {
                eprintln!("distill: {}", serde_json::to_string(d)?);
            }
            println!("resized {} -> {} rows ({} init{}, tied {}) -> {}", r.old_vocab, r.new_vocab, r.init,
                if r.empty_subtokens > 0 { format!(", {} pieces without sub-tokens got the mean row", r.empty_subtokens) } else { String::new() },
                r.tied, out.display());
        }
        VocabCmd::Stats { tokenizers, texts, json } => {
            let rows = vocab::stats(&tokenizers, &texts)?;
            if json {
                println!("{}", serde_json::json!({ "results": rows }));
            } else {
                print!("{}", vocab::render_table(&rows));
            }
        }
        VocabCmd::Encode { tokenizer, text } => {
            let tok = vocab::load_tokenizer(&tokenizer)?;
            let e = vocab::encode(&tok, &text, false)?;
            println!("ids:     {:?}\npieces:  {:?}\ndecoded: {:?}", e.ids, e.pieces, e.decoded);
        }
    }
    Ok(())
}

/// After a `--gptq` calibration pass: how much text it saw.
fn print_calibration(m: &Option<linly_lora::quant::imatrix::Imatrix>, h: &Option<linly_lora::quant::gptq::Hessians>) {
    if let (Some(m), Some(_)) = (m, h) {
        eprintln!("calibrated on {} tokens of {}", m.tokens, m.meta.get("text").map_or("?", String::as_str));
    }
}

fn print_export(r: &linly_lora::io::gguf::ExportReport) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {} tensors {:?}, {:.1} MB, tokenizer {}, chat template {} -> {}",
        r.n_tensors,
        r.types,
        r.bytes as f64 / 1e6,
        r.tokenizer.as_deref().unwrap_or("none"),
        r.chat_template,
        r.path.display()
    );
}

/// [`linly_lora::io::atomic::check_out`] for a command's `--out`.
fn check_out(out: &std::path::Path, inputs: &[PathBuf], force: bool) -> Result<()> {
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    linly_lora::io::atomic::check_out(out, &inputs, force)
}

/// [`linly_lora::io::atomic::write_out`]: every command that writes `--out` goes through it.
fn write_out<T>(out: &std::path::Path, inputs: &[PathBuf], force: bool, make: impl FnOnce(&std::path::Path) -> Result<T>) -> Result<T> {
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    linly_lora::io::atomic::write_out(out, &inputs, force, make)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Eval(a) => {
            let loaded = infer::load(&a.m.spec())?;
            let report = match (&a.text, &a.ids) {
                (Some(t), _) => eval::eval_text(&loaded, &linly_lora::tokenizer::read_text(t)?, a.window)?,
                (_, Some(i)) => eval::eval_ids(&loaded, &infer::read_ids_file(i)?, a.window)?,
                _ => unreachable!("clap requires one"),
            };
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("tokens scored: {}\nmean NLL:      {:.6} nats/token\nperplexity:    {:.4}", report.tokens, report.mean_nll, report.perplexity);
                if let (Some(c), Some(b)) = (report.chars, report.bits_per_char) {
                    println!("characters:    {c}\nbits/char:     {b:.6}");
                }
                if let Some(sp) = &report.by_vocab {
                    for (name, p) in [("base-vocabulary targets", &sp.base), ("added-token targets", &sp.added)] {
                        let share = p.bits_per_char.map(|b| format!(", {b:.4} bits/char")).unwrap_or_default();
                        println!("{name}: {} tokens, {:.4} nats/token{share}", p.tokens, p.mean_nll);
                    }
                }
            }
        }
        Cmd::Generate(a) => {
            let loaded = infer::load(&a.m.spec())?;
            let mut opts = a.s.options();
            opts.stop_ids = generate::default_stop_ids(&loaded);
            let prompt = match (&a.prompt, &a.prompt_ids) {
                (_, Some(ids)) => ids.clone(),
                (Some(p), _) => generate::text_prompt(&loaded, p)?,
                _ => unreachable!("clap requires one"),
            };
            let mut out = std::io::stdout().lock();
            if let (Some(_), Some(p)) = (&loaded.tok, &a.prompt) {
                write!(out, "{p}")?;
            }
            let new = generate::stream(&loaded, &prompt, &opts, &mut out)?;
            writeln!(out)?;
            if a.print_ids || loaded.tok.is_none() {
                let j = |v: &[u32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
                writeln!(out, "prompt_ids: {}\ngenerated_ids: {}", j(&prompt), j(&new))?;
            }
        }
        Cmd::Chat(a) => {
            let loaded = infer::load(&a.m.spec())?;
            let tok = loaded.tok.as_ref().ok_or_else(|| anyhow::anyhow!("chat needs a tokenizer.json in the model folder (or --tokenizer)"))?;
            let template = a.template.unwrap_or_else(|| chat::default_template(tok));
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            let mut out = std::io::stdout();
            chat::repl(&loaded, template, a.system.as_deref(), &a.s.options(), &mut input, &mut out)?;
        }
        Cmd::Train(a) => {
            let r = linly_lora::train::run::train(&linly_lora::train::run::TrainOptions {
                recipe: a.recipe,
                resume: a.resume,
                progress: !a.quiet,
                stop_after: a.stop_after,
            })?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Merge(a) => {
            let mut inputs = vec![a.base.clone()];
            inputs.extend(a.adapters.iter().cloned());
            inputs.extend(a.tokenizer.iter().cloned());
            let mut opts = linly_lora::lora::merge::MergeOptions {
                base: a.base,
                adapters: a.adapters,
                out: a.out.clone(),
                dtype: a.dtype,
                tokenizer: a.tokenizer,
                shard_size: linly_lora::lora::merge::parse_size(&a.shard_size)?,
                allow_vocab_padding: a.allow_vocab_padding,
            };
            let r = write_out(&a.out, &inputs, a.force, |o| {
                opts.out = o.to_path_buf();
                linly_lora::lora::merge::merge(&opts)
            })?;
            println!(
                "merged {} LoRA pairs into {} tensors ({} shard(s), vocab {}, tied {}) -> {}",
                r.lora_pairs_merged,
                r.tensors,
                r.shards,
                r.vocab_size,
                r.tie_word_embeddings,
                a.out.display()
            );
        }
        Cmd::Adapter { what: AdapterCmd::Pack { adapter, out, dtype, force } } => {
            let r = write_out(&out, std::slice::from_ref(&adapter), force, |o| linly_lora::lora::save::pack(&adapter, o, dtype))?;
            println!(
                "packed {} tensors: {:.1} MB -> {:.1} MB{} -> {}",
                r.tensors,
                r.bytes_in as f64 / 1e6,
                r.bytes_out as f64 / 1e6,
                if r.deduplicated_head { " (tied lm_head stored once)" } else { "" },
                out.display()
            );
        }
        Cmd::Vocab { what } => vocab(what)?,
        Cmd::Import { what: ImportCmd::Gguf { file, out, dtype, force } } => {
            let r = write_out(&out, std::slice::from_ref(&file), force, |o| linly_lora::io::gguf::import_gguf(&file, o, dtype))?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "imported {} tensors ({} parameters; source types {:?}) -> {} [{} layers, hidden {}, vocab {}, tied {}, tokenizer {}]",
                r.n_tensors,
                r.n_params,
                r.source_types,
                out.display(),
                r.num_layers,
                r.hidden_size,
                r.vocab_size,
                r.tied_embeddings,
                r.tokenizer.as_deref().unwrap_or("none")
            );
        }
        Cmd::Serve(a) => {
            let opts = linly_lora::serve::ServeOptions {
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
            };
            linly_lora::serve::serve(&opts, |addr, st| {
                println!("linly-lora serve: {} ({:?} template) listening on http://{addr}", st.model_id(), st.template());
            })?;
        }
        Cmd::Bench { what: BenchCmd::Forward { m, prompt, decode, reps } } => {
            let r = linly_lora::bench::forward(&m.shape, &m.device, m.dtype, prompt, decode, reps)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Bench { what: BenchCmd::Train { m, rank, batch, seq, warmup, steps } } => {
            let r = linly_lora::bench::train::train(&m.shape, &m.device, m.dtype, rank, batch, seq, warmup, steps)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Bench { what: BenchCmd::Scaler { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits } } => {
            let rows = linly_lora::bench::scaler::run(&linly_lora::bench::scaler::ScalerBenchOptions { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits })?;
            println!("{}", linly_lora::bench::scaler::markdown(&rows));
            println!("{}", serde_json::to_string(&rows)?);
        }
        Cmd::Bench { what: BenchCmd::Serve { m, clients, max_tokens, requests } } => {
            use linly_lora::bench::serve as bs;
            let rows = bs::run(&bs::ServeBenchOptions { spec: m.spec(), clients, max_tokens, requests_per_client: requests })?;
            println!("{}", bs::markdown(&rows));
            println!("{}", serde_json::to_string(&rows)?);
        }
        Cmd::Quantize(a) => {
            let inputs: Vec<PathBuf> = [Some(a.model.clone()), a.imatrix.clone(), a.gptq.clone()].into_iter().flatten().collect();
            check_out(&a.out, &inputs, a.force)?;
            let (m, h) = linly_lora::quant::imatrix::load_or_calibrate(&a.model, a.imatrix.as_deref(), a.gptq.as_deref(), a.calib_window, a.calib_tokens, a.gptq_damp)?;
            print_calibration(&m, &h);
            let mut r = write_out(&a.out, &inputs, a.force, |o| linly_lora::quant::store::quantize_model_imatrix(&a.model, o, a.format, a.keep_embeddings, a.pure, m.as_ref(), h.as_ref()))?;
            r.path = a.out.join(r.path.file_name().unwrap_or_default());
            print_export(&r);
        }
        Cmd::Imatrix(a) => {
            let m = write_out(&a.out, &[a.model.clone(), a.text.clone()], a.force, |o| linly_lora::quant::imatrix::run(&a.model, &a.text, a.window, a.max_tokens, o))?;
            println!("{} tensors, {} tokens in {} windows -> {}", m.columns.len(), m.tokens, m.meta["windows"], a.out.display());
        }
        Cmd::Export { what: ExportCmd::Gguf { model, out, force, ty, keep_embeddings, pure, imatrix, gptq, calib_window } } => {
            let inputs: Vec<PathBuf> = [Some(model.clone()), imatrix.clone(), gptq.clone()].into_iter().flatten().collect();
            // Before the calibration pass, which can take minutes.
            check_out(&out, &inputs, force)?;
            let damp = linly_lora::quant::gptq::DAMP;
            let (m, h) = linly_lora::quant::imatrix::load_or_calibrate(&model, imatrix.as_deref(), gptq.as_deref(), calib_window, None, damp)?;
            print_calibration(&m, &h);
            let opts = linly_lora::io::gguf::ExportOptions { ty, keep_embeddings, pure };
            let mut r = write_out(&out, &inputs, force, |o| linly_lora::io::gguf::export_gguf_calibrated(&model, o, &opts, m.as_ref(), h.as_ref()))?;
            r.path = out.clone();
            print_export(&r);
        }
        Cmd::Bench { what: BenchCmd::Quant { model, prompt, gen, reps, threads } } => {
            let r = linly_lora::bench::quant::run(&model, prompt, gen, reps, threads)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Bench { what: BenchCmd::Merge { shape, rank, workdir, keep } } => {
            let r = linly_lora::bench::merge::merge(&shape, rank, &workdir, keep)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

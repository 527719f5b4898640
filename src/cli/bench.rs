//! `linly-lora bench`: benchmarks on random-weight models of named shapes.

use super::ModelArgs;
use clap::{Args, Subcommand};
use linly_lora::io::safetensors::FloatType;
use std::path::PathBuf;

/// The random-weight model a benchmark runs.
#[derive(Args)]
pub struct BenchModel {
    /// tiny, smollm2-135m, 160m, 1b or 7b
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: FloatType,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill and decode tokens/s of a random model (shapes: tiny, smollm2-135m, 160m, 1b, 7b)
    Forward {
        #[command(flatten)]
        m: BenchModel,
        #[arg(long, default_value_t = 128, value_parser = super::at_least::<1>)]
        prompt: usize,
        #[arg(long, default_value_t = 64, value_parser = super::at_least::<1>)]
        decode: usize,
        #[arg(long, default_value_t = 3, value_parser = super::at_least::<1>)]
        reps: usize,
    },
    /// Training tokens/s and peak RSS: LoRA on all 7 projections + embed/lm_head, AdamW, random tokens
    Train {
        #[command(flatten)]
        m: BenchModel,
        #[arg(long, default_value_t = 8, value_parser = super::at_least::<1>)]
        rank: usize,
        #[arg(long, default_value_t = 4, value_parser = super::at_least::<1>)]
        batch: usize,
        #[arg(long, default_value_t = 256, value_parser = super::at_least::<1>)]
        seq: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10, value_parser = super::at_least::<1>)]
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
        #[arg(long, default_value_t = 100, value_parser = super::at_least::<1>)]
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
    ///
    /// Per client count: tokens/s and its ratio to 1 client, mean and p95 latency, tokens per
    /// CPU second, and from the server's step counters the mean decode-only step with every
    /// client in the batch, the decode-only ratio (clients × step(1) / step(clients): the
    /// throughput ratio without prompts and arrivals, steadier on a shared machine) and the
    /// share of forward time spent reading prompts.
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
        /// Sampling temperature of every request (0: greedy; the OpenAI default a client
        /// gets without the field is 1)
        #[arg(long, default_value_t = 0.0, value_parser = super::api_temperature)]
        temperature: f32,
        /// Run the whole sweep this many times; each round's ratios are against its own
        /// 1-client row, and the closing "median" rows give the median over rounds (with the
        /// range of the ratios), which a busy patch on a shared machine moves far less
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// The server's KV cache storage, as `serve --kv-cache`: f32 or f16
        #[arg(long, default_value = "f32", value_name = "f32|f16")]
        kv_cache: linly_lora::model::KvType,
    },
    /// pp/tg tokens/s of a model folder (quantized or not), measured like llama-bench's pp N / tg N
    Quant {
        /// Model folder (from `linly-lora quantize`, or any HF folder)
        #[arg(long)]
        model: PathBuf,
        /// Prompt tokens processed in one batch (llama-bench -p)
        #[arg(long, default_value_t = 128, value_parser = super::at_least::<1>)]
        prompt: usize,
        /// Tokens generated one at a time from an empty cache (llama-bench -n)
        #[arg(long, default_value_t = 64, value_parser = super::at_least::<1>)]
        gen: usize,
        #[arg(long, default_value_t = 3, value_parser = super::at_least::<1>)]
        reps: usize,
        /// Worker threads (llama-bench -t)
        #[arg(long, default_value_t = 2, value_parser = super::threads)]
        threads: usize,
    },
    /// Merge wall time ÷ copy time and peak RSS, on a synthetic f16 model + rank-r adapter
    Merge {
        #[arg(long, default_value = "1b")]
        shape: String,
        #[arg(long, default_value_t = 64, value_parser = super::at_least::<1>)]
        rank: usize,
        /// Scratch folder (must not exist; removed afterwards unless --keep)
        #[arg(long, default_value = "runs/bench-merge")]
        workdir: PathBuf,
        #[arg(long)]
        keep: bool,
    },
}

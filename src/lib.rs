//! linly-lora: teach an English LLaMA-family model a new language cheaply.
//!
//! The recipe of Linly, Chinese-LLaMA-Alpaca and Colossal-LLaMA-2: extend the tokenizer,
//! resize the embedding and LM head with sub-token-mean rows, train LoRA adapters together
//! with the embedding and head on mixed data, merge, and serve.
//!
//! Where things live:
//! - [`model`]: the one LLaMA definition (attention, RoPE, norms, KV cache);
//!   LoRA is applied in [`model::linear::Linear::forward`].
//! - [`lora`]: LoRA layers and adapters.
//! - [`io`]: file formats (safetensors, weight folders, atomic writes).
//! - [`infer`]: evaluation, sampling, generation and chat templates.
//! - [`quant`]: llama.cpp block formats (Q8_0, Q4_0, Q4_K), CPU kernels, quantized folders.
//! - [`commands`]: one entry function per `linly-lora` subcommand; the binary calls only these.

pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod infer;
pub mod io;
pub mod lora;
pub mod template;
pub mod model;
pub mod quant;
pub mod rng;
pub mod tokenizer;
pub mod train;
pub mod vocab;
pub mod serve;

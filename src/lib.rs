//! linly-lora: teach an English LLaMA-family model a new language cheaply.
//!
//! The recipe of Linly, Chinese-LLaMA-Alpaca and Colossal-LLaMA-2: extend the tokenizer,
//! resize the embedding and LM head with sub-token-mean rows, train LoRA adapters together
//! with the embedding and head on mixed data, merge, and serve.
//!
//! The modules, bottom to top. Each uses only those listed before it (`tests/layers.rs` checks
//! every `crate::` path against this order; the few edges still pointing up are listed there
//! with what breaks them):
//! 1. [`rng`], [`device`], [`template`], [`heap`]: the one seeded generator, device names, prompt
//!    templates, the C heap's policy for large buffers.
//! 2. [`ggml`]: ggml tensor types; each block format's encoder and decoder side by side; the
//!    quantized matrices and their CPU kernels.
//! 3. [`io`]: containers: safetensors, weight folders, atomic writes, GGUF files.
//! 4. [`config`]: HF `config.json` and the validated runtime config.
//! 5. [`tokenizer`]: loading `tokenizer.json` (every caller comes through here).
//! 6. [`kernels`]: host GEMM, the vectorised softmax pieces and the fused ops with hand-written
//!    backward passes (RMSNorm, SwiGLU, LoRA projection, causal attention), one file per op
//!    beside the composition it replaces; the `LINLY_LORA_KERNELS` switch. No model types.
//! 7. [`model`]: the one LLaMA definition (attention, RoPE, norms, KV cache), calling the
//!    kernels, with the LoRA branch it applies in [`model::linear::Linear::forward`] and the
//!    loader of quantized folders.
//! 8. [`lora`]: building, loading, saving and merging adapters.
//! 9. [`data`]: sources, tokenization cache, packing and mixing.
//! 10. [`vocab`]: tokenizer extension and new-row initialisation.
//! 11. [`infer`]: evaluation, sampling, generation and chat.
//! 12. [`quant`]: whole-model conversions: quantize, importance matrices, GPTQ, GGUF export/import.
//! 13. [`train`]: recipes, the step, the run loop.
//! 14. [`serve`]: the OpenAI-compatible HTTP service.
//! 15. [`commands`]: one entry function per `linly-lora` subcommand; the binary calls only these.

pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod ggml;
pub mod heap;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod quant;
pub mod rng;
pub mod serve;
pub mod template;
pub mod tokenizer;
pub mod train;
pub mod vocab;

//! File formats. Each format lives behind its own small module so that the model code sees
//! only names, shapes and f32/f16/bf16 data.

pub mod atomic;
pub mod gguf;
pub mod safetensors;
pub mod weights;

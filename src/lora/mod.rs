//! LoRA: low-rank adapters on the model's projections, PEFT's design split into the layer
//! (here), its configuration, and adapter save/load.

pub mod adapter;
pub mod config;
pub mod merge;
pub mod model;
pub mod save;
pub mod truncate;

// The branch itself is part of the model (a projection holds its branches), so the model
// never imports this module; everything here builds, loads, saves or merges branches.
pub use crate::model::LoraBranch;
pub use model::{inject, set_table_modes, LoraInit, LoraSettings, TableMode};

//! Training: LoRA + embedding/head training with mixed data, fp16 loss scaling, checkpoints.

pub mod chain_teacher;
pub mod checkpoint;
pub mod fit_rows;
pub mod interrupt;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod prepare_data;
pub mod recipe;
pub mod row_map;
pub mod run;
pub mod scaler;
pub mod schedule;
pub mod step;
pub mod teacher;

//! The training benchmark: LoRA on all seven projections + trainable embedding/LM head, AdamW,
//! random tokens, on a random-weight model of a named shape. The same workload as
//! `shared/bench/lora_cpu_bench.py` (PyTorch + PEFT) so the two can be compared in one run.

use crate::io::safetensors::FloatType;
use crate::lora::{inject, set_table_modes, LoraInit, LoraSettings, TableMode};
use crate::model::Llama;
use crate::train::optim::AdamW;
use crate::train::row_map::RowMaps;
use crate::train::scaler::{Scaler, ScalerConfig};
use crate::train::step::{train_step, MicroBatch, StepHparams};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps_timed: usize,
    pub s_per_step: f64,
    pub tokens_per_s: f64,
    pub loss_first_last: [f64; 2],
    pub peak_rss_mib: f64,
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[allow(clippy::too_many_arguments)]
pub fn train(shape: &str, device_name: &str, dtype: FloatType, rank: usize, batch: usize, seq: usize, warmup: usize, steps: usize) -> Result<TrainBench> {
    let cfg = super::shape(shape, None)?;
    let device = crate::device::parse(device_name)?.autodiff();
    let mut model = Llama::random(&cfg, &device, dtype);
    let targets = crate::lora::config::TARGETS.iter().map(|s| s.to_string()).collect();
    inject(&mut model, &LoraSettings { r: rank, alpha: 2.0 * rank as f64, dropout: 0.0, rslora: false, targets, init: LoraInit::Kaiming, seed: 0 }, &device)?;
    set_table_modes(&mut model, TableMode::All, TableMode::All, cfg.vocab_size)?;
    let mut opt = AdamW::default();
    let mut scaler = Scaler::new(if dtype == FloatType::F16 { ScalerConfig::default() } else { ScalerConfig { init_scale: 1.0, growth_interval: u32::MAX, ..Default::default() } });
    let hp = StepHparams { lr: 2e-4, lora_b_lr: 2e-4, embed_lr: 2e-4, weight_decay: 0.0, max_grad_norm: 0.0 };
    let mut state = 1u64;
    let mut batch_of = || {
        let ids: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..seq)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        3 + ((state >> 33) % (cfg.vocab_size as u64 - 3)) as u32
                    })
                    .collect()
            })
            .collect();
        let labels = ids.iter().map(|r: &Vec<u32>| r.iter().map(|&x| x as i64).collect()).collect();
        MicroBatch::new(ids, labels)
    };
    for _ in 0..warmup {
        train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut scaler, &[batch_of()], &hp, &device)?;
    }
    let mut losses = Vec::new();
    let t = Instant::now();
    for _ in 0..steps {
        losses.push(train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut scaler, &[batch_of()], &hp, &device)?.loss);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(TrainBench {
        shape: shape.into(),
        device: device_name.into(),
        dtype: dtype.name().into(),
        rank,
        batch,
        seq,
        steps_timed: steps,
        s_per_step: secs / steps as f64,
        tokens_per_s: (batch * seq * steps) as f64 / secs,
        loss_first_last: [losses[0], *losses.last().unwrap()],
        peak_rss_mib: peak_rss_mib(),
    })
}

//! Learning-rate schedules: linear warmup, then cosine or linear decay to zero (HF's
//! `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup`), or constant.

/// The recipe's `[train] schedule` spellings are the serde names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// The multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`.
pub fn lr_factor(schedule: Schedule, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert!((lr_factor(Schedule::Cosine, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert!(lr_factor(Schedule::Cosine, 99, 100, 10) < 0.01);
        assert!((lr_factor(Schedule::Linear, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 99, 100, 0), 1.0);
    }
}

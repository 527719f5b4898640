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

/// Steps a run stops at under a wall-clock budget (`[train] minutes`): the `done` steps plus as
/// many more as the budget's remaining seconds hold at `s_per_step`, within `[done, upper]`
/// (`upper` is the recipe's `steps`). A budget already spent ends the run where it is.
pub fn steps_within(budget_s: f64, elapsed_s: f64, s_per_step: f64, done: usize, upper: usize) -> usize {
    let left = (budget_s - elapsed_s).max(0.0);
    let more = if s_per_step > 0.0 { left / s_per_step } else { f64::INFINITY };
    // `as` saturates: an infinite or huge quotient becomes usize::MAX, then the clamp.
    done.saturating_add(more.floor() as usize).min(upper.max(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_plans_the_steps_it_holds() {
        // 600 s budget, 100 s gone, 10 s a step: 50 more after the 8 done.
        assert_eq!(steps_within(600.0, 100.0, 10.0, 8, 200), 58);
        // The recipe's steps stay the upper bound.
        assert_eq!(steps_within(1e9, 100.0, 10.0, 8, 200), 200);
        // A spent budget stops where the run is; never fewer than done.
        assert_eq!(steps_within(60.0, 100.0, 10.0, 8, 200), 8);
        assert_eq!(steps_within(600.0, 0.0, 10.0, 250, 200), 250);
        // Zero-time steps (a clock that did not move) take the upper bound.
        assert_eq!(steps_within(600.0, 0.0, 0.0, 8, 200), 200);
        // A partial step left over does not count.
        assert_eq!(steps_within(600.0, 100.0, 11.0, 8, 200), 8 + 45);
    }

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

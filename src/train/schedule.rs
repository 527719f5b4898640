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

/// The ceiling on the warm-up factor of a run whose length a `[train] minutes` budget planned
/// after its first `planned_at` steps. Until then the run warmed up over `warmup_before` steps
/// (those of the recipe's upper bound); the planned run's warm-up (`warmup_now` steps) is
/// shorter, and taken as it is it would lift the factor at once (from 8/30 to 9/12 in the
/// quickstart: the learning rate ×2.8 in one step, after which one run's gradient norms spiked
/// for the rest of it; BENCHMARKS.md, "The control at equal wall time"). So the ramp goes on
/// from the factor it had reached, at the planned warm-up's slope: the factor never rises by
/// more than one step of either warm-up. A function of the step alone, so a resumed run gives
/// the same rates.
pub fn replanned_ramp(step: usize, planned_at: usize, warmup_before: usize, warmup_now: usize) -> f64 {
    if step < planned_at || warmup_before == 0 {
        return 1.0;
    }
    let reached = (planned_at as f64 / warmup_before as f64).min(1.0);
    (reached + (step + 1 - planned_at) as f64 / warmup_now.max(1) as f64).min(1.0)
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
    fn a_replanned_warmup_goes_on_from_where_it_was() {
        // The quickstart's case: 30 warm-up steps of the bound, a plan after 8 with 12.
        let f = |step: usize| lr_factor(Schedule::Cosine, step, if step < 8 { 1000 } else { 400 }, if step < 8 { 30 } else { 12 }).min(replanned_ramp(step, 8, 30, 12));
        assert!((f(7) - 8.0 / 30.0).abs() < 1e-12);
        // Without the ceiling step 8 would be at 9/12.
        assert!((f(8) - (8.0 / 30.0 + 1.0 / 12.0)).abs() < 1e-12);
        for s in 1..400 {
            assert!(f(s) - f(s - 1) <= 1.0 / 12.0 + 1e-12, "step {s}: {} -> {}", f(s - 1), f(s));
        }
        // The ramp reaches the peak four steps after the planned warm-up would have, and from
        // there the planned decay rules.
        assert!(replanned_ramp(15, 8, 30, 12) < 1.0 && replanned_ramp(16, 8, 30, 12) == 1.0);
        for s in 16..400 {
            assert_eq!(f(s), lr_factor(Schedule::Cosine, s, 400, 12));
        }
        // Before the plan, and without a budget's warm-up, no ceiling.
        assert_eq!(replanned_ramp(7, 8, 30, 12), 1.0);
        assert_eq!(replanned_ramp(50, 8, 0, 12), 1.0);
        // A warm-up already over before the plan stays over.
        assert_eq!(replanned_ramp(8, 8, 5, 12), 1.0);
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

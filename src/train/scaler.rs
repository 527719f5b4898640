//! The dynamic fp16 loss scaler. This is where the loss scale changes.
//!
//! A GradScaler/DeepSpeed scaler halves the scale on every overflow (after a hysteresis) and
//! skips the step. When fresh vocabulary rows overflow again and again, as in the
//! LLama2-chat-13B-Chinese run, the scale is halved until it underflows and the run dies.
//! This scaler is built so that cannot happen:
//!
//! 1. It knows *which* parameter group overflowed (LoRA, old table rows, new table rows): the
//!    trainer passes one finite-flag per group, read in the single host sync of the step.
//! 2. New rows are handled on their own. Their masters and their compute are f32 (see
//!    `TokenTable`), and when only they overflow their non-finite rows are dropped for the
//!    step and the rest steps — the global scale is not touched.
//! 3. The scale has a floor. At the floor an overflowing step is not skipped forever: after
//!    `floor_patience` skipped steps the trainer steps with the non-finite entries zeroed and
//!    the gradient clipped, so training keeps moving.
//! 4. A forward pass that is non-finite in itself is not the scale's fault either: activations
//!    overflow fp16 whatever the loss is multiplied by. When trainable new rows are outliers
//!    (RMS over [`RESCUE_RMS_FACTOR`] × the old rows' mean), the trainer scales them down to
//!    the old rows' RMS (`TokenTable::rescue_new_rows`) and skips the step with the scale kept
//!    ([`Scaler::skip_for_row_rescue`]). GradScaler halves instead, forever: with N(0, 16384)
//!    rows it was at 2^-24 after 40 steps (`bench scaler`, BENCHMARKS.md).
//! 5. Every decision is returned as an event for the log.
//!
//! `Naive` reproduces GradScaler (halve on overflow, double after N clean steps) for contrast.

use serde::{Deserialize, Serialize};

/// New rows whose RMS exceeds this multiple of the old rows' mean RMS are scaled down when the
/// forward pass itself is non-finite. Sub-token-mean and mean rows sit at or below 1×; 4× leaves
/// room for rows that trained larger and catches the N(0, 1)-and-up rows that overflow.
pub const RESCUE_RMS_FACTOR: f32 = 4.0;

/// Parameter groups the scaler tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum Group {
    Lora,
    OldRows,
    NewRows,
}

pub const GROUPS: [Group; 3] = [Group::Lora, Group::OldRows, Group::NewRows];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScalerKind {
    /// torch.cuda.amp.GradScaler semantics.
    Naive,
    /// Group-aware, floored, never-dying (this crate's).
    Linly,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScalerConfig {
    pub kind: ScalerKind,
    pub init_scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
    /// Overflowing steps tolerated before the scale backs off (DeepSpeed's hysteresis).
    pub hysteresis: u32,
    /// The scale never goes below this (Linly only; Naive has none, as GradScaler).
    pub min_scale: f32,
    /// Consecutive skipped steps at the floor before stepping with sanitized gradients.
    pub floor_patience: u32,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            kind: ScalerKind::Linly,
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 200,
            // GradScaler's 1, not DeepSpeed's 2: hysteresis never saves a skip (the overflowing
            // step is skipped either way), it only delays the backoff, and in an overflow storm
            // that costs one extra skipped step (`bench scaler`, BENCHMARKS.md). With 1 this
            // scaler does what GradScaler does except where GradScaler fails: new-row overflows
            // and the floor.
            hysteresis: 1,
            min_scale: 1.0,
            floor_patience: 3,
        }
    }
}

impl ScalerConfig {
    pub fn naive() -> Self {
        ScalerConfig { kind: ScalerKind::Naive, hysteresis: 1, min_scale: 0.0, ..Default::default() }
    }
}

/// What the trainer must do with this step's gradients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Unscale and step everything.
    Step,
    /// Skip the optimizer step entirely.
    Skip,
    /// Step, with the non-finite entries of these groups zeroed first.
    StepSanitized(Vec<Group>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scaler {
    pub cfg: ScalerConfig,
    pub scale: f32,
    good_steps: u32,
    hysteresis_left: u32,
    skipped_at_floor: u32,
    /// Overflow counts per group, for the log and the bench.
    pub overflows: [u64; 3],
    pub skipped_steps: u64,
    pub min_seen: f32,
}

fn idx(g: Group) -> usize {
    GROUPS.iter().position(|x| *x == g).unwrap()
}

impl Scaler {
    pub fn new(cfg: ScalerConfig) -> Self {
        let scale = cfg.init_scale;
        let h = cfg.hysteresis.max(1);
        Scaler { cfg, scale, good_steps: 0, hysteresis_left: h, skipped_at_floor: 0, overflows: [0; 3], skipped_steps: 0, min_seen: scale }
    }

    /// Whether a non-finite forward pass should rescue outlier new rows (this scaler) rather
    /// than count as an overflow (GradScaler).
    pub fn rescues_rows(&self) -> bool {
        self.cfg.kind == ScalerKind::Linly
    }

    /// The trainer scaled outlier new rows down after a non-finite forward pass: the step is
    /// skipped, the scale and the growth count stay, and the overflow is counted as the new
    /// rows'. Returns the log line.
    pub fn skip_for_row_rescue(&mut self, what: &str) -> String {
        self.overflows[idx(Group::NewRows)] += 1;
        self.skipped_steps += 1;
        format!("non-finite forward pass: {what}; step skipped, scale kept at {}", self.scale)
    }

    /// Decides the step from per-group finiteness (`finite[g]`: all gradients of that group
    /// are finite; groups without trainable parameters pass `true`). Returns the action and
    /// a log line describing the decision when anything other than a clean step happened.
    pub fn update(&mut self, finite: &[(Group, bool)]) -> (Action, Option<String>) {
        let bad: Vec<Group> = finite.iter().filter(|(_, ok)| !ok).map(|(g, _)| *g).collect();
        for g in &bad {
            self.overflows[idx(*g)] += 1;
        }
        if bad.is_empty() {
            self.hysteresis_left = self.cfg.hysteresis.max(1);
            self.skipped_at_floor = 0;
            self.good_steps += 1;
            if self.good_steps >= self.cfg.growth_interval {
                self.good_steps = 0;
                let old = self.scale;
                self.scale = (self.scale * self.cfg.growth_factor).min(f32::MAX / 4.0);
                return (Action::Step, Some(format!("scale {old} -> {} after {} clean steps", self.scale, self.cfg.growth_interval)));
            }
            return (Action::Step, None);
        }
        self.good_steps = 0;
        match self.cfg.kind {
            ScalerKind::Naive => {
                let old = self.scale;
                self.scale *= self.cfg.backoff_factor;
                self.skipped_steps += 1;
                self.min_seen = self.min_seen.min(self.scale);
                (Action::Skip, Some(format!("overflow in {bad:?}: skip step, scale {old} -> {}", self.scale)))
            }
            ScalerKind::Linly => {
                if bad.iter().all(|g| *g == Group::NewRows) {
                    // The fresh rows alone: their own problem, not the scale's.
                    return (Action::StepSanitized(bad), Some("overflow only in new rows: non-finite rows dropped for this step, scale kept".into()));
                }
                if self.hysteresis_left > 1 {
                    self.hysteresis_left -= 1;
                    self.skipped_steps += 1;
                    return (Action::Skip, Some(format!("overflow in {bad:?}: skip step, hysteresis {} left, scale kept at {}", self.hysteresis_left, self.scale)));
                }
                let old = self.scale;
                let next = (self.scale * self.cfg.backoff_factor).max(self.cfg.min_scale);
                if next < old {
                    self.scale = next;
                    self.min_seen = self.min_seen.min(next);
                    self.skipped_steps += 1;
                    return (Action::Skip, Some(format!("overflow in {bad:?}: skip step, scale {old} -> {next}")));
                }
                // At the floor.
                self.skipped_at_floor += 1;
                if self.skipped_at_floor > self.cfg.floor_patience {
                    self.skipped_at_floor = 0;
                    return (
                        Action::StepSanitized(bad.clone()),
                        Some(format!("overflow in {bad:?} at the scale floor {}: stepping with non-finite entries zeroed", self.scale)),
                    );
                }
                self.skipped_steps += 1;
                (Action::Skip, Some(format!("overflow in {bad:?} at the scale floor {}: skip ({} of {})", self.scale, self.skipped_at_floor, self.cfg.floor_patience)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ok() -> Vec<(Group, bool)> {
        GROUPS.iter().map(|g| (*g, true)).collect()
    }
    fn bad(g: Group) -> Vec<(Group, bool)> {
        GROUPS.iter().map(|x| (*x, *x != g)).collect()
    }

    #[test]
    fn grows_after_interval() {
        let mut s = Scaler::new(ScalerConfig { growth_interval: 3, ..Default::default() });
        for _ in 0..2 {
            assert_eq!(s.update(&all_ok()).0, Action::Step);
        }
        assert_eq!(s.scale, 65536.0);
        s.update(&all_ok());
        assert_eq!(s.scale, 131072.0);
    }

    #[test]
    fn naive_halves_without_floor_until_it_dies() {
        let mut s = Scaler::new(ScalerConfig::naive());
        for _ in 0..40 {
            assert_eq!(s.update(&bad(Group::NewRows)).0, Action::Skip);
        }
        assert!(s.scale < 1e-6, "GradScaler keeps halving: {}", s.scale);
        assert_eq!(s.skipped_steps, 40);
    }

    #[test]
    fn new_row_overflow_never_moves_the_scale() {
        let mut s = Scaler::new(ScalerConfig::default());
        for _ in 0..1000 {
            let (a, log) = s.update(&bad(Group::NewRows));
            assert_eq!(a, Action::StepSanitized(vec![Group::NewRows]));
            assert!(log.is_some());
        }
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.skipped_steps, 0);
        assert_eq!(s.overflows, [0, 0, 1000]);
    }

    #[test]
    fn hysteresis_then_backoff_then_floor_then_sanitized_steps() {
        let cfg = ScalerConfig { init_scale: 4.0, hysteresis: 2, min_scale: 1.0, floor_patience: 2, ..Default::default() };
        let mut s = Scaler::new(cfg);
        let seq: Vec<Action> = (0..12).map(|_| s.update(&bad(Group::Lora)).0).collect();
        // hysteresis 2: the first overflow only skips; then 4 -> 2 -> 1 (floor).
        assert_eq!(s.scale, 1.0);
        assert!(s.scale >= s.cfg.min_scale);
        // At the floor: patience 2 skips, then a sanitized step, repeating — never stuck.
        let sanitized = seq.iter().filter(|a| matches!(a, Action::StepSanitized(_))).count();
        assert!(sanitized >= 2, "{seq:?}");
        // A clean step resets hysteresis.
        assert_eq!(s.update(&all_ok()).0, Action::Step);
        assert_eq!(s.update(&bad(Group::Lora)).0, Action::Skip);
        assert_eq!(s.scale, 1.0);
    }

    /// With the default config, on any sequence of overflows, this scaler has skipped no more
    /// steps than GradScaler at every point (here overflows do not depend on the scale, so
    /// this is the state machines alone; `bench scaler` measures real runs).
    #[test]
    fn never_skips_more_than_gradscaler() {
        let (mut ours, mut naive) = (Scaler::new(ScalerConfig { growth_interval: 5, ..Default::default() }), Scaler::new(ScalerConfig { growth_interval: 5, ..ScalerConfig::naive() }));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..5000 {
            // xorshift: bursts and isolated overflows in every combination of groups.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let flags: Vec<(Group, bool)> = GROUPS.iter().enumerate().map(|(i, g)| (*g, !(x >> (8 * i)).is_multiple_of(4))).collect();
            ours.update(&flags);
            naive.update(&flags);
            assert!(ours.skipped_steps <= naive.skipped_steps, "step {step}: ours {} > naive {}", ours.skipped_steps, naive.skipped_steps);
            assert!(ours.scale >= ours.cfg.min_scale);
        }
        assert!(ours.skipped_steps < naive.skipped_steps);
    }

    #[test]
    fn mixed_overflow_counts_every_group() {
        let mut s = Scaler::new(ScalerConfig::default());
        s.update(&[(Group::Lora, false), (Group::OldRows, true), (Group::NewRows, false)]);
        assert_eq!(s.overflows, [1, 0, 1]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = Scaler::new(ScalerConfig::default());
        s.update(&bad(Group::Lora));
        let j = serde_json::to_string(&s).unwrap();
        let t: Scaler = serde_json::from_str(&j).unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), j);
    }
}

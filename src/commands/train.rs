//! `train`.

use super::Report;
pub use crate::train::prepare_data::{PrepareDataOptions, PrepareDataReport, PreparedSource};
pub use crate::train::run::{TrainOptions, TrainReport};
use anyhow::Result;
use std::fmt;

/// Runs the recipe; Ctrl-C or SIGTERM stops it at the next step boundary with a checkpoint
/// (a second signal quits at once; [`crate::train::interrupt`]).
pub fn train(o: &TrainOptions) -> Result<TrainReport> {
    // Every step allocates and frees the same large tensors (see `heap`).
    crate::heap::reuse_large_buffers();
    let _signals = crate::train::interrupt::install();
    crate::train::run::train(o)
}

/// Pretty JSON: the report is what scripts read after a run.
impl fmt::Display for TrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string_pretty(self).map_err(|_| fmt::Error)?)
    }
}

impl Report for TrainReport {}

/// `data prepare`: tokenizes the recipe's sources into their token stores.
pub fn prepare_data(o: &PrepareDataOptions) -> Result<PrepareDataReport> {
    crate::train::prepare_data::prepare_data(o)
}

/// Pretty JSON, like `train`'s report.
impl fmt::Display for PrepareDataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string_pretty(self).map_err(|_| fmt::Error)?)
    }
}

impl Report for PrepareDataReport {}

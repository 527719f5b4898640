//! The command layer: one entry function per `linly-lora` subcommand, each taking an options
//! struct and returning a report whose `Display` is what the command prints (and whose
//! `Serialize` is its `--json`). Policy that is about the command rather than the model lives
//! here: how a `--out` is staged, which flags imply sampling, how a piece budget splits, how a
//! report is printed ([`emit`], [`emit_or_json`]). The binary (`src/main.rs`, with its clap
//! definitions in `src/cli/`) only parses flags into these options.
//!
//! This is the top of the module order (see the crate docs): nothing below imports it.

pub mod bench;
pub mod gguf;
pub mod infer;
pub mod lora;
pub mod quant;
pub mod serve;
pub mod train;
pub mod vocab;

use crate::io::atomic::OutKind;
use anyhow::Result;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a command prints when it has finished.
pub trait Report: fmt::Display {
    /// Lines for stderr, printed before the report (warnings, side results). A command's stdout
    /// stays its result alone, so that `| jq` and friends keep working.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Prints a finished command's report: its notes on stderr, then the report on stdout. An
/// empty report prints nothing.
pub fn emit(r: &impl Report) -> Result<()> {
    for n in r.notes() {
        eprintln!("{n}");
    }
    let text = r.to_string();
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}

/// [`emit`], or with `--json` the report as one line of JSON.
pub fn emit_or_json<R: Report + Serialize>(r: &R, json: bool) -> Result<()> {
    if !json {
        return emit(r);
    }
    for n in r.notes() {
        eprintln!("{n}");
    }
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

/// A report for a command that wrote `--out`: the display names the folder the user asked
/// for, not the staging folder the work happened in. Serializes as the inner report.
#[derive(Debug, Clone)]
pub struct Written<R> {
    pub report: R,
    pub out: PathBuf,
}

impl<R: Serialize> Serialize for Written<R> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.report.serialize(s)
    }
}

/// A report printed as one line of JSON (the benchmarks' reports, read by scripts).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Json<R>(pub R);

impl<R: Serialize> fmt::Display for Json<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string(&self.0).map_err(|_| fmt::Error)?)
    }
}

impl<R: Serialize> Report for Json<R> {}

/// [`crate::io::atomic::check_out`] for a command's `--out` and its inputs.
fn check_out(out: &Path, inputs: &[PathBuf], force: bool, kind: OutKind) -> Result<()> {
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::io::atomic::check_out(out, &inputs, force, kind)
}

/// [`crate::io::atomic::write_out`]: every command that writes `--out` goes through it, so an
/// existing output is replaced only with `--force`, only once the new one is complete, and
/// never when it is one of the inputs.
fn write_out<T>(out: &Path, inputs: &[PathBuf], force: bool, kind: OutKind, make: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::io::atomic::write_out(out, &inputs, force, kind, make)
}

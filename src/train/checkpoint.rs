//! Checkpoints: the adapter (PEFT format), AdamW moments, scaler state, data position and step,
//! written into a staging folder and renamed into place, so a `kill -9` leaves either the
//! previous checkpoint or a complete new one. The last `keep_last` are kept. Training reads
//! them into memory ([`encode`]) and writes them on a thread of their own ([`Writer`]).

use super::optim::{AdamW, AdamWConfig, Moments};
use super::row_map::RowMaps;
use crate::io::atomic::StagedDir;
use crate::io::safetensors::{encode_f32, write_all, Entry, FloatType, SafetensorsFile};
use crate::io::weights::tensor_to_f32;
use crate::lora::save::EncodedAdapter;
use anyhow::{bail, Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything but tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    pub scaler: super::scaler::Scaler,
    /// The data mixer's serialised position.
    pub data: serde_json::Value,
    /// Adam step counts by parameter name.
    pub adam_t: std::collections::BTreeMap<String, u64>,
    /// A hash of the recipe, to refuse resuming a different run.
    pub recipe_hash: u64,
    /// The steps a `[train] minutes` budget planned, kept so that a resumed run ends where the
    /// first one planned to (absent in checkpoints of runs without a budget, and older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_steps: Option<usize>,
    /// The step after which that plan was first made (the warm-up goes on from there:
    /// `schedule::replanned_ramp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_at: Option<usize>,
}

pub fn dir_for(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// Completed checkpoints, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").exists().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// A checkpoint read out of the model and optimizer into memory: its adapter, the AdamW
/// moments (and row maps' factors), and its state. Made on the training thread, written by
/// [`Pending::write`] there or by a [`Writer`] on its own thread while training goes on.
pub struct Pending {
    step: usize,
    adapter: EncodedAdapter,
    optimizer: Vec<Entry>,
    state_json: String,
}

/// Reads what a checkpoint after `state.step` steps holds (the adapter already encoded).
pub fn encode(state: &TrainState, opt: &AdamW, row_maps: &RowMaps, adapter: EncodedAdapter) -> Result<Pending> {
    let mut t = Vec::new();
    for (name, m) in &opt.state {
        for (k, x) in [("m", &m.m), ("v", &m.v)] {
            let dims = x.dims();
            t.push((format!("{name}.{k}"), "F32".to_string(), dims.to_vec(), encode_f32(&tensor_to_f32(x.clone()), FloatType::F32)));
        }
    }
    // A row map's factors are not moments, but like them they exist only while training.
    for (name, x) in row_maps.factors() {
        t.push((format!("{name}.value"), "F32".to_string(), x.dims().to_vec(), encode_f32(&tensor_to_f32(x), FloatType::F32)));
    }
    let mut st = state.clone();
    st.adam_t = opt.state.iter().map(|(n, m)| (n.clone(), m.t)).collect();
    Ok(Pending { step: state.step, adapter, optimizer: t, state_json: serde_json::to_string_pretty(&st)? })
}

impl Pending {
    /// Writes the checkpoint into `out/checkpoints` (a staging folder renamed into place:
    /// `state.json` last, so a folder without it is never taken for a checkpoint), then
    /// removes all but the last `keep_last`.
    pub fn write(&self, out: &Path, keep_last: usize) -> Result<PathBuf> {
        let final_dir = dir_for(out, self.step);
        std::fs::create_dir_all(out.join("checkpoints")).with_context(|| format!("cannot create {}", out.join("checkpoints").display()))?;
        let staged = StagedDir::new(&final_dir, true)?;
        self.adapter.write(&staged.path().join("adapter"))?;
        if !self.optimizer.is_empty() {
            write_all(&staged.path().join("optimizer.safetensors"), &self.optimizer, None)?;
        }
        crate::io::atomic::write(&staged.path().join("state.json"), self.state_json.as_bytes())?;
        let dir = staged.commit()?;
        prune(out, keep_last);
        Ok(dir)
    }
}

/// Writes checkpoints on a thread of its own, one at a time, while training goes on. A
/// checkpoint of the quickstart is ~310 MB (the tied table's new rows twice in the adapter, as
/// PEFT keeps them, and their two Adam moments), and its writes wait on the disk: ~2.5–3 s a
/// checkpoint on the 2-core machine the quickstart was timed on, every 50 steps, ~3 % of the
/// run. The training thread only reads the tensors into memory ([`encode`]); the files, their
/// `fsync` and the rename happen here. The next [`Writer::submit`], [`Writer::wait`] or drop
/// waits for the one in flight, so a run that ends (or fails) has finished writing it, and a
/// caller that waits before it encodes the next holds one checkpoint in memory at a time. A process killed meanwhile leaves a staging folder
/// that the next run removes ([`clean`]); the previous checkpoint is whole.
#[derive(Default)]
pub struct Writer {
    in_flight: Option<(usize, std::thread::JoinHandle<Result<PathBuf>>)>,
}

impl Writer {
    /// Starts writing `pending` into `out` (after the one in flight has finished).
    pub fn submit(&mut self, out: &Path, keep_last: usize, pending: Pending) -> Result<()> {
        self.wait()?;
        let out = out.to_path_buf();
        let step = pending.step;
        let handle = std::thread::Builder::new().name("checkpoint".into()).spawn(move || pending.write(&out, keep_last)).context("cannot start the checkpoint writer's thread")?;
        self.in_flight = Some((step, handle));
        Ok(())
    }

    /// Waits for the checkpoint in flight, if any, and returns its folder.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        let Some((step, handle)) = self.in_flight.take() else { return Ok(None) };
        match handle.join() {
            Ok(r) => r.with_context(|| format!("writing the checkpoint of step {step}")).map(Some),
            Err(_) => bail!("the checkpoint writer of step {step} panicked"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("{e:#}");
        }
    }
}

/// Removes all but the last `keep_last` checkpoints. Each is first renamed to a staging name, so
/// a kill in the middle of a removal leaves debris [`clean`] recognises, never a half-deleted
/// `step-*` that [`list`] would take for a checkpoint.
fn prune(out: &Path, keep_last: usize) -> usize {
    let all = list(out);
    let n = all.len().saturating_sub(keep_last);
    for (_, p) in &all[..n] {
        let doomed = crate::io::atomic::temp_sibling(p);
        if std::fs::rename(p, &doomed).is_ok() {
            let _ = std::fs::remove_dir_all(&doomed);
        }
    }
    n
}

/// What a killed run left in `out/checkpoints`: staging folders of dead processes (a checkpoint
/// being written or removed), `step-*` folders without `state.json` (never complete), and
/// checkpoints beyond `keep_last`. Run before training starts; says on stderr what it removed.
pub fn clean(out: &Path, keep_last: usize) {
    let dir = out.join("checkpoints");
    crate::io::atomic::clean_stale_in(&dir, None);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && e.path().is_dir() && !e.path().join("state.json").exists() {
            let _ = std::fs::remove_dir_all(e.path());
            eprintln!("removed {}: an incomplete checkpoint left by an earlier run", e.path().display());
        }
    }
    let n = prune(out, keep_last);
    if n > 0 {
        eprintln!("removed {n} checkpoint(s) of {} beyond [output] keep_last = {keep_last}, left by an earlier run", dir.display());
    }
}

/// Loads a checkpoint's state and optimizer moments (onto `device`, without autodiff).
pub fn load(dir: &Path, device: &Device, adam: AdamWConfig) -> Result<(TrainState, AdamW, RowMaps)> {
    let text = std::fs::read_to_string(dir.join("state.json")).with_context(|| format!("{}: missing state.json", dir.display()))?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| format!("{}: bad state.json", dir.display()))?;
    let mut opt = AdamW::new(adam);
    let mut row_maps = RowMaps::default();
    let p = dir.join("optimizer.safetensors");
    if p.exists() {
        let f = SafetensorsFile::open(&p)?;
        for (name, t) in &state.adam_t {
            let get = |k: &str| -> Result<Tensor<2>> {
                let r = f.require(&format!("{name}.{k}"))?;
                if r.shape.len() != 2 {
                    bail!("{}: {name}.{k} is not 2-D", p.display());
                }
                Ok(Tensor::from_data(TensorData::new(r.to_f32()?, [r.shape[0], r.shape[1]]), device))
            };
            opt.state.insert(name.clone(), Moments { m: get("m")?, v: get("v")?, t: *t });
            if name.contains(".row_map.") {
                row_maps.keep_saved(name.clone(), get("value")?);
            }
        }
    }
    Ok((state, opt, row_maps))
}

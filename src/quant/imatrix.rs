//! Importance matrices with llama-imatrix's semantics: for every linear weight `[out, in]`, the
//! mean over calibration tokens of `x_j²` for each input column `j`, where `x` is what that
//! projection actually multiplies (q/k/v and gate/up see the RMS-normed hidden state, `o_proj`
//! the attention context, `down_proj` the SwiGLU product). A column with a large mean square
//! moves the output more per unit of weight error, so the quantizers weight it more
//! (`quantize --imatrix`, see [`crate::ggml::blocks::quantize_row_q4_0_rmse`]).
//!
//! Collection runs the one model definition: [`ColumnTap`]s are installed on the projections'
//! [`Linear`](crate::model::Linear)s, the model runs over the text in non-overlapping windows
//! (as llama-imatrix's chunks), and the taps are removed again.
//!
//! File format: safetensors, one F32 tensor `[in]` per weight, named by the weight's HF name
//! (`model.layers.3.mlp.down_proj.weight`), holding the column means; metadata `format` =
//! `linly-imatrix`, `version` = `1`, `tokens` (rows averaged over), `windows`, `window`,
//! `text`, `model`. Written atomically.

use super::gptq::Hessians;
use crate::infer::{ids_tensor, Loaded};
use crate::io::safetensors::{encode_f32, Entry, FloatType};
use crate::model::Llama;
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The `format` metadata value of an importance-matrix file.
pub const FORMAT: &str = "linly-imatrix";

/// A token's contribution to a Hessian is capped at this many times the median token's (see
/// [`ColumnTap::record`]).
pub const GRAM_CLIP: f32 = 10.0;

/// Column sums of squares of every input a projection has seen, and how many rows that was.
#[derive(Debug, Default)]
pub struct ColumnTap {
    acc: Mutex<(Vec<f64>, u64)>,
    /// `Σ xᵀx` (`[cols, cols]`, row-major) when GPTQ's Hessian is collected too.
    gram: Option<Mutex<Vec<f64>>>,
}

impl ColumnTap {
    /// A tap that also sums the full `xᵀx` ([`crate::quant::gptq`]'s Hessian).
    pub fn with_gram() -> Self {
        ColumnTap { gram: Some(Mutex::default()), ..Default::default() }
    }

    /// Adds `x` `[rows, cols]`: Σ_rows x² per column. The square and the row sum run as tensor
    /// ops (one `[cols]` vector comes to the host), the running total in f64 so that tens of
    /// thousands of tokens do not lose the small columns.
    pub fn record(&self, x: &Tensor<2>) {
        let [rows, cols] = x.dims();
        let x = x.clone().cast(burn::tensor::FloatDType::F32);
        if let Some(g) = &self.gram {
            // A token whose square norm is far above the window's median (SmolLM2's down_proj
            // input has ones at 10³–10⁵ times it) would make the Hessian its alone, and GPTQ
            // would fit it and move every other token's output. Each token's share is capped
            // at GRAM_CLIP times the median; on the gate/up input it rarely bites.
            let norms = crate::io::weights::tensor_to_f32((x.clone() * x.clone()).sum_dim(1).reshape([rows]));
            let mut sorted = norms.clone();
            sorted.sort_by(f32::total_cmp);
            let cap = GRAM_CLIP * sorted[rows / 2];
            let w: Vec<f32> = norms.iter().map(|&n| if n > cap && n > 0.0 { (cap / n).sqrt() } else { 1.0 }).collect();
            let xw = x.clone() * Tensor::<1>::from_data(burn::tensor::TensorData::new(w, [rows]), &x.device()).reshape([rows, 1]);
            // One GEMM per window; the running sum in f64 as for the diagonal.
            let xtx = crate::io::weights::tensor_to_f32(xw.clone().transpose().matmul(xw).reshape([cols * cols]));
            let mut g = g.lock().expect("imatrix tap poisoned");
            if g.is_empty() {
                *g = vec![0.0; cols * cols];
            }
            g.iter_mut().zip(xtx).for_each(|(a, v)| *a += v as f64);
        }
        let sums = crate::io::weights::tensor_to_f32((x.clone() * x).sum_dim(0).reshape([cols]));
        let mut acc = self.acc.lock().expect("imatrix tap poisoned");
        if acc.0.is_empty() {
            acc.0 = vec![0.0; cols];
        }
        assert_eq!(acc.0.len(), cols, "a projection's input width does not change");
        for (a, s) in acc.0.iter_mut().zip(sums) {
            *a += s as f64;
        }
        acc.1 += rows as u64;
    }

    /// The column means of x², and the number of rows; `None` before anything was recorded.
    pub fn means(&self) -> Option<(Vec<f32>, u64)> {
        let acc = self.acc.lock().expect("imatrix tap poisoned");
        (acc.1 > 0).then(|| (acc.0.iter().map(|s| (s / acc.1 as f64) as f32).collect(), acc.1))
    }

    /// The summed `xᵀx`, when collected and something was recorded.
    pub fn take_gram(&self) -> Option<Vec<f64>> {
        self.gram.as_ref().map(|g| std::mem::take(&mut *g.lock().expect("imatrix tap poisoned"))).filter(|g| !g.is_empty())
    }
}

impl crate::model::linear::InputObserver for ColumnTap {
    fn observe(&self, x: &Tensor<2>) {
        self.record(x);
    }
}

/// An importance matrix: HF weight name → per-column mean of x².
#[derive(Debug, Clone, Default)]
pub struct Imatrix {
    pub columns: BTreeMap<String, Vec<f32>>,
    /// Rows (tokens) averaged over.
    pub tokens: u64,
    /// Free-form provenance (`text`, `model`, `window`, ...), stored as file metadata.
    pub meta: BTreeMap<String, String>,
    /// The file it was loaded from or saved to, for error messages.
    pub path: std::path::PathBuf,
}

/// Installs a fresh tap on every layer projection, returning them with their HF weight names.
/// With `hessians`, the taps of the projections in [`Hessians::OWNERS`] also sum `xᵀx`.
pub fn install_taps(model: &mut Llama, hessians: bool) -> Vec<(String, Arc<ColumnTap>)> {
    let mut taps = Vec::new();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        for (path, lin) in layer.projections_mut() {
            let tap = Arc::new(if hessians && Hessians::OWNERS.contains(&path) { ColumnTap::with_gram() } else { ColumnTap::default() });
            lin.tap = Some(tap.clone() as Arc<dyn crate::model::linear::InputObserver>);
            taps.push((format!("model.layers.{l}.{path}.weight"), tap));
        }
    }
    taps
}

/// Removes every tap [`install_taps`] put in.
pub fn remove_taps(model: &mut Llama) {
    for layer in &mut model.layers {
        for (_, lin) in layer.projections_mut() {
            lin.tap = None;
        }
    }
}

/// Runs the model over `ids` in non-overlapping windows of `window` tokens (llama-imatrix's
/// chunks; a last, shorter window is used too) and returns the column means of every
/// projection's input.
pub fn collect(loaded: &mut Loaded, ids: &[u32], window: usize) -> Result<Imatrix> {
    Ok(collect_with_hessians(loaded, ids, window, false)?.0)
}

/// [`collect`], and with `hessians` also GPTQ's `Σ xᵀx` of each distinct projection input.
pub fn collect_with_hessians(loaded: &mut Loaded, ids: &[u32], window: usize, hessians: bool) -> Result<(Imatrix, Hessians)> {
    if ids.is_empty() {
        bail!("the calibration text has no tokens");
    }
    let window = window.clamp(1, loaded.model.config.max_position_embeddings);
    let taps = install_taps(&mut loaded.model, hessians);
    let mut windows = 0;
    for chunk in ids.chunks(window) {
        // The final norm's output is not needed; `hidden` skips the LM head's product.
        let _ = loaded.model.hidden(ids_tensor(chunk, &loaded.device), None);
        windows += 1;
    }
    remove_taps(&mut loaded.model);
    let mut m = Imatrix::default();
    let mut h = Hessians::default();
    for (name, tap) in taps {
        let (v, rows) = tap.means().ok_or_else(|| anyhow!("`{name}` saw no input"))?;
        m.tokens = rows;
        if let Some(g) = tap.take_gram() {
            h.grams.insert(name.clone(), (v.len(), g));
            h.tokens = rows;
        }
        m.columns.insert(name, v);
    }
    m.meta.insert("windows".into(), windows.to_string());
    m.meta.insert("window".into(), window.to_string());
    Ok((m, h))
}

/// `linly-lora imatrix`: tokenizes `text` like `eval` (BOS first when the model has one), keeps
/// at most `max_tokens`, collects and writes `out`.
pub fn run(model_dir: &Path, text_path: &Path, window: usize, max_tokens: Option<usize>, out: &Path) -> Result<Imatrix> {
    crate::io::atomic::check_out(out, &[model_dir, text_path], false, crate::io::atomic::OutKind::File)?;
    let (mut m, _) = calibrate(model_dir, text_path, window, max_tokens, false)?;
    m.save(out)?;
    Ok(m)
}

/// What `quantize` / `export gguf` quantize with: the importance matrix from `imatrix_file`, or,
/// with `gptq_text`, the importance matrix and GPTQ's Hessians from one pass over that text
/// (`damp`: GPTQ's damping).
pub fn load_or_calibrate(
    model_dir: &Path,
    imatrix_file: Option<&Path>,
    gptq_text: Option<&Path>,
    window: usize,
    max_tokens: Option<usize>,
    damp: f64,
) -> Result<(Option<Imatrix>, Option<Hessians>)> {
    match gptq_text {
        Some(text) => {
            let (m, mut h) = calibrate(model_dir, text, window, max_tokens, true)?;
            h.damp = damp;
            Ok((Some(m), Some(h)))
        }
        None => Ok((imatrix_file.map(Imatrix::load).transpose()?, None)),
    }
}

/// Tokenizes `text` like `eval` (BOS first when the model has one), keeps at most
/// `max_tokens`, and collects the importance matrix and, with `hessians`, GPTQ's Hessians.
pub fn calibrate(model_dir: &Path, text_path: &Path, window: usize, max_tokens: Option<usize>, hessians: bool) -> Result<(Imatrix, Hessians)> {
    if crate::model::gguf_weights::is_quantized_dir(model_dir) {
        bail!(
            "{} is already quantized: calibrate on the original f32/f16/bf16 folder it was made from",
            model_dir.display()
        );
    }
    let mut loaded = crate::infer::load(&crate::infer::ModelSpec::new(model_dir))?;
    let tok = loaded
        .tok
        .as_ref()
        .ok_or_else(|| anyhow!("{} has no tokenizer.json; calibration needs one to read {}", model_dir.display(), text_path.display()))?;
    let text = crate::tokenizer::read_text(text_path)?;
    if text.trim().is_empty() {
        bail!("{} is empty: calibration needs text to read (a few thousand tokens of what the model will see)", text_path.display());
    }
    let mut ids = tok.encode(&text, true)?;
    crate::infer::prepend_bos(&loaded, &mut ids);
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    let (mut m, h) = collect_with_hessians(&mut loaded, &ids, window, hessians)?;
    m.meta.insert("text".into(), text_path.display().to_string());
    m.meta.insert("model".into(), model_dir.display().to_string());
    Ok((m, h))
}

impl Imatrix {
    /// Writes the file atomically (see the module docs for the layout).
    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.path = path.to_path_buf();
        let tensors: Vec<Entry> = self.columns.iter().map(|(n, v)| (n.clone(), "F32".to_string(), vec![v.len()], encode_f32(v, FloatType::F32))).collect();
        let mut meta = self.meta.clone();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("version".into(), "1".into());
        meta.insert("tokens".into(), self.tokens.to_string());
        crate::io::safetensors::write_all(path, &tensors, Some(meta)).with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let f = crate::io::safetensors::SafetensorsFile::open(path)?;
        let meta: BTreeMap<String, String> = f.metadata().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{} is not an importance matrix from `linly-lora imatrix` (no `format: {FORMAT}` metadata)", path.display());
        }
        let mut columns = BTreeMap::new();
        for name in f.names() {
            let t = f.require(&name)?;
            if t.shape.len() != 1 {
                bail!("{}: `{name}` has shape {:?}, expected one value per input column", path.display(), t.shape);
            }
            let v = t.to_f32().with_context(|| format!("{}: `{name}`", path.display()))?;
            if v.iter().any(|x| !x.is_finite() || *x < 0.0) {
                bail!("{}: `{name}` holds a negative or non-finite mean square", path.display());
            }
            columns.insert(name, v);
        }
        let tokens = meta.get("tokens").and_then(|t| t.parse().ok()).unwrap_or(0);
        Ok(Imatrix { columns, tokens, meta, path: path.to_path_buf() })
    }

    /// The importance of `name`'s `cols` input columns, or an error naming the tensor and the
    /// fix when the file has no entry for it or one of another width (another model's file).
    pub fn get(&self, name: &str, cols: usize) -> Result<&[f32]> {
        let file = &self.path;
        let redo = "re-run `linly-lora imatrix` on the model being quantized";
        let v = self
            .columns
            .get(name)
            .ok_or_else(|| anyhow!("importance matrix {} has no entry for `{name}`: it was made for another model; {redo}", file.display()))?;
        if v.len() != cols {
            bail!("importance matrix {}: `{name}` has {} columns but the weight has {cols}: it was made for another model; {redo}", file.display(), v.len());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn tap_accumulates_column_means_of_squares() {
        let dev = Default::default();
        let tap = ColumnTap::default();
        assert!(tap.means().is_none());
        let a: Tensor<2> = Tensor::from_data(TensorData::new(vec![1f32, -2.0, 3.0, 0.5], [2, 2]), &dev);
        let b: Tensor<2> = Tensor::from_data(TensorData::new(vec![-1f32, 4.0], [1, 2]), &dev);
        tap.record(&a);
        tap.record(&b);
        let (m, rows) = tap.means().unwrap();
        assert_eq!(rows, 3);
        // column 0: (1 + 9 + 1) / 3; column 1: (4 + 0.25 + 16) / 3.
        assert!((m[0] - 11.0 / 3.0).abs() < 1e-6 && (m[1] - 20.25 / 3.0).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn file_round_trip_and_lookup_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.imatrix");
        let mut m = Imatrix { tokens: 7, ..Default::default() };
        m.columns.insert("model.layers.0.mlp.down_proj.weight".into(), vec![0.5, 2.0, 0.0]);
        m.meta.insert("text".into(), "t.txt".into());
        m.save(&p).unwrap();
        let back = Imatrix::load(&p).unwrap();
        assert_eq!(back.tokens, 7);
        assert_eq!(back.columns, m.columns);
        assert_eq!(back.meta["text"], "t.txt");
        assert_eq!(back.get("model.layers.0.mlp.down_proj.weight", 3).unwrap(), &[0.5, 2.0, 0.0]);
        let e = back.get("model.layers.1.mlp.down_proj.weight", 3).unwrap_err().to_string();
        assert!(e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("linly-lora imatrix"), "{e}");
        let e = back.get("model.layers.0.mlp.down_proj.weight", 4).unwrap_err().to_string();
        assert!(e.contains("3 columns") && e.contains("has 4"), "{e}");
        // Any other safetensors file is refused by its missing format tag.
        let other = dir.path().join("w.safetensors");
        crate::io::safetensors::write_all(&other, &[("x".into(), "F32".into(), vec![1], vec![0; 4])], None).unwrap();
        assert!(Imatrix::load(&other).unwrap_err().to_string().contains("not an importance matrix"));
    }
}

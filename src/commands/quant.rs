//! `quantize`, `imatrix` and `export gguf`: everything that rounds weights to ggml's formats.

use super::{check_out, write_out, Report, Written};
use crate::io::atomic::OutKind;
use crate::quant::{ExportReport, ExportType};
use crate::quant::gptq::Hessians;
use crate::quant::imatrix::Imatrix;
use crate::quant::QType;
use anyhow::Result;
use std::fmt;
use std::path::{Path, PathBuf};

/// The quantization choices `quantize` and `export gguf` share.
#[derive(Debug, Clone)]
pub struct QuantSettings {
    /// Keep the token embedding and LM head in f16.
    pub keep_embeddings: bool,
    /// Every 2-D weight in the one type, no llama.cpp mix.
    pub pure: bool,
    /// An importance matrix from `imatrix`.
    pub imatrix: Option<PathBuf>,
    /// A calibration text for GPTQ (replaces `imatrix`).
    pub gptq: Option<PathBuf>,
    /// Tokens per forward pass over the GPTQ text.
    pub calib_window: usize,
    /// At most this many tokens of the GPTQ text.
    pub calib_tokens: Option<usize>,
    /// GPTQ's damping, as a fraction of the Hessian's mean diagonal.
    pub gptq_damp: f64,
}

impl Default for QuantSettings {
    fn default() -> Self {
        QuantSettings { keep_embeddings: false, pure: false, imatrix: None, gptq: None, calib_window: 512, calib_tokens: None, gptq_damp: crate::quant::gptq::DAMP }
    }
}

impl QuantSettings {
    fn inputs(&self, model: &Path) -> Vec<PathBuf> {
        [Some(model.to_path_buf()), self.imatrix.clone(), self.gptq.clone()].into_iter().flatten().collect()
    }

    /// The importance matrix and Hessians to round with: loaded, or from a calibration pass
    /// over the GPTQ text (minutes on a large model, so reported on stderr when it is done).
    fn calibrate(&self, model: &Path) -> Result<(Option<Imatrix>, Option<Hessians>)> {
        let (m, h) = crate::quant::imatrix::load_or_calibrate(model, self.imatrix.as_deref(), self.gptq.as_deref(), self.calib_window, self.calib_tokens, self.gptq_damp)?;
        if let (Some(m), Some(_)) = (&m, &h) {
            eprintln!("calibrated on {} tokens of {}", m.tokens, m.meta.get("text").map_or("?", String::as_str));
        }
        Ok((m, h))
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub model: PathBuf,
    pub format: QType,
    pub out: PathBuf,
    pub force: bool,
    pub quant: QuantSettings,
}

/// A quantized folder that eval/generate/chat run directly.
pub fn quantize(o: &QuantizeOptions) -> Result<ExportReport> {
    let q = &o.quant;
    let inputs = q.inputs(&o.model);
    // Before the calibration pass, which can take minutes.
    check_out(&o.out, &inputs, o.force, OutKind::Folder)?;
    let (m, h) = q.calibrate(&o.model)?;
    let mut r = write_out(&o.out, &inputs, o.force, OutKind::Folder, |staged| {
        crate::quant::store::quantize_model_imatrix(&o.model, staged, o.format, q.keep_embeddings, q.pure, m.as_ref(), h.as_ref())
    })?;
    r.path = o.out.join(r.path.file_name().unwrap_or_default());
    Ok(r)
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub model: PathBuf,
    /// The .gguf file to write.
    pub out: PathBuf,
    pub force: bool,
    pub ty: ExportType,
    pub quant: QuantSettings,
}

/// HF folder → one GGUF file for llama.cpp.
pub fn export_gguf(o: &ExportOptions) -> Result<ExportReport> {
    let q = &o.quant;
    let inputs = q.inputs(&o.model);
    check_out(&o.out, &inputs, o.force, OutKind::File)?;
    let (m, h) = q.calibrate(&o.model)?;
    let opts = crate::quant::ExportOptions { ty: o.ty, keep_embeddings: q.keep_embeddings, pure: q.pure };
    let mut r = write_out(&o.out, &inputs, o.force, OutKind::File, |staged| crate::quant::export_gguf_calibrated(&o.model, staged, &opts, m.as_ref(), h.as_ref()))?;
    r.path = o.out.clone();
    Ok(r)
}

impl fmt::Display for ExportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {} tensors {:?}, {:.1} MB, tokenizer {}, chat template {} -> {}",
            self.n_tensors,
            self.types,
            self.bytes as f64 / 1e6,
            self.tokenizer.as_deref().unwrap_or("none"),
            self.chat_template,
            self.path.display()
        )
    }
}

impl Report for ExportReport {
    fn notes(&self) -> Vec<String> {
        self.warnings.iter().map(|w| format!("warning: {w}")).collect()
    }
}

#[derive(Debug, Clone)]
pub struct ImatrixOptions {
    pub model: PathBuf,
    pub text: PathBuf,
    /// Tokens per forward pass.
    pub window: usize,
    pub max_tokens: Option<usize>,
    pub out: PathBuf,
    pub force: bool,
}

pub fn imatrix(o: &ImatrixOptions) -> Result<Written<Imatrix>> {
    let report = write_out(&o.out, &[o.model.clone(), o.text.clone()], o.force, OutKind::File, |staged| crate::quant::imatrix::run(&o.model, &o.text, o.window, o.max_tokens, staged))?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<Imatrix> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.report;
        write!(f, "{} tensors, {} tokens in {} windows -> {}", m.columns.len(), m.tokens, m.meta["windows"], self.out.display())
    }
}

impl Report for Written<Imatrix> {}

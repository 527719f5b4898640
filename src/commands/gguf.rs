//! `import gguf` (`export gguf` quantizes, so it lives in [`super::quant`]).

use super::{write_out, Report, Written};
use crate::io::atomic::OutKind;
use crate::quant::ImportReport;
use crate::io::safetensors::FloatType;
use anyhow::Result;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub file: PathBuf,
    pub out: PathBuf,
    /// Storage dtype of the 2-D weights (norms stay f32).
    pub dtype: FloatType,
    pub force: bool,
}

pub fn import_gguf(o: &ImportOptions) -> Result<Written<ImportReport>> {
    let report = write_out(&o.out, std::slice::from_ref(&o.file), o.force, OutKind::Folder, |staged| crate::quant::import_gguf(&o.file, staged, o.dtype))?;
    Ok(Written { report, out: o.out.clone() })
}

impl fmt::Display for Written<ImportReport> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "imported {} tensors ({} parameters; source types {:?}) -> {} [{} layers, hidden {}, vocab {}, tied {}, tokenizer {}]",
            r.n_tensors,
            r.n_params,
            r.source_types,
            self.out.display(),
            r.num_layers,
            r.hidden_size,
            r.vocab_size,
            r.tied_embeddings,
            r.tokenizer.as_deref().unwrap_or("none")
        )
    }
}

impl Report for Written<ImportReport> {
    fn notes(&self) -> Vec<String> {
        self.report.warnings.iter().map(|w| format!("warning: {w}")).collect()
    }
}

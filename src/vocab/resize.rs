//! Initial values for the embedding / LM-head rows of new tokens (pure math, no tensors).

use super::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// `vocab_extension.json`: which old tokens each new token was made of.
///
/// New token `old_vocab + i` has text `pieces[i]` and was split by the *old* tokenizer into
/// `subtokens[i]`. `pieces` is optional so that files from other tools (such as the tiny_llama
/// fixture) load unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabExtension {
    /// Rows of the old embedding table (= old tokenizer size including added tokens).
    pub old_vocab: usize,
    /// Rows after resizing: `old_vocab + subtokens.len()`.
    pub new_vocab: usize,
    /// Old token ids of new token `old_vocab + i`; may be empty (see [`init_new_rows`]).
    pub subtokens: Vec<Vec<u32>>,
    /// Text of new token `old_vocab + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pieces: Option<Vec<String>>,
}

impl VocabExtension {
    /// Number of new tokens.
    pub fn added(&self) -> usize {
        self.subtokens.len()
    }

    /// Number of new tokens with no sub-tokens (they get the mean of all rows).
    pub fn empty_subtokens(&self) -> usize {
        self.subtokens.iter().filter(|s| s.is_empty()).count()
    }

    /// Checks the invariants every consumer relies on; an inconsistent file would otherwise index
    /// out of bounds or silently shift rows.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.new_vocab == self.old_vocab + self.subtokens.len(),
            "new_vocab ({}) != old_vocab ({}) + number of subtoken lists ({}); the file was edited \
             or truncated, re-run `vocab extend`",
            self.new_vocab,
            self.old_vocab,
            self.subtokens.len()
        );
        for (i, ids) in self.subtokens.iter().enumerate() {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.old_vocab) {
                bail!(
                    "subtokens[{i}] (new token {}) lists id {bad}, but old_vocab is {}; sub-tokens \
                     must be ids of the old tokenizer. Was the file made for another tokenizer?",
                    self.old_vocab + i,
                    self.old_vocab
                );
            }
        }
        if let Some(pieces) = &self.pieces {
            ensure!(
                pieces.len() == self.subtokens.len(),
                "pieces has {} entries but subtokens has {}; they must match one to one",
                pieces.len(),
                self.subtokens.len()
            );
        }
        Ok(())
    }

    /// Reads and validates a `vocab_extension.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read vocab extension file {}", path.display()))?;
        let ext: VocabExtension = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid vocab_extension.json (expected {{\"old_vocab\", \"new_vocab\", \
                 \"subtokens\", optional \"pieces\"}}, as written by `vocab extend`)",
                path.display()
            )
        })?;
        ext.validate().with_context(|| format!("invalid vocab extension file {}", path.display()))?;
        Ok(ext)
    }

    /// Renders the file: one new token per line so that diffs and `grep` stay usable at 28k entries.
    pub fn to_json_string(&self) -> Result<String> {
        let mut out = String::new();
        out.push_str(&format!("{{\n  \"old_vocab\": {},\n  \"new_vocab\": {},\n  \"subtokens\": [", self.old_vocab, self.new_vocab));
        for (i, ids) in self.subtokens.iter().enumerate() {
            out.push_str(if i == 0 { "\n    " } else { ",\n    " });
            out.push_str(&serde_json::to_string(ids)?);
        }
        out.push_str(if self.subtokens.is_empty() { "]" } else { "\n  ]" });
        if let Some(pieces) = &self.pieces {
            out.push_str(",\n  \"pieces\": [");
            for (i, p) in pieces.iter().enumerate() {
                out.push_str(if i == 0 { "\n    " } else { ",\n    " });
                out.push_str(&serde_json::to_string(p)?);
            }
            out.push_str(if pieces.is_empty() { "]" } else { "\n  ]" });
        }
        out.push_str("\n}\n");
        Ok(out)
    }

    /// Validates and writes atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        write_atomic(path, self.to_json_string()?.as_bytes())
    }
}

/// How new rows are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitMethod {
    /// Mean of the rows of the token's old sub-tokens (Linly / Colossal-LLaMA-2). Keeps the new
    /// token's initial meaning close to the sequence it replaces.
    SubtokenMean,
    /// Mean of all old rows.
    Mean,
    /// Mean of all old rows plus N(0, 1/dim) noise (variance 1/dim, std dim^-1/2), so new tokens
    /// start distinguishable from each other.
    NoisyMean,
    /// N(0, init_std²), as for a freshly initialised model.
    Random,
    /// Both sides fitted against the base model on the training text (see
    /// [`super::distill`]): input rows by Token Distillation, head rows by a softmax regression
    /// on the base's hidden states. Unties a tied table.
    Distill,
    /// Only the input rows by Token Distillation; a tied table stays tied (the head uses them).
    DistillInput,
    /// Only the head rows (softmax regression); input rows stay sub-token means. Unties.
    DistillHead,
    /// Both sides trained end to end against the base on the training text, the layers frozen:
    /// a short run of the training loop on the new rows alone with the cross-tokenizer
    /// distillation term. `vocab resize` runs it (`crate::train::fit_rows`); a tied table stays
    /// tied.
    Fit,
}

impl InitMethod {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            InitMethod::SubtokenMean => "subtoken-mean",
            InitMethod::Mean => "mean",
            InitMethod::NoisyMean => "noisy-mean",
            InitMethod::Random => "random",
            InitMethod::Distill => "distill",
            InitMethod::DistillInput => "distill-input",
            InitMethod::DistillHead => "distill-head",
            InitMethod::Fit => "fit",
        }
    }

    /// Every spelling, for help texts and errors.
    pub const ALL: [InitMethod; 8] = [
        InitMethod::SubtokenMean,
        InitMethod::Mean,
        InitMethod::NoisyMean,
        InitMethod::Random,
        InitMethod::Distill,
        InitMethod::DistillInput,
        InitMethod::DistillHead,
        InitMethod::Fit,
    ];

    /// The sides a model-based method fits; `None` for the table-only methods.
    pub fn distill_sides(self) -> Option<super::distill::Sides> {
        use super::distill::Sides;
        match self {
            InitMethod::Distill => Some(Sides { input: true, output: true }),
            InitMethod::DistillInput => Some(Sides { input: true, output: false }),
            InitMethod::DistillHead => Some(Sides { input: false, output: true }),
            _ => None,
        }
    }
}

impl fmt::Display for InitMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InitMethod {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match InitMethod::ALL.iter().find(|m| m.as_str() == s) {
            Some(m) => Ok(*m),
            None => {
                let all: Vec<&str> = InitMethod::ALL.iter().map(|m| m.as_str()).collect();
                bail!("unknown init method {s:?}; expected one of {}", all.join(", "))
            }
        }
    }
}

fn mean_rows<'a>(rows: impl Iterator<Item = &'a [f32]>, dim: usize) -> Vec<f32> {
    // f64 accumulation: a 32k-row mean in f32 loses ~3 digits.
    let mut acc = vec![0f64; dim];
    let mut n = 0usize;
    for row in rows {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x as f64;
        }
        n += 1;
    }
    acc.iter().map(|&a| (a / n.max(1) as f64) as f32).collect()
}

/// Rows for the `ext.added()` new tokens of one table (embedding or LM head), row-major
/// `[ext.added(), dim]`.
///
/// `old` is the table row-major `[old_rows, dim]`; `old_rows` must equal `ext.old_vocab` (a table
/// padded beyond the tokenizer would put new tokens on top of padding rows; resize the padding away
/// first). Call once per table: with `SubtokenMean` each table uses its own rows, which is what
/// Linly / Colossal-LLaMA-2 do for untied LM heads. Tokens with an empty sub-token list (pieces the
/// old tokenizer could only map to `<unk>`) fall back to the mean of all old rows; count them with
/// [`VocabExtension::empty_subtokens`] to tell the user. `seed` drives `NoisyMean` and `Random`;
/// give each table its own seed if their noise should differ. `init_std` is used by `Random` only.
pub fn init_new_rows(
    old: &[f32],
    old_rows: usize,
    dim: usize,
    ext: &VocabExtension,
    init: InitMethod,
    seed: u64,
    init_std: f32,
) -> Result<Vec<f32>> {
    ext.validate()?;
    ensure!(dim > 0, "embedding dim must be > 0");
    ensure!(
        old_rows.checked_mul(dim) == Some(old.len()),
        "table has {} values, expected old_rows × dim = {old_rows} × {dim}",
        old.len()
    );
    ensure!(
        old_rows == ext.old_vocab,
        "table has {old_rows} rows but the vocab extension was made for a tokenizer of {} tokens; \
         use the model that matches the tokenizer given to `vocab extend`",
        ext.old_vocab
    );
    if init == InitMethod::Random {
        ensure!(init_std.is_finite() && init_std >= 0.0, "init std must be a finite number ≥ 0, got {init_std}");
    }
    let n_new = ext.added();
    let needs_global_mean = init != InitMethod::Random;
    if needs_global_mean && old_rows == 0 {
        bail!("cannot take a mean of an empty table");
    }
    let global_mean = if needs_global_mean { mean_rows(old.chunks_exact(dim), dim) } else { Vec::new() };

    let mut out = Vec::with_capacity(n_new * dim);
    match init {
        // The model-based methods start from sub-token means; `super::distill` or the training
        // loop fits them.
        InitMethod::SubtokenMean | InitMethod::Distill | InitMethod::DistillInput | InitMethod::DistillHead | InitMethod::Fit => {
            for ids in &ext.subtokens {
                if ids.is_empty() {
                    out.extend_from_slice(&global_mean);
                } else {
                    let rows = ids.iter().map(|&id| &old[id as usize * dim..(id as usize + 1) * dim]);
                    out.extend(mean_rows(rows, dim));
                }
            }
        }
        InitMethod::Mean => {
            for _ in 0..n_new {
                out.extend_from_slice(&global_mean);
            }
        }
        InitMethod::NoisyMean => {
            let std = 1.0 / (dim as f64).sqrt();
            let mut rng = crate::rng::SplitMix::new(seed);
            for _ in 0..n_new {
                out.extend(global_mean.iter().map(|&m| (m as f64 + std * rng.normal()) as f32));
            }
        }
        InitMethod::Random => {
            let mut rng = crate::rng::SplitMix::new(seed);
            out.extend((0..n_new * dim).map(|_| (init_std as f64 * rng.normal()) as f32));
        }
    }
    Ok(out)
}

/// The whole resized table `[ext.new_vocab, dim]`: the old rows unchanged, then `new_rows`
/// (from [`init_new_rows`]).
pub fn resize_table(old: &[f32], new_rows: Vec<f32>) -> Vec<f32> {
    let mut table = Vec::with_capacity(old.len() + new_rows.len());
    table.extend_from_slice(old);
    table.extend(new_rows);
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
    }

    fn f32_tensor(st: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (v, t.shape().to_vec())
    }

    fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
        assert_eq!(ours.len(), reference.len());
        let num: f64 = ours.iter().zip(reference).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = reference.iter().map(|&b| (b as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn subtoken_mean_reproduces_reference_rows() {
        let base = std::fs::read(fixture("tiny_llama/base/model.safetensors")).unwrap();
        let base = SafeTensors::deserialize(&base).unwrap();
        let expected = std::fs::read(fixture("tiny_llama/expected.safetensors")).unwrap();
        let expected = SafeTensors::deserialize(&expected).unwrap();
        let ext = VocabExtension::load(&fixture("tiny_llama/vocab_extension.json")).unwrap();
        assert_eq!((ext.old_vocab, ext.new_vocab, ext.added()), (320, 384, 64));

        for (table, reference) in [
            ("model.embed_tokens.weight", "resized_embed_new_rows"),
            ("lm_head.weight", "resized_lm_head_new_rows"),
        ] {
            let (old, shape) = f32_tensor(&base, table);
            assert_eq!(shape, vec![320, 64]);
            let (want, want_shape) = f32_tensor(&expected, reference);
            assert_eq!(want_shape, vec![64, 64]);
            let got = init_new_rows(&old, 320, 64, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
            let err = rel_err(&got, &want);
            assert!(err <= 1e-5, "{table}: relative error {err:e}");
            let full = resize_table(&old, init_new_rows(&old, 320, 64, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap());
            assert_eq!(full.len(), 384 * 64);
            assert_eq!(&full[..old.len()], &old[..]);
        }
    }

    fn toy_ext() -> VocabExtension {
        VocabExtension { old_vocab: 3, new_vocab: 5, subtokens: vec![vec![0, 2], vec![]], pieces: None }
    }

    #[test]
    fn empty_subtokens_fall_back_to_global_mean_and_methods_behave() {
        let old = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ext = toy_ext();
        assert_eq!(ext.empty_subtokens(), 1);
        let rows = init_new_rows(&old, 3, 2, &ext, InitMethod::SubtokenMean, 0, 0.0).unwrap();
        assert_eq!(rows, vec![3.0, 4.0, 3.0, 4.0]);
        let rows = init_new_rows(&old, 3, 2, &ext, InitMethod::Mean, 0, 0.0).unwrap();
        assert_eq!(rows, vec![3.0, 4.0, 3.0, 4.0]);
        let a = init_new_rows(&old, 3, 2, &ext, InitMethod::NoisyMean, 7, 0.0).unwrap();
        let b = init_new_rows(&old, 3, 2, &ext, InitMethod::NoisyMean, 7, 0.0).unwrap();
        let c = init_new_rows(&old, 3, 2, &ext, InitMethod::NoisyMean, 8, 0.0).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[..2], a[2..]);
        let r = init_new_rows(&old, 3, 2, &ext, InitMethod::Random, 1, 0.0).unwrap();
        assert_eq!(r, vec![0.0; 4]);
    }

    #[test]
    fn noise_has_the_documented_scale() {
        let dim = 64;
        let old = vec![0f32; 2 * dim];
        let ext = VocabExtension { old_vocab: 2, new_vocab: 2002, subtokens: vec![vec![0]; 2000], pieces: None };
        let noisy = init_new_rows(&old, 2, dim, &ext, InitMethod::NoisyMean, 3, 0.0).unwrap();
        let var = noisy.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / noisy.len() as f64;
        assert!((var * dim as f64 - 1.0).abs() < 0.03, "variance × dim = {}", var * dim as f64);
        let random = init_new_rows(&old, 2, dim, &ext, InitMethod::Random, 3, 0.02).unwrap();
        let std = (random.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / random.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "std = {std}");
    }

    #[test]
    fn bad_extensions_and_shapes_are_errors() {
        let old = [0f32; 6];
        let mut lying = toy_ext();
        lying.subtokens[0] = vec![3];
        let err = init_new_rows(&old, 3, 2, &lying, InitMethod::SubtokenMean, 0, 0.0).unwrap_err();
        assert!(format!("{err:#}").contains("old_vocab is 3"), "{err:#}");
        let mut wrong_total = toy_ext();
        wrong_total.new_vocab = 9;
        assert!(wrong_total.validate().is_err());
        let mut wrong_pieces = toy_ext();
        wrong_pieces.pieces = Some(vec!["x".into()]);
        assert!(wrong_pieces.validate().is_err());
        assert!(init_new_rows(&old, 2, 3, &toy_ext(), InitMethod::Mean, 0, 0.0).is_err());
        assert!(init_new_rows(&old[..5], 3, 2, &toy_ext(), InitMethod::Mean, 0, 0.0).is_err());
        assert!("subtoken_mean".parse::<InitMethod>().is_err());
        for m in ["subtoken-mean", "mean", "noisy-mean", "random"] {
            assert_eq!(m.parse::<InitMethod>().unwrap().to_string(), m);
        }
    }

    #[test]
    fn save_load_roundtrip_and_lying_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab_extension.json");
        let mut ext = toy_ext();
        ext.pieces = Some(vec!["中国".into(), "\"q\"".into()]);
        ext.save(&path).unwrap();
        assert_eq!(VocabExtension::load(&path).unwrap(), ext);
        std::fs::write(&path, r#"{"old_vocab": 3, "new_vocab": 4, "subtokens": [[5]]}"#).unwrap();
        let err = VocabExtension::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("lists id 5"), "{err:#}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(VocabExtension::load(&path).is_err());
        assert!(VocabExtension::load(&dir.path().join("missing.json")).is_err());
    }
}

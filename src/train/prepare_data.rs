//! `linly-lora data prepare recipe.toml`: tokenizes the recipe's `[[data]]` into the token
//! stores training reads (`[output] dir/token-cache/`), without loading the model's weights.
//! `train` does the same for any store that is missing or stale, so this is only a way to do
//! the slow part ahead of time (or on another machine with the same paths).
//! The rules of a run's output folder, which `train` and this command share, live here too.

use super::recipe::Recipe;
use crate::data::{self, Encoder};
use crate::vocab::VocabExtension;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct PrepareDataOptions {
    pub recipe: PathBuf,
    /// Draw a progress bar per source on stderr.
    pub progress: bool,
}

/// One source's store.
#[derive(Debug, Clone, Serialize)]
pub struct PreparedSource {
    pub name: String,
    pub store: PathBuf,
    pub documents: usize,
    pub tokens: usize,
    /// Whether a valid store was already there (nothing was tokenized).
    pub reused: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrepareDataReport {
    pub store_dir: PathBuf,
    pub sources: Vec<PreparedSource>,
}

/// Training writes into `[output] dir` (it does not replace it, so it can resume), under the
/// rule of every `--out`: never one of the run's inputs or a folder holding one, and, for a new
/// run, never a folder holding files that training did not write (it would overwrite same-named
/// ones and mix its files with the user's), nor one holding an earlier run's outputs without a
/// checkpoint to resume from (its adapter would be replaced without a word). `recipe_file` is
/// the recipe being run: a copy of it in `out` is no earlier run's.
pub(crate) fn check_output_dir(recipe: &Recipe, recipe_file: &Path, out: &Path, resume: bool) -> Result<()> {
    let r = |p: &PathBuf| recipe.resolve(p);
    let mut inputs = vec![r(&recipe.model.path)];
    inputs.extend(recipe.model.tokenizer.iter().map(r));
    if let Some(v) = &recipe.vocab {
        inputs.extend(v.extension.iter().chain(&v.add).map(r));
    }
    inputs.extend(recipe.data.iter().map(|d| r(&d.path)));
    inputs.extend(recipe.eval.iter().map(|e| r(&e.path)));
    inputs.extend(recipe.lora.init_from.iter().map(r));
    let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::io::atomic::check_not_input(out, &refs).context("[output] dir")?;
    if resume {
        return Ok(());
    }
    const OWN: [&str; 7] = ["checkpoints", "token-cache", "tokenizer", "metrics.jsonl", "recipe.toml", "adapter", "report.json"];
    let foreign: Vec<String> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        // The recipe being run may live in its own output folder, under any name.
        .filter(|e| !crate::io::atomic::same_file(&e.path(), recipe_file))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !OWN.contains(&n.as_str()) && !n.ends_with(".png") && !n.starts_with('.'))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "[output] dir {} holds files training does not write ({}): choose a new or empty folder so that nothing of yours is overwritten",
            out.display(),
            foreign.join(", ")
        );
    }
    // With checkpoints, training's own error says to pass --resume.
    let has_checkpoints = std::fs::read_dir(out.join("checkpoints")).map(|mut d| d.next().is_some()).unwrap_or(false);
    if !has_checkpoints {
        let same_recipe = |p: &Path| std::fs::read(p).ok() == std::fs::read(recipe_file).ok();
        let earlier: Vec<&str> = [
            ("adapter", out.join("adapter").exists()),
            ("report.json", out.join("report.json").exists()),
            ("metrics.jsonl", std::fs::metadata(out.join("metrics.jsonl")).map(|m| m.len() > 0).unwrap_or(false)),
            ("recipe.toml", out.join("recipe.toml").exists() && !same_recipe(&out.join("recipe.toml"))),
        ]
        .into_iter()
        .filter_map(|(name, there)| there.then_some(name))
        .collect();
        if !earlier.is_empty() {
            bail!(
                "[output] dir {} holds an earlier run's outputs ({}) and no checkpoint to resume from: choose a new [output] dir, or delete them to train there again",
                out.display(),
                earlier.join(", ")
            );
        }
    }
    Ok(())
}

/// The folder of a run's token stores.
pub fn store_dir(out: &Path) -> PathBuf {
    out.join("token-cache")
}

/// The encoder training builds, from the model's config.json and the recipe: the same
/// tokenizer, BOS/EOS and vocabulary size, hence the same store keys. `extended`: the model's
/// `vocab` rows already count a `[vocab]` extension.
pub fn data_encoder(tokenizer: Option<&Path>, bos: Option<u32>, eos: u32, vocab: usize, all_tokenized: bool, extended: bool) -> Result<Encoder> {
    let mut enc = match tokenizer {
        Some(t) => Encoder::from_file(t, bos, eos)?,
        None if all_tokenized => ids_only_encoder(vocab, eos)?,
        None => bail!("the model has no tokenizer.json: add [model] tokenizer, or use only `tokenized` data"),
    };
    if enc.vocab_size > vocab {
        let t = tokenizer.map_or(String::new(), |t| format!(" {}", t.display()));
        if extended {
            bail!("the tokenizer{t} has {} tokens but the [vocab] extension grows the model to {vocab} rows: the extension was made for another tokenizer; use the tokenizer `vocab extend` wrote beside it, or an extension made from this tokenizer", enc.vocab_size);
        }
        bail!("the tokenizer{t} has {} tokens but the model {vocab} rows: add a [vocab] extension so the model grows with the tokenizer", enc.vocab_size);
    }
    enc.vocab_size = vocab;
    Ok(enc)
}

/// A tokenizer for runs whose data is all `tokenized` and whose model has no tokenizer.json.
fn ids_only_encoder(vocab: usize, eos: u32) -> Result<Encoder> {
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0},"unk_token":"<unk>"}}"#;
    let tok: tokenizers::Tokenizer = json.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut enc = Encoder::new(tok, None, eos)?;
    enc.vocab_size = vocab;
    Ok(enc)
}

/// The model's tokenizer: `[model] tokenizer`, else the model folder's tokenizer.json.
pub(crate) fn model_tokenizer(recipe: &Recipe, model_dir: &Path) -> Option<PathBuf> {
    match &recipe.model.tokenizer {
        Some(t) => Some(recipe.resolve(t)),
        None => model_dir.join("tokenizer.json").exists().then(|| model_dir.to_path_buf()),
    }
}

/// The recipe's `[vocab]` extension file, building it in `out` for an in-run extension
/// (`[vocab] add`), and the extended tokenizer's folder when the extension has one beside it.
pub(crate) fn vocab_extension(recipe: &Recipe, tokenizer: Option<&Path>, out: &Path) -> Result<Option<(PathBuf, Option<PathBuf>)>> {
    let Some(v) = &recipe.vocab else { return Ok(None) };
    let ext_path = match (&v.extension, &v.add) {
        (Some(e), _) => recipe.resolve(e),
        (None, Some(add)) => {
            // In-run extension: the new tokenizer lands in the output folder.
            let src = tokenizer.context("[vocab] add needs the model's tokenizer.json (or [model] tokenizer)")?;
            let dir = out.join("tokenizer");
            crate::vocab::extend(src, &crate::vocab::PieceSource::List(recipe.resolve(add)), &dir, true)?;
            dir.join("vocab_extension.json")
        }
        _ => unreachable!("checked by the recipe"),
    };
    let tok_dir = ext_path.parent().filter(|d| d.join("tokenizer.json").exists()).map(Path::to_path_buf);
    Ok(Some((ext_path, tok_dir)))
}

/// What the data encoder needs of the model as [`super::run::prepare`] leaves it.
struct ModelInputs {
    tokenizer: Option<PathBuf>,
    bos: Option<u32>,
    eos: u32,
    vocab: usize,
    /// `vocab` counts a `[vocab]` extension.
    extended: bool,
}

/// [`ModelInputs`], read from config files only. An in-run extension (`[vocab] add`) is built
/// here as train builds it.
fn model_inputs(recipe: &Recipe, out: &Path) -> Result<ModelInputs> {
    let model_dir = recipe.resolve(&recipe.model.path);
    let cfg = crate::config::LlamaConfig::load(&model_dir)?;
    let mut tokenizer = model_tokenizer(recipe, &model_dir);
    let mut vocab = cfg.vocab_size;
    let extension = vocab_extension(recipe, tokenizer.as_deref(), out)?;
    let extended = extension.is_some();
    if let Some((ext_path, tok_dir)) = extension {
        vocab = VocabExtension::load(&ext_path)?.new_vocab;
        tokenizer = tok_dir.or(tokenizer);
    }
    let eos = cfg.eos_token_ids.first().copied().unwrap_or(2);
    Ok(ModelInputs { tokenizer, bos: cfg.bos_token_id, eos, vocab, extended })
}

pub fn prepare_data(o: &PrepareDataOptions) -> Result<PrepareDataReport> {
    let recipe = Recipe::load(&o.recipe)?;
    let out = recipe.resolve(&recipe.output.dir);
    // A store half built is rebuilt by the next run anyway: nothing is kept.
    crate::io::atomic::remove_made_on_error(&out, |_| false, || prepare_into(o, &recipe, &out))
}

fn prepare_into(o: &PrepareDataOptions, recipe: &Recipe, out: &Path) -> Result<PrepareDataReport> {
    check_output_dir(recipe, &o.recipe, out, true)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create [output] dir {}", out.display()))?;
    let ModelInputs { tokenizer, bos, eos, vocab, extended } = model_inputs(recipe, out)?;
    let all_tokenized = recipe.data.iter().all(|d| d.kind == data::SourceKind::Tokenized);
    let enc = data_encoder(tokenizer.as_deref(), bos, eos, vocab, all_tokenized, extended)?;
    let dir = store_dir(out);
    let sources = data::load_sources_with(&recipe.data, &recipe.root, &enc, Some(&dir), o.progress)?;
    let sources = sources
        .into_iter()
        .map(|s| {
            let store = match &s.docs {
                data::Tokens::Stored(st) => st.path().to_path_buf(),
                data::Tokens::Memory(_) => unreachable!("a store folder was given"),
            };
            PreparedSource { name: s.name(), store, documents: s.docs.len(), tokens: s.docs.tokens(), reused: s.from_cache }
        })
        .collect();
    Ok(PrepareDataReport { store_dir: dir, sources })
}

//! Model-based initialisation of new rows (`vocab resize --init distill*`) on the tiny fixture:
//! each method must leave the resized model better than sub-token means on text it was not
//! fitted on, leave every old input row as it was, and change no old head row but the first
//! sub-tokens the chain targets list as moved.

mod common;
use burn::module::Module;
use common::*;
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::tensor_to_f32;
use linly_lora::model::{Llama, TokenTable};
use linly_lora::rng::SplitMix;
use linly_lora::vocab::distill::{apply_distilled, distill_rows, expand, DistillOptions, HeadTargets, Sides};
use linly_lora::vocab::{resize_loaded, InitMethod, VocabExtension};

/// The fixture's weights are random and small, so its predictions are nearly uniform and it
/// "knows" nothing to transfer. A sharper head gives it preferences that text sampled from it
/// follows, which is what a real base model's knowledge looks like to the new rows.
fn teacher(device: &burn::tensor::Device) -> Llama {
    sharpened(device, 12.0)
}

fn sharpened(device: &burn::tensor::Device, k: f64) -> Llama {
    let mut m = Llama::load(&tiny().join("base"), device, FloatType::F32).unwrap();
    let head = m.lm_head.as_ref().unwrap().weight();
    m.lm_head = Some(TokenTable::new(head * k));
    m
}

/// Old-token sequences sampled from the teacher (temperature 1), with the sub-tokens of a random
/// multi-token new piece spliced in at a `splice` share of the steps, so that the text uses the
/// new pieces and what follows them is what the teacher predicts after reading them.
fn sample(model: &Llama, ext: &VocabExtension, n: usize, len: usize, seed: u64, splice: f64) -> Vec<Vec<u32>> {
    let multi: Vec<&Vec<u32>> = ext.subtokens.iter().filter(|s| s.len() > 1).collect();
    let device = model.devices().into_iter().next().unwrap();
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            let mut ids = vec![rng.below(320) as u32];
            while ids.len() < len {
                if rng.uniform() < splice {
                    ids.extend_from_slice(multi[rng.below(multi.len())]);
                    continue;
                }
                let l = tensor_to_f32(model.forward(linly_lora::infer::ids_tensor(&ids, &device), None));
                let last = &l[(ids.len() - 1) * 320..ids.len() * 320];
                let m = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f64> = last.iter().map(|&x| ((x - m) as f64).exp()).collect();
                let mut u = rng.uniform() * p.iter().sum::<f64>();
                let mut pick = 319;
                for (i, &pi) in p.iter().enumerate() {
                    if u <= pi {
                        pick = i;
                        break;
                    }
                    u -= pi;
                }
                ids.push(pick as u32);
            }
            ids
        })
        .collect()
}

/// An extension made the way a corpus-trained one is: the teacher's most frequent bigrams and
/// trigrams in text it wrote. On such text the teacher's own chain probabilities are the truth,
/// which is what chain targets assume (spliced-in random pieces contradict the teacher).
fn corpus_extension(text: &[Vec<u32>]) -> VocabExtension {
    let mut counts: std::collections::HashMap<Vec<u32>, usize> = Default::default();
    for s in text {
        for n in [2, 3] {
            for w in s.windows(n) {
                *counts.entry(w.to_vec()).or_default() += 1;
            }
        }
    }
    let mut grams: Vec<(Vec<u32>, usize)> = counts.into_iter().filter(|(_, c)| *c >= 3).collect();
    grams.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let subtokens: Vec<Vec<u32>> = grams.into_iter().take(32).map(|(g, _)| g).collect();
    VocabExtension { old_vocab: 320, new_vocab: 320 + subtokens.len(), subtokens, pieces: None }
}

/// The new tokenization of an old-token sequence: longest sub-token match first.
fn retokenize(old: &[u32], ext: &VocabExtension) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < old.len() {
        let best = ext.subtokens.iter().enumerate().filter(|(_, s)| s.len() > 1 && old[i..].starts_with(s)).max_by_key(|(_, s)| s.len());
        match best {
            Some((k, s)) => {
                out.push((ext.old_vocab + k) as u32);
                i += s.len();
            }
            None => {
                out.push(old[i]);
                i += 1;
            }
        }
    }
    out
}

/// Mean NLL of `seqs` (new tokenization) under `model`.
fn nll(model: &Llama, seqs: &[Vec<u32>]) -> f64 {
    let v = model.vocab_size();
    let (mut sum, mut n) = (0.0, 0usize);
    for s in seqs {
        let l = logits_of(model, std::slice::from_ref(s));
        for i in 0..s.len() - 1 {
            let row = &l[i * v..(i + 1) * v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - row[s[i + 1] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn rows(t: &TokenTable) -> Vec<f32> {
    tensor_to_f32(t.weight())
}

#[test]
fn each_distill_method_beats_subtoken_mean_on_held_out_text_and_keeps_old_rows() {
    let device = cpu().autodiff();
    let ext = VocabExtension::load(&tiny().join("vocab_extension.json")).unwrap();
    let t = teacher(&device);
    let plain = t.valid();
    let sampled = sample(&plain, &ext, 48, 40, 7, 0.3);
    let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
    assert!(new_tok.iter().flatten().filter(|&&i| i >= 320).count() > 100, "the sampled text must use new pieces");
    // Fixed-length contexts for the fit, from the first 40 sequences; the last 8 are held out.
    let seq = 24;
    let contexts: Vec<_> = new_tok[..40].iter().filter(|s| s.len() >= seq).filter_map(|s| expand(&s[..seq], &ext)).collect();
    let held_out: Vec<Vec<u32>> = new_tok[40..].to_vec();

    let mut resized = t.clone();
    resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
    let base_nll = nll(&resized.valid(), &held_out);
    let (old_embed, old_head) = (rows(&t.embed_tokens), rows(t.lm_head.as_ref().unwrap()));

    // Spliced text: label targets (the chain variants are tested on text the teacher wrote,
    // below).
    let cases = [
        ("distill (label targets)", Sides { input: true, output: true }, HeadTargets::Labels),
        ("distill-input", Sides { input: true, output: false }, HeadTargets::Labels),
        ("distill-head (label targets)", Sides { input: false, output: true }, HeadTargets::Labels),
    ];
    for (name, sides, head_targets) in cases {
        let opts = DistillOptions { sides, tokens: contexts.len() * seq, head_tokens: 0, seq_len: seq, batch: 4, input_epochs: 30, input_lr: 0.1, head_epochs: 5, head_lr: 0.3, head_batch: 64, seed: 1, head_targets, move_old_rows: head_targets == HeadTargets::Chain };
        let fitted = distill_rows(&resized, &ext, &contexts, &[], &opts, |_| {}).unwrap();
        let mut m = resized.clone();
        apply_distilled(&mut m, &ext, &fitted).unwrap();
        let after = nll(&m.valid(), &held_out);
        eprintln!("{name}: held-out NLL {base_nll:.4} (sub-token mean) -> {after:.4}");
        assert!(after < base_nll - 0.01, "{name}: held-out NLL {after} is not below sub-token mean's {base_nll}");
        let (e, h) = (rows(&m.embed_tokens), rows(m.lm_head.as_ref().unwrap()));
        assert_eq!(&e[..320 * 64], &old_embed[..], "{name}: old embedding rows changed");
        // Only the first sub-tokens' head rows may move (chain targets), and only those listed.
        let moved = &fitted.report.head_rows_moved;
        for r in 0..320 {
            if !moved.contains(&(r as u32)) {
                assert_eq!(&h[r * 64..(r + 1) * 64], &old_head[r * 64..(r + 1) * 64], "{name}: old head row {r} changed");
            }
        }
        let start_embed = rows(&resized.embed_tokens);
        assert_eq!(e[320 * 64..] != start_embed[320 * 64..], sides.input, "{name}: the input rows move exactly when the input side is fitted");
    }
}

#[test]
fn settings_that_would_panic_or_write_nan_rows_are_errors() {
    for (opts, key) in [
        (DistillOptions { input_lr: f64::NAN, ..Default::default() }, "input_lr"),
        (DistillOptions { head_lr: f64::INFINITY, ..Default::default() }, "head_lr"),
        (DistillOptions { head_lr: -1.0, ..Default::default() }, "head_lr"),
        (DistillOptions { seq_len: 0, ..Default::default() }, "seq_len"),
        (DistillOptions { tokens: 0, ..Default::default() }, "tokens"),
    ] {
        let e = format!("{:#}", opts.validate().unwrap_err());
        assert!(e.contains(key), "{e}");
    }
    DistillOptions::default().validate().unwrap();
}

/// Chain targets that also move the head rows of the new pieces' first sub-tokens: only those
/// old rows change, the input rows stay, the model still beats sub-token mean, and an adapter
/// saved from it carries the moved rows, so that applied to the unresized base it gives the
/// same head.
#[test]
fn moved_first_subtoken_rows_are_the_only_old_rows_that_change_and_travel_in_the_adapter() {
    use linly_lora::lora::save::{save, TableSave};
    use linly_lora::lora::{config::AdapterConfig, TableMode};
    let device = cpu().autodiff();
    let ext = VocabExtension::load(&tiny().join("vocab_extension.json")).unwrap();
    let t = teacher(&device);
    let sampled = sample(&t.valid(), &ext, 48, 40, 7, 0.3);
    let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
    let seq = 24;
    let contexts: Vec<_> = new_tok[..40].iter().filter(|s| s.len() >= seq).filter_map(|s| expand(&s[..seq], &ext)).collect();
    let held_out: Vec<Vec<u32>> = new_tok[40..].to_vec();
    let mut resized = t.clone();
    resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
    let stm_nll = nll(&resized.valid(), &held_out);

    let opts = DistillOptions { sides: Sides { input: true, output: true }, tokens: contexts.len() * seq, head_tokens: 0, seq_len: seq, batch: 4, input_epochs: 30, input_lr: 0.1, head_epochs: 5, head_lr: 0.3, head_batch: 64, seed: 1, head_targets: HeadTargets::Chain, move_old_rows: true };
    let fitted = distill_rows(&resized, &ext, &contexts, &[], &opts, |_| {}).unwrap();
    let moved = fitted.report.head_rows_moved.clone();
    assert!(!moved.is_empty(), "the fixture's extension has pieces of several sub-tokens, so some first sub-tokens move");
    let mut m = resized.clone();
    apply_distilled(&mut m, &ext, &fitted).unwrap();
    let after = nll(&m.valid(), &held_out);
    assert!(after < stm_nll - 0.01, "held-out NLL {after} is not below sub-token mean's {stm_nll}");
    let (e0, h0) = (rows(&t.embed_tokens), rows(t.lm_head.as_ref().unwrap()));
    let (e, h) = (rows(&m.embed_tokens), rows(m.lm_head.as_ref().unwrap()));
    assert_eq!(&e[..320 * 64], &e0[..], "old input rows changed");
    for r in 0..320 {
        let same = h[r * 64..(r + 1) * 64] == h0[r * 64..(r + 1) * 64];
        assert_eq!(same, !moved.contains(&(r as u32)), "old head row {r}: changed {} but listed as moved {}", !same, moved.contains(&(r as u32)));
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = AdapterConfig::new(8, 16.0, 0.0, false, &["q_proj".to_string()]);
    let head_moved: Vec<usize> = moved.iter().map(|&r| r as usize).collect();
    // A table that did not train (frozen) still differs from the unresized base: the adapter
    // carries it all the same.
    for (k, (embed, lm_head)) in [(TableMode::NewRows, TableMode::NewRows), (TableMode::NewRows, TableMode::Frozen), (TableMode::Frozen, TableMode::Frozen)].into_iter().enumerate() {
        let ad = dir.path().join(format!("ad{k}"));
        save(&m, &cfg, TableSave { embed, lm_head, old_vocab: 320, head_moved: head_moved.clone() }, &ad, &[]).unwrap();
        let applied = linly_lora::lora::adapter::apply(t.valid(), &ad, &cpu()).unwrap();
        assert_eq!(rows(applied.lm_head.as_ref().unwrap()), h, "{embed:?}/{lm_head:?}: the adapter on the unresized base gives another head");
        assert_eq!(rows(&applied.embed_tokens), e, "{embed:?}/{lm_head:?}: the adapter on the unresized base gives another embedding");
    }
}

/// Chain targets on text the teacher wrote, with pieces a corpus would give: each chain method
/// beats sub-token mean on held-out text of the same kind, and label targets are no better.
#[test]
fn chain_targets_beat_subtoken_mean_on_text_the_base_wrote() {
    let device = cpu().autodiff();
    // Sharper than the other tests' teacher, so that its text repeats n-grams as language does.
    let t = sharpened(&device, 30.0);
    let none = VocabExtension { old_vocab: 320, new_vocab: 320, subtokens: vec![], pieces: None };
    let sampled = sample(&t.valid(), &none, 64, 40, 11, 0.0);
    let ext = corpus_extension(&sampled[..48]);
    assert!(ext.added() >= 16, "the teacher's text repeats enough n-grams: {}", ext.added());
    let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
    let seq = 24;
    let contexts: Vec<_> = new_tok[..48].iter().filter(|s| s.len() >= seq).filter_map(|s| expand(&s[..seq], &ext)).collect();
    let held_out: Vec<Vec<u32>> = new_tok[48..].to_vec();
    let used = held_out.iter().flatten().filter(|&&i| i >= 320).count();
    eprintln!("{} pieces; {used} of {} held-out tokens are new", ext.added(), held_out.iter().map(Vec::len).sum::<usize>());
    assert!(used > 20, "held-out text uses the new pieces: {used}");
    let mut resized = t.clone();
    resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
    let stm = nll(&resized.valid(), &held_out);
    let mut got = Vec::new();
    for (name, sides, head_targets) in [
        ("distill", Sides { input: true, output: true }, HeadTargets::Chain),
        ("distill-head", Sides { input: false, output: true }, HeadTargets::Chain),
        ("distill-head (label targets)", Sides { input: false, output: true }, HeadTargets::Labels),
    ] {
        let opts = DistillOptions { sides, tokens: contexts.len() * seq, head_tokens: 0, seq_len: seq, batch: 4, input_epochs: 30, input_lr: 0.1, head_epochs: 5, head_lr: 0.3, head_batch: 64, seed: 1, head_targets, move_old_rows: true };
        let fitted = distill_rows(&resized, &ext, &contexts, &[], &opts, |_| {}).unwrap();
        let mut m = resized.clone();
        apply_distilled(&mut m, &ext, &fitted).unwrap();
        let after = nll(&m.valid(), &held_out);
        eprintln!("{name}: held-out NLL {stm:.4} (sub-token mean) -> {after:.4}");
        got.push(after);
        if head_targets == HeadTargets::Chain {
            assert!(after < stm - 0.01, "{name}: held-out NLL {after} is not below sub-token mean's {stm}");
        }
    }
    assert!(got[1] < got[2], "chain targets ({}) are no better than label targets ({}) on the head", got[1], got[2]);
}

/// `vocab resize --init fit`: the new rows trained end to end towards the base on text it wrote
/// must read held-out text of the same kind better than sub-token means, and leave the layers,
/// the old rows of both tables and nothing else behind (no work folder, the recipe it ran).
#[test]
fn fit_beats_subtoken_mean_on_held_out_text_and_touches_only_new_rows() {
    use linly_lora::data::SourceKind;
    use linly_lora::train::fit_rows::{fit_model, FitOptions, FIT_LR, FIT_RECIPE};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The fixture with a sharper head, saved as a model folder: the teacher of the other tests.
    let base = d.join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(tiny().join("base").join(f), base.join(f)).unwrap();
    }
    rewrite_safetensors(&tiny().join("base/model.safetensors"), &base.join("model.safetensors"), |name, shape, v| {
        let v = if name == "lm_head.weight" { v.iter().map(|x| x * 30.0).collect() } else { v };
        Some((name.to_string(), FloatType::F32, shape, v))
    });
    let device = cpu().autodiff();
    let t = Llama::load(&base, &device, FloatType::F32).unwrap();
    let none = VocabExtension { old_vocab: 320, new_vocab: 320, subtokens: vec![], pieces: None };
    let sampled = sample(&t.valid(), &none, 64, 40, 11, 0.0);
    let ext = corpus_extension(&sampled[..48]);
    let ext_path = d.join("vocab_extension.json");
    ext.save(&ext_path).unwrap();
    let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
    let lines: Vec<String> = new_tok[..48].iter().map(|ids| serde_json::json!({ "input_ids": ids }).to_string()).collect();
    let train = d.join("train.jsonl");
    std::fs::write(&train, lines.join("\n")).unwrap();
    let held_out: Vec<Vec<u32>> = new_tok[48..].to_vec();

    let mut resized = t.clone();
    resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
    let stm = nll(&resized.valid(), &held_out);
    let out = d.join("fitted");
    let o = FitOptions { sources: vec![(train, SourceKind::Tokenized)], steps: 150, seq_len: 24, lr: FIT_LR, seed: 1, device: "cpu".into() };
    let (report, fit) = fit_model(&base, &ext_path, &o, &out).unwrap();
    assert_eq!((report.init.as_str(), fit.steps), ("fit", 150));
    let (first, last) = (fit.kl_first.unwrap(), fit.kl_last.unwrap());
    assert!(last < first, "the KL to the base fell: {first} -> {last}");
    let m = Llama::load(&out, &device, FloatType::F32).unwrap();
    let after = nll(&m.valid(), &held_out);
    eprintln!("fit: held-out NLL {stm:.4} (sub-token mean) -> {after:.4}");
    assert!(after < stm - 0.01, "fit: held-out NLL {after} is not below sub-token mean's {stm}");

    let (e, h) = (rows(&m.embed_tokens), rows(m.lm_head.as_ref().unwrap()));
    // Compared whole, reported briefly (the tables are thousands of values).
    assert!(e[..320 * 64] == rows(&t.embed_tokens)[..], "old embedding rows changed");
    assert!(h[..320 * 64] == rows(t.lm_head.as_ref().unwrap())[..], "old head rows changed");
    assert!(e[320 * 64..] != rows(&resized.embed_tokens)[320 * 64..], "the new input rows did not move");
    assert!(h[320 * 64..] != rows(resized.lm_head.as_ref().unwrap())[320 * 64..], "the new head rows did not move");
    let layer = |m: &Llama| tensor_to_f32(m.layers[1].mlp.down_proj.weight.val());
    assert!(layer(&m) == layer(&t), "a layer changed");
    // The recipe it ran is kept beside the model and loads as it stands (from the base model,
    // which training resizes in-run).
    let kept = linly_lora::train::recipe::Recipe::load(&out.join(FIT_RECIPE)).unwrap();
    assert_eq!(kept.train.steps, 150);
    assert!(!kept.lora.enabled && kept.data.iter().all(|d| d.chain_distill > 0.0));
    assert!(!out.join(".fit-work").exists(), "the work folder was left in the output");
}

/// Cross-tokenizer distillation during training (`[[data]] chain_distill`): the teacher is the
/// base reading the old tokenization, its targets are the chain of its sub-token probabilities,
/// and training against them teaches the new pieces what labels alone do not.
mod chain_distillation {
    use super::*;
    use burn::module::Param;
    use burn::tensor::{Int, Tensor, TensorData};
    use linly_lora::lora::{self, adapter::linears_mut, set_table_modes, LoraInit, LoraSettings, TableMode};
    use linly_lora::train::chain_teacher::{self_targets, ChainTeacher};
    use linly_lora::train::recipe::TeacherWeights;
    use linly_lora::train::teacher::BaseModel;
    use linly_lora::train::optim::{AdamW, AdamWConfig};
    use linly_lora::train::row_map::RowMaps;
    use linly_lora::train::scaler::{Scaler, ScalerConfig};
    use linly_lora::train::step::{forward_backward_rows, train_step, MicroBatch, StepHparams};
    use std::sync::Arc;

    /// Text the sharpened teacher wrote, an extension of its frequent n-grams, the text in the
    /// new tokenization, and the sub-token-mean resized model.
    fn setup(device: &burn::tensor::Device) -> (Llama, VocabExtension, Vec<Vec<u32>>, Llama) {
        let t = sharpened(device, 30.0);
        let none = VocabExtension { old_vocab: 320, new_vocab: 320, subtokens: vec![], pieces: None };
        let sampled = sample(&t.valid(), &none, 64, 40, 11, 0.0);
        let ext = corpus_extension(&sampled[..48]);
        let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
        let mut resized = t.clone();
        resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
        (t, ext, new_tok, resized)
    }

    /// Next-token labels of rows that are their own labels (the step shifts them).
    fn labels_of(rows: &[Vec<u32>]) -> Vec<Vec<i64>> {
        rows.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect()
    }

    /// The first two rows of at least 20 pieces, cut to 20, with their labels.
    fn two_rows(new_tok: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<i64>>) {
        let rows: Vec<Vec<u32>> = new_tok.iter().filter(|s| s.len() >= 20).take(2).map(|s| s[..20].to_vec()).collect();
        let labels = labels_of(&rows);
        (rows, labels)
    }

    fn with_lora(model: &mut Llama, device: &burn::tensor::Device, random_b: bool) {
        let s = LoraSettings { r: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], init: LoraInit::Kaiming, seed: 3 };
        lora::inject(model, &s, device).unwrap();
        if random_b {
            let mut g = linly_lora::rng::SplitMix::new(7);
            for (_, lin) in linears_mut(model) {
                for br in lin.lora.iter_mut() {
                    let shape = br.b.val().dims();
                    // Seeded, so that every run checks the same model.
                    let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| 0.3 * g.normal() as f32).collect();
                    br.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), device)).set_require_grad(true);
                }
            }
        }
    }

    /// 24 steps of LoRA r 4 and the new rows on two rows at a time of `train_rows`, against the
    /// chain at `chain` (0: labels alone) and the hidden-state term at `hidden`.
    fn train_with_terms(resized: &Llama, teacher: &ChainTeacher, train_rows: &[Vec<u32>], chain: f32, hidden: f32, device: &burn::tensor::Device) -> Llama {
        let hp = StepHparams { lr: 5e-4, lora_b_lr: 5e-4, embed_lr: 2e-3, weight_decay: 0.0, max_grad_norm: 1.0 };
        let mut m = resized.clone();
        with_lora(&mut m, device, false);
        set_table_modes(&mut m, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        let (mut opt, mut scaler) = (AdamW::new(AdamWConfig::default()), Scaler::new(ScalerConfig::default()));
        let base = BaseModel::new(&m, 320, TeacherWeights::Dense, None, device).unwrap();
        for step in 0..24 {
            let rows: Vec<Vec<u32>> = (0..2).map(|k| train_rows[(step * 2 + k) % train_rows.len()].clone()).collect();
            let labels = labels_of(&rows);
            let mut mb = MicroBatch::new(rows.clone(), labels);
            if chain > 0.0 {
                mb.chain_distill = vec![chain; 2];
                mb.hidden_distill = vec![hidden; 2];
                mb.chain = Some(Arc::new(teacher.targets(&base, &rows, &mb.labels, &mb.chain_distill).unwrap()));
            }
            let out = train_step(&mut m, &mut opt, &mut RowMaps::default(), &mut scaler, &[mb], &hp, device).unwrap();
            assert_eq!(out.chain_distill.is_some(), chain > 0.0);
            assert_eq!(out.hidden_distill.is_some(), chain > 0.0 && hidden > 0.0);
        }
        m
    }

    fn softmax_rows(model: &Llama, ids: &[u32], device: &burn::tensor::Device) -> Vec<f64> {
        let t: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ids.len()]), device);
        let l: Vec<f64> = model.forward(t, None).try_into_vec_as::<f32>().unwrap().into_iter().map(|x| x as f64).collect();
        let v = l.len() / ids.len();
        l.chunks(v)
            .flat_map(|row| {
                let row = &row[..320];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
                row.iter().map(move |x| (x - m).exp() / s).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn targets_are_the_base_chain_read_with_lora_off() {
        let device = cpu().autodiff();
        let (t, ext, new_tok, resized) = setup(&device);
        let mut student = resized.clone();
        with_lora(&mut student, &device, true);
        let teacher = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let row = new_tok.iter().find(|s| s.len() >= 20 && s.iter().filter(|&&i| i >= 320).count() >= 3).unwrap()[..20].to_vec();
        let labels = vec![row.iter().map(|&x| x as i64).collect::<Vec<_>>()];
        let base = BaseModel::new(&student, 320, TeacherWeights::Dense, None, &device).unwrap();
        let ct = teacher.targets(&base, std::slice::from_ref(&row), &labels, &[1.0]).unwrap();
        let v = ext.new_vocab;
        assert_eq!(ct.dims, [1, 19, v]);
        let ct_q = ct.to_vec().unwrap();
        // The base (no LoRA) reading the old expansion, computed here independently.
        let ctx = expand(&row, &ext).unwrap();
        let base_p = softmax_rows(&t, &ctx.old_ids, &device);
        let roots: std::collections::HashSet<u32> = ext.subtokens.iter().filter(|s| s.len() > 1).map(|s| s[0]).collect();
        let mut checked_pieces = 0;
        for i in 0..19 {
            let q = &ct_q[i * v..(i + 1) * v];
            let total: f64 = q.iter().map(|&x| x as f64).sum();
            assert!((total - 1.0).abs() < 1e-4, "position {i}: targets sum to {total}");
            let a = ctx.aligned[i];
            // Old tokens that start no piece keep the base's own probability.
            for tok in (0..320u32).filter(|t| !roots.contains(t)) {
                let want = base_p[a * 320 + tok as usize];
                assert!((q[tok as usize] as f64 - want).abs() < 1e-5, "position {i}, token {tok}: {} vs base {want}", q[tok as usize]);
            }
            // The next piece, when no longer piece extends it: the chain of its sub-tokens'
            // probabilities along the text.
            let next = row[i + 1];
            if next >= 320 {
                let subs = &ext.subtokens[(next - 320) as usize];
                let extended = ext.subtokens.iter().any(|s| s.len() > subs.len() && s.starts_with(subs));
                let owner = ext.subtokens.iter().position(|s| s == subs) == Some((next - 320) as usize);
                if !extended && owner {
                    let want: f64 = subs.iter().enumerate().map(|(j, &s)| base_p[(a + j) * 320 + s as usize]).product();
                    let got = q[next as usize] as f64;
                    assert!((got - want).abs() < 1e-5 + 1e-3 * want, "position {i}: piece {next} target {got} vs chain {want}");
                    checked_pieces += 1;
                }
            }
        }
        assert!(checked_pieces > 0, "the row must hold a piece whose chain is checked");
        // The student still has its LoRA branches.
        assert!(linears_mut(&mut student).into_iter().any(|(_, l)| !l.lora.is_empty()));
    }

    /// The Q8_0 teacher (`[train] teacher = "q8_0"`, the CPU default) really runs quantized
    /// projections and reads the base's targets within quantization rounding; the snapshot
    /// leaves the student's LoRA branches in place and keeps none of them itself.
    #[test]
    fn teacher_q8_0_is_the_base_within_rounding() {
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let mut student = resized.clone();
        with_lora(&mut student, &device, true);
        let teacher = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let (rows, labels) = two_rows(&new_tok);
        let exact = BaseModel::new(&student, 320, TeacherWeights::Dense, None, &device).unwrap();
        let q8 = BaseModel::new(&student, 320, TeacherWeights::Q8_0, None, &device).unwrap();
        let auto = BaseModel::new(&student, 320, TeacherWeights::Auto, None, &device).unwrap();
        assert!(!exact.quantized() && q8.quantized() && auto.quantized(), "auto quantizes f32 weights on the CPU");
        let (a, b) = (teacher.targets(&exact, &rows, &labels, &[1.0, 1.0]).unwrap().to_vec().unwrap(), teacher.targets(&q8, &rows, &labels, &[1.0, 1.0]).unwrap().to_vec().unwrap());
        let diff = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let kl: f64 = a.chunks(ext.new_vocab).zip(b.chunks(ext.new_vocab)).map(|(p, q)| p.iter().zip(q).filter(|(x, _)| **x > 0.0).map(|(&x, &y)| x as f64 * (x as f64 / (y as f64).max(1e-30)).ln()).sum::<f64>()).fold(0.0, f64::max);
        eprintln!("q8_0 teacher: max |Δq| {diff:.2e}, max KL {kl:.2e} nats");
        assert!(diff > 0.0, "the quantized teacher must differ somewhere");
        // The fixture is sharpened (peaked distributions), where rounding moves mass the most;
        // a misplaced row or block would cost nats, not thousandths.
        assert!(diff < 5e-2 && kl < 5e-3, "max |Δq| {diff}, KL {kl}");
        assert!(linears_mut(&mut student).into_iter().any(|(_, l)| !l.lora.is_empty()));
    }

    /// A base whose projections lie on a Q4_1 grid (as SmolLM2's, imported from its Q4_1
    /// GGUF): `auto` holds every one of them in Q4_1, exactly (`exact_q4_1` gives the same
    /// bits back), so its targets differ from the dense teacher's only by the activations'
    /// rounding: less than the Q8_0 teacher's, which rounds the weights a second time. Weights
    /// off the grid are not taken for Q4_1.
    #[test]
    fn teacher_auto_holds_q4_1_weights_exactly() {
        use linly_lora::ggml::{QType, QuantMatrix};
        use linly_lora::model::linear::Frozen;
        use linly_lora::train::teacher::exact_q4_1;
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let mut m = resized.clone();
        let mut projections = 0;
        for (_, l) in linears_mut(&mut m) {
            let w = l.weight.as_dense().expect("the fixture is f32").val();
            let [r, c] = w.dims();
            if !c.is_multiple_of(32) {
                continue; // stays dense in every teacher (the fixture's down projections)
            }
            let v = w.into_data().try_to_vec::<f32>().unwrap();
            assert!(exact_q4_1(r, c, &v).is_none(), "random f32 weights are not on a Q4_1 grid");
            let grid = QuantMatrix::quantize(QType::Q4_1, r, c, &v).unwrap().dequantize();
            let q = exact_q4_1(r, c, &grid).expect("dequantized Q4_1 values are held exactly");
            assert_eq!(q.dequantize().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), grid.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            l.weight = Frozen::dense(Tensor::from_data(TensorData::new(grid, [r, c]), &device));
            projections += 1;
        }
        let teacher = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let (rows, labels) = two_rows(&new_tok);
        let dense = BaseModel::new(&m, 320, TeacherWeights::Dense, None, &device).unwrap();
        let auto = BaseModel::new(&m, 320, TeacherWeights::Auto, None, &device).unwrap();
        let q8 = BaseModel::new(&m, 320, TeacherWeights::Q8_0, None, &device).unwrap();
        assert!(auto.describe().contains(&format!("Q4_1 for {projections} matrices")), "{}", auto.describe());
        assert!(!q8.describe().contains("Q4_1"), "{}", q8.describe());
        let targets = |b: &BaseModel| teacher.targets(b, &rows, &labels, &[1.0, 1.0]).unwrap().to_vec().unwrap();
        let (want, a, b) = (targets(&dense), targets(&auto), targets(&q8));
        let max_diff = |x: &[f32]| want.iter().zip(x).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        let (da, db) = (max_diff(&a), max_diff(&b));
        eprintln!("max |Δq| against the dense teacher: Q4_1 {da:.2e}, Q8_0 {db:.2e}");
        assert!(da > 0.0, "the activations are still rounded to 8 bits");
        assert!(da < db, "exact weights must stay closer to the base than re-rounded ones: {da} vs {db}");
    }

    /// On a GPU the targets are built where the teacher runs (its softmax and the targets never
    /// cross the bus); that path gives the host path's targets and entropy within rounding,
    /// rows without a weight included (zeros).
    #[test]
    fn device_targets_equal_host_targets() {
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let teacher = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let rows: Vec<Vec<u32>> = new_tok.iter().filter(|s| s.len() >= 20).take(3).map(|s| s[..20].to_vec()).collect();
        let mut labels: Vec<Vec<i64>> = rows.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect();
        labels[0][5] = -100;
        let base = BaseModel::new(&resized, 320, TeacherWeights::Dense, None, &device).unwrap();
        // (On the CPU's fused kernels `targets` builds on the host; with
        // LINLY_LORA_KERNELS=composed both sides take the device path.)
        let w = [1.0, 0.0, 2.0];
        let host = teacher.targets(&base, &rows, &labels, &w).unwrap();
        // The rows read different numbers of old tokens, so a pass of several pads the shorter.
        let old_lens: Vec<usize> = rows.iter().map(|r| expand(r, &ext).unwrap().old_ids.len()).collect();
        assert!(old_lens[0] != old_lens[2], "{old_lens:?}");
        let dev = teacher.targets_on_device(&base, &rows, &labels, &w).unwrap();
        // One row per pass, as the first GPU run built them.
        let alone = teacher.targets_on_device_in_passes(&base, &rows, &labels, &w, 1).unwrap();
        assert!(matches!(dev.q, linly_lora::train::chain_teacher::TargetTable::Device(_)));
        assert_eq!(host.dims, dev.dims);
        let (a, b) = (host.to_vec().unwrap(), dev.to_vec().unwrap());
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "max |Δq| {diff}");
        let c = alone.to_vec().unwrap();
        let diff = c.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "one pass against a pass per row: max |Δq| {diff}");
        assert!((alone.neg_entropy - dev.neg_entropy).abs() < 1e-4 * dev.neg_entropy.abs());
        let n = host.dims[1] * host.dims[2];
        assert!(a[n..2 * n].iter().all(|&x| x == 0.0) && b[n..2 * n].iter().all(|&x| x == 0.0), "a row without weight has no targets");
        assert!(a[..n].iter().any(|&x| x > 0.0));
        assert!(host.neg_entropy < 0.0 && (host.neg_entropy - dev.neg_entropy).abs() < 1e-4 * host.neg_entropy.abs(), "{} vs {}", host.neg_entropy, dev.neg_entropy);
    }

    /// Self-distillation's targets made on the host by the snapshot (`self_targets`, what
    /// training uses on the CPU where the snapshot rounds as the step does) give the composed
    /// term's value and gradients: the base's softmax over the old rows against the model's
    /// over all rows, only where the label is an old token.
    #[test]
    fn self_distillation_host_targets_equal_the_composed_term() {
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let mut m = resized.clone();
        with_lora(&mut m, &device, true);
        set_table_modes(&mut m, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        let base = BaseModel::new(&m, 320, TeacherWeights::Dense, None, &device).unwrap();
        if !base.on_host() {
            // LINLY_LORA_KERNELS=composed: training keeps the composed term.
            return;
        }
        // Old ids only, the replay text the term is for: the text in the old tokenization.
        let rows: Vec<Vec<u32>> = new_tok.iter().map(|s| expand(s, &ext).unwrap().old_ids).filter(|s| s.len() >= 20).take(2).map(|s| s[..20].to_vec()).collect();
        let mut labels = labels_of(&rows);
        labels[0][4] = -100;
        // A new piece as the label: the term skips the position on both paths.
        labels[1][7] = ext.new_vocab as i64 - 1;
        let w = vec![0.5, 2.0];
        let composed = MicroBatch { self_distill: w.clone(), ..MicroBatch::new(rows.clone(), labels.clone()) };
        let q = self_targets(&base, &rows, &labels, &w, 320, ext.new_vocab).unwrap();
        assert_eq!(q.dims, [2, 19, ext.new_vocab]);
        let host = MicroBatch { self_targets: Some(Arc::new(q)), ..composed.clone() };
        let a = forward_backward_rows(&mut m, &[composed], 1.0, &device).unwrap();
        let b = forward_backward_rows(&mut m, &[host], 1.0, &device).unwrap();
        let (ka, kb) = (a.kd.unwrap().into_scalar::<f32>(), b.kd.clone().unwrap().into_scalar::<f32>());
        assert!(ka > 1e-2, "the adapted model differs from the base: {ka}");
        assert!((ka - kb).abs() <= 1e-4 * ka, "composed {ka} vs host targets {kb}");
        assert_eq!(a.grads.keys().collect::<Vec<_>>(), b.grads.keys().collect::<Vec<_>>());
        for (name, ga) in &a.grads {
            let (ga, gb) = (ga.clone().try_into_vec_as::<f32>().unwrap(), b.grads[name].clone().try_into_vec_as::<f32>().unwrap());
            let scale = ga.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = ga.iter().zip(&gb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale + 1e-7, "{name}: max |Δgrad| {diff} against max |grad| {scale}");
        }
        // Without the weighted rows' term the gradients differ: the comparison above sees it.
        let plain = forward_backward_rows(&mut m, &[MicroBatch::new(rows.clone(), labels.clone())], 1.0, &device).unwrap();
        let g = |f: &linly_lora::train::step::Forward| f.grads.values().map(|t| t.clone().abs().sum().into_scalar::<f32>()).sum::<f32>();
        assert!((g(&plain) - g(&b)).abs() > 1e-3 * g(&b), "the term moves the gradients");
        // A row holding a new piece is one the base cannot read.
        let mut with_new = rows.clone();
        with_new[1][3] = 330;
        let err = self_targets(&base, &with_new, &labels, &w, 320, ext.new_vocab).unwrap_err().to_string();
        assert!(err.contains("new piece"), "{err}");
    }

    /// `[[data]] hidden_distill`: the targets carry the base's residual stream after the tap
    /// layer at the old position that ends each new position's piece, read from the chain's
    /// teacher pass (LoRA off), the same on the host and device paths, zeros in rows without a
    /// weight.
    #[test]
    fn hidden_targets_are_the_base_stream_where_each_piece_ends() {
        let device = cpu().autodiff();
        let (t, ext, new_tok, resized) = setup(&device);
        let mut student = resized.clone();
        with_lora(&mut student, &device, true);
        let teacher = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>()).with_hidden_layer(1);
        let rows: Vec<Vec<u32>> = new_tok.iter().filter(|s| s.len() >= 20 && s.iter().filter(|&&i| i >= 320).count() >= 3).take(2).map(|s| s[..20].to_vec()).collect();
        let labels = labels_of(&rows);
        let base = BaseModel::new(&student, 320, TeacherWeights::Dense, None, &device).unwrap();
        let w = [1.0, 0.0];
        let host = teacher.targets(&base, &rows, &labels, &w).unwrap();
        let dev = teacher.targets_on_device(&base, &rows, &labels, &w).unwrap();
        let read = |c: &linly_lora::train::chain_teacher::ChainTargets| {
            let h = c.hidden.as_ref().expect("hidden states asked for");
            assert_eq!(h.layer, 1);
            assert_eq!(h.states.dims(), [2, 19, 64]);
            h.states.clone().try_into_vec_as::<f32>().unwrap()
        };
        let (a, b) = (read(&host), read(&dev));
        // The base reading the old expansion, here independently: its stream after layer 1.
        let ctx = expand(&rows[0], &ext).unwrap();
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ctx.old_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ctx.old_ids.len()]), &device);
        let (_, tap) = t.hidden_tapped(t.embed_tokens.embed(ids), None, Some(1));
        let tap = tap.unwrap().try_into_vec_as::<f32>().unwrap();
        for i in 0..19 {
            let at = ctx.aligned[i];
            for c in 0..64 {
                let (got, want) = (a[i * 64 + c], tap[at * 64 + c]);
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "position {i} (old {at}), dim {c}: {got} vs the base's {want}");
            }
        }
        assert!(ctx.aligned[..19].windows(2).any(|p| p[1] > p[0] + 1), "the row must hold a piece of several sub-tokens");
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "host and device paths: max diff {diff}");
        assert!(a[19 * 64..].iter().all(|&x| x == 0.0) && b[19 * 64..].iter().all(|&x| x == 0.0), "a row without weight has no states");
        // Without the layer there are no states to carry.
        let plain = ChainTeacher::new(ext.clone(), &new_tok.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert!(plain.targets(&base, &rows, &labels, &w).unwrap().hidden.is_none());
    }

    /// The hidden-state term trains what it measures: after the same steps against the chain,
    /// adding it leaves the model's stream after the tap layer nearer the base's on held-out
    /// rows, and the step reports it.
    #[test]
    fn training_with_the_hidden_term_brings_the_stream_to_the_base() {
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let texts: Vec<&[u32]> = new_tok[..48].iter().map(Vec::as_slice).collect();
        let teacher = ChainTeacher::new(ext.clone(), &texts).with_hidden_layer(1);
        let train_rows: Vec<Vec<u32>> = new_tok[..48].iter().filter(|s| s.len() >= 24).map(|s| s[..24].to_vec()).collect();
        let held_out: Vec<Vec<u32>> = new_tok[48..].iter().filter(|s| s.len() >= 24).take(6).map(|s| s[..24].to_vec()).collect();
        assert!(held_out.len() >= 3);
        let frozen = BaseModel::new(&resized, 320, TeacherWeights::Dense, None, &device).unwrap();
        let distance = |m: &Llama| {
            let labels: Vec<Vec<i64>> = held_out.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect();
            let w = vec![1.0; held_out.len()];
            let states = teacher.targets(&frozen, &held_out, &labels, &w).unwrap().hidden.unwrap().states;
            let ids: Vec<i64> = held_out.iter().flatten().map(|&x| x as i64).collect();
            let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [held_out.len(), 24]), &device);
            let (_, tap) = m.hidden_tapped(m.embed_tokens.embed(ids), None, Some(1));
            linly_lora::train::loss::hidden_distill_sum(tap.unwrap(), &states, &labels, &w).into_scalar::<f32>() as f64
        };
        let run = |hidden: f32| {
            let m = train_with_terms(&resized, &teacher, &train_rows, 1.0, hidden, &device).valid();
            (distance(&m), nll(&m, &held_out))
        };
        let start = distance(&resized.valid());
        let ((chain_d, chain_nll), (hidden_d, hidden_nll)) = (run(0.0), run(30.0));
        eprintln!("held-out stream distance: start {start:.4}, chain {chain_d:.4}, chain + hidden {hidden_d:.4}; NLL chain {chain_nll:.4}, chain + hidden {hidden_nll:.4}");
        assert!(start > 0.0, "sub-token-mean rows are not the base's stream");
        assert!(hidden_d < 0.9 * chain_d, "the term must bring the stream nearer the base: {hidden_d} vs {chain_d}");
    }

    #[test]
    fn refitted_first_subtoken_rows_are_read_at_their_base_values() {
        // After `--init distill` moved some old head rows, the model with LoRA off is not the
        // base there; given the base's values of those rows, the teacher's targets are the
        // sub-token-mean model's (whose old rows are the base's), and without them they are not.
        let device = cpu().autodiff();
        let (t, ext, new_tok, resized) = setup(&device);
        let seq = 24;
        let contexts: Vec<_> = new_tok[..48].iter().filter(|s| s.len() >= seq).filter_map(|s| expand(&s[..seq], &ext)).collect();
        let opts = DistillOptions { sides: Sides { input: true, output: true }, tokens: contexts.len() * seq, head_tokens: 0, seq_len: seq, batch: 4, input_epochs: 5, input_lr: 0.1, head_epochs: 3, head_lr: 0.3, head_batch: 64, seed: 1, head_targets: HeadTargets::Chain, move_old_rows: true };
        let fitted = distill_rows(&resized, &ext, &contexts, &[], &opts, |_| {}).unwrap();
        let moved: Vec<usize> = fitted.report.head_rows_moved.iter().map(|&r| r as usize).collect();
        assert!(!moved.is_empty());
        let mut refitted = resized.clone();
        apply_distilled(&mut refitted, &ext, &fitted).unwrap();
        let h0 = rows(t.lm_head.as_ref().unwrap());
        let vals: Vec<f32> = moved.iter().flat_map(|&r| h0[r * 64..(r + 1) * 64].to_vec()).collect();
        let base_vals = Tensor::from_data(TensorData::new(vals, [moved.len(), 64]), &device);
        let texts: Vec<&[u32]> = new_tok.iter().map(Vec::as_slice).collect();
        let row = vec![new_tok.iter().find(|s| s.len() >= 20).unwrap()[..20].to_vec()];
        let labels: Vec<Vec<i64>> = row.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect();
        let base = |m: &Llama, refit| BaseModel::new(m, 320, TeacherWeights::Dense, refit, &device).unwrap();
        let teacher = ChainTeacher::new(ext.clone(), &texts);
        let q = |m: &Llama, refit| teacher.targets(&base(m, refit), &row, &labels, &[1.0]).unwrap().to_vec().unwrap();
        let (want, plain, fixed) = (q(&resized, None), q(&refitted, None), q(&refitted, Some((&moved, &base_vals))));
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff(&fixed, &want) < 1e-5, "with the base's values: max diff {}", diff(&fixed, &want));
        assert!(diff(&plain, &want) > 1e-3, "the refitted rows must change the plain teacher: max diff {}", diff(&plain, &want));
    }

    #[test]
    fn training_against_the_chain_beats_labels_alone_on_held_out_text() {
        let device = cpu().autodiff();
        let (_, ext, new_tok, resized) = setup(&device);
        let teacher = ChainTeacher::new(ext.clone(), &new_tok[..48].iter().map(Vec::as_slice).collect::<Vec<_>>());
        let held_out: Vec<Vec<u32>> = new_tok[48..].to_vec();
        let train_rows: Vec<Vec<u32>> = new_tok[..48].iter().filter(|s| s.len() >= 24).map(|s| s[..24].to_vec()).collect();
        assert!(train_rows.len() >= 16);
        let run = |weight: f32| nll(&train_with_terms(&resized, &teacher, &train_rows, weight, 0.0, &device).valid(), &held_out);
        let start = nll(&resized.valid(), &held_out);
        let (labels_only, chain) = (run(0.0), run(1.0));
        eprintln!("held-out NLL: start {start:.4}, labels only {labels_only:.4}, labels + chain {chain:.4}");
        assert!(chain < labels_only - 0.01, "chain distillation {chain} is not below labels alone {labels_only}");
        // At this lr the labels alone pull the new rows off their start (as on SmolLM2); the
        // chain keeps what the base knows and adds to it.
        assert!(chain < start, "chain distillation {chain} ends above the resized start {start}");
    }
}

//! LoRA and PEFT adapters against the HF + PEFT reference fixture.

mod common;
use common::*;
use linly_lora::infer::{self, ModelSpec};
use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
use linly_lora::lora::adapter::apply;
use linly_lora::model::Llama;

#[test]
fn adapter_unmerged_matches_peft_logits() {
    let exp = Expected::load();
    let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
    let model = apply(base, &tiny().join("adapter"), &dev()).unwrap();
    assert_eq!(model.vocab_size(), 384);
    let got = logits_of(&model, &exp.ids("resized_input_ids"));
    let (want, shape) = exp.f32("adapter_logits");
    assert_eq!(shape, vec![2, 24, 384]);
    let e = rel_err(&got, &want);
    assert!(e <= 1e-4, "adapter logits relative error {e:e} > 1e-4");
}

#[test]
fn saved_adapter_round_trips_bit_exactly() {
    use linly_lora::lora::config::AdapterConfig;
    use linly_lora::lora::save::{save, TableSave};
    use linly_lora::lora::TableMode;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ours");
    let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
    let model = apply(base, &tiny().join("adapter"), &dev()).unwrap();
    let cfg = AdapterConfig::load(&tiny().join("adapter")).unwrap();
    save(&model, &cfg, TableSave { embed: TableMode::All, lm_head: TableMode::All, old_vocab: 320, head_moved: vec![] }, &out, &[]).unwrap();
    let theirs = SafetensorsFile::open(&tiny().join("adapter/adapter_model.safetensors")).unwrap();
    let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for n in theirs.names() {
        let (a, b) = (ours.require(&n).unwrap(), theirs.require(&n).unwrap());
        assert_eq!(a.shape, b.shape, "{n}");
        assert_eq!(a.dtype, b.dtype, "{n}");
        assert!(a.bytes == b.bytes, "{n} differs");
    }
    let c2 = AdapterConfig::load(&out).unwrap();
    assert_eq!(c2.r, 8);
    assert_eq!(c2.lora_alpha, 16.0);
    assert_eq!(c2.modules_to_save, Some(vec!["embed_tokens".to_string(), "lm_head".to_string()]));
    // And it still gives PEFT's logits.
    let exp = Expected::load();
    let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
    let again = apply(base, &out, &dev()).unwrap();
    let got = logits_of(&again, &exp.ids("resized_input_ids"));
    let (want, _) = exp.f32("adapter_logits");
    assert!(rel_err(&got, &want) <= 1e-4);
}

#[test]
fn adapter_flag_on_eval() {
    let spec = ModelSpec { adapters: vec![tiny().join("adapter")], ..ModelSpec::new(tiny().join("base")) };
    let loaded = infer::load(&spec).unwrap();
    let exp = Expected::load();
    let r = infer::eval::eval_ids(&loaded, &exp.ids("resized_input_ids"), None).unwrap();
    assert_eq!(r.tokens, 46);
    assert!(r.by_vocab.is_none(), "no vocab_extension.json beside the tokenizer: no split");
}

/// `eval` splits the loss between base-vocabulary and added targets; each part equals the sum of
/// −log softmax of PEFT's reference logits over that part's positions.
#[test]
fn eval_splits_loss_between_base_and_added_tokens() {
    let spec = ModelSpec { adapters: vec![tiny().join("adapter")], ..ModelSpec::new(tiny().join("base")) };
    let mut loaded = infer::load(&spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("vocab_extension.json"), dir.path().join("vocab_extension.json")).unwrap();
    loaded.first_added_id = infer::added_from(dir.path()).unwrap();
    assert_eq!(loaded.first_added_id, Some(320));
    let exp = Expected::load();
    let ids = exp.ids("resized_input_ids");
    let (logits, shape) = exp.f32("adapter_logits");
    let (t, v) = (shape[1], shape[2]);
    let (mut want_base, mut want_added, mut n_added) = (0.0f64, 0.0f64, 0usize);
    for (b, seq) in ids.iter().enumerate() {
        for p in 0..t - 1 {
            let row = &logits[(b * t + p) * v..(b * t + p + 1) * v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let target = seq[p + 1];
            let nll = lse - row[target as usize] as f64;
            if target >= 320 {
                want_added += nll;
                n_added += 1;
            } else {
                want_base += nll;
            }
        }
    }
    assert!(n_added > 0 && n_added < 46, "the fixture's ids mix base and added targets ({n_added} added)");
    let r = infer::eval::eval_ids(&loaded, &ids, None).unwrap();
    let sp = r.by_vocab.expect("split");
    assert_eq!((sp.base.tokens, sp.added.tokens), (46 - n_added, n_added));
    for (got, want) in [(sp.base.total_nll, want_base), (sp.added.total_nll, want_added)] {
        assert!((got - want).abs() / want < 1e-4, "part NLL {got} vs reference {want}");
    }
    assert!((sp.base.total_nll + sp.added.total_nll - r.total_nll).abs() < 1e-9 * r.total_nll.max(1.0));
}

mod merge {
    use super::common::*;
    use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
    use linly_lora::io::weights::WeightStore;
    use linly_lora::lora::merge::{merge, MergeOptions};
    use linly_lora::model::Llama;
    use std::path::{Path, PathBuf};

    pub fn opts(out: &Path, adapters: Vec<PathBuf>) -> MergeOptions {
        MergeOptions { base: tiny().join("base"), adapters, out: out.to_path_buf(), dtype: None, tokenizer: None, shard_size: 5_000_000_000, allow_vocab_padding: false }
    }

    #[test]
    fn merge_reproduces_peft_merged_model() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let r = merge(&opts(&out, vec![tiny().join("adapter")])).unwrap();
        assert_eq!(r.vocab_size, 384);
        assert_eq!(r.lora_pairs_merged, 14);
        let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
        let theirs = SafetensorsFile::open(&tiny().join("merged/model.safetensors")).unwrap();
        assert_eq!(ours.names(), theirs.names());
        for n in theirs.names() {
            let (a, b) = (ours.require(&n).unwrap(), theirs.require(&n).unwrap());
            assert_eq!(a.shape, b.shape, "{n}");
            let e = rel_err(&a.to_f32().unwrap(), &b.to_f32().unwrap());
            assert!(e <= 1e-5, "{n}: relative error {e:e} > 1e-5");
        }
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], 384);
        assert_eq!(cfg["tie_word_embeddings"], false);
        let model = Llama::load(&out, &dev(), FloatType::F32).unwrap();
        let exp = Expected::load();
        let got = logits_of(&model, &exp.ids("resized_input_ids"));
        let (want, _) = exp.f32("merged_logits");
        let e = rel_err(&got, &want);
        assert!(e <= 1e-4, "merged logits relative error {e:e}");
    }

    #[test]
    fn merge_shards_and_converts_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        let mut o = opts(&out, vec![tiny().join("adapter")]);
        o.shard_size = 200_000;
        o.dtype = Some(FloatType::BF16);
        let r = merge(&o).unwrap();
        assert!(r.shards > 1);
        assert!(out.join("model.safetensors.index.json").exists() && !out.join("model.safetensors").exists());
        let store = WeightStore::open(&out).unwrap();
        assert_eq!(format!("{:?}", store.raw("model.layers.0.mlp.up_proj.weight").unwrap().dtype), "BF16");
        let model = Llama::load(&out, &dev(), FloatType::F32).unwrap();
        let exp = Expected::load();
        let got = logits_of(&model, &exp.ids("resized_input_ids"));
        let (want, _) = exp.f32("merged_logits");
        assert!(rel_err(&got, &want) < 2e-2);
    }
}

mod modes {
    use super::common::*;
    use super::merge::opts;
    use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
    use linly_lora::lora::adapter::apply;
    use linly_lora::lora::config::AdapterConfig;
    use linly_lora::lora::merge::merge;
    use linly_lora::lora::save::{save, TableSave};
    use linly_lora::lora::{set_table_modes, TableMode};
    use linly_lora::model::Llama;
    use std::path::Path;

    /// The fixture adapter with its tables' first 320 rows reset to the base rows: an `all`
    /// adapter whose only table change is the 64 new rows.
    fn all_adapter_with_base_rows(dir: &Path) {
        let base = SafetensorsFile::open(&tiny().join("base/model.safetensors")).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        rewrite_safetensors(&tiny().join("adapter/adapter_model.safetensors"), &dir.join("adapter_model.safetensors"), |n, s, mut v| {
            let base_key = if n.ends_with("embed_tokens.weight") { Some("model.embed_tokens.weight") } else if n.ends_with("lm_head.weight") { Some("lm_head.weight") } else { None };
            if let Some(k) = base_key {
                let b = base.require(k).unwrap().to_f32().unwrap();
                v[..b.len()].copy_from_slice(&b);
            }
            Some((n.to_string(), FloatType::F32, s, v))
        });
        std::fs::copy(tiny().join("adapter/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    }

    #[test]
    fn new_rows_adapter_stores_only_new_rows_and_merges_like_all() {
        let dir = tempfile::tempdir().unwrap();
        let all = dir.path().join("all");
        all_adapter_with_base_rows(&all);
        let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
        let mut model = apply(base, &all, &dev()).unwrap();
        set_table_modes(&mut model, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        let new = dir.path().join("new");
        let cfg = AdapterConfig::load(&all).unwrap();
        save(&model, &cfg, TableSave { embed: TableMode::NewRows, lm_head: TableMode::NewRows, old_vocab: 320, head_moved: vec![] }, &new, &[]).unwrap();
        let f = SafetensorsFile::open(&new.join("adapter_model.safetensors")).unwrap();
        let tables: Vec<String> = f.names().into_iter().filter(|n| !n.contains("lora_")).collect();
        assert_eq!(tables, vec!["base_model.model.lm_head.token_adapter.trainable_tokens_delta", "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]);
        for n in &tables {
            assert_eq!(f.require(n).unwrap().shape, &[64, 64]);
        }
        let c = AdapterConfig::load(&new).unwrap();
        assert_eq!(c.token_indices("embed_tokens").unwrap(), (320..384).collect::<Vec<_>>());
        assert!(c.modules_to_save.is_none());
        // The tables take 64 rows instead of 384.
        let table_bytes = |p: &Path| {
            let f = SafetensorsFile::open(&p.join("adapter_model.safetensors")).unwrap();
            f.names().iter().filter(|n| !n.contains("lora_")).map(|n| f.require(n).unwrap().bytes.len()).sum::<usize>()
        };
        assert_eq!(table_bytes(&all), 6 * table_bytes(&new));

        let (m1, m2) = (dir.path().join("m_all"), dir.path().join("m_new"));
        merge(&opts(&m1, vec![all.clone()])).unwrap();
        merge(&opts(&m2, vec![new.clone()])).unwrap();
        let (a, b) = (SafetensorsFile::open(&m1.join("model.safetensors")).unwrap(), SafetensorsFile::open(&m2.join("model.safetensors")).unwrap());
        assert_eq!(a.names(), b.names());
        for n in a.names() {
            assert!(a.require(&n).unwrap().bytes == b.require(&n).unwrap().bytes, "{n} differs between all and new_rows merges");
        }
        // Unmerged, the new_rows adapter gives the same logits as the all adapter.
        let exp = Expected::load();
        let ids = exp.ids("resized_input_ids");
        let la = logits_of(&apply(Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap(), &all, &dev()).unwrap(), &ids);
        let lb = logits_of(&apply(Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap(), &new, &dev()).unwrap(), &ids);
        assert!(rel_err(&lb, &la) < 1e-6);
    }

    fn tied_base(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        rewrite_safetensors(&tiny().join("base/model.safetensors"), &dir.join("model.safetensors"), |n, s, v| {
            (n != "lm_head.weight").then(|| (n.to_string(), FloatType::F32, s, v))
        });
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny().join("base/config.json")).unwrap()).unwrap();
        cfg["tie_word_embeddings"] = true.into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    }

    #[test]
    fn tied_embeddings_in_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("tied");
        tied_base(&base_dir);
        let exp = Expected::load();
        let ids = exp.ids("input_ids");
        let cfg = AdapterConfig::new(8, 16.0, 0.0, false, &["q_proj".to_string()]);
        for (embed, head, expect_tied) in [(TableMode::All, TableMode::All, true), (TableMode::NewRows, TableMode::NewRows, true), (TableMode::All, TableMode::Frozen, false)] {
            let mut model = Llama::load(&base_dir, &dev(), FloatType::F32).unwrap();
            assert!(model.lm_head.is_none());
            // Grow by 8 rows so new_rows has something to train (a frozen head cannot carry new
            // rows, so that case keeps the size); perturb rows so "trained" differs.
            let w = model.embed_tokens.weight();
            let grown = if head == TableMode::Frozen { w * 1.01 } else { burn::tensor::Tensor::cat(vec![w.clone(), w.clone().slice([0..8, 0..64]) * 0.5], 0) * 1.01 };
            model.embed_tokens = linly_lora::model::TokenTable::new(grown);
            set_table_modes(&mut model, embed, head, 320).unwrap();
            assert_eq!(model.lm_head.is_none(), expect_tied, "{embed:?}/{head:?}");
            let ad = dir.path().join(format!("ad-{embed:?}-{head:?}"));
            save(&model, &cfg, TableSave { embed, lm_head: head, old_vocab: 320, head_moved: vec![] }, &ad, &[]).unwrap();
            let out = dir.path().join(format!("m-{embed:?}-{head:?}"));
            let mut o = opts(&out, vec![ad.clone()]);
            o.base = base_dir.clone();
            let r = merge(&o).unwrap();
            assert_eq!(r.tie_word_embeddings, expect_tied, "{embed:?}/{head:?}");
            assert_eq!(SafetensorsFile::open(&out.join("model.safetensors")).unwrap().contains("lm_head.weight"), !expect_tied);
            // Merged = unmerged.
            let merged = Llama::load(&out, &dev(), FloatType::F32).unwrap();
            let unmerged = apply(Llama::load(&base_dir, &dev(), FloatType::F32).unwrap(), &ad, &dev()).unwrap();
            let e = rel_err(&logits_of(&merged, &ids), &logits_of(&unmerged, &ids));
            assert!(e < 1e-5, "{embed:?}/{head:?}: merged vs unmerged {e:e}");
            // And the table actually changed the model relative to the base.
            let base_logits = logits_of(&Llama::load(&base_dir, &dev(), FloatType::F32).unwrap(), &ids);
            assert!(rel_err(&logits_of(&merged, &ids)[..base_logits.len()], &base_logits) > 1e-4);
        }
    }

    /// `adapter pack`: f16 storage, a tied table stored once, and the packed adapter still
    /// applies and merges (tied stays tied) to the model of the original up to f16 rounding.
    #[test]
    fn packed_tied_adapter_matches_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let base_dir = dir.path().join("tied");
        tied_base(&base_dir);
        let ids = Expected::load().ids("input_ids");
        let mut model = Llama::load(&base_dir, &dev(), FloatType::F32).unwrap();
        let w = model.embed_tokens.weight();
        model.embed_tokens = linly_lora::model::TokenTable::new(burn::tensor::Tensor::cat(vec![w.clone(), w.slice([0..8, 0..64]) * 0.5], 0));
        set_table_modes(&mut model, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        let cfg = AdapterConfig::new(8, 16.0, 0.0, false, &["q_proj".to_string()]);
        let ad = dir.path().join("ad");
        std::fs::write(dir.path().join("recipe.toml"), "# how it was trained").unwrap();
        save(&model, &cfg, TableSave { embed: TableMode::NewRows, lm_head: TableMode::NewRows, old_vocab: 320, head_moved: vec![] }, &ad, &[&dir.path().join("recipe.toml")]).unwrap();
        let packed = dir.path().join("packed");
        let r = linly_lora::lora::save::pack(&ad, &packed, FloatType::F16, None).unwrap();
        assert!(r.deduplicated_head);
        assert!(packed.join("recipe.toml").exists(), "other files are copied");
        let st = SafetensorsFile::open(&packed.join("adapter_model.safetensors")).unwrap();
        assert!(st.names().iter().all(|n| !n.contains("lm_head")), "{:?}", st.names());
        assert!(st.names().iter().all(|n| format!("{:?}", st.get(n).unwrap().dtype) == "F16"));
        let cfg_json = std::fs::read_to_string(packed.join("adapter_config.json")).unwrap();
        assert!(!cfg_json.contains("lm_head"), "{cfg_json}");
        // f32 -> f16 halves the bytes, and the head is gone: well under half.
        assert!(r.bytes_out * 3 < r.bytes_in, "{r:?}");

        let load = || Llama::load(&base_dir, &dev(), FloatType::F32).unwrap();
        let orig = apply(load(), &ad, &dev()).unwrap();
        let pk = apply(load(), &packed, &dev()).unwrap();
        assert!(pk.lm_head.is_none(), "an embed-only adapter keeps a tied model tied");
        assert_eq!(pk.embed_tokens.rows(), 328);
        let e = rel_err(&logits_of(&pk, &ids), &logits_of(&orig, &ids));
        assert!(e > 0.0 && e < 2e-3, "packed vs original logits: {e:e}");
        let out = dir.path().join("merged");
        let mut o = opts(&out, vec![packed.clone()]);
        o.base = base_dir.clone();
        let m = merge(&o).unwrap();
        assert!(m.tie_word_embeddings);
        assert_eq!(m.vocab_size, 328);
        let merged = Llama::load(&out, &dev(), FloatType::F32).unwrap();
        assert!(rel_err(&logits_of(&merged, &ids), &logits_of(&pk, &ids)) < 1e-5);
    }

    /// `adapter pack --rank K` on the PEFT fixture adapter (r 8) whose B factors were cut to
    /// rank 4: at K = 4 the packed adapter is the same model (the SVD finds the whole update,
    /// alpha rescaled so alpha/r is kept); at K = 2 it is a different one and says what it left out.
    #[test]
    fn pack_to_a_lower_rank_keeps_the_update_it_can_hold() {
        let dir = tempfile::tempdir().unwrap();
        let ad = dir.path().join("rank4");
        std::fs::create_dir_all(&ad).unwrap();
        std::fs::copy(tiny().join("adapter/adapter_config.json"), ad.join("adapter_config.json")).unwrap();
        rewrite_safetensors(&tiny().join("adapter/adapter_model.safetensors"), &ad.join("adapter_model.safetensors"), |n, s, mut v| {
            if n.ends_with("lora_B.weight") {
                // [out, 8]: columns 4..8 zero, so B·A has rank at most 4.
                for (i, x) in v.iter_mut().enumerate() {
                    if i % s[1] >= 4 {
                        *x = 0.0;
                    }
                }
            }
            Some((n.to_string(), FloatType::F32, s, v))
        });
        let ids = Expected::load().ids("resized_input_ids");
        let logits = |a: &Path| logits_of(&apply(Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap(), a, &dev()).unwrap(), &ids);
        let orig = logits(&ad);
        let (p4, p2) = (dir.path().join("p4"), dir.path().join("p2"));
        let r4 = linly_lora::lora::save::pack(&ad, &p4, FloatType::F32, Some(4)).unwrap();
        let r2 = linly_lora::lora::save::pack(&ad, &p2, FloatType::F32, Some(2)).unwrap();
        let (c4, c2) = (r4.rank_cut.unwrap(), r2.rank_cut.unwrap());
        assert_eq!((c4.from, c4.to, c4.pairs), (8, 4, 14));
        assert!(c4.dropped_energy_max < 1e-10, "{c4:?}");
        assert!(c2.dropped_energy_median > 1e-3, "{c2:?}");
        let cfg = AdapterConfig::load(&p4).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
        let st = SafetensorsFile::open(&p4.join("adapter_model.safetensors")).unwrap();
        let a = st.names().into_iter().find(|n| n.ends_with("q_proj.lora_A.weight")).unwrap();
        assert_eq!(st.require(&a).unwrap().shape[0], 4);
        let e4 = rel_err(&logits(&p4), &orig);
        let e2 = rel_err(&logits(&p2), &orig);
        assert!(e4 < 1e-5, "rank 4 holds the whole update: {e4:e}");
        assert!(e2 > 100.0 * e4.max(1e-7), "rank 2 must change the model: {e2:e} vs {e4:e}");
        // A rank that is not below r is refused, naming the folder.
        let err = linly_lora::lora::save::pack(&ad, &dir.path().join("p8"), FloatType::F32, Some(8)).unwrap_err();
        assert!(format!("{err:#}").contains("rank4"), "{err:#}");
        // A NaN in a factor is refused before anything is written.
        let bad = dir.path().join("nan");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::copy(ad.join("adapter_config.json"), bad.join("adapter_config.json")).unwrap();
        rewrite_safetensors(&ad.join("adapter_model.safetensors"), &bad.join("adapter_model.safetensors"), |n, s, mut v| {
            if n.ends_with("layers.1.mlp.down_proj.lora_B.weight") {
                v[3] = f32::NAN;
            }
            Some((n.to_string(), FloatType::F32, s, v))
        });
        let out = dir.path().join("pnan");
        let err = format!("{:#}", linly_lora::lora::save::pack(&bad, &out, FloatType::F32, Some(4)).unwrap_err());
        assert!(err.contains("down_proj.lora_B") && err.contains("NaN"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn new_rows_train_only_new_rows_and_lora_grads_are_rank_sized() {
        use linly_lora::lora::{inject, LoraInit, LoraSettings};
        let device = cpu().autodiff();
        let base = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
        let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
        for (_, lin) in linly_lora::lora::adapter::linears(&model) {
            assert_eq!(lin.lora.len(), 1);
        }
        // Drop the fixture's LoRA and add a fresh one (B = 0: the model output is unchanged).
        let before = logits_of(&model, &Expected::load().ids("resized_input_ids"));
        let s = LoraSettings { r: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: vec!["q_proj".into(), "down_proj".into()], init: LoraInit::Kaiming, seed: 1 };
        inject(&mut model, &s, &device).unwrap();
        let after = logits_of(&model, &Expected::load().ids("resized_input_ids"));
        assert!(rel_err(&after, &before) < 1e-7, "a fresh adapter must not change the output");
        set_table_modes(&mut model, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        let ids = linly_lora::infer::ids_tensor(&Expected::load().ids("resized_input_ids")[0], &device);
        let loss = model.forward(ids, None).sum();
        let grads = loss.backward();
        assert!(model.embed_tokens.base.val().grad(&grads).is_none(), "old rows must be frozen");
        assert_eq!(model.embed_tokens.extra.as_ref().unwrap().val().grad(&grads).unwrap().dims(), [64, 64]);
        assert_eq!(model.lm_head.as_ref().unwrap().extra.as_ref().unwrap().val().grad(&grads).unwrap().dims(), [64, 64]);
        let q = &model.layers[0].self_attn.q_proj;
        assert!(q.weight.val().grad(&grads).is_none(), "base weights must be frozen");
        let fresh = &q.lora[1];
        assert_eq!(fresh.a.val().grad(&grads).unwrap().dims(), [4, 64]);
        assert_eq!(fresh.b.val().grad(&grads).unwrap().dims(), [64, 4]);
        // Kaiming-uniform(a=√5) bound: 1/√in.
        let a = linly_lora::io::weights::tensor_to_f32(fresh.a.val());
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|x| x.abs() > bound * 0.9));
    }
}

mod broken {
    use super::common::*;
    use super::merge::opts;
    use linly_lora::io::safetensors::FloatType;
    use linly_lora::lora::merge::merge;
    use std::path::{Path, PathBuf};

    /// Copies the fixture adapter with tensors renamed/reshaped by `edit`.
    fn edited(dir: &Path, edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(String, Vec<usize>, Vec<f32>)>) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        rewrite_safetensors(&tiny().join("adapter/adapter_model.safetensors"), &dir.join("adapter_model.safetensors"), |n, s, v| {
            edit(n, s, v).map(|(n, s, v)| (n, FloatType::F32, s, v))
        });
        std::fs::copy(tiny().join("adapter/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
        dir.to_path_buf()
    }

    fn expect_rejected(o: linly_lora::lora::merge::MergeOptions, needle: &str) {
        let parent = o.out.parent().unwrap().to_path_buf();
        let before: Vec<_> = std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
        let e = format!("{:#}", merge(&o).unwrap_err());
        assert!(e.contains(needle), "error lacks `{needle}`: {e}");
        assert!(!o.out.exists(), "a rejected merge left {}", o.out.display());
        let after: Vec<_> = std::fs::read_dir(&parent).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(before, after, "a rejected merge left files behind");
    }

    #[test]
    fn target_missing_from_base() {
        let dir = tempfile::tempdir().unwrap();
        let ad = edited(&dir.path().join("ad"), |n, s, v| Some((n.replace("layers.1.", "layers.7."), s, v)));
        expect_rejected(opts(&dir.path().join("out"), vec![ad]), "model.layers.7");
    }

    #[test]
    fn lora_shape_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let ad = edited(&dir.path().join("ad"), |n, s, v| {
            if n.contains("layers.0.mlp.up_proj.lora_A") {
                Some((n.into(), vec![s[0], s[1] - 1], v[..s[0] * (s[1] - 1)].to_vec()))
            } else {
                Some((n.into(), s, v))
            }
        });
        expect_rejected(opts(&dir.path().join("out"), vec![ad]), "another model");
    }

    #[test]
    fn vocabulary_grown_on_one_table_only() {
        let dir = tempfile::tempdir().unwrap();
        let ad = edited(&dir.path().join("ad"), |n, s, v| (!n.contains("lm_head")).then(|| (n.into(), s, v)));
        expect_rejected(opts(&dir.path().join("out"), vec![ad]), "must carry both tables");
    }

    #[test]
    fn tokenizer_disagrees_with_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&dir.path().join("out"), vec![tiny().join("adapter")]);
        o.tokenizer = Some(fixture("llama2-tokenizer"));
        expect_rejected(o, "--tokenizer");
    }

    #[test]
    fn existing_output_and_bad_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let e = format!("{:#}", merge(&opts(&out, vec![tiny().join("adapter")])).unwrap_err());
        assert!(e.contains("already exists"), "{e}");
        let ad = dir.path().join("dora");
        std::fs::create_dir(&ad).unwrap();
        std::fs::copy(tiny().join("adapter/adapter_model.safetensors"), ad.join("adapter_model.safetensors")).unwrap();
        let cfg = std::fs::read_to_string(tiny().join("adapter/adapter_config.json")).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
        std::fs::write(ad.join("adapter_config.json"), cfg).unwrap();
        expect_rejected(opts(&dir.path().join("out2"), vec![ad]), "DoRA");
    }
}

/// Writes adapters saved by linly-lora for the PEFT interop check in
/// benches/peft_interop.py (run where transformers + peft are installed):
/// `INTEROP_DIR=runs/interop cargo test --release --test lora -- --ignored export_interop`.
#[test]
#[ignore]
fn export_interop_adapters() {
    use linly_lora::lora::config::AdapterConfig;
    use linly_lora::lora::save::{save, TableSave};
    use linly_lora::lora::{set_table_modes, TableMode};
    let out = std::path::PathBuf::from(std::env::var("INTEROP_DIR").expect("set INTEROP_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let cfg = AdapterConfig::load(&tiny().join("adapter")).unwrap();
    let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
    let model = apply(base, &tiny().join("adapter"), &dev()).unwrap();
    save(&model, &cfg, TableSave { embed: TableMode::All, lm_head: TableMode::All, old_vocab: 320, head_moved: vec![] }, &out.join("ours_all"), &[]).unwrap();
    let mut model = model;
    set_table_modes(&mut model, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
    save(&model, &cfg, TableSave { embed: TableMode::NewRows, lm_head: TableMode::NewRows, old_vocab: 320, head_moved: vec![] }, &out.join("ours_new_rows"), &[]).unwrap();
    // Our logits for the new_rows adapter on the base (rows 0..320 from the base): PEFT must agree.
    let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
    let m = apply(base, &out.join("ours_new_rows"), &dev()).unwrap();
    let l = logits_of(&m, &Expected::load().ids("resized_input_ids"));
    let bytes = linly_lora::io::safetensors::encode_f32(&l, FloatType::F32);
    linly_lora::io::safetensors::write_all(&out.join("ours_new_rows_logits.safetensors"), &[("logits".into(), "F32".into(), vec![2, 24, 384], bytes)], None).unwrap();
}

/// Every adapter shipped in `adapters/` is self-consistent without its base model: PEFT config
/// and tensors parse, tensors are f16, the trainable-token rows cover exactly the vocabulary the
/// shipped tokenizer adds, and the extension agrees with both.
#[test]
fn shipped_adapters_are_consistent() {
    use linly_lora::lora::adapter::{AdapterFile, TableUpdate};
    let root = fixture("../../adapters");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("adapter_config.json").exists() {
            continue;
        }
        seen += 1;
        let ad = AdapterFile::open(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        assert!(!ad.lora.is_empty(), "{}: no LoRA branches", dir.display());
        let st = SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
        for n in st.names() {
            assert_eq!(format!("{:?}", st.get(&n).unwrap().dtype), "F16", "{}: {n}", dir.display());
        }
        let ext: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("vocab_extension.json")).unwrap()).unwrap();
        let (old, new) = (ext["old_vocab"].as_u64().unwrap() as usize, ext["new_vocab"].as_u64().unwrap() as usize);
        let tok = linly_lora::tokenizer::Tok::load(&dir).unwrap();
        assert_eq!(tok.vocab_size(), new, "{}", dir.display());
        match &ad.embed {
            Some(TableUpdate::Rows { indices, .. }) => assert_eq!(indices.clone(), (old..new).collect::<Vec<_>>(), "{}", dir.display()),
            other => panic!("{}: expected trainable-token rows for embed_tokens, got {other:?}", dir.display()),
        }
    }
    assert!(seen >= 1, "no adapter found under {}", root.display());
}

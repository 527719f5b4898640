//! Training against the HF + PEFT reference: the step-1 SFT loss and its gradients.

mod common;
use common::*;
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::tensor_to_f32;
use linly_lora::lora::adapter::apply;
use linly_lora::lora::{set_table_modes, TableMode};
use linly_lora::model::Llama;
use linly_lora::train::step::{forward_backward, MicroBatch};

fn fixture_batch() -> MicroBatch {
    let e = Expected::load();
    let (labels, shape) = e.i64("sft_labels");
    MicroBatch::new(e.ids("resized_input_ids"), labels.chunks(shape[1]).map(|c| c.to_vec()).collect())
}

#[test]
fn sft_loss_and_gradients_match_peft() {
    let device = dev().autodiff();
    let base = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
    let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
    set_table_modes(&mut model, TableMode::All, TableMode::All, 320).unwrap();
    let (sums, total, grads) = forward_backward(&mut model, &[fixture_batch()], 1.0, &device).unwrap();
    let loss = sums.into_iter().map(|s| s.into_scalar::<f32>() as f64).sum::<f64>() / total as f64;
    let exp = Expected::load();
    let want = exp.f32("sft_loss").0[0] as f64;
    assert!((loss - want).abs() / want <= 1e-4, "sft loss {loss} vs {want}");
    let cat = |a: &str, b: &str| {
        let mut v = tensor_to_f32(grads[a].clone());
        v.extend(tensor_to_f32(grads[b].clone()));
        v
    };
    let checks: Vec<(&str, Vec<f32>)> = vec![
        ("grad.base_model.model.model.embed_tokens.modules_to_save.default.weight", cat("model.embed_tokens.base", "model.embed_tokens.new_rows")),
        ("grad.base_model.model.lm_head.modules_to_save.default.weight", cat("lm_head.base", "lm_head.new_rows")),
        ("grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", tensor_to_f32(grads["model.layers.0.self_attn.q_proj.lora_A"].clone())),
        ("grad.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", tensor_to_f32(grads["model.layers.0.self_attn.q_proj.lora_B"].clone())),
        ("grad.base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight", tensor_to_f32(grads["model.layers.1.mlp.down_proj.lora_A"].clone())),
        ("grad.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight", tensor_to_f32(grads["model.layers.1.mlp.down_proj.lora_B"].clone())),
    ];
    for (name, got) in checks {
        let (want, _) = exp.f32(name);
        let e = rel_err(&got, &want);
        eprintln!("{name}: rel err {e:e}");
        assert!(e <= 1e-3, "{name}: relative error {e:e} > 1e-3");
    }
}

mod recipes {
    use super::common::*;
    use linly_lora::train::recipe::Recipe;
    use linly_lora::train::run::{train, TrainOptions};
    use std::path::{Path, PathBuf};

    fn p(x: &Path) -> String {
        x.display().to_string()
    }

    /// A random-weight model with the LLaMA-2 tokenizer in a temporary folder (kept alive by the
    /// returned guard) and its path.
    fn random_llama2_model() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        std::fs::create_dir(&m).unwrap();
        random_model(&m, 32000, Some(&fixture("llama2-tokenizer")));
        (d, m)
    }

    /// Writes a recipe into `dir` and returns its path.
    fn recipe(dir: &Path, body: &str) -> PathBuf {
        let f = dir.join("recipe.toml");
        std::fs::write(&f, body).unwrap();
        f
    }

    fn metrics(out: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v.get("loss").is_some()).collect()
    }

    #[test]
    fn sft_step_one_through_a_recipe_matches_peft() {
        let dir = tempfile::tempdir().unwrap();
        let e = Expected::load();
        let (labels, shape) = e.i64("sft_labels");
        let ids = e.ids("resized_input_ids");
        let lines: Vec<String> = ids.iter().zip(labels.chunks(shape[1])).map(|(i, l)| serde_json::json!({"input_ids": i, "labels": l}).to_string()).collect();
        std::fs::write(dir.path().join("sft.jsonl"), lines.join("\n")).unwrap();
        let r = recipe(
            dir.path(),
            &format!(
                r#"
[model]
path = "{base}"
[vocab]
extension = "{ext}"
[lora]
r = 8
alpha = 16
dropout = 0.0
init_from = "{adapter}"
[[data]]
kind = "tokenized"
path = "sft.jsonl"
[mix]
packing = false
[train]
seq_len = 24
batch_size = 2
grad_accum = 1
steps = 1
lr = 1e-4
warmup_ratio = 0.0
schedule = "constant"
weight_decay = 0.0
max_grad_norm = 0.0
seed = 1
[output]
dir = "out"
plots = false
"#,
                base = p(&tiny().join("base")),
                ext = p(&tiny().join("vocab_extension.json")),
                adapter = p(&tiny().join("adapter"))
            ),
        );
        let rep = train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
        let want = e.f32("sft_loss").0[0] as f64;
        let got = rep.first_loss.unwrap();
        assert!((got - want).abs() / want <= 1e-4, "step-1 loss {got} vs PEFT's {want}");
        let m = metrics(&dir.path().join("out"));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["tokens"], 2 * (23 - 5)); // 23 shifted positions per row, 5 of them masked
    }

    /// `data prepare` builds the stores under the same keys as `train`, which then reuses them
    /// untouched (and adds the piece table for its seq_len).
    #[test]
    fn data_prepare_builds_the_stores_train_reuses() {
        use linly_lora::commands::train::{prepare_data, PrepareDataOptions};
        let dir = tempfile::tempdir().unwrap();
        let tiny = tiny();
        let r = recipe(
            dir.path(),
            &format!(
                r#"
[model]
path = "{base}"
[vocab]
extension = "{ext}"
[lora]
r = 4
alpha = 8
dropout = 0.0
[[data]]
kind = "tokenized"
path = "{ids}"
[train]
seq_len = 32
batch_size = 2
grad_accum = 1
steps = 2
lr = 1e-3
warmup_ratio = 0.0
schedule = "constant"
seed = 3
[output]
dir = "out"
plots = false
"#,
                base = p(&tiny.join("base")),
                ext = p(&tiny.join("vocab_extension.json")),
                ids = p(&fixture("data/tiny_ids.jsonl"))
            ),
        );
        let opts = PrepareDataOptions { recipe: r.clone(), progress: false };
        let rep = prepare_data(&opts).unwrap();
        assert_eq!(rep.sources.len(), 1);
        let s = &rep.sources[0];
        assert!(!s.reused && s.tokens > 0 && s.documents > 0, "{s:?}");
        let stamp = std::fs::metadata(&s.store).unwrap().modified().unwrap();
        assert!(prepare_data(&opts).unwrap().sources[0].reused, "a second prepare reuses the store");
        train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
        assert_eq!(std::fs::metadata(&s.store).unwrap().modified().unwrap(), stamp, "train rebuilt the prepared store");
        let mut table = s.store.file_name().unwrap().to_os_string();
        table.push(".pieces-32");
        assert!(s.store.with_file_name(table).exists(), "train writes the piece table beside the store");
    }

    fn text_recipe(dir: &Path, model: &Path, steps: usize, extra: &str) -> PathBuf {
        text_recipe_d(dir, model, steps, extra, 0.1)
    }

    fn text_recipe_d(dir: &Path, model: &Path, steps: usize, extra: &str, dropout: f64) -> PathBuf {
        let fx = fixture("data");
        recipe(
            dir,
            &format!(
                r#"
[model]
path = "{model}"
[lora]
r = 4
alpha = 8
dropout = {dropout}
targets = ["q_proj", "v_proj", "down_proj"]
[trainable]
embed_tokens = "all"
lm_head = "all"
[[data]]
kind = "parallel"
path = "{fx}/hsk_zh_en_sample.tsv"
weight = [0.2, 0.8]
[[data]]
kind = "alpaca"
path = "{fx}/alpaca_sample.json"
weight = 1.0
[[data]]
kind = "text"
path = "{fx}/text_sample.txt"
weight = [0.8, 0.2]
[train]
seq_len = 64
batch_size = 2
grad_accum = 2
steps = {steps}
lr = 3e-3
embed_lr = 3e-3
warmup_ratio = 0.1
schedule = "cosine"
weight_decay = 0.01
max_grad_norm = 1.0
seed = 5
[output]
dir = "out"
save_every = 2
keep_last = 2
{extra}
"#,
                model = p(model),
                fx = p(&fx),
                dropout = dropout
            ),
        )
    }

    /// The tiny fixture with its extended vocabulary, new rows + LoRA r 4, on `device`, with the
    /// given `[[stage]]` blocks and `[precision]` dtype, for the stage tests.
    fn tiny_stage_recipe(dir: &Path, device: &str, dtype: &str, dropout: f64, lr: f64, stages: &str) -> PathBuf {
        let tiny = tiny();
        recipe(
            dir,
            &format!(
                r#"
[model]
path = "{base}"
device = "{device}"
[vocab]
extension = "{ext}"
init = "subtoken-mean"
[lora]
r = 4
alpha = 8
dropout = {dropout}
[trainable]
embed_tokens = "new_rows"
lm_head = "new_rows"
[[data]]
kind = "tokenized"
path = "{ids}"
[train]
seq_len = 32
batch_size = 2
lr = {lr}
warmup_ratio = 0.0
{stages}
[precision]
dtype = "{dtype}"
[output]
dir = "out"
save_every = 100
plots = false
"#,
                base = p(&tiny.join("base")),
                ext = p(&tiny.join("vocab_extension.json")),
                ids = p(&fixture("data/tiny_ids.jsonl")),
            ),
        )
    }

    /// Self-distillation on the CPU reads the base snapshot's targets where the snapshot rounds as
    /// the step does (f32 products, `teacher = "dense"`), logging `self_teacher_s`, and the run is
    /// the one the step's own teacher gives (`teacher = "auto"`, a quantized snapshot: the step
    /// keeps the term). Rows of old ids only, with new rows in the model.
    #[test]
    fn self_distillation_reads_the_snapshot_where_it_rounds_as_the_step() {
        let run = |teacher: &str| {
            let dir = tempfile::tempdir().unwrap();
            let rows: Vec<String> = (0..6u32).map(|r| serde_json::json!({ "input_ids": (0..24u32).map(|i| (r * 53 + i * 29 + 7) % 320).collect::<Vec<_>>() }).to_string()).collect();
            std::fs::write(dir.path().join("en.jsonl"), rows.join("\n")).unwrap();
            let body = format!(
                r#"
[model]
path = "{base}"
[vocab]
extension = "{ext}"
init = "subtoken-mean"
[lora]
r = 4
alpha = 8
dropout = 0.0
[trainable]
embed_tokens = "new_rows"
lm_head = "new_rows"
[[data]]
kind = "tokenized"
path = "en.jsonl"
self_distill = 2.0
[mix]
packing = false
[train]
seq_len = 24
batch_size = 2
steps = 3
lr = 5e-3
warmup_ratio = 0.0
frozen_products = "f32"
teacher = "{teacher}"
seed = 3
[output]
dir = "out"
save_every = 100
plots = false
"#,
                base = p(&tiny().join("base")),
                ext = p(&tiny().join("vocab_extension.json")),
            );
            train(&TrainOptions { recipe: recipe(dir.path(), &body), ..Default::default() }).unwrap();
            metrics(&dir.path().join("out"))
        };
        let (host, step) = (run("dense"), run("auto"));
        assert_eq!(host.len(), 3);
        // On the composed path (LINLY_LORA_KERNELS=composed) the snapshot makes no host targets.
        let snapshot = linly_lora::train::teacher::BaseModel::host_device(&dev());
        for (h, s) in host.iter().zip(&step) {
            assert_eq!(h["self_teacher_s"].as_f64().is_some_and(|t| t > 0.0), snapshot, "{h}");
            assert!(s["self_teacher_s"].is_null(), "{s}");
            let (kh, ks) = (h["self_distill"].as_f64().unwrap(), s["self_distill"].as_f64().unwrap());
            // After the first update the model is no longer the base: the term is not zero.
            assert!((kh - ks).abs() <= 1e-4 * ks.abs() + 1e-6, "step {}: self_distill {kh} (snapshot) vs {ks} (step)", h["step"]);
            let (lh, ls) = (h["loss"].as_f64().unwrap(), s["loss"].as_f64().unwrap());
            assert!((lh - ls).abs() <= 1e-4 * ls, "step {}: loss {lh} vs {ls}", h["step"]);
        }
        assert!(host[2]["self_distill"].as_f64().unwrap() > 1e-4, "{}", host[2]);
    }

    /// Chinese-LLaMA's two stages (new rows alone, then LoRA + new rows) in fp16: the switch
    /// rebuilds the table parameters from the last stage's, which must work on every backend
    /// (libtorch refused non-leaf tensors there) and keep training. Runs on LINLY_TEST_DEVICE.
    #[test]
    fn two_stage_fp16_run_switches_stages() {
        let dir = tempfile::tempdir().unwrap();
        let device = std::env::var("LINLY_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
        let stages = "[[stage]]\nname = \"rows\"\nsteps = 3\nlora = false\n[[stage]]\nname = \"lora+rows\"\nsteps = 3\nlora = true";
        let r = tiny_stage_recipe(dir.path(), &device, "fp16", 0.0, 1e-3, stages);
        let rep = train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
        let ms = metrics(&dir.path().join("out"));
        let stages: Vec<&str> = ms.iter().map(|m| m["stage"].as_str().unwrap()).collect();
        assert_eq!(stages, ["rows", "rows", "rows", "lora+rows", "lora+rows", "lora+rows"]);
        assert!(ms.iter().all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)), "{ms:?}");
        assert!(rep.adapter_dir.unwrap().join("adapter_model.safetensors").exists());
    }

    /// A `lora = false` stage (Chinese-LLaMA's embeddings-only first stage) leaves LoRA exactly
    /// where it started: B stays zero, so the stage cannot touch the base model's behaviour.
    #[test]
    fn lora_false_stage_leaves_lora_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let r = tiny_stage_recipe(dir.path(), "cpu", "fp32", 0.05, 1e-2, "[[stage]]\nname = \"rows\"\nsteps = 3\nlora = false");
        train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
        let st = linly_lora::io::safetensors::SafetensorsFile::open(&dir.path().join("out/adapter/adapter_model.safetensors")).unwrap();
        let mut seen = 0;
        for name in st.names().into_iter().filter(|n| n.contains("lora_B")) {
            let v = st.require(&name).unwrap().to_f32().unwrap();
            assert!(v.iter().all(|&x| x == 0.0), "{name} moved in a lora = false stage");
            seen += 1;
        }
        assert!(seen > 0, "the adapter holds no lora_B");
        // The new rows did train.
        let rows = st.require(&st.names().into_iter().find(|n| n.contains("embed_tokens")).unwrap()).unwrap().to_f32().unwrap();
        assert!(rows.iter().any(|&x| x != 0.0));
    }

    /// `[train] frozen_products`: `bf16` trains on the bf16 packings where the CPU has
    /// AVX512-BF16 and `int8` on quantized copies on any CPU; `auto` picks what
    /// `kernels::frozen::auto` says for this CPU (bf16 on AMD with AVX512-BF16, int8 on Intel
    /// with AVX-512 VNNI, else f32), and the report says which. The first step's loss (the same
    /// model, before any update) is f32's within the packing's rounding and not equal to it.
    /// Both `bf16` and `int8` refuse fp16 weights with an error that names the key.
    #[test]
    fn frozen_products_auto_packs_where_it_pays_and_copies_refuse_fp16() {
        let run = |mode: &str| {
            let dir = tempfile::tempdir().unwrap();
            let r = tiny_stage_recipe(dir.path(), "cpu", "fp32", 0.0, 1e-3, &format!("steps = 2\nfrozen_products = \"{mode}\""));
            let rep = train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
            (rep.frozen_products, metrics(&dir.path().join("out"))[0]["loss"].as_f64().unwrap())
        };
        let (f32_mode, f32_loss) = run("f32");
        assert_eq!(f32_mode, "f32");
        // The composed path (tests/composed.rs) has no f32 flex tensors to pack: auto is f32 there.
        let fused = linly_lora::kernels::kernel_path() == linly_lora::kernels::KernelPath::Fused;
        let (auto_mode, auto_loss) = run("auto");
        assert_eq!(auto_mode, if fused { linly_lora::kernels::frozen::auto() } else { "f32" });
        if auto_mode == "f32" {
            assert_eq!(f32_loss, auto_loss);
        }
        if fused && linly_lora::kernels::bf16::available() {
            let (bf16_mode, bf16_loss) = run("bf16");
            assert_eq!(bf16_mode, "bf16");
            assert!((f32_loss - bf16_loss).abs() <= 1e-2 * f32_loss.abs(), "first loss: f32 {f32_loss}, bf16 {bf16_loss}");
            assert_ne!(f32_loss, bf16_loss, "the same loss as f32: the packings were not used");
            if auto_mode == "bf16" {
                assert_eq!(auto_loss, bf16_loss);
            }
        }
        // int8 runs wherever the weights are f32 flex tensors. The tiny model's q/k/v/o have
        // whole 32-value blocks and take the quantized kernels; its MLP (176 wide) stays f32.
        if fused {
            let (i8_mode, i8_loss) = run("int8");
            assert_eq!(i8_mode, "int8");
            assert!((f32_loss - i8_loss).abs() <= 1e-2 * f32_loss.abs(), "first loss: f32 {f32_loss}, int8 {i8_loss}");
            assert_ne!(f32_loss, i8_loss, "the same loss as f32: the int8 copies were not used");
            if auto_mode == "int8" {
                assert_eq!(auto_loss, i8_loss);
            }
        }
        for mode in ["bf16", "int8"] {
            let dir = tempfile::tempdir().unwrap();
            let r = tiny_stage_recipe(dir.path(), "cpu", "fp16", 0.0, 1e-3, &format!("steps = 2\nfrozen_products = \"{mode}\""));
            let e = format!("{:#}", train(&TrainOptions { recipe: r, ..Default::default() }).unwrap_err());
            assert!(e.contains("frozen_products"), "{mode}: {e}");
        }
    }

    #[test]
    fn loss_falls_on_real_chinese_data() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir(&m).unwrap();
        random_model(&m, 32000, Some(&fixture("llama2-tokenizer")));
        let r = text_recipe(dir.path(), &m, 30, "");
        let rep = train(&TrainOptions { recipe: r, ..Default::default() }).unwrap();
        let ms = metrics(&dir.path().join("out"));
        let avg = |s: &[serde_json::Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
        let (first, last) = (avg(&ms[..5]), avg(&ms[ms.len() - 5..]));
        assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
        assert!(rep.adapter_dir.unwrap().join("adapter_model.safetensors").exists());
        assert!(dir.path().join("out/loss.png").exists() && dir.path().join("out/loss_scale.png").exists());
        assert!(rep.packing_efficiency > 0.5, "{}", rep.packing_efficiency);
        // The adapter loads for inference.
        let spec = linly_lora::infer::ModelSpec { adapters: vec![dir.path().join("out/adapter")], ..linly_lora::infer::ModelSpec::new(&m) };
        linly_lora::infer::load(&spec).unwrap();
    }

    /// Dropout masks come from the device RNG, seeded per step. The CLI trains one model per
    /// process, so this test drives the real binary (parallel tests in one process would share
    /// that RNG) and really `kill -9`s it.
    #[test]
    fn resume_after_kill_9_reproduces_the_uninterrupted_run() {
        use std::process::{Command, Stdio};
        let (_m_dir, m) = random_llama2_model();
        let bin = env!("CARGO_BIN_EXE_linly-lora");
        let a = tempfile::tempdir().unwrap();
        let ra = text_recipe(a.path(), &m, 10, "");
        let st = Command::new(bin).args(["train", "--quiet"]).arg(&ra).stdout(Stdio::null()).status().unwrap();
        assert!(st.success());
        let b = tempfile::tempdir().unwrap();
        let rb = text_recipe(b.path(), &m, 10, "");
        let mut child = Command::new(bin).args(["train", "--quiet"]).arg(&rb).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let ck = b.path().join("out/checkpoints/step-00000004/state.json");
        let t0 = std::time::Instant::now();
        while !ck.exists() && t0.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(ck.exists(), "no checkpoint within 120 s");
        assert!(!b.path().join("out/adapter").exists(), "the run finished before the kill; nothing was resumed");
        let fresh = Command::new(bin).args(["train", "--quiet"]).arg(&rb).output().unwrap();
        assert!(!fresh.status.success() && String::from_utf8_lossy(&fresh.stderr).contains("--resume"), "a second fresh run into the same dir must be refused");
        let st = Command::new(bin).args(["train", "--quiet", "--resume"]).arg(&rb).stdout(Stdio::null()).status().unwrap();
        assert!(st.success());
        let (ma, mb) = (metrics(&a.path().join("out")), metrics(&b.path().join("out")));
        assert_eq!(ma.len(), 10);
        assert_eq!(mb.len(), 10, "metrics after resume hold exactly one line per step");
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(x["step"], y["step"]);
            assert_eq!(x["loss"], y["loss"], "loss differs at step {}", x["step"]);
            assert_eq!(x["grad_norm"], y["grad_norm"]);
            // The per-group norms add up, in quadrature, to the global one.
            let g = &x["grad_norm_by_group"];
            let sum: f64 = ["lora", "old_rows", "new_rows"].iter().map(|k| g[*k].as_f64().unwrap().powi(2)).sum();
            let total = x["grad_norm"].as_f64().unwrap();
            assert!((sum.sqrt() - total).abs() <= 1e-9 * total.max(1.0), "{g} against {total}");
            assert!(g["lora"].as_f64().unwrap() > 0.0, "LoRA trains here: {g}");
        }
        let fa = std::fs::read(a.path().join("out/adapter/adapter_model.safetensors")).unwrap();
        let fb = std::fs::read(b.path().join("out/adapter/adapter_model.safetensors")).unwrap();
        assert!(fa == fb, "final adapters differ");
        let n = std::fs::read_dir(b.path().join("out/checkpoints")).unwrap().count();
        assert_eq!(n, 2, "keep_last = 2");
    }

    #[test]
    fn stop_and_resume_in_process_without_dropout() {
        let (_m_dir, m) = random_llama2_model();
        let a = tempfile::tempdir().unwrap();
        train(&TrainOptions { recipe: text_recipe_d(a.path(), &m, 6, "", 0.0), ..Default::default() }).unwrap();
        let b = tempfile::tempdir().unwrap();
        let rb = text_recipe_d(b.path(), &m, 6, "", 0.0);
        assert_eq!(train(&TrainOptions { recipe: rb.clone(), stop_after: Some(3), ..Default::default() }).unwrap().end_step, 3);
        assert!(train(&TrainOptions { recipe: rb.clone(), ..Default::default() }).is_err());
        assert_eq!(train(&TrainOptions { recipe: rb, resume: true, ..Default::default() }).unwrap().start_step, 2);
        let (ma, mb) = (metrics(&a.path().join("out")), metrics(&b.path().join("out")));
        assert_eq!(ma.len(), mb.len());
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(x["loss"], y["loss"], "loss differs at step {}", x["step"]);
        }
    }

    /// Waits until `out/metrics.jsonl` logs `n` steps (or two minutes, so that a run that failed
    /// early cannot hang the test), then calls `then`.
    fn after_steps(out: PathBuf, n: usize, then: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            while std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0) < n && t0.elapsed().as_secs() < 120 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            then()
        })
    }

    /// `TrainOptions::stop`, what Ctrl-C sets for the `train` command: the run ends at the next
    /// step boundary with a checkpoint there and an error that says how to resume, and the
    /// resumed run has the uninterrupted run's losses. Set before the first step, nothing is
    /// trained and the output folder the run made is gone.
    #[test]
    fn a_stop_request_checkpoints_its_step_and_resumes_exactly() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let (_m_dir, m) = random_llama2_model();
        // More steps than the test waits for: a stop that did not work ends in an Ok, not a hang.
        let steps = 400;
        let early = tempfile::tempdir().unwrap();
        let stop = Some(Arc::new(AtomicBool::new(true)));
        let err = train(&TrainOptions { recipe: text_recipe_d(early.path(), &m, steps, "", 0.0), stop, ..Default::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("before the first step"), "{err:#}");
        assert!(!early.path().join("out").exists(), "a run stopped before its first step leaves no folder");

        let b = tempfile::tempdir().unwrap();
        let rb = text_recipe_d(b.path(), &m, steps, "", 0.0);
        let flag = Arc::new(AtomicBool::new(false));
        let set = flag.clone();
        let watcher = after_steps(b.path().join("out"), 3, move || set.store(true, Ordering::SeqCst));
        let err = train(&TrainOptions { recipe: rb.clone(), stop: Some(flag), ..Default::default() }).unwrap_err();
        watcher.join().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("stopped by a signal after step") && msg.contains("--resume"), "{msg}");
        let k = metrics(&b.path().join("out")).len();
        assert!(k >= 3, "{k}");
        assert!(b.path().join(format!("out/checkpoints/step-{k:08}/adapter/adapter_model.safetensors")).exists(), "no checkpoint at step {k}");
        let rep = train(&TrainOptions { recipe: rb, resume: true, stop_after: Some(2), ..Default::default() }).unwrap();
        assert_eq!((rep.start_step, rep.end_step), (k, k + 2));

        let a = tempfile::tempdir().unwrap();
        train(&TrainOptions { recipe: text_recipe_d(a.path(), &m, steps, "", 0.0), stop_after: Some(k + 2), ..Default::default() }).unwrap();
        let (ma, mb) = (metrics(&a.path().join("out")), metrics(&b.path().join("out")));
        assert_eq!((ma.len(), mb.len()), (k + 2, k + 2));
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(x["loss"], y["loss"], "loss differs at step {}", x["step"]);
        }
    }

    /// The `train` command with SIGINT: the handler lets the step under way finish, writes its
    /// checkpoint and the command fails with how to resume (the library side is the test above).
    #[cfg(unix)]
    #[test]
    fn ctrl_c_stops_the_train_command_with_a_checkpoint() {
        use std::process::{Command, Stdio};
        let (_m_dir, m) = random_llama2_model();
        let d = tempfile::tempdir().unwrap();
        let r = text_recipe_d(d.path(), &m, 400, "", 0.0);
        let child = Command::new(env!("CARGO_BIN_EXE_linly-lora")).args(["train", "--quiet"]).arg(&r).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        // SAFETY: signals the child spawned above, which has not been waited for yet.
        after_steps(d.path().join("out"), 2, move || unsafe {
            libc::kill(pid, libc::SIGINT);
        })
        .join()
        .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("stopping after the step under way") && err.contains("stopped by a signal after step") && err.contains("--resume"), "{err}");
        let k = metrics(&d.path().join("out")).len();
        assert!(d.path().join(format!("out/checkpoints/step-{k:08}/state.json")).exists(), "no checkpoint at step {k}: {err}");
    }

    /// `[train] row_map_rank`: the first step is the plain run's (the map's `B` starts at zero),
    /// the steps after it are not, and a run stopped and resumed ends with the uninterrupted
    /// run's losses and adapter, byte for byte (the map's factors ride in the checkpoint).
    #[test]
    fn a_row_map_moves_training_after_its_first_step_and_resumes_exactly() {
        let recipe = |dir: &Path, map: bool| tiny_stage_recipe(dir, "cpu", "fp32", 0.0, 1e-2, if map { "steps = 6\nrow_map_rank = 4" } else { "steps = 6" });
        let plain = tempfile::tempdir().unwrap();
        train(&TrainOptions { recipe: recipe(plain.path(), false), ..Default::default() }).unwrap();
        let a = tempfile::tempdir().unwrap();
        train(&TrainOptions { recipe: recipe(a.path(), true), ..Default::default() }).unwrap();
        let (mp, ma) = (metrics(&plain.path().join("out")), metrics(&a.path().join("out")));
        assert_eq!(mp[0]["loss"], ma[0]["loss"], "step 1 runs the resized model in both");
        assert_ne!(mp[2]["loss"], ma[2]["loss"], "the map did not move the rows");
        let b = tempfile::tempdir().unwrap();
        let rb = recipe(b.path(), true);
        std::fs::write(&rb, std::fs::read_to_string(&rb).unwrap().replace("save_every = 100", "save_every = 2")).unwrap();
        assert_eq!(train(&TrainOptions { recipe: rb.clone(), stop_after: Some(3), ..Default::default() }).unwrap().end_step, 3);
        let ck = b.path().join("out/checkpoints/step-00000002/adapter");
        assert!(ck.join("vocab_extension.json").exists() && ck.join("recipe.toml").exists(), "a checkpoint's adapter carries the files beside its tensors");
        train(&TrainOptions { recipe: rb, resume: true, ..Default::default() }).unwrap();
        let mb = metrics(&b.path().join("out"));
        assert_eq!(ma.len(), mb.len());
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(x["loss"], y["loss"], "loss differs at step {}", x["step"]);
        }
        let fa = std::fs::read(a.path().join("out/adapter/adapter_model.safetensors")).unwrap();
        let fb = std::fs::read(b.path().join("out/adapter/adapter_model.safetensors")).unwrap();
        assert!(fa == fb, "final adapters differ after a resume");
    }

    /// `[train] minutes`: after its first eight steps a run plans the steps its budget holds. A
    /// budget that is already spent ends the run there, with its adapter and the plan in the
    /// metrics; one that holds every step changes nothing against the same recipe without it,
    /// also when the run is stopped after its plan and resumed (the checkpoint keeps the plan).
    #[test]
    fn a_time_budget_plans_where_the_run_ends() {
        let (_m_dir, m) = random_llama2_model();
        let recipe_with = |dir: &Path, minutes: Option<f64>| {
            let r = text_recipe_d(dir, &m, 14, "", 0.0);
            if let Some(x) = minutes {
                let t = std::fs::read_to_string(&r).unwrap().replace("steps = 14\n", &format!("steps = 14\nminutes = {x:e}\n"));
                std::fs::write(&r, t).unwrap();
            }
            r
        };
        let with_minutes = |dir: &Path, minutes: Option<f64>| train(&TrainOptions { recipe: recipe_with(dir, minutes), ..Default::default() }).unwrap();
        let spent = tempfile::tempdir().unwrap();
        let rep = with_minutes(spent.path(), Some(1e-6));
        assert_eq!((rep.end_step, rep.total_steps, rep.planned_steps), (8, 8, Some(8)));
        assert!(rep.adapter_dir.unwrap().join("adapter_model.safetensors").exists());
        let ms = metrics(&spent.path().join("out"));
        assert_eq!(ms.len(), 8);
        assert_eq!(ms[7]["plan"]["steps"], 8);
        assert_eq!(ms[7]["plan"]["upper"], 14);
        assert!(ms[..7].iter().all(|l| l.get("plan").is_none()));

        let ample = tempfile::tempdir().unwrap();
        let r = recipe_with(ample.path(), Some(1e6));
        assert_eq!(train(&TrainOptions { recipe: r.clone(), stop_after: Some(10), ..Default::default() }).unwrap().end_step, 10);
        let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ample.path().join("out/checkpoints/step-00000010/state.json")).unwrap()).unwrap();
        assert_eq!(st["planned_steps"], 14);
        let rep = train(&TrainOptions { recipe: r, resume: true, ..Default::default() }).unwrap();
        assert_eq!((rep.start_step, rep.end_step, rep.total_steps, rep.planned_steps), (10, 14, 14, Some(14)));
        let lines = metrics(&ample.path().join("out"));
        let plans: Vec<_> = lines.iter().filter(|l| l.get("plan").is_some()).map(|l| &l["step"]).collect();
        assert_eq!(plans, [8], "a plan that does not change is logged once");
        let none = tempfile::tempdir().unwrap();
        let rep = with_minutes(none.path(), None);
        assert_eq!((rep.end_step, rep.planned_steps), (14, None));
        let (ma, mn) = (metrics(&ample.path().join("out")), metrics(&none.path().join("out")));
        assert_eq!(ma.len(), 14);
        for (x, y) in ma.iter().zip(&mn) {
            assert_eq!((&x["loss"], &x["lr"]), (&y["loss"], &y["lr"]), "step {}", x["step"]);
        }
    }

    #[test]
    fn recipe_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = format!("[model]\npath = \"{}\"\n[[data]]\nkind = \"tokenized\"\npath = \"{}\"\n[output]\ndir = \"out\"\n", p(&tiny().join("base")), p(&fixture("data/tiny_ids.jsonl")));
        let cases: Vec<(String, &str)> = vec![
            (base.clone() + "[train]\nseq_len = 0\nbatch_size = 1\ngrad_accum = 1\nsteps = 1\nlr = 1e-3\nwarmup_ratio = 0.0\nschedule = \"cosine\"\nweight_decay = 0.0\nmax_grad_norm = 1.0\nseed = 1\n", "seq_len"),
            (base.clone() + "[lora]\nr = 0\n", "[lora] r"),
            (base.clone() + "[lora]\nrank = 8\n", "rank"),
            (base.clone() + "[lora]\ntargets = [\"qkv\"]\n", "qkv"),
            (base.clone() + "[trainable]\nembed_tokens = \"some\"\n", "embed_tokens"),
            (base.clone() + "[precision]\ndtype = \"fp8\"\n", "dtype"),
            (base.clone() + "[precision]\nscaler = \"magic\"\n", "scaler"),
            (base.clone() + "[vocab]\ninit = \"subtoken-mean\"\n", "[vocab]"),
            (base.clone() + "[vocab]\nextension = \"nope.json\"\n", "[vocab] extension"),
            (base.replace("tiny_ids.jsonl", "missing.jsonl"), "[[data]] #1 path"),
            (base.replace("kind = \"tokenized\"", "kind = \"poetry\""), "poetry"),
            (base.replace("[output]\ndir = \"out\"\n", ""), "output"),
            (base.clone() + "[[stage]]\nsteps = 0\n", "[[stage]] #1"),
            (base.clone() + "[train]\nminutes = 0.0\n", "[train] minutes"),
            (base.clone() + "[train]\nminutes = 10.0\n[[stage]]\nsteps = 2\n", "[train] minutes with [[stage]]"),
            (base.clone() + "[lora]\ninit_from = \"/nonexistent\"\n", "init_from"),
            // The fixture adapter is r 8 / alpha 16: continuing it under another [lora] would save the wrong scale.
            (base.clone() + &format!("[lora]\nr = 4\nalpha = 16\ninit_from = \"{}\"\n", p(&tiny().join("adapter"))), "holds r = 8, alpha = 16"),
            (base.replace(&p(&tiny().join("base")), "/nonexistent/model"), "[model] path"),
        ];
        for (i, (text, needle)) in cases.iter().enumerate() {
            let f = dir.path().join(format!("r{i}.toml"));
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", Recipe::load(&f).unwrap_err());
            assert!(e.contains(needle), "case {i}: error lacks `{needle}`: {e}");
        }
        // Weights that are all zero fail when the data is built, before any step.
        let f = dir.path().join("zero.toml");
        let with_ext = base.replace("[[data]]", &format!("[vocab]\nextension = \"{}\"\n[[data]]", p(&tiny().join("vocab_extension.json"))));
        std::fs::write(&f, with_ext.replace("kind = \"tokenized\"", "kind = \"tokenized\"\nweight = 0") + "[train]\nseq_len = 16\nbatch_size = 1\ngrad_accum = 1\nsteps = 1\nlr = 1e-3\nwarmup_ratio = 0.0\nschedule = \"cosine\"\nweight_decay = 0.0\nmax_grad_norm = 1.0\nseed = 1\n").unwrap();
        let e = format!("{:#}", train(&TrainOptions { recipe: f, ..Default::default() }).unwrap_err());
        assert!(e.contains("weight"), "{e}");
        assert!(!dir.path().join("out/metrics.jsonl").exists() || std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap().is_empty());
    }

    /// Packing is the default with or without a `[mix]` section (a derived Default once turned
    /// it off when the section was absent).
    #[test]
    fn packing_is_on_without_a_mix_section() {
        let base = "[model]\npath = \"m\"\n[[data]]\nkind = \"text\"\npath = \"t.txt\"\n[output]\ndir = \"o\"\n";
        let parse = |s: &str| toml::from_str::<Recipe>(s).unwrap();
        assert!(parse(base).mix.packing);
        assert!(parse(&format!("{base}[mix]\nbucketed = false\n")).mix.packing);
        assert!(!parse(&format!("{base}[mix]\npacking = false\n")).mix.packing);
    }

    #[test]
    fn shipped_recipes_parse() {
        for entry in std::fs::read_dir(fixture("../../recipes")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                // Real-model recipes point at folders made by the quickstart; parse their keys only.
                toml::from_str::<Recipe>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        Recipe::load(&fixture("../../recipes/tiny-cpu.toml")).unwrap();
    }
}

/// A forward pass that overflows fp16 because fresh rows are huge is not the loss scale's
/// fault: GradScaler halves the scale on every such step and never recovers; this crate's scaler
/// scales the outlier new rows down to the old rows' RMS, skips once with the scale kept, and
/// the next step trains.
#[test]
fn huge_new_rows_are_rescued_instead_of_halving_the_scale_forever() {
    use linly_lora::train::optim::{AdamW, AdamWConfig};
    use linly_lora::train::row_map::RowMaps;
    use linly_lora::train::scaler::{Scaler, ScalerConfig};
    use linly_lora::train::step::{train_step, StepHparams};
    let device = dev().autodiff();
    let hp = StepHparams { lr: 1e-3, lora_b_lr: 1e-3, embed_lr: 1e-3, weight_decay: 0.0, max_grad_norm: 1.0 };
    let blown_up = || {
        let base = Llama::load(&tiny().join("base"), &device, FloatType::F16).unwrap();
        let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
        set_table_modes(&mut model, TableMode::All, TableMode::All, 320).unwrap();
        for t in std::iter::once(&mut model.embed_tokens).chain(model.lm_head.as_mut()) {
            let e = t.extra.take().unwrap();
            let id = e.id;
            t.extra = Some(burn::module::Param::initialized(id, (e.val() * 1e6).detach().require_grad()));
        }
        model
    };
    let batch = [fixture_batch()];

    let mut model = blown_up();
    let (mut opt, mut scaler) = (AdamW::new(AdamWConfig::default()), Scaler::new(ScalerConfig::default()));
    let first = train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut scaler, &batch, &hp, &device).unwrap();
    assert!(!first.loss.is_finite(), "the test needs a non-finite forward pass, got loss {}", first.loss);
    assert!(first.skipped);
    assert!(first.events.iter().any(|e| e.contains("non-finite forward pass") && e.contains("scaled to the old rows' mean RMS")), "{:?}", first.events);
    assert_eq!(scaler.scale, 65536.0, "the scale is kept");
    let second = train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut scaler, &batch, &hp, &device).unwrap();
    assert!(second.loss.is_finite() && !second.skipped, "after the rescue the step trains: {second:?}");

    // GradScaler on the same model: every step skipped and halved.
    let mut model = blown_up();
    let (mut opt, mut naive) = (AdamW::new(AdamWConfig::default()), Scaler::new(ScalerConfig::naive()));
    for _ in 0..3 {
        let out = train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut naive, &batch, &hp, &device).unwrap();
        assert!(out.skipped && !out.loss.is_finite());
    }
    assert_eq!(naive.scale, 65536.0 / 8.0);
}

/// LoRA+ (`[train] loraplus_lr_ratio`): the B factors take `lr` times the ratio, the A factors
/// and the tables their own rates. AdamW's first step is `lr · g / (|g| + ε)` per value, so with
/// the same gradients B's update is the ratio times the plain one, and every other update is
/// unchanged.
#[test]
fn loraplus_scales_only_the_b_factors_update() {
    use linly_lora::train::optim::{AdamW, AdamWConfig};
    use linly_lora::train::params::trainable;
    use linly_lora::train::row_map::RowMaps;
    use linly_lora::train::scaler::{Scaler, ScalerConfig};
    use linly_lora::train::step::{train_step, StepHparams};
    use std::collections::BTreeMap;
    let device = dev().autodiff();
    let load = || {
        let base = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
        let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
        set_table_modes(&mut model, TableMode::NewRows, TableMode::NewRows, 320).unwrap();
        model
    };
    let values = |m: &mut Llama| -> BTreeMap<String, Vec<f32>> { trainable(m).into_iter().map(|p| (p.name, tensor_to_f32(p.param.val()))).collect() };
    let update = |ratio: f64| {
        let mut model = load();
        let before = values(&mut model);
        let hp = StepHparams { lr: 1e-3, lora_b_lr: 1e-3 * ratio, embed_lr: 2e-3, weight_decay: 0.0, max_grad_norm: 1.0 };
        let (mut opt, mut scaler) = (AdamW::new(AdamWConfig::default()), Scaler::new(ScalerConfig::default()));
        let out = train_step(&mut model, &mut opt, &mut RowMaps::default(), &mut scaler, &[fixture_batch()], &hp, &device).unwrap();
        assert!(!out.skipped);
        let after = values(&mut model);
        before.into_iter().map(|(k, b)| { let d = after[&k].iter().zip(&b).map(|(a, b)| a - b).collect::<Vec<f32>>(); (k, d) }).collect::<BTreeMap<_, _>>()
    };
    let (plain, plus) = (update(1.0), update(4.0));
    let mut kinds = [0usize; 3];
    for (name, d1) in &plain {
        let d4 = &plus[name];
        let moved = d1.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(moved > 1e-4, "{name} did not move ({moved})");
        let want = if name.contains("lora_B") { kinds[0] += 1; 4.0 } else { kinds[if name.contains("lora_A") { 1 } else { 2 }] += 1; 1.0 };
        for (a, b) in d4.iter().zip(d1) {
            assert!((a - want * b).abs() <= 1e-6 + 1e-3 * (want * b).abs(), "{name}: update {a} against {want} x {b}");
        }
    }
    assert!(kinds.iter().all(|&k| k > 0), "B, A and table parameters all checked: {kinds:?}");
}

/// `loss_by_source` in metrics.jsonl comes from the step's per-row NLL: on both loss paths
/// (fused in f32, composed in f16) the rows, concatenated over micro-batches, add up to the step
/// loss, and grouped by source they give each source's loss computed on its own.
#[test]
fn per_row_nll_adds_up_to_the_step_loss_and_splits_by_source() {
    use linly_lora::train::metrics::by_source;
    use linly_lora::train::optim::{AdamW, AdamWConfig};
    use linly_lora::train::row_map::RowMaps;
    use linly_lora::train::scaler::{Scaler, ScalerConfig};
    use linly_lora::train::step::{train_step, StepHparams};
    let device = dev().autodiff();
    let hp = StepHparams { lr: 1e-3, lora_b_lr: 1e-3, embed_lr: 1e-3, weight_decay: 0.0, max_grad_norm: 1.0 };
    let fx = fixture_batch();
    let row = |i: usize| MicroBatch::new(vec![fx.input_ids[i].clone()], vec![fx.labels[i].clone()]);
    let two = |a: usize, b: usize| MicroBatch::new(vec![fx.input_ids[a].clone(), fx.input_ids[b].clone()], vec![fx.labels[a].clone(), fx.labels[b].clone()]);
    for (dtype, tol) in [(FloatType::F32, 1e-4), (FloatType::F16, 5e-3)] {
        let load = || {
            let base = Llama::load(&tiny().join("base"), &device, dtype).unwrap();
            let mut model = apply(base, &tiny().join("adapter"), &device).unwrap();
            set_table_modes(&mut model, TableMode::All, TableMode::All, 320).unwrap();
            model
        };
        // Each row's mean NLL on its own, before any update.
        let alone: Vec<f64> = (0..2)
            .map(|i| {
                let (sums, n, _) = forward_backward(&mut load(), &[row(i)], 1.0, &device).unwrap();
                sums[0].clone().into_scalar::<f32>() as f64 / n as f64
            })
            .collect();
        // Two micro-batches, rows in swapped order in the second: source "a" is row 0, "b" row 1.
        let (mut opt, mut scaler) = (AdamW::new(AdamWConfig::default()), Scaler::new(ScalerConfig::default()));
        let out = train_step(&mut load(), &mut opt, &mut RowMaps::default(), &mut scaler, &[two(0, 1), two(1, 0)], &hp, &device).unwrap();
        assert_eq!(out.row_nll.len(), 4);
        assert_eq!(out.row_tokens.iter().sum::<usize>(), out.tokens);
        let sum: f64 = out.row_nll.iter().sum();
        assert!((sum - out.loss * out.tokens as f64).abs() <= 1e-5 * sum.abs(), "{dtype:?}: rows {sum} vs loss·tokens {}", out.loss * out.tokens as f64);
        let names = ["a".to_string(), "b".to_string()];
        let (loss, tokens) = by_source(&names, &[0, 1, 1, 0], &out.row_nll, &out.row_tokens);
        for (i, n) in names.iter().enumerate() {
            let got = loss[n].as_f64().unwrap();
            assert!((got - alone[i]).abs() <= tol * alone[i], "{dtype:?}: source {n}: {got} vs row alone {}", alone[i]);
            assert_eq!(tokens[n].as_u64().unwrap() as usize, 2 * fx.labels[i][1..].iter().filter(|&&l| l >= 0).count());
        }
    }
}

mod self_distillation {
    use super::common::*;
    use burn::module::Param;
    use burn::tensor::{Int, Tensor, TensorData};
    use linly_lora::io::safetensors::FloatType;
    use linly_lora::lora::{self, adapter::linears_mut, LoraInit, LoraSettings};
    use linly_lora::model::Llama;
    use linly_lora::train::step::{base_logits, forward_backward_rows, MicroBatch};

    fn with_lora(model: &mut Llama, device: &burn::tensor::Device) {
        let s = LoraSettings { r: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], init: LoraInit::Kaiming, seed: 3 };
        lora::inject(model, &s, device).unwrap();
    }

    fn batch(weight: f32) -> MicroBatch {
        // Old-vocabulary text only: the case the term is for (replay of what the base reads).
        let ids: Vec<Vec<u32>> = (0..2).map(|r| (0..12).map(|i| ((r * 97 + i * 31 + 5) % 320) as u32).collect()).collect();
        let labels = ids.iter().map(|row| row.iter().map(|&x| x as i64).collect()).collect();
        MicroBatch { self_distill: vec![weight, weight], ..MicroBatch::new(ids, labels) }
    }

    fn host_logits(model: &Llama, ids: &[Vec<u32>], device: &burn::tensor::Device) -> Vec<f64> {
        let flat: Vec<i64> = ids.iter().flatten().map(|&x| x as i64).collect();
        let t: Tensor<2, Int> = Tensor::from_data(TensorData::new(flat, [ids.len(), ids[0].len()]), device);
        model.forward(t, None).try_into_vec_as::<f32>().unwrap().into_iter().map(|x| x as f64).collect()
    }

    fn log_softmax(row: &[f64]) -> Vec<f64> {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        row.iter().map(|x| x - l).collect()
    }

    #[test]
    fn zero_when_the_model_is_the_base() {
        let device = dev().autodiff();
        let mut m = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
        // PEFT's init: B = 0, so the adapted model is the base.
        with_lora(&mut m, &device);
        let f = forward_backward_rows(&mut m, &[batch(1.0)], 1.0, &device).unwrap();
        let kd = f.kd.expect("rows with a weight run the teacher").into_scalar::<f32>();
        assert!(kd.abs() < 1e-5, "KL of the base against itself: {kd}");
        let none = forward_backward_rows(&mut m, &[batch(0.0)], 1.0, &device).unwrap();
        assert!(none.kd.is_none(), "no weight, no teacher pass");
    }

    #[test]
    fn teacher_is_the_base_and_the_value_is_the_weighted_kl() {
        let device = dev().autodiff();
        let base = Llama::load(&tiny().join("base"), &device, FloatType::F32).unwrap();
        let mut m = base.clone();
        with_lora(&mut m, &device);
        let mut g = linly_lora::rng::SplitMix::new(7);
        for (_, lin) in linears_mut(&mut m) {
            for br in lin.lora.iter_mut() {
                let shape = br.b.val().dims();
                // Seeded, so that every run checks the same model.
                let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| 0.2 * g.normal() as f32).collect();
                br.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), &device)).set_require_grad(true);
            }
        }
        let mb = batch(0.5);
        let (b, t) = (mb.input_ids.len(), mb.input_ids[0].len());
        let v = 320;
        let want_teacher = host_logits(&base, &mb.input_ids, &device);
        let flat: Vec<i64> = mb.input_ids.iter().flatten().map(|&x| x as i64).collect();
        let teacher: Vec<f64> = base_logits(&mut m, Tensor::from_data(TensorData::new(flat, [b, t]), &device)).try_into_vec_as::<f32>().unwrap().into_iter().map(|x| x as f64).collect();
        let err = teacher.iter().zip(&want_teacher).map(|(a, c)| (a - c).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "the teacher is the model without its LoRA branches: max diff {err}");
        let student = host_logits(&m, &mb.input_ids, &device);
        assert!(student.iter().zip(&want_teacher).any(|(a, c)| (a - c).abs() > 1e-3), "the adapted model must differ from the base");
        // Hand-computed: Σ_rows w Σ_{pos < T-1} KL(q ‖ p) in f64.
        let mut want = 0.0;
        for r in 0..b {
            for i in 0..t - 1 {
                let o = (r * t + i) * v;
                let lq = log_softmax(&want_teacher[o..o + v]);
                let lp = log_softmax(&student[o..o + v]);
                want += 0.5 * lq.iter().zip(&lp).map(|(q, p)| q.exp() * (q - p)).sum::<f64>();
            }
        }
        let f = forward_backward_rows(&mut m, &[mb], 1.0, &device).unwrap();
        let got = f.kd.unwrap().into_scalar::<f32>() as f64;
        assert!(want > 1e-3, "a changed model has a KL: {want}");
        assert!((got - want).abs() <= 1e-4 * want, "self-distillation sum {got} vs hand-computed {want}");
        // The LoRA branches are back after the teacher pass and get gradients from the term.
        assert!(linears_mut(&mut m).into_iter().any(|(_, l)| !l.lora.is_empty()));
        assert!(f.grads.keys().any(|k| k.contains("lora_B")), "{:?}", f.grads.keys().collect::<Vec<_>>());
    }
}

/// Checkpoints written on the writer's thread (what training does between its last steps) are
/// the files the training thread would have written, a failed write surfaces at the next wait
/// naming its step, and dropping the writer finishes the write in flight.
mod checkpoint_writer {
    use super::common::*;
    use linly_lora::io::safetensors::FloatType;
    use linly_lora::lora::adapter::apply;
    use linly_lora::lora::config::AdapterConfig;
    use linly_lora::lora::save::{encode as encode_adapter, TableSave};
    use linly_lora::lora::TableMode;
    use linly_lora::model::Llama;
    use linly_lora::train::checkpoint::{self, Pending, TrainState, Writer};
    use linly_lora::train::optim::{AdamW, AdamWConfig};
    use linly_lora::train::row_map::RowMaps;
    use linly_lora::train::scaler::{Scaler, ScalerConfig};
    use std::path::Path;

    fn pending(step: usize) -> Pending {
        let base = Llama::load(&tiny().join("base"), &dev(), FloatType::F32).unwrap();
        let model = apply(base, &tiny().join("adapter"), &dev()).unwrap();
        let cfg = AdapterConfig::load(&tiny().join("adapter")).unwrap();
        let adapter = encode_adapter(&model, &cfg, TableSave { embed: TableMode::All, lm_head: TableMode::All, old_vocab: 320, head_moved: vec![] }, &[]).unwrap();
        let state = TrainState { step, scaler: Scaler::new(ScalerConfig::default()), data: serde_json::json!({"at": step}), adam_t: Default::default(), recipe_hash: 7, planned_steps: None, planned_at: None };
        checkpoint::encode(&state, &AdamW::new(AdamWConfig::default()), &RowMaps::default(), adapter).unwrap()
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in walk(dir) {
            out.push((e.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&e).unwrap()));
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir).unwrap().flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
    }

    #[test]
    fn the_writer_thread_writes_what_the_training_thread_would() {
        let d = tempfile::tempdir().unwrap();
        let (here, there) = (d.path().join("here"), d.path().join("there"));
        let want = pending(4).write(&here, 2).unwrap();
        let mut w = Writer::default();
        w.submit(&there, 2, pending(4)).unwrap();
        let got = w.wait().unwrap().expect("a checkpoint was in flight");
        assert_eq!(got, checkpoint::dir_for(&there, 4));
        let (a, b) = (files(&want), files(&got));
        assert!(a.iter().any(|(n, _)| n.ends_with("adapter_model.safetensors")) && a.iter().any(|(n, _)| n == "state.json"), "{:?}", a.iter().map(|f| &f.0).collect::<Vec<_>>());
        assert!(a == b, "the two checkpoints differ");
        assert!(w.wait().unwrap().is_none(), "nothing left in flight");
        // Submitting waits for the one before; keep_last prunes on the writer's thread.
        for step in [5, 6, 7] {
            w.submit(&there, 2, pending(step)).unwrap();
        }
        w.wait().unwrap();
        assert_eq!(checkpoint::list(&there).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6, 7]);
    }

    #[test]
    fn a_failed_write_names_its_step_and_a_dropped_writer_finishes() {
        let d = tempfile::tempdir().unwrap();
        // `out` under a regular file: the checkpoints folder cannot be made.
        let blocked = d.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        let mut w = Writer::default();
        w.submit(&blocked.join("out"), 1, pending(9)).unwrap();
        let e = format!("{:#}", w.wait().unwrap_err());
        assert!(e.contains("step 9"), "{e}");
        let out = d.path().join("out");
        {
            let mut w = Writer::default();
            w.submit(&out, 1, pending(3)).unwrap();
        }
        assert_eq!(checkpoint::list(&out).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3], "the drop waited for the write");
    }
}

//! Hostile and careless input (issue #20), outputs: nothing overwritten. An existing `--out`
//! is refused and left byte-identical, an input is never its own output, `--force` replaces
//! only once the new output is complete, and debris of killed runs is cleaned up. The value
//! and file-content classes are in `hostile.rs`.

mod common;
use common::hostile::*;
use common::*;
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
/// `cmd` with `OUT` replaced by `out`; asserts it fails without panicking and returns stderr.
fn refused(cmd: &[&str], out: &Path) -> String {
    let args: Vec<&str> = cmd.iter().map(|a| if *a == "OUT" { s(out) } else { a }).collect();
    let (ok, _, err) = run_cli(&args, None);
    assert!(!ok, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}
/// The inputs of every command that writes `--out`, in a scratch folder so that a broken guard
/// could never touch the fixtures.
struct Inputs {
    dir: tempfile::TempDir,
}
impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        copy_dir(&tiny().join("base"), &p.join("base"));
        copy_dir(&tiny().join("adapter"), &p.join("adapter"));
        copy_dir(&fixture("llama2-tokenizer"), &p.join("tok"));
        std::fs::copy(tiny().join("vocab_extension.json"), p.join("vocab_extension.json")).unwrap();
        std::fs::write(p.join("words.txt"), "你好\n世界\n").unwrap();
        std::fs::write(p.join("calib.txt"), "hello world, hello again").unwrap();
        let (ok, _, err) = run_cli(&["export", "gguf", "--model", s(&p.join("base")), "--out", s(&p.join("m.gguf")), "--type", "f32"], None);
        assert!(ok, "{err}");
        Inputs { dir }
    }
    fn p(&self, rel: &str) -> String {
        s(&self.dir.path().join(rel)).to_string()
    }
    /// Every command that writes `--out`, with `OUT` in place of its output.
    fn commands(&self) -> Vec<Vec<String>> {
        let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        vec![
            v(&["merge", "--base", &self.p("base"), "--adapter", &self.p("adapter"), "--out", "OUT"]),
            v(&["adapter", "pack", "--adapter", &self.p("adapter"), "--out", "OUT"]),
            v(&["vocab", "extend", "--tokenizer", &self.p("tok"), "--add", &self.p("words.txt"), "--out", "OUT"]),
            v(&["vocab", "resize", "--model", &self.p("base"), "--extension", &self.p("vocab_extension.json"), "--out", "OUT"]),
            v(&["import", "gguf", &self.p("m.gguf"), "--out", "OUT"]),
            v(&["export", "gguf", "--model", &self.p("base"), "--out", "OUT"]),
            v(&["quantize", "--model", &self.p("base"), "--format", "q8_0", "--out", "OUT"]),
            v(&["imatrix", "--model", &self.p("base"), "--text", &self.p("calib.txt"), "--out", "OUT"]),
        ]
    }
}
#[test]
fn existing_out_is_refused_and_left_byte_identical() {
    let inputs = Inputs::new();
    let scratch = tempfile::tempdir().unwrap();
    let folder = scratch.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("unrelated.txt"), "not yours").unwrap();
    let file = scratch.path().join("file.bin");
    std::fs::write(&file, "not yours either").unwrap();
    let before = (snapshot(scratch.path()), snapshot(inputs.dir.path()));
    for cmd in inputs.commands() {
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        for out in [&folder, &file] {
            // Of the command's own kind: `--force` would replace it. Of the other kind: not even
            // `--force` would.
            let err = refused(&cmd, out);
            assert!(err.contains("--force") && (err.contains("already exists") || err.contains("and this command writes")), "{cmd:?} --out {}: {err}", out.display());
        }
    }
    assert!(before == (snapshot(scratch.path()), snapshot(inputs.dir.path())), "a refused command changed files");
}
#[test]
fn own_input_is_refused_even_with_force() {
    let inputs = Inputs::new();
    let before = snapshot(inputs.dir.path());
    for cmd in inputs.commands() {
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).chain(["--force"]).collect();
        // The command's input paths: the value after an input flag, and import's positional file.
        let mut targets: Vec<String> = cmd
            .windows(2)
            .filter(|w| ["--base", "--adapter", "--tokenizer", "--add", "--model", "--extension", "--text"].contains(&w[0]))
            .map(|w| w[1].to_string())
            .collect();
        if cmd[0] == "import" {
            targets.push(cmd[2].to_string());
        }
        // A file inside an input folder is the input too; so is the folder above an input.
        let files_inside: Vec<String> = targets
            .iter()
            .filter(|t| Path::new(t).is_dir())
            .map(|t| s(&std::fs::read_dir(t).unwrap().next().unwrap().unwrap().path()).to_string())
            .collect();
        targets.extend(files_inside);
        targets.push(s(inputs.dir.path()).to_string());
        for t in &targets {
            let err = refused(&cmd, Path::new(t));
            assert!(err.contains("even with --force"), "{cmd:?} --out {t}: {err}");
        }
    }
    assert!(before == snapshot(inputs.dir.path()), "a refused command changed its input");
}
/// `--force` replaces an existing output, file or folder, once the new one is complete; a folder
/// only when it is an earlier output, not a folder of the user's files.
#[test]
fn force_replaces_only_when_done() {
    let inputs = Inputs::new();
    let scratch = tempfile::tempdir().unwrap();
    let gguf = scratch.path().join("out.gguf");
    std::fs::write(&gguf, "old").unwrap();
    let (ok, _, err) = run_cli(&["export", "gguf", "--model", &inputs.p("base"), "--out", s(&gguf), "--force"], None);
    assert!(ok, "{err}");
    assert_eq!(&std::fs::read(&gguf).unwrap()[..4], b"GGUF");
    let packed = scratch.path().join("packed");
    std::fs::create_dir(&packed).unwrap();
    std::fs::write(packed.join("old.txt"), "old").unwrap();
    let (ok, _, err) = run_cli(&["adapter", "pack", "--adapter", &inputs.p("adapter"), "--out", s(&packed), "--force"], None);
    assert!(!ok && err.contains("holds no model, adapter or tokenizer (old.txt)"), "{err}");
    std::fs::write(packed.join("adapter_config.json"), "{}").unwrap();
    let (ok, _, err) = run_cli(&["adapter", "pack", "--adapter", &inputs.p("adapter"), "--out", s(&packed), "--force"], None);
    assert!(ok, "{err}");
    assert!(packed.join("adapter_model.safetensors").exists() && !packed.join("old.txt").exists());
    // A forced run that fails leaves the old output as it was.
    let before = snapshot(&packed);
    let (ok, _, _) = run_cli(&["adapter", "pack", "--adapter", &inputs.p("base"), "--out", s(&packed), "--force"], None);
    assert!(!ok);
    assert!(before == snapshot(&packed));
    let names: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "staging left behind: {names:?}");
}
/// What `kill -9` leaves: a staging folder of a dead process beside `--out`, and in a training
/// run's checkpoints a staging folder, an incomplete `step-*` and checkpoints beyond keep_last.
/// The next run removes them and says so; a live process's staging is left alone.
#[test]
fn debris_of_killed_runs_is_cleaned_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let out = dir.path().join("m.gguf");
    let stale = dir.path().join(format!(".m.gguf.tmp-{dead}-123"));
    std::fs::write(&stale, "half a gguf").unwrap();
    let live = dir.path().join(format!(".m.gguf.tmp-{}-123", std::process::id()));
    std::fs::write(&live, "someone else's work in progress").unwrap();
    let (ok, _, err) = run_cli(&["export", "gguf", "--model", s(&tiny().join("base")), "--out", s(&out)], None);
    assert!(ok, "{err}");
    assert!(!stale.exists() && live.exists(), "{err}");
    assert!(err.contains("removed") && err.contains(&format!("pid {dead}")), "{err}");

    // Training's checkpoints.
    let run = dir.path().join("run");
    let ck = run.join("checkpoints");
    for step in [1, 2, 3] {
        let d = ck.join(format!("step-{step:08}"));
        std::fs::create_dir_all(d.join("adapter")).unwrap();
        std::fs::write(d.join("state.json"), "{}").unwrap();
    }
    std::fs::create_dir_all(ck.join("step-00000004/adapter")).unwrap(); // half-deleted: no state.json
    std::fs::create_dir_all(ck.join(format!(".step-00000005.tmp-{dead}-1"))).unwrap();
    linly_lora::train::checkpoint::clean(&run, 2);
    let left: Vec<String> = std::fs::read_dir(&ck).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["step-00000002", "step-00000003"]);
}
/// Training's [output] dir: never a folder holding its inputs, and a new run never writes into
/// a folder holding files it did not write.
#[test]
fn train_output_dir_is_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_recipe(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let rp = dir.path().join("recipe.toml");
    std::fs::write(&rp, &base).unwrap();
    let before = snapshot(dir.path());
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("notes.txt"), "{err}");
    assert!(before == snapshot(dir.path()));
    // The recipe's own folder holds its data file.
    std::fs::write(&rp, base.replace("dir = \"out\"", "dir = \".\"")).unwrap();
    let before2 = snapshot(dir.path());
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("[output] dir") && err.contains("zh.txt"), "{err}");
    assert!(before2 == snapshot(dir.path()));
}

/// A finished run's folder whose checkpoints are gone is not trained over (its adapter would be
/// replaced without a word), and a recipe kept in its own [output] dir survives the run's copy
/// of it (copied onto itself, it used to be truncated to nothing).
#[test]
fn train_keeps_an_earlier_run_and_a_recipe_in_its_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let ids = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_ids.jsonl");
    let recipe = format!(
        "[model]\npath = \"{}\"\n[vocab]\nextension = \"{}\"\n[lora]\n[train]\nsteps = 2\nseq_len = 16\n[output]\ndir = \".\"\n[[data]]\nkind = \"tokenized\"\npath = \"{}\"\n",
        s(&tiny().join("base")),
        s(&tiny().join("vocab_extension.json")),
        s(&ids)
    );
    let rp = run.join("recipe.toml");
    std::fs::write(&rp, &recipe).unwrap();
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&rp).unwrap(), recipe, "the recipe in its own output folder");
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let before = snapshot(&run);
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("earlier run's outputs") && err.contains("adapter"), "{err}");
    assert!(before == snapshot(&run), "a refused run changed its folder");
}

/// Rows longer than the model's context are refused before anything runs, and the run that
/// failed before its first step leaves no [output] dir behind.
#[test]
fn train_refuses_rows_longer_than_the_context_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ids = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tiny_ids.jsonl");
    let recipe = format!(
        "[model]\npath = \"{}\"\n[lora]\n[train]\nsteps = 2\nseq_len = 100000\n[output]\ndir = \"out\"\n[[data]]\nkind = \"tokenized\"\npath = \"{}\"\n",
        s(&tiny().join("base")),
        s(&ids)
    );
    let rp = dir.path().join("recipe.toml");
    std::fs::write(&rp, &recipe).unwrap();
    let (ok, _, err) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && err.contains("seq_len = 100000") && err.contains("context"), "{err}");
    assert!(!dir.path().join("out").exists(), "a failed run left its folder");
    // Nor the folders it made on the way to a nested one.
    std::fs::write(&rp, recipe.replace("dir = \"out\"", "dir = \"made/on/the/way\"")).unwrap();
    let (ok, _, _) = run_cli(&["train", s(&rp), "--quiet"], None);
    assert!(!ok && !dir.path().join("made").exists(), "a failed run left the folders above its own");
}

//! Crash-safe writes: a reader either sees the old file (or none) or the complete new one,
//! never a prefix that parses as a smaller valid model.
//!
//! And the one rule for every command's `--out` ([`check_out`], [`write_out`]): a command never
//! replaces a path it did not create unless the user passed `--force`, and never one of its
//! own inputs, not even with `--force`. Staging names embed the writer's pid, so a later run
//! can tell a dead writer's debris from a live one's work ([`clean_stale`]).

use anyhow::{Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A sibling path in the same folder, so the final `rename` never crosses filesystems.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = format!(".{name}.tmp-{}-{}", std::process::id(), nanos());
    path.with_file_name(tmp)
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Writes `bytes` to `path` through a temp file + fsync + rename.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write()`], with the content produced by a callback that streams into the file.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut fs::File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Where `p` is, symlinks resolved, also when `p` does not exist yet (its nearest existing
/// ancestor is resolved and the rest appended), so `a/../b`, `./b` and a link to `b` compare equal.
fn resolved(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return rest.iter().rev().fold(c, |acc: PathBuf, part| acc.join(part));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether two existing paths are the same file (hard links included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The outermost folder on the way to `dir` that does not exist yet (`dir` itself when only it is
/// missing): what creating `dir` makes, and so what a command that fails may remove again.
pub fn outermost_missing(dir: &Path) -> Option<PathBuf> {
    if dir.symlink_metadata().is_ok() {
        return None;
    }
    let mut top = dir.to_path_buf();
    while let Some(parent) = top.parent() {
        if parent.as_os_str().is_empty() || parent.symlink_metadata().is_ok() {
            break;
        }
        top = parent.to_path_buf();
    }
    Some(top)
}

/// Runs `f`, which creates `dir` as it goes; when it fails, removes the folders it made on the
/// way to `dir` ([`outermost_missing`]) unless `keep(dir)` says that what is there explains the
/// failure. A command that fails leaves no folder of its own behind, only its error.
pub fn remove_made_on_error<T>(dir: &Path, keep: impl FnOnce(&Path) -> bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let made = outermost_missing(dir);
    let result = f();
    if let (Err(_), Some(top)) = (&result, &made) {
        if !keep(dir) {
            let _ = fs::remove_dir_all(top);
        }
    }
    result
}

/// What a command writes at its `--out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    File,
    Folder,
}

impl OutKind {
    fn name(self) -> &'static str {
        match self {
            OutKind::File => "a file",
            OutKind::Folder => "a folder",
        }
    }
}

/// The `--out` rule, checked before any work: `out` may not be one of `inputs`, hold one of
/// them (replacing a folder deletes what is inside), or be an existing path inside one (even
/// with `force`); it may not exist at all unless `force`, and `force` replaces only a path of
/// the `kind` the command writes (a folder that a file would replace may hold anything). Also
/// removes what dead earlier runs left staged beside `out` ([`clean_stale`]).
pub fn check_out(out: &Path, inputs: &[&Path], force: bool, kind: OutKind) -> Result<()> {
    check_not_input(out, inputs)?;
    let out_r = resolved(out);
    let meta = out.symlink_metadata().ok();
    for input in inputs {
        let in_r = resolved(input);
        if meta.is_some() && out_r.starts_with(&in_r) {
            anyhow::bail!("--out {} is a file of the input {}: replacing it would change the input (even with --force); choose a new name", out.display(), input.display());
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if parent.exists() && !parent.is_dir() {
            anyhow::bail!("--out {}: {} is a file, not a folder; choose an --out inside a folder", out.display(), parent.display());
        }
    }
    if kind == OutKind::File && out.as_os_str().to_string_lossy().ends_with('/') {
        anyhow::bail!("--out {} ends with a slash, which names a folder; this command writes a file: name the file", out.display());
    }
    clean_stale(out);
    let Some(meta) = meta else { return Ok(()) };
    let found = if fs::metadata(out).map(|m| m.is_dir()).unwrap_or(meta.is_dir()) { OutKind::Folder } else { OutKind::File };
    if found != kind {
        anyhow::bail!(
            "{} is {} and this command writes {}: --force replaces only {} (it would delete what is there); choose another --out, or remove it yourself",
            out.display(),
            found.name(),
            kind.name(),
            kind.name()
        );
    }
    if !force {
        anyhow::bail!("{} already exists: choose another --out, or pass --force to replace it", out.display());
    }
    if kind == OutKind::Folder {
        check_replaceable_folder(out)?;
    }
    Ok(())
}

/// What marks a folder as one a command wrote: a model, an adapter or a tokenizer.
const OUTPUT_MARKERS: [&str; 4] = ["config.json", "adapter_config.json", "tokenizer.json", "vocab_extension.json"];

/// `--force` replaces a folder only when it is empty or an earlier output (it holds a model,
/// an adapter or a tokenizer): a folder of other files is the user's, not a result to redo.
fn check_replaceable_folder(out: &Path) -> Result<()> {
    let names: Vec<String> = fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() || names.iter().any(|n| OUTPUT_MARKERS.contains(&n.as_str())) {
        return Ok(());
    }
    let mut shown: Vec<&str> = names.iter().map(String::as_str).collect();
    shown.sort_unstable();
    shown.truncate(5);
    anyhow::bail!(
        "{} holds no model, adapter or tokenizer ({}{}): --force replaces only an earlier output; choose another --out",
        out.display(),
        shown.join(", "),
        if names.len() > 5 { ", …" } else { "" }
    )
}

/// The part of [`check_out`] for outputs that are written into rather than replaced (training's
/// `[output] dir`): `out` may be neither one of `inputs` nor a folder holding one.
pub fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    let out_r = resolved(out);
    for input in inputs {
        let in_r = resolved(input);
        if in_r == out_r || same_file(input, out) {
            anyhow::bail!("--out {} is the input {}: writing it would destroy what is being read (even with --force); choose another --out", out.display(), input.display());
        }
        if in_r.starts_with(&out_r) {
            anyhow::bail!("--out {} holds the input {}: replacing it would delete the input (even with --force); choose another --out", out.display(), input.display());
        }
    }
    Ok(())
}

/// Runs `make` to write a command's output at `out` under the [`check_out`] rule. When `out`
/// exists and `force` is given, `make` writes a staging path beside it, and the old output is
/// swapped out only once the new one is complete: a failed or killed run leaves it untouched.
/// `make` must refuse an existing path itself (it is given a fresh one).
pub fn write_out<T>(out: &Path, inputs: &[&Path], force: bool, kind: OutKind, make: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    check_out(out, inputs, force, kind)?;
    if out.symlink_metadata().is_err() {
        return make(out);
    }
    let tmp = temp_sibling(out);
    match make(&tmp) {
        Ok(v) => {
            replace(&tmp, out)?;
            Ok(v)
        }
        Err(e) => {
            remove_any(&tmp);
            Err(e)
        }
    }
}

/// Puts `new` in place of the existing `old`, with the old moved aside first so that a failed
/// rename can be undone.
fn replace(new: &Path, old: &Path) -> Result<()> {
    let aside = temp_sibling(old);
    fs::rename(old, &aside).with_context(|| format!("cannot move {} aside to replace it", old.display()))?;
    if let Err(e) = fs::rename(new, old) {
        let _ = fs::rename(&aside, old);
        remove_any(new);
        return Err(e).with_context(|| format!("cannot rename {} to {}", new.display(), old.display()));
    }
    remove_any(&aside);
    Ok(())
}

fn remove_any(p: &Path) {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// The pid a staging name ([`temp_sibling`], possibly nested) of `name` (of anything when
/// `None`) embeds, if `entry` is one.
fn staging_pid(entry: &str, name: Option<&str>) -> Option<i32> {
    let hidden = entry.strip_prefix('.')?.trim_start_matches('.');
    let rest = match name {
        Some(n) => hidden.strip_prefix(n)?.strip_prefix(".tmp-")?,
        None => &hidden[hidden.find(".tmp-")? + ".tmp-".len()..],
    };
    rest.split('-').next()?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes staging files and folders of `path` ([`temp_sibling`] names) whose writer is no
/// longer running: what a `kill -9` or power loss left behind. A live writer's are kept (a
/// recycled pid only delays the cleanup). Says on stderr what it removed; returns the count.
pub fn clean_stale(path: &Path) -> usize {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return 0 };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    clean_stale_in(parent, Some(&name))
}

/// [`clean_stale`] for every staging name in `dir` (of `name` only, when given): for folders
/// that only this program writes into, such as a run's `checkpoints/`.
pub fn clean_stale_in(dir: &Path, name: Option<&str>) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        match staging_pid(&entry, name) {
            Some(pid) if pid != std::process::id() as i32 && !pid_alive(pid) => {
                remove_any(&e.path());
                eprintln!("removed {}: left by an earlier run (pid {pid}) that did not finish", e.path().display());
                n += 1;
            }
            _ => {}
        }
    }
    n
}

/// A folder that becomes `final_dir` only when [`StagedDir::commit`] is called. Dropped
/// without commit, it removes itself, so a failed run leaves no output folder behind.
pub struct StagedDir {
    tmp: PathBuf,
    final_dir: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the staging folder beside `final_dir`. Refuses to overwrite an existing folder
    /// unless `overwrite` is set, in which case the old one is replaced at commit.
    pub fn new(final_dir: &Path, overwrite: bool) -> Result<Self> {
        if final_dir.exists() && !overwrite {
            anyhow::bail!("{} already exists: choose another --out, or pass --force to replace it", final_dir.display());
        }
        let parent = final_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = temp_sibling(final_dir);
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(StagedDir { tmp, final_dir: final_dir.to_path_buf(), committed: false })
    }

    /// Where to write the content.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.final_dir.exists() {
            let old = temp_sibling(&self.final_dir);
            fs::rename(&self.final_dir, &old)?;
            fs::rename(&self.tmp, &self.final_dir)?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.tmp, &self.final_dir)
                .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.final_dir.display()))?;
        }
        self.committed = true;
        Ok(self.final_dir.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_and_their_pids() {
        let p = Path::new("/x/out");
        let t = temp_sibling(p);
        let t = t.file_name().unwrap().to_str().unwrap();
        let me = std::process::id() as i32;
        assert_eq!(staging_pid(t, Some("out")), Some(me));
        assert_eq!(staging_pid(t, None), Some(me));
        assert_eq!(staging_pid(&format!(".{t}.tmp-7-1"), Some("out")), Some(me), "nested staging");
        assert_eq!(staging_pid(t, Some("ou")), None);
        assert_eq!(staging_pid("out", Some("out")), None);
        assert_eq!(staging_pid(".out.tmp-x-1", Some("out")), None);
    }

    #[test]
    fn stale_staging_of_a_dead_writer_is_removed_and_a_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        // A child that has exited: its pid is (for the moment) free.
        let dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        let mut dead = dead;
        dead.wait().unwrap();
        let stale = root.path().join(format!(".out.tmp-{dead_pid}-1"));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("model.safetensors"), b"half").unwrap();
        let live = temp_sibling(&out);
        fs::write(&live, b"mine").unwrap();
        let unrelated = root.path().join(".other.tmp-1-1");
        fs::write(&unrelated, b"x").unwrap();
        assert_eq!(clean_stale(&out), 1);
        assert!(!stale.exists() && live.exists() && unrelated.exists());
    }

    #[test]
    fn outermost_missing_is_what_creating_makes() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(outermost_missing(root.path()), None);
        let deep = root.path().join("a/b/c");
        assert_eq!(outermost_missing(&deep), Some(root.path().join("a")));
        fs::create_dir_all(root.path().join("a/b")).unwrap();
        assert_eq!(outermost_missing(&deep), Some(deep.clone()));
        assert_eq!(outermost_missing(Path::new("surely-not-here-42")), Some(PathBuf::from("surely-not-here-42")));
    }

    #[test]
    fn check_out_rules() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        fs::create_dir(&input).unwrap();
        fs::write(input.join("model.safetensors"), b"x").unwrap();
        let new = root.path().join("new");
        check_out(&new, &[&input], false, OutKind::Folder).unwrap();
        check_out(&input.join("model.gguf"), &[&input], false, OutKind::File).expect("a new file inside an input folder is fine");
        for (out, force) in [(&input, true), (&root.path().to_path_buf(), true), (&input.join("model.safetensors"), true), (&input.join("..").join("in"), true)] {
            let e = format!("{:#}", check_out(out, &[&input], force, OutKind::Folder).unwrap_err());
            assert!(e.contains("even with --force"), "{}: {e}", out.display());
        }
        let other = root.path().join("other");
        fs::write(&other, b"y").unwrap();
        assert!(format!("{:#}", check_out(&other, &[&input], false, OutKind::File).unwrap_err()).contains("--force"));
        check_out(&other, &[&input], true, OutKind::File).unwrap();
        // --force swaps a file for a file and a folder for a folder, never one for the other:
        // a folder replaced by a file loses everything in it.
        let e = format!("{:#}", check_out(&other, &[&input], true, OutKind::Folder).unwrap_err());
        assert!(e.contains("is a file and this command writes a folder"), "{e}");
        let project = root.path().join("project");
        fs::create_dir(&project).unwrap();
        fs::write(project.join("notes.txt"), b"mine").unwrap();
        for force in [false, true] {
            let e = format!("{:#}", check_out(&project, &[&input], force, OutKind::File).unwrap_err());
            assert!(e.contains("is a folder and this command writes a file"), "{e}");
        }
        // Nor does it replace a folder of the user's files with a model: only an earlier output.
        let e = format!("{:#}", check_out(&project, &[&input], true, OutKind::Folder).unwrap_err());
        assert!(e.contains("holds no model, adapter or tokenizer (notes.txt)"), "{e}");
        fs::write(project.join("config.json"), b"{}").unwrap();
        check_out(&project, &[&input], true, OutKind::Folder).unwrap();
        let e = format!("{:#}", check_out(&root.path().join("new.gguf/"), &[&input], false, OutKind::File).unwrap_err());
        assert!(e.contains("ends with a slash"), "{e}");
        let e = format!("{:#}", check_out(&other.join("m"), &[&input], false, OutKind::Folder).unwrap_err());
        assert!(e.contains("is a file, not a folder"), "{e}");
        // A hard link to the input is the input.
        let link = root.path().join("link");
        fs::hard_link(input.join("model.safetensors"), &link).unwrap();
        assert!(check_out(&link, &[&input.join("model.safetensors")], true, OutKind::File).is_err());
    }

    #[test]
    fn staged_dir_vanishes_without_commit() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        {
            let s = StagedDir::new(&out, false).unwrap();
            write(&s.path().join("a.txt"), b"x").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0, "staging folder left behind");
        let s = StagedDir::new(&out, false).unwrap();
        write(&s.path().join("a.txt"), b"y").unwrap();
        s.commit().unwrap();
        assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"y");
        assert!(StagedDir::new(&out, false).is_err());
    }
}

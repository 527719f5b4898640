//! Crash-safe writes: a reader either sees the old file (or none) or the complete new one,
//! never a prefix that parses as a smaller valid model.

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
            anyhow::bail!("{} already exists: choose another --out or remove it first", final_dir.display());
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

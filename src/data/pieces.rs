//! The pieces a source is packed from (see `pack.rs`), its documents cut to at most `seq_len`
//! tokens ([`for_each_segment`]): in memory for in-memory sources, and
//! for a token store in a piece table beside it, so a corpus of any size costs the mixer no
//! more RAM than its shuffled order (4 bytes a piece). The table is read with positioned reads,
//! not a map: lookups land at random, and the page cache maps file pages in large folios (up
//! to 2 MiB a fault), so a map would keep tens of MB resident for 16-byte entries.
//!
//! # Piece table (version [`VERSION`], little-endian)
//!
//! Named `{store file}.pieces-{seq_len}`. Header of 48 bytes: magic `LLPIECE\x01`, version
//! u32, seq_len u32, pieces u64, the store's body checksum u64 (the table belongs to that exact
//! content), the entries' checksum u64, the checksum of bytes 0..40 u64. Then per piece: start
//! u64, length u64 (tokens of the store). Written under a staging name and renamed; a table that
//! fails any check is rebuilt from the store.

use super::store::{Hasher, Store};
use super::tokenize::Tokens;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Version of the layout above.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"LLPIECE\x01";
const HEADER: usize = 48;

/// A packable piece of a document: `len` tokens of a source's [`Tokens`] from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: usize,
    pub len: usize,
}

/// Cuts a source's documents into pieces of at most `seq_len` (≥ 2) tokens, in order.
pub(crate) fn for_each_segment(docs: &Tokens, seq_len: usize, mut f: impl FnMut(Segment) -> anyhow::Result<()>) -> anyhow::Result<()> {
    debug_assert!(seq_len >= 2);
    let keep = |s: &Segment| docs.any_loss(s.start + 1, s.start + s.len);
    for d in 0..docs.len() {
        docs.scanned(d);
        let (a, b) = docs.bounds(d);
        if b - a < 2 {
            continue;
        }
        let mut start = a;
        loop {
            let end = (start + seq_len).min(b);
            let s = Segment { start, len: end - start };
            if keep(&s) {
                f(s)?;
            }
            if end == b {
                break;
            }
            start = end - 1;
        }
    }
    // The scan touched the whole index; training needs none of it resident.
    docs.release();
    Ok(())
}

/// [`for_each_segment`] collected.
pub(crate) fn segments(docs: &Tokens, seq_len: usize) -> Vec<Segment> {
    let mut out = Vec::with_capacity(docs.len());
    for_each_segment(docs, seq_len, |s| {
        out.push(s);
        Ok(())
    })
    .expect("collecting cannot fail");
    out
}

/// A source's packable pieces, in document order.
pub(crate) enum Pieces {
    Memory(Vec<Segment>),
    Table(PieceTable),
}

impl Pieces {
    pub(crate) fn len(&self) -> usize {
        match self {
            Pieces::Memory(v) => v.len(),
            Pieces::Table(t) => t.n,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, i: usize) -> Segment {
        match self {
            Pieces::Memory(v) => v[i],
            Pieces::Table(t) => t.get(i),
        }
    }
}

/// An open, verified piece table.
pub(crate) struct PieceTable {
    file: File,
    path: PathBuf,
    n: usize,
}

fn entry(e: &[u8]) -> Segment {
    let word = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes")) as usize;
    Segment { start: word(0), len: word(8) }
}

impl PieceTable {
    fn get(&self, i: usize) -> Segment {
        use std::os::unix::fs::FileExt;
        let mut e = [0u8; 16];
        // The file was verified when opened and is only ever replaced by rename, so a failed
        // read here is a failing disk, not bad data.
        if let Err(err) = self.file.read_exact_at(&mut e, (HEADER + 16 * i) as u64) {
            panic!("cannot read the piece table {}: {err}; check the disk, or delete the file to rebuild it", self.path.display());
        }
        entry(&e)
    }
}

/// The table's file for `store` and `seq_len`.
pub(crate) fn table_path(store: &Path, seq_len: usize) -> PathBuf {
    let mut name = store.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".pieces-{seq_len}"));
    store.with_file_name(name)
}

/// The pieces of `docs` for rows of `seq_len`: a store's from its table (built on first use).
pub(crate) fn pieces(docs: &Tokens, seq_len: usize) -> Result<Pieces> {
    let Tokens::Stored(store) = docs else {
        return Ok(Pieces::Memory(segments(docs, seq_len)));
    };
    let path = table_path(store.path(), seq_len);
    match open(&path, store, seq_len) {
        Ok(t) => return Ok(Pieces::Table(t)),
        Err(e) if path.exists() => eprintln!("[data] the piece table {} cannot be used ({e:#}); rebuilding it", path.display()),
        Err(_) => {}
    }
    write(&path, docs, store, seq_len).with_context(|| format!("writing the piece table {}; check the folder is writable", path.display()))?;
    open(&path, store, seq_len).map(Pieces::Table).with_context(|| format!("the piece table {} just written does not verify; check the disk", path.display()))
}

fn header(seq_len: usize, n: u64, store_ck: u64, entries_ck: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(seq_len as u32).to_le_bytes());
    h.extend_from_slice(&n.to_le_bytes());
    h.extend_from_slice(&store_ck.to_le_bytes());
    h.extend_from_slice(&entries_ck.to_le_bytes());
    let mut ck = Hasher::default();
    ck.update(&h);
    h.extend_from_slice(&ck.finish().to_le_bytes());
    h
}

fn write(path: &Path, docs: &Tokens, store: &Store, seq_len: usize) -> Result<()> {
    let tmp = crate::io::atomic::temp_sibling(path);
    let res = (|| -> Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
        w.write_all(&[0u8; HEADER])?;
        let (mut n, mut ck) = (0u64, Hasher::default());
        for_each_segment(docs, seq_len, |s| {
            let mut e = [0u8; 16];
            e[..8].copy_from_slice(&(s.start as u64).to_le_bytes());
            e[8..].copy_from_slice(&(s.len as u64).to_le_bytes());
            ck.update(&e);
            n += 1;
            w.write_all(&e).map_err(Into::into)
        })?;
        let mut f = w.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header(seq_len, n, store.checksum(), ck.finish()))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn open(path: &Path, store: &Store, seq_len: usize) -> Result<PieceTable> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = [0u8; HEADER];
    f.read_exact(&mut h).context("truncated header")?;
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if &h[..8] != MAGIC || h[8..12] != VERSION.to_le_bytes() {
        bail!("not a piece table of version {VERSION}");
    }
    let n = u64_at(16);
    if header(seq_len, n, store.checksum(), u64_at(32)) != h {
        bail!("made for another store or seq_len (stale), or corrupt header");
    }
    if n.checked_mul(16).and_then(|b| b.checked_add(HEADER as u64)) != Some(len) {
        bail!("{len} bytes where the header says {} pieces (truncated or corrupt)", n);
    }
    // One pass checks the checksum and that every entry lies inside the store (a checksum-
    // valid table breaks that only through a bug, but must not index out of bounds).
    let mut ck = Hasher::default();
    let mut chunk = vec![0u8; 1 << 20];
    let (mut carry, mut i) = (Vec::with_capacity(16), 0usize);
    loop {
        let k = f.read(&mut chunk)?;
        if k == 0 {
            break;
        }
        ck.update(&chunk[..k]);
        let mut rest = &chunk[..k];
        if !carry.is_empty() {
            let take = (16 - carry.len()).min(rest.len());
            carry.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if carry.len() < 16 {
                continue;
            }
            check_entry(&entry(&carry), i, store)?;
            i += 1;
            carry.clear();
        }
        let mut entries = rest.chunks_exact(16);
        for e in &mut entries {
            check_entry(&entry(e), i, store)?;
            i += 1;
        }
        carry.extend_from_slice(entries.remainder());
    }
    if ck.finish() != u64_at(32) {
        bail!("checksum mismatch (corrupt)");
    }
    Ok(PieceTable { file: f, path: path.to_path_buf(), n: n as usize })
}

fn check_entry(s: &Segment, i: usize, store: &Store) -> Result<()> {
    if s.len < 2 || s.start.checked_add(s.len).is_none_or(|e| e > store.tokens()) {
        bail!("piece {i} lies outside the store (corrupt)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::StoreWriter;
    use std::sync::Arc;

    fn store(dir: &Path) -> Tokens {
        let p = dir.join("s.tok");
        let mut w = StoreWriter::create(&p, "k", 1000).unwrap();
        for n in [3usize, 40, 1, 9, 17] {
            let ids: Vec<u32> = (0..n as u32).collect();
            let loss: Vec<bool> = (0..n).map(|k| k > 0).collect();
            w.push(&ids, &loss).unwrap();
        }
        w.push(&[5, 6, 7], &[false, false, false]).unwrap();
        w.finish().unwrap();
        Tokens::Stored(Arc::new(Store::open(&p, "k").unwrap()))
    }

    fn all(p: &Pieces) -> Vec<Segment> {
        (0..p.len()).map(|i| p.get(i)).collect()
    }

    #[test]
    fn the_table_holds_the_in_memory_pieces_and_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let docs = store(d.path());
        let mem = segments(&Tokens::Memory(docs.to_docs()), 8);
        let p = pieces(&docs, 8).unwrap();
        assert!(matches!(p, Pieces::Table(_)));
        assert_eq!(all(&p), mem);
        assert_eq!(mem.len(), 1 + 6 + 2 + 3);
        let path = table_path(&d.path().join("s.tok"), 8);
        let t0 = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(all(&pieces(&docs, 8).unwrap()), mem);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), t0, "a valid table is not rewritten");
        // Another seq_len has its own table.
        assert_eq!(all(&pieces(&docs, 5).unwrap()), segments(&Tokens::Memory(docs.to_docs()), 5));
    }

    #[test]
    fn a_corrupt_or_truncated_table_is_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        let docs = store(d.path());
        let want = all(&pieces(&docs, 8).unwrap());
        let path = table_path(&d.path().join("s.tok"), 8);
        let good = std::fs::read(&path).unwrap();
        let Tokens::Stored(s) = &docs else { unreachable!() };
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x04;
            std::fs::write(&path, &b).unwrap();
            assert!(open(&path, s, 8).is_err(), "byte {i} flipped went unnoticed");
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(open(&path, s, 8).is_err());
        assert_eq!(all(&pieces(&docs, 8).unwrap()), want);
        assert_eq!(std::fs::read(&path).unwrap(), good, "rebuilt identically");
    }
}

//! The token store: one file per tokenized source, read by training through a memory map, so
//! that a corpus larger than RAM trains in constant memory.
//!
//! # Format (version [`VERSION`], little-endian, every section 8-byte aligned)
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `LLTOKST\x01` |
//! | 8 | version u32 |
//! | 12 | id width in bytes u32: 2 when every id of the vocabulary fits in u16, else 4 |
//! | 16 | documents u64 |
//! | 24 | tokens u64 |
//! | 32 | loss spans u64 |
//! | 40 | key length u32, then u32 0 |
//! | 48 | header checksum u64: bytes 0..48 and the padded key |
//! | 56 | body checksum u64: every byte after the header |
//! | 64 | key text (see `cache.rs`), zero-padded to 8 bytes |
//! | ids | tokens × width, zero-padded to 8 bytes |
//! | offsets | (documents + 1) × u64: document `d` is tokens `offsets[d]..offsets[d + 1]` |
//! | spans | spans × (start u64, end u64): the tokens whose label is the token itself |
//!
//! Label masks are stored as spans because they are runs (a text document is one run, an
//! instruction example one run on its answer): 16 bytes a document instead of one a token.
//! Spans are sorted, non-empty, and never cross a document boundary.
//!
//! The file's length follows from the header, so a truncated file is caught before anything is
//! mapped; a flipped byte anywhere is caught by the checksums, which [`Store::open`] verifies
//! with ordinary reads (reading through the map would leave the whole file resident). A store
//! that fails any check is an error for the caller, who rebuilds it; files are written under a
//! staging name and renamed, so a killed writer never leaves a half store under the real name.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Version of the layout above; bump it with any change.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"LLTOKST\x01";
const FIXED: usize = 64;
/// Pieces read through the map between two releases of its pages (see [`Store::touch`]).
const RELEASE_EVERY: usize = 8;

/// Word-at-a-time checksum. Each step `(h ^ w) * K` rotated is a bijection of `h` for a given
/// word and of the word for a given `h`, so a file that differs in any one 8-byte word always
/// has another checksum; fast enough to check gigabytes at disk speed.
#[derive(Clone)]
pub(crate) struct Hasher {
    h: u64,
    tail: [u8; 8],
    n_tail: usize,
    len: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher { h: 0x243F6A8885A308D3, tail: [0; 8], n_tail: 0, len: 0 }
    }
}

impl Hasher {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x9E3779B97F4A7C15).rotate_left(31);
    }

    pub(crate) fn update(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if self.n_tail > 0 {
            let k = (8 - self.n_tail).min(b.len());
            self.tail[self.n_tail..self.n_tail + k].copy_from_slice(&b[..k]);
            self.n_tail += k;
            b = &b[k..];
            if self.n_tail < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.tail));
            self.n_tail = 0;
        }
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.n_tail = rest.len();
    }

    pub(crate) fn finish(mut self) -> u64 {
        if self.n_tail > 0 {
            self.tail[self.n_tail..].fill(0);
            self.word(u64::from_le_bytes(self.tail));
        }
        let len = self.len;
        self.word(len);
        self.h
    }
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Where each section starts, from the header's counts; `None` when they overflow (a corrupt
/// header must not make us allocate or map absurd sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub header: usize,
    pub ids: usize,
    pub offsets: usize,
    pub spans: usize,
    pub len: usize,
}

pub(crate) fn layout(key_len: usize, width: usize, docs: u64, tokens: u64, spans: u64) -> Option<Layout> {
    let header = FIXED.checked_add(pad8(key_len))?;
    let id_bytes = usize::try_from(tokens).ok()?.checked_mul(width)?;
    let offsets = header.checked_add(id_bytes.checked_next_multiple_of(8)?)?;
    let spans_at = offsets.checked_add(usize::try_from(docs).ok()?.checked_add(1)?.checked_mul(8)?)?;
    let len = spans_at.checked_add(usize::try_from(spans).ok()?.checked_mul(16)?)?;
    Some(Layout { header, ids: header, offsets, spans: spans_at, len })
}

/// The id width for a vocabulary of `vocab` tokens.
pub(crate) fn width_for(vocab: usize) -> usize {
    if vocab <= 1 << 16 {
        2
    } else {
        4
    }
}

fn header_bytes(key: &[u8], width: usize, docs: u64, tokens: u64, spans: u64, body: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED + pad8(key.len()));
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(width as u32).to_le_bytes());
    h.extend_from_slice(&docs.to_le_bytes());
    h.extend_from_slice(&tokens.to_le_bytes());
    h.extend_from_slice(&spans.to_le_bytes());
    h.extend_from_slice(&(key.len() as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    let mut ck = Hasher::default();
    ck.update(&h);
    let mut padded = key.to_vec();
    padded.resize(pad8(key.len()), 0);
    ck.update(&padded);
    h.extend_from_slice(&ck.finish().to_le_bytes());
    h.extend_from_slice(&body.to_le_bytes());
    h.extend_from_slice(&padded);
    h
}

/// Streams documents into a new store. Nothing appears under the final name until
/// [`StoreWriter::finish`]; dropped before that, it removes its staging files.
pub(crate) struct StoreWriter {
    dest: PathBuf,
    tmp: PathBuf,
    side: [PathBuf; 2],
    out: BufWriter<File>,
    offsets: BufWriter<File>,
    spans: BufWriter<File>,
    key: Vec<u8>,
    width: usize,
    docs: u64,
    tokens: u64,
    n_spans: u64,
    body: Hasher,
    buf: Vec<u8>,
    done: bool,
}

impl StoreWriter {
    /// Starts `dest` for ids below `vocab`, identified by `key` (compared on open).
    pub(crate) fn create(dest: &Path, key: &str, vocab: usize) -> Result<Self> {
        let tmp = crate::io::atomic::temp_sibling(dest);
        let side = [crate::io::atomic::temp_sibling(&dest.with_extension("offsets")), crate::io::atomic::temp_sibling(&dest.with_extension("spans"))];
        let create = |p: &Path| -> Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(1 << 20, File::create(p).with_context(|| format!("cannot create {}; check the folder is writable", p.display()))?))
        };
        let mut w = StoreWriter {
            dest: dest.to_path_buf(),
            out: create(&tmp)?,
            offsets: create(&side[0])?,
            spans: create(&side[1])?,
            tmp,
            side,
            key: key.as_bytes().to_vec(),
            width: width_for(vocab),
            docs: 0,
            tokens: 0,
            n_spans: 0,
            body: Hasher::default(),
            buf: Vec::new(),
            done: false,
        };
        // The header is written last, when the counts are known; reserve its room.
        w.out.write_all(&vec![0u8; FIXED + pad8(w.key.len())])?;
        w.offsets.write_all(&0u64.to_le_bytes())?;
        Ok(w)
    }

    /// Appends one document: `loss[t]` says whether `ids[t]` is its own label.
    pub(crate) fn push(&mut self, ids: &[u32], loss: &[bool]) -> Result<()> {
        debug_assert_eq!(ids.len(), loss.len());
        self.buf.clear();
        for &id in ids {
            if self.width == 2 {
                let v = u16::try_from(id).with_context(|| format!("token id {id} does not fit the store's 16-bit ids (the vocabulary size was given too small)"))?;
                self.buf.extend_from_slice(&v.to_le_bytes());
            } else {
                self.buf.extend_from_slice(&id.to_le_bytes());
            }
        }
        self.out.write_all(&self.buf)?;
        self.body.update(&self.buf);
        let base = self.tokens;
        let mut t = 0;
        while t < loss.len() {
            if loss[t] {
                let start = t;
                while t < loss.len() && loss[t] {
                    t += 1;
                }
                self.spans.write_all(&(base + start as u64).to_le_bytes())?;
                self.spans.write_all(&(base + t as u64).to_le_bytes())?;
                self.n_spans += 1;
            } else {
                t += 1;
            }
        }
        self.tokens += ids.len() as u64;
        self.docs += 1;
        self.offsets.write_all(&self.tokens.to_le_bytes())?;
        Ok(())
    }

    /// Appends the index sections, writes the header, syncs and renames into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        let res = self.finish_inner();
        self.done = res.is_ok();
        res.with_context(|| format!("writing the token store {}", self.dest.display()))
    }

    fn finish_inner(&mut self) -> Result<()> {
        let id_bytes = self.tokens as usize * self.width;
        let pad = vec![0u8; pad8(id_bytes) - id_bytes];
        self.out.write_all(&pad)?;
        self.body.update(&pad);
        self.offsets.flush()?;
        self.spans.flush()?;
        let mut chunk = vec![0u8; 1 << 20];
        for p in &self.side {
            let mut f = File::open(p).with_context(|| format!("cannot reopen {}", p.display()))?;
            loop {
                let n = f.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                self.out.write_all(&chunk[..n])?;
                self.body.update(&chunk[..n]);
            }
        }
        let body = std::mem::take(&mut self.body).finish();
        let header = header_bytes(&self.key, self.width, self.docs, self.tokens, self.n_spans, body);
        self.out.flush()?;
        let f = self.out.get_mut();
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.dest.display()))?;
        Ok(())
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        for p in &self.side {
            let _ = std::fs::remove_file(p);
        }
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// An open, verified store.
pub struct Store {
    map: memmap2::Mmap,
    path: PathBuf,
    lay: Layout,
    width: usize,
    docs: usize,
    tokens: usize,
    spans: usize,
    body_checksum: u64,
    /// Pieces read since the map's pages were last released.
    touched: AtomicUsize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("docs", &self.docs).field("tokens", &self.tokens).finish_non_exhaustive()
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Store {
    /// Opens `path` for `key`: an error when the file is absent, was made for another key
    /// (stale), or is truncated or corrupt. Reads the whole file once to verify it.
    pub(crate) fn open(path: &Path, key: &str) -> Result<Self> {
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f.metadata()?.len();
        let mut fixed = [0u8; FIXED];
        f.read_exact(&mut fixed).context("truncated header")?;
        if &fixed[..8] != MAGIC {
            bail!("not a token store (bad magic)");
        }
        let version = le_u32(&fixed, 8);
        if version != VERSION {
            bail!("store version {version}, this build reads {VERSION}");
        }
        let width = le_u32(&fixed, 12) as usize;
        let (docs, tokens, spans) = (le_u64(&fixed, 16), le_u64(&fixed, 24), le_u64(&fixed, 32));
        let key_len = le_u32(&fixed, 40) as usize;
        if key_len != key.len() || !matches!(width, 2 | 4) {
            bail!("made for another key (stale) or corrupt header");
        }
        let lay = layout(key_len, width, docs, tokens, spans).context("corrupt header (sizes overflow)")?;
        if len != lay.len as u64 {
            bail!("{len} bytes where the header says {} (truncated or corrupt)", lay.len);
        }
        let mut padded = vec![0u8; pad8(key_len)];
        f.read_exact(&mut padded)?;
        if &padded[..key_len] != key.as_bytes() {
            bail!("made for another key (stale)");
        }
        let mut ck = Hasher::default();
        ck.update(&fixed[..48]);
        ck.update(&padded);
        if ck.finish() != le_u64(&fixed, 48) {
            bail!("header checksum mismatch (corrupt)");
        }
        let mut body = Hasher::default();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.update(&chunk[..n]);
        }
        let body_checksum = body.finish();
        if body_checksum != le_u64(&fixed, 56) {
            bail!("checksum mismatch (corrupt)");
        }
        // SAFETY: the file is only ever replaced by rename, never written in place, so the
        // mapped inode does not change under us.
        let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        let s = Store {
            map,
            path: path.to_path_buf(),
            lay,
            width,
            docs: docs as usize,
            tokens: tokens as usize,
            spans: spans as usize,
            body_checksum,
            touched: AtomicUsize::new(0),
        };
        s.check_index()?;
        Ok(s)
    }

    /// What a correct writer guarantees and the readers rely on; a checksum-valid file breaks
    /// it only through a writer bug, but then it must not be indexed out of bounds.
    fn check_index(&self) -> Result<()> {
        let mut prev = 0;
        if self.offset(0) != 0 || self.offset(self.docs) != self.tokens {
            bail!("document index does not cover the tokens (corrupt)");
        }
        for d in 1..=self.docs {
            let o = self.offset(d);
            if o < prev {
                bail!("document index is not sorted (corrupt)");
            }
            prev = o;
            self.touch_index(d);
        }
        let mut end = 0;
        for i in 0..self.spans {
            self.touch_index(2 * i);
            let (a, b) = self.span(i);
            if a < end || b <= a || b > self.tokens {
                bail!("loss spans are not sorted and disjoint (corrupt)");
            }
            end = b;
        }
        self.release();
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents.
    pub fn docs(&self) -> usize {
        self.docs
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The checksum of everything after the header: identifies the content (files derived
    /// from the store, such as its piece tables, record it).
    pub fn checksum(&self) -> u64 {
        self.body_checksum
    }

    /// Bytes per id (2 or 4).
    pub fn id_width(&self) -> usize {
        self.width
    }

    /// Start of document `d` (`d == docs()` gives the end of the last).
    pub fn offset(&self, d: usize) -> usize {
        le_u64(&self.map, self.lay.offsets + 8 * d) as usize
    }

    fn span(&self, i: usize) -> (usize, usize) {
        let at = self.lay.spans + 16 * i;
        (le_u64(&self.map, at) as usize, le_u64(&self.map, at + 8) as usize)
    }

    /// Index of the first span ending after token `t`.
    fn first_span_after(&self, t: usize) -> usize {
        let (mut lo, mut hi) = (0, self.spans);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.span(mid).1 <= t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Whether any token in `a..b` has a label.
    pub fn any_loss(&self, a: usize, b: usize) -> bool {
        let i = self.first_span_after(a);
        i < self.spans && self.span(i).0 < b
    }

    /// Appends the ids and loss mask of tokens `start..start + len`.
    pub fn read(&self, start: usize, len: usize, ids: &mut Vec<u32>, loss: &mut Vec<bool>) {
        let at = self.lay.ids + start * self.width;
        let bytes = &self.map[at..at + len * self.width];
        if self.width == 2 {
            ids.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32));
        } else {
            ids.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        let end = start + len;
        let first = loss.len();
        loss.resize(first + len, false);
        let mut i = self.first_span_after(start);
        while i < self.spans {
            let (a, b) = self.span(i);
            if a >= end {
                break;
            }
            for t in a.max(start)..b.min(end) {
                loss[first + t - start] = true;
            }
            i += 1;
        }
        self.touch();
    }

    /// Counts pieces read through the map and releases its pages every [`RELEASE_EVERY`]:
    /// resident pages of a file map count in the process's RSS, and a piece maps far more than
    /// its bytes (the kernel maps up to 64 KiB around each fault, and the span search lands on
    /// pages all over the index), so without this the resident share of the store would grow
    /// with every row. Released pages stay in the page cache: reading them again costs a minor
    /// fault, not a disk read, next to a training step's seconds.
    fn touch(&self) {
        if self.touched.fetch_add(1, Ordering::Relaxed) + 1 >= RELEASE_EVERY {
            self.release();
        }
    }

    /// For a scan over the index: releases the pages every 2^20 entries (8 MiB), so that
    /// scanning a large store keeps the same peak RSS as a small one.
    pub(crate) fn touch_index(&self, i: usize) {
        if i & ((1 << 20) - 1) == 0 {
            self.release();
        }
    }

    /// Drops the map's pages from this process (see [`Store::touch`]).
    pub fn release(&self) {
        self.touched.store(0, Ordering::Relaxed);
        // SAFETY: a read-only shared file map: DONTNEED only unmaps pages, which the next
        // access faults back in from the file unchanged.
        let _ = unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<(Vec<u32>, Vec<bool>)> {
        vec![
            (vec![1, 5, 6, 2], vec![false, true, true, true]),
            (vec![1, 7, 8, 9, 2], vec![false, false, false, true, true]),
            (vec![3], vec![false]),
            (vec![4, 4, 4, 4, 4], vec![true, false, true, true, false]),
        ]
    }

    fn write(path: &Path, key: &str, vocab: usize, docs: &[(Vec<u32>, Vec<bool>)]) {
        let mut w = StoreWriter::create(path, key, vocab).unwrap();
        for (i, l) in docs {
            w.push(i, l).unwrap();
        }
        w.finish().unwrap();
    }

    fn read_all(s: &Store) -> Vec<(Vec<u32>, Vec<bool>)> {
        (0..s.docs())
            .map(|d| {
                let (a, b) = (s.offset(d), s.offset(d + 1));
                let (mut i, mut l) = (Vec::new(), Vec::new());
                s.read(a, b - a, &mut i, &mut l);
                (i, l)
            })
            .collect()
    }

    #[test]
    fn round_trips_with_both_id_widths() {
        let d = tempfile::tempdir().unwrap();
        for (vocab, width, big) in [(32000, 2, 65535), (70000, 4, 69999)] {
            let p = d.path().join(format!("s{vocab}.tok"));
            let mut all = docs();
            all.push((vec![big, 0], vec![true, true]));
            write(&p, "key", vocab, &all);
            let s = Store::open(&p, "key").unwrap();
            assert_eq!((s.id_width(), s.docs(), s.tokens()), (width, 5, 17));
            assert_eq!(read_all(&s), all);
            // A piece that starts and ends inside documents and spans.
            let (mut i, mut l) = (Vec::new(), Vec::new());
            s.read(2, 5, &mut i, &mut l);
            assert_eq!(i, vec![6, 2, 1, 7, 8]);
            assert_eq!(l, vec![true, true, false, false, false]);
            assert!(s.any_loss(7, 8) && !s.any_loss(4, 7) && !s.any_loss(9, 10) && s.any_loss(9, 11) && !s.any_loss(11, 12) && s.any_loss(12, 13));
        }
        // No staging files are left beside it.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn wrong_key_or_version_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.tok");
        write(&p, "key-a", 100, &docs());
        assert!(format!("{:#}", Store::open(&p, "key-b").unwrap_err()).contains("stale"));
        assert!(Store::open(&p, "key-a").is_ok());
        let mut b = std::fs::read(&p).unwrap();
        b[8] = 9;
        std::fs::write(&p, &b).unwrap();
        assert!(format!("{:#}", Store::open(&p, "key-a").unwrap_err()).contains("version 9"));
    }

    #[test]
    fn every_truncation_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.tok");
        write(&p, "k", 100, &docs());
        let full = std::fs::read(&p).unwrap();
        for n in 0..full.len() {
            std::fs::write(&p, &full[..n]).unwrap();
            assert!(Store::open(&p, "k").is_err(), "a store cut to {n} of {} bytes opened", full.len());
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.tok");
        write(&p, "k", 100, &docs());
        let full = std::fs::read(&p).unwrap();
        for i in 0..full.len() {
            let mut b = full.clone();
            b[i] ^= 0x10;
            std::fs::write(&p, &b).unwrap();
            assert!(Store::open(&p, "k").is_err(), "byte {i} flipped went unnoticed");
        }
    }

    #[test]
    fn a_failed_writer_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.tok");
        let mut w = StoreWriter::create(&p, "k", 100).unwrap();
        w.push(&[1, 2], &[true, true]).unwrap();
        assert!(w.push(&[70000], &[true]).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn layout_rejects_overflowing_counts() {
        assert_eq!(layout(3, 2, 1, 3, 1), Some(Layout { header: 72, ids: 72, offsets: 80, spans: 96, len: 112 }));
        assert_eq!(layout(0, 4, u64::MAX, 1, 0), None);
        assert_eq!(layout(0, 4, 1, u64::MAX / 2, 0), None);
        assert_eq!(width_for(65536), 2);
        assert_eq!(width_for(65537), 4);
    }

    #[test]
    fn hasher_is_independent_of_how_bytes_are_fed() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let mut one = Hasher::default();
        one.update(&bytes);
        let mut parts = Hasher::default();
        for c in bytes.chunks(3) {
            parts.update(c);
        }
        assert_eq!(one.finish(), parts.finish());
        // Trailing zeros change the length word.
        let mut z = Hasher::default();
        z.update(&[0; 8]);
        let mut zz = Hasher::default();
        zz.update(&[0; 16]);
        assert_ne!(z.finish(), zz.finish());
    }
}

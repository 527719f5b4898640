//! GGUF v2/v3 parser.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims innermost-first,
//! `u32` ggml type, `u64` offset relative to the data section), padding up to `general.alignment`
//! (default 32), then the data section.
//!
//! The file is untrusted input. Rules the parser keeps so that it can neither panic nor be
//! talked into a huge allocation:
//! * every read goes through `Cursor`, which checks the bytes are there first;
//! * a count (tensors, keys, array elements) is rejected when even the smallest possible
//!   encoding of that many items could not fit in the bytes left, so a `Vec::with_capacity(n)`
//!   is bounded by the file size;
//! * sizes and offsets use checked arithmetic; tensor data must lie inside the file;
//! * arrays may nest, but only [`MAX_ARRAY_DEPTH`] deep, so recursion depth is bounded.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor's offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays. Real files never nest; the limit bounds recursion.
pub const MAX_ARRAY_DEPTH: usize = 4;
pub use crate::ggml::GgmlType;
pub use super::value::{GgufArray, GgufValue, GgufValueType};

/// One metadata entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufKv<'a> {
    /// The key, e.g. `llama.block_count`.
    pub key: &'a str,
    /// Its value.
    pub value: GgufValue<'a>,
}

/// One tensor: its header fields and its bytes, borrowed from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor<'a> {
    /// GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: &'a str,
    /// Dimensions innermost-first, as stored (`dims[0]` is the row length, ggml's `ne[0]`).
    pub dims: Vec<u64>,
    /// Storage type of the data.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// The tensor's bytes (exactly `ggml_type.bytes_for(n_elements)` of them).
    pub data: &'a [u8],
}

impl GgufTensor<'_> {
    /// Total element count (the parser checked it does not overflow).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape, outermost first: GGUF `[576, 1536]` (ne0 = 576) is HF `[1536, 576]`.
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file, borrowing from the bytes it was parsed from.
#[derive(Debug, Clone)]
pub struct GgufFile<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Data alignment from `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<GgufKv<'a>>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor<'a>>,
    kv_index: HashMap<&'a str, usize>,
    tensor_index: HashMap<&'a str, usize>,
}

impl<'a> GgufFile<'a> {
    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue<'a>> {
        self.kv_index.get(key).and_then(|&i| self.metadata.get(i)).map(|kv| &kv.value)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor<'a>> {
        self.tensor_index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// A string value; `Ok(None)` when absent, an error when present but not a UTF-8 string.
    pub fn get_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| anyhow!("metadata `{key}` should be a UTF-8 string, found {:?}", v.value_type())),
        }
    }

    /// A non-negative integer value; `Ok(None)` when absent, an error when of another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| anyhow!("metadata `{key}` should be a non-negative integer, found {}", describe(v))),
        }
    }

    /// A numeric value as f64; `Ok(None)` when absent, an error when of another type.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("metadata `{key}` should be a number, found {}", describe(v))),
        }
    }

    /// A bool value; `Ok(None)` when absent, an error when of another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| anyhow!("metadata `{key}` should be a bool, found {}", describe(v)))
            }
        }
    }
}

fn describe(v: &GgufValue<'_>) -> String {
    match v {
        GgufValue::Array(a) => format!("an array of {} {:?}", a.len(), a.element_type()),
        GgufValue::String(_) => "a string".to_string(),
        other => format!("{other:?}"),
    }
}

/// A memory-mapped GGUF file. Parse it with [`GgufMmap::parse`]; the result borrows the map.
pub struct GgufMmap {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl GgufMmap {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            anyhow::bail!("{} is a folder: pass the .gguf file itself", path.display());
        }
        let file = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // or rewriting the file while it is mapped is outside what any mmap-based reader can
        // defend against; the parser itself never trusts the contents.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), map })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the mapped bytes; errors name the file.
    pub fn parse(&self) -> Result<GgufFile<'_>> {
        parse(&self.map).with_context(|| format!("{} is not a valid GGUF file", self.path.display()))
    }
}

/// Bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            anyhow!(
                "unexpected end of file at byte {}: {} bytes needed, {} left (file is {} bytes)",
                self.pos,
                n,
                self.remaining(),
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    /// A `u64`-length-prefixed byte string; the length is checked before anything is taken.
    fn string(&mut self) -> Result<&'a [u8]> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            bail!("string at byte {at} claims {len} bytes but only {} are left in the file", self.remaining());
        }
        self.take(len as usize)
    }

    /// A `u64` count of items that each take at least `min_size` bytes; rejected when they
    /// could not all fit in the bytes left, which bounds any allocation sized by it.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        let fit = (self.remaining() / min_size.max(1)) as u64;
        if n > fit {
            bail!(
                "{what} count {n} at byte {at} is impossible: the {} bytes left hold at most {fit}",
                self.remaining()
            );
        }
        Ok(n as usize)
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes)
        .map_err(|e| anyhow!("{what} is not valid UTF-8 ({e}): {:?}", String::from_utf8_lossy(bytes)))
}

fn read_value<'a>(c: &mut Cursor<'a>, ty: GgufValueType) -> Result<GgufValue<'a>> {
    use GgufValueType as T;
    Ok(match ty {
        T::U8 => GgufValue::U8(c.u8()?),
        T::I8 => GgufValue::I8(c.u8()? as i8),
        T::U16 => GgufValue::U16(c.u16()?),
        T::I16 => GgufValue::I16(c.u16()? as i16),
        T::U32 => GgufValue::U32(c.u32()?),
        T::I32 => GgufValue::I32(c.u32()? as i32),
        T::F32 => GgufValue::F32(f32::from_bits(c.u32()?)),
        T::Bool => GgufValue::Bool(read_bool(c)?),
        T::String => GgufValue::String(c.string()?),
        T::Array => GgufValue::Array(read_array(c, 1)?),
        T::U64 => GgufValue::U64(c.u64()?),
        T::I64 => GgufValue::I64(c.u64()? as i64),
        T::F64 => GgufValue::F64(f64::from_bits(c.u64()?)),
    })
}

fn read_bool(c: &mut Cursor<'_>) -> Result<bool> {
    let at = c.pos;
    match c.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        b => bail!("bool at byte {at} has value {b}; only 0 and 1 are valid"),
    }
}

fn value_type(c: &mut Cursor<'_>) -> Result<GgufValueType> {
    let at = c.pos;
    let id = c.u32()?;
    GgufValueType::from_id(id).ok_or_else(|| anyhow!("unknown metadata value type {id} at byte {at} (valid: 0..=12)"))
}

fn read_array<'a>(c: &mut Cursor<'a>, depth: usize) -> Result<GgufArray<'a>> {
    let ty = value_type(c)?;
    let n = c.count(&format!("array-of-{ty:?} element"), ty.min_encoded_size())?;
    // `count` guarantees n * min_encoded_size <= remaining, so these multiplications fit.
    fn fixed<'a, const N: usize, T>(c: &mut Cursor<'a>, n: usize, f: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
        let bytes = c.take(n * N)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|ch| {
                let mut a = [0u8; N];
                a.copy_from_slice(ch);
                f(a)
            })
            .collect())
    }
    use GgufValueType as T;
    Ok(match ty {
        T::U8 => GgufArray::U8(c.take(n)?.to_vec()),
        T::I8 => GgufArray::I8(c.take(n)?.iter().map(|&b| b as i8).collect()),
        T::U16 => GgufArray::U16(fixed(c, n, u16::from_le_bytes)?),
        T::I16 => GgufArray::I16(fixed(c, n, i16::from_le_bytes)?),
        T::U32 => GgufArray::U32(fixed(c, n, u32::from_le_bytes)?),
        T::I32 => GgufArray::I32(fixed(c, n, i32::from_le_bytes)?),
        T::F32 => GgufArray::F32(fixed(c, n, f32::from_le_bytes)?),
        T::U64 => GgufArray::U64(fixed(c, n, u64::from_le_bytes)?),
        T::I64 => GgufArray::I64(fixed(c, n, i64::from_le_bytes)?),
        T::F64 => GgufArray::F64(fixed(c, n, f64::from_le_bytes)?),
        T::Bool => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_bool(c)?);
            }
            GgufArray::Bool(v)
        }
        T::String => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(c.string()?);
            }
            GgufArray::String(v)
        }
        T::Array => {
            if depth >= MAX_ARRAY_DEPTH {
                bail!("arrays nested more than {MAX_ARRAY_DEPTH} deep");
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, depth + 1)?);
            }
            GgufArray::Array(v)
        }
    })
}

struct TensorInfo<'a> {
    name: &'a str,
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

fn read_tensor_info<'a>(c: &mut Cursor<'a>) -> Result<TensorInfo<'a>> {
    let name = utf8(c.string().context("reading the name")?, "tensor name")?;
    let mut rest = || -> Result<TensorInfo<'a>> {
        let n_dims = c.u32()? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("has {n_dims} dimensions; ggml tensors have 1 to {MAX_DIMS}");
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64()?;
            if d > i64::MAX as u64 {
                bail!("dimension {d} does not fit in ggml's int64 ne");
            }
            dims.push(d);
        }
        let at = c.pos;
        let type_id = c.u32()?;
        let ty =
            GgmlType::from_id(type_id).ok_or_else(|| anyhow!("has unknown ggml type id {type_id} (at byte {at})"))?;
        let offset = c.u64()?;
        Ok(TensorInfo { name, dims, ty, offset })
    };
    rest().with_context(|| format!("tensor `{name}`"))
}

/// Parses a GGUF v2/v3 file held in memory.
///
/// Fails (never panics) on anything malformed: bad magic or version, counts or string lengths
/// that cannot fit in the file, unknown value or tensor types, duplicate keys or tensor names,
/// a `general.alignment` that is not a non-zero power of two, more than 4 dimensions, element
/// counts that overflow or are not whole blocks, offsets that are misaligned or point past the
/// end of the file.
pub fn parse(bytes: &[u8]) -> Result<GgufFile<'_>> {
    let mut c = Cursor { buf: bytes, pos: 0 };
    let magic = c.take(4).context("file is too short to hold the GGUF magic")?;
    if magic != GGUF_MAGIC {
        bail!("bad magic {:02x?}: not a GGUF file (expected \"GGUF\")", magic);
    }
    let version = c.u32().context("reading the GGUF version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (it predates 64-bit counts); re-convert the model with a current llama.cpp"),
        v if matches!(v.swap_bytes(), 1..=3) => bail!("this GGUF file is big-endian (version field reads {v:#x}); only little-endian files are supported"),
        v => bail!("unsupported GGUF version {v} (supported: 2, 3)"),
    }
    // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    let n_tensors = c.count("tensor", 24).context("reading the tensor count")?;
    // Smallest key/value: empty key (8) + value type (4) + a 1-byte value.
    let n_kv = c.count("metadata entry", 13).context("reading the metadata count")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut kv_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key_bytes = c.string().with_context(|| format!("reading the key of metadata entry #{i}"))?;
        let key = utf8(key_bytes, &format!("key of metadata entry #{i}"))?;
        let value = value_type(&mut c)
            .and_then(|ty| read_value(&mut c, ty))
            .with_context(|| format!("reading metadata entry #{i} `{key}`"))?;
        if kv_index.insert(key, metadata.len()).is_some() {
            bail!("duplicate metadata key `{key}`");
        }
        metadata.push(GgufKv { key, value });
    }

    let alignment = match kv_index.get("general.alignment").and_then(|&i| metadata.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some(kv) => match kv.value {
            GgufValue::U32(a) if a != 0 && a.is_power_of_two() => a as u64,
            ref v => bail!("general.alignment must be a non-zero power of two stored as u32, found {}", describe(v)),
        },
    };

    let mut infos = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info = read_tensor_info(&mut c).with_context(|| format!("reading tensor info #{i}"))?;
        if tensor_index.insert(info.name, i).is_some() {
            bail!("duplicate tensor name `{}`", info.name);
        }
        infos.push(info);
    }

    let header_end = c.pos as u64;
    let data_offset =
        header_end.checked_next_multiple_of(alignment).ok_or_else(|| anyhow!("data section offset overflows"))?;
    let file_len = bytes.len() as u64;

    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        let name = info.name;
        let ctx = || format!("tensor `{name}` ({} {:?})", info.ty, info.dims);
        let n_elements = info
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| anyhow!("element count overflows"))
            .with_context(ctx)?;
        if !info.dims[0].is_multiple_of(info.ty.block_size()) {
            return Err(anyhow!(
                "row length {} is not a multiple of the {} block size {}",
                info.dims[0],
                info.ty,
                info.ty.block_size()
            ))
            .with_context(ctx);
        }
        let n_bytes = info.ty.bytes_for(n_elements).ok_or_else(|| anyhow!("byte size overflows")).with_context(ctx)?;
        if !info.offset.is_multiple_of(alignment) {
            return Err(anyhow!("data offset {} is not a multiple of the alignment {alignment}", info.offset))
                .with_context(ctx);
        }
        let start = data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= file_len => (s, e),
            _ => {
                return Err(anyhow!(
                    "data ({n_bytes} bytes at offset {} from the data section at {data_offset}) runs past the end of the {file_len}-byte file",
                    info.offset
                ))
                .with_context(ctx)
            }
        };
        // start <= end <= file_len, which fits in usize because it is a slice length.
        let data = bytes
            .get(start as usize..end as usize)
            .ok_or_else(|| anyhow!("data range {start}..{end} is outside the file"))
            .with_context(ctx)?;
        tensors.push(GgufTensor { name, dims: info.dims, ggml_type: info.ty, offset: info.offset, data });
    }

    Ok(GgufFile { version, alignment, data_offset, metadata, tensors, kv_index, tensor_index })
}

/// Names of tensors in `file` whose data ranges overlap; a well-formed file has none.
pub fn overlapping_tensors<'a>(file: &GgufFile<'a>) -> Vec<(&'a str, &'a str)> {
    let mut spans: Vec<(u64, u64, &str)> = file
        .tensors
        .iter()
        .filter(|t| !t.data.is_empty())
        .map(|t| (t.offset, t.offset + t.data.len() as u64, t.name))
        .collect();
    spans.sort();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 && seen.insert((w[0].2, w[1].2)) {
            out.push((w[0].2, w[1].2));
        }
    }
    out
}
#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;

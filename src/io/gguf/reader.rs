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
use std::fmt;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor's offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays. Real files never nest; the limit bounds recursion.
pub const MAX_ARRAY_DEPTH: usize = 4;

/// A ggml tensor element type, with the numeric ids used in GGUF files.
///
/// All types llama.cpp can store are known here so that any real file parses and reports its
/// tensors; only some can be dequantized (see [`GgmlType::can_dequantize`]).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

impl GgmlType {
    /// (id, type, elements per block, bytes per block), from ggml's `type_traits`.
    const TABLE: [(u32, GgmlType, u64, u64); 34] = [
        (0, GgmlType::F32, 1, 4),
        (1, GgmlType::F16, 1, 2),
        (2, GgmlType::Q4_0, 32, 18),
        (3, GgmlType::Q4_1, 32, 20),
        (6, GgmlType::Q5_0, 32, 22),
        (7, GgmlType::Q5_1, 32, 24),
        (8, GgmlType::Q8_0, 32, 34),
        (9, GgmlType::Q8_1, 32, 36),
        (10, GgmlType::Q2_K, 256, 84),
        (11, GgmlType::Q3_K, 256, 110),
        (12, GgmlType::Q4_K, 256, 144),
        (13, GgmlType::Q5_K, 256, 176),
        (14, GgmlType::Q6_K, 256, 210),
        (15, GgmlType::Q8_K, 256, 292),
        (16, GgmlType::IQ2_XXS, 256, 66),
        (17, GgmlType::IQ2_XS, 256, 74),
        (18, GgmlType::IQ3_XXS, 256, 98),
        (19, GgmlType::IQ1_S, 256, 50),
        (20, GgmlType::IQ4_NL, 32, 18),
        (21, GgmlType::IQ3_S, 256, 110),
        (22, GgmlType::IQ2_S, 256, 82),
        (23, GgmlType::IQ4_XS, 256, 136),
        (24, GgmlType::I8, 1, 1),
        (25, GgmlType::I16, 1, 2),
        (26, GgmlType::I32, 1, 4),
        (27, GgmlType::I64, 1, 8),
        (28, GgmlType::F64, 1, 8),
        (29, GgmlType::IQ1_M, 256, 56),
        (30, GgmlType::BF16, 1, 2),
        (34, GgmlType::TQ1_0, 256, 54),
        (35, GgmlType::TQ2_0, 256, 66),
        (39, GgmlType::MXFP4, 32, 17),
        (40, GgmlType::NVFP4, 64, 36),
        (41, GgmlType::Q1_0, 128, 18),
    ];

    fn entry(self) -> (u32, GgmlType, u64, u64) {
        // Every variant is in TABLE (checked by a test), so the fallback is never taken.
        Self::TABLE.iter().copied().find(|e| e.1 == self).unwrap_or((u32::MAX, self, 1, 1))
    }

    /// The type for a GGUF type id, or `None` for an id this reader does not know.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::TABLE.iter().find(|e| e.0 == id).map(|e| e.1)
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self.entry().0
    }

    /// Elements per quantization block (1 for plain types).
    pub fn block_size(self) -> u64 {
        self.entry().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.entry().3
    }

    /// llama.cpp's name for the type (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// Whether [`crate::io::gguf::dequant`] can turn this type into f32.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
    }

    /// Bytes taken by `n_elements` of this type, or `None` when `n_elements` is not a whole
    /// number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size();
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// The type for a GGUF value-type id (0..=12).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF value-type id.
    pub fn id(self) -> u32 {
        use GgufValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The fewest bytes one value of this type can take in a file; bounds array counts.
    fn min_encoded_size(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,    // u64 length, possibly empty
            Array => 4 + 8, // element type + count, possibly empty
        }
    }
}

/// A metadata value. Strings are borrowed raw bytes (GGUF promises UTF-8 but a hostile file
/// need not keep that promise; [`GgufValue::as_str`] checks).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(&'a [u8]),
    Array(GgufArray<'a>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A typed metadata array. Typed vectors (rather than `Vec<GgufValue>`) keep memory close to the
/// on-disk size: 49k-entry vocab arrays are the norm.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray<'a> {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<&'a [u8]>),
    Array(Vec<GgufArray<'a>>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl<'a> GgufValue<'a> {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        use GgufValueType as T;
        match self {
            GgufValue::U8(_) => T::U8,
            GgufValue::I8(_) => T::I8,
            GgufValue::U16(_) => T::U16,
            GgufValue::I16(_) => T::I16,
            GgufValue::U32(_) => T::U32,
            GgufValue::I32(_) => T::I32,
            GgufValue::F32(_) => T::F32,
            GgufValue::Bool(_) => T::Bool,
            GgufValue::String(_) => T::String,
            GgufValue::Array(_) => T::Array,
            GgufValue::U64(_) => T::U64,
            GgufValue::I64(_) => T::I64,
            GgufValue::F64(_) => T::F64,
        }
    }

    /// Any integer value that is non-negative, widened to `u64`. Writers disagree on whether
    /// counts are u32, i32 or u64, so callers should not care.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float or integer value as `f64`. An `f32` is converted through its shortest decimal
    /// form so that `1e-5f32` becomes `1e-5`, not `9.999999747378752e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f32_to_f64_decimal(v)),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A bool value (integers 0/1 are accepted too: some writers use them).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => match self.as_u64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
        }
    }

    /// A string value, if it is one and is valid UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            GgufValue::String(s) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&GgufArray<'a>> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Converts through the shortest decimal that round-trips the `f32`.
pub(crate) fn f32_to_f64_decimal(v: f32) -> f64 {
    if !v.is_finite() {
        return v as f64;
    }
    format!("{v}").parse::<f64>().unwrap_or(v as f64)
}

impl<'a> GgufArray<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type tag.
    pub fn element_type(&self) -> GgufValueType {
        use GgufValueType as T;
        match self {
            GgufArray::U8(_) => T::U8,
            GgufArray::I8(_) => T::I8,
            GgufArray::U16(_) => T::U16,
            GgufArray::I16(_) => T::I16,
            GgufArray::U32(_) => T::U32,
            GgufArray::I32(_) => T::I32,
            GgufArray::F32(_) => T::F32,
            GgufArray::Bool(_) => T::Bool,
            GgufArray::String(_) => T::String,
            GgufArray::Array(_) => T::Array,
            GgufArray::U64(_) => T::U64,
            GgufArray::I64(_) => T::I64,
            GgufArray::F64(_) => T::F64,
        }
    }

    /// The elements of an integer array as `i64` (u64 values above `i64::MAX` make it `None`).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| x as i64).collect(),
            GgufArray::I64(v) => v.clone(),
            GgufArray::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect::<Option<Vec<_>>>()?,
            _ => return None,
        })
    }

    /// The elements of a numeric array as `f32`.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        Some(match self {
            GgufArray::F32(v) => v.clone(),
            GgufArray::F64(v) => v.iter().map(|&x| x as f32).collect(),
            other => other.to_i64_vec()?.into_iter().map(|x| x as f32).collect(),
        })
    }

    /// The elements of a string array (raw bytes).
    pub fn as_strings(&self) -> Option<&[&'a [u8]]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }
}

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
mod tests {
    use super::super::writer::GgufWriter;
    use super::*;

    fn le32(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }
    fn le64(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }

    /// A hand-assembled file so that tests can put bad values in known places.
    struct Raw(Vec<u8>);
    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
            let mut v = b"GGUF".to_vec();
            v.extend(le32(version));
            v.extend(le64(n_tensors));
            v.extend(le64(n_kv));
            Raw(v)
        }
        fn str(&mut self, s: &[u8]) -> &mut Self {
            self.0.extend(le64(s.len() as u64));
            self.0.extend(s);
            self
        }
        fn u32(&mut self, x: u32) -> &mut Self {
            self.0.extend(le32(x));
            self
        }
        fn u64(&mut self, x: u64) -> &mut Self {
            self.0.extend(le64(x));
            self
        }
        fn bytes(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend(b);
            self
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name.as_bytes()).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }
        fn pad_to(&mut self, align: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(align) {
                self.0.push(0);
            }
            self
        }
    }

    fn err_of(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// A small but varied file: every value type, nested array, two tensors.
    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", &GgufValue::String(b"llama")).unwrap();
        w.add_kv("a.u8", &GgufValue::U8(7)).unwrap();
        w.add_kv("a.i8", &GgufValue::I8(-7)).unwrap();
        w.add_kv("a.u16", &GgufValue::U16(700)).unwrap();
        w.add_kv("a.i16", &GgufValue::I16(-700)).unwrap();
        w.add_kv("a.u32", &GgufValue::U32(70000)).unwrap();
        w.add_kv("a.i32", &GgufValue::I32(-70000)).unwrap();
        w.add_kv("a.f32", &GgufValue::F32(1e-5)).unwrap();
        w.add_kv("a.bool", &GgufValue::Bool(true)).unwrap();
        w.add_kv("a.u64", &GgufValue::U64(1 << 40)).unwrap();
        w.add_kv("a.i64", &GgufValue::I64(-(1 << 40))).unwrap();
        w.add_kv("a.f64", &GgufValue::F64(0.25)).unwrap();
        w.add_kv("a.strs", &GgufValue::Array(GgufArray::String(vec![b"x", b"", b"hello"]))).unwrap();
        w.add_kv("a.i32s", &GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))).unwrap();
        w.add_kv(
            "a.nested",
            &GgufValue::Array(GgufArray::Array(vec![GgufArray::U8(vec![1, 2]), GgufArray::Bool(vec![true, false])])),
        )
        .unwrap();
        w.add_f32("t.a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        w.add_q8_0("t.b", &[1, 32], &(0..32).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
        w.to_bytes().unwrap()
    }

    #[test]
    fn type_table_is_complete_and_consistent() {
        for &(id, ty, bs, ts) in GgmlType::TABLE.iter() {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.id(), id);
            assert_eq!((ty.block_size(), ty.type_size()), (bs, ts));
        }
        assert_eq!(GgmlType::from_id(4), None, "ids 4 and 5 were removed from ggml");
        assert_eq!(GgmlType::from_id(99), None);
    }

    #[test]
    fn parses_what_the_writer_wrote() {
        let bytes = sample();
        let f = parse(&bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(f.get("a.i8"), Some(&GgufValue::I8(-7)));
        assert_eq!(f.get("a.i16"), Some(&GgufValue::I16(-700)));
        assert_eq!(f.get_u64("a.u32").unwrap(), Some(70000));
        assert_eq!(f.get_f64("a.f32").unwrap(), Some(1e-5));
        assert_eq!(f.get_bool("a.bool").unwrap(), Some(true));
        assert_eq!(f.get("a.i64"), Some(&GgufValue::I64(-(1 << 40))));
        assert!(f.get_u64("a.i32").is_err(), "negative values are not counts");
        assert!(f.get_u64("general.architecture").is_err());
        let strs = f.get("a.strs").unwrap().as_array().unwrap().as_strings().unwrap();
        assert_eq!(strs, &[&b"x"[..], b"", b"hello"]);
        match f.get("a.nested").unwrap() {
            GgufValue::Array(GgufArray::Array(v)) => {
                assert_eq!(v[0], GgufArray::U8(vec![1, 2]));
                assert_eq!(v[1], GgufArray::Bool(vec![true, false]));
            }
            other => panic!("{other:?}"),
        }
        let a = f.tensor("t.a").unwrap();
        assert_eq!(a.dims, vec![3, 2]);
        assert_eq!(a.hf_shape(), vec![2, 3]);
        assert_eq!(a.ggml_type, GgmlType::F32);
        assert_eq!(a.data.len(), 24);
        let b = f.tensor("t.b").unwrap();
        assert_eq!((b.ggml_type, b.data.len(), b.offset % 32), (GgmlType::Q8_0, 34, 0));
        assert!(overlapping_tensors(&f).is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        let f = parse(&bytes).unwrap();
        let needed = f.tensors.iter().map(|t| f.data_offset + t.offset + t.data.len() as u64).max().unwrap() as usize;
        for len in 0..needed {
            assert!(parse(&bytes[..len]).is_err(), "prefix of {len} bytes parsed");
        }
        for len in needed..=bytes.len() {
            parse(&bytes[..len]).unwrap();
        }
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = sample();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = match next() % 4 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            if let Ok(f) = parse(&b) {
                for t in &f.tensors {
                    if t.ggml_type.can_dequantize() && t.n_elements() < 1 << 20 {
                        let _ = super::super::dequant::dequantize(t.ggml_type, t.data, t.n_elements() as usize);
                    }
                }
            }
        }
    }

    #[test]
    fn bad_magic_version_and_endianness() {
        assert!(err_of(b"").contains("too short"));
        assert!(err_of(b"GGML\x03\0\0\0").contains("bad magic"));
        assert!(err_of(&Raw::header(1, 0, 0).0).contains("version 1"));
        assert!(err_of(&Raw::header(7, 0, 0).0).contains("unsupported GGUF version 7"));
        assert!(err_of(&Raw::header(3u32.swap_bytes(), 0, 0).0).contains("big-endian"));
        // An empty but well-formed file parses.
        let empty = Raw::header(2, 0, 0);
        let f = parse(&empty.0).unwrap();
        assert_eq!((f.version, f.tensors.len(), f.metadata.len()), (2, 0, 0));
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        assert!(err_of(&Raw::header(3, u64::MAX, 0).0).contains("tensor count"));
        assert!(err_of(&Raw::header(3, 0, u64::MAX).0).contains("metadata entry count"));
        assert!(err_of(&Raw::header(3, 1 << 40, 1 << 40).0).contains("impossible"));
        // Array of strings claiming 2^61 elements.
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9).u32(8).u64(1 << 61);
        assert!(err_of(&r.0).contains("array-of-String element count"));
        // Array of u8 claiming one more element than there are bytes.
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9).u32(0).u64(4).bytes(&[1, 2, 3]);
        assert!(err_of(&r.0).contains("impossible"));
    }

    #[test]
    fn string_longer_than_file() {
        let mut r = Raw::header(3, 0, 1);
        r.u64(u64::MAX).bytes(&[0; 32]);
        assert!(err_of(&r.0).contains("claims 18446744073709551615 bytes"));
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(8).u64(100).bytes(b"short");
        let e = err_of(&r.0);
        assert!(e.contains("`k`") && e.contains("claims 100 bytes"), "{e}");
    }

    #[test]
    fn unknown_types_and_bad_values() {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(13).u32(0);
        assert!(err_of(&r.0).contains("unknown metadata value type 13"));
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(7).bytes(&[2]);
        assert!(err_of(&r.0).contains("only 0 and 1"));
        let mut r = Raw::header(3, 0, 1);
        r.str(b"\xff\xfe").u32(0).bytes(&[2]);
        assert!(err_of(&r.0).contains("not valid UTF-8"));
        let mut r = Raw::header(3, 0, 2);
        r.str(b"k").u32(0).bytes(&[1]).str(b"k").u32(0).bytes(&[2]);
        assert!(err_of(&r.0).contains("duplicate metadata key `k`"));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[32], 99, 0).pad_to(32).bytes(&[0; 64]);
        assert!(err_of(&r.0).contains("unknown ggml type id 99"));
    }

    #[test]
    fn deep_array_nesting_is_bounded() {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"k").u32(9);
        for _ in 0..10 {
            r.u32(9).u64(1);
        }
        r.u32(0).u64(0);
        assert!(err_of(&r.0).contains("nested"));
    }

    #[test]
    fn bad_alignment() {
        for (ty, val) in [(4u32, 0u64), (4, 3), (4, 48), (10, 32)] {
            let mut r = Raw::header(3, 0, 1);
            r.str(b"general.alignment").u32(ty);
            if ty == 4 {
                r.u32(val as u32);
            } else {
                r.u64(val);
            }
            assert!(err_of(&r.0).contains("general.alignment"), "type {ty} value {val}");
        }
        // A valid non-default alignment is honoured.
        let mut r = Raw::header(3, 1, 1);
        r.str(b"general.alignment").u32(4).u32(64);
        r.tensor("w", &[4], 0, 0).pad_to(64).bytes(&[0; 16]);
        let f = parse(&r.0).unwrap();
        assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
    }

    #[test]
    fn bad_tensor_infos() {
        let cases: Vec<(Vec<u64>, u32, u64, &str)> = vec![
            (vec![], 0, 0, "0 dimensions"),
            (vec![1, 1, 1, 1, 1], 0, 0, "5 dimensions"),
            (vec![1 << 40, 1 << 40], 0, 0, "overflows"),
            (vec![u64::MAX], 0, 0, "int64"),
            (vec![16], 8, 0, "not a multiple of the Q8_0 block size 32"),
            (vec![4], 0, 8, "not a multiple of the alignment"),
            (vec![4], 0, 1 << 20, "runs past the end"),
            (vec![4], 0, u64::MAX - 31, "runs past the end"),
            (vec![1024], 0, 0, "runs past the end"),
        ];
        for (dims, ty, offset, want) in cases {
            let mut r = Raw::header(3, 1, 0);
            r.tensor("blk.0.w", &dims, ty, offset).pad_to(32).bytes(&[0; 64]);
            let e = err_of(&r.0);
            assert!(e.contains(want) && e.contains("blk.0.w"), "{dims:?} {ty} {offset}: {e}");
        }
        let mut r = Raw::header(3, 2, 0);
        r.tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).pad_to(32).bytes(&[0; 64]);
        assert!(err_of(&r.0).contains("duplicate tensor name `w`"));
    }
}

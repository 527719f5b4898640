//! A small GGUF v3 writer: metadata of every value type and tensors, each padded to the
//! alignment. It keeps everything in memory, which suits tests and small exports; a streaming
//! variant can reuse [`GgufWriter::header_bytes`] and write tensor data itself.

use super::reader::{GgmlType, GgufArray, GgufValue, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};
use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use std::collections::HashSet;
use std::path::Path;

struct PendingTensor {
    name: String,
    ne: Vec<u64>,
    ty: GgmlType,
    /// Empty for tensors declared with [`GgufWriter::add_tensor_info`], produced at write time.
    data: Vec<u8>,
    len: u64,
}

/// Builds a GGUF file. Keys and tensor names must be unique; tensors are laid out in the order
/// they were added.
pub struct GgufWriter {
    alignment: u64,
    kv: Vec<u8>,
    n_kv: u64,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment (32).
    pub fn new() -> Self {
        Self { alignment: DEFAULT_ALIGNMENT, kv: Vec::new(), n_kv: 0, keys: HashSet::new(), tensors: Vec::new() }
    }

    /// Sets the data alignment and records it as `general.alignment` (u32), as readers expect.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<()> {
        if alignment == 0 || !alignment.is_power_of_two() {
            bail!("alignment {alignment} is not a non-zero power of two");
        }
        self.add_kv("general.alignment", &GgufValue::U32(alignment))?;
        self.alignment = alignment as u64;
        Ok(())
    }

    /// Adds a metadata entry. Array values may nest, up to the reader's depth limit.
    pub fn add_kv(&mut self, key: &str, value: &GgufValue<'_>) -> Result<()> {
        if !self.keys.insert(key.to_string()) {
            bail!("duplicate metadata key `{key}`");
        }
        if key == "general.alignment" && !matches!(value, GgufValue::U32(a) if *a != 0 && a.is_power_of_two()) {
            bail!("general.alignment must be a u32 power of two; use set_alignment");
        }
        let mut buf = Vec::new();
        put_str(&mut buf, key.as_bytes());
        put_u32(&mut buf, value.value_type().id());
        put_value(&mut buf, value, 0)?;
        self.kv.extend(buf);
        self.n_kv += 1;
        Ok(())
    }

    /// Adds a tensor from raw bytes already in `ty`'s encoding. `ne` lists dimensions
    /// innermost-first (GGUF order: `ne[0]` is the row length).
    pub fn add_tensor_raw(&mut self, name: &str, ne: &[u64], ty: GgmlType, data: Vec<u8>) -> Result<()> {
        let want = self.check_tensor(name, ne, ty)?;
        if want != data.len() as u64 {
            let n: u64 = ne.iter().product();
            bail!("tensor `{name}`: {n} {ty} elements take {want} bytes, got {}", data.len());
        }
        self.tensors.push(PendingTensor { name: name.to_string(), ne: ne.to_vec(), ty, data, len: want });
        Ok(())
    }

    /// Declares a tensor whose bytes are produced later, by [`GgufWriter::write_streaming`]:
    /// the header only needs sizes, so a large model never has to sit in memory whole.
    pub fn add_tensor_info(&mut self, name: &str, ne: &[u64], ty: GgmlType) -> Result<()> {
        let len = self.check_tensor(name, ne, ty)?;
        self.tensors.push(PendingTensor { name: name.to_string(), ne: ne.to_vec(), ty, data: Vec::new(), len });
        Ok(())
    }

    /// Validates a new tensor and returns its byte size.
    fn check_tensor(&self, name: &str, ne: &[u64], ty: GgmlType) -> Result<u64> {
        if self.tensors.iter().any(|t| t.name == name) {
            bail!("duplicate tensor name `{name}`");
        }
        if ne.is_empty() || ne.len() > MAX_DIMS {
            bail!("tensor `{name}` has {} dimensions; GGUF allows 1 to {MAX_DIMS}", ne.len());
        }
        if !ne[0].is_multiple_of(ty.block_size()) {
            bail!("tensor `{name}`: row length {} is not a multiple of the {ty} block size {}", ne[0], ty.block_size());
        }
        let n = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor `{name}`: size overflows"))?;
        ty.bytes_for(n).ok_or_else(|| anyhow!("tensor `{name}`: size overflows"))
    }

    /// Adds an f32 tensor. `shape` is row-major, outermost first (HF order); it is reversed on disk.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        let data = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_tensor_raw(name, &ne_of(shape), GgmlType::F32, data)
    }

    /// Adds an f16 tensor (round-to-nearest-even from f32). `shape` is row-major.
    pub fn add_f16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        let data = data.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect();
        self.add_tensor_raw(name, &ne_of(shape), GgmlType::F16, data)
    }

    /// Adds a tensor quantized to Q8_0 with ggml's reference quantizer. `shape` is row-major and
    /// its last dimension (the row length) must be a multiple of 32.
    pub fn add_q8_0(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        let ne = ne_of(shape);
        if ne.first().is_some_and(|&c| !c.is_multiple_of(32)) {
            bail!("tensor `{name}`: Q8_0 needs rows that are a multiple of 32, got {}", ne[0]);
        }
        self.add_tensor_raw(name, &ne, GgmlType::Q8_0, quantize_q8_0(data)?)
    }

    /// The header: magic, version, counts, metadata and tensor infos, padded to the alignment.
    pub fn header_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + self.kv.len());
        out.extend(b"GGUF");
        put_u32(&mut out, 3);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.n_kv);
        out.extend(&self.kv);
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, t.name.as_bytes());
            put_u32(&mut out, t.ne.len() as u32);
            for &d in &t.ne {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ty.id());
            put_u64(&mut out, offset);
            offset = (offset + t.len)
                .checked_next_multiple_of(self.alignment)
                .ok_or_else(|| anyhow!("data section overflows"))?;
        }
        pad(&mut out, self.alignment);
        Ok(out)
    }

    /// The whole file (every tensor must have been added with its data).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = self.header_bytes()?;
        for t in &self.tensors {
            if t.data.len() as u64 != t.len {
                bail!("tensor `{}` was declared without data; use write_streaming", t.name);
            }
            out.extend(&t.data);
            pad(&mut out, self.alignment);
        }
        Ok(out)
    }

    /// Writes the file to `path` (via a sibling temporary file renamed into place).
    pub fn write_to_file(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }
}

impl GgufWriter {
    /// Writes the file to `path` atomically, asking `produce(i, name)` for the bytes of each
    /// tensor declared with [`GgufWriter::add_tensor_info`], one at a time, in order.
    pub fn write_streaming(&self, path: &Path, mut produce: impl FnMut(usize, &str) -> Result<Vec<u8>>) -> Result<()> {
        use std::io::Write;
        let header = self.header_bytes()?;
        crate::io::atomic::write_with(path, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&header)?;
            let mut pos = header.len() as u64;
            for (i, t) in self.tensors.iter().enumerate() {
                let produced;
                let data = if t.data.len() as u64 == t.len && (t.len == 0 || !t.data.is_empty()) {
                    &t.data
                } else {
                    produced = produce(i, &t.name)?;
                    &produced
                };
                if data.len() as u64 != t.len {
                    bail!("tensor `{}`: produced {} bytes, the header says {}", t.name, data.len(), t.len);
                }
                w.write_all(data)?;
                pos += t.len;
                let padded = pos.next_multiple_of(self.alignment);
                w.write_all(&vec![0u8; (padded - pos) as usize])?;
                pos = padded;
            }
            w.flush()?;
            Ok(())
        })
        .with_context(|| format!("writing {}", path.display()))
    }
}

fn ne_of(shape: &[usize]) -> Vec<u64> {
    shape.iter().rev().map(|&d| d as u64).collect()
}

fn pad(out: &mut Vec<u8>, alignment: u64) {
    let len = out.len() as u64;
    let target = len.next_multiple_of(alignment);
    out.resize(target as usize, 0);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend(v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend(v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_u64(out, s.len() as u64);
    out.extend(s);
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue<'_>, depth: usize) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Array(a) => put_array(out, a, depth + 1)?,
    }
    Ok(())
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray<'_>, depth: usize) -> Result<()> {
    // Same rule as the reader, so that whatever is written can be read back.
    if matches!(a, GgufArray::Array(_)) && depth >= MAX_ARRAY_DEPTH {
        bail!("arrays nested more than {MAX_ARRAY_DEPTH} deep cannot be read back");
    }
    put_u32(out, a.element_type().id());
    put_u64(out, a.len() as u64);
    match a {
        GgufArray::U8(v) => out.extend(v),
        GgufArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgufArray::Array(v) => {
            for inner in v {
                put_array(out, inner, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// ggml's `quantize_row_q8_0_ref`: per block of 32, `d = max|x| / 127`, `q = round(x / d)`
/// (half away from zero, like C's `roundf`), `d` stored as f16.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(32) {
        bail!("Q8_0 quantizes blocks of 32 values; got {}", x.len());
    }
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::dequant::dequantize;
    use super::super::reader::parse;
    use super::*;

    #[test]
    fn q8_0_reference_quantizer() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) / 4.0).collect();
        let q = quantize_q8_0(&x).unwrap();
        assert_eq!(q.len(), 34);
        // amax = 3.875, d = 3.875/127; the extremes map to ±127.
        assert_eq!(q[2] as i8, -127);
        assert_eq!(q[33] as i8, 127);
        let y = dequantize(GgmlType::Q8_0, &q, 32).unwrap();
        let d = f16::from_f32(3.875 / 127.0).to_f32();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= d / 2.0 + 1e-6, "{a} vs {b}");
        }
        assert_eq!(quantize_q8_0(&[0.0; 32]).unwrap()[2..], [0u8; 32]);
        assert!(quantize_q8_0(&[0.0; 31]).is_err());
    }

    #[test]
    fn layout_and_alignment() {
        let mut w = GgufWriter::new();
        w.set_alignment(64).unwrap();
        w.add_f32("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
        w.add_f16("b", &[2, 2], &[1.0, -1.0, 0.5, 65504.0]).unwrap();
        let bytes = w.to_bytes().unwrap();
        assert_eq!(bytes.len() % 64, 0);
        let f = parse(&bytes).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.tensor("b").unwrap().offset, 64);
        assert_eq!(dequantize(GgmlType::F16, f.tensor("b").unwrap().data, 4).unwrap(), vec![1.0, -1.0, 0.5, 65504.0]);
    }

    #[test]
    fn streaming_write_equals_in_memory() {
        let mut a = GgufWriter::new();
        let mut b = GgufWriter::new();
        for w in [&mut a, &mut b] {
            w.add_kv("k", &GgufValue::U32(7)).unwrap();
        }
        let x: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
        a.add_f32("x", &[2, 32], &x).unwrap();
        a.add_q8_0("q", &[2, 32], &x).unwrap();
        b.add_f32("x", &[2, 32], &x).unwrap();
        b.add_tensor_info("q", &[32, 2], GgmlType::Q8_0).unwrap();
        assert!(b.to_bytes().is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.gguf");
        b.write_streaming(&p, |i, name| {
            assert_eq!((i, name), (1, "q"));
            quantize_q8_0(&x)
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), a.to_bytes().unwrap());
        assert!(b.write_streaming(&p, |_, _| Ok(vec![0; 3])).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = GgufWriter::new();
        w.add_kv("k", &GgufValue::U8(1)).unwrap();
        assert!(w.add_kv("k", &GgufValue::U8(2)).is_err());
        assert!(w.add_kv("general.alignment", &GgufValue::U32(3)).is_err());
        assert!(w.set_alignment(48).is_err());
        w.add_f32("t", &[1], &[0.0]).unwrap();
        assert!(w.add_f32("t", &[1], &[0.0]).is_err());
        assert!(w.add_f32("u", &[2], &[0.0]).is_err());
        assert!(w.add_q8_0("v", &[2, 16], &[0.0; 32]).is_err());
        assert!(w.add_tensor_raw("w", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]).is_err());
        let mut deep = GgufArray::U8(vec![]);
        for _ in 0..MAX_ARRAY_DEPTH {
            deep = GgufArray::Array(vec![deep]);
        }
        assert!(w.add_kv("deep", &GgufValue::Array(deep)).is_err());
    }
}

//! One safetensors file, memory-mapped. Validation (header length, JSON, offsets that must
//! tile the data section exactly) happens once at open, so later reads are plain slices.
//! Also a streaming writer that never holds more than one tensor in memory.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Element types this tool reads and writes for floating-point weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FloatType {
    #[default]
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            _ => 2,
        }
    }
    /// `f32`, `f16` or `bf16` (the CLI spelling).
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::BF16 => "bf16",
        }
    }
    /// The name config.json uses (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatType::F32 => "F32",
            FloatType::F16 => "F16",
            FloatType::BF16 => "BF16",
        }
    }
    pub fn burn_float(self) -> burn::tensor::FloatDType {
        match self {
            FloatType::F32 => burn::tensor::FloatDType::F32,
            FloatType::F16 => burn::tensor::FloatDType::F16,
            FloatType::BF16 => burn::tensor::FloatDType::BF16,
        }
    }
    pub fn burn(self) -> burn::tensor::DType {
        match self {
            FloatType::F32 => burn::tensor::DType::F32,
            FloatType::F16 => burn::tensor::DType::F16,
            FloatType::BF16 => burn::tensor::DType::BF16,
        }
    }
}

impl std::fmt::Display for FloatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FloatType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(FloatType::F32),
            "f16" | "fp16" | "float16" => Ok(FloatType::F16),
            "bf16" | "bfloat16" => Ok(FloatType::BF16),
            _ => bail!("unknown dtype `{s}`: use f32, f16 or bf16"),
        }
    }
}

/// A borrowed tensor inside a mapped file.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl std::fmt::Debug for RawTensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawTensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl RawTensor<'_> {
    pub fn float_type(&self) -> Option<FloatType> {
        match self.dtype {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts any float storage to f32 (little endian, unaligned-safe).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail!("dtype {other:?} is not a float type (expected F32, F16 or BF16)"),
        })
    }

    /// The index of the first NaN or ±inf of a float tensor, by bit tests on the stored bytes
    /// (in parallel for large tensors); `None` when every value is finite or the tensor holds
    /// integers. Weights enter through here so that a NaN checkpoint is an error, not a model
    /// that answers NaN with exit 0.
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        let (width, mask): (usize, u32) = match self.dtype {
            Dtype::F32 => (4, 0x7f80_0000),
            Dtype::F16 => (2, 0x7c00),
            Dtype::BF16 => (2, 0x7f80),
            _ => return None,
        };
        let bad = |c: &[u8]| {
            let bits = if width == 4 { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) } else { u16::from_le_bytes([c[0], c[1]]) as u32 };
            bits & mask == mask
        };
        const CHUNK: usize = 1 << 20;
        self.bytes
            .par_chunks(CHUNK * width)
            .enumerate()
            .find_map_first(|(k, block)| block.chunks_exact(width).position(bad).map(|i| k * CHUNK + i))
    }

    /// Reads an integer tensor (I64 or I32) as i64.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            other => bail!("dtype {other:?} is not an integer type (expected I64 or I32)"),
        })
    }
}

/// A validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    mmap: memmap2::Mmap,
    data_start: usize,
    meta: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated underneath us is the user's race, the
        // same contract as every mmap-based loader (safetensors, candle, llama.cpp).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot mmap {}", path.display()))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file ({e:?}); it may be truncated or its header may not match its data",
                path.display()
            )
        })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), file, mmap, data_start: 8 + n, meta })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().into_keys().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// The header's free-form `__metadata__` map.
    pub fn metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    pub fn get(&self, name: &str) -> Option<RawTensor<'_>> {
        let info = self.meta.info(name)?;
        let (s, e) = info.data_offsets;
        Some(RawTensor { dtype: info.dtype, shape: &info.shape, bytes: &self.mmap[self.data_start + s..self.data_start + e] })
    }

    /// Reads a tensor's bytes with `pread` instead of through the map. Streaming tools (merge)
    /// use this so pages they are done with never count towards their resident memory.
    pub fn read_owned(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        use std::os::unix::fs::FileExt;
        let info = self.meta.info(name).with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))?;
        let (s, e) = info.data_offsets;
        let mut buf = vec![0u8; e - s];
        self.file
            .read_exact_at(&mut buf, (self.data_start + s) as u64)
            .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))?;
        Ok((info.dtype, info.shape.clone(), buf))
    }

    /// Drops the mapped pages of a tensor that will not be read again, so that streaming
    /// through a large file keeps resident memory near one tensor.
    pub fn release(&self, name: &str) {
        if let Some(info) = self.meta.info(name) {
            let (s, e) = info.data_offsets;
            // SAFETY: a read-only mapping of a file we do not modify: dropped pages are read back
            // from the file on the next access, so no reader can observe a change.
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.data_start + s, e - s) };
        }
    }

    /// Like [`get`](Self::get), but a missing tensor is an error naming the file.
    pub fn require(&self, name: &str) -> Result<RawTensor<'_>> {
        self.get(name).with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))
    }
}

/// Encodes f32 values in the requested storage type, little endian.
pub fn encode_f32(values: &[f32], ty: FloatType) -> Vec<u8> {
    match ty {
        FloatType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        FloatType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// What a tensor will be: declared before any data is written, because the header comes first.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> Result<usize> {
        let elem = match self.dtype.as_str() {
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            "I64" | "F64" => 8,
            other => bail!("unsupported dtype {other} for tensor {}", self.name),
        };
        Ok(self.shape.iter().product::<usize>() * elem)
    }
}

/// Writes a safetensors file tensor by tensor: the header is computed from the specs, then each
/// tensor's bytes are appended in header order. Peak memory is one tensor, not the model.
pub struct StreamWriter {
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
    path: PathBuf,
    unsynced: u64,
}

impl StreamWriter {
    /// `path` should be inside a staging folder (see [`super::atomic::StagedDir`]); the file is
    /// only valid once [`finish`](Self::finish) has run.
    pub fn create(path: &Path, mut specs: Vec<TensorSpec>, metadata: Option<BTreeMap<String, String>>) -> Result<Self> {
        // safetensors requires sorted, non-overlapping offsets; sorting by name is what the
        // reference writer does, so byte-identical round trips stay possible.
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut header = serde_json::Map::new();
        if let Some(m) = metadata {
            header.insert("__metadata__".into(), serde_json::to_value(m)?);
        }
        let mut offset = 0usize;
        for s in &specs {
            let len = s.byte_len()?;
            header.insert(
                s.name.clone(),
                serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut hbytes = serde_json::to_vec(&header)?;
        // Pad the header so the data section starts 8-byte aligned, as the reference writer does.
        while (hbytes.len() + 8) % 8 != 0 {
            hbytes.push(b' ');
        }
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        out.write_all(&hbytes)?;
        Ok(StreamWriter { out, specs, next: 0, path: path.to_path_buf(), unsynced: 0 })
    }

    /// The order in which [`write`](Self::write) expects tensors.
    pub fn order(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let spec = self.specs.get(self.next).with_context(|| format!("{}: unexpected extra tensor {name}", self.path.display()))?;
        if spec.name != name {
            bail!("{}: expected tensor {} next, got {name}", self.path.display(), spec.name);
        }
        if spec.byte_len()? != bytes.len() {
            bail!("{}: tensor {name} has {} bytes, header says {}", self.path.display(), bytes.len(), spec.byte_len()?);
        }
        self.out.write_all(bytes)?;
        self.next += 1;
        self.start_writeback(bytes.len() as u64)?;
        Ok(())
    }

    /// Asks the kernel to start writing what is buffered so far, without waiting, so that the
    /// final fsync finds most of a multi-gigabyte file already on disk instead of flushing it
    /// all at the end.
    fn start_writeback(&mut self, just_written: u64) -> Result<()> {
        self.unsynced += just_written;
        if self.unsynced < (64 << 20) {
            return Ok(());
        }
        self.out.flush()?;
        self.unsynced = 0;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a plain syscall on our own open descriptor; offset 0 / nbytes 0 means
            // "to the end of the file"; failure only loses the optimisation.
            unsafe {
                libc::sync_file_range(self.out.get_ref().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        if self.next != self.specs.len() {
            bail!("{}: {} of {} tensors written", self.path.display(), self.next, self.specs.len());
        }
        let f = self.out.into_inner().map_err(|e| anyhow::anyhow!("flushing {}: {e}", self.path.display()))?;
        f.sync_all()?;
        Ok(())
    }
}

/// One tensor as [`write_all`] takes it: name, dtype (`"F32"`, `"F16"`, …), shape, and its
/// little-endian bytes.
pub type Entry = (String, String, Vec<usize>, Vec<u8>);

/// Writes a small in-memory set of tensors in one go (adapters, test fixtures).
pub fn write_all(path: &Path, tensors: &[Entry], metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    let specs = tensors
        .iter()
        .map(|(n, d, s, _)| TensorSpec { name: n.clone(), dtype: d.clone(), shape: s.clone() })
        .collect();
    let tmp = super::atomic::temp_sibling(path);
    let result = (|| {
        let mut w = StreamWriter::create(&tmp, specs, metadata)?;
        let by_name: std::collections::HashMap<&str, &Vec<u8>> = tensors.iter().map(|(n, _, _, b)| (n.as_str(), b)).collect();
        for name in w.order() {
            w.write(&name, by_name[name.as_str()])?;
        }
        w.finish()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_writer_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        write_all(
            &p,
            &[
                ("b".into(), "F16".into(), vec![6], encode_f32(&a, FloatType::F16)),
                ("a".into(), "F32".into(), vec![2, 3], encode_f32(&a, FloatType::F32)),
            ],
            None,
        )
        .unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.names(), vec!["a", "b"]);
        assert_eq!(f.require("a").unwrap().to_f32().unwrap(), a);
        assert_eq!(f.require("b").unwrap().to_f32().unwrap(), a);
        assert_eq!(f.require("a").unwrap().shape, &[2, 3]);
        assert!(f.require("c").unwrap_err().to_string().contains("missing tensor `c`"));
        // The reference parser accepts what we wrote.
        let bytes = std::fs::read(&p).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }

    #[test]
    fn truncated_and_lying_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write_all(&p, &[("a".into(), "F32".into(), vec![4], encode_f32(&[1., 2., 3., 4.], FloatType::F32))], None).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            let q = dir.path().join(format!("cut{cut}.safetensors"));
            std::fs::write(&q, &bytes[..cut]).unwrap();
            let err = SafetensorsFile::open(&q).err().expect("truncated file must fail");
            assert!(err.to_string().contains(&format!("cut{cut}")), "{err}");
        }
        let text = String::from_utf8_lossy(&bytes).replace("[0,16]", "[0,99]");
        let q = dir.path().join("lie.safetensors");
        std::fs::write(&q, text.as_bytes()).unwrap();
        assert!(SafetensorsFile::open(&q).is_err());
    }
}

//! An HF model folder's weights: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Lookups go by tensor name across shards; every error names
//! the file and the tensor.

use super::safetensors::{FloatType, RawTensor, SafetensorsFile};
use anyhow::{bail, Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct WeightStore {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl WeightStore {
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            bail!("{} is a file: pass the model's folder (config.json and safetensors)", dir.display());
        }
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        // Which one is the model is a guess (transformers takes the single file, a re-sharding
        // left the other behind): say so rather than fail later on a tensor one of them lacks.
        if index_path.exists() && single.exists() {
            bail!("{} holds both model.safetensors and model.safetensors.index.json: remove the one that is not this model's", dir.display());
        }
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing `weight_map`", index_path.display()))?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().with_context(|| format!("{}: weight_map[{tensor}] is not a string", index_path.display()))?;
                if shard.contains('/') || shard.contains('\\') || shard.starts_with("..") {
                    bail!("{}: shard name `{shard}` must be a plain file name", index_path.display());
                }
                let id = match shard_ids.get(shard) {
                    Some(&id) => id,
                    None => {
                        let f = SafetensorsFile::open(&dir.join(shard))
                            .with_context(|| format!("shard listed in {}", index_path.display()))?;
                        files.push(f);
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[id].contains(tensor) {
                    bail!("{}: index says `{tensor}` is in {shard}, but that shard has no such tensor", index_path.display());
                }
                index.insert(tensor.clone(), id);
            }
        } else if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for n in f.names() {
                index.insert(n, 0);
            }
            files.push(f);
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json (pass an HF model folder; for a GGUF file use `linly-lora import gguf`)",
                dir.display()
            );
        }
        Ok(WeightStore { dir: dir.to_path_buf(), files, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// The file holding `name`, for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.index.get(name).map(|&i| self.files[i].path().to_path_buf()).unwrap_or_else(|| self.dir.clone())
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        match self.index.get(name) {
            Some(&i) => self.files[i].require(name),
            None => bail!("{}: missing tensor `{name}`", self.dir.display()),
        }
    }

    /// A tensor's bytes read without the map (see [`SafetensorsFile::read_owned`]).
    pub fn read_owned(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, Vec<u8>)> {
        match self.index.get(name) {
            Some(&i) => self.files[i].read_owned(name),
            None => bail!("{}: missing tensor `{name}`", self.dir.display()),
        }
    }

    /// See [`SafetensorsFile::release`].
    pub fn release(&self, name: &str) {
        if let Some(&i) = self.index.get(name) {
            self.files[i].release(name);
        }
    }

    /// Like [`raw`](Self::raw), for values that are about to be used or written: a float tensor
    /// holding NaN or ±inf is an error naming the file, the tensor and the element.
    pub fn raw_finite(&self, name: &str) -> Result<RawTensor<'_>> {
        let raw = self.raw(name)?;
        if let Some(i) = raw.first_non_finite() {
            bail!(
                "{}: tensor `{name}` holds NaN or ±inf (element {i}); the checkpoint is corrupt or was saved from a diverged run",
                self.file_of(name).display()
            );
        }
        Ok(raw)
    }

    /// A float tensor with its shape checked against `expected`, and its values finite.
    pub fn raw_checked(&self, name: &str, expected: &[usize]) -> Result<RawTensor<'_>> {
        let raw = self.raw(name)?;
        if raw.shape != expected {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from config.json",
                self.file_of(name).display(),
                raw.shape,
                expected
            );
        }
        if raw.float_type().is_none() {
            bail!("{}: tensor `{name}` has dtype {:?}; expected F32, F16 or BF16", self.file_of(name).display(), raw.dtype);
        }
        self.raw_finite(name)
    }

    /// Loads `name` onto `device` in `dtype`, checking its shape.
    pub fn tensor<const D: usize>(&self, name: &str, expected: [usize; D], device: &Device, dtype: FloatType) -> Result<Tensor<D>> {
        let raw = self.raw_checked(name, &expected)?;
        Ok(raw_to_tensor(&raw, expected, device, dtype))
    }

    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let raw = self.raw_finite(name)?;
        let v = raw.to_f32().with_context(|| format!("{}: tensor `{name}`", self.file_of(name).display()))?;
        Ok((v, raw.shape.to_vec()))
    }
}

/// Moves raw bytes into a tensor: storage dtype kept when it is the target, otherwise
/// converted through f32 on the host (bf16 → f16 must not go through a lossy direct path).
pub fn raw_to_tensor<const D: usize>(raw: &RawTensor<'_>, shape: [usize; D], device: &Device, dtype: FloatType) -> Tensor<D> {
    let src = raw.float_type().expect("checked by caller");
    let data = if src == dtype {
        TensorData::from_bytes_vec(raw.bytes.to_vec(), shape, dtype.burn())
    } else {
        let v = raw.to_f32().expect("float checked");
        f32_data(&v, shape, dtype)
    };
    Tensor::from_data(data, (device, dtype.burn()))
}

/// Host f32 values as tensor data of the given storage type.
pub fn f32_data<const D: usize>(v: &[f32], shape: [usize; D], dtype: FloatType) -> TensorData {
    match dtype {
        FloatType::F32 => TensorData::new(v.to_vec(), shape),
        FloatType::F16 => TensorData::new(v.iter().map(|x| half::f16::from_f32(*x)).collect::<Vec<_>>(), shape),
        FloatType::BF16 => TensorData::new(v.iter().map(|x| half::bf16::from_f32(*x)).collect::<Vec<_>>(), shape),
    }
}

/// Reads a tensor back to the host as f32, whatever its dtype.
pub fn tensor_to_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(burn::tensor::FloatDType::F32).try_into_vec_as::<f32>().expect("f32 data")
}

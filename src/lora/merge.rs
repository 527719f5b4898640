//! `merge`: `W + s·B·A` (in f32 whatever the storage dtype) for every LoRA pair of every
//! adapter, in order, plus table replacement/growth, streamed tensor by tensor into sharded
//! safetensors. Everything is validated before the first byte is written, and the output
//! folder appears only when complete.

use super::adapter::{AdapterFile, TableUpdate};
use crate::config::HfConfig;
use crate::io::atomic::StagedDir;
use crate::io::safetensors::{encode_f32, FloatType, RawTensor, StreamWriter, TensorSpec};
use crate::io::weights::WeightStore;
use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub base: PathBuf,
    pub adapters: Vec<PathBuf>,
    pub out: PathBuf,
    /// Output storage dtype; `None` keeps each tensor's dtype.
    pub dtype: Option<FloatType>,
    pub tokenizer: Option<PathBuf>,
    pub shard_size: u64,
    /// Accept a tokenizer with fewer tokens than embedding rows (padded vocabularies).
    pub allow_vocab_padding: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub tensors: usize,
    pub lora_pairs_merged: usize,
    pub shards: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub bytes_written: u64,
    pub tokenizer_from: Option<PathBuf>,
}

/// Parses sizes like `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GIB", 1u64 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1000), ("B", 1)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("bad size `{s}`: use e.g. 5GB, 500MB or a byte count"))?;
    if v <= 0.0 {
        bail!("size `{s}` must be positive (e.g. 5GB)");
    }
    Ok((v * mult as f64) as u64)
}

/// What the output will hold, decided before writing.
struct Plan {
    specs: Vec<TensorSpec>,
    embed_rows: usize,
    tied_out: bool,
    base_tied: bool,
    /// Per adapter: its embed_tokens update also updates the head, because the model was still
    /// tied when it applied and the adapter carries no lm_head of its own.
    head_from_embed: Vec<bool>,
}

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

fn same_update(a: &AdapterFile, e: &TableUpdate, h: &TableUpdate) -> Result<bool> {
    Ok(match (e, h) {
        (TableUpdate::Full { .. }, TableUpdate::Full { .. }) => a.raw(e.key())?.bytes == a.raw(h.key())?.bytes,
        (TableUpdate::Rows { indices: i1, .. }, TableUpdate::Rows { indices: i2, .. }) => i1 == i2 && a.raw(e.key())?.bytes == a.raw(h.key())?.bytes,
        _ => false,
    })
}

fn plan(opts: &MergeOptions, store: &WeightStore, cfg: &HfConfig, adapters: &[AdapterFile], tok_vocab: Option<(usize, PathBuf)>) -> Result<Plan> {
    let rt = cfg.to_runtime().with_context(|| format!("{}", opts.base.display()))?;
    let base_tied = rt.tie_word_embeddings || !store.contains(HEAD);
    let embed_raw = store.raw(EMBED)?;
    let (mut embed_rows, hidden) = (embed_raw.shape[0], embed_raw.shape[1]);
    let mut head_rows = if base_tied { embed_rows } else { store.raw(HEAD)?.shape[0] };
    let mut tied_out = base_tied;
    let mut head_from_embed = Vec::with_capacity(adapters.len());
    for ad in adapters {
        for (module, keys) in &ad.lora {
            let wname = format!("{module}.weight");
            let w = store.raw(&wname).with_context(|| {
                format!("adapter {} targets `{module}`, which {} does not have: this adapter belongs to another model", ad.dir.display(), opts.base.display())
            })?;
            let (a, b) = (ad.raw(&keys.a)?, ad.raw(&keys.b)?);
            if w.shape.len() != 2 || a.shape[1] != w.shape[1] || b.shape[0] != w.shape[0] {
                bail!(
                    "adapter {}: `{module}` has lora_A {:?} / lora_B {:?} but the base weight is {:?}: this adapter was trained on another model",
                    ad.dir.display(),
                    a.shape,
                    b.shape,
                    w.shape
                );
            }
        }
        for u in [&ad.embed, &ad.lm_head].into_iter().flatten() {
            let h = ad.raw(u.key())?.shape[1];
            if h != hidden {
                bail!("adapter {}: `{}` has hidden size {h} but the base's is {hidden}", ad.dir.display(), u.key());
            }
        }
        let new_embed = match &ad.embed {
            Some(u) => ad.rows_after(u, embed_rows)?,
            None => embed_rows,
        };
        let embed_only = ad.updates_tied_table_from_embed_rows(tied_out);
        head_from_embed.push(embed_only);
        let new_head = match &ad.lm_head {
            Some(u) => ad.rows_after(u, head_rows)?,
            None if embed_only => new_embed,
            None => head_rows,
        };
        // Identical updates to both tables keep a tied model tied; anything else unties it.
        tied_out = tied_out
            && match (&ad.embed, &ad.lm_head) {
                (None, None) => true,
                (Some(_), None) => embed_only,
                (Some(e), Some(h)) => same_update(ad, e, h)?,
                (None, Some(_)) => false,
            };
        if new_embed != new_head {
            bail!(
                "after adapter {} embed_tokens would have {new_embed} rows but lm_head {new_head}: an adapter that grows the vocabulary must carry both tables (modules_to_save = [\"embed_tokens\", \"lm_head\"])",
                ad.dir.display()
            );
        }
        embed_rows = new_embed;
        head_rows = new_head;
    }
    if let Some((n, dir)) = tok_vocab {
        if n > embed_rows {
            bail!(
                "tokenizer {} has {n} tokens but the merged model would have {embed_rows} embedding rows: pass --tokenizer of the vocabulary the adapter was trained with, or an adapter that carries the resized embed_tokens/lm_head",
                dir.display()
            );
        }
        if n < embed_rows && !opts.allow_vocab_padding {
            bail!(
                "tokenizer {} has {n} tokens but the merged model would have {embed_rows} embedding rows: pass --tokenizer of the extended vocabulary (e.g. the adapter's folder), or --allow-vocab-padding if the extra rows are deliberate padding",
                dir.display()
            );
        }
    }
    let mut specs = Vec::new();
    for name in store.names() {
        if name == HEAD && tied_out {
            continue;
        }
        let raw = store.raw(&name)?;
        let mut shape = raw.shape.to_vec();
        if name == EMBED || name == HEAD {
            shape[0] = embed_rows;
        }
        specs.push(TensorSpec { name: name.clone(), dtype: out_dtype(&raw, opts.dtype), shape });
    }
    if base_tied && !tied_out {
        let raw = store.raw(EMBED)?;
        specs.push(TensorSpec { name: HEAD.into(), dtype: out_dtype(&raw, opts.dtype), shape: vec![embed_rows, hidden] });
    }
    Ok(Plan { specs, embed_rows, tied_out, base_tied, head_from_embed })
}

fn out_dtype(raw: &RawTensor<'_>, want: Option<FloatType>) -> String {
    match (raw.float_type(), want) {
        (Some(_), Some(w)) => w.safetensors_name().into(),
        (Some(f), None) => f.safetensors_name().into(),
        _ => format!("{:?}", raw.dtype),
    }
}

fn float_type_of(name: &str) -> Option<FloatType> {
    match name {
        "F32" => Some(FloatType::F32),
        "F16" => Some(FloatType::F16),
        "BF16" => Some(FloatType::BF16),
        _ => None,
    }
}

/// One LoRA update of a projection, host-side in f32.
pub struct HostLora {
    /// `[r, in]`
    pub a: Vec<f32>,
    /// `[out, r]`
    pub b: Vec<f32>,
    pub r: usize,
    pub scale: f32,
}

/// Rows per block: a block of `W` in f32 stays in L2 while its update is added, so the weight
/// streams through memory once, like a copy, instead of once per pass.
const BLOCK_ROWS: usize = 32;

/// `W + Σ s·B·A` for storage bytes of `W` `[out, in]`, returned in `out_ty`. Row blocks are
/// converted to f32, updated with an accumulating GEMM (no dense ΔW is ever formed) and
/// converted back, in parallel over blocks.
pub fn merge_lora_bytes(w: &[u8], w_ty: FloatType, out: usize, inp: usize, loras: &[HostLora], out_ty: FloatType) -> Vec<u8> {
    let mut dst = Vec::new();
    merge_lora_into(w, w_ty, out, inp, loras, out_ty, &mut dst);
    dst
}

/// [`merge_lora_bytes`] into a reused buffer (no fresh pages to fault in per tensor).
pub fn merge_lora_into(w: &[u8], w_ty: FloatType, out: usize, inp: usize, loras: &[HostLora], out_ty: FloatType, dst: &mut Vec<u8>) {
    use rayon::prelude::*;
    dst.clear();
    dst.resize(out * inp * out_ty.size(), 0);
    let in_row = inp * w_ty.size();
    let out_row = inp * out_ty.size();
    dst.par_chunks_mut(BLOCK_ROWS * out_row).enumerate().for_each(|(bi, dchunk)| {
        let r0 = bi * BLOCK_ROWS;
        let rows = dchunk.len() / out_row;
        let mut block = vec![0f32; rows * inp];
        decode_into(&w[r0 * in_row..(r0 + rows) * in_row], w_ty, &mut block);
        for l in loras {
            // block[rows × in] += s · B[r0.., :] [rows × r] · A [r × in]
            // SAFETY: all pointers cover the strided ranges gemm reads/writes: block is
            // rows×inp row-major, B's rows r0..r0+rows are rows×r row-major, A is r×inp.
            unsafe {
                gemm::gemm(
                    rows, inp, l.r,
                    block.as_mut_ptr(), 1, inp as isize,
                    true,
                    l.b.as_ptr().add(r0 * l.r), 1, l.r as isize,
                    l.a.as_ptr(), 1, inp as isize,
                    1.0f32, l.scale,
                    false, false, false,
                    gemm::Parallelism::None,
                );
            }
        }
        encode_into(&block, out_ty, dchunk);
    });
}

/// Storage bytes → f32, with the F16C/NEON paths of `half` where the bytes are aligned.
pub fn decode_into(src: &[u8], ty: FloatType, dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match ty {
        FloatType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
            Ok(s) => dst.copy_from_slice(s),
            Err(_) => dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(d, c)| *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        },
        FloatType::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(src) {
            Ok(s) => s.convert_to_f32_slice(dst),
            Err(_) => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, c)| *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        },
        FloatType::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(src) {
            Ok(s) => s.convert_to_f32_slice(dst),
            Err(_) => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, c)| *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        },
    }
}

/// f32 → storage bytes (round to nearest even, as torch's `.to(dtype)`).
pub fn encode_into(src: &[f32], ty: FloatType, dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    match ty {
        FloatType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        FloatType::F16 => match bytemuck::try_cast_slice_mut::<u8, half::f16>(dst) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => dst.chunks_exact_mut(2).zip(src).for_each(|(d, s)| d.copy_from_slice(&half::f16::from_f32(*s).to_le_bytes())),
        },
        FloatType::BF16 => match bytemuck::try_cast_slice_mut::<u8, half::bf16>(dst) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => dst.chunks_exact_mut(2).zip(src).for_each(|(d, s)| d.copy_from_slice(&half::bf16::from_f32(*s).to_le_bytes())),
        },
    }
}

fn owned_f32(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<Vec<f32>> {
    RawTensor { dtype, shape, bytes }.to_f32()
}

/// One output tensor's bytes: straight from the base's map when unchanged, else computed.
enum Chunk<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

/// The update adapter `i` makes to table `name`, if any.
fn table_update<'x>(name: &str, i: usize, a: &'x AdapterFile, plan: &Plan) -> Option<&'x TableUpdate> {
    if name == EMBED {
        a.embed.as_ref()
    } else {
        a.lm_head.as_ref().or(if plan.head_from_embed[i] { a.embed.as_ref() } else { None })
    }
}

/// Computes one output tensor: base, then every adapter's update in order. `buf` is a reused
/// buffer for the result.
fn compute<'a>(name: &str, spec: &TensorSpec, store: &'a WeightStore, adapters: &[AdapterFile], plan: &Plan, mut buf: Vec<u8>) -> Result<Chunk<'a>> {
    let src = if name == HEAD && plan.base_tied { EMBED } else { name };
    let raw = store.raw_finite(src)?;
    let (dtype, shape, bytes) = (raw.dtype, raw.shape.to_vec(), raw.bytes);
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let is_table = name == EMBED || name == HEAD;
    let update_of = |i: usize, a: &AdapterFile| table_update(name, i, a, plan).is_some();
    let touched = is_table && adapters.iter().enumerate().any(|(i, a)| update_of(i, a))
        || adapters.iter().any(|a| a.lora.contains_key(module));
    let out_ty = float_type_of(&spec.dtype);
    if !touched && format!("{dtype:?}") == spec.dtype && shape == spec.shape {
        return Ok(Chunk::Borrowed(bytes));
    }
    let out_ty = out_ty.with_context(|| format!("tensor `{name}` of dtype {dtype:?} cannot be converted"))?;
    let w_ty = raw.float_type().with_context(|| format!("tensor `{name}` has dtype {dtype:?}; expected a float"))?;
    let result = if !is_table {
        let mut loras = Vec::new();
        for ad in adapters {
            if let Some(keys) = ad.lora.get(module) {
                let (a, b) = (ad.raw(&keys.a)?, ad.raw(&keys.b)?);
                loras.push(HostLora { a: a.to_f32()?, b: b.to_f32()?, r: a.shape[0], scale: ad.scale(module)? as f32 });
            }
        }
        if shape.len() == 2 {
            merge_lora_into(bytes, w_ty, shape[0], shape[1], &loras, out_ty, &mut buf);
            buf
        } else {
            let mut v = vec![0f32; shape.iter().product()];
            decode_into(bytes, w_ty, &mut v);
            encode_f32(&v, out_ty)
        }
    } else {
        let mut w = owned_f32(dtype, &shape, bytes)?;
        let hidden = shape[1];
        let mut rows = shape[0];
        for (i, ad) in adapters.iter().enumerate() {
            if let Some(u) = table_update(name, i, ad, plan) {
                rows = ad.update_table(u, &mut w, rows, hidden)?;
            }
        }
        if rows != spec.shape[0] {
            bail!("internal: `{name}` has {rows} rows, planned {}", spec.shape[0]);
        }
        encode_f32(&w, out_ty)
    };
    store.release(src);
    Ok(Chunk::Owned(result))
}

/// Tokenizer files to copy and the folder they come from.
const TOKENIZER_FILES: [&str; 6] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "vocab_extension.json"];

fn tokenizer_source(opts: &MergeOptions) -> Option<PathBuf> {
    if let Some(t) = &opts.tokenizer {
        return Some(if t.is_file() { t.parent().map(Path::to_path_buf).unwrap_or_default() } else { t.clone() });
    }
    opts.adapters.iter().rev().find(|a| a.join("tokenizer.json").exists()).cloned().or_else(|| opts.base.join("tokenizer.json").exists().then(|| opts.base.clone()))
}

pub fn merge(opts: &MergeOptions) -> Result<MergeReport> {
    if opts.adapters.is_empty() {
        bail!("merge needs at least one --adapter");
    }
    if opts.out.exists() {
        bail!("{} already exists: choose another --out or remove it first", opts.out.display());
    }
    let cfg = HfConfig::load(&opts.base)?;
    let store = WeightStore::open(&opts.base)?;
    let adapters = opts.adapters.iter().map(|a| AdapterFile::open(a)).collect::<Result<Vec<_>>>()?;
    let tok_dir = tokenizer_source(opts);
    let tok_vocab = match &tok_dir {
        Some(d) if d.join("tokenizer.json").exists() => Some((crate::tokenizer::Tok::load(d)?.vocab_size(), d.clone())),
        Some(d) if opts.tokenizer.is_some() => bail!("--tokenizer {}: no tokenizer.json there", d.display()),
        _ => None,
    };
    let plan = plan(opts, &store, &cfg, &adapters, tok_vocab)?;

    // Shards: tensors in name order, a new shard when the next tensor would overflow.
    let mut specs = plan.specs.clone();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<TensorSpec>> = vec![vec![]];
    let mut cur = 0u64;
    for s in specs {
        let len = s.byte_len()? as u64;
        if cur > 0 && cur + len > opts.shard_size {
            shards.push(vec![]);
            cur = 0;
        }
        cur += len;
        shards.last_mut().unwrap().push(s);
    }
    let n = shards.len();
    let staged = StagedDir::new(&opts.out, false)?;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut lora_pairs = 0usize;
    // Compute the next tensor while the previous one is written: merge time approaches the
    // larger of I/O and arithmetic instead of their sum. At most two computed tensors wait.
    let order: Vec<&TensorSpec> = shards.iter().flatten().collect();
    let write_result: Result<()> = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Chunk<'_>>>(1);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (store, adapters, plan, order_ref) = (&store, &adapters, &plan, &order);
        scope.spawn(move || {
            for spec in order_ref {
                let buf = back_rx.try_recv().unwrap_or_default();
                let r = compute(&spec.name, spec, store, adapters, plan, buf).with_context(|| format!("merging `{}`", spec.name));
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        for (k, shard) in shards.iter().enumerate() {
            let fname = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", k + 1, n) };
            let mut w = StreamWriter::create(&staged.path().join(&fname), shard.clone(), Some(BTreeMap::from([("format".to_string(), "pt".to_string())])))?;
            for spec in shard {
                let chunk = rx.recv().map_err(|_| anyhow::anyhow!("merge worker stopped"))??;
                let module = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
                lora_pairs += adapters.iter().filter(|a| a.lora.contains_key(module)).count();
                match chunk {
                    Chunk::Borrowed(bytes) => {
                        total += bytes.len() as u64;
                        w.write(&spec.name, bytes)?;
                        store.release(&spec.name);
                    }
                    Chunk::Owned(bytes) => {
                        total += bytes.len() as u64;
                        w.write(&spec.name, &bytes)?;
                        let _ = back_tx.send(bytes);
                    }
                }
                weight_map.insert(spec.name.clone(), fname.clone().into());
            }
            w.finish()?;
        }
        Ok(())
    });
    write_result?;
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::io::atomic::write(&staged.path().join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    let mut out_cfg = cfg.clone();
    out_cfg.vocab_size = Some(plan.embed_rows);
    out_cfg.tie_word_embeddings = Some(plan.tied_out);
    if let Some(d) = opts.dtype {
        let name = match d {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        };
        for key in ["torch_dtype", "dtype"] {
            if out_cfg.extra.contains_key(key) || key == "torch_dtype" {
                out_cfg.extra.insert(key.into(), name.into());
            }
        }
    }
    out_cfg.save(staged.path())?;
    if opts.base.join("generation_config.json").exists() {
        std::fs::copy(opts.base.join("generation_config.json"), staged.path().join("generation_config.json"))?;
    }
    if let Some(d) = &tok_dir {
        for f in TOKENIZER_FILES {
            if d.join(f).exists() {
                std::fs::copy(d.join(f), staged.path().join(f))?;
            }
        }
    }
    let out = staged.commit()?;
    Ok(MergeReport {
        out,
        tensors: plan.specs.len(),
        lora_pairs_merged: lora_pairs,
        shards: n,
        vocab_size: plan.embed_rows,
        tie_word_embeddings: plan.tied_out,
        bytes_written: total,
        tokenizer_from: tok_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_merge_equals_naive() {
        let (out, inp, r) = (70, 33, 5); // not multiples of the block size
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..r * inp).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..out * r).map(|i| (i as f32 * 0.23).sin()).collect();
        let l = HostLora { a: a.clone(), b: b.clone(), r, scale: 0.5 };
        for (wt, ot) in [(FloatType::F32, FloatType::F32), (FloatType::F16, FloatType::F32), (FloatType::F32, FloatType::BF16)] {
            let got_bytes = merge_lora_bytes(&encode_f32(&w, wt), wt, out, inp, std::slice::from_ref(&l), ot);
            let mut got = vec![0f32; out * inp];
            decode_into(&got_bytes, ot, &mut got);
            let mut w_in = vec![0f32; out * inp];
            decode_into(&encode_f32(&w, wt), wt, &mut w_in);
            for o in 0..out {
                for i in 0..inp {
                    let d: f32 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                    let want = w_in[o * inp + i] + 0.5 * d;
                    let tol = if ot == FloatType::BF16 { 1e-2 * want.abs().max(1.0) } else { 1e-5 };
                    assert!((got[o * inp + i] - want).abs() <= tol, "{wt:?}->{ot:?} [{o},{i}]: {} vs {want}", got[o * inp + i]);
                }
            }
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("lots").is_err());
    }
}

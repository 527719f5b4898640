//! The base model that cross-tokenizer distillation reads (`[[data]] chain_distill`), and on
//! the CPU self-distillation (`[[data]] self_distill`, where the snapshot rounds as training's
//! products do: `train::run::same_rounding`): a snapshot of the training model's frozen
//! weights with every LoRA branch and every new vocabulary row left out, on the plain
//! (non-autodiff) device.
//!
//! It reads every Chinese row a second time in the old tokenization, 2.3× as many tokens as
//! the row, so on the CPU it was most of a step's time (1.6–2.4 s of a row against ~3 s for
//! the step itself). `[train] teacher` says how its weights are held:
//! - `auto` (the default): on the CPU, every projection whose f32 weights lie on a Q4_1 grid
//!   (a model imported from a Q4_1 GGUF, such as the quickstart's SmolLM2, whose 210
//!   projections all do) in Q4_1, which holds them exactly, and the rest as `q8_0` does; the
//!   old vocabulary rows in Q8_0 (SmolLM2's table is Q8_0 in its GGUF, so exact too). So the
//!   targets are the exact base's up to the activations' 8-bit rounding, and the 4-bit
//!   products are a little faster than Q8_0's (1.2× on a 2-core AVX2 EPYC, a few per cent of
//!   the teacher's time: BENCHMARKS.md, "An exact teacher"). Elsewhere (a GPU, fp16/bf16
//!   weights) `dense`;
//! - `q8_0`: every projection and the old vocabulary rows quantized to Q8_0 once, when
//!   training starts, so that the pass runs in the quantized kernels that inference uses, at
//!   prompt speed instead of the f32 GEMM's;
//! - `dense`: the frozen weights as they are (the default on a GPU, where the quantized
//!   kernels do not run), so the targets are the exact base's.
//!
//! Q8_0 keeps a block's 32 values to 8 bits under one scale, about what llama.cpp's Q8_0
//! costs in perplexity (nothing measurable on SmolLM2). On the sharpened tiny fixture the
//! targets move by 2.5e-2 at most per probability (2e-3 nats of KL;
//! `teacher_q8_0_is_the_base_within_rounding` in `tests/distill.rs`); the quickstart trained
//! against it ends at the dense teacher's validation figures to the third digit
//! (BENCHMARKS.md, "A Q8_0 teacher").

use super::recipe::TeacherWeights;
use crate::ggml::{QType, QuantMatrix};
use crate::model::linear::Frozen;
use crate::model::{Llama, TokenTable};
use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};

/// The base model of the distillation terms (see the module documentation).
pub struct BaseModel {
    model: Llama,
    device: Device,
    quantized: bool,
    /// How the weights are held, for the run's log.
    form: String,
}

impl BaseModel {
    /// Takes the snapshot of `model` (on the training device `device`) in the form `weights`
    /// asks for; `Auto` quantizes where the frozen weights are f32 on the CPU, each projection
    /// to Q4_1 where that is exact ([`exact_q4_1`]), else to Q8_0. The token tables
    /// keep their first `old_vocab` rows, the base's. `refitted`: old head rows that `vocab
    /// resize --init distill` refitted in `model`, and the base's values of them `[n, hidden]`,
    /// which the snapshot's head takes back, so that it is the base there too.
    pub fn new(model: &Llama, old_vocab: usize, weights: TeacherWeights, refitted: Option<(&[usize], &Tensor<2>)>, device: &Device) -> Result<Self> {
        let inner = device.clone().inner();
        let mut m = model.valid();
        for layer in &mut m.layers {
            for (_, lin) in layer.projections_mut() {
                lin.lora.clear();
                lin.tap = None;
            }
        }
        let on_cpu_f32 = m.layers.first().and_then(|l| l.projections()[0].1.weight.as_dense()).is_some_and(|p| crate::kernels::flex_f32(&p.val()).is_some());
        let quantized = match weights {
            TeacherWeights::Auto => on_cpu_f32,
            TeacherWeights::Dense => false,
            TeacherWeights::Q8_0 => true,
        };
        let exact_first = weights == TeacherWeights::Auto;
        // (Q4_1 matrices, Q8_0 matrices, Q8_0 ones that hold their f32 values exactly)
        let mut counts = (0usize, 0usize, 0usize);
        let mut quantize = |w: Tensor<2>, what: &str| -> Result<Frozen> {
            let [r, c] = w.dims();
            let v = w.cast(FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading {what}: {e:?}"))?;
            if let Some(q) = exact_first.then(|| exact_q4_1(r, c, &v)).flatten() {
                counts.0 += 1;
                return Ok(Frozen::quant(q, &inner));
            }
            let q = QuantMatrix::quantize(QType::Q8_0, r, c, &v).with_context(|| format!("quantizing {what} [{r}, {c}] to Q8_0 for the distillation teacher (use `[train] teacher = \"dense\"`)"))?;
            counts.1 += 1;
            if q.dequantize() == v {
                counts.2 += 1;
            }
            Ok(Frozen::quant(q, &inner))
        };
        // The old rows only: the teacher reads old ids, and its head is the frozen part.
        let mut old_rows = |t: &TokenTable, head: bool| -> Result<TokenTable> {
            let refit = refitted.filter(|_| head);
            if t.quant.is_some() {
                anyhow::ensure!(refit.is_none(), "refitted head rows in a quantized table: train on the f32 model");
                return Ok(t.clone());
            }
            let [rows, hidden] = t.base.val().dims();
            anyhow::ensure!(rows >= old_vocab, "the token table's frozen part holds {rows} rows, fewer than the base vocabulary's {old_vocab}");
            let mut base = t.base.val().slice([0..old_vocab, 0..hidden]);
            if let Some((ids, values)) = refit {
                base = with_rows(base, ids, values)?;
            }
            Ok(if quantized && hidden.is_multiple_of(QType::Q8_0.block()) { TokenTable::from_frozen(quantize(base, "the token table")?) } else { TokenTable::from_frozen(Frozen::dense(base)) })
        };
        // A tied table is the head too.
        let tied = m.lm_head.is_none();
        m.embed_tokens = old_rows(&m.embed_tokens, tied)?;
        m.lm_head = m.lm_head.as_ref().map(|t| old_rows(t, true)).transpose()?;
        if quantized {
            for (i, layer) in m.layers.iter_mut().enumerate() {
                for (name, lin) in layer.projections_mut() {
                    // Rows must be whole 32-value blocks; a narrower projection stays dense.
                    if let Frozen::Dense(p) = &lin.weight {
                        if p.val().dims()[1].is_multiple_of(QType::Q8_0.block()) {
                            lin.weight = quantize(p.val(), &format!("layer {i} {name}"))?;
                        }
                    }
                }
            }
        }
        let form = if quantized {
            let (q4, q8, q8_exact) = counts;
            let matrices = |n: usize| if n == 1 { "1 matrix".to_string() } else { format!("{n} matrices") };
            let mut parts = Vec::new();
            if q4 > 0 {
                parts.push(format!("Q4_1 for {} (the base's values exactly)", matrices(q4)));
            }
            if q8 > 0 {
                parts.push(format!("Q8_0 for {} ({q8_exact} of them exactly)", matrices(q8)));
            }
            format!("the base model's weights in {}", parts.join(" and "))
        } else {
            "the base model's weights as they are".to_string()
        };
        Ok(BaseModel { model: m, device: inner, quantized, form })
    }

    /// How the snapshot holds its weights, in words (the run logs it once).
    pub fn describe(&self) -> &str {
        &self.form
    }

    /// The plain device the snapshot runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the snapshot runs on the CPU's fused f32 kernels, where the distillation
    /// targets are built on the host (elsewhere they stay on the device).
    pub fn on_host(&self) -> bool {
        Self::host_device(&self.device)
    }

    /// Whether a snapshot on `device` (plain or autodiff) would run [`Self::on_host`].
    pub fn host_device(device: &Device) -> bool {
        crate::kernels::flex_f32(&Tensor::<1>::zeros([1], &device.clone().inner())).is_some()
    }

    /// The width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        self.model.config.hidden_size
    }

    /// Whether the projections run in Q8_0.
    pub fn quantized(&self) -> bool {
        self.quantized
    }

    /// The base's logits over the old vocabulary `[rows, longest, old rows]` after each old id
    /// of each row, f32 on the plain device, in one pass; with `tap`, also its residual stream
    /// after that many layers `[rows, longest, hidden]` f32 (see [`Llama::hidden_tapped`]).
    /// Shorter rows are padded on the right with their last id: attention is causal, so no
    /// real position reads the padding, and its outputs are there only to be ignored.
    pub fn logits_rows(&self, rows: &[&[u32]], tap: Option<usize>) -> (Tensor<3>, Option<Tensor<3>>) {
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let ids: Vec<i64> = rows.iter().flat_map(|r| (0..l).map(move |i| r.get(i).or(r.last()).copied().unwrap_or(0) as i64)).collect();
        let ids: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [rows.len(), l]), &self.device);
        let m = &self.model;
        let (h, tapped) = m.hidden_tapped(m.embed_tokens.embed(ids), None, tap);
        (m.lm_head.as_ref().unwrap_or(&m.embed_tokens).project_base(h).cast(FloatDType::F32), tapped.map(|x| x.cast(FloatDType::F32)))
    }
}

/// `v` (`[rows, cols]` f32) as a Q4_1 matrix if that reproduces every value exactly, which it
/// does for weights dequantized from Q4_1 ([`QuantMatrix::quantize_exact`]); `None` otherwise.
/// The check costs a quantization and a dequantization per matrix, once per run.
pub fn exact_q4_1(rows: usize, cols: usize, v: &[f32]) -> Option<QuantMatrix> {
    QuantMatrix::quantize_exact(QType::Q4_1, rows, cols, v)
}

/// `t` `[rows, hidden]` with rows `ids` replaced by `values` `[ids.len(), hidden]` (host copies,
/// once, when the snapshot is taken), in `t`'s dtype and on its device.
fn with_rows(t: Tensor<2>, ids: &[usize], values: &Tensor<2>) -> Result<Tensor<2>> {
    let [rows, hidden] = t.dims();
    anyhow::ensure!(values.dims() == [ids.len(), hidden], "refitted rows: {} ids but values {:?} for a table of width {hidden}", ids.len(), values.dims());
    let (dtype, device) = (t.dtype(), t.device());
    let read = |x: Tensor<2>| x.cast(FloatDType::F32).try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading a token table: {e:?}"));
    let (mut host, vals) = (read(t)?, read(values.clone())?);
    for (&r, v) in ids.iter().zip(vals.chunks_exact(hidden)) {
        anyhow::ensure!(r < rows, "refitted row {r} is past the base vocabulary's {rows} rows");
        host[r * hidden..(r + 1) * hidden].copy_from_slice(v);
    }
    let t: Tensor<2> = Tensor::from_data(TensorData::new(host, [rows, hidden]), &device);
    Ok(t.cast(crate::kernels::float_dtype(dtype)))
}

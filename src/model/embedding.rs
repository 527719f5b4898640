//! A token table that serves both as the input embedding and as the LM head.
//!
//! Rows are held in two parts: `base` (the original vocabulary) and `extra` (rows added by
//! vocabulary extension). In `new_rows` training only `extra` requires gradients, so old rows
//! stay bit-identical and only new rows are saved; in `all` mode `extra` is empty and `base`
//! trains. Keeping the split inside the lookup (two gathers) avoids concatenating a
//! multi-hundred-megabyte table on every forward pass.
//!
//! New rows compute in f32 whatever the activation dtype: their gradients (scatter-adds over
//! every position that uses a new token, and the head's `dlogitsᵀ·h`) then accumulate in f32
//! and cannot overflow fp16 under the loss scale. This is half of how fresh rows are kept from
//! killing fp16 training (the other half is the loss scaler, `crate::train::scaler`).

use crate::kernels::gemm::matmul_t;
use super::linear::{Frozen, QuantWeight};
use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};
use crate::kernels::bf16::FrozenBf16;
use crate::kernels::frozen::FrozenPacked;
use std::sync::Arc;

#[derive(Module, Debug)]
pub struct TokenTable {
    /// `[base_rows, hidden]`.
    pub base: Param<Tensor<2>>,
    /// `[extra_rows, hidden]`, ids `base_rows..`.
    pub extra: Option<Param<Tensor<2>>>,
    /// New rows compute in f32 (the default). `false` runs them in the activation dtype like
    /// everything else — what a DeepSpeed/GradScaler setup does — for the scaler benchmark.
    pub extra_f32: bool,
    /// A quantized table (from a quantized model folder). It then holds every row, `base` has
    /// none and `extra` is `None`: lookups dequantize only the rows asked for, and the LM-head
    /// product runs in the quantized kernels.
    pub quant: Option<QuantWeight>,
    /// The frozen `base` rows packed for the head's product in training (`[train]
    /// frozen_products`, bf16 or int8; [`crate::kernels::frozen`]); `base` stays the table's
    /// weight.
    #[module(skip)]
    pub packed: Option<Arc<FrozenPacked>>,
}

impl TokenTable {
    pub fn new(weight: Tensor<2>) -> Self {
        TokenTable { base: Param::from_tensor(weight).set_require_grad(false), extra: None, extra_f32: true, quant: None, packed: None }
    }

    /// A frozen table from a loaded weight, dense or quantized.
    pub fn from_frozen(w: Frozen) -> Self {
        match w {
            Frozen::Dense(p) => TokenTable { base: p, extra: None, extra_f32: true, quant: None, packed: None },
            Frozen::Quant(q) => {
                let hidden = q.matrix.cols();
                let empty = Tensor::zeros([0, hidden], &q.device);
                TokenTable { base: Param::from_tensor(empty).set_require_grad(false), extra: None, extra_f32: true, quant: Some(q), packed: None }
            }
        }
    }

    pub fn base_rows(&self) -> usize {
        match &self.quant {
            Some(q) => q.matrix.rows(),
            None => self.base.shape().dims::<2>()[0],
        }
    }

    pub fn rows(&self) -> usize {
        self.base_rows() + self.extra.as_ref().map(|e| e.shape().dims::<2>()[0]).unwrap_or(0)
    }

    pub fn hidden(&self) -> usize {
        match &self.quant {
            Some(q) => q.matrix.cols(),
            None => self.base.shape().dims::<2>()[1],
        }
    }

    /// The whole table `[rows, hidden]` (for saving and merging, not the hot path).
    pub fn weight(&self) -> Tensor<2> {
        if let Some(q) = &self.quant {
            return Frozen::Quant(q.clone()).val();
        }
        match &self.extra {
            None => self.base.val(),
            Some(e) => Tensor::cat(vec![self.base.val(), e.val().cast(crate::kernels::float_dtype(self.base.val().dtype()))], 0),
        }
    }

    /// Packs the frozen `base` rows for the head's product in training (`[train]
    /// frozen_products`: `products` is `bf16` or `int8`; anything else packs nothing), or drops
    /// the packing where `base` trains or is quantized. The packing belongs to this table: a
    /// stage that rebuilds the tables (`crate::lora::set_table_modes`) packs the new ones again.
    /// Int8 holds the rows in Q8_0 (SmolLM2's table is Q8_0 in its GGUF, so exactly) and their
    /// transpose in Q8_0; a table whose dimensions are not whole 32-value blocks keeps the f32
    /// product.
    pub fn pack_base(&mut self, products: &str) -> anyhow::Result<()> {
        self.packed = None;
        if !matches!(products, "bf16" | "int8") || self.quant.is_some() || self.base.is_require_grad() {
            return Ok(());
        }
        let w = self.base.val();
        let [rows, d] = w.dims();
        let v = w.try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading the LM head's rows for their {products} copies: {e:?}"))?;
        self.packed = match products {
            "bf16" => Some(FrozenPacked::Bf16(FrozenBf16::new(&v, rows, d))),
            _ => crate::kernels::frozen::FrozenInt8::new(&v, rows, d).map(FrozenPacked::Int8),
        }
        .map(Arc::new);
        Ok(())
    }

    /// Embeds ids `[B, T]` → `[B, T, hidden]`, in the table's own dtype (the caller casts).
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        if let Some(q) = &self.quant {
            let [b, t] = ids.dims();
            let host: Vec<usize> = ids.into_data().iter::<i64>().map(|x| x as usize).collect();
            let rows = q.matrix.dequantize_rows(&host).expect("token ids are checked against the vocabulary before the forward pass");
            return Tensor::from_data(TensorData::new(rows, [b, t, q.matrix.cols()]), &q.device);
        }
        let base = self.base.val();
        match &self.extra {
            None => embedding(base, ids),
            Some(extra) => {
                let n = self.base_rows() as i64;
                let dt = crate::kernels::float_dtype(base.dtype());
                let is_new = ids.clone().greater_equal_elem(n);
                let old_ids = ids.clone().clamp_max(n - 1);
                let new_ids = (ids - n).clamp_min(0);
                let e_old = embedding(base, old_ids);
                let new_dt = if self.extra_f32 { burn::tensor::FloatDType::F32 } else { dt };
                let e_new = embedding(extra.val().cast(new_dt), new_ids).cast(dt);
                let [b, t, d] = e_old.dims();
                e_old.mask_where(is_new.unsqueeze_dim::<3>(2).expand([b, t, d]), e_new)
            }
        }
    }

    /// LM-head projection onto the frozen part only (`[B, T, base_rows]`, the activation dtype):
    /// what a teacher that must not see the trainable rows reads.
    pub fn project_base(&self, h: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = h.dims();
        let h2 = h.reshape([b * t, d]);
        let logits = match &self.quant {
            Some(q) => Frozen::Quant(q.clone()).matmul_t(h2),
            None => matmul_t(h2.clone(), self.base.val().cast(crate::kernels::float_dtype(h2.dtype()))),
        };
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }

    /// LM-head projection `[B, T, hidden]` → `[B, T, rows]`; f32 when the table has new rows.
    pub fn project(&self, h: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = h.dims();
        let h2 = h.reshape([b * t, d]);
        if let Some(q) = &self.quant {
            let logits = Frozen::Quant(q.clone()).matmul_t(h2);
            let v = logits.dims()[1];
            return logits.reshape([b, t, v]);
        }
        // A trainable table is an f32 master; the product runs in the activation dtype.
        let base = self.base.val().cast(crate::kernels::float_dtype(h2.dtype()));
        let old_rows = |h2: Tensor<2>| match self.packed.as_ref().and_then(|p| crate::kernels::frozen::frozen_matmul_t(&h2, p)) {
            Some(y) => y,
            None => matmul_t(h2, base),
        };
        let logits = match &self.extra {
            None => old_rows(h2),
            Some(extra) => {
                let f32 = burn::tensor::FloatDType::F32;
                let new_dt = if self.extra_f32 { f32 } else { crate::kernels::float_dtype(h2.dtype()) };
                let extra = extra.val().cast(new_dt);
                let old = old_rows(h2.clone()).cast(f32);
                Tensor::cat(vec![old, matmul_t(h2.cast(new_dt), extra).cast(f32)], 1)
            }
        };
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }
}

/// What [`TokenTable::rescue_new_rows`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRescue {
    /// New rows scaled down (or cleared of non-finite values).
    pub rows: usize,
    /// The largest RMS among them before the rescue (∞ for a non-finite row).
    pub max_rms: f32,
    /// The RMS they were scaled to: the mean RMS of the old rows.
    pub target_rms: f32,
}

impl TokenTable {
    /// Scales every new row whose RMS exceeds `factor` × the old rows' mean RMS down to that
    /// mean, and zeroes non-finite values first. The trainer calls this when a forward pass is
    /// non-finite in fp16 training: no loss scale can fix activations that overflow because
    /// fresh rows are orders of magnitude larger than the rows the network was trained on, and
    /// halving the scale forever is how such runs died. `None` when the table has no trainable
    /// new rows or none is an outlier (the overflow is somewhere else).
    pub fn rescue_new_rows(&mut self, factor: f32) -> Option<RowRescue> {
        let extra = self.extra.as_mut()?;
        let [n, d] = extra.shape().dims::<2>();
        let base: Vec<f32> = self.base.val().try_into_vec_as::<f32>().ok()?;
        let target = mean_row_rms(&base, d)?;
        let t = extra.val();
        let device = t.device();
        let mut rows: Vec<f32> = t.clone().try_into_vec_as::<f32>().ok()?;
        let r = rescale_outlier_rows(&mut rows, d, target, factor);
        if r.rows == 0 {
            return None;
        }
        let id = extra.id;
        let dtype = crate::kernels::float_dtype(t.dtype());
        let fresh = Tensor::<2>::from_data(TensorData::new(rows, [n, d]), &device).cast(dtype);
        *extra = Param::initialized(id, fresh.require_grad());
        Some(r)
    }
}

/// Mean over rows of sqrt(mean(x²)); `None` for an empty or non-finite table.
pub fn mean_row_rms(table: &[f32], d: usize) -> Option<f32> {
    if d == 0 || table.is_empty() {
        return None;
    }
    let rows = table.len() / d;
    let sum: f64 = table.chunks_exact(d).map(row_rms).sum();
    let m = (sum / rows as f64) as f32;
    m.is_finite().then_some(m)
}

fn row_rms(r: &[f32]) -> f64 {
    (r.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / r.len() as f64).sqrt()
}

/// Zeroes non-finite values of each row and scales rows whose RMS exceeds `factor · target` (or
/// that held non-finite values) to RMS `target`, keeping their direction.
pub fn rescale_outlier_rows(rows: &mut [f32], d: usize, target: f32, factor: f32) -> RowRescue {
    let mut out = RowRescue { rows: 0, max_rms: 0.0, target_rms: target };
    for r in rows.chunks_exact_mut(d) {
        let bad = r.iter().any(|x| !x.is_finite());
        let rms = if bad { f64::INFINITY } else { row_rms(r) };
        if !bad && rms <= (factor * target) as f64 {
            continue;
        }
        r.iter_mut().filter(|x| !x.is_finite()).for_each(|x| *x = 0.0);
        let now = row_rms(r);
        let k = if now > 0.0 { target as f64 / now } else { 0.0 };
        r.iter_mut().for_each(|x| *x = (*x as f64 * k) as f32);
        out.rows += 1;
        out.max_rms = out.max_rms.max(rms as f32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlier_rows_are_scaled_to_the_target_and_keep_their_direction() {
        // d = 2: rms([3, 4]) = sqrt(12.5); rms([30, 40]) = sqrt(1250); a non-finite row.
        let mut rows = vec![3.0, 4.0, 30.0, 40.0, f32::NAN, 2.0];
        let target = 12.5f32.sqrt();
        let r = rescale_outlier_rows(&mut rows, 2, target, 4.0);
        assert_eq!(r.rows, 2);
        assert!(r.max_rms.is_infinite());
        assert_eq!(&rows[..2], &[3.0, 4.0], "rows within factor × target are untouched");
        assert!((rows[2] - 3.0).abs() < 1e-5 && (rows[3] - 4.0).abs() < 1e-5, "{rows:?}");
        // [0, 2] scaled to rms sqrt(12.5): [0, 5].
        assert!(rows[4] == 0.0 && (rows[5] - 5.0).abs() < 1e-5, "{rows:?}");
    }

    /// Makes a packing of `rows × cols` values.
    type Packer = fn(&[f32], usize, usize) -> FrozenPacked;

    /// The head `[n, old + new]` of a table with `old` frozen rows and `new` trainable ones, the
    /// old ones read through `pack` (or the f32 product), with fixed values: its logits, the
    /// hidden states' gradient and the new rows' gradient under a fixed upstream gradient.
    fn head_through(pack: Option<Packer>, (old, new, d, n): (usize, usize, usize, usize)) -> [Vec<f32>; 3] {
        let dev = burn::tensor::Device::flex().autodiff();
        let fixed = |len: usize, seed: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5).collect() };
        let (bv, ev, hv, upv) = (fixed(old * d, 1), fixed(new * d, 2), fixed(n * d, 3), fixed(n * (old + new), 4));
        let t = |v: &Vec<f32>, dims: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v.clone(), dims), &dev);
        let mut table = TokenTable::new(t(&bv, [old, d]));
        table.extra = Some(Param::from_tensor(t(&ev, [new, d])).set_require_grad(true));
        table.packed = pack.map(|f| Arc::new(f(&bv, old, d)));
        let h = t(&hv, [n, d]).require_grad();
        let y = table.project(h.clone().reshape([1, n, d]));
        let g = (y.clone().reshape([n, old + new]) * t(&upv, [n, old + new])).sum().backward();
        let e = table.extra.as_ref().unwrap().val();
        let v = |x: Tensor<2>| x.into_data().try_into_vec::<f32>().unwrap();
        [v(y.reshape([n, old + new]).detach()), v(h.grad(&g).unwrap()), v(e.grad(&g).unwrap())]
    }

    /// A packing of the old rows changes the old logits and the hidden states' gradient by at
    /// most its rounding (`tol_y`, `tol_dh`), and was used; the new rows' logits and their
    /// gradient, which never read the packing, are bit for bit the f32 table's.
    fn packing_rounds_only_what_reads_it(pack: Packer, dims: (usize, usize, usize, usize), tol_y: f32, tol_dh: f32) {
        let (old, new, _, n) = dims;
        let ([y32, dh32, de32], [yp, dhp, dep]) = (head_through(None, dims), head_through(Some(pack), dims));
        for i in 0..n {
            let (a, b) = (&yp[i * (old + new)..(i + 1) * (old + new)], &y32[i * (old + new)..(i + 1) * (old + new)]);
            let worst = a[..old].iter().zip(&b[..old]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= tol_y, "old logits of row {i}: off by {worst}, allowed {tol_y}");
            assert_eq!(&a[old..], &b[old..], "new logits of row {i}");
        }
        assert!(yp != y32, "the packing was not used");
        let worst = dhp.iter().zip(&dh32).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= tol_dh && dhp != dh32, "dh: off by {worst}, allowed {tol_dh}");
        assert_eq!(dep, de32, "the new rows' gradient does not read the packing");
    }

    /// bf16 packing: each term rounds to bf16 (8 bits of mantissa) on both sides.
    #[test]
    fn bf16_old_rows_round_only_what_reads_them() {
        if !crate::kernels::bf16::available() {
            eprintln!("this CPU has no AVX512-BF16: the head's bf16 path was not run");
            return;
        }
        let (old, new, d, n) = (70, 9, 40, 13);
        packing_rounds_only_what_reads_it(|v, r, c| FrozenPacked::Bf16(FrozenBf16::new(v, r, c)), (old, new, d, n), d as f32 * 0.25 / 128.0, (old + new) as f32 * 0.25 / 128.0);
    }

    /// int8 copies (`frozen_products = "int8"`, the quantized kernels, which run on every CPU):
    /// the rows and the activations are rounded to 8 bits per block of 32, each to at most
    /// half a step of its block's largest value (|values| ≤ 0.5 here, so 0.5/254 each); a
    /// term of the sums is off by at most 2 · 0.5 · 0.5/254. Both dimensions are whole blocks.
    #[test]
    fn int8_old_rows_round_only_what_reads_them() {
        let (old, new, d, n) = (64, 9, 64, 13);
        let pack = |v: &[f32], r: usize, c: usize| FrozenPacked::Int8(crate::kernels::frozen::FrozenInt8::new(v, r, c).expect("whole blocks"));
        packing_rounds_only_what_reads_it(pack, (old, new, d, n), d as f32 * 0.5 / 254.0, old as f32 * 0.5 / 254.0);
    }

    #[test]
    fn mean_row_rms_of_known_rows() {
        let m = mean_row_rms(&[3.0, 4.0, 0.0, 0.0], 2).unwrap();
        assert!((m - 12.5f32.sqrt() / 2.0).abs() < 1e-6);
        assert_eq!(mean_row_rms(&[], 2), None);
        assert_eq!(mean_row_rms(&[f32::INFINITY, 0.0], 2), None);
    }
}

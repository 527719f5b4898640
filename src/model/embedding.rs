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

use super::linear::{Frozen, QuantWeight};
use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};

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
}

impl TokenTable {
    pub fn new(weight: Tensor<2>) -> Self {
        TokenTable { base: Param::from_tensor(weight).set_require_grad(false), extra: None, extra_f32: true, quant: None }
    }

    /// A frozen table from a loaded weight, dense or quantized.
    pub fn from_frozen(w: Frozen) -> Self {
        match w {
            Frozen::Dense(p) => TokenTable { base: p, extra: None, extra_f32: true, quant: None },
            Frozen::Quant(q) => {
                let hidden = q.matrix.cols();
                let empty = Tensor::zeros([0, hidden], &q.device);
                TokenTable { base: Param::from_tensor(empty).set_require_grad(false), extra: None, extra_f32: true, quant: Some(q) }
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
            Some(e) => Tensor::cat(vec![self.base.val(), e.val().cast(super::norm::float_dtype(self.base.val().dtype()))], 0),
        }
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
                let dt = super::norm::float_dtype(base.dtype());
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
        let base = self.base.val().cast(super::norm::float_dtype(h2.dtype()));
        let logits = match &self.extra {
            None => h2.matmul(base.transpose()),
            Some(extra) => {
                let f32 = burn::tensor::FloatDType::F32;
                let new_dt = if self.extra_f32 { f32 } else { super::norm::float_dtype(h2.dtype()) };
                let extra = extra.val().cast(new_dt);
                let old = h2.clone().matmul(base.transpose()).cast(f32);
                Tensor::cat(vec![old, h2.cast(new_dt).matmul(extra.transpose()).cast(f32)], 1)
            }
        };
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }
}

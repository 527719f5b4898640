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

use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor};

#[derive(Module, Debug)]
pub struct TokenTable {
    /// `[base_rows, hidden]`.
    pub base: Param<Tensor<2>>,
    /// `[extra_rows, hidden]`, ids `base_rows..`.
    pub extra: Option<Param<Tensor<2>>>,
    /// New rows compute in f32 (the default). `false` runs them in the activation dtype like
    /// everything else — what a DeepSpeed/GradScaler setup does — for the scaler benchmark.
    pub extra_f32: bool,
}

impl TokenTable {
    pub fn new(weight: Tensor<2>) -> Self {
        TokenTable { base: Param::from_tensor(weight).set_require_grad(false), extra: None, extra_f32: true }
    }

    pub fn base_rows(&self) -> usize {
        self.base.shape().dims::<2>()[0]
    }

    pub fn rows(&self) -> usize {
        self.base_rows() + self.extra.as_ref().map(|e| e.shape().dims::<2>()[0]).unwrap_or(0)
    }

    pub fn hidden(&self) -> usize {
        self.base.shape().dims::<2>()[1]
    }

    /// The whole table `[rows, hidden]` (for saving and merging, not the hot path).
    pub fn weight(&self) -> Tensor<2> {
        match &self.extra {
            None => self.base.val(),
            Some(e) => Tensor::cat(vec![self.base.val(), e.val().cast(super::norm::float_dtype(self.base.val().dtype()))], 0),
        }
    }

    /// Embeds ids `[B, T]` → `[B, T, hidden]`, in the table's own dtype (the caller casts).
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
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

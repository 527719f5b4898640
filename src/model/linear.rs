//! A bias-free projection with a frozen base weight in HF layout `[out, in]`, plus any number
//! of LoRA branches (see [`crate::lora`]). This is where LoRA is applied in the forward pass,
//! and where a quantized weight replaces the dense product (see [`crate::quant`]). An optional
//! [`InputObserver`] sees what the projection multiplies, for `linly-lora imatrix`.

use super::LoraBranch;
use crate::ggml::QuantMatrix;
use burn::module::{Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use std::sync::Arc;

/// A frozen `[out, in]` weight: a dense tensor, or a quantized matrix on the host whose
/// product runs in [`crate::ggml::kernels`] (never dequantized whole on the hot path).
#[derive(Module, Debug)]
pub enum Frozen {
    Dense(Param<Tensor<2>>),
    Quant(QuantWeight),
}

/// A quantized weight and the device its products are returned on. It is not a parameter:
/// nothing trains it, and autodiff sees its products as constants.
#[derive(Clone, Debug)]
pub struct QuantWeight {
    pub matrix: Arc<QuantMatrix>,
    pub device: Device,
}

impl Module for QuantWeight {
    fn visit<V: ModuleVisitor>(&self, _visitor: &mut V) {}
    fn map<M: ModuleMapper>(self, _mapper: &mut M) -> Self {
        self
    }
    fn to_device(self, _: &Device) -> Self {
        self
    }
    fn fork(self, _: &Device) -> Self {
        self
    }
    fn collect_devices(&self, devices: Devices) -> Devices {
        devices
    }
    fn materialize(self) -> Self {
        self
    }
    fn valid(&self) -> Self {
        self.clone()
    }
    fn train(self) -> Self {
        self
    }
}

impl ModuleDisplayDefault for QuantWeight {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_single(&format!("{:?}", self.matrix)).optional()
    }
}

impl ModuleDisplay for QuantWeight {}

impl std::fmt::Display for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.matrix)
    }
}

impl Frozen {
    pub fn dense(t: Tensor<2>) -> Self {
        Frozen::Dense(Param::from_tensor(t).set_require_grad(false))
    }

    pub fn quant(m: QuantMatrix, device: &Device) -> Self {
        Frozen::Quant(QuantWeight { matrix: Arc::new(m), device: device.clone() })
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Frozen::Dense(p) => p.shape().dims::<2>(),
            Frozen::Quant(q) => [q.matrix.rows(), q.matrix.cols()],
        }
    }

    /// The dense parameter, `None` for a quantized weight.
    pub fn as_dense(&self) -> Option<&Param<Tensor<2>>> {
        match self {
            Frozen::Dense(p) => Some(p),
            Frozen::Quant(_) => None,
        }
    }

    /// The whole weight as a tensor; a quantized one is dequantized (for saving and merging,
    /// not the hot path).
    pub fn val(&self) -> Tensor<2> {
        match self {
            Frozen::Dense(p) => p.val(),
            Frozen::Quant(q) => {
                let m = &q.matrix;
                Tensor::from_data(TensorData::new(m.dequantize(), [m.rows(), m.cols()]), &q.device)
            }
        }
    }

    /// `x · Wᵀ` for `x` `[n, in]`, in `x`'s dtype.
    pub fn matmul_t(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Frozen::Dense(p) => crate::kernels::gemm::matmul_t(x, p.val()),
            Frozen::Quant(q) => {
                let [n, _] = x.dims();
                let dtype = x.dtype();
                let y = crate::kernels::with_host_f32(x, |host| q.matrix.matmul(host, n));
                let t: Tensor<2> = Tensor::from_data(TensorData::new(y, [n, q.matrix.rows()]), &q.device);
                if dtype != burn::tensor::DType::F32 { t.cast(crate::kernels::float_dtype(dtype)) } else { t }
            }
        }
    }
}

/// Sees every input a projection multiplies, `[rows, in]`, before the product. The importance
/// matrix collector (`crate::quant::imatrix::ColumnTap`) is one; the trait is the model's so
/// that the model does not depend on its observers.
pub trait InputObserver: Send + Sync + std::fmt::Debug {
    fn observe(&self, x: &Tensor<2>);
}

#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored in safetensors; never transposed in memory.
    pub weight: Frozen,
    /// Stacked adapters apply as a sum of rank-r updates, never as a dense ΔW.
    pub lora: Vec<LoraBranch>,
    /// Installed only while an importance matrix is collected (see [`InputObserver`]).
    #[module(skip)]
    pub tap: Option<Arc<dyn InputObserver>>,
    /// Copies of the frozen weight that training's two products with it run on (`[train]
    /// frozen_products`; [`crate::kernels::frozen`]); the dense weight stays the model's.
    #[module(skip)]
    pub packed: Option<Arc<crate::kernels::frozen::FrozenPacked>>,
}

impl Linear {
    pub fn new(weight: Tensor<2>) -> Self {
        Linear { weight: Frozen::dense(weight), lora: Vec::new(), tap: None, packed: None }
    }

    pub fn from_frozen(weight: Frozen) -> Self {
        Linear { weight, lora: Vec::new(), tap: None, packed: None }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x·Wᵀ + Σ s·(dropout(x)·Aᵀ)·Bᵀ` over the last dimension of `x` `[B, T, in]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, i] = x.dims();
        let x2 = x.reshape([b * t, i]);
        if let Some(tap) = &self.tap {
            tap.observe(&x2);
        }
        let out = self.out_features();
        if let (Frozen::Dense(w), [branch]) = (&self.weight, self.lora.as_slice()) {
            // One branch on a dense weight (training, unmerged inference): the fused op on f32
            // flex, else the composition below with the same dropped-out input.
            let xd = branch.dropped_input(&x2);
            if let Some(y) = crate::kernels::lora::lora_linear(&x2, xd.as_ref(), &w.val(), &branch.a.val(), &branch.b.val(), branch.scale, self.packed.as_ref()) {
                return y.reshape([b, t, out]);
            }
            let y = self.weight.matmul_t(x2.clone()) + branch.delta_of_dropped(xd.unwrap_or(x2));
            return y.reshape([b, t, out]);
        }
        let mut y = self.weight.matmul_t(x2.clone());
        for branch in &self.lora {
            y = y + branch.delta(x2.clone());
        }
        y.reshape([b, t, out])
    }
}

impl Linear {
    /// `f(gate(x), up(x))` in one quantized product ([`QuantMatrix::matmul_glu`]) where both
    /// are quantized without adapters or taps and `x` is f32; `None` otherwise (the caller
    /// composes the two projections and `f`, which gives the same values).
    pub fn forward_glu(gate: &Linear, up: &Linear, x: &Tensor<3>, f: &crate::ggml::matrix::GluFn) -> Option<Tensor<3>> {
        let plain = |l: &Linear| l.lora.is_empty() && l.tap.is_none();
        let (Frozen::Quant(g), Frozen::Quant(u)) = (&gate.weight, &up.weight) else { return None };
        if !plain(gate) || !plain(up) || x.dtype() != burn::tensor::DType::F32 {
            return None;
        }
        let [b, t, i] = x.dims();
        let y = crate::kernels::with_host_f32(x.clone().reshape([b * t, i]), |host| QuantMatrix::matmul_glu(&g.matrix, &u.matrix, host, b * t, f))?;
        Some(Tensor::from_data(TensorData::new(y, [b, t, gate.out_features()]), &g.device))
    }

    /// `forward` of several projections that read the same `x` (Q/K/V, gate/up). Quantized
    /// weights without adapters or taps share one quantization of `x` and one thread dispatch
    /// ([`QuantMatrix::matmul_shared`]); anything else runs each projection's own `forward`.
    pub fn forward_shared<const N: usize>(ls: [&Linear; N], x: Tensor<3>) -> [Tensor<3>; N] {
        let mats: Vec<&QuantMatrix> = ls
            .iter()
            // A tapped projection (importance-matrix collection) goes through `forward`, where
            // the tap records its input.
            .filter_map(|l| match (&l.weight, l.lora.is_empty() && l.tap.is_none()) {
                (Frozen::Quant(q), true) => Some(&*q.matrix),
                _ => None,
            })
            .collect();
        if N < 2 || mats.len() != N {
            return ls.map(|l| l.forward(x.clone()));
        }
        let [b, t, i] = x.dims();
        let dtype = x.dtype();
        let device = match &ls[0].weight {
            Frozen::Quant(q) => q.device.clone(),
            Frozen::Dense(_) => unreachable!("all quantized, checked above"),
        };
        let mut ys = crate::kernels::with_host_f32(x.reshape([b * t, i]), |host| QuantMatrix::matmul_shared(&mats, host, b * t)).into_iter();
        ls.map(|l| {
            let y: Tensor<3> = Tensor::from_data(TensorData::new(ys.next().expect("one product per matrix"), [b, t, l.out_features()]), &device);
            if dtype != burn::tensor::DType::F32 { y.cast(crate::kernels::float_dtype(dtype)) } else { y }
        })
    }
}

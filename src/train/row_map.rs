//! New rows that also learn through a map shared by all of them (`[train] row_map_rank`).
//!
//! In a CPU budget training shows most added pieces a handful of times, so a row that learns
//! only from its own gradient stays where it started. Here each new row is
//! `E_i = D_i + Σ_k s · (G_k A_k B_k)_i`: its own part `D_i` plus a low-rank map of fixed
//! features of its spelling in the base vocabulary (`G_k`: the mean, first and last of its
//! sub-tokens' frozen rows). The map's gradient sums over every row, so what the model learns
//! about pieces it sees often moves the rare pieces that are spelt like them (in CJK the code
//! points, and so the UTF-8 bytes, follow the radicals).
//!
//! The table keeps one tensor of rows `E` (the adapter, merge and inference see plain rows):
//! this is a reparametrisation of the update only. AdamW moves `E` by its step on `D` (the
//! rows' own gradient), then `A_k`, `B_k` take their gradients by the chain rule and `E` moves
//! by the change of the map's product. `B_k` starts at zero, so step 0 is the resized model.

use anyhow::Context;
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

/// The spelling features a map reads, per new row.
pub const SLOTS: [&str; 3] = ["mean", "first", "last"];

/// The map's scale `s`. AdamW moves a factor's entries by about the learning rate whatever the
/// gradient's size, so `s` sets how fast the map moves the rows against their own updates: at
/// 4, over a 150-step quickstart run, the map moved the rows by more (RMS 0.022) than their own
/// updates did (0.018). BENCHMARKS.md, "New rows that learn from each other".
const SCALE: f64 = 4.0;

pub struct RowMap {
    /// The table parameter it updates (`model.embed_tokens.new_rows`, `lm_head.new_rows`).
    pub name: String,
    /// `G_k`, `[new rows, hidden]`, one per [`SLOTS`] entry (no autodiff).
    features: Vec<Tensor<2>>,
    /// `[hidden, rank]` and `[rank, hidden]` per slot, trained by AdamW under their own names.
    a: Vec<Param<Tensor<2>>>,
    b: Vec<Param<Tensor<2>>>,
    /// The map's current contribution `Σ s · G_k A_k B_k` to the rows (no autodiff).
    product: Tensor<2>,
}

/// `G_k` for one table: for each new row, the mean, first and last of its sub-tokens' rows
/// among `old` (`[old rows × hidden]`, row-major). A row without sub-tokens gets zeros.
pub fn spelling_features(old: &[f32], hidden: usize, subtokens: &[Vec<u32>]) -> [Vec<f32>; 3] {
    let n = subtokens.len();
    let mut out = [vec![0f32; n * hidden], vec![0f32; n * hidden], vec![0f32; n * hidden]];
    let row = |id: u32| &old[id as usize * hidden..(id as usize + 1) * hidden];
    for (i, ids) in subtokens.iter().enumerate() {
        let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else { continue };
        let span = i * hidden..(i + 1) * hidden;
        let mean = &mut out[0][span.clone()];
        for &id in ids {
            for (m, v) in mean.iter_mut().zip(row(id)) {
                *m += v;
            }
        }
        let inv = 1.0 / ids.len() as f32;
        mean.iter_mut().for_each(|m| *m *= inv);
        out[1][span.clone()].copy_from_slice(row(first));
        out[2][span].copy_from_slice(row(last));
    }
    out
}

impl RowMap {
    /// A map of rank `rank` for the table parameter `name`, whose old rows are `old`. `device`
    /// is the training device (autodiff); `A` is drawn as PEFT draws LoRA's (uniform in
    /// ±1/√hidden), `B` is zero.
    pub fn new(name: &str, old: &[f32], hidden: usize, subtokens: &[Vec<u32>], rank: usize, seed: u64, device: &burn::tensor::Device) -> Self {
        let n = subtokens.len();
        let inner = device.clone().inner();
        let features: Vec<Tensor<2>> = spelling_features(old, hidden, subtokens).into_iter().map(|v| Tensor::from_data(TensorData::new(v, [n, hidden]), &inner)).collect();
        let mut rng = crate::rng::SplitMix::new(seed ^ 0x05ee_d0f0_ab1e);
        let bound = 1.0 / (hidden as f64).sqrt();
        let param = |v: Vec<f32>, shape: [usize; 2]| Param::from_tensor(Tensor::from_inner(Tensor::from_data(TensorData::new(v, shape), &inner)));
        let a = SLOTS.iter().map(|_| param((0..hidden * rank).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect(), [hidden, rank])).collect();
        let b = SLOTS.iter().map(|_| param(vec![0f32; rank * hidden], [rank, hidden])).collect();
        RowMap { name: name.to_string(), features, a, b, product: Tensor::zeros([n, hidden], &inner) }
    }

    /// The map's part of the update for the rows' gradient `g` (`[new rows, hidden]`, unscaled
    /// and clipped, no autodiff): `update(name, factor, gradient)` steps every `A_k`, `B_k` (the
    /// training loop's AdamW, under the names [`Self::factors`] gives), and the change of the
    /// product is returned, to be added to the rows after their own step.
    pub fn step(&mut self, g: &Tensor<2>, mut update: impl FnMut(&str, &mut Param<Tensor<2>>, Tensor<2>)) -> Tensor<2> {
        for (k, (grad_a, grad_b)) in self.grads(g).into_iter().enumerate() {
            update(&format!("{}.row_map.{}.A", self.name, SLOTS[k]), &mut self.a[k], grad_a);
            update(&format!("{}.row_map.{}.B", self.name, SLOTS[k]), &mut self.b[k], grad_b);
        }
        let next = self.product_now();
        let delta = next.clone() - self.product.clone();
        self.product = next;
        delta
    }

    /// `(∂L/∂A_k, ∂L/∂B_k)` per slot from the rows' gradient `g = ∂L/∂E`:
    /// `s · G_kᵀ (g B_kᵀ)` and `s · (G_k A_k)ᵀ g`.
    pub fn grads(&self, g: &Tensor<2>) -> Vec<(Tensor<2>, Tensor<2>)> {
        let s = SCALE;
        (0..SLOTS.len())
            .map(|k| {
                let (a, b) = (self.a[k].val().inner(), self.b[k].val().inner());
                let grad_a = self.features[k].clone().transpose().matmul(g.clone().matmul(b.transpose())) * s;
                let grad_b = self.features[k].clone().matmul(a).transpose().matmul(g.clone()) * s;
                (grad_a, grad_b)
            })
            .collect()
    }

    /// The factors by the names their moments have in the optimizer (`….row_map.mean.A`), for
    /// a checkpoint.
    pub fn factors(&self) -> Vec<(String, Tensor<2>)> {
        let mut out = Vec::new();
        for (k, slot) in SLOTS.iter().enumerate() {
            out.push((format!("{}.row_map.{slot}.A", self.name), self.a[k].val().inner()));
            out.push((format!("{}.row_map.{slot}.B", self.name), self.b[k].val().inner()));
        }
        out
    }

    /// Takes the factors a checkpoint saved ([`Self::factors`]) from `saved`. The rows in the
    /// checkpoint's adapter already hold the map's product, which becomes the product the next
    /// step's change is measured from.
    pub fn restore(&mut self, saved: &mut std::collections::BTreeMap<String, Tensor<2>>) -> anyhow::Result<()> {
        for (k, slot) in SLOTS.iter().enumerate() {
            for (side, p) in [("A", &mut self.a[k]), ("B", &mut self.b[k])] {
                let name = format!("{}.row_map.{slot}.{side}", self.name);
                let t = saved.remove(&name).with_context(|| format!("the checkpoint has no {name}: it was written by a run without [train] row_map_rank; resume with the recipe that wrote it"))?;
                anyhow::ensure!(t.dims() == p.shape().dims::<2>(), "the checkpoint's {name} is {:?} but [train] row_map_rank makes it {:?}; resume with the recipe that wrote it", t.dims(), p.shape().dims::<2>());
                *p = Param::from_tensor(Tensor::from_inner(t));
            }
        }
        self.product = self.product_now();
        Ok(())
    }

    /// `Σ s · G_k A_k B_k` with the current factors.
    pub fn product_now(&self) -> Tensor<2> {
        let mut p: Option<Tensor<2>> = None;
        for k in 0..SLOTS.len() {
            let t = self.features[k].clone().matmul(self.a[k].val().inner()).matmul(self.b[k].val().inner()) * SCALE;
            p = Some(match p {
                Some(p) => p + t,
                None => t,
            });
        }
        p.expect("SLOTS is not empty")
    }
}

/// The run's row maps, kept beside the optimizer: empty until the first stage that trains new
/// rows builds them ([`Self::start`]), and the factors a checkpoint held until then.
#[derive(Default)]
pub struct RowMaps {
    maps: Vec<RowMap>,
    /// Factors read from a checkpoint, by name ([`RowMap::factors`]), until [`Self::start`].
    saved: std::collections::BTreeMap<String, Tensor<2>>,
}

impl RowMaps {
    /// Builds the maps once (later calls do nothing) and restores a checkpoint's factors. A
    /// checkpoint from before the first stage that trains new rows has none: the maps then
    /// start fresh, as in an uninterrupted run.
    pub fn start(&mut self, model: &crate::model::Llama, subtokens: &[Vec<u32>], rank: usize, seed: u64, device: &burn::tensor::Device) -> anyhow::Result<()> {
        if !self.maps.is_empty() {
            return Ok(());
        }
        self.maps = maps_for(model, subtokens, rank, seed, device)?;
        if !self.saved.is_empty() {
            for m in self.maps.iter_mut() {
                m.restore(&mut self.saved)?;
            }
        }
        Ok(())
    }

    /// The map of the table parameter `name`, if it has one, to be [`Self::put`] back.
    pub fn take(&mut self, name: &str) -> Option<RowMap> {
        self.maps.iter().position(|m| m.name == name).map(|i| self.maps.swap_remove(i))
    }

    pub fn put(&mut self, map: RowMap) {
        self.maps.push(map);
    }

    /// Every map's factors, for a checkpoint.
    pub fn factors(&self) -> Vec<(String, Tensor<2>)> {
        self.maps.iter().flat_map(|m| m.factors()).collect()
    }

    /// Keeps a factor a checkpoint held (named as [`RowMap::factors`] names it) for [`Self::start`].
    pub fn keep_saved(&mut self, name: String, value: Tensor<2>) {
        self.saved.insert(name, value);
    }
}

/// One map per table of `model` that trains new rows (the tied table once; an untied head gets
/// its own, over its own old rows). Call it once the run's first stage has split the tables
/// into old and new rows (`crate::lora::set_table_modes`); an error when no table has new rows
/// to move.
pub fn maps_for(model: &crate::model::Llama, subtokens: &[Vec<u32>], rank: usize, seed: u64, device: &burn::tensor::Device) -> anyhow::Result<Vec<RowMap>> {
    let mut out = Vec::new();
    let tables = [("model.embed_tokens.new_rows", Some(&model.embed_tokens)), ("lm_head.new_rows", model.lm_head.as_ref())];
    for (k, (name, table)) in tables.into_iter().enumerate() {
        let Some(t) = table else { continue };
        let Some(extra) = &t.extra else { continue };
        let n = extra.shape().dims::<2>()[0];
        anyhow::ensure!(n == subtokens.len(), "[train] row_map_rank: {name} has {n} new rows but the extension lists {} pieces; use the model resized with this extension", subtokens.len());
        anyhow::ensure!(t.quant.is_none(), "[train] row_map_rank: {name} is quantized; train from an f32/f16 model folder");
        let old: Vec<f32> = t.base.val().try_into_vec_as::<f32>().map_err(|e| anyhow::anyhow!("reading {name}'s old rows: {e:?}"))?;
        out.push(RowMap::new(name, &old, t.hidden(), subtokens, rank, seed.wrapping_add(k as u64), device));
    }
    anyhow::ensure!(!out.is_empty(), "[train] row_map_rank: no token table has new rows that train; set [trainable] embed_tokens or lm_head = \"new_rows\"");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling_features_are_the_mean_first_and_last_sub_token_rows() {
        // Three old rows of width 2; new rows spelt [0, 2], [1] and [] (no sub-tokens).
        let old = [1.0, 2.0, 10.0, 20.0, 3.0, 6.0];
        let [mean, first, last] = spelling_features(&old, 2, &[vec![0, 2], vec![1], vec![]]);
        assert_eq!(mean, vec![2.0, 4.0, 10.0, 20.0, 0.0, 0.0]);
        assert_eq!(first, vec![1.0, 2.0, 10.0, 20.0, 0.0, 0.0]);
        assert_eq!(last, vec![3.0, 6.0, 10.0, 20.0, 0.0, 0.0]);
    }

    /// The chain-rule gradients against autodiff through `E = Σ s · G_k A_k B_k` with the loss
    /// `Σ E ⊙ C`, whose gradient in `E` is `C`.
    #[test]
    fn map_gradients_match_autodiff() {
        let device = crate::device::parse("cpu").unwrap().autodiff();
        let (hidden, rank) = (6, 3);
        let mut rng = crate::rng::SplitMix::new(7);
        let old: Vec<f32> = (0..5 * hidden).map(|_| rng.normal() as f32).collect();
        let subtokens = vec![vec![0, 1, 2], vec![3], vec![4, 0], vec![2, 2]];
        let mut map = RowMap::new("t", &old, hidden, &subtokens, rank, 1, &device);
        // A non-zero B, so that A's gradient is not trivially zero.
        let inner = device.clone().inner();
        for b in map.b.iter_mut() {
            let v: Vec<f32> = (0..rank * hidden).map(|_| rng.normal() as f32).collect();
            *b = Param::from_tensor(Tensor::from_inner(Tensor::from_data(TensorData::new(v, [rank, hidden]), &inner)));
        }
        let c: Vec<f32> = (0..subtokens.len() * hidden).map(|_| rng.normal() as f32).collect();
        let c = Tensor::<2>::from_data(TensorData::new(c, [subtokens.len(), hidden]), &inner);
        let ours = map.grads(&c);
        for k in 0..SLOTS.len() {
            let a = Tensor::from_inner(map.a[k].val().inner()).require_grad();
            let b = Tensor::from_inner(map.b[k].val().inner()).require_grad();
            let g = Tensor::from_inner(map.features[k].clone());
            let loss = (g.matmul(a.clone()).matmul(b.clone()) * SCALE * Tensor::from_inner(c.clone())).sum();
            let grads = loss.backward();
            for (got, want) in [(&ours[k].0, a.grad(&grads).unwrap()), (&ours[k].1, b.grad(&grads).unwrap())] {
                let (got, want) = (got.clone().try_into_vec_as::<f32>().unwrap(), want.try_into_vec_as::<f32>().unwrap());
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "slot {}: {x} vs {y}", SLOTS[k]);
                }
            }
        }
    }

    /// One step: the map's factors move, the change it returns is its new product (it starts
    /// at zero), and the next step's change is measured from there.
    #[test]
    fn a_step_returns_the_change_of_the_product() {
        let device = crate::device::parse("cpu").unwrap().autodiff();
        let inner = device.clone().inner();
        let mut rng = crate::rng::SplitMix::new(3);
        let old: Vec<f32> = (0..4 * 4).map(|_| rng.normal() as f32).collect();
        let subtokens = vec![vec![0, 1], vec![2], vec![3, 1]];
        let mut map = RowMap::new("t", &old, 4, &subtokens, 2, 1, &device);
        let mut opt = crate::train::optim::AdamW::default();
        let g: Vec<f32> = (0..3 * 4).map(|_| rng.normal() as f32).collect();
        let g = Tensor::<2>::from_data(TensorData::new(g, [3, 4]), &inner);
        let d1 = map.step(&g, |n, p, g| opt.step(n, p, g, 1e-2, 0.0));
        let p1 = map.product_now();
        assert!(d1.clone().abs().max().into_scalar::<f32>() > 0.0, "B starts at zero; one step must move the product");
        assert!((d1 - p1.clone()).abs().max().into_scalar::<f32>() < 1e-6);
        let d2 = map.step(&g, |n, p, g| opt.step(n, p, g, 1e-2, 0.0));
        assert!((d2 - (map.product_now() - p1)).abs().max().into_scalar::<f32>() < 1e-6);
        assert_eq!(opt.state.len(), 2 * SLOTS.len(), "each factor has its own moments");
    }
}

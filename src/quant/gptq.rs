//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers", 2023) into llama.cpp's Q4_0 blocks, for `quantize --gptq TEXT`.
//!
//! Importance-weighted rounding (`--imatrix`) decides each weight's code on its own, with the
//! diagonal of `XᵀX` as weights. GPTQ uses all of `H = XᵀX` over the calibration tokens: the
//! columns of a row are quantized left to right, and each rounding error is pushed into the
//! columns not yet quantized, along `H⁻¹`, so that the row's *output* `x·wᵀ` moves as little as
//! possible on the calibration inputs. The file format is unchanged: each 32-column block still
//! has one f16 scale and 32 four-bit codes, so the result is a plain Q4_0 GGUF.
//!
//! * Which weights: `gate_proj` and `up_proj` ([`applies_to`] says why); the other Q4_0
//!   weights keep importance-weighted rounding, with the importance from the same pass.
//! * Block scales are chosen when the block is reached, from the row's values as updated so far,
//!   with ggml's importance-weighted scale search (`quantize_row_q4_0_impl`, importance =
//!   `diag H` per token).
//! * `H` is damped by 1 % of its mean diagonal (GPTQ's default `percdamp`; `--gptq-damp`), and
//!   a column that never saw a non-zero input gets a unit diagonal.
//! * The update needs the upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = UᵀU`). It is computed
//!   without forming `H⁻¹`: with `P` the order reversal and `PHP = LLᵀ`, `U = P L⁻¹ P`.
//! * Rows are independent given `U`; they run in tiles of [`TILE`] rows so that each row of
//!   `U` is read once per tile.
//!
//! The Hessian comes from the same forward passes as the importance matrix
//! ([`crate::quant::imatrix::collect_with_hessians`]), with each token's share capped
//! ([`crate::quant::imatrix::GRAM_CLIP`]).

use super::blocks::{f16_at, f16_bits, q4_0_block_scale, QK};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Rows updated together per pass over `U`.
pub const TILE: usize = 16;

/// GPTQ's default damping, as a fraction of the mean diagonal.
pub const DAMP: f64 = 0.01;

/// `Σ xᵀx` per distinct projection input, and the rows summed.
#[derive(Debug, Clone)]
pub struct Hessians {
    /// HF weight name of the projection that owns the input (`q_proj`, `o_proj`, `gate_proj`,
    /// `down_proj`) → row-major `[cols, cols]`.
    pub grams: BTreeMap<String, (usize, Vec<f64>)>,
    pub tokens: u64,
    /// The damping [`inverse_cholesky_upper`] adds ([`DAMP`] unless set).
    pub damp: f64,
}

impl Default for Hessians {
    fn default() -> Self {
        Hessians { grams: BTreeMap::new(), tokens: 0, damp: DAMP }
    }
}

impl Hessians {
    /// The projections whose inputs are collected (see [`applies_to`]); `up_proj` shares
    /// `gate_proj`'s.
    pub const OWNERS: [&'static str; 1] = ["mlp.gate_proj"];

    /// The owner of `hf`'s input: `up_proj` reads what `gate_proj` reads.
    pub fn owner(hf: &str) -> String {
        hf.replace("mlp.up_proj", "mlp.gate_proj")
    }

    /// The mean `x_j²` per column under the same per-token caps as the Hessian: the importance
    /// GPTQ's block scales are searched with.
    pub fn importance(&self, hf: &str, cols: usize) -> Option<Vec<f32>> {
        let n = self.tokens.max(1) as f64;
        self.get(hf, cols).map(|g| (0..cols).map(|j| (g[j * cols + j] / n) as f32).collect())
    }

    /// `XᵀX` of `hf`'s input, `[cols, cols]`, or `None` when it was not collected.
    pub fn get(&self, hf: &str, cols: usize) -> Option<&[f64]> {
        self.grams.get(&Self::owner(hf)).filter(|(c, _)| *c == cols).map(|(_, g)| &g[..])
    }
}

/// Whether GPTQ quantizes `hf` (an HF weight name): the MLP's `gate_proj` and `up_proj` only.
///
/// Measured on SmolLM2-135M (BENCHMARKS.md, "q4_0 with GPTQ"), GPTQ lowered every projection's
/// calibration output error 2–8× against importance-weighted rounding, but the model's loss
/// only improved where it was applied to `gate_proj`/`up_proj`. On `down_proj` the Hessian is
/// dominated by a few tokens with activations 10³–10⁵ times the median (the first of each
/// window): fitted, they move every other token; capped, the error on those tokens grows and
/// the loss got worse either way. On the attention projections the loss got worse too (the
/// softmax turns small, correlated q/k output errors into different attention weights, which
/// the per-projection objective does not see). Those keep importance-weighted rounding.
pub fn applies_to(hf: &str) -> bool {
    hf.starts_with("model.layers.") && (hf.ends_with(".mlp.gate_proj.weight") || hf.ends_with(".mlp.up_proj.weight"))
}

/// Lower Cholesky factor of the symmetric positive definite `a` (row-major `n×n`), in place;
/// the strict upper triangle is zeroed.
pub fn cholesky(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let (top, bottom) = a.split_at_mut((j + 1) * n);
        let rj = &mut top[j * n..];
        let d = rj[j] - rj[..j].iter().map(|v| v * v).sum::<f64>();
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            bail!("the calibration Hessian is not positive definite at column {j} (pivot {d:e}); use more calibration text");
        }
        let d = d.sqrt();
        rj[j] = d;
        let rj = &rj[..j];
        bottom.par_chunks_mut(n).for_each(|ri| {
            let s: f64 = ri[..j].iter().zip(rj).map(|(a, b)| a * b).sum();
            ri[j] = (ri[j] - s) / d;
        });
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].iter_mut().for_each(|v| *v = 0.0);
    }
    Ok(())
}

/// `U`, upper triangular with `UᵀU = (H + damp·mean(diag H)·I)⁻¹`, in f32 (row-major `n×n`).
/// `h` is `XᵀX` (any positive scale); dead columns (zero diagonal) get a unit diagonal, as
/// GPTQ does.
pub fn inverse_cholesky_upper(h: &[f64], n: usize, damp: f64) -> Result<Vec<f32>> {
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    if mean.is_nan() || mean <= 0.0 {
        bail!("the calibration Hessian is zero: the projection saw no input");
    }
    // PHP, damped.
    let r = |i: usize| n - 1 - i;
    let mut l: Vec<f64> = (0..n * n).map(|k| h[r(k / n) * n + r(k % n)]).collect();
    for i in 0..n {
        let d = &mut l[i * n + i];
        if *d == 0.0 {
            *d = 1.0;
        }
        *d += damp * mean;
    }
    cholesky(&mut l, n)?;
    // Column k of L⁻¹ by forward substitution, kept as row k of `inv_t` (= (L⁻¹)ᵀ, upper).
    let mut inv_t = vec![0f64; n * n];
    inv_t.par_chunks_mut(n).enumerate().for_each(|(k, col)| {
        for i in k..n {
            let s: f64 = l[i * n + k..i * n + i].iter().zip(&col[k..i]).map(|(a, b)| a * b).sum();
            col[i] = (if i == k { 1.0 } else { 0.0 } - s) / l[i * n + i];
        }
    });
    // U[i][j] = L⁻¹[n−1−i][n−1−j] = inv_t[n−1−j][n−1−i].
    Ok((0..n * n).map(|k| inv_t[r(k % n) * n + r(k / n)] as f32).collect())
}

/// The Q4_0 code of `x` for step `d` (`d·(q − 8)` reconstructs it).
fn code(x: f32, id: f32) -> u8 {
    ((x * id).round() as i32 + 8).clamp(0, 15) as u8
}

/// Quantizes `w` (row-major `[rows, cols]`) to Q4_0 bytes (ggml's block layout) with GPTQ.
/// `u` is [`inverse_cholesky_upper`] of the input's Hessian and `imp` its diagonal per token
/// (the importance matrix), which weights each block's scale search.
pub fn quantize_q4_0(w: &[f32], rows: usize, cols: usize, u: &[f32], imp: &[f32]) -> Result<Vec<u8>> {
    if w.len() != rows * cols || u.len() != cols * cols || imp.len() != cols || !cols.is_multiple_of(QK) {
        bail!("GPTQ: a {rows}×{cols} weight needs {} values, a {cols}×{cols} factor and {cols} importances, in whole 32-blocks", rows * cols);
    }
    let nb = cols / QK;
    let rb = nb * 18;
    let mut out = vec![0u8; rows * rb];
    out.par_chunks_mut(TILE * rb).zip(w.par_chunks(TILE * cols)).for_each(|(out, w)| {
        let t = w.len() / cols;
        let mut work = w.to_vec();
        let sigma2: Vec<f32> = w.chunks_exact(cols).map(|r| r.iter().map(|v| v * v).sum::<f32>() / cols as f32).collect();
        let mut codes = vec![0u8; t * cols];
        let mut err = vec![0f32; t];
        let mut id = vec![0f32; t];
        let mut d = vec![0f32; t];
        for b in 0..nb {
            let lo = b * QK;
            for r in 0..t {
                let x = &work[r * cols + lo..r * cols + lo + QK];
                let mut qw = [0f32; QK];
                for j in 0..QK {
                    qw[j] = imp[lo + j] * (sigma2[r] + x[j] * x[j]).sqrt();
                }
                let bits = f16_bits(q4_0_block_scale(x, &qw));
                d[r] = f16_at(&bits, 0);
                id[r] = if d[r] != 0.0 { 1.0 / d[r] } else { 0.0 };
                out[r * rb + b * 18..r * rb + b * 18 + 2].copy_from_slice(&bits);
            }
            for j in lo..lo + QK {
                let uj = &u[j * cols..(j + 1) * cols];
                let ujj = uj[j];
                for r in 0..t {
                    let x = work[r * cols + j];
                    let q = code(x, id[r]);
                    codes[r * cols + j] = q;
                    err[r] = (x - d[r] * (q as f32 - 8.0)) / ujj;
                }
                for r in 0..t {
                    let e = err[r];
                    if e != 0.0 {
                        work[r * cols + j + 1..(r + 1) * cols].iter_mut().zip(&uj[j + 1..]).for_each(|(v, h)| *v -= e * h);
                    }
                }
            }
        }
        for r in 0..t {
            for b in 0..nb {
                let c = &codes[r * cols + b * QK..r * cols + (b + 1) * QK];
                let o = &mut out[r * rb + b * 18 + 2..r * rb + (b + 1) * 18];
                for i in 0..QK / 2 {
                    o[i] = c[i] | (c[i + QK / 2] << 4);
                }
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
    }

    /// `XᵀX` of `n` correlated inputs of width `cols`.
    fn gram(n: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let mut r = rng(seed);
        let base: Vec<f32> = (0..n * 4).map(|_| r()).collect();
        // Each column is a mix of 4 latent factors plus noise, with very different scales.
        let mix: Vec<f32> = (0..4 * cols).map(|_| r()).collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|k| {
                let (i, j) = (k / cols, k % cols);
                let s = if j % 7 == 0 { 8.0 } else { 1.0 };
                s * ((0..4).map(|f| base[i * 4 + f] * mix[f * cols + j]).sum::<f32>() + 0.3 * r())
            })
            .collect();
        let mut h = vec![0f64; cols * cols];
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += xi[a] as f64 * xi[b] as f64;
                }
            }
        }
        (x, h)
    }

    #[test]
    fn factor_inverts_the_damped_hessian() {
        let n = 40;
        let (_, h) = gram(200, n, 7);
        let u = inverse_cholesky_upper(&h, n, DAMP).unwrap();
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        // (UᵀU)(H + damp) = I, and U is upper triangular with a positive diagonal.
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        let hinv: Vec<f64> = (0..n * n).map(|k| (0..n).map(|m| u[m * n + k / n] as f64 * u[m * n + k % n] as f64).sum()).collect();
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|m| hinv[i * n + m] * (h[m * n + j] + if m == j { DAMP * mean } else { 0.0 })).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-3, "({i},{j}) = {v}");
            }
        }
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky(&mut bad, 2).is_err());
    }

    /// On correlated inputs GPTQ's output error ‖X(W − Ŵ)ᵀ‖² is well below independent
    /// rounding's with the same scale rule, and its bytes are valid Q4_0.
    #[test]
    fn gptq_beats_independent_rounding_on_the_outputs() {
        let (rows, cols, n) = (24, 64, 300);
        let (x, h) = gram(n, cols, 3);
        let mut r = rng(11);
        let w: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
        let imp: Vec<f32> = (0..cols).map(|j| (h[j * cols + j] / n as f64) as f32).collect();
        let u = inverse_cholesky_upper(&h, cols, DAMP).unwrap();
        let g = crate::io::gguf::dequantize(crate::io::gguf::GgmlType::Q4_0, &quantize_q4_0(&w, rows, cols, &u, &imp).unwrap(), rows * cols).unwrap();
        let mut rtn = Vec::new();
        for row in w.chunks_exact(cols) {
            super::super::blocks::quantize_row_q4_0_rmse(row, Some(&imp), &mut rtn);
        }
        let rtn = crate::io::gguf::dequantize(crate::io::gguf::GgmlType::Q4_0, &rtn, rows * cols).unwrap();
        let out_err = |q: &[f32]| -> f64 {
            let mut e = 0.0;
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                for o in 0..rows {
                    let d: f32 = (0..cols).map(|j| xi[j] * (w[o * cols + j] - q[o * cols + j])).sum();
                    e += (d as f64).powi(2);
                }
            }
            e
        };
        let (eg, er) = (out_err(&g), out_err(&rtn));
        assert!(eg < 0.7 * er, "GPTQ {eg} vs independent rounding {er}");
        // Every weight lies on its block's grid, within range of the original.
        assert!(g.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1.0), "codes out of range");
    }

    /// With `H = I` there is nothing to compensate along: every error stays in its column, and
    /// GPTQ is plain rounding with the block's searched scale.
    #[test]
    fn identity_hessian_is_plain_rounding() {
        let (rows, cols) = (3, 64);
        let mut r = rng(5);
        let w: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
        let h: Vec<f64> = (0..cols * cols).map(|k| if k / cols == k % cols { 1.0 } else { 0.0 }).collect();
        let u = inverse_cholesky_upper(&h, cols, 0.0).unwrap();
        let imp = vec![1f32; cols];
        let g = quantize_q4_0(&w, rows, cols, &u, &imp).unwrap();
        for (row, bytes) in w.chunks_exact(cols).zip(g.chunks_exact(cols / QK * 18)) {
            for (b, blk) in row.chunks_exact(QK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(blk, 0);
                for i in 0..QK {
                    let c = if i < 16 { blk[2 + i] & 15 } else { blk[2 + i - 16] >> 4 };
                    assert_eq!(c, code(b[i], 1.0 / d), "block value {}", b[i]);
                }
            }
        }
    }
}

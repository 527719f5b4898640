//! Lowering a trained LoRA pair's rank for shipping (`adapter pack --rank K`): the best rank-K
//! approximation of the update `B·A` in the Frobenius norm (Eckart–Young), returned again as a
//! pair. A GPU run trains at r 64 for capacity, but most of its update's energy sits in far
//! fewer directions; shipping those keeps the model and cuts the adapter.
//!
//! `B·A` is never formed (it is `out × in`): with `B = Q_b·R_b` and `Aᵀ = Q_a·R_a`,
//! `B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ`, so only the `r × r` core needs an SVD. Everything runs in f64:
//! the inputs are f32 or f16 and the outputs are rounded once at the end.

use anyhow::{ensure, Result};

/// A pair of rank `k` and what the cut cost.
#[derive(Debug, Clone)]
pub struct Truncated {
    /// `[k, in]`, row-major, like PEFT's `lora_A.weight`.
    pub a: Vec<f32>,
    /// `[out, k]`, row-major, like PEFT's `lora_B.weight`.
    pub b: Vec<f32>,
    /// Σ of the dropped singular values squared ÷ Σ of all of them squared: the share of
    /// `‖B·A‖²_F` the rank-k pair does not carry (0 for a zero update).
    pub dropped_energy: f64,
}

/// The rank-`k` pair closest to `B·A` (`a`: `[r, in]`, `b`: `[out, r]`), with `k < r`. The
/// singular values are split evenly between the two factors (`B' = U·√Σ`, `A' = √Σ·Vᵀ`), so
/// neither factor's magnitude runs away in f16.
pub fn truncate_pair(a: &[f32], b: &[f32], r: usize, in_dim: usize, out_dim: usize, k: usize) -> Result<Truncated> {
    ensure!(k >= 1 && k < r, "rank {k} must be at least 1 and below the pair's rank {r}");
    ensure!(a.len() == r * in_dim, "lora_A has {} values, expected [{r}, {in_dim}]", a.len());
    ensure!(b.len() == out_dim * r, "lora_B has {} values, expected [{out_dim}, {r}]", b.len());
    // Column j of B, and column j of Aᵀ (= row j of A), as f64 columns.
    let b_cols: Vec<Vec<f64>> = (0..r).map(|j| (0..out_dim).map(|i| b[i * r + j] as f64).collect()).collect();
    let a_cols: Vec<Vec<f64>> = (0..r).map(|j| a[j * in_dim..(j + 1) * in_dim].iter().map(|&x| x as f64).collect()).collect();
    let (qb, rb) = qr(b_cols);
    let (qa, ra) = qr(a_cols);
    // core = R_b · R_aᵀ (r × r), stored by columns.
    let core: Vec<Vec<f64>> = (0..r).map(|j| (0..r).map(|i| (0..r).map(|t| rb[t][i] * ra[t][j]).sum()).collect()).collect();
    let (u, s, v) = svd_jacobi(core);
    let total: f64 = s.iter().map(|x| x * x).sum();
    let kept: f64 = s[..k].iter().map(|x| x * x).sum();
    let dropped_energy = if total > 0.0 { ((total - kept) / total).max(0.0) } else { 0.0 };
    // B' column c = Q_b · u_c · √s_c ; A' row c = √s_c · (Q_a · v_c)ᵀ.
    let mut b_out = vec![0f32; out_dim * k];
    let mut a_out = vec![0f32; k * in_dim];
    for c in 0..k {
        let root = s[c].sqrt();
        for i in 0..out_dim {
            let x: f64 = (0..r).map(|t| qb[t][i] * u[c][t]).sum();
            b_out[i * k + c] = (x * root) as f32;
        }
        for i in 0..in_dim {
            let x: f64 = (0..r).map(|t| qa[t][i] * v[c][t]).sum();
            a_out[c * in_dim + i] = (x * root) as f32;
        }
    }
    Ok(Truncated { a: a_out, b: b_out, dropped_energy })
}

/// Thin QR of the matrix whose columns are `cols` (each of length m), by modified Gram–Schmidt
/// with a second pass (one pass loses orthogonality on nearly dependent columns). Returns Q's
/// columns and R by columns (`r[j][i]` = R[i][j], zero below the diagonal). A column that is
/// (numerically) in the span of the earlier ones gets a zero Q column and a zero diagonal:
/// `Q·R` still equals the input, which is all the caller needs.
fn qr(mut cols: Vec<Vec<f64>>) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = cols.len();
    let scale = cols.iter().map(|c| norm(c)).fold(0.0, f64::max);
    let mut r = vec![vec![0.0; n]; n];
    for j in 0..n {
        for _pass in 0..2 {
            for i in 0..j {
                let d = dot(&cols[i], &cols[j]);
                r[j][i] += d;
                let (qi, cj) = two_mut(&mut cols, i, j);
                for (x, q) in cj.iter_mut().zip(qi.iter()) {
                    *x -= d * q;
                }
            }
        }
        let nrm = norm(&cols[j]);
        if nrm > 1e-12 * scale && nrm > 0.0 {
            r[j][j] = nrm;
            cols[j].iter_mut().for_each(|x| *x /= nrm);
        } else {
            cols[j].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    (cols, r)
}

/// SVD of a small square matrix given by columns, by one-sided Jacobi (Hestenes): rotate pairs
/// of columns until all are orthogonal; the column norms are then the singular values. Returns
/// `(U, σ, V)` as lists of columns, sorted by σ descending, with `M = Σ σ_c · u_c · v_cᵀ`.
fn svd_jacobi(mut w: Vec<Vec<f64>>) -> (Vec<Vec<f64>>, Vec<f64>, Vec<Vec<f64>>) {
    let n = w.len();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta, gamma) = (dot(&w[p], &w[p]), dot(&w[q], &w[q]), dot(&w[p], &w[q]));
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for m in [&mut w, &mut v] {
                    let (xp, xq) = two_mut(m, p, q);
                    for (a, b) in xp.iter_mut().zip(xq.iter_mut()) {
                        let (x, y) = (*a, *b);
                        *a = c * x - s * y;
                        *b = s * x + c * y;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    let sig: Vec<f64> = w.iter().map(|c| norm(c)).collect();
    order.sort_by(|&x, &y| sig[y].total_cmp(&sig[x]));
    let u = order.iter().map(|&j| if sig[j] > 0.0 { w[j].iter().map(|x| x / sig[j]).collect() } else { vec![0.0; n] }).collect();
    let vs = order.iter().map(|&j| v[j].clone()).collect();
    (u, order.iter().map(|&j| sig[j]).collect(), vs)
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// Two distinct columns, the first shared and the second mutable.
fn two_mut(m: &mut [Vec<f64>], i: usize, j: usize) -> (&mut Vec<f64>, &mut Vec<f64>) {
    assert_ne!(i, j);
    if i < j {
        let (lo, hi) = m.split_at_mut(j);
        (&mut lo[i], &mut hi[0])
    } else {
        let (lo, hi) = m.split_at_mut(i);
        (&mut hi[0], &mut lo[j])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    fn random(n: usize, rng: &mut SplitMix) -> Vec<f32> {
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    /// `B·A` as an `[out, in]` f64 matrix.
    fn product(a: &[f32], b: &[f32], r: usize, in_dim: usize, out_dim: usize) -> Vec<f64> {
        let mut m = vec![0.0; out_dim * in_dim];
        for i in 0..out_dim {
            for j in 0..in_dim {
                m[i * in_dim + j] = (0..r).map(|t| b[i * r + t] as f64 * a[t * in_dim + j] as f64).sum();
            }
        }
        m
    }

    fn frob2(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum()
    }

    /// Orthonormal columns (m × n) from random ones.
    fn orthonormal(m: usize, n: usize, rng: &mut SplitMix) -> Vec<Vec<f64>> {
        let cols = (0..n).map(|_| random(m, rng).into_iter().map(f64::from).collect()).collect();
        qr(cols).0
    }

    #[test]
    fn a_pair_of_lower_rank_comes_back_exactly() {
        // r = 6 but B·A has rank 3: B = B1 (out×3) · M (3×6).
        let (r, k, in_dim, out_dim) = (6, 3, 40, 24);
        let mut rng = SplitMix::new(7);
        let b1 = random(out_dim * 3, &mut rng);
        let mix = random(3 * r, &mut rng);
        let b: Vec<f32> = (0..out_dim).flat_map(|i| (0..r).map(|j| (0..3).map(|t| b1[i * 3 + t] * mix[t * r + j]).sum::<f32>()).collect::<Vec<_>>()).collect();
        let a = random(r * in_dim, &mut rng);
        let t = truncate_pair(&a, &b, r, in_dim, out_dim, k).unwrap();
        let want = product(&a, &b, r, in_dim, out_dim);
        let got = product(&t.a, &t.b, k, in_dim, out_dim);
        let err: Vec<f64> = want.iter().zip(&got).map(|(x, y)| x - y).collect();
        assert!(frob2(&err) / frob2(&want) < 1e-11, "{}", frob2(&err) / frob2(&want));
        assert!(t.dropped_energy < 1e-12, "{}", t.dropped_energy);
    }

    /// B·A = Σ sᵢ uᵢ vᵢᵀ with known s, hidden behind a random rotation G between the factors;
    /// the rank-2 pair must be 5·u₁v₁ᵀ + 4·u₂v₂ᵀ (Eckart–Young) and report the rest's energy.
    #[test]
    fn keeps_the_largest_directions_and_reports_the_rest() {
        let (r, k, in_dim, out_dim) = (5, 2, 17, 11);
        let s = [3.0, 5.0, 1.0, 4.0, 2.0];
        let mut rng = SplitMix::new(11);
        let u = orthonormal(out_dim, r, &mut rng);
        let v = orthonormal(in_dim, r, &mut rng);
        let g = orthonormal(r, r, &mut rng);
        // B = U·diag(s)·G (out × r), A = Gᵀ·Vᵀ (r × in).
        let b: Vec<f32> = (0..out_dim).flat_map(|i| { let (u, g) = (&u, &g); (0..r).map(move |j| (0..r).map(|t| u[t][i] * s[t] * g[j][t]).sum::<f64>() as f32) }).collect();
        let a: Vec<f32> = (0..r).flat_map(|j| { let (v, g) = (&v, &g); (0..in_dim).map(move |i| (0..r).map(|t| g[j][t] * v[t][i]).sum::<f64>() as f32) }).collect();
        let t = truncate_pair(&a, &b, r, in_dim, out_dim, k).unwrap();
        let got = product(&t.a, &t.b, k, in_dim, out_dim);
        let want: Vec<f64> = (0..out_dim).flat_map(|i| { let (u, v) = (&u, &v); (0..in_dim).map(move |j| 5.0 * u[1][i] * v[1][j] + 4.0 * u[3][i] * v[3][j]) }).collect();
        let err: Vec<f64> = want.iter().zip(&got).map(|(x, y)| x - y).collect();
        assert!(frob2(&err) / frob2(&want) < 1e-10, "{}", frob2(&err) / frob2(&want));
        assert!((t.dropped_energy - 14.0 / 55.0).abs() < 1e-6, "{}", t.dropped_energy);
        // The singular values are split evenly: both factors' columns/rows have norm √s.
        let a_norm0: f64 = t.a[..in_dim].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((a_norm0 - 5f64.sqrt()).abs() < 1e-5, "{a_norm0}");
    }

    #[test]
    fn a_zero_update_stays_zero_and_bad_ranks_are_refused() {
        let (r, in_dim, out_dim) = (4, 8, 6);
        let mut rng = SplitMix::new(3);
        let a = random(r * in_dim, &mut rng);
        let b = vec![0f32; out_dim * r]; // an untrained B
        let t = truncate_pair(&a, &b, r, in_dim, out_dim, 2).unwrap();
        assert!(t.a.iter().chain(&t.b).all(|x| x.is_finite()));
        assert!(product(&t.a, &t.b, 2, in_dim, out_dim).iter().all(|&x| x == 0.0));
        assert_eq!(t.dropped_energy, 0.0);
        assert!(truncate_pair(&a, &b, r, in_dim, out_dim, 4).is_err());
        assert!(truncate_pair(&a, &b, r, in_dim, out_dim, 0).is_err());
        assert!(truncate_pair(&a[1..], &b, r, in_dim, out_dim, 2).is_err());
    }
}

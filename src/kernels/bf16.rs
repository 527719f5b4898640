//! Products with a frozen weight held in bf16, for training on CPUs with AVX512-BF16
//! (`[train] frozen_products = "bf16"`).
//!
//! Why: a 2-core training step of the quickstart spends most of its time in the f32 products of
//! the frozen projections (forward `x·Wᵀ`, backward `dy·W`). `vdpbf16ps` multiplies bf16 pairs
//! into f32 sums at twice the f32 FMA's rate; a weight that never changes is packed once, and
//! the activations are rounded to bf16 as they are read. Sums stay f32. This is what the GPU
//! path already does with fp16 frozen weights; the f32 product stays the default and the
//! reference ([`PackedT::matmul_reference`] reads the same packing in scalar code).
//!
//! Packing of `B` `[n, k]` for `x·Bᵀ`: panels of 16 rows of `B` (16 output columns), each panel
//! `k/2` pairs × 16 lanes × 2 values, so one 64-byte load gives the next pair of `k` for 16
//! columns; panels are padded with zeros to a multiple of 4 (the kernel's 64 columns) and `k`
//! to an even count.
//!
//! A long `k` (the LM head's backward `dlogits·W` sums over ~49k vocabulary rows) is cut into
//! chunks of [`KC`] pairs, so that the 64 columns' panels of one chunk (256 KB) stay in L2 while
//! every row of `x` passes over them; each chunk's sums are added to the output in turn.

use rayon::prelude::*;

/// Columns per panel (one 512-bit register of f32 sums).
const LANES: usize = 16;
/// Panels per kernel call: 6 rows × 4 panels of sums fill 24 of the 32 registers.
const PANELS: usize = 4;
const ROWS: usize = 6;
/// Pairs of `k` per chunk: 64 columns × 1024 pairs × 4 bytes = 256 KB of panels.
const KC: usize = 1024;
/// Rows of `x` per task, so that a product with few column blocks (the head's backward has
/// nine) still spreads over every core.
const MC: usize = 96;

/// `x` rounded to the nearest bf16 (ties to even); NaN stays a NaN.
pub fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether this CPU runs the bf16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the bf16 kernel outruns the f32 product here, which `frozen_products = "auto"` asks.
/// AMD's AVX-512 cores (Zen 4 and later) run `vdpbf16ps` at twice the MACs of their f32 FMAs:
/// the quickstart's student step was 1.33x faster on a 2-core Zen 4. Intel's Xeons issue it on
/// one of their two 512-bit FMA ports, so it makes no more MACs a cycle than f32 FMAs and only
/// adds the rounding: on a 2-core Emerald Rapids the step took 1.13-1.35x the f32 one (gemm's
/// AVX-512 kernels; BENCHMARKS.md, "gemm's AVX-512 kernels").
pub fn outruns_f32() -> bool {
    available() && cpu_vendor() == *b"AuthenticAMD"
}

/// The CPUID vendor string (`GenuineIntel`, `AuthenticAMD`, ...); zeros off x86-64.
pub(crate) fn cpu_vendor() -> [u8; 12] {
    let mut v = [0u8; 12];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
            v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
    v
}

/// A frozen `[n, k]` matrix packed for `x·Bᵀ` (see the module documentation).
#[derive(Debug, Clone)]
pub struct PackedT {
    n: usize,
    k: usize,
    /// `k` rounded up to pairs.
    k2: usize,
    panels: Vec<u16>,
}

impl PackedT {
    /// Packs `b` `[n, k]` row-major: the product is `x·bᵀ`.
    pub fn new(b: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(b.len(), n * k, "bf16 pack: {} values for [{n}, {k}]", b.len());
        Self::pack(n, k, |j, kk| b[j * k + kk])
    }

    /// Packs the transpose of `w` `[rows, cols]` row-major: the product is `x·w` (`x` has `rows`
    /// columns), the backward `dy·W` of a projection whose forward is `x·Wᵀ`.
    pub fn transposed(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "bf16 pack: {} values for [{rows}, {cols}]", w.len());
        Self::pack(cols, rows, |j, kk| w[kk * cols + j])
    }

    fn pack(n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let k2 = k.div_ceil(2);
        let np = n.div_ceil(LANES).div_ceil(PANELS) * PANELS;
        let mut panels = vec![0u16; np * k2 * LANES * 2];
        for p in 0..n.div_ceil(LANES) {
            for kp in 0..k2 {
                for l in 0..LANES {
                    let j = p * LANES + l;
                    if j >= n {
                        break;
                    }
                    for e in 0..2 {
                        let kk = 2 * kp + e;
                        if kk < k {
                            panels[((p * k2 + kp) * LANES + l) * 2 + e] = to_bf16(at(j, kk));
                        }
                    }
                }
            }
        }
        PackedT { n, k, k2, panels }
    }

    /// Output columns (`n`) and the inner dimension (`k`).
    pub fn dims(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// `c[m×n] = x[m×k]·Bᵀ`, or `c +=` with `accumulate`; `c` row-major with row stride `ldc`.
    /// Runs the AVX512-BF16 kernel (callers check [`available`]) over the rayon pool.
    pub fn matmul(&self, x: &[f32], m: usize, c: &mut [f32], ldc: usize, accumulate: bool) {
        assert!(available(), "the bf16 product needs AVX512-BF16; check kernels::bf16::available() first");
        self.check(x, m, c, ldc);
        if m == 0 || self.n == 0 {
            return;
        }
        let xp = self.pairs(x, m);
        let blocks = self.n.div_ceil(LANES * PANELS);
        let out = Out(c.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..blocks).flat_map(|blk| (0..m).step_by(MC).map(move |r0| (blk, r0))).collect();
        tasks.into_par_iter().for_each(|(blk, r0)| {
            let out = &out;
            let col0 = blk * LANES * PANELS;
            let cols = (LANES * PANELS).min(self.n - col0);
            for (ci, kp0) in (0..self.k2.max(1)).step_by(KC).enumerate() {
                let kp1 = (kp0 + KC).min(self.k2);
                let mut m0 = r0;
                while m0 < (r0 + MC).min(m) {
                    let mr = ROWS.min(m - m0);
                    let mut tile = [0f32; ROWS * LANES * PANELS];
                    // SAFETY: `available()` was checked above; the kernel reads `xp` rows m0..m0+mr and
                    // pairs kp0..kp1 of the 4 panels of this block, all inside their buffers by
                    // construction.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        x86::tile(&xp, &self.panels, self.k2, [kp0, kp1], m0, mr, blk * PANELS, &mut tile)
                    };
                    for r in 0..mr {
                        // SAFETY: tasks write disjoint rows × columns; `check` bounded every row.
                        let row = unsafe { std::slice::from_raw_parts_mut(out.0.add((m0 + r) * ldc + col0), cols) };
                        let t = &tile[r * LANES * PANELS..r * LANES * PANELS + cols];
                        if accumulate || ci > 0 {
                            row.iter_mut().zip(t).for_each(|(o, v)| *o += v);
                        } else {
                            row.copy_from_slice(t);
                        }
                    }
                    m0 += mr;
                }
            }
        });
    }

    /// [`Self::matmul`] in scalar code over the same packing, summing each lane's pairs in the
    /// kernel's order, chunk by chunk: the reference of the kernel, and of the packing on any CPU.
    pub fn matmul_reference(&self, x: &[f32], m: usize, c: &mut [f32], ldc: usize, accumulate: bool) {
        self.check(x, m, c, ldc);
        let xp = self.pairs(x, m);
        for i in 0..m {
            for j in 0..self.n {
                let (p, l) = (j / LANES, j % LANES);
                let o = &mut c[i * ldc + j];
                for (ci, kp0) in (0..self.k2.max(1)).step_by(KC).enumerate() {
                    let mut s = 0f32;
                    for kp in kp0..(kp0 + KC).min(self.k2) {
                        let a = xp[i * self.k2 + kp];
                        let at = ((p * self.k2 + kp) * LANES + l) * 2;
                        s += from_bf16(a as u16) * from_bf16(self.panels[at]) + from_bf16((a >> 16) as u16) * from_bf16(self.panels[at + 1]);
                    }
                    *o = if accumulate || ci > 0 { *o + s } else { s };
                }
            }
        }
    }

    fn check(&self, x: &[f32], m: usize, c: &[f32], ldc: usize) {
        assert_eq!(x.len(), m * self.k, "bf16 product: x holds {} values, not [{m}, {}]", x.len(), self.k);
        assert!(ldc >= self.n && (m == 0 || (m - 1) * ldc + self.n <= c.len()), "bf16 product: output of {} values for [{m}, {}] with row stride {ldc}", c.len(), self.n);
    }

    /// `x` `[m, k]` as bf16 pairs `[m, k/2]` (lower half first), `k` padded with a zero.
    fn pairs(&self, x: &[f32], m: usize) -> Vec<u32> {
        let (k, k2) = (self.k, self.k2);
        let mut xp = vec![0u32; m * k2];
        xp.par_chunks_mut(k2.max(1)).zip(x.par_chunks(k.max(1))).for_each(|(o, r)| {
            for (kp, v) in o.iter_mut().enumerate() {
                let lo = to_bf16(r[2 * kp]) as u32;
                let hi = r.get(2 * kp + 1).map_or(0, |&v| to_bf16(v) as u32);
                *v = lo | (hi << 16);
            }
        });
        xp
    }
}

/// The output buffer shared by the column blocks, which write disjoint columns.
struct Out(*mut f32);
// SAFETY: every task writes its own columns of each row (see `PackedT::matmul`).
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, PANELS, ROWS};
    use std::arch::x86_64::*;

    /// Sums over pairs `kp0..kp1` of `mr` ≤ 6 rows of `xp` (bf16 pairs, `k2` a row) against
    /// panels `pn0..pn0 + 4` into `tile` `[6, 64]`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(xp: &[u32], panels: &[u16], k2: usize, [kp0, kp1]: [usize; 2], m0: usize, mr: usize, pn0: usize, tile: &mut [f32; ROWS * LANES * PANELS]) {
        let mut acc = [_mm512_setzero_ps(); ROWS * PANELS];
        debug_assert!(kp1 <= k2 && (pn0 + PANELS) * k2 * LANES * 2 <= panels.len() && (m0 + mr) * k2 <= xp.len());
        let b0 = panels.as_ptr().add(pn0 * k2 * LANES * 2);
        let a0 = xp.as_ptr().add(m0 * k2);
        for kp in kp0..kp1 {
            let b: [__m512bh; PANELS] = std::array::from_fn(|j| std::mem::transmute(_mm512_loadu_si512(b0.add((j * k2 + kp) * LANES * 2) as *const _)));
            for r in 0..ROWS {
                if r < mr {
                    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a0.add(r * k2 + kp) as i32));
                    for j in 0..PANELS {
                        acc[r * PANELS + j] = _mm512_dpbf16_ps(acc[r * PANELS + j], a, b[j]);
                    }
                }
            }
        }
        for r in 0..mr {
            for j in 0..PANELS {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * LANES * PANELS + j * LANES), acc[r * PANELS + j]);
            }
        }
    }
}

/// The two packings of a frozen projection `W` `[out, in]`: `x·Wᵀ` forward and `dy·W` backward.
#[derive(Debug)]
pub struct FrozenBf16 {
    pub forward: PackedT,
    pub backward: PackedT,
}

impl FrozenBf16 {
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        FrozenBf16 { forward: PackedT::new(w, out, inp), backward: PackedT::transposed(w, out, inp) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tensor;
    use std::sync::Arc;
    use crate::kernels::frozen::{frozen_matmul_t, FrozenPacked};

    #[test]
    fn the_vendor_is_cpuid_text_and_auto_needs_the_kernel() {
        let v = cpu_vendor();
        if cfg!(target_arch = "x86_64") {
            assert!(v.iter().all(|b| b.is_ascii_graphic()), "{v:?}");
        } else {
            assert_eq!(v, [0; 12]);
        }
        assert!(!outruns_f32() || available());
    }

    fn fixed(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 * 2.0 - 1.0).collect()
    }

    /// f32 products of the bf16-rounded inputs: what the packing must reproduce.
    fn rounded_product(x: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let r = |v: f32| from_bf16(to_bf16(v));
        (0..m * n).map(|ij| (0..k).map(|kk| r(x[ij / n * k + kk]) as f64 * r(b[ij % n * k + kk]) as f64).sum::<f64>() as f32).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Both packings, odd sizes (a partial panel, a partial block, an odd `k`, fewer rows than
    /// the kernel's six): the scalar reference over the packing equals the product of the rounded
    /// inputs, and on a CPU with AVX512-BF16 the kernel equals the reference.
    #[test]
    fn packings_and_kernel_match_the_rounded_product() {
        // (8, 40, 4101): three chunks of `k`, the last odd; (200, 70, 9): three tasks of rows.
        for (m, n, k) in [(1, 1, 1), (5, 17, 9), (13, 70, 33), (7, 130, 64), (20, 192, 576), (8, 40, 4101), (200, 70, 9)] {
            let x = fixed(m * k, 1);
            let w = fixed(n * k, 2);
            let want = rounded_product(&x, &w, m, n, k);
            let scale: f32 = (0..k).map(|_| 1.0).sum();
            let close = |got: &[f32], what: &str| {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * scale, "{what} [{m}×{n}×{k}] at {i}: {g} against {w}");
                }
            };
            let p = PackedT::new(&w, n, k);
            assert_eq!(p.dims(), [n, k]);
            let mut c = vec![0f32; m * n];
            p.matmul_reference(&x, m, &mut c, n, false);
            close(&c, "reference");
            // The transposed packing of wᵀ `[k, n]` is the same product.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let pt = PackedT::transposed(&wt, k, n);
            assert_eq!(pt.dims(), [n, k]);
            let mut ct = vec![0f32; m * n];
            pt.matmul_reference(&x, m, &mut ct, n, false);
            close(&ct, "transposed reference");
            if available() {
                let mut ck = vec![f32::NAN; m * n];
                p.matmul(&x, m, &mut ck, n, false);
                close(&ck, "kernel");
                // Accumulating adds onto what is there, in a wider output.
                let ld = n + 3;
                let mut acc = vec![1f32; m * ld];
                pt.matmul(&x, m, &mut acc, ld, true);
                for i in 0..m {
                    for j in 0..n {
                        assert!((acc[i * ld + j] - 1.0 - want[i * n + j]).abs() <= 1e-5 * scale, "accumulate at ({i}, {j})");
                    }
                    assert!(acc[i * ld + n..(i + 1) * ld].iter().all(|&v| v == 1.0), "columns past n untouched");
                }
            } else {
                eprintln!("this CPU has no AVX512-BF16: only the packing and its reference were checked");
            }
        }
    }

    /// The autodiff op ([`frozen_matmul_t`]) on bf16 packings: its output and input gradient are
    /// the packings' products (bit for bit the kernel's), and a plain input gives the same
    /// output.
    #[test]
    fn frozen_matmul_t_forward_and_gradient_are_the_packings() {
        if !available() {
            eprintln!("this CPU has no AVX512-BF16: frozen_matmul_t was not run");
            return;
        }
        let dev = burn::tensor::Device::flex().autodiff();
        let (n, out, k) = (11, 37, 50);
        let (xv, wv, upv) = (fixed(n * k, 5), fixed(out * k, 6), fixed(n * out, 7));
        let p = Arc::new(FrozenPacked::Bf16(FrozenBf16::new(&wv, out, k)));
        let FrozenPacked::Bf16(b) = &*p else { unreachable!() };
        let t = |v: &Vec<f32>, d: [usize; 2]| Tensor::<2>::from_data(burn::tensor::TensorData::new(v.clone(), d), &dev);
        let x = t(&xv, [n, k]).require_grad();
        let y = frozen_matmul_t(&x, &p).unwrap();
        let g = (y.clone() * t(&upv, [n, out])).sum().backward();
        let v = |x: Tensor<2>| x.into_data().try_into_vec::<f32>().unwrap();
        let (mut want_y, mut want_dx) = (vec![0f32; n * out], vec![0f32; n * k]);
        b.forward.matmul(&xv, n, &mut want_y, out, false);
        b.backward.matmul(&upv, n, &mut want_dx, k, false);
        assert_eq!(v(y.detach()), want_y);
        assert_eq!(v(x.grad(&g).unwrap()), want_dx);
        let plain = Tensor::<2>::from_data(burn::tensor::TensorData::new(xv.clone(), [n, k]), &burn::tensor::Device::flex());
        assert_eq!(v(frozen_matmul_t(&plain, &p).unwrap()), want_y);
    }

    /// Against the f32 product of the unrounded inputs the error is bf16's: ~2^-8 of the sum of
    /// magnitudes, not more.
    #[test]
    fn error_against_f32_is_bf16_rounding() {
        let (m, n, k) = (9, 48, 200);
        let (x, w) = (fixed(m * k, 3), fixed(n * k, 4));
        let p = PackedT::new(&w, n, k);
        let mut c = vec![0f32; m * n];
        p.matmul_reference(&x, m, &mut c, n, false);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum();
                let mag: f64 = (0..k).map(|kk| (x[i * k + kk] as f64 * w[j * k + kk] as f64).abs()).sum();
                assert!((c[i * n + j] as f64 - exact).abs() <= mag * 2.0 / 256.0, "({i}, {j}): {} against {exact}", c[i * n + j]);
            }
        }
    }
}

//! Dot products of one quantized weight row with one quantized activation row, the inner loop
//! of every quantized matrix product. The pairings are llama.cpp's: Q8_0, Q4_0 and Q5_0 weights
//! against Q8_0 activations, Q4_1 also against Q8_0 (llama.cpp: Q8_1; see below), Q4_K and Q6_K against Q8_K. Products of codes are summed in integers per
//! block and scaled once per block (`d_w · d_a · Σ q_w q_a`), which is both the speed (8-bit
//! multiply-adds) and the precision (no rounding inside a block) of the scheme.
//!
//! Each pairing has a scalar version and, on x86_64 with AVX2 + FMA + F16C detected at run
//! time, an AVX2 version (which also reads the interleaved Q4_0/Q8_0 pairs in one pass for
//! any count of one to eight tokens); where the CPU also has AVX-512 VNNI (with VL and BW), the
//! many-token products come in tiles of several rows × several tokens built on `vpdpbusd`
//! (`kernels_vnni.rs`), beside the same AVX2 one-token kernels. [`Kernels::best`] picks once
//! per process, [`Kernels::scalar`] is the fallback and the reference the tests hold the SIMD
//! code to.
//!
//! A Q4_1 weight is `d·q + m`, so its block product is `d_w·d_a·Σ q_w·q_a + m_w·d_a·Σ q_a`.
//! llama.cpp carries `d_a·Σ q_a` in the activation block as an f16; here `Σ q_a` is the exact
//! integer (the interleaved kernels already have it, [`SumsFn`]) and the term is
//! `m_w·(d_a·Σ q_a)` in f32, the same expression in every kernel ([`q4_1_block`]).

use super::blocks::{f16_at, scale_min_k4, Q4_0X8_BYTES, Q4_0X8_ROWS, Q8_0X8_BYTES, Q4_1X8_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q6_K_BYTES, Q8_0_BYTES, Q8_K_BYTES, QK};

/// `dot(weight_row, activation_row, n_blocks)`; block counts are in the weight type's blocks.
pub type DotFn = fn(&[u8], &[u8], usize) -> f32;

/// One weight row against four activation rows at once (prompt processing): each weight block
/// is loaded and unpacked once for four tokens. The fourth argument holds the activations'
/// block scales already converted to f32. Each of the four results is bit for bit what
/// [`DotFn`] gives for that token alone (same block sums, same summation order), so a token's
/// output never depends on the tokens batched with it.
pub type Dot4Fn = fn(&[u8], [&[u8]; 4], [&[f32]; 4], usize) -> [f32; 4];

/// Eight interleaved rows (Q4_0: [`super::blocks::pack_q4_0x8`], Q8_0:
/// [`super::blocks::pack_q8_0x8`], Q4_1: [`super::blocks::X8_Q4_1`]) against one Q8_0 activation row: `gemv(group, stride, act,
/// act_sums, n_blocks)` → the eight dot products, block column `b` of the group at `b·stride`
/// (a matrix keeps its groups in pairs, [`super::blocks::interleave16`], so the stride is two
/// columns). `act_sums[b]` is `Σ q` over activation block `b` (the SIMD kernels multiply
/// unsigned weight codes and take the offset, 8 for Q4_0 and 128 for Q8_0, off afterwards as
/// `offset·Σq`; Q4_1's minimum term is `m·d_a·Σq`).
pub type Gemv8Fn = fn(&[u8], usize, &[u8], &[i32], usize) -> [f32; 8];

/// [`Gemv8Fn`] for four activation rows at once (prompt processing): each block column of the
/// group is loaded and unpacked once for four tokens. Returns `[token][row]`.
pub type Gemm4x8Fn = fn(&[u8], usize, [&[u8]; 4], [&[i32]; 4], usize) -> [[f32; 8]; 4];

/// Both groups of an interleaved pair ([`super::blocks::interleave16`]) against one activation
/// row: the sixteen dot products, rows 0..8 from the first group, each bit for bit what
/// [`Gemv8Fn`] of the same kernel set gives for its group. In place of the sums it takes each
/// activation block's term ([`PairTerm`]), made once per product instead of once per token,
/// block and row pair; and the blocks' scales as f32 (`f16_at` of each block's `d`), so that
/// the kernel does not convert them either.
pub type Gemv16Fn = fn(&[u8], &[u8], &[i32], &[f32], usize) -> [f32; 16];

/// What the pair kernels ([`Gemv16Fn`]) take per activation block in place of its code sum Σq:
/// the part of the block's product that depends on the activations alone. Made here, once per
/// product, it costs nothing per row pair; inside the kernel it cost a scalar multiply and a
/// broadcast from a general register per token, block and pair (~6 % of an eight-token Q4_0
/// product on an Emerald Rapids core, BENCHMARKS.md, and as much for Q4_1's minimum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairTerm {
    /// `factor·Σq`, where every lane's integer sum starts: the codes are stored unsigned, the
    /// weights plus `−factor` (Q4_0: 8, Q8_0: 128).
    Offset(i32),
    /// Q4_1's codes need no offset; the term is the minimum's factor `d_a·Σq` (the f32 product
    /// the group kernels make, in the same order), carried as the bits of that f32.
    MinScaled,
}

impl PairTerm {
    /// The term of one activation block with code sum `sum` and scale `scale`.
    pub fn of(self, sum: i32, scale: f32) -> i32 {
        match self {
            PairTerm::Offset(f) => f * sum,
            PairTerm::MinScaled => (scale * sum as f32).to_bits() as i32,
        }
    }
}

/// Q4_0's [`PairTerm`]: the unsigned codes are the weights plus 8.
pub const Q4_0_PAIR_TERM: PairTerm = PairTerm::Offset(-8);
/// Q8_0's [`PairTerm`]: the codes are stored plus 128.
pub const Q8_0_PAIR_TERM: PairTerm = PairTerm::Offset(-128);
/// Q4_1's [`PairTerm`], for the minimum's `m·(d_a·Σq)`.
pub const Q4_1_PAIR_TERM: PairTerm = PairTerm::MinScaled;

/// [`Gemv16Fn`] for eight tokens: each weight block is read and unpacked once for all of
/// them (a batched decode step of eight sequences). Returns `[token][row]`.
pub type Gemm8x16Fn = fn(&[u8], &[&[u8]; 8], &[&[i32]; 8], &[&[f32]; 8], usize) -> [[f32; 16]; 8];

/// [`Gemv16Fn`] for any count of tokens from 1 to 8 (the slices' common length), written to
/// `out[..count]`: the tokens left after the eight-token passes (a batch of seven sequences,
/// a prompt chunk's tail) in one pass over the weights, where a four-token pass and then
/// single ones took up to four (a q4_0 decode step of seven sequences took 0.8× the time, of
/// two 0.8×, on a 2-core Zen 4: BENCHMARKS.md, "Any count of tokens in one pass").
pub type GemmNx16Fn = fn(&[u8], &[&[u8]], &[&[i32]], &[&[f32]], usize, &mut [[f32; 16]]);

/// A [`GemmNx16Fn`] from a pair kernel generic over its token count (`$kernel::<N>`, an
/// `unsafe fn` of the set's target features): the count is matched to a monomorphized copy,
/// whose per-token lanes are the one-token copy's, so every count gives the same bits.
/// (A set's wrappers are sound only where the set is available, as for its other entries.)
macro_rules! any_count {
    ($kernel:ident) => {
        |w, a, e, d, nb, out| {
            assert!(a.len() == e.len() && a.len() == d.len() && out.len() >= a.len(), "pair kernel: {} activation rows, {} terms, {} scales, {} outputs", a.len(), e.len(), d.len(), out.len());
            // SAFETY: the set's target features (see above); each count's slices are arrays of that length.
            match a.len() {
                0 => {}
                1 => out[..1].copy_from_slice(&unsafe { $kernel::<1>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                2 => out[..2].copy_from_slice(&unsafe { $kernel::<2>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                3 => out[..3].copy_from_slice(&unsafe { $kernel::<3>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                4 => out[..4].copy_from_slice(&unsafe { $kernel::<4>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                5 => out[..5].copy_from_slice(&unsafe { $kernel::<5>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                6 => out[..6].copy_from_slice(&unsafe { $kernel::<6>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                7 => out[..7].copy_from_slice(&unsafe { $kernel::<7>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                8 => out[..8].copy_from_slice(&unsafe { $kernel::<8>(w, a.try_into().unwrap(), e.try_into().unwrap(), d.try_into().unwrap(), nb) }),
                n => panic!("pair kernel: {n} tokens in one pass (at most 8)"),
            }
        }
    };
}

/// Quantizes f32 activations (whole blocks) into their encoding.
pub type ActFn = fn(&[f32], &mut [u8]);
/// Sums the codes of each Q8_0 block of quantized activations.
pub type SumsFn = fn(&[u8], &mut [i32]);

/// `out[b]` = the sum of block `b`'s 32 signed codes, for Q8_0 blocks laid end to end in `acts`.
pub fn q8_0_sums_scalar(acts: &[u8], out: &mut [i32]) {
    assert_eq!(acts.len(), out.len() * Q8_0_BYTES);
    for (b, o) in acts.chunks_exact(Q8_0_BYTES).zip(out.iter_mut()) {
        *o = b[2..].iter().map(|&q| q as i8 as i32).sum();
    }
}

/// Two weight rows against four activation rows (Q8_0 activations, f32 scales as for
/// [`Dot4Fn`]): each weight block is loaded and unpacked once for four tokens and each
/// activation block once for two rows. Returns `[row][token]`, each entry bit for bit what
/// [`DotFn`] of the same kernel set gives for that row and token alone.
pub type Tile2x4Fn = fn([&[u8]; 2], [&[u8]; 4], [&[f32]; 4], usize) -> [[f32; 4]; 2];

/// One dot-product function per weight type.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub q8_0: DotFn,
    pub q4_0: DotFn,
    pub q5_0: DotFn,
    pub q4_k: DotFn,
    pub q4_1: DotFn,
    pub q6_k: DotFn,
    /// Four-token versions for the types with Q8_0 activations (`None`: loop over [`DotFn`]).
    pub q8_0x4: Option<Dot4Fn>,
    pub q4_0x4: Option<Dot4Fn>,
    pub q5_0x4: Option<Dot4Fn>,
    /// Q4_K and Q6_K against four Q8_K rows (the scales argument is unused: a Q8_K block
    /// carries its f32 scale).
    pub q4_kx4: Option<Dot4Fn>,
    pub q6_kx4: Option<Dot4Fn>,
    /// Two rows × four tokens for the row-major types with Q8_0 activations (`None`: rows one
    /// at a time).
    pub q8_0t: Option<Tile2x4Fn>,
    pub q4_0t: Option<Tile2x4Fn>,
    pub q5_0t: Option<Tile2x4Fn>,
    /// Q4_0 in interleaved groups of eight rows (the layout [`super::QuantMatrix`] keeps Q4_0
    /// weights in, two groups to a pair).
    pub q4_0x8: Gemv8Fn,
    /// Its four-token version (`None`: loop over [`Gemv8Fn`]).
    pub q4_0x8x4: Option<Gemm4x8Fn>,
    /// Q8_0 in interleaved groups of eight rows (the layout [`super::QuantMatrix`] keeps Q8_0
    /// weights in, two groups to a pair), and its four-token version.
    pub q8_0x8: Gemv8Fn,
    pub q8_0x8x4: Option<Gemm4x8Fn>,
    /// Q4_1 in interleaved groups ([`super::blocks::X8_Q4_1`]), and its four-token version.
    pub q4_1x8: Gemv8Fn,
    pub q4_1x8x4: Option<Gemm4x8Fn>,
    /// Whole pairs of groups at once, one ascending pass over both (`None`: a group at a time
    /// through the eight-row kernels, every other block column, then the other group's).
    pub q4_0x16: Option<Gemv16Fn>,
    pub q4_0x16x8: Option<Gemm8x16Fn>,
    pub q4_0x16xn: Option<GemmNx16Fn>,
    pub q8_0x16: Option<Gemv16Fn>,
    pub q8_0x16x8: Option<Gemm8x16Fn>,
    pub q8_0x16xn: Option<GemmNx16Fn>,
    pub q4_1x16: Option<Gemv16Fn>,
    pub q4_1x16x8: Option<Gemm8x16Fn>,
    pub q4_1x16xn: Option<GemmNx16Fn>,
    /// Activations to Q8_0 ([`super::blocks::quantize_act_q8_0`], whose bits every version
    /// gives for finite inputs).
    pub act_q8_0: ActFn,
    /// Σq of each Q8_0 block of quantized activations ([`q8_0_sums_scalar`]), for the
    /// interleaved kernels' offsets.
    pub q8_0_sums: SumsFn,
    /// `"avx512vnni"`, `"avx2"` or `"scalar"`, for reports.
    pub name: &'static str,
}

impl Kernels {
    pub fn scalar() -> Self {
        Kernels {
            q8_0: dot_q8_0_scalar,
            q4_0: dot_q4_0_scalar,
            q5_0: dot_q5_0_scalar,
            q4_k: dot_q4_k_scalar,
            q4_1: dot_q4_1_scalar,
            q6_k: dot_q6_k_scalar,
            q8_0x4: None,
            q4_0x4: None,
            q5_0x4: None,
            q4_kx4: None,
            q6_kx4: None,
            q8_0t: None,
            q4_0t: None,
            q5_0t: None,
            q4_0x8: gemv_q4_0x8_scalar,
            q4_0x8x4: None,
            q8_0x8: gemv_q8_0x8_scalar,
            q8_0x8x4: None,
            q4_1x8: gemv_q4_1x8_scalar,
            q4_1x8x4: None,
            q4_0x16: None,
            q4_0x16x8: None,
            q4_0x16xn: None,
            q8_0x16: None,
            q8_0x16x8: None,
            q8_0x16xn: None,
            q4_1x16: None,
            q4_1x16x8: None,
            q4_1x16xn: None,
            act_q8_0: super::blocks::quantize_act_q8_0,
            q8_0_sums: q8_0_sums_scalar,
            name: "scalar",
        }
    }

    /// The fastest kernels this CPU runs, detected once. `LINLY_LORA_NO_SIMD` forces the
    /// scalar ones, `LINLY_LORA_NO_AVX512` the AVX2 ones (to compare them on one machine).
    pub fn best() -> &'static Kernels {
        static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        BEST.get_or_init(|| {
            if std::env::var_os("LINLY_LORA_NO_SIMD").is_some() {
                return Kernels::scalar();
            }
            let mut sets = Kernels::simd_sets();
            if std::env::var_os("LINLY_LORA_NO_AVX512").is_some() {
                sets.retain(|k| k.name != "avx512vnni");
            }
            sets.pop().unwrap_or_else(Kernels::scalar)
        })
    }

    /// The AVX2 kernels when this CPU has them.
    pub fn simd() -> Option<Kernels> {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                return Some(avx2::kernels());
            }
        }
        None
    }

    /// Every SIMD kernel set this CPU runs, slowest first (AVX2, then AVX-512 VNNI).
    pub fn simd_sets() -> Vec<Kernels> {
        let mut sets: Vec<Kernels> = Kernels::simd().into_iter().collect();
        #[cfg(target_arch = "x86_64")]
        {
            if vnni::available() {
                sets.push(vnni::kernels());
            }
        }
        sets
    }

    /// The scalar kernels and every SIMD set this CPU runs (what the tests compare).
    pub fn all() -> Vec<Kernels> {
        let mut sets = vec![Kernels::scalar()];
        sets.extend(Kernels::simd_sets());
        sets
    }
}

fn dot_q8_0_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)).take(nb) {
        let s: i32 = wb[2..].iter().zip(&ab[2..]).map(|(&x, &y)| (x as i8 as i32) * (y as i8 as i32)).sum();
        sum += f16_at(wb, 0) * f16_at(ab, 0) * s as f32;
    }
    sum
}

fn dot_q4_0_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)).take(nb) {
        let q8 = &ab[2..];
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let q = wb[2 + j];
            s += ((q & 0x0F) as i32 - 8) * q8[j] as i8 as i32;
            s += ((q >> 4) as i32 - 8) * q8[j + QK / 2] as i8 as i32;
        }
        sum += f16_at(wb, 0) * f16_at(ab, 0) * s as f32;
    }
    sum
}

/// The reference for the interleaved Q4_0 layout: the same integer sums per block as
/// [`dot_q4_0_scalar`] (codes minus 8 times the activation codes, read straight from the
/// layout), scaled and summed in the same order, so each output equals that kernel's result
/// on the row-major row exactly. It does not use `act_sums`, so that tests check them.
fn gemv_q4_0x8_scalar(w: &[u8], stride: usize, a: &[u8], _act_sums: &[i32], nb: usize) -> [f32; 8] {
    // Element e < 16 is chunk e/4's low nibble, e ≥ 16 the high nibble of element e − 16's byte.
    gemv_x8_scalar(w, stride, a, nb, Q4_0X8_BYTES, |g, r, e| {
        let q = g[16 + 32 * (e % 16 / 4) + 4 * r + e % 4];
        (if e < 16 { q & 0x0F } else { q >> 4 }) as i32 - 8
    })
}

/// The reference for the interleaved Q8_0 layout: [`dot_q8_0_scalar`]'s integer sums per
/// block (the codes' offset undone), scaled and summed as [`gemv_q4_0x8_scalar`] does.
fn gemv_q8_0x8_scalar(w: &[u8], stride: usize, a: &[u8], _act_sums: &[i32], nb: usize) -> [f32; 8] {
    gemv_x8_scalar(w, stride, a, nb, Q8_0X8_BYTES, |g, r, e| (g[16 + 32 * (e / 4) + 4 * r + e % 4] ^ 0x80) as i8 as i32)
}

/// The reference for the interleaved Q4_1 layout: [`dot_q4_1_scalar`]'s block terms (the
/// nibbles read from the layout as [`gemv_q4_0x8_scalar`] reads them, after the two fields),
/// summed in the same order, so each output equals that kernel's result on the row-major row.
fn gemv_q4_1x8_scalar(w: &[u8], stride: usize, a: &[u8], _act_sums: &[i32], nb: usize) -> [f32; 8] {
    let mut out = [0f32; 8];
    for (b, ab) in a.chunks_exact(Q8_0_BYTES).take(nb).enumerate() {
        let g = &w[b * stride..b * stride + Q4_1X8_BYTES];
        let q8 = &ab[2..];
        let sa: i32 = q8.iter().map(|&q| q as i8 as i32).sum();
        for (r, o) in out.iter_mut().enumerate() {
            let s: i32 = (0..QK)
                .map(|e| {
                    let q = g[32 + 32 * (e % 16 / 4) + 4 * r + e % 4];
                    (if e < 16 { q & 0x0F } else { q >> 4 }) as i32 * q8[e] as i8 as i32
                })
                .sum();
            *o += q4_1_block(f16_at(g, 2 * r), f16_at(g, 16 + 2 * r), f16_at(ab, 0), s, sa);
        }
    }
    out
}

/// Eight interleaved rows against one Q8_0 row, block columns of `bytes` bytes every `stride`:
/// per block and row the exact integer `Σ code(g, r, e)·q_a[e]` over the 32 elements, times
/// the two scales.
fn gemv_x8_scalar(w: &[u8], stride: usize, a: &[u8], nb: usize, bytes: usize, code: impl Fn(&[u8], usize, usize) -> i32) -> [f32; 8] {
    let mut out = [0f32; 8];
    for (b, ab) in a.chunks_exact(Q8_0_BYTES).take(nb).enumerate() {
        let g = &w[b * stride..b * stride + bytes];
        let q8 = &ab[2..];
        for (r, o) in out.iter_mut().enumerate().take(Q4_0X8_ROWS) {
            let s: i32 = (0..QK).map(|e| code(g, r, e) * q8[e] as i8 as i32).sum();
            *o += f16_at(g, 2 * r) * f16_at(ab, 0) * s as f32;
        }
    }
    out
}

fn dot_q5_0_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q5_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)).take(nb) {
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let q8 = &ab[2..];
        let mut s = 0i32;
        for j in 0..QK / 2 {
            let q = wb[6 + j];
            let lo = ((q & 0x0F) as u32 | (((qh >> j) & 1) << 4)) as i32 - 16;
            let hi = ((q >> 4) as u32 | (((qh >> (j + QK / 2)) & 1) << 4)) as i32 - 16;
            s += lo * q8[j] as i8 as i32 + hi * q8[j + QK / 2] as i8 as i32;
        }
        sum += f16_at(wb, 0) * f16_at(ab, 0) * s as f32;
    }
    sum
}

/// One Q4_1 block's product with a Q8_0 activation block, from the integer sums `s = Σ q_w·q_a`
/// and `sa = Σ q_a`: `d_w·d_a·s + m_w·(d_a·sa)`, the expression (and rounding) every Q4_1 kernel
/// uses per block and row.
#[inline(always)]
pub fn q4_1_block(dw: f32, mw: f32, da: f32, s: i32, sa: i32) -> f32 {
    dw * da * s as f32 + mw * (da * sa as f32)
}

/// Q4_1 × Q8_0: [`q4_1_block`] per block.
fn dot_q4_1_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q4_1_BYTES).zip(a.chunks_exact(Q8_0_BYTES)).take(nb) {
        let q8 = &ab[2..];
        let (mut s, mut sa) = (0i32, 0i32);
        for j in 0..QK / 2 {
            let q = wb[4 + j];
            let (lo, hi) = (q8[j] as i8 as i32, q8[j + QK / 2] as i8 as i32);
            s += (q & 0x0F) as i32 * lo + (q >> 4) as i32 * hi;
            sa += lo + hi;
        }
        sum += q4_1_block(f16_at(wb, 0), f16_at(wb, 2), f16_at(ab, 0), s, sa);
    }
    sum
}

/// Q6_K × Q8_K: `d_w·d_a·Σ_j sc_j·Σ (q6 − 32)·q8` over the 16 sub-blocks of 16 of a super-block.
/// Element `128n + 32k + l` has its low nibble in `ql[64n + l + 32·(k&1)]` (high nibble for
/// k ≥ 2) and its high two bits at `2k` in `qh[32n + l]`.
fn dot_q6_k_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q6_K_BYTES).zip(a.chunks_exact(Q8_K_BYTES)).take(nb) {
        let ad = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let q8 = &ab[4..260];
        let sc = &wb[192..208];
        let mut si = 0i32;
        for n in 0..2 {
            let (ql, qh) = (&wb[64 * n..64 * n + 64], &wb[128 + 32 * n..160 + 32 * n]);
            for k in 0..4 {
                let mut p = [0i32; 2];
                for l in 0..32 {
                    let lo = ql[l + 32 * (k & 1)];
                    let lo = if k < 2 { lo & 0x0F } else { lo >> 4 };
                    let q = (lo | (((qh[l] >> (2 * k)) & 3) << 4)) as i32 - 32;
                    p[l / 16] += q * q8[128 * n + 32 * k + l] as i8 as i32;
                }
                let j = 8 * n + 2 * k;
                si += sc[j] as i8 as i32 * p[0] + sc[j + 1] as i8 as i32 * p[1];
            }
        }
        sum += f16_at(wb, 208) * ad * si as f32;
    }
    sum
}

/// Q4_K × Q8_K: `d·Σ_j sc_j·Σ q4·q8 − dmin·Σ_j m_j·Σ q8` per super-block; the second sum uses
/// the activation's precomputed 16-element sums.
fn dot_q4_k_scalar(w: &[u8], a: &[u8], nb: usize) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q4_K_BYTES).zip(a.chunks_exact(Q8_K_BYTES)).take(nb) {
        let ad = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let q8 = &ab[4..260];
        let bsum = |j: usize| i16::from_le_bytes([ab[260 + 2 * j], ab[261 + 2 * j]]) as i32;
        let (mut si, mut sm) = (0i32, 0i32);
        for c in 0..4 {
            let q4 = &wb[16 + 32 * c..48 + 32 * c];
            let (sc_l, m_l) = scale_min_k4(2 * c, &wb[4..16]);
            let (sc_h, m_h) = scale_min_k4(2 * c + 1, &wb[4..16]);
            let (mut pl, mut ph) = (0i32, 0i32);
            for l in 0..32 {
                pl += (q4[l] & 0x0F) as i32 * q8[64 * c + l] as i8 as i32;
                ph += (q4[l] >> 4) as i32 * q8[64 * c + 32 + l] as i8 as i32;
            }
            si += sc_l as i32 * pl + sc_h as i32 * ph;
            sm += m_l as i32 * (bsum(4 * c) + bsum(4 * c + 1)) + m_h as i32 * (bsum(4 * c + 2) + bsum(4 * c + 3));
        }
        sum += f16_at(wb, 0) * ad * si as f32 - f16_at(wb, 2) * ad * sm as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[path = "kernels_avx2.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "kernels_vnni.rs"]
mod vnni;

//! The AVX2 + FMA + F16C versions of [`super::Kernels`]' products (x86_64, detected at run time);
//! the scalar ones in `kernels.rs` are their reference.

use super::super::blocks::{scale_min_k4, QK, Q4_0X8_BYTES, Q4_1X8_BYTES, Q8_0X8_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q6_K_BYTES, Q8_0_BYTES, Q8_K_BYTES};
use super::Kernels;
use std::arch::x86_64::*;

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Only called after [`available`] said yes: the wrappers below are sound exactly then.
pub fn kernels() -> Kernels {
    assert!(available());
    Kernels {
        q8_0: |w, a, n| unsafe { q8_0(w, a, n) },
        q4_0: |w, a, n| unsafe { q4_0(w, a, n) },
        q5_0: |w, a, n| unsafe { q5_0(w, a, n) },
        q4_k: |w, a, n| unsafe { q4_k(w, a, n) },
        q4_1: |w, a, n| unsafe { q4_1(w, a, n) },
        q6_k: |w, a, n| unsafe { q6_k(w, a, n) },
        q8_0x4: Some(|w, a, s, n| unsafe { q8_0x4(w, a, s, n) }),
        q4_0x4: Some(|w, a, s, n| unsafe { q4_0x4(w, a, s, n) }),
        q5_0x4: Some(|w, a, s, n| unsafe { q5_0x4(w, a, s, n) }),
        q4_kx4: Some(|w, a, s, n| unsafe { q4_kx4(w, a, s, n) }),
        q6_kx4: Some(|w, a, s, n| unsafe { q6_kx4(w, a, s, n) }),
        q8_0t: None,
        q4_0t: None,
        q5_0t: None,
        q4_0x8: |w, st, a, s, n| unsafe { q4_0x8(w, st, a, s, n) },
        q4_0x8x4: Some(|w, st, a, s, n| unsafe { q4_0x8x4(w, st, a, s, n) }),
        q8_0x8: |w, st, a, s, n| unsafe { q8_0x8::<1>(w, st, [a], [s], n)[0] },
        q8_0x8x4: Some(|w, st, a, s, n| unsafe { q8_0x8::<4>(w, st, a, s, n) }),
        q4_1x8: |w, st, a, s, n| unsafe { q4_1x8::<1>(w, st, [a], [s], n)[0] },
        q4_1x8x4: Some(|w, st, a, s, n| unsafe { q4_1x8::<4>(w, st, a, s, n) }),
        q4_0x16: Some(|w, a, s, d, n| unsafe { q4_0x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q4_0x16x8: Some(|w, a, s, d, n| unsafe { q4_0x16::<8>(w, a, s, d, n) }),
        q4_0x16xn: Some(any_count!(q4_0x16)),
        q8_0x16: Some(|w, a, s, d, n| unsafe { q8_0x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q8_0x16x8: Some(|w, a, s, d, n| unsafe { q8_0x16::<8>(w, a, s, d, n) }),
        q8_0x16xn: Some(any_count!(q8_0x16)),
        q4_1x16: Some(|w, a, s, d, n| unsafe { q4_1x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q4_1x16x8: Some(|w, a, s, d, n| unsafe { q4_1x16::<8>(w, a, s, d, n) }),
        q4_1x16xn: Some(any_count!(q4_1x16)),
        act_q8_0: |x, o| unsafe { act_q8_0(x, o) },
        q8_0_sums: |a, o| unsafe { q8_0_sums(a, o) },
        name: "avx2",
    }
}

/// How far ahead of the current weight block the kernels prefetch. Decoding is a stream
/// over every weight once per token, mostly from DRAM; the hardware prefetcher alone left
/// the loads of the weights as the kernels' hottest instructions (perf annotate). Measured
/// on the 2-core EPYC, one thread, `bench quant --gen 64`: q4_0 decode +10–15 % at 1–8 KiB
/// (no clear best among them), q8_0 +13 % at 2 KiB.
const PREFETCH_AHEAD: usize = 2048;

/// Prefetches `LINES` cache lines at [`PREFETCH_AHEAD`] bytes past `p` (the caller's block
/// size rounded up to lines). Past the end of the weights it is a no-op, never a fault.
#[inline(always)]
pub(super) unsafe fn prefetch<const LINES: usize>(p: *const u8) {
    let p = p.wrapping_add(PREFETCH_AHEAD) as *const i8;
    for l in 0..LINES {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l));
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Two f16 scales (at `p` and `q`) multiplied, converted with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale2(p: *const u8, q: *const u8) -> f32 {
    let a = (p as *const u16).read_unaligned() as i32;
    let b = (q as *const u16).read_unaligned() as i32;
    let v = _mm_cvtph_ps(_mm_set_epi32(0, 0, 0, a | (b << 16)));
    _mm_cvtss_f32(_mm_mul_ss(v, _mm_shuffle_ps(v, v, 1)))
}

/// Σ x·y over 32 signed bytes as 8 f32 lanes (the sign trick makes `maddubs` signed).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
    _mm256_cvtepi32_ps(dot)
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first (elements 0..16), then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles32(p: *const u8) -> __m256i {
    let b = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(b, m);
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    _mm256_set_m128i(hi, lo)
}

/// 32 bits → 32 bytes, 0xFF where the bit is set (ggml's `bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned() as i32;
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Σ dᵢ·sᵢ over blocks, two blocks per step into two accumulators so that consecutive
/// blocks' loads and multiply-adds overlap instead of waiting on one FMA chain.
#[inline(always)]
unsafe fn two_accumulators(nb: usize, block: impl Fn(usize) -> (__m256, __m256)) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 1 < nb {
        let (d0, s0) = block(i);
        let (d1, s1) = block(i + 1);
        acc0 = _mm256_fmadd_ps(d0, s0, acc0);
        acc1 = _mm256_fmadd_ps(d1, s1, acc1);
        i += 2;
    }
    if i < nb {
        let (d0, s0) = block(i);
        acc0 = _mm256_fmadd_ps(d0, s0, acc0);
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q8_0_BYTES && a.len() >= nb * Q8_0_BYTES);
    let block = |i: usize| {
        let (wp, ap) = (w.as_ptr().add(i * Q8_0_BYTES), a.as_ptr().add(i * Q8_0_BYTES));
        prefetch::<1>(wp);
        let d = _mm256_set1_ps(scale2(wp, ap));
        let qw = _mm256_loadu_si256(wp.add(2) as *const __m256i);
        let qa = _mm256_loadu_si256(ap.add(2) as *const __m256i);
        (d, mul_sum_i8(qw, qa))
    };
    two_accumulators(nb, block)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q4_0_BYTES && a.len() >= nb * Q8_0_BYTES);
    let off = _mm256_set1_epi8(8);
    let block = |i: usize| {
        let (wp, ap) = (w.as_ptr().add(i * Q4_0_BYTES), a.as_ptr().add(i * Q8_0_BYTES));
        prefetch::<1>(wp);
        let d = _mm256_set1_ps(scale2(wp, ap));
        let qw = _mm256_sub_epi8(nibbles32(wp.add(2)), off);
        let qa = _mm256_loadu_si256(ap.add(2) as *const __m256i);
        (d, mul_sum_i8(qw, qa))
    };
    two_accumulators(nb, block)
}

/// Eight interleaved Q4_0 rows against one Q8_0 row, one pass over the group's stream.
/// Per block column: the unsigned nibbles (0..15) of each 32-byte chunk go straight into
/// `maddubs` against the activation's matching four bytes broadcast to every 32-bit lane
/// (lane r = row r), so no sign trick is needed; the eight 16-bit partial sums of a block
/// fit in i16 (|Σ| ≤ 8·2·15·127 = 30 480) and are widened once per block by `madd`; the
/// offset is taken off in integers as `8·Σq_a`; then one FMA with the eight rows' scales
/// (one F16C load) times the activation's scale.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0x8(w: &[u8], stride: usize, a: &[u8], act_sums: &[i32], nb: usize) -> [f32; 8] {
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + Q4_0X8_BYTES);
    assert!(a.len() >= nb * Q8_0_BYTES && act_sums.len() >= nb);
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let g = w.as_ptr().add(b * stride);
        prefetch::<3>(g);
        let ap = a.as_ptr().add(b * Q8_0_BYTES);
        let at = |k: usize| _mm256_set1_epi32((ap.add(2 + 4 * k) as *const i32).read_unaligned());
        let mut s16 = [_mm256_setzero_si256(); 2];
        for t in 0..4 {
            let q = _mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            // Two chains, so that the adds of consecutive chunks overlap.
            s16[0] = _mm256_add_epi16(s16[0], _mm256_maddubs_epi16(lo, at(t)));
            s16[1] = _mm256_add_epi16(s16[1], _mm256_maddubs_epi16(hi, at(4 + t)));
        }
        let s32 = _mm256_madd_epi16(_mm256_add_epi16(s16[0], s16[1]), ones);
        let s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(8 * *act_sums.get_unchecked(b)));
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
        let d = _mm256_mul_ps(dw, _mm256_set1_ps(f16_scale(ap)));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32), acc);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// [`q4_0x8`] against four activation rows: the block column's nibbles are unpacked once
/// into eight registers and reused for the four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0x8x4(w: &[u8], stride: usize, a: [&[u8]; 4], act_sums: [&[i32]; 4], nb: usize) -> [[f32; 8]; 4] {
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + Q4_0X8_BYTES);
    for (r, s) in a.iter().zip(&act_sums) {
        assert!(r.len() >= nb * Q8_0_BYTES && s.len() >= nb);
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let g = w.as_ptr().add(b * stride);
        prefetch::<3>(g);
        let mut q = [_mm256_setzero_si256(); 8];
        for t in 0..4 {
            let raw = _mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i);
            q[t] = _mm256_and_si256(raw, m4);
            q[4 + t] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
        for k in 0..4 {
            let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
            let mut s16 = [_mm256_setzero_si256(); 2];
            for t in 0..4 {
                let at = |j: usize| _mm256_set1_epi32((ap.add(2 + 4 * j) as *const i32).read_unaligned());
                s16[0] = _mm256_add_epi16(s16[0], _mm256_maddubs_epi16(q[t], at(t)));
                s16[1] = _mm256_add_epi16(s16[1], _mm256_maddubs_epi16(q[4 + t], at(4 + t)));
            }
            let s32 = _mm256_madd_epi16(_mm256_add_epi16(s16[0], s16[1]), ones);
            let s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(8 * *act_sums[k].get_unchecked(b)));
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(f16_scale(ap)));
            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32), acc[k]);
        }
    }
    let mut out = [[0f32; 8]; 4];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

/// Eight interleaved Q8_0 rows ([`super::super::blocks::pack_q8_0x8`]) × `N` tokens.
/// `maddubs` cannot take the offset codes (255·127 overflows its 16-bit pairs), so each chunk
/// gets its signed codes back (one XOR) and goes through the sign trick of [`q8_0`] (`|w|`
/// times `a·sign(w)`, at most 2·128·127 per pair); a chunk is loaded and made signed once for
/// the `N` tokens. The block's lanes are exact integers, the same ones the VNNI kernel makes
/// from the offset codes; then one FMA with the eight rows' scales, as in [`q4_0x8`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0x8<const N: usize>(w: &[u8], stride: usize, a: [&[u8]; N], _act_sums: [&[i32]; N], nb: usize) -> [[f32; 8]; N] {
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + Q8_0X8_BYTES);
    for r in &a {
        assert!(r.len() >= nb * Q8_0_BYTES);
    }
    let off = _mm256_set1_epi8(0x80u8 as i8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let g = w.as_ptr().add(b * stride);
        prefetch::<5>(g);
        let mut s32 = [_mm256_setzero_si256(); N];
        for t in 0..8 {
            let q = _mm256_xor_si256(_mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i), off);
            let aq = _mm256_abs_epi8(q);
            for (k, s) in s32.iter_mut().enumerate() {
                let at = _mm256_set1_epi32((a[k].as_ptr().add(b * Q8_0_BYTES + 2 + 4 * t) as *const i32).read_unaligned());
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(at, q)), ones));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(f16_scale(a[k].as_ptr().add(b * Q8_0_BYTES))));
            *acc_k = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32[k]), *acc_k);
        }
    }
    let mut out = [[0f32; 8]; N];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

/// Both groups of an interleaved Q4_0 pair ([`super::super::blocks::interleave16`]) × `N`
/// tokens, in one ascending pass: block column `b` of the two groups is 288 contiguous bytes,
/// read and prefetched as one piece. Going group by group through [`q4_0x8`] reads every other
/// 144 bytes, then comes back for the rest, which left a 2-core EPYC's memory stream at 7.3
/// GB/s on one thread where this reads 10.2 (BENCHMARKS.md, "Streaming a pair in one pass"). Per group and token
/// the arithmetic is [`q4_0x8`]'s (the same block integers, `d_w·d_a` and one FMA per block in
/// order; the activation scale comes in as the f32 of its f16), so each output is bit for bit
/// the group kernel's. The column's code repeats [`q4_0x8x4`]'s on purpose: one `#[inline(always)]`
/// column helper for the group and pair kernels of both types compiled to 0.85–0.95× (median 0.91) the
/// pp128 of q4_0 (alternated `bench quant` runs), so the copies stay.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0x16<const N: usize>(w: &[u8], a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    assert!(w.len() >= nb * 2 * Q4_0X8_BYTES);
    for k in 0..N {
        assert!(a[k].len() >= nb * Q8_0_BYTES && act_terms[k].len() >= nb && act_scales[k].len() >= nb);
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // [token][group]
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    for b in 0..nb {
        let col = w.as_ptr().add(2 * b * Q4_0X8_BYTES);
        prefetch::<5>(col);
        for (h, g) in [col, col.add(Q4_0X8_BYTES)].into_iter().enumerate() {
            let mut q = [_mm256_setzero_si256(); 8];
            for t in 0..4 {
                let raw = _mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i);
                q[t] = _mm256_and_si256(raw, m4);
                q[4 + t] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
            for k in 0..N {
                let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
                let at = |j: usize| _mm256_set1_epi32((ap.add(2 + 4 * j) as *const i32).read_unaligned());
                let mut s16 = [_mm256_setzero_si256(); 2];
                for t in 0..4 {
                    s16[0] = _mm256_add_epi16(s16[0], _mm256_maddubs_epi16(q[t], at(t)));
                    s16[1] = _mm256_add_epi16(s16[1], _mm256_maddubs_epi16(q[4 + t], at(4 + t)));
                }
                let s32 = _mm256_madd_epi16(_mm256_add_epi16(s16[0], s16[1]), ones);
                // The term is `−8·Σq` (`Q4_0_PAIR_TERM`): the group kernel's `− 8·Σq`.
                let s32 = _mm256_add_epi32(s32, _mm256_set1_epi32(*act_terms[k].get_unchecked(b)));
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*act_scales[k].get_unchecked(b)));
                acc[k][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32), acc[k][h]);
            }
        }
    }
    let mut out = [[0f32; 16]; N];
    for (o, [a0, a1]) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), a0);
        _mm256_storeu_ps(o.as_mut_ptr().add(8), a1);
    }
    out
}

/// Both groups of an interleaved Q8_0 pair × `N` tokens in one ascending pass (544 contiguous
/// bytes per block column), as [`q4_0x16`] is for [`q4_0x8`]; per group and token the
/// arithmetic is [`q8_0x8`]'s, so each output is bit for bit the group kernel's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0x16<const N: usize>(w: &[u8], a: &[&[u8]; N], _act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    assert!(w.len() >= nb * 2 * Q8_0X8_BYTES);
    for k in 0..N {
        assert!(a[k].len() >= nb * Q8_0_BYTES && act_scales[k].len() >= nb);
    }
    let off = _mm256_set1_epi8(0x80u8 as i8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    for b in 0..nb {
        let col = w.as_ptr().add(2 * b * Q8_0X8_BYTES);
        prefetch::<9>(col);
        for (h, g) in [col, col.add(Q8_0X8_BYTES)].into_iter().enumerate() {
            let mut s32 = [_mm256_setzero_si256(); N];
            for t in 0..8 {
                let q = _mm256_xor_si256(_mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i), off);
                let aq = _mm256_abs_epi8(q);
                for (k, s) in s32.iter_mut().enumerate() {
                    let at = _mm256_set1_epi32((a[k].as_ptr().add(b * Q8_0_BYTES + 2 + 4 * t) as *const i32).read_unaligned());
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(at, q)), ones));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
            for k in 0..N {
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*act_scales[k].get_unchecked(b)));
                acc[k][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32[k]), acc[k][h]);
            }
        }
    }
    let mut out = [[0f32; 16]; N];
    for (o, [a0, a1]) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), a0);
        _mm256_storeu_ps(o.as_mut_ptr().add(8), a1);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q5_0_BYTES && a.len() >= nb * Q8_0_BYTES);
    let hi_mask = _mm256_set1_epi8(0xF0u8 as i8);
    let block = |i: usize| {
        let (wp, ap) = (w.as_ptr().add(i * Q5_0_BYTES), a.as_ptr().add(i * Q8_0_BYTES));
        prefetch::<1>(wp);
        let d = _mm256_set1_ps(scale2(wp, ap));
        // q − 16 as a signed byte: the nibble when the fifth bit is set, else nibble | 0xF0.
        let qh = _mm256_andnot_si256(bytes_from_bits(wp.add(2)), hi_mask);
        let qw = _mm256_or_si256(nibbles32(wp.add(6)), qh);
        let qa = _mm256_loadu_si256(ap.add(2) as *const __m256i);
        (d, mul_sum_i8(qw, qa))
    };
    two_accumulators(nb, block)
}

/// Four activation rows against one weight row; `block(i)` gives weight block i as signed
/// bytes and its f32 scale.
///
/// Each token's sum is made exactly as the one-token kernels make it ([`two_accumulators`]
/// over [`mul_sum_i8`]): the same integer block sums, the same `d_w·d_a` product, even blocks
/// into one accumulator and odd ones into another, added and reduced by [`hsum`] at the end.
/// So a token's output does not depend on whether it went through here or alone, nor on the
/// other tokens beside it: what lets the server batch sequences and keep every answer exact.
#[inline(always)]
unsafe fn four(a: [&[u8]; 4], s: [&[f32]; 4], nb: usize, block: impl Fn(usize) -> (__m256i, f32)) -> [f32; 4] {
    for (r, sc) in a.iter().zip(&s) {
        assert!(r.len() >= nb * Q8_0_BYTES && sc.len() >= nb);
    }
    let ones = _mm256_set1_epi16(1);
    // [token][block parity]
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    for i in 0..nb {
        let (qw, dw) = block(i);
        let ax = _mm256_sign_epi8(qw, qw);
        for k in 0..4 {
            let ap = a[k].as_ptr().add(i * Q8_0_BYTES);
            let da = *s[k].get_unchecked(i);
            let qa = _mm256_loadu_si256(ap.add(2) as *const __m256i);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qa, qw)), ones);
            let acc = &mut acc[k][i & 1];
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(dot), *acc);
        }
    }
    let mut out = [0f32; 4];
    for (o, [a0, a1]) in out.iter_mut().zip(acc) {
        *o = hsum(_mm256_add_ps(a0, a1));
    }
    out
}

#[inline(always)]
pub(super) unsafe fn f16_scale(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0x4(w: &[u8], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [f32; 4] {
    assert!(w.len() >= nb * Q8_0_BYTES);
    four(a, s, nb, |i| {
        let wp = w.as_ptr().add(i * Q8_0_BYTES);
        (_mm256_loadu_si256(wp.add(2) as *const __m256i), f16_scale(wp))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0x4(w: &[u8], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [f32; 4] {
    assert!(w.len() >= nb * Q4_0_BYTES);
    let off = _mm256_set1_epi8(8);
    four(a, s, nb, |i| {
        let wp = w.as_ptr().add(i * Q4_0_BYTES);
        (_mm256_sub_epi8(nibbles32(wp.add(2)), off), f16_scale(wp))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0x4(w: &[u8], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [f32; 4] {
    assert!(w.len() >= nb * Q5_0_BYTES);
    let hi_mask = _mm256_set1_epi8(0xF0u8 as i8);
    four(a, s, nb, |i| {
        let wp = w.as_ptr().add(i * Q5_0_BYTES);
        let qh = _mm256_andnot_si256(bytes_from_bits(wp.add(2)), hi_mask);
        (_mm256_or_si256(nibbles32(wp.add(6)), qh), f16_scale(wp))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q4_K_BYTES && a.len() >= nb * Q8_K_BYTES);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    for i in 0..nb {
        let wb = &w[i * Q4_K_BYTES..(i + 1) * Q4_K_BYTES];
        prefetch::<3>(wb.as_ptr());
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        let ad = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
        let dd = _mm_cvtph_ps(_mm_set_epi32(0, 0, 0, (wb.as_ptr() as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dd) * ad;
        let dmin = _mm_cvtss_f32(_mm_shuffle_ps(dd, dd, 1)) * ad;
        let bsums = ab.as_ptr().add(260) as *const i16;
        let mut sm = 0i32;
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let (sc_l, m_l) = scale_min_k4(2 * c, &wb[4..16]);
            let (sc_h, m_h) = scale_min_k4(2 * c + 1, &wb[4..16]);
            let bs = |j: usize| bsums.add(j).read_unaligned() as i32;
            sm += m_l as i32 * (bs(4 * c) + bs(4 * c + 1)) + m_h as i32 * (bs(4 * c + 2) + bs(4 * c + 3));
            let q4 = _mm256_loadu_si256(wb.as_ptr().add(16 + 32 * c) as *const __m256i);
            let q4l = _mm256_and_si256(q4, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let q8l = _mm256_loadu_si256(ab.as_ptr().add(4 + 64 * c) as *const __m256i);
            let q8h = _mm256_loadu_si256(ab.as_ptr().add(36 + 64 * c) as *const __m256i);
            let pl = _mm256_madd_epi16(_mm256_set1_epi16(sc_l as i16), _mm256_maddubs_epi16(q4l, q8l));
            let ph = _mm256_madd_epi16(_mm256_set1_epi16(sc_h as i16), _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        acc_m += dmin * sm as f32;
    }
    hsum(acc) - acc_m
}

/// Q4_1 against Q8_0 activations: per block the integer `Σ q_w·q_a` in eight lanes as ggml's
/// kernel makes it, and `Σ q_a` from the same activation bytes (`maddubs` against ones), so
/// each block adds [`super::q4_1_block`]'s two terms: `d_w·d_a·Σ` into one accumulator and
/// `m_w·(d_a·Σq_a)` into a scalar sum, in block order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q4_1_BYTES && a.len() >= nb * Q8_0_BYTES);
    let ones = _mm256_set1_epi16(1);
    let ones8 = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for i in 0..nb {
        let (wp, ap) = (w.as_ptr().add(i * Q4_1_BYTES), a.as_ptr().add(i * Q8_0_BYTES));
        prefetch::<1>(wp);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((wp as *const i32).read_unaligned()));
        let (dw, mw) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
        let da = f16_scale(ap);
        // Codes 0..15 are unsigned: maddubs takes them as is.
        let qw = nibbles32(wp.add(4));
        let qa = _mm256_loadu_si256(ap.add(2) as *const __m256i);
        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qa), ones);
        let sa = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qa), ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(dot), acc);
        mins += mw * (da * sa as f32);
    }
    hsum(acc) + mins
}

/// The sum of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let mut l = [0i32; 8];
    _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, v);
    l.iter().sum()
}

/// One interleaved Q4_1 group's block column against one token: the eight rows' integer sums
/// `Σ q_w·q_a` (unsigned nibbles `q`, [`q4_0x8`]'s lanes and chains), then
/// [`super::q4_1_block`]'s two terms as two FMAs, `d_w·d_a` times the sums and `m_w` times
/// `d_a·Σq_a`. The group and pair kernels below both call it, so a row's result is the same
/// whichever of them, and however many tokens, computed it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_column(q: &[__m256i; 8], ap: *const u8, dw: __m256, mw: __m256, da: f32, min_sum: __m256, acc: __m256) -> __m256 {
    let ones = _mm256_set1_epi16(1);
    let at = |j: usize| _mm256_set1_epi32((ap.add(2 + 4 * j) as *const i32).read_unaligned());
    let mut s16 = [_mm256_setzero_si256(); 2];
    for t in 0..4 {
        s16[0] = _mm256_add_epi16(s16[0], _mm256_maddubs_epi16(q[t], at(t)));
        s16[1] = _mm256_add_epi16(s16[1], _mm256_maddubs_epi16(q[4 + t], at(4 + t)));
    }
    let s32 = _mm256_madd_epi16(_mm256_add_epi16(s16[0], s16[1]), ones);
    let acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(da)), _mm256_cvtepi32_ps(s32), acc);
    _mm256_fmadd_ps(mw, min_sum, acc)
}

/// `d_a·Σq_a` of a token's activation block, broadcast: the factor of the weights' minimums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_min_sum(da: f32, sa: i32) -> __m256 {
    _mm256_set1_ps(da * sa as f32)
}

/// A Q4_1 group's nibbles of one block column (at `g`, after the two fields), unpacked once
/// for every token: chunks' low nibbles, then their high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_nibbles(g: *const u8) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut q = [_mm256_setzero_si256(); 8];
    for t in 0..4 {
        let raw = _mm256_loadu_si256(g.add(32 + 32 * t) as *const __m256i);
        q[t] = _mm256_and_si256(raw, m4);
        q[4 + t] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    }
    q
}

/// Eight interleaved Q4_1 rows ([`super::super::blocks::X8_Q4_1`]: per block column the eight
/// `d`, the eight `m`, then [`q4_0x8`]'s four chunks of nibbles) against `N` Q8_0 tokens,
/// block columns `stride` apart.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1x8<const N: usize>(w: &[u8], stride: usize, a: [&[u8]; N], act_sums: [&[i32]; N], nb: usize) -> [[f32; 8]; N] {
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + Q4_1X8_BYTES);
    for k in 0..N {
        assert!(a[k].len() >= nb * Q8_0_BYTES && act_sums[k].len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let g = w.as_ptr().add(b * stride);
        prefetch::<3>(g);
        let q = q4_1_nibbles(g);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
        let mw = _mm256_cvtph_ps(_mm_loadu_si128(g.add(16) as *const __m128i));
        for k in 0..N {
            let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
            let da = f16_scale(ap);
            acc[k] = q4_1_column(&q, ap, dw, mw, da, q4_1_min_sum(da, *act_sums[k].get_unchecked(b)), acc[k]);
        }
    }
    let mut out = [[0f32; 8]; N];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

/// Both groups of an interleaved Q4_1 pair × `N` tokens in one ascending pass, as
/// [`q4_0x16`] is for Q4_0; per group and token the arithmetic is [`q4_1x8`]'s (the same
/// [`q4_1_column`], the activation scale as the f32 of its f16), so each output is bit for bit
/// the group kernel's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1x16<const N: usize>(w: &[u8], a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    assert!(w.len() >= nb * 2 * Q4_1X8_BYTES);
    for k in 0..N {
        assert!(a[k].len() >= nb * Q8_0_BYTES && act_terms[k].len() >= nb && act_scales[k].len() >= nb);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    for b in 0..nb {
        let col = w.as_ptr().add(2 * b * Q4_1X8_BYTES);
        prefetch::<5>(col);
        // Once per token and block, for both groups.
        let da: [f32; N] = std::array::from_fn(|k| *act_scales[k].get_unchecked(b));
        // The term is `q4_1_min_sum`'s `d_a·Σq`, made once per product (`PairTerm::MinScaled`).
        let ms: [__m256; N] = std::array::from_fn(|k| _mm256_set1_ps(f32::from_bits(*act_terms[k].get_unchecked(b) as u32)));
        for (h, g) in [col, col.add(Q4_1X8_BYTES)].into_iter().enumerate() {
            let q = q4_1_nibbles(g);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(g.add(16) as *const __m128i));
            for k in 0..N {
                let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
                acc[k][h] = q4_1_column(&q, ap, dw, mw, da[k], ms[k], acc[k][h]);
            }
        }
    }
    let mut out = [[0f32; 16]; N];
    for (o, [a0, a1]) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), a0);
        _mm256_storeu_ps(o.as_mut_ptr().add(8), a1);
    }
    out
}

/// As ggml's AVX2 Q6_K kernel: 6-bit codes assembled unsigned (0..63) so that `maddubs`
/// applies, and the −32 offset taken off once per super-block as `32·Σ_j sc_j·bsum_j`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(w: &[u8], a: &[u8], nb: usize) -> f32 {
    assert!(w.len() >= nb * Q6_K_BYTES && a.len() >= nb * Q8_K_BYTES);
    let m15 = _mm256_set1_epi8(15);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wp = w.as_ptr().add(i * Q6_K_BYTES);
        prefetch::<4>(wp);
        let ap = a.as_ptr().add(i * Q8_K_BYTES);
        let d = f16_scale(wp.add(208)) * (ap as *const f32).read_unaligned();
        let scales = _mm_loadu_si128(wp.add(192) as *const __m128i);
        let bsums = _mm256_loadu_si256(ap.add(260) as *const __m256i);
        let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(scales)), 5);
        let mut sc = [0i8; 16];
        _mm_storeu_si128(sc.as_mut_ptr() as *mut __m128i, scales);
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(wp.add(64 * n) as *const __m256i);
            let ql1 = _mm256_loadu_si256(wp.add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(wp.add(128 + 32 * n) as *const __m256i);
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m15), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4)),
                _mm256_or_si256(_mm256_and_si256(ql1, m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4)),
            ];
            for (k, qk) in q.iter().enumerate() {
                let q8 = _mm256_loadu_si256(ap.add(4 + 128 * n + 32 * k) as *const __m256i);
                let j = 8 * n + 2 * k;
                // maddubs lanes 0..8 hold elements 0..16 (sub-block j), lanes 8..16 the next 16.
                let s16 = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1] as i16), _mm_set1_epi16(sc[j] as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s16, _mm256_maddubs_epi16(*qk, q8)));
            }
        }
        sumi = _mm256_sub_epi32(sumi, offset);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

/// [`q4_k`] against four Q8_K rows: each super-block's nibbles and scales are unpacked once
/// for the four tokens. Each token keeps [`q4_k`]'s integer sums, its one accumulator and its
/// scalar sum of the minimum terms, in the same order, so each result is [`q4_k`]'s bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_kx4(w: &[u8], a: [&[u8]; 4], _s: [&[f32]; 4], nb: usize) -> [f32; 4] {
    assert!(w.len() >= nb * Q4_K_BYTES);
    for r in &a {
        assert!(r.len() >= nb * Q8_K_BYTES);
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_m = [0f32; 4];
    for i in 0..nb {
        let wb = &w[i * Q4_K_BYTES..(i + 1) * Q4_K_BYTES];
        prefetch::<3>(wb.as_ptr());
        let dd = _mm_cvtph_ps(_mm_set_epi32(0, 0, 0, (wb.as_ptr() as *const i32).read_unaligned()));
        let (dw, dminw) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_shuffle_ps(dd, dd, 1)));
        let mut sumi = [_mm256_setzero_si256(); 4];
        let mut sm = [0i32; 4];
        for c in 0..4 {
            let (sc_l, m_l) = scale_min_k4(2 * c, &wb[4..16]);
            let (sc_h, m_h) = scale_min_k4(2 * c + 1, &wb[4..16]);
            let q4 = _mm256_loadu_si256(wb.as_ptr().add(16 + 32 * c) as *const __m256i);
            let q4l = _mm256_and_si256(q4, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let (scl, sch) = (_mm256_set1_epi16(sc_l as i16), _mm256_set1_epi16(sc_h as i16));
            for k in 0..4 {
                let ab = a[k].as_ptr().add(i * Q8_K_BYTES);
                let bs = |j: usize| (ab.add(260) as *const i16).add(j).read_unaligned() as i32;
                sm[k] += m_l as i32 * (bs(4 * c) + bs(4 * c + 1)) + m_h as i32 * (bs(4 * c + 2) + bs(4 * c + 3));
                let q8l = _mm256_loadu_si256(ab.add(4 + 64 * c) as *const __m256i);
                let q8h = _mm256_loadu_si256(ab.add(36 + 64 * c) as *const __m256i);
                let pl = _mm256_madd_epi16(scl, _mm256_maddubs_epi16(q4l, q8l));
                let ph = _mm256_madd_epi16(sch, _mm256_maddubs_epi16(q4h, q8h));
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_add_epi32(pl, ph));
            }
        }
        for k in 0..4 {
            let ad = (a[k].as_ptr().add(i * Q8_K_BYTES) as *const f32).read_unaligned();
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ad), _mm256_cvtepi32_ps(sumi[k]), acc[k]);
            acc_m[k] += dminw * ad * sm[k] as f32;
        }
    }
    [hsum(acc[0]) - acc_m[0], hsum(acc[1]) - acc_m[1], hsum(acc[2]) - acc_m[2], hsum(acc[3]) - acc_m[3]]
}

/// [`q6_k`] against four Q8_K rows: each super-block's 6-bit codes and scales are assembled
/// once for the four tokens; each token's integer sums, offset and accumulator are [`q6_k`]'s.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_kx4(w: &[u8], a: [&[u8]; 4], _s: [&[f32]; 4], nb: usize) -> [f32; 4] {
    assert!(w.len() >= nb * Q6_K_BYTES);
    for r in &a {
        assert!(r.len() >= nb * Q8_K_BYTES);
    }
    let m15 = _mm256_set1_epi8(15);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        let wp = w.as_ptr().add(i * Q6_K_BYTES);
        prefetch::<4>(wp);
        let dw = f16_scale(wp.add(208));
        let scales = _mm_loadu_si128(wp.add(192) as *const __m128i);
        let mut sc = [0i8; 16];
        _mm_storeu_si128(sc.as_mut_ptr() as *mut __m128i, scales);
        let mut sumi = [_mm256_setzero_si256(); 4];
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(wp.add(64 * n) as *const __m256i);
            let ql1 = _mm256_loadu_si256(wp.add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(wp.add(128 + 32 * n) as *const __m256i);
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m15), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4)),
                _mm256_or_si256(_mm256_and_si256(ql1, m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m15), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4)),
            ];
            for (kk, qk) in q.iter().enumerate() {
                let j = 8 * n + 2 * kk;
                let s16 = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1] as i16), _mm_set1_epi16(sc[j] as i16));
                for (t, s) in sumi.iter_mut().enumerate() {
                    let q8 = _mm256_loadu_si256(a[t].as_ptr().add(i * Q8_K_BYTES + 4 + 128 * n + 32 * kk) as *const __m256i);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(s16, _mm256_maddubs_epi16(*qk, q8)));
                }
            }
        }
        let sc16 = _mm256_cvtepi8_epi16(scales);
        for (t, s) in sumi.iter().enumerate() {
            let ap = a[t].as_ptr().add(i * Q8_K_BYTES);
            let d = dw * (ap as *const f32).read_unaligned();
            let bsums = _mm256_loadu_si256(ap.add(260) as *const __m256i);
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, sc16), 5);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_sub_epi32(*s, offset)), acc[t]);
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// [`super::super::blocks::quantize_act_q8_0`] eight lanes at a time, with its bits for finite
/// inputs: the block maximum of |x| is order-free (each lane keeps its running maximum, then the
/// lanes are folded), `x · (127 / max)` is the same multiplication, and `cvtps` rounds half to
/// even as `nearest_int`'s 1.5·2²³ trick does for these magnitudes. The codes are packed to
/// bytes in order as llama.cpp's `quantize_row_q8_0` does. Serving decodes run this on the
/// calling thread before every product.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn act_q8_0(x: &[f32], out: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let p = b.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        // `max(|v|, m)` keeps `m` where `v` is NaN, as `f32::max` ignores a NaN.
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| _mm256_max_ps(_mm256_andnot_ps(sign, vi), m));
        // No lane is NaN or −0 (each starts at +0 and keeps it against a NaN), so the
        // maximum is the same folded in any order: in registers, not through memory and a
        // scalar chain, which made this quantizer ~1 float per cycle.
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        // F16C rounds to nearest even as `f16::from_f32` does; `amax / 127` is never NaN.
        let d = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(amax / 127.0));
        o[..2].copy_from_slice(&(_mm_extract_epi16::<0>(d) as u16).to_le_bytes());
        let idv = _mm256_set1_ps(id);
        let q = v.map(|vi| _mm256_cvtps_epi32(_mm256_mul_ps(vi, idv)));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(o.as_mut_ptr().add(2).cast(), _mm256_permutevar8x32_epi32(bytes, order));
    }
}

/// [`super::q8_0_sums_scalar`] with one `vpsadbw` per block: the codes shifted by 128 are
/// unsigned bytes, whose sums of absolute differences from zero add eight at a time; the
/// integer total is exact in any order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_sums(acts: &[u8], out: &mut [i32]) {
    assert_eq!(acts.len(), out.len() * Q8_0_BYTES);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    for (b, o) in acts.chunks_exact(Q8_0_BYTES).zip(out.iter_mut()) {
        let q = _mm256_xor_si256(_mm256_loadu_si256(b.as_ptr().add(2).cast()), flip);
        let s = _mm256_sad_epu8(q, _mm256_setzero_si256());
        let s = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        *o = (_mm_cvtsi128_si64(s) + _mm_extract_epi64::<1>(s)) as i32 - 128 * QK as i32;
    }
}

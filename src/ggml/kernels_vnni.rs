//! Many-token products on CPUs with AVX-512 VNNI (plus VL and BW, e.g. AMD Zen 4, Intel Ice
//! Lake and later): tiles of several weight rows × four tokens on 256-bit `vpdpbusd`, which
//! multiplies unsigned by signed bytes and adds each group of four products straight into a
//! 32-bit lane. That is the lane [`super::avx2`]'s `maddubs` + `madd` pair makes (lane j =
//! elements 4j..4j+4), without the 16-bit step, and AVX-512's 32 vector registers hold the
//! tile's accumulators. Every result here is bit for bit what the AVX2 one-token kernels give
//! for the same row and token (same integer lane sums, same f32 scale products, same
//! accumulators and reduction), which is what keeps batched answers exact; the interleaved
//! pairs of Q4_0/Q8_0/Q4_1 groups go through 512-bit versions for one to eight tokens
//! ([`q4_0x16`], [`q8_0x16`], [`q4_1x16`]), whose lanes do the same.

use super::super::blocks::{Q4_0X8_BYTES, Q4_0_BYTES, Q4_1X8_BYTES, Q5_0_BYTES, Q8_0X8_BYTES, Q8_0_BYTES};
use super::avx2::{bytes_from_bits, f16_scale, hsum, nibbles32, prefetch};
use super::Kernels;
use std::arch::x86_64::*;

pub fn available() -> bool {
    super::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// The AVX2 set with the tiled many-token products swapped in. Only called after
/// [`available`] said yes: the wrappers below are sound exactly then.
pub fn kernels() -> Kernels {
    assert!(available());
    Kernels {
        q8_0t: Some(|w, a, s, n| unsafe { q8_0t(w, a, s, n) }),
        q4_0t: Some(|w, a, s, n| unsafe { q4_0t(w, a, s, n) }),
        q5_0t: Some(|w, a, s, n| unsafe { q5_0t(w, a, s, n) }),
        q4_0x8x4: Some(|w, st, a, s, n| unsafe { q4_0x8x4(w, st, a, s, n) }),
        q8_0x8: |w, st, a, s, n| unsafe { q8_0x8::<1>(w, st, [a], [s], n)[0] },
        q8_0x8x4: Some(|w, st, a, s, n| unsafe { q8_0x8::<4>(w, st, a, s, n) }),
        q4_0x16: Some(|w, a, s, d, n| unsafe { q4_0x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q4_0x16x8: Some(|w, a, s, d, n| unsafe { q4_0x16::<8>(w, a, s, d, n) }),
        q4_0x16xn: Some(any_count!(q4_0x16)),
        q8_0x16: Some(|w, a, s, d, n| unsafe { q8_0x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q8_0x16x8: Some(|w, a, s, d, n| unsafe { q8_0x16::<8>(w, a, s, d, n) }),
        q8_0x16xn: Some(any_count!(q8_0x16)),
        q4_1x16: Some(|w, a, s, d, n| unsafe { q4_1x16::<1>(w, &[a], &[s], &[d], n)[0] }),
        q4_1x16x8: Some(|w, a, s, d, n| unsafe { q4_1x16::<8>(w, a, s, d, n) }),
        q4_1x16xn: Some(any_count!(q4_1x16)),
        name: "avx512vnni",
        ..super::avx2::kernels()
    }
}

/// Two weight rows × four Q8_0 activation rows; `block(p)` gives the weight block at `p` as
/// signed bytes and its f32 scale.
///
/// `vpdpbusd` wants one unsigned operand, so the activations go in shifted by 128 (`a ^ 0x80`
/// = `a + 128` as a byte, once per token and block) and each lane starts from `−128·Σ w` over
/// its four weights (once per row and block): the lane then ends at exactly `Σ a·w`, the
/// integer the one-token kernel's `maddubs`/`madd` makes, with no 16-bit saturation to fear
/// (a byte product is at most 255·128). Per token, blocks alternate between two accumulators
/// and the scale is `d_w·d_a` rounded once, as in the one-token kernels' `two_accumulators`.
/// (Compiled with the module's target features, so that its closures inherit them and inline.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile(w: [&[u8]; 2], wbytes: usize, a: [&[u8]; 4], s: [&[f32]; 4], nb: usize, block: impl Fn(*const u8) -> (__m256i, f32)) -> [[f32; 4]; 2] {
    for r in &w {
        assert!(r.len() >= nb * wbytes);
    }
    for (r, sc) in a.iter().zip(&s) {
        assert!(r.len() >= nb * Q8_0_BYTES && sc.len() >= nb);
    }
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    // [parity][row][token]
    let mut acc = [[[_mm256_setzero_ps(); 4]; 2]; 2];
    let step = |i: usize, acc: &mut [[__m256; 4]; 2]| {
        let mut qa = [_mm256_setzero_si256(); 4];
        for (k, q) in qa.iter_mut().enumerate() {
            *q = _mm256_xor_si256(_mm256_loadu_si256(a[k].as_ptr().add(i * Q8_0_BYTES + 2) as *const __m256i), flip);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wp = w[r].as_ptr().add(i * wbytes);
            prefetch::<1>(wp);
            let (qw, dw) = block(wp);
            let bias = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, qw));
            let dw = _mm256_set1_ps(dw);
            for (k, acc_rk) in acc_r.iter_mut().enumerate() {
                let dot = _mm256_dpbusd_epi32(bias, qa[k], qw);
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*s[k].get_unchecked(i)));
                *acc_rk = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), *acc_rk);
            }
        }
    };
    let [acc0, acc1] = &mut acc;
    let mut i = 0;
    while i + 1 < nb {
        step(i, acc0);
        step(i + 1, acc1);
        i += 2;
    }
    if i < nb {
        step(i, acc0);
    }
    let mut out = [[0f32; 4]; 2];
    for (r, o) in out.iter_mut().enumerate() {
        for (k, v) in o.iter_mut().enumerate() {
            *v = hsum(_mm256_add_ps(acc[0][r][k], acc[1][r][k]));
        }
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0t(w: [&[u8]; 2], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [[f32; 4]; 2] {
    tile(w, Q8_0_BYTES, a, s, nb, |p| (_mm256_loadu_si256(p.add(2) as *const __m256i), f16_scale(p)))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0t(w: [&[u8]; 2], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [[f32; 4]; 2] {
    let off = _mm256_set1_epi8(8);
    tile(w, Q4_0_BYTES, a, s, nb, |p| (_mm256_sub_epi8(nibbles32(p.add(2)), off), f16_scale(p)))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q5_0t(w: [&[u8]; 2], a: [&[u8]; 4], s: [&[f32]; 4], nb: usize) -> [[f32; 4]; 2] {
    let hi_mask = _mm256_set1_epi8(0xF0u8 as i8);
    tile(w, Q5_0_BYTES, a, s, nb, |p| {
        let qh = _mm256_andnot_si256(bytes_from_bits(p.add(2)), hi_mask);
        (_mm256_or_si256(nibbles32(p.add(6)), qh), f16_scale(p))
    })
}

/// Eight interleaved Q4_0 rows × four tokens (the AVX2 `q4_0x8x4` with `vpdpbusd`): the
/// unsigned nibbles, low ones of chunk t in register t and high ones in register 4 + t, go
/// through [`x8`] with the offset 8.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0x8x4(w: &[u8], stride: usize, a: [&[u8]; 4], act_sums: [&[i32]; 4], nb: usize) -> [[f32; 8]; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    x8::<4, 3>(w, (Q4_0X8_BYTES, stride), a, act_sums, nb, 8, |g| {
        let mut q = [_mm256_setzero_si256(); 8];
        for t in 0..4 {
            let raw = _mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i);
            q[t] = _mm256_and_si256(raw, m4);
            q[4 + t] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        q
    })
}

/// Eight interleaved Q8_0 rows × `N` tokens: the offset codes (`q + 128`, unsigned, chunk t
/// in register t) go through [`x8`] with the offset 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0x8<const N: usize>(w: &[u8], stride: usize, a: [&[u8]; N], act_sums: [&[i32]; N], nb: usize) -> [[f32; 8]; N] {
    x8::<N, 5>(w, (Q8_0X8_BYTES, stride), a, act_sums, nb, 128, |g| {
        let mut q = [_mm256_setzero_si256(); 8];
        for (t, qt) in q.iter_mut().enumerate() {
            *qt = _mm256_loadu_si256(g.add(16 + 32 * t) as *const __m256i);
        }
        q
    })
}

/// Eight interleaved rows × `N` tokens over block columns of `bytes` bytes, one every
/// `stride` bytes (prefetching `L` cache lines ahead): `load(column)` gives eight registers of unsigned weight codes, register
/// j lane r holding row r's elements paired with the activation's bytes 4j..4j+4, which are
/// broadcast to every lane. Per token two chains start from `−offset·Σq_a`, so lane r ends at
/// row r's exact `Σ q_w·q_a`; then one scale product and one FMA per block and token. The
/// column is loaded once for all `N` tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn x8<const N: usize, const L: usize>(w: &[u8], (bytes, stride): (usize, usize), a: [&[u8]; N], act_sums: [&[i32]; N], nb: usize, offset: i32, load: impl Fn(*const u8) -> [__m256i; 8]) -> [[f32; 8]; N] {
    assert!(nb == 0 || w.len() >= (nb - 1) * stride + bytes);
    for (r, s) in a.iter().zip(&act_sums) {
        assert!(r.len() >= nb * Q8_0_BYTES && s.len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let g = w.as_ptr().add(b * stride);
        prefetch::<L>(g);
        let q = load(g);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i));
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
            let at = |j: usize| _mm256_set1_epi32((ap.add(2 + 4 * j) as *const i32).read_unaligned());
            let mut lo = _mm256_set1_epi32(-offset * *act_sums[k].get_unchecked(b));
            let mut hi = _mm256_setzero_si256();
            for t in 0..4 {
                lo = _mm256_dpbusd_epi32(lo, q[t], at(t));
                hi = _mm256_dpbusd_epi32(hi, q[4 + t], at(4 + t));
            }
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(f16_scale(ap)));
            *acc_k = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), *acc_k);
        }
    }
    let mut out = [[0f32; 8]; N];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

/// Both groups of an interleaved Q4_0 pair ([`crate::ggml::blocks::interleave16`]) × `N`
/// tokens: [`q4_0x8x4`] on 512-bit registers, the first group in the low half and the second
/// in the high half of each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0x16<const N: usize>(w: &[u8], a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    x16::<N, 5, false>(w, Q4_0X8_BYTES, a, act_terms, act_scales, nb, |g0, g1| nibble_pairs(g0, g1, 16))
}

/// Both groups of an interleaved Q8_0 pair × `N` tokens, as [`q4_0x16`] for [`q8_0x8`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0x16<const N: usize>(w: &[u8], a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    x16::<N, 9, false>(w, Q8_0X8_BYTES, a, act_terms, act_scales, nb, |g0, g1| {
        let mut q = [_mm512_setzero_si512(); 8];
        for (t, qt) in q.iter_mut().enumerate() {
            *qt = halves(g0.add(16 + 32 * t), g1.add(16 + 32 * t));
        }
        q
    })
}

/// Both groups of an interleaved Q4_1 pair ([`crate::ggml::blocks::X8_Q4_1`]: per block column
/// the eight `d`, the eight `m`, then the nibbles) × `N` tokens. The nibbles are unsigned, which
/// is `vpdpbusd`'s unsigned operand as they are, so there is no offset; each lane's integer sum
/// is the AVX2 [`super::avx2`] `q4_1_column`'s, and its two FMAs (`d_w·d_a` times the sum, then
/// `m_w` times `d_a·Σq_a`) come in the same order, so each output is bit for bit the AVX2
/// kernels'. The chain teacher reads SmolLM2's exact Q4_1 weights through this product.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_1x16<const N: usize>(w: &[u8], a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize) -> [[f32; 16]; N] {
    x16::<N, 5, true>(w, Q4_1X8_BYTES, a, act_terms, act_scales, nb, |g0, g1| nibble_pairs(g0, g1, 32))
}

/// Both groups' four chunks of nibbles of one block column, `skip` bytes (the group's f16
/// fields) into each: the chunks' low nibbles, then their high nibbles, the first group in the
/// low half of each register. Q4_0 (one field) and Q4_1 (two) share it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn nibble_pairs(g0: *const u8, g1: *const u8, skip: usize) -> [__m512i; 8] {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut q = [_mm512_setzero_si512(); 8];
    for t in 0..4 {
        let raw = halves(g0.add(skip + 32 * t), g1.add(skip + 32 * t));
        q[t] = _mm512_and_si512(raw, m4);
        q[4 + t] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
    }
    q
}

/// 32 bytes at `lo` in the low half, 32 at `hi` in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn halves(lo: *const u8, hi: *const u8) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(lo as *const __m256i)), _mm256_loadu_si256(hi as *const __m256i))
}

/// [`x8`] for both groups of a pair at once: block column `b` of the first group at
/// `2·bytes·b`, of the second right after it, so the pair is one ascending stream. Lane r of
/// each 512-bit register is row r of the first group for r < 8 and row r − 8 of the second for
/// r ≥ 8, and every lane makes [`x8`]'s integer sums (exact in any order) and then does its
/// float operations in [`x8`]'s order (one scale product, one FMA per block): each row's result is bit for bit what [`x8`]
/// (and so the AVX2 one-token kernels) gives for its group. The wider registers halve the
/// instructions, which is what bounded the 256-bit loop on Zen 4 once its weights were cached.
/// Where [`x8`] multiplies `−offset·Σq_a` (Q4_1: `d_a·Σq_a`) per token and block, this takes
/// it ready-made (`act_terms`, see [`super::PairTerm`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn x16<const N: usize, const L: usize, const MIN: bool>(w: &[u8], bytes: usize, a: &[&[u8]; N], act_terms: &[&[i32]; N], act_scales: &[&[f32]; N], nb: usize, load: impl Fn(*const u8, *const u8) -> [__m512i; 8]) -> [[f32; 16]; N] {
    assert!(w.len() >= 2 * nb * bytes);
    for ((r, s), d) in a.iter().zip(act_terms).zip(act_scales) {
        assert!(r.len() >= nb * Q8_0_BYTES && s.len() >= nb && d.len() >= nb);
    }
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let g0 = w.as_ptr().add(2 * b * bytes);
        let g1 = g0.add(bytes);
        prefetch::<L>(g0);
        let q = load(g0, g1);
        let dw = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_loadu_si128(g0 as *const __m128i)), _mm_loadu_si128(g1 as *const __m128i)));
        // Q4_1's minimums: the eight f16 after the eight scales of each group.
        let mw = if MIN { _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_loadu_si128(g0.add(16) as *const __m128i)), _mm_loadu_si128(g1.add(16) as *const __m128i))) } else { _mm512_setzero_ps() };
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let ap = a[k].as_ptr().add(b * Q8_0_BYTES);
            let at = |j: usize| _mm512_set1_epi32((ap.add(2 + 4 * j) as *const i32).read_unaligned());
            // Q4_0/Q8_0: the term is `−offset·Σq`, where every lane's sum starts (a broadcast
            // load); Q4_1's codes have no offset and its term is the f32 `d_a·Σq`, for the
            // minimum below.
            let term = *act_terms[k].get_unchecked(b);
            let mut lo = if MIN { _mm512_setzero_si512() } else { _mm512_set1_epi32(term) };
            // The integer sum is exact in any order. With eight tokens there are enough
            // independent chains in flight for one per token, which saves an addition per block
            // and token (~2.5 % of an eight-token product, in process); with one or four tokens
            // the second chain's parallelism pays (one chain was 2–4 % slower there).
            let isum = if N >= 8 {
                for t in 0..4 {
                    lo = _mm512_dpbusd_epi32(lo, q[t], at(t));
                    lo = _mm512_dpbusd_epi32(lo, q[4 + t], at(4 + t));
                }
                lo
            } else {
                let mut hi = _mm512_setzero_si512();
                for t in 0..4 {
                    lo = _mm512_dpbusd_epi32(lo, q[t], at(t));
                    hi = _mm512_dpbusd_epi32(hi, q[4 + t], at(4 + t));
                }
                _mm512_add_epi32(lo, hi)
            };
            // The token's scale as f32, converted once per call (`f16_scale` here made a
            // convert-and-broadcast chain per token and block that the multiply waited on).
            let da = *act_scales[k].get_unchecked(b);
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(da));
            *acc_k = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), *acc_k);
            if MIN {
                *acc_k = _mm512_fmadd_ps(mw, _mm512_set1_ps(f32::from_bits(term as u32)), *acc_k);
            }
        }
    }
    let mut out = [[0f32; 16]; N];
    for (o, v) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), v);
    }
    out
}

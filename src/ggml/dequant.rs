//! Dequantization to f32, ported from ggml's reference `dequantize_row_*` (ggml-quants.c) and
//! block layouts (ggml-common.h).
//!
//! Results are meant to be bit-identical to the C reference and to gguf-py's
//! `gguf.quants.dequantize`: each value is computed with the same f32 operations in the same
//! order (e.g. Q4_1 is `x * d + m` rounded twice, never a fused multiply-add; Q6_K is
//! `(d * sc) * q`). f16/bf16 → f32 conversions are exact.
//!
//! The block kernels take exact-size chunks and cannot index out of bounds; the public entry
//! points check that the byte length matches the element count first.

use super::blocks::{f16_at, scale_min_k4, QK, QK_K};
use super::GgmlType;
use anyhow::{bail, Result};
use half::{bf16, f16};

/// Dequantizes `n_elements` values of type `ty` from `data`.
///
/// Errors when the type is not supported (see [`GgmlType::can_dequantize`]), when
/// `n_elements` is not a whole number of blocks, or when `data` is not exactly the size that
/// many elements take.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    check(ty, data, n_elements)?;
    let mut out = vec![0f32; n_elements];
    dequantize_unchecked(ty, data, &mut out);
    Ok(out)
}

/// Like [`dequantize`], writing into `out` (whose length is the element count).
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    check(ty, data, out.len())?;
    dequantize_unchecked(ty, data, out);
    Ok(())
}

fn check(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<()> {
    if !ty.can_dequantize() {
        bail!("cannot dequantize {ty}: supported types are F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K");
    }
    match ty.bytes_for(n_elements as u64) {
        None => bail!("{n_elements} elements is not a whole number of {ty} blocks of {}", ty.block_size()),
        Some(n) if n != data.len() as u64 => {
            bail!("{n_elements} {ty} elements take {n} bytes but {} were given", data.len())
        }
        Some(_) => Ok(()),
    }
}

/// The kernels proper. Lengths are assumed checked; if they were not, `chunks_exact`/`zip`
/// would stop at the shorter side rather than read out of bounds.
fn dequantize_unchecked(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let bs = ty.type_size() as usize;
    let blocks = data.chunks_exact(bs);
    match ty {
        GgmlType::F32 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => blocks.zip(out.chunks_exact_mut(QK)).for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4_0 => blocks.zip(out.chunks_exact_mut(QK)).for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.zip(out.chunks_exact_mut(QK)).for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.zip(out.chunks_exact_mut(QK)).for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.zip(out.chunks_exact_mut(QK)).for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q2_K => blocks.zip(out.chunks_exact_mut(QK_K)).for_each(|(b, y)| q2_k(b, y)),
        GgmlType::Q3_K => blocks.zip(out.chunks_exact_mut(QK_K)).for_each(|(b, y)| q3_k(b, y)),
        GgmlType::Q4_K => blocks.zip(out.chunks_exact_mut(QK_K)).for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.zip(out.chunks_exact_mut(QK_K)).for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.zip(out.chunks_exact_mut(QK_K)).for_each(|(b, y)| q6_k(b, y)),
        // `check` rejected everything else.
        _ => {}
    }
}

/// block_q8_0 { half d; int8 qs[32]; } — y = qs * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// block_q4_0 { half d; u8 qs[16]; } — low nibbles are elements 0..16, high nibbles 16..32,
/// both offset by 8.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        let q = b[2 + j];
        lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// block_q4_1 { half d; half m; u8 qs[16]; } — y = q * d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = y.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        let q = b[4 + j];
        lo[j] = (q & 0x0F) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

/// block_q5_0 { half d; u8 qh[4]; u8 qs[16]; } — the fifth bit of element j is bit j of qh
/// (elements 0..16) or bit j+16 (elements 16..32); values are offset by 16.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = y.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        let q = b[6 + j];
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        lo[j] = (((q & 0x0F) | xh0) as i32 - 16) as f32 * d;
        hi[j] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; } — as Q5_0 without the offset, plus m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = y.split_at_mut(QK / 2);
    for j in 0..QK / 2 {
        let q = b[8 + j];
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        lo[j] = ((q & 0x0F) | xh0) as f32 * d + m;
        hi[j] = ((q >> 4) | xh1) as f32 * d + m;
    }
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; } — 16 sub-blocks of 16, each
/// with a 4-bit scale (low nibble) and 4-bit min (high nibble).
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut out = y.iter_mut();
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                for &qb in &q[half * 16..half * 16 + 16] {
                    if let Some(y) = out.next() {
                        *y = dl * ((qb >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; } — 2 low bits in qs, the high
/// bit in hmask (set means "no -4"), 16 signed 6-bit scales packed into 12 bytes.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let d_all = f16_at(b, 108);
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([b[96 + 4 * i], b[97 + 4 * i], b[98 + 4 * i], b[99 + 4 * i]]);
    }
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * i + k] = *byte as i8;
        }
    }
    let mut out = y.iter_mut();
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in half * 16..half * 16 + 16 {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let high = if hm[l] & m != 0 { 0 } else { 4 };
                    if let Some(y) = out.next() {
                        *y = dl * (low - high) as f32;
                    }
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; } — 8 sub-blocks of 32 with 6-bit
/// scales and mins; each 32 bytes of qs hold two sub-blocks (low nibbles, then high).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (k, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; } — Q4_K plus a fifth
/// bit per element from qh (bit 2k for the low-nibble sub-block k, 2k+1 for the high one).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (k, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let u1 = 1u8 << (2 * k);
        let u2 = 2u8 << (2 * k);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            hi[l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; } — note d is at the end.
/// Each half (128 elements) uses 64 bytes of ql, 32 of qh and 8 scales.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[n * 64..n * 64 + 64];
        let qh = &b[128 + n * 32..128 + n * 32 + 32];
        let sc = &b[192 + n * 8..192 + n * 8 + 8];
        let y = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // element-index formulas read best as index loops
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    fn deq(ty: GgmlType, b: &[u8]) -> Vec<f32> {
        let n = b.len() / ty.type_size() as usize * ty.block_size() as usize;
        dequantize(ty, b, n).unwrap()
    }

    #[test]
    fn plain_types() {
        let f: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &f), vec![1.5, -2.25]);
        // f16 0x3C00 = 1.0, 0xC100 = -2.5, 0x0001 = smallest subnormal 2^-24, 0x7C00 = inf.
        let b = [0x00, 0x3C, 0x00, 0xC1, 0x01, 0x00, 0x00, 0x7C];
        assert_eq!(deq(GgmlType::F16, &b), vec![1.0, -2.5, 2f32.powi(-24), f32::INFINITY]);
        // bf16 is the top half of an f32: 0x3FC0 = 1.5, 0xC020 = -2.5.
        let b = [0xC0, 0x3F, 0x20, 0xC0];
        assert_eq!(deq(GgmlType::BF16, &b), vec![1.5, -2.5]);
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = deq(GgmlType::Q8_0, &b);
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(y, want);
        // -128 is a valid int8 quant.
        b[2] = 0x80;
        assert_eq!(deq(GgmlType::Q8_0, &b)[0], -64.0);
    }

    #[test]
    fn q4_0_block() {
        let mut b = h(2.0).to_vec();
        // byte j: low nibble j, high nibble 15 - j.
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_0, &b);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0, "low {j}");
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 2.0, "high {j}");
        }
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = deq(GgmlType::Q4_1, &b);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_block() {
        // qh bit i is the 5th bit of element i. Set it for elements 1, 3 (low half) and
        // 16, 31 (high half: bits 16 and 31).
        let qh: u32 = (1 << 1) | (1 << 3) | (1 << 16) | (1 << 31);
        let mut b = h(1.0).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend((0..16u8).map(|j| (j & 0xF) | (((j + 1) & 0xF) << 4)));
        let y = deq(GgmlType::Q5_0, &b);
        let mut want = vec![0f32; 32];
        for j in 0..16 {
            let lo = j as u32 | (((qh >> j) & 1) << 4);
            let hi = ((j as u32 + 1) & 0xF) | (((qh >> (j + 16)) & 1) << 4);
            want[j] = lo as f32 - 16.0;
            want[j + 16] = hi as f32 - 16.0;
        }
        assert_eq!(y, want);
        // Spot checks by hand: element 1 = (1 | 16) - 16 = 1; element 0 = 0 - 16;
        // element 16 = (1 | 16) - 16 = 1; element 31 = (16 & 15 = 0 | 16) - 16 = 0.
        assert_eq!((y[0], y[1], y[16], y[31]), (-16.0, 1.0, 1.0, 0.0));
    }

    #[test]
    fn q5_1_block() {
        let qh: u32 = 0xFFFF_0000; // the high half all get +16, the low half none
        let mut b = h(0.5).to_vec();
        b.extend(h(10.0));
        b.extend(qh.to_le_bytes());
        b.extend((0..16u8).map(|j| j | (j << 4)));
        let y = deq(GgmlType::Q5_1, &b);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 + 10.0);
            assert_eq!(y[j + 16], (j + 16) as f32 * 0.5 + 10.0);
        }
    }

    /// Packs 8 (scale, min) 6-bit pairs the way ggml's Q4_K/Q5_K quantizer does.
    fn pack_k4(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                q[j] = sc[j];
                q[j + 4] = mn[j];
            } else {
                q[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
                q[j - 4] |= (sc[j] >> 4) << 6;
                q[j] |= (mn[j] >> 4) << 6;
            }
        }
        q
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [1, 63, 17, 32, 5, 48, 63, 33];
        let mn = [0, 2, 63, 40, 60, 1, 31, 62];
        let q = pack_k4(sc, mn);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], mn[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_block() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 63];
        let mn = [0, 1, 2, 3, 4, 5, 6, 60];
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(pack_k4(sc, mn));
        // qs byte i (0..128): low nibble i % 16, high nibble (i / 8) % 16.
        b.extend((0..128u32).map(|i| ((i % 16) | (((i / 8) % 16) << 4)) as u8));
        let y = deq(GgmlType::Q4_K, &b);
        // Element e is in 64-chunk k = e / 64; within it, the first 32 use sub-block 2k and the
        // low nibbles of qs[32k..32k+32]; the next 32 use sub-block 2k+1 and the high nibbles.
        for e in 0..256 {
            let k = e / 64;
            let l = e % 32;
            let byte = 32 * k + l;
            let (s, q) = if e % 64 < 32 { (2 * k, byte % 16) } else { (2 * k + 1, (byte / 8) % 16) };
            let want = (0.5 * sc[s] as f32) * q as f32 - 0.25 * mn[s] as f32;
            assert_eq!(y[e], want, "element {e}");
        }
        // By hand: element 255 is sub-block 7 (scale 63, min 60), byte 127's high nibble 15:
        // 0.5*63*15 - 0.25*60 = 472.5 - 15.
        assert_eq!(y[255], 457.5);
    }

    #[test]
    fn q5_k_block() {
        let sc = [2; 8];
        let mn = [4; 8];
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(pack_k4(sc, mn));
        // qh: element l of sub-block s gets bit s of qh[l]; set it for even l only.
        b.extend((0..32).map(|l| if l % 2 == 0 { 0xFF } else { 0x00 }));
        b.extend(std::iter::repeat_n(0x31u8, 128)); // low nibble 1, high nibble 3
        let y = deq(GgmlType::Q5_K, &b);
        for e in 0..256 {
            let l = e % 32;
            let nib = if e % 64 < 32 { 1 } else { 3 };
            let q = nib + if l % 2 == 0 { 16 } else { 0 };
            assert_eq!(y[e], 2.0 * q as f32 - 2.0, "element {e}");
        }
    }

    #[test]
    fn q6_k_block() {
        // ql byte i: low nibble i % 16, high nibble 15 - i % 16; qh byte: 0b11_10_01_00, so the
        // four 2-bit fields (q1..q4) are 0, 1, 2, 3; scales s = 1..=16 with alternating sign.
        let mut b: Vec<u8> = (0..128u32).map(|i| ((i % 16) | ((15 - i % 16) << 4)) as u8).collect();
        b.extend(std::iter::repeat_n(0b1110_0100u8, 64));
        let scales: Vec<i8> = (1..=16).map(|s| if s % 2 == 0 { -(s as i8) } else { s as i8 }).collect();
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(0.125));
        assert_eq!(b.len(), 210);
        let y = deq(GgmlType::Q6_K, &b);
        for e in 0..256 {
            let n = e / 128; // which half
            let r = e % 128;
            let quarter = r / 32; // q1..q4
            let l = r % 32;
            let ql_idx = n * 64 + l + if quarter % 2 == 1 { 32 } else { 0 };
            let nib = if quarter < 2 { ql_idx % 16 } else { 15 - ql_idx % 16 };
            let q = (nib as i32 | ((quarter as i32) << 4)) - 32;
            let s = scales[n * 8 + l / 16 + 2 * quarter];
            assert_eq!(y[e], 0.125 * s as f32 * q as f32, "element {e}");
        }
        // By hand: element 0 = 0.125 * 1 * (0 | 0<<4 - 32) = -4.
        assert_eq!(y[0], -4.0);
    }

    #[test]
    fn q2_k_block() {
        // scales: low nibble 1 + i % 15 (scale), high nibble i % 16 (min).
        let scales: Vec<u8> = (0..16u8).map(|i| (1 + i % 15) | ((i % 16) << 4)).collect();
        let mut b = scales.clone();
        b.extend((0..64u32).map(|i| (i * 37 % 256) as u8));
        b.extend(h(0.5));
        b.extend(h(0.25));
        let y = deq(GgmlType::Q2_K, &b);
        // Element e: half n = e / 128; within it, shift group g = (e % 128) / 32, and the 16-run
        // r = (e % 32) / 16 selects qs bytes [32n + 16r, +16); scale index = 8n + 2g + r.
        for e in 0..256 {
            let n = e / 128;
            let g = (e % 128) / 32;
            let r = (e % 32) / 16;
            let l = e % 16;
            let q = (b[16 + 32 * n + 16 * r + l] >> (2 * g)) & 3;
            let s = scales[8 * n + 2 * g + r];
            let want = 0.5 * (s & 0xF) as f32 * q as f32 - 0.25 * (s >> 4) as f32;
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn q3_k_block() {
        // All 16 scales 33 (6-bit value 33 → 33 - 32 = 1): low nibbles 1, high bits 0b10.
        // Packing: bytes 0..8 hold low nibbles of scales (j, j+8) as (lo, hi) nibbles,
        // bytes 8..12 hold the 2 high bits of 4 scales each.
        let mut packed = [0u8; 12];
        for byte in packed.iter_mut().take(8) {
            *byte = 0x11;
        }
        for byte in packed.iter_mut().skip(8) {
            *byte = 0b1010_1010;
        }
        let hmask: Vec<u8> = (0..32u8).map(|l| if l % 2 == 0 { 0xFF } else { 0 }).collect();
        let mut b = hmask;
        b.extend(std::iter::repeat_n(0b1110_0100u8, 64)); // 2-bit fields 0,1,2,3 by shift
        b.extend(packed);
        b.extend(h(2.0));
        assert_eq!(b.len(), 110);
        let y = deq(GgmlType::Q3_K, &b);
        for e in 0..256 {
            let g = (e % 128) / 32; // shift group: low bits = g
            let l = e % 32;
            let high = if l % 2 == 0 { 0 } else { 4 };
            assert_eq!(y[e], 2.0 * (g as i32 - high) as f32, "element {e}");
        }
    }

    #[test]
    fn size_and_type_errors() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 68], 32).is_err());
        assert!(dequantize(GgmlType::IQ2_XXS, &[0; 66], 256).unwrap_err().to_string().contains("IQ2_XXS"));
        let mut out = [0f32; 2];
        assert!(dequantize_into(GgmlType::F32, &[0; 4], &mut out).is_err());
        dequantize_into(GgmlType::F32, &[0; 8], &mut out).unwrap();
    }
}

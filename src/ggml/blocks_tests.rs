//! Tests of `blocks.rs`.

use super::*;
use crate::ggml::{dequantize, GgmlType};

fn deq(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    dequantize(ty, b, n).unwrap()
}

/// A smooth, sign-changing test row with a few outliers.
fn row(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f32 * 0.37 + seed as f32;
            let v = t.sin() * 0.8 + (t * 2.3).cos() * 0.3;
            if (i as u32 + seed).is_multiple_of(97) { v * 6.0 } else { v }
        })
        .collect()
}

#[test]
fn nearest_int_rounds_half_to_even() {
    for (x, want) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (126.6, 127), (-127.4, -127), (3.49, 3)] {
        assert_eq!(nearest_int(x), want, "{x}");
    }
    for i in -5000..5000 {
        let x = i as f32 * 0.137;
        assert_eq!(nearest_int(x), x.round_ties_even() as i32);
    }
}

#[test]
fn q8_0_block_by_hand() {
    // x = j − 16 for j in 0..32: max|x| = 16, d = 16/127, codes round(x·127/16).
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let mut b = Vec::new();
    quantize_row_q8_0(&x, &mut b);
    assert_eq!(b.len(), 34);
    assert_eq!(&b[..2], &f16_bits(16.0 / 127.0));
    assert_eq!(b[2] as i8, -127); // −16 → −127
    assert_eq!(b[2 + 16] as i8, 0); // 0 → 0
    assert_eq!(b[2 + 17] as i8, 8); // 1·127/16 = 7.94 → 8
    assert_eq!(b[2 + 24] as i8, 64); // 8·127/16 = 63.5 → 64 (half away from zero, like roundf)
    assert_eq!(b[2 + 8] as i8, -64); // −8 → −63.5 → −64
}

#[test]
fn q4_0_block_by_hand() {
    // x = j/2 − 4 for j in 0..32, except x[0] = −16 (the extreme by magnitude, so the signed
    // max) and x[31] = 15.5: d = −16 / −8 = 2, codes trunc(x/2 + 8.5) capped at 15.
    let mut x: Vec<f32> = (0..32).map(|j| j as f32 / 2.0 - 4.0).collect();
    x[0] = -16.0;
    x[31] = 15.5;
    let mut b = Vec::new();
    quantize_row_q4_0(&x, &mut b);
    assert_eq!(b.len(), 18);
    assert_eq!(&b[..2], &f16_bits(2.0));
    // element 0: −8 + 8.5 → 0 (low nibble); element 16: x = 4, 2 + 8.5 → 10 (high) = 0xA0.
    assert_eq!(b[2], 0xA0);
    // element 1: x = −3.5 → 6.75 → 6; element 17: x = 4.5 → 10.75 → 10: 0xA6.
    assert_eq!(b[3], 0xA6);
    // element 15: x = 3.5 → 10.25 → 10; element 31: 7.75 + 8.5 = 16.25 → capped 15: 0xFA.
    assert_eq!(b[17], 0xFA);
    let y = deq(GgmlType::Q4_0, &b, 32);
    assert_eq!(y[0], -16.0);
    assert_eq!(y[31], 14.0);
}

#[test]
fn q5_0_block_by_hand() {
    // x = j for j in 0..32, x[31] = 31 is the extreme: d = 31 / −16 = −1.9375, so codes are
    // trunc(−x/1.9375 + 16.5): element 0 → 16 (0x10: nibble 0, high bit 1), element 31 → 0.
    let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
    let mut b = Vec::new();
    quantize_row_q5_0(&x, &mut b);
    assert_eq!(b.len(), 22);
    assert_eq!(&b[..2], &f16_bits(-1.9375));
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    // element 0 → 16 (bit 0 set); element 16: −8.26 + 16.5 = 8.24 → 8 (bit 16 clear).
    assert_eq!(qh & 1, 1);
    assert_eq!((qh >> 16) & 1, 0);
    assert_eq!(b[6], 0x80); // low nibble 16 & 15 = 0, high nibble 8
    let y = deq(GgmlType::Q5_0, &b, 32);
    for (a, v) in x.iter().zip(&y) {
        assert!((a - v).abs() <= 1.9375 / 2.0 + 1e-3, "{a} vs {v}");
    }
}

#[test]
fn q4_k_block_by_hand() {
    // Each sub-block j is the ramp m_j + s_j·l for l = 0..15 (twice): exactly representable
    // with 16 levels, so make_qkx2_quants finds scale s_j, min −m_j... up to the 6-bit
    // rounding of scales against d = max scale / 63.
    let mut x = vec![0f32; 256];
    for j in 0..8 {
        for i in 0..32 {
            x[32 * j + i] = (j as f32 + 1.0) * 0.5 * (i % 16) as f32 - (j as f32);
        }
    }
    let mut b = Vec::new();
    quantize_row_q4_k(&x, &mut b);
    assert_eq!(b.len(), 144);
    // Largest scale 4.0 (sub-block 7): d = 4/63. Largest min 7: dmin = 7/63.
    assert_eq!(&b[..2], &f16_bits(4.0 / 63.0));
    assert_eq!(&b[2..4], &f16_bits(7.0 / 63.0));
    // Sub-block 7's 6-bit scale and min are both 63; sub-block 0: scale 0.5·63/4 = 7.875 → 8,
    // min 0 → 0.
    assert_eq!(scale_min_k4(7, &b[4..16]), (63, 63));
    assert_eq!(scale_min_k4(0, &b[4..16]), (8, 0));
    // Byte 0 of qs: element 0 (code 0) low, element 32 (sub-block 1, code 0) high.
    assert_eq!(b[16], 0x00);
    // Byte 15 of the last 32-byte group: element 207 (sub-block 6, l = 15) and 239 (7, 15).
    assert_eq!(b[16 + 96 + 15], 0xFF);
    let y = deq(GgmlType::Q4_K, &b, 256);
    // The codes are exact for the unrounded scales; what is left is the 6-bit rounding of
    // each scale (at most d/2 per level, 15 levels) and of each min (dmin/2).
    let bound = 15.0 * (4.0 / 63.0) / 2.0 + (7.0 / 63.0) / 2.0 + 1e-3;
    let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= bound, "max error {err} > {bound}");
}

#[test]
fn q4_1_block_by_hand() {
    // x = −2 + 0.5·(j mod 16): min −2, max 5.5, d = 7.5/15 = 0.5, codes j mod 16, except
    // x[1] = −1.3 (trunc(0.7·2 + 0.5) = 1) and x[2] = −0.7 (trunc(1.3·2 + 0.5) = 3).
    let mut x: Vec<f32> = (0..32).map(|j| -2.0 + 0.5 * (j % 16) as f32).collect();
    x[1] = -1.3;
    x[2] = -0.7;
    let mut b = Vec::new();
    quantize_row_q4_1(&x, &mut b);
    assert_eq!(b.len(), Q4_1_BYTES);
    assert_eq!(&b[..2], &f16_bits(0.5));
    assert_eq!(&b[2..4], &f16_bits(-2.0));
    // byte j: element j low, element j + 16 high.
    assert_eq!(b[4], 0x00);
    assert_eq!(b[5], 0x11);
    assert_eq!(b[6], 0x23);
    assert_eq!(b[4 + 15], 0xFF);
    // A block already on a Q4_1 grid comes back exactly: the re-quantization a Q4_1-sourced
    // model (SmolLM2's GGUF) gets is lossless.
    let y = deq(GgmlType::Q4_1, &b, 32);
    let mut b2 = Vec::new();
    quantize_row_q4_1(&y, &mut b2);
    assert_eq!(b2, b);
}

#[test]
fn q6_k_block_by_hand() {
    // Sub-block ib is s_ib·(4i − 32), s_ib = 0.01·(ib + 1): the extreme −32·s_ib is negative,
    // so make_qx_quants' scale is s_ib with codes 4i − 32 exactly. The largest, 0.16, sets
    // d = 0.16 / −128 and the i8 scales round(−800·s_ib) = −8·(ib + 1); the stored codes
    // are 4i (offset 32), i.e. c = 4·(l mod 16) for every element, in all four quarters.
    let x: Vec<f32> = (0..256).map(|e| 0.01 * (e / 16 + 1) as f32 * (4 * (e % 16)) as f32 - 0.01 * (e / 16 + 1) as f32 * 32.0).collect();
    let mut b = Vec::new();
    quantize_row_q6_k(&x, &mut b);
    assert_eq!(b.len(), Q6_K_BYTES);
    for ib in 0..16 {
        assert_eq!(b[192 + ib] as i8, -8 * (ib as i8 + 1), "scale {ib}");
    }
    assert!((f16_at(&b, 208) + 0.00125).abs() < 1e-6, "d = {}", f16_at(&b, 208));
    for n in 0..2 {
        for l in 0..32 {
            let c = 4 * (l % 16) as u8;
            let lo = (c & 15) | ((c & 15) << 4);
            assert_eq!(b[64 * n + l], lo, "ql[{n}][{l}]");
            assert_eq!(b[64 * n + 32 + l], lo, "ql[{n}][{}]", l + 32);
            assert_eq!(b[128 + 32 * n + l], (c >> 4) * 0x55, "qh[{n}][{l}]");
        }
    }
    // Spot values: l = 5 → c = 20: nibble 4, high bits 1 → 0x44 / 0x55; l = 15 → 60: 0xCC / 0xFF.
    assert_eq!((b[5], b[128 + 5]), (0x44, 0x55));
    assert_eq!((b[15], b[128 + 15]), (0xCC, 0xFF));
    let y = deq(GgmlType::Q6_K, &b, 256);
    for (a, v) in x.iter().zip(&y) {
        assert!((a - v).abs() < 1e-3 * 0.16 * 32.0, "{a} vs {v}");
    }
}

/// The error-minimizing Q4_0 is still Q4_0 (dequantized by the ordinary rule) and never
/// worse than the reference quantizer in its own weighted error, block by block.
#[test]
fn q4_0_rmse_beats_reference() {
    let x = row(4096, 7);
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    quantize_row_q4_0(&x, &mut a);
    quantize_row_q4_0_rmse(&x, None, &mut b);
    let (ya, yb) = (deq(GgmlType::Q4_0, &a, 4096), deq(GgmlType::Q4_0, &b, 4096));
    let werr = |y: &[f32], k: usize| -> f64 {
        (32 * k..32 * k + 32).map(|i| ((sigma2 + x[i] * x[i]).sqrt() * (x[i] - y[i]).powi(2)) as f64).sum()
    };
    let (mut ta, mut tb) = (0f64, 0f64);
    for k in 0..128 {
        // f16 rounding of the chosen scale allows a hair of slack.
        assert!(werr(&yb, k) <= werr(&ya, k) * 1.001 + 1e-9, "block {k}");
        ta += werr(&ya, k);
        tb += werr(&yb, k);
    }
    assert!(tb < 0.97 * ta, "search gained too little: {tb} vs {ta}");
    // An importance of zero on a column lets the search ignore it.
    let mut imp = vec![1f32; 4096];
    imp[0] = 0.0;
    let mut c = Vec::new();
    quantize_row_q4_0_rmse(&x, Some(&imp), &mut c);
    assert_eq!(c.len(), a.len());
}

/// make_qx_quants' scale follows the weights. x = (−8, 3.5), 16 levels: weight on x₀ alone
/// keeps the start scale −8/max → codes (−8, 4), scale Σwxl/Σwl² = 64/64 = 1 (x₀ exact);
/// weight on x₁ alone gives the same codes but scale 3.5·4/16 = 0.875 (x₁ exact). No other
/// candidate beats either strictly (for one weighted element every code gives the same
/// Σwxl²/Σwl² = w·x²), so these are the answers, in exact binary arithmetic.
#[test]
fn importance_moves_the_q4_0_scale_by_hand() {
    let x = [-8.0f32, 3.5];
    let mut l = [0i8; 2];
    assert_eq!(make_qx_quants(8, &x, &mut l, Some(&[1.0, 0.0])), 1.0);
    assert_eq!(l, [0, 12]); // −8 + 8, 4 + 8
    assert_eq!(make_qx_quants(8, &x, &mut l, Some(&[0.0, 1.0])), 0.875);
    assert_eq!(l, [0, 12]);
    // Through quantize_row_q4_0_impl: a 32-block (−8, 3.5, 0, ...); importance on column 0 or
    // on column 1 (weights imp·sqrt(σ² + x²), so the other column weighs nothing). The first
    // stores d = 1 and reconstructs x₀; the second d = 0.875 and reconstructs x₁.
    let mut row = vec![0f32; 32];
    row[0] = -8.0;
    row[1] = 3.5;
    let (mut e0, mut e1) = (vec![0f32; 32], vec![0f32; 32]);
    e0[0] = 1.0;
    e1[1] = 1.0;
    let (mut b0, mut b1) = (Vec::new(), Vec::new());
    quantize_row_q4_0_rmse(&row, Some(&e0), &mut b0);
    quantize_row_q4_0_rmse(&row, Some(&e1), &mut b1);
    // Here the weight sqrt(σ² + x²) is not a power of two, so the exact ties above can fall
    // either way by a rounding: x₀'s side may pick codes −7 and d = 8/7 (f16 1.1426), which
    // reconstructs x₀ as well; what the importance decides is which column comes out exact.
    let (y0, y1) = (deq(GgmlType::Q4_0, &b0, 32), deq(GgmlType::Q4_0, &b1, 32));
    assert!((y0[0] + 8.0).abs() < 2e-3, "{:?}", &y0[..2]);
    assert!((y1[1] - 3.5).abs() < 2e-3 && (y1[0] + 8.0).abs() > 0.5, "{:?}", &y1[..2]);
    // Unit importance weighs both by sqrt(σ² + x²): x₀ dominates and the scale is neither.
    let mut bu = Vec::new();
    quantize_row_q4_0_rmse(&row, None, &mut bu);
    assert_ne!(&bu[..2], &b1[..2]);
}

#[test]
fn round_trip_error_bounds() {
    let n = 4096;
    let x = row(n, 3);
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
    type Quantizer = fn(&[f32], &mut Vec<u8>);
    let cases: [(GgmlType, Quantizer, f32); 6] = [
        (GgmlType::Q8_0, quantize_row_q8_0, 0.01),
        (GgmlType::Q6_K, quantize_row_q6_k, 0.03),
        (GgmlType::Q4_1, quantize_row_q4_1, 0.10),
        (GgmlType::Q5_0, quantize_row_q5_0, 0.07),
        (GgmlType::Q4_0, quantize_row_q4_0, 0.14),
        (GgmlType::Q4_K, quantize_row_q4_k, 0.10),
    ];
    for (ty, q, rel) in cases {
        let mut b = Vec::new();
        q(&x, &mut b);
        assert_eq!(b.len() as u64, ty.bytes_for(n as u64).unwrap());
        let y = deq(ty, &b, n);
        // Per block, the largest error an element can have (`bound` steps):
        // Q8_0 half a step; Q4_0/Q5_0 map the signed extreme to the lowest code, so the other
        // side has one level less and clips there by up to a whole step; Q4_K adds the
        // 6-bit rounding of its scales and mins to the half step.
        let bs = ty.block_size() as usize;
        for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (step, bound) = match ty {
                GgmlType::Q8_0 => (amax / 127.0, 0.5),
                GgmlType::Q5_0 => (amax / 16.0, 1.0),
                GgmlType::Q4_0 => (amax / 8.0, 1.0),
                // Q4_1: half of (max − min)/15 ≤ 2·amax/15 / 2; Q6_K: a sixteenth-block's
                // half step plus its i8 scale rounding, within amax/32.
                GgmlType::Q4_1 => (2.0 * amax / 15.0, 0.5),
                GgmlType::Q6_K => (amax / 32.0, 1.0),
                _ => (2.0 * amax / 15.0, 1.0),
            };
            for (a, v) in xb.iter().zip(yb) {
                assert!((a - v).abs() <= step * bound + amax * 2e-3 + 1e-6, "{ty}: {a} vs {v} (step {step})");
            }
        }
        let e = (x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / n as f32).sqrt();
        assert!(e / rms < rel, "{ty}: rms error {} of rms {rms}", e);
    }
}

#[test]
fn zero_blocks_stay_zero() {
    let x = vec![0f32; 256];
    for q in [quantize_row_q8_0, quantize_row_q4_0, quantize_row_q5_0, quantize_row_q4_k, quantize_row_q4_1, quantize_row_q6_k] {
        let mut b = Vec::new();
        q(&x, &mut b);
        assert!(b.len() >= 34);
    }
    let mut b = Vec::new();
    quantize_row_q4_k(&x, &mut b);
    assert_eq!(deq(GgmlType::Q4_K, &b, 256), x);
}

#[test]
fn activation_quantizers() {
    let x = row(512, 1);
    let mut a = vec![0u8; 16 * Q8_0_BYTES];
    quantize_act_q8_0(&x, &mut a);
    let y = deq(GgmlType::Q8_0, &a, 512);
    for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (u, v) in xb.iter().zip(yb) {
            assert!((u - v).abs() <= amax / 254.0 + amax * 1e-3);
        }
    }
    let mut k = vec![0u8; 2 * Q8_K_BYTES];
    quantize_act_q8_k(&x, &mut k);
    for (xb, kb) in x.chunks(256).zip(k.chunks(Q8_K_BYTES)) {
        let d = f32::from_le_bytes([kb[0], kb[1], kb[2], kb[3]]);
        for i in 0..256 {
            assert!((xb[i] - d * (kb[4 + i] as i8) as f32).abs() <= d.abs() * 0.5 + 1e-6);
        }
        for j in 0..16 {
            let s: i32 = (0..16).map(|i| kb[4 + 16 * j + i] as i8 as i32).sum();
            assert_eq!(i16::from_le_bytes([kb[260 + 2 * j], kb[261 + 2 * j]]) as i32, s);
        }
    }
}

#[test]
fn x8_packing_places_each_byte_and_round_trips() {
    type Pack = fn(&[u8], usize, &mut [u8]);
    let cases: [(usize, u8, Pack, Pack); 2] = [(Q4_0_BYTES, 0, pack_q4_0x8, unpack_q4_0x8), (Q8_0_BYTES, 0x80, pack_q8_0x8, unpack_q8_0x8)];
    for (bb, xor, pack, unpack) in cases {
        // Eight rows of three blocks, every byte distinct by (row, block, position).
        let nb = 3;
        let byte = |r: usize, b: usize, i: usize| (r * 61 + b * 23 + i * 7) as u8;
        let src: Vec<u8> = (0..8).flat_map(|r| (0..nb).flat_map(move |b| (0..bb).map(move |i| byte(r, b, i)))).collect();
        let mut packed = vec![0u8; src.len()];
        pack(&src, nb, &mut packed);
        // By the layouts' definition: column b at 8·bb·b; scale of row r at 2r; code byte
        // 4t + k of row r at 16 + 32t + 4r + k (Q8_0's offset by 128).
        for b in 0..nb {
            let g = &packed[b * 8 * bb..];
            for r in 0..8 {
                assert_eq!([g[2 * r], g[2 * r + 1]], [byte(r, b, 0), byte(r, b, 1)]);
                for t in 0..(bb - 2) / 4 {
                    for k in 0..4 {
                        assert_eq!(g[16 + 32 * t + 4 * r + k], byte(r, b, 2 + 4 * t + k) ^ xor, "{bb}: b{b} r{r} t{t} k{k}");
                    }
                }
            }
        }
        let mut back = vec![0u8; src.len()];
        unpack(&packed, nb, &mut back);
        assert_eq!(back, src);
    }
}

#[test]
fn pairs_of_groups_alternate_their_columns_and_round_trip() {
    for l in [X8_Q4_0, X8_Q8_0, X8_Q4_1] {
        let (bb, nb) = (l.block, 3);
        let byte = |r: usize, b: usize, i: usize| (r * 61 + b * 23 + i * 7) as u8;
        let src: Vec<u8> = (0..16).flat_map(|r| (0..nb).flat_map(move |b| (0..bb).map(move |i| byte(r, b, i)))).collect();
        let mut pair = vec![0u8; src.len()];
        interleave16(&src, nb, &mut pair, l);
        // Column b of group h is group h's own interleaved column b, at (2b + h)·8·bb.
        let rb = nb * bb;
        for h in 0..2 {
            let mut group = vec![0u8; 8 * rb];
            interleave8(&src[h * 8 * rb..(h + 1) * 8 * rb], nb, &mut group, l);
            for b in 0..nb {
                assert_eq!(&pair[(2 * b + h) * 8 * bb..(2 * b + h + 1) * 8 * bb], &group[b * 8 * bb..(b + 1) * 8 * bb], "{bb}: group {h} column {b}");
            }
        }
        let mut back = vec![0u8; src.len()];
        deinterleave16(&pair, nb, &mut back, l);
        assert_eq!(back, src);
    }
}

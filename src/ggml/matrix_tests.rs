//! Tests of `matrix.rs`.

use super::*;
use crate::ggml::dequantize;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 1001) as f32 / 500.0 - 1.0 + ((i + seed) as f32 * 0.01).sin()).collect()
}

/// The exact product of the dequantized weights and the dequantized activations, in f64:
/// what the integer kernels compute up to f32 rounding.
fn reference(m: &QuantMatrix, x: &[f32], n: usize) -> Vec<f64> {
    let w = m.dequantize();
    let ab = m.ty.act().row_bytes(m.cols);
    let mut y = vec![0f64; n * m.rows];
    for t in 0..n {
        let mut a = vec![0u8; ab];
        m.ty.act().quantize(&x[t * m.cols..(t + 1) * m.cols], &mut a, Kernels::best());
        let xa: Vec<f32> = if m.ty.is_k() {
            a.chunks(Q8_K_BYTES)
                .flat_map(|b| {
                    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    b[4..260].iter().map(move |&q| d * q as i8 as f32).collect::<Vec<_>>()
                })
                .collect()
        } else {
            dequantize(GgmlType::Q8_0, &a, m.cols).unwrap()
        };
        for r in 0..m.rows {
            y[t * m.rows + r] = (0..m.cols).map(|c| w[r * m.cols + c] as f64 * xa[c] as f64).sum();
        }
    }
    y
}

#[test]
fn kernels_agree_with_dequantized_matmul() {
    // 6 tokens: one group of four plus two single; and one token.
    for (rows, cols, n) in [(37, 512, 6), (37, 512, 1)] {
        agree_with_dequantized(rows, cols, n);
    }
}

fn agree_with_dequantized(rows: usize, cols: usize, n: usize) {
    let w = values(rows * cols, 1);
    let x = values(n * cols, 2);
    let kernels = Kernels::all();
    for ty in [QType::Q8_0, QType::Q4_0, QType::Q5_0, QType::Q4_1, QType::Q4_K, QType::Q6_K] {
        let m = QuantMatrix::quantize(ty, rows, cols, &w).unwrap();
        let want = reference(&m, &x, n);
        let wd = m.dequantize();
        for k in &kernels {
            let y = m.matmul_with(&x, n, k);
            for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                let (t, r) = (i / rows, i % rows);
                let scale: f64 = (0..cols).map(|c| (wd[r * cols + c] * x[t * cols + c]).abs() as f64).sum();
                assert!((a as f64 - b).abs() <= 1e-5 * scale + 1e-6, "{ty} {}: [{t},{r}] {a} vs {b}", k.name);
            }
            // And close to the unquantized product (the quantization error itself).
            for t in 0..n {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                    let scale: f64 = (0..cols).map(|c| (w[r * cols + c] * x[t * cols + c]).abs() as f64).sum();
                    let tol = if matches!(ty, QType::Q8_0 | QType::Q6_K) { 0.02 } else { 0.12 };
                    assert!((y[t * rows + r] as f64 - exact).abs() <= tol * scale, "{ty} {}: [{t},{r}]", k.name);
                }
            }
        }
    }
}

#[test]
fn simd_matches_scalar() {
    // Both paths sum the same integers per block; only the f32 order of the block sums
    // differs.
    let Some(simd) = Kernels::simd() else { return };
    // An interleaved pair and nine row-major rows after it.
    let (rows, cols) = (25, 768);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 31) % 15) as f32 - 7.0).collect();
    let x: Vec<f32> = (0..cols).map(|i| ((i * 17) % 255) as f32 - 127.0).collect();
    for ty in [QType::Q8_0, QType::Q4_0, QType::Q5_0, QType::Q4_1, QType::Q4_K, QType::Q6_K] {
        let m = QuantMatrix::quantize(ty, rows, cols, &w).unwrap();
        let a = m.matmul_with(&x, 1, &Kernels::scalar());
        let b = m.matmul_with(&x, 1, &simd);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{ty}: {u} vs {v}");
        }
    }
}

#[test]
fn fallback_and_shapes() {
    assert_eq!(QType::Q4_K.for_row_length(576), Some(QType::Q5_0));
    assert_eq!(QType::Q4_K.for_row_length(1536), Some(QType::Q4_K));
    assert_eq!(QType::Q8_0.for_row_length(576), Some(QType::Q8_0));
    assert_eq!(QType::Q4_0.for_row_length(100), None);
    assert!(QuantMatrix::quantize(QType::Q4_K, 2, 32, &[0.0; 64]).is_err());
    assert!(QuantMatrix::from_bytes(QType::Q8_0, 2, 32, vec![0; 67]).is_err());
    let m = QuantMatrix::quantize(QType::Q8_0, 3, 32, &values(96, 5)).unwrap();
    let p = m.permute_rows(&[2, 0, 1]).unwrap();
    assert_eq!(p.dequantize_rows(&[0]).unwrap(), m.dequantize_rows(&[2]).unwrap());
    assert!(m.dequantize_rows(&[3]).is_err());
}

/// Every token's output of a many-token product is bit for bit what the same token gives
/// alone, whatever the token count (odd ones, the groups of four and their remainders, more
/// than one block of 32 tokens) and for every weight type, with both kernel sets: the
/// property batched serving rests on (a sequence's answer must not depend on its neighbours
/// in the batch). The shapes leave Q4_0 and Q8_0 rows outside the interleaved groups of eight, so both
/// of its paths are covered.
#[test]
fn many_tokens_give_each_token_its_single_token_result() {
    let kernels = Kernels::all();
    let (rows, cols) = (21, 512);
    let w = values(rows * cols, 3);
    let x = values(37 * cols, 4);
    for ty in [QType::Q8_0, QType::Q4_0, QType::Q5_0, QType::Q4_1, QType::Q4_K, QType::Q6_K] {
        let m = QuantMatrix::quantize(ty, rows, cols, &w).unwrap();
        for k in &kernels {
            let alone: Vec<Vec<f32>> = (0..37).map(|t| m.matmul_with(&x[t * cols..(t + 1) * cols], 1, k)).collect();
            for n in [2, 3, 4, 5, 6, 7, 8, 9, 13, 33, 37] {
                let y = m.matmul_with(&x[..n * cols], n, k);
                for t in 0..n {
                    let got: Vec<u32> = y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = alone[t].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{ty} {}: token {t} of {n}", k.name);
                }
            }
        }
    }
    // The shared-input product (Q/K/V, gate/up) too, with a Q8_0 matrix of an odd row count.
    for k in &kernels {
        let a = QuantMatrix::quantize(QType::Q4_0, rows, cols, &w).unwrap();
        let b = QuantMatrix::quantize(QType::Q8_0, 9, cols, &w[..9 * cols]).unwrap();
        let n = 11;
        let ys = QuantMatrix::matmul_shared_with(&[&a, &b], &x[..n * cols], n, k);
        for t in 0..n {
            let solo = QuantMatrix::matmul_shared_with(&[&a, &b], &x[t * cols..(t + 1) * cols], 1, k);
            for (y, s) in ys.iter().zip(&solo) {
                let r = s.len();
                assert_eq!(y[t * r..(t + 1) * r].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{}: token {t}", k.name);
            }
        }
    }
}

/// Overwrites every code and sub-block scale byte of a quantized row-major matrix with
/// pseudo-random bytes, leaving the f16 scales (and mins) valid: weights a quantizer would
/// not make (Q8_0's −128, Q6_K's extreme scales), which the kernels must still sum exactly.
fn scramble(ty: QType, data: &mut [u8], seed: u64) {
    let scale_bytes = match ty {
        QType::Q8_0 | QType::Q4_0 | QType::Q5_0 => 0..2,
        QType::Q4_1 | QType::Q4_K => 0..4,
        QType::Q6_K => 208..210,
    };
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for (i, b) in block.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !scale_bytes.contains(&i) {
                *b = x as u8;
            }
        }
    }
}

/// The tiled many-token kernels (two rows × four tokens, eight interleaved rows × four
/// tokens, four tokens × one row) against the one-token kernel of the same set, bit for bit,
/// for every type and every kernel set this CPU runs: row counts that leave a row outside the
/// pairs and Q4_0 / Q8_0 rows outside the groups of eight, token counts that are not multiples of
/// four, odd and even block counts (the kernels alternate two accumulators), and scrambled
/// codes that reach the formats' extremes.
#[test]
fn tiled_products_equal_the_one_token_kernel_bit_for_bit() {
    let kernels = Kernels::all();
    if let Some(v) = kernels.iter().find(|k| k.name == "avx512vnni") {
        // The set this test exists for must really have its tiles.
        assert!(v.q8_0t.is_some() && v.q4_0t.is_some() && v.q5_0t.is_some() && v.q4_0x8x4.is_some() && v.q8_0x8x4.is_some() && v.q4_0x16.is_some() && v.q4_0x16xn.is_some() && v.q8_0x16.is_some() && v.q8_0x16xn.is_some());
    }
    for ty in [QType::Q8_0, QType::Q4_0, QType::Q5_0, QType::Q4_1, QType::Q4_K, QType::Q6_K] {
        // 19 and 11 rows: one interleaved pair and row-major rows after it, or none; 300: tasks
        // of several pairs.
        for (rows, cols) in [(19usize, 96usize), (11, 768), (2, 256), (1, 512), (300, 64)] {
            if !cols.is_multiple_of(ty.block()) {
                continue;
            }
            let q = QuantMatrix::quantize(ty, rows, cols, &values(rows * cols, 7)).unwrap();
            let mut data = q.into_bytes();
            scramble(ty, &mut data, (rows * cols) as u64);
            let m = QuantMatrix::from_bytes(ty, rows, cols, data).unwrap();
            let wd = m.dequantize();
            let x = values(13 * cols, 8);
            for k in &kernels {
                let alone: Vec<Vec<f32>> = (0..13).map(|t| m.matmul_with(&x[t * cols..(t + 1) * cols], 1, k)).collect();
                for n in [4, 5, 6, 7, 8, 12, 13] {
                    let y = m.matmul_with(&x[..n * cols], n, k);
                    for (t, want) in alone.iter().enumerate().take(n) {
                        let got: Vec<u32> = y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{ty} {} {rows}×{cols}: token {t} of {n}", k.name);
                    }
                }
                // And the sums themselves are right: the scalar set's within f32 rounding of
                // the sum of the products' magnitudes (the codes cancel each other a lot).
                let s = m.matmul_with(&x[..5 * cols], 5, &Kernels::scalar());
                let y = m.matmul_with(&x[..5 * cols], 5, k);
                for (i, (u, v)) in s.iter().zip(&y).enumerate() {
                    let (t, r) = (i / rows, i % rows);
                    let mag: f32 = (0..cols).map(|c| (wd[r * cols + c] * x[t * cols + c]).abs()).sum();
                    assert!((u - v).abs() <= 1e-5 * mag + 1e-6, "{ty} {} {rows}×{cols}: [{t},{r}] {u} vs {v}", k.name);
                }
            }
        }
    }
}


/// The pair kernels against the eight-row kernels of the same set on each group of the pair
/// (read with the pair's stride), bit for bit, for one and four tokens, with scrambled codes
/// (every byte value, −128 included); the eight-token pair kernels against the four-token
/// ones on each half of the tokens, and the any-count kernels for every count against the
/// one-token ones; whether a product uses them does not depend on the task split or on how
/// many tokens it has.
#[test]
fn pair_kernels_equal_the_group_kernels_bit_for_bit() {
    let mut tried = 0;
    for k in Kernels::all() {
        for ty in [QType::Q4_0, QType::Q8_0, QType::Q4_1] {
            let x8 = ty.x8(&k);
            let (Some(p1), Some(pn), Some(p8), Some(g4)) = (x8.p1, x8.pn, x8.p8, x8.g4) else { continue };
            tried += 1;
            let (rows, cols) = (32, 160);
            let q = QuantMatrix::quantize(ty, rows, cols, &values(rows * cols, 11)).unwrap();
            let mut data = q.into_bytes();
            scramble(ty, &mut data, 99);
            let m = QuantMatrix::from_bytes(ty, rows, cols, data).unwrap();
            let (nb, bb, rb) = (cols / QK, ty.block_bytes(), m.row_bytes());
            let x = values(8 * cols, 12);
            let ab = ty.act().row_bytes(cols);
            let mut acts = vec![0u8; 8 * ab];
            for (a, r) in acts.chunks_mut(ab).zip(x.chunks(cols)) {
                ty.act().quantize(r, a, Kernels::best());
            }
            let sums: Vec<Vec<i32>> = acts.chunks(ab).map(|a| a.chunks_exact(Q8_0_BYTES).map(|b| b[2..].iter().map(|&q| q as i8 as i32).sum()).collect()).collect();
            let scales: Vec<Vec<f32>> = acts.chunks(ab).map(|a| a.chunks_exact(Q8_0_BYTES).map(|b| blocks::f16_at(b, 0)).collect()).collect();
            // The pair kernels take the type's term per block in place of the sum.
            let terms: Vec<Vec<i32>> = sums.iter().zip(&scales).map(|(s, d)| s.iter().zip(d).map(|(&v, &dv)| x8.term.of(v, dv)).collect()).collect();
            let a: [&[u8]; 4] = std::array::from_fn(|t| &acts[t * ab..(t + 1) * ab]);
            let s: [&[i32]; 4] = std::array::from_fn(|t| &sums[t][..]);
            let e: [&[i32]; 4] = std::array::from_fn(|t| &terms[t][..]);
            let d: [&[f32]; 4] = std::array::from_fn(|t| &scales[t][..]);
            let a8: [&[u8]; 8] = std::array::from_fn(|t| &acts[t * ab..(t + 1) * ab]);
            let e8: [&[i32]; 8] = std::array::from_fn(|t| &terms[t][..]);
            let d8: [&[f32]; 8] = std::array::from_fn(|t| &scales[t][..]);
            // The second pair, so that the pair kernels do not start at the matrix's first byte.
            let w = &m.data[16 * rb..32 * rb];
            let p4 = |t0: usize| {
                let mut y = [[0f32; 16]; 8];
                pn(w, &a8[t0..t0 + 4], &e8[t0..t0 + 4], &d8[t0..t0 + 4], nb, &mut y);
                <[[f32; 16]; 4]>::try_from(&y[..4]).unwrap()
            };
            let wide = p4(0);
            let eight = p8(w, &a8, &e8, &d8, nb);
            let upper = p4(4);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for t in 0..4 {
                assert_eq!(bits(&eight[t]), bits(&wide[t]), "{ty} {}: token {t} of eight", k.name);
                assert_eq!(bits(&eight[t + 4]), bits(&upper[t]), "{ty} {}: token {} of eight", k.name, t + 4);
            }
            // Every count from one to eight, starting anywhere: each token's sixteen outputs are
            // the one-token kernel's.
            for count in 1..=8 {
                for first in [0, 8 - count] {
                    let mut y = [[f32::NAN; 16]; 8];
                    pn(w, &a8[first..first + count], &e8[first..first + count], &d8[first..first + count], nb, &mut y);
                    for u in 0..count {
                        let one = p1(w, a8[first + u], e8[first + u], d8[first + u], nb);
                        assert_eq!(bits(&y[u]), bits(&one), "{ty} {}: token {u} of {count} from {first}", k.name);
                    }
                    assert!(y[count..].iter().flatten().all(|v| v.is_nan()), "{ty} {}: {count} tokens wrote past their outputs", k.name);
                }
            }
            for h in 0..2 {
                let narrow = g4(&w[h * 8 * bb..], 16 * bb, a, s, nb);
                for t in 0..4 {
                    let one = p1(w, a[t], e[t], d[t], nb);
                    let single = (x8.g1)(&w[h * 8 * bb..], 16 * bb, a[t], s[t], nb);
                    assert_eq!(bits(&wide[t][8 * h..8 * h + 8]), bits(&narrow[t]), "{ty} {}: group {h}, token {t} of four", k.name);
                    assert_eq!(bits(&one[8 * h..8 * h + 8]), bits(&single), "{ty} {}: group {h}, token {t} alone", k.name);
                }
            }
        }
    }
    assert_eq!(tried, 3 * Kernels::simd_sets().len(), "every SIMD set must have the pair kernels of the three interleaved types");
}

/// Every set's activation quantizer gives the scalar one's bytes: smooth values, exact ties
/// (`x · 127/max` on a half integer, which must round to even), a block of zeros, a single
/// nonzero value, and blocks whose maximum sits in each lane.
#[test]
fn activation_quantizers_give_the_scalar_bytes() {
    let mut x = values(32 * 40, 3);
    // Ties: with max 127 the codes are the values themselves.
    for (i, v) in x[..32].iter_mut().enumerate() {
        *v = i as f32 - 15.5;
    }
    x[31] = 127.0;
    x[32..64].iter_mut().for_each(|v| *v = 0.0);
    x[64..96].iter_mut().enumerate().for_each(|(i, v)| *v = if i == 17 { -3.0e-3 } else { 0.0 });
    for b in 3..35 {
        x[b * 32 + (b - 3)] = 40.0 * if b % 2 == 0 { 1.0 } else { -1.0 };
    }
    // Scales that are subnormal in f16 (max 1e-3: d ≈ 7.9e-6) or round to zero (max 1e-6),
    // where the vector conversion must round as `f16::from_f32` does.
    x[36 * 32..37 * 32].iter_mut().for_each(|v| *v *= 2e-3);
    x[37 * 32..38 * 32].iter_mut().for_each(|v| *v *= 2e-6);
    let mut want = vec![0u8; 40 * Q8_0_BYTES];
    blocks::quantize_act_q8_0(&x, &mut want);
    for k in Kernels::all() {
        let mut got = vec![0u8; 40 * Q8_0_BYTES];
        (k.act_q8_0)(&x, &mut got);
        assert_eq!(got, want, "{}", k.name);
    }
}

/// The gated product is `f` of the two plain products, bit for bit, for the interleaved types
/// and a row-major one, one token and several (a remainder after eight and four, a prompt
/// longer than a token block), with rows that are not whole tasks.
#[test]
fn gated_product_is_f_of_the_two_products() {
    let f = |o: &mut [f32], g: &[f32], u: &[f32]| o.iter_mut().zip(g).zip(u).for_each(|((o, &g), &u)| *o = g * (g - u) + 0.5 * u);
    for ty in [QType::Q4_0, QType::Q8_0, QType::Q4_1, QType::Q4_K] {
        let (rows, cols) = (304, 256);
        let a = QuantMatrix::quantize(ty, rows, cols, &values(rows * cols, 21)).unwrap();
        let b = QuantMatrix::quantize(ty, rows, cols, &values(rows * cols, 22)).unwrap();
        for n in [1, 7, 13, 40] {
            let x = values(n * cols, 23 + n);
            let [g, u]: [Vec<f32>; 2] = QuantMatrix::matmul_shared(&[&a, &b], &x, n).try_into().unwrap();
            let mut want = vec![0f32; rows * n];
            f(&mut want, &g, &u);
            let got = QuantMatrix::matmul_glu(&a, &b, &x, n, &f).expect("same shapes");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty}, {n} tokens");
        }
    }
    let c = QuantMatrix::quantize(QType::Q4_0, 16, 256, &values(16 * 256, 24)).unwrap();
    let d = QuantMatrix::quantize(QType::Q4_0, 32, 256, &values(32 * 256, 25)).unwrap();
    assert!(QuantMatrix::matmul_glu(&c, &d, &values(256, 26), 1, &f).is_none(), "rows differ");
}

/// The products reuse one activation buffer without clearing it, which is sound only if every
/// quantizer writes every byte of its row: bytes left from before would be read as codes.
#[test]
fn activation_quantizers_write_every_byte() {
    let cols = 512;
    let mut x = values(cols, 31);
    x[40..72].iter_mut().for_each(|v| *v = 0.0);
    for act in [Act::Q8_0, Act::Q8_K] {
        for k in Kernels::all() {
            let ab = act.row_bytes(cols);
            let (mut zeros, mut junk) = (vec![0u8; ab], vec![0xA5u8; ab]);
            act.quantize(&x, &mut zeros, &k);
            act.quantize(&x, &mut junk, &k);
            assert_eq!(zeros, junk, "{act:?}, {}", k.name);
        }
    }
}

/// Every kernel set's block sums are the scalar ones, over the whole code range.
#[test]
fn q8_0_sums_are_the_scalar_sums() {
    let nb = 21;
    let mut acts: Vec<u8> = (0..nb * Q8_0_BYTES).map(|i| ((i * 7919 + 13) % 256) as u8).collect();
    acts[2 + Q8_0_BYTES..2 * Q8_0_BYTES].iter_mut().for_each(|q| *q = 0x80);
    acts[2 + 2 * Q8_0_BYTES..3 * Q8_0_BYTES].iter_mut().for_each(|q| *q = 0x7F);
    let mut want = vec![0i32; nb];
    super::super::kernels::q8_0_sums_scalar(&acts, &mut want);
    assert_eq!((want[1], want[2]), (-128 * 32, 127 * 32));
    for k in Kernels::all() {
        let mut got = vec![i32::MIN; nb];
        (k.q8_0_sums)(&acts, &mut got);
        assert_eq!(got, want, "{}", k.name);
    }
}

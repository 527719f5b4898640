//! Quantized inference and GGUF export: a quantized fixture runs through the one model
//! definition close to the f32 model, decodes the same with and without the KV cache, and
//! exported GGUFs re-import to the same tensors and tokenizers (SentencePiece, extended too).

mod common;
use common::*;
use linly_lora::infer::generate::{generate, GenerateOptions};
use linly_lora::infer::sample::SamplingParams;
use linly_lora::quant::{export_gguf, import_gguf, ExportOptions, ExportType};
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::WeightStore;
use linly_lora::model::linear::Frozen;
use linly_lora::model::Llama;
use linly_lora::quant::{store, QType};

fn quantized_tiny(ty: QType, keep_embeddings: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(format!("tiny-{ty}"));
    let r = store::quantize_model(&tiny().join("base"), &out, ty, keep_embeddings, false).unwrap();
    // The fixture's FFN width 176 is not a multiple of 32: down_proj stays f16, with a warning.
    assert!(r.warnings.iter().any(|w| w.contains("mlp.down_proj")), "{:?}", r.warnings);
    (tmp, out)
}

#[test]
fn quantized_model_forward_is_close_to_f32() {
    let exp = Expected::load();
    let ids = exp.ids("input_ids");
    let f32_model = Llama::load(&tiny().join("base"), &cpu(), FloatType::F32).unwrap();
    let want = logits_of(&f32_model, &ids);
    // Measured on this small random-init fixture (hidden 64): q8_0 0.012, q4_k (q5_0 here,
    // rows are not 256 long) 0.080, q4_0 0.148.
    for (ty, tol) in [(QType::Q8_0, 0.02), (QType::Q4_K, 0.12), (QType::Q4_0, 0.2)] {
        let (_tmp, dir) = quantized_tiny(ty, false);
        let model = Llama::load(&dir, &cpu(), FloatType::F32).unwrap();
        let q = &model.layers[0].self_attn.q_proj.weight;
        assert!(matches!(q, Frozen::Quant(_)), "{ty}: q_proj should stay quantized");
        assert!(model.embed_tokens.quant.is_some() && model.lm_head.as_ref().unwrap().quant.is_some());
        let got = logits_of(&model, &ids);
        let e = rel_err(&got, &want);
        eprintln!("{ty}: logits rel err {e:.4}");
        assert!(e <= tol, "{ty}: logits relative error {e} > {tol}");
    }
}

#[test]
fn quantized_greedy_decoding_same_with_and_without_cache() {
    let (_tmp, dir) = quantized_tiny(QType::Q8_0, true);
    let model = Llama::load(&dir, &cpu(), FloatType::F32).unwrap();
    assert!(model.embed_tokens.quant.is_none(), "--keep-embeddings keeps the table dense");
    let prompt = &Expected::load().ids("input_ids")[0][..8].to_vec();
    let run = |no_cache| {
        let opts = GenerateOptions { max_new_tokens: 12, sampling: SamplingParams::default(), no_cache, stop_ids: vec![], kv: Default::default() };
        generate(&model, prompt, &opts, &cpu(), |_| Ok(true)).unwrap()
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn quantize_and_run_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let base = tiny().join("base");
    let (ok, stdout, stderr) = run_cli(&["quantize", "--model", base.to_str().unwrap(), "--format", "q4_0", "--out", out.to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Q4_0"), "{stdout}");
    assert!(store::is_quantized_dir(&out));
    let (ok, stdout, stderr) = run_cli(&["generate", "--model", out.to_str().unwrap(), "--prompt-ids", "1,5,9", "--max-new-tokens", "4"], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("generated_ids:"), "{stdout}");
    // Quantizing into an existing folder or from a quantized folder is refused.
    let (ok, _, stderr) = run_cli(&["quantize", "--model", out.to_str().unwrap(), "--format", "q8_0", "--out", tmp.path().join("again").to_str().unwrap()], None);
    assert!(!ok && stderr.contains("already quantized"), "{stderr}");
}

/// Export → import with a SentencePiece tokenizer, plain and extended with Chinese pieces: the
/// weights come back exactly (f32) and the rebuilt tokenizer splits text as the original.
#[test]
fn sentencepiece_and_extended_vocab_survive_export_and_import() {
    let tmp = tempfile::tempdir().unwrap();
    let llama2 = fixture("llama2-tokenizer");
    let ext = tmp.path().join("ext-tok");
    let pieces: Vec<String> = ["中国", "北京", "我们", "学习", "汉语", "你好", "谢谢"].iter().map(|s| s.to_string()).collect();
    let r = linly_lora::vocab::extend(&llama2, &linly_lora::vocab::PieceSource::Pieces(pieces), &ext, false).unwrap();
    assert!(r.new_vocab > 32000);
    let text = "我们在北京学习汉语。Hello world, 你好! 谢谢 the 中国 123";
    for (name, tok_dir, vocab) in [("plain", &llama2, 32000usize), ("extended", &ext, r.new_vocab)] {
        let model = tmp.path().join(format!("{name}-model"));
        std::fs::create_dir_all(&model).unwrap();
        random_model(&model, vocab, Some(tok_dir));
        let gguf = tmp.path().join(format!("{name}.gguf"));
        let rep = export_gguf(&model, &gguf, &ExportOptions { ty: ExportType::F32, keep_embeddings: false, pure: false }).unwrap();
        assert_eq!(rep.tokenizer.as_deref(), Some("llama"));
        let back = tmp.path().join(format!("{name}-back"));
        import_gguf(&gguf, &back, FloatType::F32).unwrap();
        let (a, b) = (WeightStore::open(&model).unwrap(), WeightStore::open(&back).unwrap());
        for n in a.names() {
            assert_eq!(a.f32(&n).unwrap(), b.f32(&n).unwrap(), "{name}: {n}");
        }
        let orig = tokenizers::Tokenizer::from_file(tok_dir.join("tokenizer.json")).unwrap();
        let rebuilt = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
        let ids = |t: &tokenizers::Tokenizer| t.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids(&rebuilt), ids(&orig), "{name}: the GGUF vocabulary tokenizes differently");
        if name == "extended" {
            let bj = orig.token_to_id("北京").unwrap();
            assert!(bj >= 32000 && ids(&orig).contains(&bj));
        }
    }
}

/// Deterministic test values in [-1, 1).
fn pseudo(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 1001) as f32 / 500.0 - 1.0).collect()
}

#[test]
fn shared_products_equal_separate_ones() {
    use linly_lora::quant::{Kernels, QuantMatrix};
    let cols = 256;
    let kernels = Kernels::all();
    for n in [1, 5] {
        let x = pseudo(n * cols, 3);
        // Q/K/V-like (three row counts, one activation format) and a mix of activation formats
        // (Q8_0 for Q8_0 and Q4_1, Q8_K for Q4_K), which falls back to one product each.
        for tys in [[QType::Q8_0, QType::Q4_0, QType::Q5_0], [QType::Q4_1, QType::Q4_1, QType::Q4_1], [QType::Q8_0, QType::Q4_1, QType::Q4_K]] {
            let ms: Vec<QuantMatrix> = tys.iter().zip([24, 8, 13]).enumerate().map(|(i, (&ty, rows))| QuantMatrix::quantize(ty, rows, cols, &pseudo(rows * cols, i)).unwrap()).collect();
            let refs: Vec<&QuantMatrix> = ms.iter().collect();
            for k in &kernels {
                let shared = QuantMatrix::matmul_shared_with(&refs, &x, n, k);
                for (m, y) in ms.iter().zip(&shared) {
                    assert_eq!(y, &m.matmul_with(&x, n, k), "{tys:?} n={n} {}", k.name);
                }
            }
        }
    }
}

/// Q8_0 codes may be −128 in a GGUF made elsewhere: the SIMD kernels must not lose their sign
/// (`_mm256_sign_epi8` cannot negate −128, so the sign trick belongs on the weight side).
#[test]
fn simd_q8_0_takes_code_minus_128() {
    use linly_lora::quant::{Kernels, QuantMatrix};
    let (rows, cols) = (8, 64);
    let mut data = Vec::new();
    for r in 0..rows {
        for b in 0..cols / 32 {
            data.extend_from_slice(&half::f16::from_f32(0.01 * (r + 1) as f32).to_le_bytes());
            data.extend((0..32).map(|i| if (i + b + r) % 3 == 0 { 0x80u8 } else { (i as i8 - 16) as u8 }));
        }
    }
    let m = QuantMatrix::from_bytes(QType::Q8_0, rows, cols, data).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| if i % 2 == 0 { -0.5 } else { 0.25 + i as f32 * 0.01 }).collect();
    let a = m.matmul_with(&x, 1, &Kernels::scalar());
    // Every SIMD set, one token and five (the tiles take activations shifted by 128 and
    // weights as they are).
    let x5: Vec<f32> = std::iter::repeat_n(&x, 5).flatten().copied().collect();
    for k in Kernels::simd_sets() {
        let mut ys = vec![m.matmul_with(&x, 1, &k)];
        ys.extend(m.matmul_with(&x5, 5, &k).chunks_exact(rows).map(<[f32]>::to_vec));
        for b in &ys {
            for (u, v) in a.iter().zip(b) {
                assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{}: {u} vs {v}", k.name);
            }
        }
    }
}

/// Q4_0 matrices keep their rows in interleaved groups of eight (one pass of the GEMV kernel
/// makes eight outputs). Every output must equal the row-major dot kernel's on the GGUF bytes
/// of its row: exactly for the scalar kernels (same integer sums, same order), to f32
/// rounding for SIMD; row counts that leave tails (rows % 8 ≠ 0), fewer rows than a group,
/// one and several tokens.
#[test]
fn q4_0_interleaved_rows_equal_the_row_dot_kernel() {
    use linly_lora::quant::blocks::{quantize_act_q8_0, Q8_0_BYTES};
    use linly_lora::quant::{Kernels, QuantMatrix};
    let kernels = Kernels::all();
    for (rows, cols) in [(8, 32), (5, 64), (13, 96), (37, 576), (64, 1536)] {
        let w = pseudo(rows * cols, rows);
        let m = QuantMatrix::quantize(QType::Q4_0, rows, cols, &w).unwrap();
        let raw = m.bytes().into_owned();
        let (nb, rb) = (cols / 32, cols / 32 * 18);
        for n in [1, 3, 6] {
            let x = pseudo(n * cols, 7 + n);
            let mut acts = vec![0u8; n * nb * Q8_0_BYTES];
            for (a, r) in acts.chunks_exact_mut(nb * Q8_0_BYTES).zip(x.chunks_exact(cols)) {
                quantize_act_q8_0(r, a);
            }
            for k in &kernels {
                let y = m.matmul_with(&x, n, k);
                for t in 0..n {
                    let a = &acts[t * nb * Q8_0_BYTES..(t + 1) * nb * Q8_0_BYTES];
                    for r in 0..rows {
                        let want = (k.q4_0)(&raw[r * rb..(r + 1) * rb], a, nb);
                        let got = y[t * rows + r];
                        if k.name == "scalar" {
                            assert_eq!(got, want, "[{rows}×{cols}] n={n} t={t} r={r}");
                        } else {
                            let scale: f32 = w[r * cols..(r + 1) * cols].iter().zip(&x[t * cols..]).map(|(u, v)| (u * v).abs()).sum();
                            assert!((got - want).abs() <= 1e-5 * scale + 1e-6, "[{rows}×{cols}] n={n} t={t} r={r}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}

/// The interleaved kernel's 16-bit partial sums at their largest: every nibble 15 (code +7) or
/// 0 (code −8) against activation codes ±127, all of one sign per block, so that a wrong
/// bound (i16 overflow) or a lost offset shows.
#[test]
fn q4_0_interleaved_kernel_at_extreme_codes() {
    use linly_lora::quant::{Kernels, QuantMatrix};
    let (rows, cols) = (16, 128);
    let mut data = Vec::new();
    for r in 0..rows {
        for b in 0..cols / 32 {
            data.extend_from_slice(&half::f16::from_f32(0.5 + 0.01 * r as f32).to_le_bytes());
            data.extend(std::iter::repeat_n(if (r + b) % 2 == 0 { 0xFFu8 } else { 0x00 }, 16));
        }
    }
    let m = QuantMatrix::from_bytes(QType::Q4_0, rows, cols, data.clone()).unwrap();
    assert_eq!(&*m.bytes(), &data[..], "the GGUF bytes come back unchanged");
    for sign in [1.0f32, -1.0] {
        let x: Vec<f32> = (0..cols).map(|i| if (i / 32) % 3 == 2 { -sign } else { sign }).collect();
        let a = m.matmul_with(&x, 1, &Kernels::scalar());
        // Every SIMD set, one token and five (the four-token tiles and one more).
        let x5: Vec<f32> = std::iter::repeat_n(&x, 5).flatten().copied().collect();
        let mut simd: Vec<Vec<f32>> = Vec::new();
        for k in Kernels::simd_sets() {
            simd.push(m.matmul_with(&x, 1, &k));
            simd.extend(m.matmul_with(&x5, 5, &k).chunks_exact(rows).map(<[f32]>::to_vec));
        }
        for (r, u) in a.iter().enumerate() {
            // By hand: per block d·(1/127·127)·32·code, code 7 or −8, activations ±1.
            let d = half::f16::from_f32(0.5 + 0.01 * r as f32).to_f32();
            let want: f32 = (0..cols / 32).map(|bl| {
                let code = if (r + bl) % 2 == 0 { 7.0 } else { -8.0 };
                let s = if bl % 3 == 2 { -sign } else { sign };
                d * 32.0 * code * s
            }).sum();
            assert!((u - want).abs() <= 1e-3 * want.abs().max(1.0), "scalar row {r}: {u} vs {want}");
            for v in simd.iter().map(|y| y[r]) {
                assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "row {r}: {u} vs {v}");
            }
        }
    }
}

/// What hands Q4_0, Q8_0 or Q4_1 bytes or rows out reads through the interleaving: GGUF bytes, single rows
/// (embedding lookups), full dequantization, row permutations.
#[test]
fn q4_0_interleaved_matrix_gives_gguf_bytes_and_rows_back() {
    use linly_lora::io::gguf::{dequantize, GgmlType};
    use linly_lora::quant::QuantMatrix;
    // 21 and 40 rows: interleaved pairs of groups with row-major rows after them.
    for rows in [3, 8, 21, 40] {
        let cols = 64;
        let raw = QuantMatrix::quantize(QType::Q8_0, rows, cols, &pseudo(rows * cols, 1)).unwrap();
        // The Q8_0 matrix itself (its interleaved codes are stored offset by 128).
        let all8 = dequantize(GgmlType::Q8_0, &raw.bytes(), rows * cols).unwrap();
        let ids8: Vec<usize> = (0..rows).rev().collect();
        let got8 = raw.dequantize_rows(&ids8).unwrap();
        for (i, &r) in ids8.iter().enumerate() {
            assert_eq!(&got8[i * cols..(i + 1) * cols], &all8[r * cols..(r + 1) * cols], "Q8_0 row {r}");
        }
        // Any bytes with valid f16 scales are Q4_0 codes: build them from the Q8_0 row bytes.
        let data: Vec<u8> = raw.bytes().chunks_exact(34).flat_map(|b| b[..18].to_vec()).collect();
        let m = QuantMatrix::from_bytes(QType::Q4_0, rows, cols, data.clone()).unwrap();
        assert_eq!(&*m.bytes(), &data[..]);
        assert_eq!(m.clone().into_bytes(), data);
        let all = dequantize(GgmlType::Q4_0, &data, rows * cols).unwrap();
        assert_eq!(m.dequantize(), all);
        let ids: Vec<usize> = (0..rows).rev().collect();
        let got = m.dequantize_rows(&ids).unwrap();
        for (i, &r) in ids.iter().enumerate() {
            assert_eq!(&got[i * cols..(i + 1) * cols], &all[r * cols..(r + 1) * cols], "row {r}");
        }
        let p = m.permute_rows(&ids).unwrap();
        assert_eq!(p.dequantize(), got);
        // Q4_1, interleaved with its two fields (d, m) per block.
        let q41 = QuantMatrix::quantize(QType::Q4_1, rows, cols, &pseudo(rows * cols, 2)).unwrap();
        let data = q41.bytes().into_owned();
        let m = QuantMatrix::from_bytes(QType::Q4_1, rows, cols, data.clone()).unwrap();
        assert_eq!(&*m.bytes(), &data[..]);
        assert_eq!(m.clone().into_bytes(), data);
        let all = dequantize(GgmlType::Q4_1, &data, rows * cols).unwrap();
        assert_eq!(m.dequantize(), all);
        let got = m.dequantize_rows(&ids).unwrap();
        for (i, &r) in ids.iter().enumerate() {
            assert_eq!(&got[i * cols..(i + 1) * cols], &all[r * cols..(r + 1) * cols], "Q4_1 row {r}");
        }
        assert_eq!(m.permute_rows(&ids).unwrap().dequantize(), got);
    }
}

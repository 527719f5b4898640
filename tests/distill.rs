//! Model-based initialisation of new rows (`vocab resize --init distill*`) on the tiny fixture:
//! each method must leave the resized model better than sub-token means on text it was not
//! fitted on, and leave every old row as it was.

mod common;
use burn::module::Module;
use common::*;
use linly_lora::io::safetensors::FloatType;
use linly_lora::io::weights::tensor_to_f32;
use linly_lora::model::{Llama, TokenTable};
use linly_lora::rng::SplitMix;
use linly_lora::vocab::distill::{apply_distilled, distill_rows, expand, DistillOptions, Sides};
use linly_lora::vocab::{resize_loaded, InitMethod, VocabExtension};

/// The fixture's weights are random and small, so its predictions are nearly uniform and it
/// "knows" nothing to transfer. A sharper head gives it preferences that text sampled from it
/// follows, which is what a real base model's knowledge looks like to the new rows.
fn teacher(device: &burn::tensor::Device) -> Llama {
    let mut m = Llama::load(&tiny().join("base"), device, FloatType::F32).unwrap();
    let head = m.lm_head.as_ref().unwrap().weight();
    m.lm_head = Some(TokenTable::new(head * 12.0));
    m
}

/// Old-token sequences sampled from the teacher (temperature 1), with the sub-tokens of a random
/// multi-token new piece spliced in at about a third of the steps, so that the text uses the new
/// pieces and what follows them is what the teacher predicts after reading them.
fn sample(model: &Llama, ext: &VocabExtension, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let multi: Vec<&Vec<u32>> = ext.subtokens.iter().filter(|s| s.len() > 1).collect();
    let device = model.devices().into_iter().next().unwrap();
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            let mut ids = vec![rng.below(320) as u32];
            while ids.len() < len {
                if rng.uniform() < 0.3 {
                    ids.extend_from_slice(multi[rng.below(multi.len())]);
                    continue;
                }
                let l = tensor_to_f32(model.forward(linly_lora::infer::ids_tensor(&ids, &device), None));
                let last = &l[(ids.len() - 1) * 320..ids.len() * 320];
                let m = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f64> = last.iter().map(|&x| ((x - m) as f64).exp()).collect();
                let mut u = rng.uniform() * p.iter().sum::<f64>();
                let mut pick = 319;
                for (i, &pi) in p.iter().enumerate() {
                    if u <= pi {
                        pick = i;
                        break;
                    }
                    u -= pi;
                }
                ids.push(pick as u32);
            }
            ids
        })
        .collect()
}

/// The new tokenization of an old-token sequence: longest sub-token match first.
fn retokenize(old: &[u32], ext: &VocabExtension) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < old.len() {
        let best = ext.subtokens.iter().enumerate().filter(|(_, s)| s.len() > 1 && old[i..].starts_with(s)).max_by_key(|(_, s)| s.len());
        match best {
            Some((k, s)) => {
                out.push((ext.old_vocab + k) as u32);
                i += s.len();
            }
            None => {
                out.push(old[i]);
                i += 1;
            }
        }
    }
    out
}

/// Mean NLL of `seqs` (new tokenization) under `model`.
fn nll(model: &Llama, seqs: &[Vec<u32>]) -> f64 {
    let v = model.vocab_size();
    let (mut sum, mut n) = (0.0, 0usize);
    for s in seqs {
        let l = logits_of(model, std::slice::from_ref(s));
        for i in 0..s.len() - 1 {
            let row = &l[i * v..(i + 1) * v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - row[s[i + 1] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn rows(t: &TokenTable) -> Vec<f32> {
    tensor_to_f32(t.weight())
}

#[test]
fn each_distill_method_beats_subtoken_mean_on_held_out_text_and_keeps_old_rows() {
    let device = cpu().autodiff();
    let ext = VocabExtension::load(&tiny().join("vocab_extension.json")).unwrap();
    let t = teacher(&device);
    let plain = t.valid();
    let sampled = sample(&plain, &ext, 48, 40, 7);
    let new_tok: Vec<Vec<u32>> = sampled.iter().map(|s| retokenize(s, &ext)).collect();
    assert!(new_tok.iter().flatten().filter(|&&i| i >= 320).count() > 100, "the sampled text must use new pieces");
    // Fixed-length contexts for the fit, from the first 40 sequences; the last 8 are held out.
    let seq = 24;
    let contexts: Vec<_> = new_tok[..40].iter().filter(|s| s.len() >= seq).filter_map(|s| expand(&s[..seq], &ext)).collect();
    let held_out: Vec<Vec<u32>> = new_tok[40..].to_vec();

    let mut resized = t.clone();
    resize_loaded(&mut resized, &ext, InitMethod::SubtokenMean, 0, 0.02).unwrap();
    let base_nll = nll(&resized.valid(), &held_out);
    let (old_embed, old_head) = (rows(&t.embed_tokens), rows(t.lm_head.as_ref().unwrap()));

    for (name, sides) in [("distill", Sides { input: true, output: true }), ("distill-input", Sides { input: true, output: false }), ("distill-head", Sides { input: false, output: true })] {
        let opts = DistillOptions { sides, tokens: contexts.len() * seq, head_tokens: 0, seq_len: seq, batch: 4, input_epochs: 30, input_lr: 0.1, head_epochs: 5, head_lr: 0.3, head_batch: 64, seed: 1 };
        let fitted = distill_rows(&resized, &ext, &contexts, &opts, |_| {}).unwrap();
        let mut m = resized.clone();
        apply_distilled(&mut m, &ext, &fitted).unwrap();
        let after = nll(&m.valid(), &held_out);
        eprintln!("{name}: held-out NLL {base_nll:.4} (sub-token mean) -> {after:.4}");
        assert!(after < base_nll - 0.01, "{name}: held-out NLL {after} is not below sub-token mean's {base_nll}");
        let (e, h) = (rows(&m.embed_tokens), rows(m.lm_head.as_ref().unwrap()));
        assert_eq!(&e[..320 * 64], &old_embed[..], "{name}: old embedding rows changed");
        assert_eq!(&h[..320 * 64], &old_head[..], "{name}: old head rows changed");
        let start_embed = rows(&resized.embed_tokens);
        assert_eq!(e[320 * 64..] != start_embed[320 * 64..], sides.input, "{name}: the input rows move exactly when the input side is fitted");
    }
}

#[test]
fn settings_that_would_panic_or_write_nan_rows_are_errors() {
    for (opts, key) in [
        (DistillOptions { input_lr: f64::NAN, ..Default::default() }, "input_lr"),
        (DistillOptions { head_lr: f64::INFINITY, ..Default::default() }, "head_lr"),
        (DistillOptions { head_lr: -1.0, ..Default::default() }, "head_lr"),
        (DistillOptions { seq_len: 0, ..Default::default() }, "seq_len"),
        (DistillOptions { tokens: 0, ..Default::default() }, "tokens"),
    ] {
        let e = format!("{:#}", opts.validate().unwrap_err());
        assert!(e.contains(key), "{e}");
    }
    DistillOptions::default().validate().unwrap();
}

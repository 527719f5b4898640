use super::*;

// ---------------------------------------------------------------- packing


fn lens(n: usize, seed: u64, max: usize) -> Vec<usize> {
    let mut s = seed;
    (0..n).map(|_| 2 + (mix_test_rand(&mut s) % (max as u64 - 1)) as usize).collect()
}

fn mix_test_rand(s: &mut u64) -> u64 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *s >> 33
}

const PAD: u32 = 9_999_999;

#[test]
fn packing_keeps_fitting_documents_whole_and_masks_boundaries() {
    let seq = 64;
    let mut l = lens(300, 7, 60);
    l[10] = 64; // exactly fits
    l[20] = 150; // must be cut
    l[30] = 65;
    let src = synth("s", &l, 0, Weight::Fixed(1.0));
    let docs = src.docs.to_docs();
    let mut cfg = MixConfig::new(seq, 3);
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![src], cfg).unwrap();
    // One epoch has at most as many rows as pieces; draw enough rows to cover it fully.
    let mut rows = vec![];
    // The stream reads up to `pack_window` (64) pieces ahead and every row takes the oldest
    // pending piece, so 64 rows after the stream wraps, all of epoch 0 has been packed.
    while m.stats().sources[0].epoch == 0 {
        let b = m.next_batch(4, 0, 1).unwrap();
        rows.extend(b.input_ids.into_iter().zip(b.labels));
    }
    let b = m.next_batch(64, 0, 1).unwrap();
    rows.extend(b.input_ids.into_iter().zip(b.labels));
    let (mut non_pad, mut labelled) = (0usize, vec![0usize; docs.ids.len()]);
    let mut seen_whole = vec![0usize; l.len()];
    for (ids, labels) in &rows {
        assert_eq!(ids.len(), seq);
        assert_eq!(labels.len(), seq);
        let n = ids.iter().position(|&t| t == PAD).unwrap_or(seq);
        assert!(ids[n..].iter().all(|&t| t == PAD) && labels[n..].iter().all(|&x| x == -100));
        non_pad += n;
        let mut t = 0;
        while t < n {
            // A piece: consecutive ids of one document.
            let d = (ids[t] / 1000) as usize;
            let k0 = (ids[t] % 1000) as usize;
            let mut e = t + 1;
            while e < n && ids[e] == ids[e - 1] + 1 && (ids[e] / 1000) as usize == d {
                e += 1;
            }
            assert_eq!(labels[t], -100, "first token of a piece must not be a target");
            for j in t + 1..e {
                assert_eq!(labels[j], ids[j] as i64);
                labelled[docs.offsets[d] + k0 + j - t] += 1;
            }
            if l[d] <= seq {
                assert_eq!((k0, e - t), (0, l[d]), "document {d} fits but was cut");
                seen_whole[d] += 1;
            }
            t = e;
        }
    }
    let st = m.stats();
    assert_eq!(st.sources[0].non_pad as usize, non_pad);
    assert_eq!(st.sources[0].positions as usize, rows.len() * seq);
    assert!((st.efficiency() - non_pad as f64 / (rows.len() * seq) as f64).abs() < 1e-12);
    assert!(st.efficiency() > 0.9, "best-fit packing should fill rows: {}", st.summary());
    // Over one epoch every fitting document appears (the epoch boundary may start a second copy
    // inside the final window), and each token of the long documents except the first is
    // labelled: the one-token overlap of cuts loses nothing.
    for (d, &n) in l.iter().enumerate() {
        if n <= seq {
            assert!(seen_whole[d] >= 1, "document {d} missing");
        } else {
            let a = docs.offsets[d];
            assert!((1..n).all(|k| labelled[a + k] >= 1), "document {d} has unlabelled tokens");
            assert_eq!(labelled[a], 0);
        }
    }
}

#[test]
fn efficiency_per_source_is_counted_separately() {
    let a = synth("full", &[16; 50], 0, Weight::Fixed(1.0));
    let b = synth("half", &[9; 50], 100_000, Weight::Fixed(1.0));
    let mut cfg = MixConfig::new(16, 1);
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    m.next_batch(40, 0, 10).unwrap();
    let st = m.stats();
    assert_eq!(st.sources[0].efficiency(), 1.0);
    assert!((st.sources[1].efficiency() - 9.0 / 16.0).abs() < 1e-12);
    let total = (st.sources[0].non_pad + st.sources[1].non_pad) as f64 / (40.0 * 16.0);
    assert!((st.efficiency() - total).abs() < 1e-12);
    assert!(st.summary().contains("half: 56."), "{}", st.summary());
}

#[test]
fn packing_off_puts_one_piece_per_row() {
    let src = synth("s", &[5; 20], 0, Weight::Fixed(1.0));
    let mut cfg = MixConfig::new(16, 1);
    cfg.packing = false;
    cfg.pad_id = PAD;
    let mut m = Mixer::new(vec![src], cfg).unwrap();
    let b = m.next_batch(10, 0, 1).unwrap();
    assert!(b.input_ids.iter().all(|r| r[4] != PAD && r[5] == PAD));
    assert!((m.stats().efficiency() - 5.0 / 16.0).abs() < 1e-12);
}

#[test]
fn limit_takes_the_first_records() {
    let mut spec = SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv");
    spec.limit = Some(4);
    let s = load_source(0, &spec, &fixture(""), enc(), None).unwrap();
    assert_eq!(s.docs.len(), 12);
    let all = load_source(0, &SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv"), &fixture(""), enc(), None).unwrap();
    assert_eq!(s.docs.to_docs().ids[..], all.docs.to_docs().ids[..s.docs.tokens()]);
}

#[test]
fn batch_token_count_matches_labels() {
    let src = synth("s", &lens(100, 3, 40), 0, Weight::Fixed(1.0));
    let mut m = Mixer::new(vec![src], MixConfig::new(32, 5)).unwrap();
    let b = m.next_batch(8, 0, 10).unwrap();
    let n: usize = b.labels.iter().flatten().filter(|&&x| x != -100).count();
    assert_eq!(b.tokens, n);
    assert!(b.labels.iter().all(|r| r[0] == -100));
}

// ---------------------------------------------------------------- mixing

#[test]
fn curriculum_shares_move_from_start_to_end() {
    let a = synth("a", &[4; 200], 0, Weight::Ramp([0.2, 0.8]));
    let b = synth("b", &[4; 200], 100_000, Weight::Ramp([0.8, 0.2]));
    let mut cfg = MixConfig::new(4, 11);
    cfg.pack_window = 1;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    let n = 4000;
    for (step, want) in [(0u64, 0.2), (1000, 0.8), (500, 0.5)] {
        let batch = m.next_batch(n, step, 1000).unwrap();
        let share = batch.source_of_row.iter().filter(|&&s| s == 0).count() as f64 / n as f64;
        assert!((share - want).abs() < 0.03, "step {step}: share {share}, want {want}");
    }
    assert_eq!(m.shares(0.0), vec![0.2, 0.8]);
}

#[test]
fn bucketed_mixing_goes_bin_by_bin() {
    let bins = 4;
    let na = 40;
    let nb = 24;
    let a = synth("a", &vec![8; na], 0, Weight::Fixed(1.0));
    let b = synth("b", &vec![8; nb], 100_000, Weight::Fixed(3.0));
    let mut cfg = MixConfig::new(8, 2);
    cfg.bucketed = true;
    cfg.bins = bins;
    let mut m = Mixer::new(vec![a, b], cfg).unwrap();
    // One row = one document here, so two passes are exactly 2·(na + nb) rows.
    let rows = m.next_batch(2 * (na + nb), 0, 1).unwrap();
    let bin_of = |id: u32| -> (usize, usize) {
        let (s, d) = if id >= 100_000 { (1, ((id - 100_000) / 1000) as usize) } else { (0, (id / 1000) as usize) };
        let n = [na, nb][s];
        (s, (0..bins).find(|&k| d >= k * n / bins && d < (k + 1) * n / bins).unwrap())
    };
    for pass in 0..2 {
        let chunk = &rows.input_ids[pass * (na + nb)..(pass + 1) * (na + nb)];
        let order: Vec<(usize, usize)> = chunk.iter().map(|r| bin_of(r[0])).collect();
        // Bin k of every source before bin k + 1 of any source.
        assert!(order.windows(2).all(|w| w[0].1 <= w[1].1), "pass {pass}: {order:?}");
        // Each pass covers each source exactly once.
        let mut docs: Vec<u32> = chunk.iter().map(|r| r[0]).collect();
        docs.sort();
        docs.dedup();
        assert_eq!(docs.len(), na + nb);
        // Both sources interleave within a bucket.
        assert!(order.iter().take_while(|o| o.1 == 0).any(|o| o.0 == 0));
        assert!(order.iter().take_while(|o| o.1 == 0).any(|o| o.0 == 1));
    }
    // Within-bin order is reshuffled per pass.
    assert_ne!(rows.input_ids[..na + nb], rows.input_ids[na + nb..]);
    // The second pass's last bucket is used up, but the pass only turns on the next draw.
    assert_eq!(m.stats().sources[0].epoch, 1);
}

#[test]
fn epochs_restart_with_a_new_shuffle() {
    let src = synth("s", &[8; 20], 0, Weight::Fixed(1.0));
    let mut m = Mixer::new(vec![src], MixConfig::new(8, 9)).unwrap();
    let b = m.next_batch(60, 0, 1).unwrap();
    let firsts: Vec<u32> = b.input_ids.iter().map(|r| r[0]).collect();
    for e in 0..3 {
        let mut ep = firsts[e * 20..(e + 1) * 20].to_vec();
        ep.sort();
        assert_eq!(ep, (0..20).map(|d| d * 1000).collect::<Vec<_>>(), "epoch {e} is a permutation");
    }
    assert_ne!(firsts[..20], firsts[20..40]);
    assert!(m.stats().sources[0].epoch >= 2);
}

fn mixed_sources() -> Vec<TokenizedSource> {
    vec![
        synth("a", &lens(80, 1, 90), 0, Weight::Ramp([1.0, 0.2])),
        synth("b", &lens(30, 2, 20), 1_000_000, Weight::Ramp([0.1, 1.0])),
        synth("c", &lens(50, 3, 300), 2_000_000, Weight::Fixed(0.5)),
    ]
}

#[test]
fn deterministic_and_resumable() {
    for bucketed in [false, true] {
        let mut cfg = MixConfig::new(48, 1234);
        cfg.bucketed = bucketed;
        cfg.bins = 3;
        let total = 30u64;
        let run = |cfg: &MixConfig| {
            let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
            (0..total).map(|s| m.next_batch(5, s, total).unwrap()).collect::<Vec<_>>()
        };
        let full = run(&cfg);
        assert_eq!(full, run(&cfg), "same seed, same batches");
        let mut other = cfg.clone();
        other.seed = 99;
        assert_ne!(full, run(&other));

        let k = 11;
        let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
        for s in 0..k {
            assert_eq!(m.next_batch(5, s, total).unwrap(), full[s as usize]);
        }
        let saved = serde_json::to_string(&m.state()).unwrap();
        drop(m);
        let mut r = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
        r.restore(serde_json::from_str(&saved).unwrap()).unwrap();
        for s in k..total {
            assert_eq!(r.next_batch(5, s, total).unwrap(), full[s as usize], "bucketed={bucketed} step {s}");
        }
        let st = r.stats();
        assert_eq!(st.sources.iter().map(|s| s.rows).sum::<u64>(), 5 * total);
    }
}

#[test]
fn restore_rejects_other_data_or_options() {
    let cfg = MixConfig::new(48, 1);
    let mut m = Mixer::new(mixed_sources(), cfg.clone()).unwrap();
    m.next_batch(3, 0, 10).unwrap();
    let st = m.state();
    let mut other = cfg.clone();
    other.seq_len = 64;
    let mut r = Mixer::new(mixed_sources(), other).unwrap();
    assert!(err_text(r.restore(st.clone())).contains("seq_len 48"));
    let mut fewer = mixed_sources();
    fewer.pop();
    let mut r = Mixer::new(fewer, cfg.clone()).unwrap();
    assert!(err_text(r.restore(st.clone())).contains("3 data sources"));
    let mut changed = mixed_sources();
    changed[1] = synth("b", &lens(31, 2, 20), 1_000_000, Weight::Fixed(1.0));
    let mut r = Mixer::new(changed, cfg).unwrap();
    let e = err_text(r.restore(st));
    assert!(e.contains("#2") && e.contains("same [[data]] files"), "{e}");
}

// ---------------------------------------------------------------- cache and real data

#[test]
fn cache_hit_on_second_run_and_miss_after_change() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for f in ["hsk_zh_en_sample.tsv", "alpaca_sample.json", "text_sample.txt"] {
        std::fs::copy(fixture(f), data.join(f)).unwrap();
    }
    let specs = vec![
        SourceSpec::new(SourceKind::Parallel, "data/hsk_zh_en_sample.tsv"),
        SourceSpec::new(SourceKind::Alpaca, "data/alpaca_sample.json"),
        SourceSpec::new(SourceKind::Text, "data/text_sample.txt"),
    ];
    let cache = d.path().join("cache");
    let first = load_sources(&specs, d.path(), enc(), Some(&cache)).unwrap();
    assert!(first.iter().all(|s| !s.from_cache));
    // Copied out: the test below rewrites the stores in place, under their maps.
    let first_docs: Vec<Docs> = first.iter().map(|s| s.docs.to_docs()).collect();
    let second = load_sources(&specs, d.path(), enc(), Some(&cache)).unwrap();
    assert!(second.iter().all(|s| s.from_cache));
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.docs.to_docs(), b.docs.to_docs());
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3, "no temporary files left");

    // Another EOS id is another key.
    let other = Encoder::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer"), Some(1), 0).unwrap();
    assert!(!load_source(2, &specs[2], d.path(), &other, Some(&cache)).unwrap().from_cache);

    // An edited file (size changes) misses.
    std::fs::write(data.join("text_sample.txt"), "新的文档。\n").unwrap();
    let s = load_source(2, &specs[2], d.path(), enc(), Some(&cache)).unwrap();
    assert!(!s.from_cache);
    assert_eq!(s.docs.len(), 1);

    // A corrupt cache file is a miss and gets rewritten.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let p = entry.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 20] ^= 0xff;
        std::fs::write(&p, b).unwrap();
    }
    let third = load_sources(&specs[..2], d.path(), enc(), Some(&cache)).unwrap();
    assert!(third.iter().all(|s| !s.from_cache));
    assert_eq!(third[0].docs.to_docs(), first_docs[0]);
    assert!(load_sources(&specs[..2], d.path(), enc(), Some(&cache)).unwrap().iter().all(|s| s.from_cache));
}

#[test]
fn real_fixture_data_end_to_end() {
    let dir = fixture("");
    let mut specs = vec![
        SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv").with_weight(Weight::Ramp([0.2, 0.8])),
        SourceSpec::new(SourceKind::Alpaca, "alpaca_sample.json"),
        SourceSpec::new(SourceKind::Alpaca, "multiturn.jsonl"),
        SourceSpec::new(SourceKind::Text, "text_sample.txt"),
        SourceSpec::new(SourceKind::Text, "text_sample.jsonl"),
        SourceSpec::new(SourceKind::Tokenized, "tokenized_sample.jsonl"),
    ];
    specs[0].lang = Some("zh-en".into());
    let sources = load_sources(&specs, &dir, enc(), None).unwrap();
    assert_eq!(sources[0].docs.len(), 90);
    assert_eq!(sources[0].name(), "hsk_zh_en_sample.tsv [zh-en]");
    let mut m = Mixer::new(sources, MixConfig::new(256, 42)).unwrap();
    for step in 0..5 {
        let b = m.next_batch(4, step, 5).unwrap();
        assert!(b.tokens > 0);
        for (ids, labels) in b.input_ids.iter().zip(&b.labels) {
            assert!(ids.len() == 256 && labels.len() == 256);
            for (t, &l) in labels.iter().enumerate() {
                assert!(l == -100 || l == ids[t] as i64);
            }
        }
    }
    let st = m.stats();
    assert!(st.efficiency() > 0.8, "{}", st.summary());
}

// ---------------------------------------------------------------- token store against the old path

/// The documents as training built them before the store: each file read whole, every example
/// encoded, concatenated in file order.
fn whole_file_docs(spec: &SourceSpec, dir: &Path) -> Docs {
    let mut ex = read_examples(spec.kind, spec.template(), &dir.join(&spec.path)).unwrap();
    if let Some(n) = spec.limit {
        ex.truncate(n * if spec.kind == SourceKind::Parallel { 3 } else { 1 });
    }
    let mut d = Docs { offsets: vec![0], ..Default::default() };
    for (_, e) in &ex {
        let (ids, loss) = enc().encode(e).unwrap();
        d.ids.extend(ids);
        d.loss.extend(loss);
        d.offsets.push(d.ids.len());
    }
    d
}

fn fixture_specs() -> Vec<SourceSpec> {
    let mut specs = vec![
        SourceSpec::new(SourceKind::Parallel, "hsk_zh_en_sample.tsv").with_weight(Weight::Ramp([0.2, 0.8])),
        SourceSpec::new(SourceKind::Alpaca, "alpaca_sample.json"),
        SourceSpec::new(SourceKind::Alpaca, "multiturn.jsonl"),
        SourceSpec::new(SourceKind::Text, "text_sample.txt").with_weight(Weight::Fixed(2.0)),
        SourceSpec::new(SourceKind::Text, "text_sample.jsonl"),
        SourceSpec::new(SourceKind::Tokenized, "tokenized_sample.jsonl"),
    ];
    specs[0].limit = Some(20);
    specs
}

#[test]
fn batches_through_the_store_equal_the_whole_file_path() {
    let dir = fixture("");
    let d = tempfile::tempdir().unwrap();
    let stored = load_sources(&fixture_specs(), &dir, enc(), Some(d.path())).unwrap();
    assert!(stored.iter().all(|s| matches!(s.docs, Tokens::Stored(_))));
    let reference: Vec<TokenizedSource> = fixture_specs()
        .into_iter()
        .map(|spec| TokenizedSource { docs: whole_file_docs(&spec, &dir).into(), path: dir.join(&spec.path), spec, from_cache: false })
        .collect();
    for (a, b) in stored.iter().zip(&reference) {
        assert_eq!(a.docs.to_docs(), b.docs.to_docs(), "{}", a.name());
    }
    let mut configs = vec![MixConfig::new(96, 7), MixConfig::new(300, 1)];
    configs[1].bucketed = true;
    configs[1].bins = 3;
    let mut unpacked = MixConfig::new(64, 2);
    unpacked.packing = false;
    configs.push(unpacked);
    for cfg in configs {
        let mut new = Mixer::new(stored.clone(), cfg.clone()).unwrap();
        let mut old = Mixer::new(reference.clone(), cfg.clone()).unwrap();
        for step in 0..40 {
            assert_eq!(new.next_batch(3, step, 40).unwrap(), old.next_batch(3, step, 40).unwrap(), "{cfg:?} step {step}");
        }
        // Resume over the store continues exactly where the in-memory mixer goes on.
        let mut resumed = Mixer::new(stored.clone(), cfg.clone()).unwrap();
        resumed.restore(old.state()).unwrap();
        for step in 40..50 {
            assert_eq!(resumed.next_batch(3, step, 50).unwrap(), old.next_batch(3, step, 50).unwrap(), "{cfg:?} resumed step {step}");
        }
    }
}

#[test]
fn streaming_in_any_piece_size_reads_the_same_records() {
    let dir = fixture("");
    for spec in fixture_specs() {
        let path = dir.join(&spec.path);
        let whole = read_examples(spec.kind, spec.template(), &path).unwrap();
        for chunk in [1, 7, 100, 1 << 20] {
            let mut got = Vec::new();
            let mut bytes = 0;
            crate::data::sources::stream_examples(spec.kind, spec.template(), &path, chunk, |ex, n| {
                got.extend(ex);
                bytes += n;
                Ok(())
            })
            .unwrap();
            assert_eq!(got, whole, "{} in pieces of {chunk}", spec.path.display());
            assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        }
    }
}

#[test]
fn a_malformed_record_deep_in_a_streamed_file_names_its_line() {
    let d = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..500 {
        text.push_str(&format!("{{\"text\": \"document {i}\"}}\n"));
    }
    text.push_str("{\"text\": oops}\n");
    let p = write(d.path(), "big.jsonl", &text);
    let e = err_text(crate::data::sources::stream_examples(SourceKind::Text, Template::Alpaca, &p, 64, |_, _| Ok(())));
    assert!(e.contains("big.jsonl:501: malformed record"), "{e}");
    let mut bad = text.replace("{\"text\": oops}\n", "").into_bytes();
    bad.extend_from_slice(b"{\"text\": \"\xff\"}\n");
    std::fs::write(&p, &bad).unwrap();
    let store = d.path().join("s");
    let e = err_text(load_source(0, &SourceSpec::new(SourceKind::Text, &p), d.path(), enc(), Some(&store)));
    assert!(e.contains("big.jsonl:501: not valid UTF-8"), "{e}");
    // The failed source leaves no store, not even a partial one under another name.
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
}

#[test]
fn text_blocks_are_cut_only_at_blank_lines() {
    use crate::data::sources::cut_point;
    assert_eq!(cut_point(true, b"a\nb\n\nc\nd"), Some(5));
    assert_eq!(cut_point(true, b"a\n \t\r\nc\n"), Some(6));
    assert_eq!(cut_point(true, b"a\nb\nc\n"), None);
    assert_eq!(cut_point(true, b"\nabc"), Some(1));
    assert_eq!(cut_point(false, b"a\nb"), Some(2));
    assert_eq!(cut_point(false, b"ab"), None);
}

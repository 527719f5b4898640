//! Unit tests of the data layer: [`sources`] (formats, templates, tokenization, errors) and
//! [`pack_mix`] (packing, mixing, the cache and the real fixture data), with the helpers both use.

mod pack_mix;
mod sources;

use super::*;
use crate::template::{render, Template, Turn, ALPACA_PREFIX, ALPACA_SUFFIX};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn enc() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json");
        Encoder::from_file(&p, Some(1), 2).expect("llama2 tokenizer fixture")
    })
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A synthetic source: document d has ids `base + 1000·d + k` (unique), BOS-like first token
/// without loss, loss on the rest.
fn synth(name: &str, lens: &[usize], base: u32, weight: Weight) -> TokenizedSource {
    let mut docs = Docs { ids: vec![], loss: vec![], offsets: vec![0] };
    for (d, &n) in lens.iter().enumerate() {
        for k in 0..n {
            docs.ids.push(base + 1000 * d as u32 + k as u32);
            docs.loss.push(k > 0);
        }
        docs.offsets.push(docs.ids.len());
    }
    let spec = SourceSpec { name: Some(name.into()), ..SourceSpec::new(SourceKind::Text, name).with_weight(weight) };
    TokenizedSource { spec, path: PathBuf::from(name), docs: docs.into(), from_cache: false }
}

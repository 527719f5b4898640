//! Per-source loss for metrics.jsonl: every batch row comes from one `[[data]]` source, so a
//! step's loss splits by source from the per-row NLL sums of [`super::step::StepOutput`]. One
//! raw loss over a mix of sources jumps with the mix; the per-source series show the trend.

use crate::data::SourceSpec;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// The name of each `[[data]]` source in metrics.jsonl and the plots: its `name`, else
/// `lang:stem` (`zh:wiki`), else the file stem. Later duplicates get `#2`, `#3`, … so that every
/// name is a distinct key.
pub fn source_labels(specs: &[SourceSpec]) -> Vec<String> {
    let mut seen = HashSet::new();
    specs
        .iter()
        .map(|s| {
            let stem = s.path.file_stem().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| s.path.display().to_string());
            let base = match (&s.name, &s.lang) {
                (Some(n), _) => n.clone(),
                (None, Some(l)) => format!("{l}:{stem}"),
                (None, None) => stem,
            };
            let mut name = base.clone();
            let mut k = 1;
            while !seen.insert(name.clone()) {
                k += 1;
                name = format!("{base}#{k}");
            }
            name
        })
        .collect()
}

/// `loss_by_source` (mean NLL over each source's loss tokens in the step) and
/// `tokens_by_source`, for the sources that had loss tokens in the step. `source_of_row`,
/// `row_nll` and `row_tokens` are in the same row order (micro-batches concatenated).
pub fn by_source(names: &[String], source_of_row: &[usize], row_nll: &[f64], row_tokens: &[usize]) -> (Map<String, Value>, Map<String, Value>) {
    let mut nll = vec![0f64; names.len()];
    let mut tok = vec![0usize; names.len()];
    for ((&s, &n), &t) in source_of_row.iter().zip(row_nll).zip(row_tokens) {
        nll[s] += n;
        tok[s] += t;
    }
    let (mut loss, mut tokens) = (Map::new(), Map::new());
    for (i, name) in names.iter().enumerate() {
        if tok[i] > 0 {
            // A non-finite mean (overflowing forward pass) becomes null, as `loss` does.
            loss.insert(name.clone(), serde_json::json!(nll[i] / tok[i] as f64));
            tokens.insert(name.clone(), serde_json::json!(tok[i]));
        }
    }
    (loss, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SourceKind;

    #[test]
    fn names_prefer_name_then_lang_and_stem_and_are_unique() {
        let mut a = SourceSpec::new(SourceKind::Text, "data/wiki.txt");
        a.lang = Some("zh".into());
        let b = SourceSpec::new(SourceKind::Parallel, "pairs.tsv");
        let mut c = SourceSpec::new(SourceKind::Alpaca, "x/alpaca.json");
        c.name = Some("指令".into());
        let mut d = SourceSpec::new(SourceKind::Text, "other/wiki.txt");
        d.lang = Some("zh".into());
        let e = SourceSpec::new(SourceKind::Text, "more/pairs.txt");
        assert_eq!(source_labels(&[a, b, c, d, e]), ["zh:wiki", "pairs", "指令", "zh:wiki#2", "pairs#2"]);
    }

    #[test]
    fn by_source_sums_rows_of_each_source() {
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let (loss, tokens) = by_source(&names, &[1, 0, 1, 0], &[6.0, 2.0, 3.0, 4.0], &[3, 1, 3, 2]);
        assert_eq!(loss["a"].as_f64().unwrap(), 2.0);
        assert_eq!(loss["b"].as_f64().unwrap(), 1.5);
        assert!(!loss.contains_key("c") && !tokens.contains_key("c"));
        assert_eq!((tokens["a"].as_u64(), tokens["b"].as_u64()), (Some(3), Some(6)));
    }
}

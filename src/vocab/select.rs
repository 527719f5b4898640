//! Choosing which characters and words to add.

use super::{is_cjk, is_han};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How to choose new pieces from text statistics (see the module docs for the rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectConfig {
    /// Text files (UTF-8, any layout) to count frequencies in. Empty: use the word list's
    /// frequency column instead.
    pub corpus: Vec<PathBuf>,
    /// Word list, one entry per line: `word [freq [anything]]` separated by whitespace (jieba's
    /// `dict.txt` works as is). A missing frequency counts as 1. Required when `max_words > 0`.
    pub wordlist: Option<PathBuf>,
    /// How many new characters to add at most (Linly: ~8,000).
    pub max_chars: usize,
    /// How many new words to add at most (Linly: ~20,000), plus whatever of `max_chars` the
    /// characters leave unused.
    pub max_words: usize,
    /// Characters and words seen fewer times are not added.
    pub min_freq: u64,
    /// Longest word, in characters, worth a token. Longer words are rare in running text and
    /// need intermediate pieces; 4 covers idioms (成语).
    pub max_word_chars: usize,
    /// SentencePiece-style tokenizers only (ignored otherwise): also add `▁`+piece for this many
    /// of the most frequent characters/words that start a text. The normalizer prepends `▁` to
    /// every text and Chinese has no spaces, so without these each sentence pays one extra token
    /// for a lone `▁`. Frequencies: how often the piece opens a line or follows whitespace in the
    /// corpus; without a corpus, the word list's own frequency for the entry (for a single
    /// character, its frequency as a one-character word). Their merges come after all others, so
    /// they never change how the Chinese itself is segmented.
    pub max_prefixed: usize,
    /// Corpus mode: also make candidates of adjacent segments (words or characters after the
    /// word list's segmentation) that together stay within `max_word_chars`, counted as often
    /// as they stand side by side: `我的`, `了一`, `的人`. A dictionary lists words, not these
    /// grammatical pairs, yet they are among the most frequent units of running Chinese; a
    /// corpus-trained SentencePiece (Chinese-LLaMA's route) learns them too.
    pub pairs: bool,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig { corpus: Vec::new(), wordlist: None, max_chars: 8_000, max_words: 20_000, min_freq: 1, max_word_chars: 4, max_prefixed: 0, pairs: true }
    }
}

/// Reads a UTF-8 text file whole; a decoding error names the line.
fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{}:{line}: not UTF-8 text; the {what} must be UTF-8", path.display())
    })
}

/// Parses a `word [freq ...]` list, keeping the highest frequency of a repeated word. Borrows
/// from `text`: jieba's dict has 349k lines, and owning each word tripled selection time.
fn parse_wordlist<'t>(text: &'t str, path: &Path) -> Result<Vec<(&'t str, u64)>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut words: Vec<(&str, u64)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(word) = fields.next() else { continue };
        let freq = match fields.next() {
            Some(f) => f.parse::<u64>().with_context(|| {
                format!("{}:{}: frequency {f:?} is not a whole number; expected `word freq [tag]`", path.display(), n + 1)
            })?,
            None => 1,
        };
        match seen.get(word) {
            Some(&i) => words[i].1 = words[i].1.max(freq),
            None => {
                seen.insert(word, words.len());
                words.push((word, freq));
            }
        }
    }
    Ok(words)
}

type Counts<'t> = (HashMap<char, u64>, Vec<(Cow<'t, str>, u64)>, Vec<(Cow<'t, str>, u64)>);

/// Character counts, forward-maximum-matching word counts, and counts of the segment (word or
/// character) that opens a line or follows whitespace.
fn count_corpus(files: &[PathBuf], dict: &HashSet<&str>, max_len: usize, pairs: bool) -> Result<Counts<'static>> {
    let mut chars: HashMap<char, u64> = HashMap::new();
    let mut words: HashMap<String, u64> = HashMap::new();
    let mut initial: HashMap<String, u64> = HashMap::new();
    let mut buf: Vec<char> = Vec::new();
    let mut key = String::new();
    for path in files {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open corpus file {}", path.display()))?;
        // Line by line: a corpus may not fit in memory.
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}: not UTF-8 text", path.display(), n + 1))?;
            buf.clear();
            buf.extend(line.chars());
            for &c in &buf {
                if is_cjk(c) {
                    *chars.entry(c).or_default() += 1;
                }
            }
            let mut i = 0;
            // The Han segment just before `i` (start, length), for pair candidates.
            let mut prev: Option<(usize, usize)> = None;
            while i < buf.len() {
                let mut step = 1;
                let starts_text = i == 0 || buf[i - 1].is_whitespace();
                if is_han(buf[i]) && !dict.is_empty() {
                    let mut run = i;
                    while run < buf.len() && run - i < max_len && is_han(buf[run]) {
                        run += 1;
                    }
                    for len in (2..=run - i).rev() {
                        key.clear();
                        key.extend(&buf[i..i + len]);
                        if dict.contains(key.as_str()) {
                            *words.entry(key.clone()).or_default() += 1;
                            step = len;
                            break;
                        }
                    }
                }
                if starts_text && is_han(buf[i]) {
                    *initial.entry(buf[i..i + step].iter().collect()).or_default() += 1;
                }
                if is_han(buf[i]) {
                    if let Some((p, _)) = prev.filter(|&(_, plen)| pairs && plen + step <= max_len) {
                        key.clear();
                        key.extend(&buf[p..i + step]);
                        if !dict.contains(key.as_str()) {
                            *words.entry(key.clone()).or_default() += 1;
                        }
                    }
                    prev = Some((i, step));
                } else {
                    prev = None;
                }
                i += step;
            }
        }
    }
    let owned = |m: HashMap<String, u64>| m.into_iter().map(|(w, f)| (Cow::Owned(w), f)).collect();
    Ok((chars, owned(words), owned(initial)))
}

/// Most frequent first, then by text so the order is reproducible.
fn rank<K: Ord + Clone>(counts: impl IntoIterator<Item = (K, u64)>, min_freq: u64) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = counts.into_iter().filter(|(_, f)| *f >= min_freq.max(1)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Chooses characters, then words, then (if `metaspace`) space-prefixed pieces, written with a
/// leading space (`" 他"`) since pieces are text. `is_token(text)` says whether the old tokenizer
/// already has `text` as one vocab entry.
pub(crate) fn select_pieces(cfg: &SelectConfig, is_token: &dyn Fn(&str) -> bool, metaspace: bool) -> Result<Vec<String>> {
    if cfg.max_words > 0 && cfg.wordlist.is_none() {
        bail!("choosing words needs a word list (e.g. jieba's dict.txt); pass one, or set the word count to 0 to add characters only");
    }
    if cfg.corpus.is_empty() && cfg.wordlist.is_none() {
        bail!("nothing to choose pieces from: give corpus files and/or a word list with frequencies");
    }
    let max_word_chars = cfg.max_word_chars.max(2);
    let wordlist_text = match &cfg.wordlist {
        Some(p) => read_text(p, "word list")?,
        None => String::new(),
    };
    let wordlist = parse_wordlist(&wordlist_text, cfg.wordlist.as_deref().unwrap_or(Path::new("")))?;
    let is_word = |w: &str| {
        let n = w.chars().count();
        (2..=max_word_chars).contains(&n) && w.chars().all(is_han)
    };

    let (char_freq, word_freq, initial_freq): Counts = if cfg.corpus.is_empty() {
        let mut chars: HashMap<char, u64> = HashMap::new();
        for (w, f) in &wordlist {
            if w.chars().all(is_han) {
                for c in w.chars() {
                    *chars.entry(c).or_default() += f;
                }
            }
        }
        let words = wordlist.iter().filter(|(w, _)| is_word(w)).map(|&(w, f)| (Cow::Borrowed(w), f)).collect();
        let initial = wordlist
            .iter()
            .filter(|(w, _)| w.chars().count() <= max_word_chars && w.chars().all(is_han))
            .map(|&(w, f)| (Cow::Borrowed(w), f))
            .collect();
        (chars, words, initial)
    } else {
        let dict: HashSet<&str> = wordlist.iter().map(|&(w, _)| w).filter(|w| is_word(w)).collect();
        count_corpus(&cfg.corpus, &dict, max_word_chars, cfg.pairs)?
    };

    let mut buf = [0u8; 4];
    let mut chosen_chars: HashSet<char> = HashSet::new();
    let mut out = Vec::new();
    for (c, _) in rank(char_freq, cfg.min_freq) {
        if chosen_chars.len() >= cfg.max_chars {
            break;
        }
        if is_cjk(c) && !is_token(c.encode_utf8(&mut buf)) {
            chosen_chars.insert(c);
            out.push(c.to_string());
        }
    }
    // Characters rarely fill their share (a corpus holds only so many distinct ones); what they
    // leave goes to words, so `max_chars + max_words` pieces are asked for whenever there are
    // candidates.
    let max_words = cfg.max_words + cfg.max_chars.saturating_sub(chosen_chars.len());
    let mut n_words = 0;
    let mut chosen_words: HashSet<String> = HashSet::new();
    for (w, _) in rank(word_freq, cfg.min_freq) {
        if n_words >= max_words {
            break;
        }
        let chars_ok = w.chars().all(|c| chosen_chars.contains(&c) || is_token(c.encode_utf8(&mut buf)));
        if chars_ok && is_word(&w) && !is_token(&w) {
            chosen_words.insert(w.to_string());
            out.push(w.into_owned());
            n_words += 1;
        }
    }
    if metaspace {
        let mut n_prefixed = 0;
        for (w, _) in rank(initial_freq, cfg.min_freq) {
            if n_prefixed >= cfg.max_prefixed {
                break;
            }
            let prefixed = format!(" {w}");
            let single = w.chars().count() == 1 && chosen_chars.contains(&w.chars().next().unwrap_or_default());
            if (single || chosen_words.contains(w.as_ref()) || is_token(&w)) && !is_token(&prefixed) {
                out.push(prefixed);
                n_prefixed += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_frequent_new_chars_then_words() {
        let dir = tempfile::tempdir().unwrap();
        let wl = dir.path().join("dict.txt");
        std::fs::write(&wl, "中国 100 ns\n国家 50 n\n我们 80 r\n我 500 r\nAT&T 3 nz\n中华人民共和国 9 ns\n").unwrap();
        let known = |s: &str| s == "我";
        let cfg = SelectConfig { wordlist: Some(wl.clone()), max_chars: 3, max_words: 10, ..Default::default() };
        let got = select_pieces(&cfg, &known, false).unwrap();
        // 国 150 > 中 100 > 们 80 > 家 50: 家 is cut by max_chars, so 国家 cannot be built.
        assert_eq!(got, vec!["国", "中", "们", "中国", "我们"]);

        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, "我们国家，我们中国。国家 我们\n").unwrap();
        let cfg = SelectConfig { corpus: vec![corpus], wordlist: Some(wl.clone()), max_chars: 10, max_words: 10, min_freq: 2, ..Default::default() };
        let got = select_pieces(&cfg, &known, false).unwrap();
        assert_eq!(got, vec!["们", "国", "家", "我们", "国家"]);
        // Only 我们 opens a text twice (line start, after the space).
        let cfg = SelectConfig { max_prefixed: 5, ..cfg };
        let got = select_pieces(&cfg, &known, true).unwrap();
        assert_eq!(got, vec!["们", "国", "家", "我们", "国家", " 我们"]);
        // Without a corpus the word list's frequencies rank the candidates; 家 was not chosen.
        let cfg = SelectConfig { wordlist: Some(wl.clone()), max_chars: 3, max_words: 10, max_prefixed: 3, ..Default::default() };
        let got = select_pieces(&cfg, &known, true).unwrap();
        assert_eq!(&got[5..], [" 我", " 中国", " 我们"]);

        // Pairs: 我的 stands side by side 3 times (twice in 我的国家, once at a line start);
        // 的国家 is 3 characters, over max_word_chars = 2, and 国家 is already a dict word.
        let corpus2 = dir.path().join("c2.txt");
        std::fs::write(&corpus2, "我的国家，我的国家。\n我的\n").unwrap();
        let pairs_cfg = |pairs| SelectConfig { corpus: vec![corpus2.clone()], wordlist: Some(wl.clone()), max_chars: 10, max_words: 10, min_freq: 1, max_word_chars: 2, pairs, ..Default::default() };
        assert_eq!(select_pieces(&pairs_cfg(false), &known, false).unwrap(), vec!["的", "国", "家", "。", "，", "国家"]);
        assert_eq!(select_pieces(&pairs_cfg(true), &known, false).unwrap(), vec!["的", "国", "家", "。", "，", "我的", "国家"]);

        let cfg = SelectConfig { wordlist: None, corpus: vec![], ..Default::default() };
        assert!(select_pieces(&cfg, &known, false).is_err());
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "中国 many\n").unwrap();
        let cfg = SelectConfig { wordlist: Some(bad), ..Default::default() };
        let err = select_pieces(&cfg, &known, false).unwrap_err();
        assert!(format!("{err:#}").contains("bad.txt:1"), "{err:#}");
    }
}

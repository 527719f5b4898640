//! Which documents of a training text to train on, so that a short run shows as many of the
//! extension's new pieces as it can.
//!
//! A CPU run reads ~100k tokens, and a random draw of them shows most new pieces fewer than
//! five times: the rarely shown pieces carry much of what the extended model loses against the
//! base (BENCHMARKS.md, "Where the gap sits, piece by piece"). [`cover`] picks documents
//! greedily by how many occurrences of pieces not yet shown `min_count` times they hold per
//! token, up to a token budget. A piece's value only falls as the chosen documents show it, so
//! a document's gain is recomputed only when it reaches the top of the heap (lazy greedy) and
//! the choice is the plain greedy one.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One candidate document: the new pieces it holds (ids ≥ the old vocabulary, in text order,
/// repeats included) and its length in tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoverDoc {
    pub new_ids: Vec<u32>,
    pub tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoverConfig {
    /// Stop once the chosen documents hold this many tokens.
    pub tokens: usize,
    /// A piece stops counting once the chosen documents show it this many times.
    pub min_count: usize,
}

/// The chosen documents' indices, in file order; `counts[i]` is how often they show new piece
/// `i` (id `old_vocab + i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cover {
    pub chosen: Vec<usize>,
    pub tokens: usize,
    pub counts: Vec<u32>,
}

/// A heap entry: gain per token, ties to the earlier document (so the choice is deterministic).
#[derive(PartialEq)]
struct Entry(f64, usize);

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then_with(|| other.1.cmp(&self.1))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn gain(doc: &CoverDoc, counts: &[u32], old_vocab: u32, min_count: usize) -> f64 {
    let useful = doc.new_ids.iter().filter(|&&id| (counts[(id - old_vocab) as usize] as usize) < min_count).count();
    useful as f64 / doc.tokens.max(1) as f64
}

/// Greedy cover of the new pieces (see the module doc). Documents without new pieces are never
/// chosen; the budget may be left unfilled when no document adds anything.
///
/// Panics if an id is below `old_vocab` or at or above `old_vocab + n_new` (the caller filters
/// ids to the new pieces).
pub fn cover(docs: &[CoverDoc], old_vocab: u32, n_new: usize, cfg: &CoverConfig) -> Cover {
    let mut counts = vec![0u32; n_new];
    let mut heap: BinaryHeap<Entry> = docs.iter().enumerate().map(|(i, d)| Entry(gain(d, &counts, old_vocab, cfg.min_count), i)).collect();
    let (mut chosen, mut tokens) = (Vec::new(), 0usize);
    while tokens < cfg.tokens {
        let Some(Entry(stale, i)) = heap.pop() else { break };
        if stale <= 0.0 {
            break;
        }
        let now = gain(&docs[i], &counts, old_vocab, cfg.min_count);
        if heap.peek().is_some_and(|top| Entry(now, i) < *top) {
            heap.push(Entry(now, i));
            continue;
        }
        if now <= 0.0 {
            break;
        }
        for &id in &docs[i].new_ids {
            counts[(id - old_vocab) as usize] += 1;
        }
        chosen.push(i);
        tokens += docs[i].tokens;
    }
    chosen.sort_unstable();
    Cover { chosen, tokens, counts }
}

/// How often the documents `chosen` show each new piece (as [`Cover::counts`]).
pub fn counts(docs: &[CoverDoc], chosen: &[usize], old_vocab: u32, n_new: usize) -> Vec<u32> {
    let mut counts = vec![0u32; n_new];
    for &i in chosen {
        docs[i].new_ids.iter().for_each(|&id| counts[(id - old_vocab) as usize] += 1);
    }
    counts
}

/// How many new pieces `counts` shows at all, and how many at least `min_count` times.
pub fn shown(counts: &[u32], min_count: usize) -> (usize, usize) {
    (counts.iter().filter(|&&c| c > 0).count(), counts.iter().filter(|&&c| c as usize >= min_count).count())
}

/// Documents in a seeded random order until they hold `tokens` tokens: what a run that reads
/// the text as it comes would see, to compare a [`cover`] with.
pub fn random_draw(docs: &[CoverDoc], tokens: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..docs.len()).collect();
    crate::rng::SplitMix::new(seed).shuffle(&mut order);
    let mut used = 0;
    let mut out: Vec<usize> = order
        .into_iter()
        .take_while(|&i| {
            let before = used;
            used += docs[i].tokens;
            before < tokens
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(ids: &[u32], tokens: usize) -> CoverDoc {
        CoverDoc { new_ids: ids.to_vec(), tokens }
    }

    #[test]
    fn picks_the_document_with_the_most_unseen_pieces_per_token_first() {
        // Old vocabulary 100; new pieces 100..104.
        let docs = [doc(&[100, 100, 100], 10), doc(&[101, 102, 103], 6), doc(&[], 2), doc(&[100, 101], 20)];
        let c = cover(&docs, 100, 4, &CoverConfig { tokens: 6, min_count: 5 });
        assert_eq!(c.chosen, vec![1]);
        assert_eq!((c.tokens, c.counts.clone()), (6, vec![0, 1, 1, 1]));
        // With room for more, the next is document 0 (0.3 per token against 0.1), never the one
        // without new pieces.
        let c = cover(&docs, 100, 4, &CoverConfig { tokens: 30, min_count: 5 });
        assert_eq!(c.chosen, vec![0, 1, 3]);
        assert_eq!(c.counts, vec![4, 2, 1, 1]);
        assert_eq!(shown(&c.counts, 2), (4, 2));
        assert_eq!(shown(&[0, 3, 5], 5), (2, 1));
    }

    #[test]
    fn a_piece_shown_min_count_times_stops_counting() {
        // Document 0 shows piece 100 twice; with min_count 2, document 1 (only 100) adds nothing
        // after it and document 2 (piece 101) is taken although it is less dense.
        let docs = [doc(&[100, 100], 2), doc(&[100, 100, 100], 3), doc(&[101], 4)];
        let c = cover(&docs, 100, 2, &CoverConfig { tokens: 100, min_count: 2 });
        assert_eq!(c.chosen, vec![0, 2]);
        assert_eq!(c.tokens, 6);
    }

    #[test]
    fn lazy_choice_equals_recomputing_every_gain() {
        // Plain greedy, recomputing every document's gain at every pick, on a pseudo-random set.
        let mut rng = crate::rng::SplitMix::new(7);
        let mut next = || rng.next_u64() as usize;
        let docs: Vec<CoverDoc> = (0..200).map(|_| doc(&(0..1 + next() % 12).map(|_| 1000 + (next() % 40) as u32).collect::<Vec<_>>(), 5 + next() % 30)).collect();
        let cfg = CoverConfig { tokens: 900, min_count: 3 };
        let lazy = cover(&docs, 1000, 40, &cfg);
        let mut counts = vec![0u32; 40];
        let (mut left, mut chosen, mut tokens): (Vec<usize>, Vec<usize>, usize) = ((0..docs.len()).collect(), vec![], 0);
        while tokens < cfg.tokens {
            let best = left.iter().copied().max_by(|&a, &b| Entry(gain(&docs[a], &counts, 1000, 3), a).cmp(&Entry(gain(&docs[b], &counts, 1000, 3), b)));
            let Some(b) = best.filter(|&b| gain(&docs[b], &counts, 1000, 3) > 0.0) else { break };
            docs[b].new_ids.iter().for_each(|&id| counts[(id - 1000) as usize] += 1);
            left.retain(|&x| x != b);
            chosen.push(b);
            tokens += docs[b].tokens;
        }
        chosen.sort_unstable();
        assert_eq!(lazy.chosen, chosen);
        assert_eq!(lazy.counts, counts);
        assert_eq!(super::counts(&docs, &lazy.chosen, 1000, 40), lazy.counts);
    }

    #[test]
    fn a_random_draw_fills_the_budget_and_depends_on_its_seed_only() {
        let docs: Vec<CoverDoc> = (0..50).map(|i| doc(&[100 + i % 3], 10)).collect();
        let a = random_draw(&docs, 95, 3);
        assert_eq!(a.len(), 10, "nine documents hold 90 tokens, the tenth reaches the budget");
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, random_draw(&docs, 95, 3));
        assert_ne!(a, random_draw(&docs, 95, 4));
        assert_eq!(random_draw(&docs, 10_000, 3).len(), 50);
    }

    #[test]
    fn stops_when_nothing_adds_and_on_an_empty_input() {
        let docs = [doc(&[100], 1), doc(&[100], 1)];
        let c = cover(&docs, 100, 1, &CoverConfig { tokens: 1000, min_count: 1 });
        assert_eq!((c.chosen, c.tokens), (vec![0], 1));
        let c = cover(&[], 100, 1, &CoverConfig { tokens: 60_000, min_count: 5 });
        assert!(c.chosen.is_empty());
    }
}

//! The base model's own probability of every token of the extended vocabulary, as a soft
//! target for the new head rows.
//!
//! A new piece spells a sequence of old tokens (its *expansion*). Reading a text, the base
//! gives the probability of the next old token; the probability of the next piece is the chain
//! of its expansion's conditional probabilities. The extended tokenizer emits the longest token
//! whose expansion the text continues with, so the mass of an expansion that goes on into a
//! longer token belongs to the longer token, and what is left at a token is its own: the mass
//! the base gave to a piece's first sub-token moves onto the pieces that extend it.
//!
//! The expansions form a trie whose roots are old tokens. At each position the first level comes
//! from the base's distribution over the next old token (every root, exactly). Deeper levels are
//! exact along the path the text really takes (the base read those sub-tokens, so its
//! distribution over the next one is known) and elsewhere estimated from counts of the
//! expansions in the fitting text. Every new row then gets a target at every position, not only
//! the rows that happen to be the next label, which is what keeps a fit on a few thousand
//! positions from memorising them.

use super::VocabExtension;
use rayon::prelude::*;

/// How many levels below a root the path's conditionals are taken from the base (deeper ones
/// come from counts). Four old tokens cover a CJK character of three bytes and one more.
pub const EXACT_DEPTH: usize = 4;

#[derive(Debug, Clone)]
struct Node {
    /// The old token on the edge into this node.
    old: u32,
    /// The extended-vocabulary id emitted for this expansion, if one is.
    token: Option<u32>,
    children: Vec<usize>,
    /// Occurrences of this expansion in the counted text.
    count: f64,
    /// P(this node | parent) from the counts, smoothed.
    cond: f32,
}

/// The expansions of the new pieces as a trie over old tokens.
#[derive(Debug, Clone)]
pub struct Trie {
    nodes: Vec<Node>,
    /// Roots that have descendants: these are the only old tokens whose mass moves.
    pub roots: Vec<usize>,
    /// `root_of[old token]`: the root node, for old tokens that start an expansion.
    root_of: std::collections::HashMap<u32, usize>,
    old_vocab: usize,
    n_new: usize,
    /// New pieces that got a node of their own (a piece whose expansion is one old token, or
    /// equals another piece's, shares a node and gets no target).
    pub owns_node: Vec<bool>,
    /// The walk of [`Trie::targets`] laid out flat, made on first use after the conditionals
    /// are set ([`Trie::count`] clears it).
    flat: std::sync::OnceLock<Walk>,
}

/// [`Trie::targets`]'s depth-first walk as arrays in the order it visits the nodes. The walk
/// with an explicit stack pops a node, pushes its children in order, and so visits every
/// subtree as one contiguous run (the last child's first). Laid out in that order, with each
/// node's children side by side, the walk is one pass over arrays: no stack, no pointer to
/// follow per child, and a pruned child (zero mass) skips its run. The floating-point
/// operations and their order are the stack walk's, so the targets are the same bits.
#[derive(Debug, Clone, Default)]
struct Walk {
    /// Per root of [`Trie::roots`]: its run `runs[k]..runs[k + 1]` of visit positions.
    runs: Vec<usize>,
    /// Per visit position: where its subtree's run ends, the token its leftover mass goes to
    /// (its own, else its nearest ancestor's), and its children `kids[i]..kids[i + 1]`.
    end: Vec<usize>,
    anc: Vec<u32>,
    kids: Vec<usize>,
    /// Per child entry: the child's node (for the exact conditionals), its counted
    /// conditional, and its visit position.
    kid_node: Vec<u32>,
    kid_cond: Vec<f32>,
    kid_pos: Vec<usize>,
}

impl Trie {
    pub fn new(ext: &VocabExtension) -> Self {
        let mut t = Trie { nodes: Vec::new(), roots: Vec::new(), root_of: Default::default(), old_vocab: ext.old_vocab, n_new: ext.added(), owns_node: vec![false; ext.added()], flat: Default::default() };
        for (k, subs) in ext.subtokens.iter().enumerate() {
            let Some((&first, rest)) = subs.split_first() else { continue };
            let mut n = match t.root_of.get(&first) {
                Some(&r) => r,
                None => {
                    t.nodes.push(Node { old: first, token: Some(first), children: Vec::new(), count: 0.0, cond: 1.0 });
                    let r = t.nodes.len() - 1;
                    t.root_of.insert(first, r);
                    r
                }
            };
            for &s in rest {
                n = match t.nodes[n].children.iter().copied().find(|&c| t.nodes[c].old == s) {
                    Some(c) => c,
                    None => {
                        t.nodes.push(Node { old: s, token: None, children: Vec::new(), count: 0.0, cond: 0.0 });
                        let c = t.nodes.len() - 1;
                        t.nodes[n].children.push(c);
                        c
                    }
                };
            }
            if t.nodes[n].token.is_none() {
                t.nodes[n].token = Some((ext.old_vocab + k) as u32);
                t.owns_node[k] = true;
            }
        }
        t.roots = t.root_of.values().copied().filter(|&r| !t.nodes[r].children.is_empty()).collect();
        t.roots.sort_unstable();
        t
    }

    pub fn n_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Counts every expansion's occurrences in old-token sequences and sets the smoothed
    /// conditionals `(count(child) + a) / (count(node) + a·children + 1)`: never above the
    /// observed share, and a node the text never reaches splits a little mass evenly.
    pub fn count(&mut self, seqs: &[&[u32]]) {
        for seq in seqs {
            for p in 0..seq.len() {
                let Some(&r) = self.root_of.get(&seq[p]) else { continue };
                let mut n = r;
                self.nodes[n].count += 1.0;
                for &s in &seq[p + 1..] {
                    match self.nodes[n].children.iter().copied().find(|&c| self.nodes[c].old == s) {
                        Some(c) => {
                            self.nodes[c].count += 1.0;
                            n = c;
                        }
                        None => break,
                    }
                }
            }
        }
        const A: f64 = 0.1;
        self.flat = Default::default();
        for i in 0..self.nodes.len() {
            let (parent_count, nch) = (self.nodes[i].count, self.nodes[i].children.len());
            for j in 0..nch {
                let c = self.nodes[i].children[j];
                self.nodes[c].cond = ((self.nodes[c].count + A) / (parent_count + A * nch as f64 + 1.0)) as f32;
            }
        }
    }

    /// The node reached from old token `first` through `rest`, if the trie has it.
    pub fn walk(&self, first: u32, rest: &[u32]) -> Option<usize> {
        let mut n = *self.root_of.get(&first)?;
        for &s in rest {
            n = self.nodes[n].children.iter().copied().find(|&c| self.nodes[c].old == s)?;
        }
        Some(n)
    }

    pub fn children_old(&self, n: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.nodes[n].children.iter().map(move |&c| (c, self.nodes[c].old))
    }

    /// The old token of each root in [`Trie::roots`].
    pub fn root_tokens(&self) -> Vec<u32> {
        self.roots.iter().map(|&r| self.nodes[r].old).collect()
    }

    /// The target mass of every new piece at one position, into `out` (`n_new` values), and
    /// what stays on each root's old token into `roots_out` (`roots.len()` values) when given.
    /// `p1[k]` is the base's probability of root `roots[k]`'s old token; `exact` holds the base's
    /// conditional for nodes on the path (NaN elsewhere).
    pub fn targets(&self, p1: &[f32], exact: &[f32], out: &mut [f32], roots_out: Option<&mut [f32]>) {
        self.targets_with(p1, exact, out, roots_out, &mut Vec::new());
    }

    /// The targets by the reference walk: a depth-first walk with an explicit stack, each
    /// node's reach probability split among its children and what is left going to its
    /// nearest token. [`Trie::targets_with`] does the same operations in the same order over
    /// [`Walk`]'s arrays; the tests hold the two to the same bits.
    #[cfg(test)]
    fn targets_by_stack(&self, p1: &[f32], exact: &[f32], out: &mut [f32], mut roots_out: Option<&mut [f32]>) {
        out.fill(0.0);
        if let Some(r) = roots_out.as_deref_mut() {
            r.fill(0.0);
        }
        let old = self.old_vocab as u32;
        // (node, reach probability, nearest token ancestor). Below a root the only old token
        // is the root itself.
        let mut stack = Vec::new();
        for (k, &r) in self.roots.iter().enumerate() {
            if p1[k] <= 0.0 {
                continue;
            }
            stack.push((r, p1[k], self.nodes[r].old));
            while let Some((n, p, anc)) = stack.pop() {
                let node = &self.nodes[n];
                let anc = node.token.unwrap_or(anc);
                let mut left = p;
                for &c in &node.children {
                    let e = exact[c];
                    let pc = p * if e.is_nan() { self.nodes[c].cond } else { e };
                    left -= pc;
                    if pc > 0.0 {
                        stack.push((c, pc, anc));
                    }
                }
                let left = left.max(0.0);
                if anc >= old {
                    out[(anc - old) as usize] += left;
                } else if let Some(ro) = roots_out.as_deref_mut() {
                    ro[k] += left;
                }
            }
        }
    }

    /// The stack walk's visit order, laid out once (see [`Walk`]).
    fn flat_walk(&self) -> &Walk {
        self.flat.get_or_init(|| {
            let mut w = Walk::default();
            // (node, its parent's nearest token, the child entry that points to it)
            let mut stack = Vec::new();
            for &r in &self.roots {
                w.runs.push(w.anc.len());
                stack.push((r, self.nodes[r].old, None));
                while let Some((n, anc, entry)) = stack.pop() {
                    if let Some(s) = entry {
                        w.kid_pos[s] = w.anc.len();
                    }
                    let node = &self.nodes[n];
                    let anc = node.token.unwrap_or(anc);
                    w.anc.push(anc);
                    w.kids.push(w.kid_node.len());
                    for &c in &node.children {
                        stack.push((c, anc, Some(w.kid_node.len())));
                        w.kid_node.push(c as u32);
                        w.kid_cond.push(self.nodes[c].cond);
                        w.kid_pos.push(usize::MAX);
                    }
                }
            }
            let n = w.anc.len();
            w.runs.push(n);
            w.kids.push(w.kid_node.len());
            // A node's run ends with its first child's run (that child is visited last), i.e.
            // at the largest end among its children; a leaf's run is itself.
            w.end = vec![0; n];
            for i in (0..n).rev() {
                let (a, b) = (w.kids[i], w.kids[i + 1]);
                w.end[i] = (a..b).map(|s| w.end[w.kid_pos[s]]).max().unwrap_or(i + 1);
            }
            w
        })
    }

    /// [`Trie::targets`] into the caller's `reach` scratch (one float per node; no allocation
    /// per position).
    fn targets_with(&self, p1: &[f32], exact: &[f32], out: &mut [f32], mut roots_out: Option<&mut [f32]>, reach: &mut Vec<f32>) {
        out.fill(0.0);
        if let Some(r) = roots_out.as_deref_mut() {
            r.fill(0.0);
        }
        debug_assert_eq!(out.len(), self.n_new);
        let old = self.old_vocab as u32;
        let w = self.flat_walk();
        reach.resize(w.end.len(), 0.0);
        for k in 0..self.roots.len() {
            let (start, stop) = (w.runs[k], w.runs[k + 1]);
            if p1[k] <= 0.0 {
                continue;
            }
            reach[start] = p1[k];
            let mut i = start;
            while i < stop {
                let p = reach[i];
                // The stack walk pushes a child only when its mass is positive (a root, when
                // it is not ≤ 0): a child that fails skips its whole run.
                let pushed = p > 0.0; // false for NaN, as in the stack walk
                if i != start && !pushed {
                    i = w.end[i];
                    continue;
                }
                let mut left = p;
                for s in w.kids[i]..w.kids[i + 1] {
                    let e = exact[w.kid_node[s] as usize];
                    let pc = p * if e.is_nan() { w.kid_cond[s] } else { e };
                    left -= pc;
                    reach[w.kid_pos[s]] = pc;
                }
                let left = left.max(0.0);
                let anc = w.anc[i];
                if anc >= old {
                    out[(anc - old) as usize] += left;
                } else if let Some(ro) = roots_out.as_deref_mut() {
                    ro[k] += left;
                }
                i += 1;
            }
        }
    }
}

/// What the head fit needs from the base at each fitted position: the root probabilities and
/// the exact conditionals along the path.
#[derive(Debug, Clone, Default)]
pub struct ChainData {
    pub n_roots: usize,
    /// `[positions × n_roots]`.
    pub p1: Vec<f32>,
    /// Per position, the `(node, conditional)` entries in `path[path_off[i]..path_off[i + 1]]`.
    pub path: Vec<(u32, f32)>,
    pub path_off: Vec<usize>,
}

impl ChainData {
    pub fn positions(&self) -> usize {
        self.path_off.len().saturating_sub(1)
    }

    /// Appends the positions of one context: `probs` holds the base's next-token distribution
    /// (`[old positions × old vocab]`, rows sum to 1) over the context's old ids, `aligned` the
    /// old position that ends each new position; positions `0..n_pos` are taken.
    pub fn push_context(&mut self, trie: &Trie, old_ids: &[u32], aligned: &[usize], n_pos: usize, probs: &[f32], old_vocab: usize) {
        self.push_context_with(trie, old_ids, aligned, n_pos, |a, o| probs[a * old_vocab + o as usize]);
    }

    /// [`Self::push_context`] with the base's probability of old token `o` at old position `a`
    /// read through `prob`, in a fixed order: a first pass can list what it needs (a few
    /// hundred values per position, where a whole distribution is the old vocabulary), so that
    /// a distribution that lives on a GPU is never copied whole.
    pub fn push_context_with(&mut self, trie: &Trie, old_ids: &[u32], aligned: &[usize], n_pos: usize, mut prob: impl FnMut(usize, u32) -> f32) {
        if self.path_off.is_empty() {
            self.path_off.push(0);
            self.n_roots = trie.roots.len();
        }
        for &a in &aligned[..n_pos] {
            self.p1.extend(trie.roots.iter().map(|&r| prob(a, trie.nodes[r].old)));
            // Along the path: after reading old_ids[a+1..=a+j], the base's distribution at
            // old position a+j gives the children of that node exactly.
            for j in 1..EXACT_DEPTH {
                if a + j >= old_ids.len() {
                    break;
                }
                let Some(n) = trie.walk(old_ids[a + 1], &old_ids[a + 2..=a + j]) else { break };
                for (c, o) in trie.children_old(n) {
                    self.path.push((c as u32, prob(a + j, o)));
                }
            }
            self.path_off.push(self.path.len());
        }
    }

    /// Target mass of the new pieces for positions `idx` into `out` (`[idx.len() × n_new]`) and,
    /// when given, of the roots' old tokens into `roots_out` (`[idx.len() × n_roots]`).
    pub fn targets(&self, trie: &Trie, idx: &[usize], out: &mut [f32], roots_out: Option<&mut [f32]>) {
        let n_new = trie.n_new;
        let nr = self.n_roots.max(1);
        let mut dummy = Vec::new();
        let ro: &mut [f32] = match roots_out {
            Some(r) => r,
            None => {
                dummy.resize(idx.len() * nr, 0.0);
                &mut dummy
            }
        };
        out.par_chunks_mut(n_new).zip(ro.par_chunks_mut(nr)).zip(idx.par_iter()).for_each_init(
            || (vec![f32::NAN; trie.n_nodes()], Vec::new()),
            |(exact, reach), ((o, r), &i)| {
                let entries = &self.path[self.path_off[i]..self.path_off[i + 1]];
                for &(n, p) in entries {
                    exact[n as usize] = p;
                }
                trie.targets_with(&self.p1[i * self.n_roots..(i + 1) * self.n_roots], exact, o, Some(&mut r[..self.n_roots]), reach);
                for &(n, _) in entries {
                    exact[n as usize] = f32::NAN;
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(old: usize, subtokens: Vec<Vec<u32>>) -> VocabExtension {
        VocabExtension { old_vocab: old, new_vocab: old + subtokens.len(), subtokens, pieces: None }
    }

    /// The flat walk gives the stack walk's bits on a random trie: shared prefixes, pieces
    /// that share a node, roots without mass, exact conditionals that are zero (which prune a
    /// subtree), NaN (counts) or given, and a walk laid out before [`Trie::count`] changed the
    /// conditionals (which must not be reused).
    #[test]
    fn the_flat_walk_gives_the_stack_walks_bits() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut r = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        let old = 12;
        let subs: Vec<Vec<u32>> = (0..400).map(|_| (0..2 + r(4)).map(|_| r(old as u64) as u32).collect()).collect();
        let mut t = Trie::new(&ext(old, subs));
        let nr = t.roots.len();
        assert!(nr > 3 && t.n_nodes() > 300, "{nr} roots, {} nodes", t.n_nodes());
        let (mut got, mut want) = (vec![0f32; 400], vec![0f32; 400]);
        let (mut got_r, mut want_r) = (vec![0f32; nr], vec![0f32; nr]);
        let mut reach = Vec::new();
        // Laid out with the default conditionals, then counted: the walk must follow.
        t.targets(&vec![0.1; nr], &vec![f32::NAN; t.n_nodes()], &mut got, None);
        let seqs: Vec<Vec<u32>> = (0..50).map(|_| (0..40).map(|_| r(old as u64) as u32).collect()).collect();
        t.count(&seqs.iter().map(|v| &v[..]).collect::<Vec<_>>());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for case in 0..40 {
            let p1: Vec<f32> = (0..nr).map(|_| if r(5) == 0 { 0.0 } else { r(1000) as f32 / 997.0 / nr as f32 }).collect();
            let mut exact = vec![f32::NAN; t.n_nodes()];
            for _ in 0..r(30) {
                exact[r(t.n_nodes() as u64) as usize] = if r(4) == 0 { 0.0 } else { r(1000) as f32 / 1000.0 };
            }
            t.targets_with(&p1, &exact, &mut got, Some(&mut got_r), &mut reach);
            t.targets_by_stack(&p1, &exact, &mut want, Some(&mut want_r));
            assert_eq!(bits(&got), bits(&want), "case {case}: new pieces");
            assert_eq!(bits(&got_r), bits(&want_r), "case {case}: roots");
            assert!(want.iter().any(|&x| x > 0.0));
        }
    }

    #[test]
    fn mass_moves_from_first_subtoken_to_the_longest_token() {
        // old tokens 0..4; new 4 = [0,1], 5 = [0,1,2], 6 = [0,2]
        let mut t = Trie::new(&ext(4, vec![vec![0, 1], vec![0, 1, 2], vec![0, 2]]));
        // Counted text: "0 1 2" twice, "0 1 3" once, "0 2" once, "0 3" once.
        t.count(&[&[0, 1, 2], &[0, 1, 2], &[0, 1, 3], &[0, 2], &[0, 3]]);
        let p1 = vec![0.5f32]; // P(next old token = 0)
        let exact = vec![f32::NAN; t.n_nodes()];
        let mut out = vec![0f32; 3];
        t.targets(&p1, &exact, &mut out, None);
        let a = 0.1f64;
        let c01 = (3.0 + a) / (5.0 + 2.0 * a + 1.0);
        let c02 = (1.0 + a) / (5.0 + 2.0 * a + 1.0);
        let c012 = (2.0 + a) / (3.0 + a + 1.0);
        let p01 = 0.5 * c01;
        assert!((out[1] as f64 - p01 * c012).abs() < 1e-6, "{out:?}");
        assert!((out[0] as f64 - p01 * (1.0 - c012)).abs() < 1e-6, "{out:?}");
        assert!((out[2] as f64 - 0.5 * c02).abs() < 1e-6, "{out:?}");
        // Mass is conserved: new pieces plus what stays on token 0 is the root's mass.
        let mut root = vec![0f32; 1];
        t.targets(&p1, &exact, &mut out, Some(&mut root));
        assert!((out.iter().sum::<f32>() + root[0] - 0.5).abs() < 1e-6, "{out:?} {root:?}");
        assert!(root[0] > 0.0 && root[0] < 0.5);
    }

    #[test]
    fn exact_conditionals_override_counts_along_the_path() {
        let mut t = Trie::new(&ext(4, vec![vec![0, 1], vec![0, 2]]));
        t.count(&[&[0, 1], &[0, 2]]);
        let mut exact = vec![f32::NAN; t.n_nodes()];
        let n01 = t.walk(0, &[1]).unwrap();
        let n02 = t.walk(0, &[2]).unwrap();
        exact[n01] = 0.9;
        exact[n02] = 0.05;
        let mut out = vec![0f32; 2];
        t.targets(&[1.0], &exact, &mut out, None);
        assert_eq!(out, vec![0.9, 0.05]);
    }

    #[test]
    fn intermediate_nodes_give_their_mass_back_to_the_token_above() {
        // 4 = [0,1,2]; node [0,1] is no token: text "0 1 3" is read as 0 then 1 3.
        let mut t = Trie::new(&ext(4, vec![vec![0, 1, 2]]));
        t.count(&[]);
        let mut exact = vec![f32::NAN; t.n_nodes()];
        exact[t.walk(0, &[1]).unwrap()] = 0.5;
        exact[t.walk(0, &[1, 2]).unwrap()] = 0.5;
        let mut out = vec![0f32; 1];
        t.targets(&[0.8], &exact, &mut out, None);
        assert!((out[0] - 0.2).abs() < 1e-6);
    }

    #[test]
    fn chain_data_reads_the_path_from_the_base_distribution() {
        let e = ext(4, vec![vec![0, 1], vec![0, 2]]);
        let mut t = Trie::new(&e);
        t.count(&[&[0, 1]]);
        // old ids: 3 0 1 (new: 3, [0,1]); aligned: 0, 2
        let old_ids = [3u32, 0, 1];
        let mut probs = vec![0.25f32; 3 * 4];
        probs[0..4].copy_from_slice(&[0.6, 0.2, 0.1, 0.1]); // after 3: P(0) = 0.6
        probs[4..8].copy_from_slice(&[0.1, 0.7, 0.1, 0.1]); // after 3 0: P(1) = 0.7, P(2) = 0.1
        let mut cd = ChainData::default();
        cd.push_context(&t, &old_ids, &[0, 2], 1, &probs, 4);
        let mut out = vec![0f32; 2];
        cd.targets(&t, &[0], &mut out, None);
        assert!((out[0] - 0.6 * 0.7).abs() < 1e-6 && (out[1] - 0.6 * 0.1).abs() < 1e-6, "{out:?}");
    }
}

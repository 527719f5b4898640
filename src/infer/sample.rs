//! Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with HF's
//! repetition penalty. Pure functions over `&[f32]`, so they are testable without a model.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub greedy: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { greedy: true, temperature: 1.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// HF's `RepetitionPenaltyLogitsProcessor`: divide positive logits, multiply negative ones.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            if done.insert(id) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// The greedy choice: the first maximum, as `torch.argmax` picks it, so that greedy ties match
/// the reference ([`crate::kernels::softmax::argmax`]).
pub fn argmax(logits: &[f32]) -> u32 {
    crate::kernels::softmax::argmax(logits)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next id given the last position's logits and the ids so far.
    pub fn next(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        apply_repetition_penalty(logits, history, p.repetition_penalty);
        if p.greedy || p.temperature <= 0.0 {
            return argmax(logits);
        }
        let r: f32 = self.rng.random();
        pick(logits, p, r)
    }
}

/// The id a uniform draw `r` in [0, 1) picks from `logits` (overwritten) under `p`'s
/// temperature, top-k and top-p: the candidates in order of probability (ties: the lower id
/// first), cut to the `top_k` likeliest and then to the shortest head holding `top_p` of
/// their mass, and `r` walked through their renormalised probabilities.
///
/// Only what the cuts need is sorted: top-k selects its `k` in linear time, top-p sorts the
/// ids above a falling floor until they hold the mass, and plain temperature sampling walks
/// the ids in their own order (the same distribution). Sorting the whole vocabulary per token took
/// ~1.6 ms for SmolLM2's 49,152 ids, a quarter of a decode step, and the server samples every
/// sequence of a batch on one thread.
fn pick(logits: &mut [f32], p: &SamplingParams, r: f32) -> u32 {
    logits.iter_mut().for_each(|l| *l /= p.temperature);
    // `exp(l − max)`: the unnormalised probabilities (the likeliest is 1), and their sums
    // per block.
    let blocks = exp_weights(logits);
    let total: f32 = blocks.iter().sum();
    let w: &[f32] = logits;
    let v = w.len();
    let top_k = p.top_k > 0 && p.top_k < v;
    if !top_k && p.top_p >= 1.0 {
        // The draw's block from the block sums, then a walk through that block only.
        let target = r * total;
        let mut acc = 0f32;
        for (b, &bs) in blocks.iter().enumerate() {
            if target < acc + bs {
                let ids = (b * BLOCK) as u32..((b + 1) * BLOCK).min(v) as u32;
                // Short of the block's end only by rounding: its last id with any weight.
                return walk(w, ids.clone(), target - acc).unwrap_or_else(|| ids.rev().find(|&i| w[i as usize] > 0.0).unwrap_or(b as u32 * BLOCK as u32));
            }
            acc += bs;
        }
        // Past the end only by rounding (r close to 1): the last id that has any weight.
        return w.iter().rposition(|&x| x > 0.0).unwrap_or(v - 1) as u32;
    }
    let before = |a: &u32, b: &u32| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b));
    // The candidates, likeliest first: the `top_k` (the k-th largest weight found by selection
    // on the values, the ids at or above it collected in one pass), or every id.
    let ids: Vec<u32> = if top_k {
        let mut vals = w.to_vec();
        let (_, &mut kth, _) = vals.select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a));
        let mut ids: Vec<u32> = (0..v as u32).filter(|&i| w[i as usize].total_cmp(&kth).is_gt()).collect();
        let ties = (0..v as u32).filter(|&i| w[i as usize].total_cmp(&kth).is_eq());
        ids.extend(ties.take(p.top_k - ids.len()));
        ids.sort_unstable_by(before);
        ids
    } else {
        (0..v as u32).collect()
    };
    let mass: f32 = if top_k { ids.iter().map(|&i| w[i as usize]).sum() } else { total };
    if p.top_p >= 1.0 {
        return walk(w, ids.iter().copied(), r * mass).unwrap_or(ids[ids.len() - 1]);
    }
    // The shortest head holding `top_p` of the candidates' mass. Only ids above a floor are
    // sorted (every id below it is less likely than every id above), the floor falling a
    // hundredfold until the head holds the mass: a confident model needs one pass.
    let want = p.top_p * mass;
    // The top-k candidates are few and already sorted: one pass over all of them.
    let mut floor = if top_k { 0.0 } else { 1e-2f32 };
    loop {
        let mut head: Vec<u32> = if floor <= 0.0 { ids.clone() } else { ids.iter().copied().filter(|&i| w[i as usize] >= floor).collect() };
        if !top_k {
            head.sort_unstable_by(before);
        }
        let mut acc = 0f32;
        if let Some(n) = head.iter().position(|&i| {
            acc += w[i as usize];
            acc >= want
        }) {
            return walk(w, head[..=n].iter().copied(), r * acc).unwrap_or(head[n]);
        }
        if head.len() == ids.len() {
            return walk(w, head.iter().copied(), r * acc).unwrap_or(head[head.len() - 1]);
        }
        floor = if floor < 1e-30 { 0.0 } else { floor * 1e-2 };
    }
}

/// The first id of `ids` at which the running sum of `w` passes `target`.
fn walk(w: &[f32], ids: impl Iterator<Item = u32>, target: f32) -> Option<u32> {
    let mut acc = 0f32;
    for i in ids {
        acc += w[i as usize];
        if target < acc {
            return Some(i);
        }
    }
    None
}

/// Ids per block of [`exp_weights`]' sums.
const BLOCK: usize = 256;

/// `exp(x − max)` in place (the crate's vectorised exponential) and the sum of each block of
/// [`BLOCK`] weights, each in eight lanes: a draw finds its block from these and walks that block
/// only, where one running sum over 49,152 weights (and a walk as long) was a chain of dependent
/// additions that took most of a sample's time.
fn exp_weights(x: &mut [f32]) -> Vec<f32> {
    use crate::kernels::softmax::{exp_minus_in_place, max_of};
    exp_minus_in_place(x, max_of(x));
    x.chunks(BLOCK)
        .map(|b| {
            let mut lanes = [0f32; 8];
            let chunks = b.chunks_exact(8);
            let rest: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                lanes.iter_mut().zip(c).for_each(|(l, &x)| *l += x);
            }
            lanes.iter().sum::<f32>() + rest
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn repetition_penalty_is_hf_style() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits = vec![0.1, 0.5, 0.2, 0.9, 0.3];
        let p = SamplingParams { greedy: false, temperature: 0.7, top_k: 1, ..Default::default() };
        assert_eq!(Sampler::new(p).next(&mut logits.clone(), &[]), 3);
        let p = SamplingParams { greedy: false, temperature: 1.0, seed: 7, ..Default::default() };
        let a: Vec<u32> = { let mut s = Sampler::new(p.clone()); (0..20).map(|_| s.next(&mut logits.clone(), &[])).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(p); (0..20).map(|_| s.next(&mut logits.clone(), &[])).collect() };
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1, "sampling never varied");
    }

    /// The draws follow the definition: probabilities `softmax(l / T)`, cut to the `top_k`
    /// likeliest and then to the shortest head holding `top_p` of their mass, renormalised.
    /// Stratified draws (`r = (j + ½) / N`) make the frequencies exact to within 1/N, so the
    /// check is tight and does not depend on a seed; a vocabulary of 3,000 makes the top-p
    /// floor fall more than once.
    #[test]
    fn draws_follow_the_cut_softmax() {
        let v = 3000;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 7919 % 1009) as f32 / 1009.0) * 6.0 - if i % 7 == 0 { 0.0 } else { 3.0 }).collect();
        for (t, top_k, top_p) in [(0.8, 0, 1.0), (0.8, 40, 1.0), (1.3, 0, 0.7), (0.8, 0, 0.999), (0.5, 100, 0.6), (2.0, 5, 0.3)] {
            let p = SamplingParams { greedy: false, temperature: t, top_k, top_p, ..Default::default() };
            // The definition, in f64: a stable sort, the cuts, renormalisation.
            let e: Vec<f64> = logits.iter().map(|&l| (l as f64 / t as f64).exp()).collect();
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
            if top_k > 0 {
                order.truncate(top_k);
            }
            let z: f64 = order.iter().map(|&i| e[i]).sum();
            if top_p < 1.0 {
                let mut acc = 0.0;
                let n = order.iter().position(|&i| {
                    acc += e[i] / z;
                    acc >= top_p as f64
                });
                order.truncate(n.map_or(order.len(), |n| n + 1));
            }
            let z: f64 = order.iter().map(|&i| e[i]).sum();
            let mut want = vec![0f64; v];
            order.iter().for_each(|&i| want[i] = e[i] / z);
            let draws = 20_000;
            let mut got = vec![0f64; v];
            for j in 0..draws {
                got[pick(&mut logits.clone(), &p, (j as f32 + 0.5) / draws as f32) as usize] += 1.0 / draws as f64;
            }
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            assert!(worst < 2.0 / draws as f64 + 1e-4, "T {t}, top_k {top_k}, top_p {top_p}: off by {worst}");
            assert!(got.iter().zip(&want).all(|(g, w)| *w > 0.0 || *g == 0.0), "T {t}, top_k {top_k}, top_p {top_p}: drew a cut id");
        }
    }

    /// Among equal logits the lower id comes first, as a stable sort orders them.
    #[test]
    fn ties_go_to_the_lower_id() {
        let p = SamplingParams { greedy: false, temperature: 1.0, top_k: 1, ..Default::default() };
        assert_eq!(pick(&mut [0.0, 2.0, 1.0, 2.0], &p, 0.99), 1);
        let p = SamplingParams { greedy: false, temperature: 1.0, top_p: 0.1, ..Default::default() };
        assert_eq!(pick(&mut [0.0, 2.0, 1.0, 2.0], &p, 0.99), 1);
    }

    #[test]
    fn top_p_keeps_the_head() {
        // One token holds 0.9+ of the mass: top_p 0.5 must always pick it.
        let logits = vec![10.0, 0.0, 0.0, 0.0];
        let p = SamplingParams { greedy: false, temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() };
        let mut s = Sampler::new(p);
        assert!((0..50).all(|_| s.next(&mut logits.clone(), &[]) == 0));
    }
}

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

pub fn argmax(logits: &[f32]) -> u32 {
    // First maximum wins, as torch.argmax does, so greedy ties match the reference.
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
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
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
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

    #[test]
    fn top_p_keeps_the_head() {
        // One token holds 0.9+ of the mass: top_p 0.5 must always pick it.
        let logits = vec![10.0, 0.0, 0.0, 0.0];
        let p = SamplingParams { greedy: false, temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() };
        let mut s = Sampler::new(p);
        assert!((0..50).all(|_| s.next(&mut logits.clone(), &[]) == 0));
    }
}

//! Adam on host rows: the tables are small enough that a host update is cheaper than building
//! an optimizer state per step.

use rayon::prelude::*;

pub(super) struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    pub(super) fn new(n: usize) -> Self {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }
    pub(super) fn step(&mut self, w: &mut [f32], g: &[f32], lr: f64) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        let lr = lr as f32;
        w.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(self.m.par_chunks_mut(4096)).zip(self.v.par_chunks_mut(4096)).for_each(|(((w, g), m), v)| {
            for i in 0..w.len() {
                // Sparse Adam: a row that is not in this batch does not move (no momentum
                // carried into steps that have nothing to say about it).
                if g[i] == 0.0 {
                    continue;
                }
                m[i] = B1 * m[i] + (1.0 - B1) * g[i];
                v[i] = B2 * v[i] + (1.0 - B2) * g[i] * g[i];
                w[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
            }
        });
    }
}

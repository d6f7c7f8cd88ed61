//! Token-level scoring math, independent of any model.

use rayon::prelude::*;

/// log-softmax of one row of logits, accumulated in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Accumulates negative log-likelihoods (and, with a base model, KL divergences and top-1
/// agreement) over scored positions.
#[derive(Debug, Default, Clone)]
pub struct Scorer {
    nll: f64,
    nll2: f64,
    base_nll: f64,
    base_nll2: f64,
    n: u64,
    kld: Vec<f64>,
    agree: u64,
}

impl Scorer {
    /// Scores rows of logits against the tokens that follow them.
    pub fn add(&mut self, logits: &[Vec<f32>], targets: &[u32]) {
        let nlls: Vec<f64> = logits
            .par_iter()
            .zip(targets)
            .map(|(row, &t)| -log_softmax(row)[t as usize])
            .collect();
        for v in nlls {
            self.nll += v;
            self.nll2 += v * v;
            self.n += 1;
        }
    }

    /// Scores a model and its base on the same positions: KL(base || model) per position.
    pub fn add_pair(&mut self, logits: &[Vec<f32>], base: &[Vec<f32>], targets: &[u32]) {
        let per: Vec<(f64, f64, f64, bool)> = logits
            .par_iter()
            .zip(base)
            .zip(targets)
            .map(|((q, p), &t)| {
                let lq = log_softmax(q);
                let lp = log_softmax(p);
                let kl: f64 = lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum();
                (
                    -lq[t as usize],
                    -lp[t as usize],
                    kl.max(0.0),
                    argmax(q) == argmax(p),
                )
            })
            .collect();
        for (nq, np, kl, same) in per {
            self.nll += nq;
            self.nll2 += nq * nq;
            self.base_nll += np;
            self.base_nll2 += np * np;
            self.kld.push(kl);
            self.agree += same as u64;
            self.n += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// exp(mean NLL) and its standard error as llama.cpp reports it: ppl · stderr(NLL).
    fn ppl_of(sum: f64, sum2: f64, n: u64) -> (f64, f64) {
        if n == 0 {
            return (f64::NAN, f64::NAN);
        }
        let n = n as f64;
        let mean = sum / n;
        let var = sum2 / n - mean * mean;
        let ppl = mean.exp();
        let se = if n > 1.0 && var > 0.0 {
            (var / (n - 1.0)).sqrt() * ppl
        } else {
            0.0
        };
        (ppl, se)
    }

    pub fn ppl(&self) -> (f64, f64) {
        Self::ppl_of(self.nll, self.nll2, self.n)
    }

    pub fn base_ppl(&self) -> (f64, f64) {
        Self::ppl_of(self.base_nll, self.base_nll2, self.n)
    }

    pub fn kld_mean(&self) -> f64 {
        self.kld.iter().sum::<f64>() / self.kld.len().max(1) as f64
    }

    /// Nearest-rank quantile of the per-position KL divergences.
    pub fn kld_quantile(&self, q: f64) -> f64 {
        if self.kld.is_empty() {
            return f64::NAN;
        }
        let mut v = self.kld.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx]
    }

    pub fn top1_agreement(&self) -> f64 {
        self.agree as f64 / self.n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalizes() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f64 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert!((l[2] - l[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn uniform_logits_give_vocab_perplexity() {
        let mut s = Scorer::default();
        s.add(&vec![vec![0.0; 10]; 4], &[1, 2, 3, 4]);
        let (ppl, se) = s.ppl();
        assert!((ppl - 10.0).abs() < 1e-9);
        assert_eq!(se, 0.0);
    }

    #[test]
    fn self_comparison_is_zero_kld_full_agreement() {
        let rows = vec![vec![0.3, -1.0, 2.0, 0.1], vec![1.0, 1.5, -0.5, 0.0]];
        let mut s = Scorer::default();
        s.add_pair(&rows, &rows, &[2, 1]);
        assert_eq!(s.kld_mean(), 0.0);
        assert_eq!(s.kld_quantile(0.99), 0.0);
        assert_eq!(s.top1_agreement(), 1.0);
        assert_eq!(s.ppl(), s.base_ppl());
    }

    #[test]
    fn known_kld() {
        // p = (0.5, 0.5), q = (0.25, 0.75): KL(p||q) = 0.5 ln 2 + 0.5 ln(2/3).
        let p = vec![vec![0.0f32, 0.0]];
        let q = vec![vec![0.0f32, 3f32.ln()]];
        let mut s = Scorer::default();
        s.add_pair(&q, &p, &[0]);
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((s.kld_mean() - want).abs() < 1e-6, "{}", s.kld_mean());
        assert_eq!(s.top1_agreement(), 0.0);
    }

    #[test]
    fn quantile_nearest_rank() {
        let s = Scorer {
            kld: (1..=100).map(|i| i as f64).collect(),
            ..Default::default()
        };
        assert_eq!(s.kld_quantile(0.99), 99.0);
        assert_eq!(s.kld_quantile(0.5), 50.0);
    }
}

//! Seeded orthogonal rotations built on the fast Walsh–Hadamard transform, the building block of
//! rotation-before-quantization (QuaRot / QuIP#-style incoherence processing).
//!
//! A dimension `n = 2^k · m` (576 = 64·9, 1536 = 512·3) is rotated as `x ↦ ((x·D) reshaped to
//! m × 2^k) · H_{2^k} then B_mᵀ` on the other axis: `D` random signs, `H` the normalised
//! Hadamard matrix (applied by the fast transform), `B_m` a seeded random orthogonal m×m matrix
//! (Gram–Schmidt of Gaussian draws). The product is orthogonal for any such `n`, mixes every
//! coordinate with every other, and costs `O(n log n + n·m)`. Hand-written because no crate of
//! the stack offers a fast Walsh–Hadamard transform or non-power-of-two Hadamard rotations.

use crate::rng::Rng;

/// An orthogonal `n × n` rotation `Q`, applied to row vectors as `x ↦ x·Q`.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub n: usize,
    pub seed: u64,
    /// Power-of-two factor handled by the fast transform.
    p: usize,
    /// Remaining odd factor, mixed by `b` (row-major m × m, orthogonal).
    m: usize,
    signs: Vec<f32>,
    b: Vec<f64>,
}

/// In-place normalised fast Walsh–Hadamard transform of a power-of-two-length slice.
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

impl Rotation {
    /// The rotation for dimension `n` drawn from `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        assert!(n > 0, "rotation of an empty dimension");
        let p = 1usize << n.trailing_zeros();
        let m = n / p;
        let mut rng = Rng(seed ^ (n as u64).rotate_left(32));
        let signs = (0..n)
            .map(|_| if rng.next() & 1 == 0 { 1.0 } else { -1.0 })
            .collect();
        // Gram–Schmidt on Gaussian rows gives a uniformly random orthogonal m × m matrix.
        let mut b = vec![0f64; m * m];
        for r in 0..m {
            loop {
                let mut v: Vec<f64> = (0..m).map(|_| rng.gauss()).collect();
                for q in 0..r {
                    let d: f64 = (0..m).map(|k| v[k] * b[q * m + k]).sum();
                    (0..m).for_each(|k| v[k] -= d * b[q * m + k]);
                }
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                if norm > 1e-6 {
                    (0..m).for_each(|k| b[r * m + k] = v[k] / norm);
                    break;
                }
            }
        }
        Rotation {
            n,
            seed,
            p,
            m,
            signs,
            b,
        }
    }

    /// `x ← x·Q` for one row of length `n`.
    pub fn apply(&self, x: &mut [f32]) {
        assert_eq!(x.len(), self.n);
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
        for blk in x.chunks_mut(self.p) {
            fwht(blk);
        }
        self.mix(x, false);
    }

    /// `x ← x·Qᵀ` (the inverse).
    pub fn apply_inverse(&self, x: &mut [f32]) {
        assert_eq!(x.len(), self.n);
        self.mix(x, true);
        // The normalised Hadamard matrix is symmetric and its own inverse.
        for blk in x.chunks_mut(self.p) {
            fwht(blk);
        }
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
    }

    /// Mixes the `m` blocks: block i ← Σ_j B[i][j]·block j (or Bᵀ when `transpose`).
    fn mix(&self, x: &mut [f32], transpose: bool) {
        if self.m == 1 {
            return;
        }
        let (m, p) = (self.m, self.p);
        let src = x.to_vec();
        for i in 0..m {
            for c in 0..p {
                let mut acc = 0f64;
                for j in 0..m {
                    let w = if transpose {
                        self.b[j * m + i]
                    } else {
                        self.b[i * m + j]
                    };
                    acc += w * src[j * p + c] as f64;
                }
                x[i * p + c] = acc as f32;
            }
        }
    }

    /// Rotates every row of a row-major matrix with `n` columns (`W ← W·Q`).
    pub fn apply_rows(&self, w: &mut [f32]) {
        for row in w.chunks_mut(self.n) {
            self.apply(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn rotations_are_orthogonal_and_invert_for_model_widths() {
        for n in [8usize, 64, 96, 576, 1536] {
            let r = Rotation::new(n, 7);
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05)
                .collect();
            let (mut xr, mut yr) = (x.clone(), y.clone());
            r.apply(&mut xr);
            r.apply(&mut yr);
            // Inner products (hence norms) are preserved.
            assert!(
                (dot(&xr, &yr) - dot(&x, &y)).abs() < 1e-4 * (1.0 + dot(&x, &x)),
                "n={n}"
            );
            r.apply_inverse(&mut xr);
            let err = x
                .iter()
                .zip(&xr)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "n={n}: inverse error {err}");
        }
    }

    #[test]
    fn seeded_and_deterministic() {
        let x: Vec<f32> = (0..576).map(|i| i as f32).collect();
        let run = |seed| {
            let mut v = x.clone();
            Rotation::new(576, seed).apply(&mut v);
            v
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn spreads_an_outlier_over_every_coordinate() {
        // One huge weight: after rotation no coordinate holds more than a small share of it.
        let mut x = vec![0f32; 576];
        x[100] = 100.0;
        Rotation::new(576, 1).apply(&mut x);
        let max = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max < 100.0 * 0.2, "max {max}");
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 100.0).abs() < 1e-2);
    }

    #[test]
    fn fwht_matches_the_definition() {
        let x: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
        let mut y = x.clone();
        fwht(&mut y);
        // H4 / 2 applied to x.
        let want = [10.0 / 2.0, -2.0 / 2.0, -4.0 / 2.0, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}

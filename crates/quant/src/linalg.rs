//! Products with a layer's Hessian, shared by GPTQ's error measure and NOVAQ's refinement.
//!
//! Rows are split into fixed chunks run in parallel, each a single-threaded faer product, and
//! sums are taken in row order: the result is the same on every run, whatever the scheduling.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

const CHUNK: usize = 64;

/// The Hessian (row-major, `n × n`) as a faer matrix.
pub fn hmat(h: &[f64], n: usize) -> Mat<f64> {
    Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j])
}

/// `M · H` for row-major `M` (`rows × cols`); row-major result.
pub fn times_h(m: &[f64], cols: usize, h: &Mat<f64>) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = m
        .par_chunks(CHUNK * cols)
        .map(|c| {
            let r = c.len() / cols;
            let a = Mat::<f64>::from_fn(r, cols, |i, j| c[i * cols + j]);
            let mut out = Mat::<f64>::zeros(r, cols);
            matmul(
                out.as_mut(),
                Accum::Replace,
                a.as_ref(),
                h.as_ref(),
                1.0,
                Par::Seq,
            );
            let mut v = vec![0f64; r * cols];
            for j in 0..cols {
                for (i, x) in out.col_as_slice(j).iter().enumerate() {
                    v[i * cols + j] = *x;
                }
            }
            v
        })
        .collect();
    parts.concat()
}

/// `Σ_r m_r H m_rᵀ`.
pub fn quad(m: &[f64], cols: usize, h: &Mat<f64>) -> f64 {
    let mh = times_h(m, cols, h);
    m.iter().zip(&mh).map(|(a, b)| a * b).sum()
}

//! Products with a layer's Hessian, shared by GPTQ's error measure and NOVAQ's refinement.
//!
//! Rows are split into fixed chunks run in parallel, each a single-threaded faer product, and
//! sums are taken in row order: the result is the same on every run, whatever the scheduling.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

const CHUNK: usize = 64;

/// The Hessian (row-major, `n × n`) as a faer matrix.
pub fn hmat(h: &[f64], n: usize) -> Mat<f64> {
    Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j])
}

/// `C · H` for a chunk `C` of rows (row-major, `cols` wide), one thread.
fn chunk_times_h<T: faer::traits::RealField + Copy>(
    c: &[T],
    cols: usize,
    h: MatRef<'_, T>,
) -> Mat<T> {
    let r = c.len() / cols;
    let a = Mat::<T>::from_fn(r, cols, |i, j| c[i * cols + j]);
    let mut out = Mat::<T>::zeros(r, cols);
    matmul(
        out.as_mut(),
        Accum::Replace,
        a.as_ref(),
        h,
        T::one_impl(),
        Par::Seq,
    );
    out
}

/// `M · H` for row-major `M` (`rows × cols`); row-major result.
pub fn times_h(m: &[f64], cols: usize, h: &Mat<f64>) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = m
        .par_chunks(CHUNK * cols)
        .map(|c| {
            let r = c.len() / cols;
            let out = chunk_times_h(c, cols, h.as_ref());
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
    quad_rows(m.len() / cols, cols, h.as_ref(), &|r, out| {
        out.copy_from_slice(&m[r * cols..(r + 1) * cols])
    })
}

/// `Σ_r m_r H m_rᵀ` with row `r` of `m` written by `row(r, out)`: chunks of rows are made and
/// multiplied a few per thread at a time, so neither `m` nor `M·H` is ever held whole (for a
/// 4096 × 14336 layer each would be 470 MB). Products in `T`, terms summed in f64 in row-major
/// order.
pub fn quad_rows<T: faer::traits::RealField + Copy + Into<f64>>(
    rows: usize,
    cols: usize,
    h: MatRef<'_, T>,
    row: &(dyn Fn(usize, &mut [T]) + Sync),
) -> f64 {
    let chunks = rows.div_ceil(CHUNK);
    let wave = 4 * rayon::current_num_threads().max(1);
    let mut acc = 0f64;
    for first in (0..chunks).step_by(wave) {
        let parts: Vec<Vec<T>> = (first..(first + wave).min(chunks))
            .into_par_iter()
            .map(|c| {
                let r0 = c * CHUNK;
                let r = CHUNK.min(rows - r0);
                let mut m = vec![T::zero_impl(); r * cols];
                for (i, out) in m.chunks_mut(cols).enumerate() {
                    row(r0 + i, out);
                }
                let out = chunk_times_h(&m, cols, h);
                for (i, mr) in m.chunks_mut(cols).enumerate() {
                    for (j, x) in mr.iter_mut().enumerate() {
                        *x *= out[(i, j)];
                    }
                }
                m
            })
            .collect();
        acc = parts.iter().flatten().fold(acc, |s, &x| s + x.into());
    }
    acc
}

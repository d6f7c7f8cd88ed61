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
fn chunk_times_h(c: &[f64], cols: usize, h: MatRef<'_, f64>) -> Mat<f64> {
    let r = c.len() / cols;
    let a = Mat::<f64>::from_fn(r, cols, |i, j| c[i * cols + j]);
    let mut out = Mat::<f64>::zeros(r, cols);
    matmul(out.as_mut(), Accum::Replace, a.as_ref(), h, 1.0, Par::Seq);
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
    quad_rows(m.len() / cols, cols, HRef::F64(h.as_ref()), &|r, out| {
        out.copy_from_slice(&m[r * cols..(r + 1) * cols])
    })
}

/// `H` as [`quad_rows`] reads it, a panel of columns at a time in f64. `H` must be symmetric:
/// only its lower part (rows from the panel's first column on) is read.
#[derive(Clone, Copy)]
pub enum HRef<'a> {
    F64(MatRef<'a, f64>),
    /// Stored in f32, times `factor`: a panel is widened when it is used, so the whole matrix
    /// never exists in f64.
    SymF32 {
        sums: &'a [f32],
        factor: f64,
    },
}

/// Rows of `m` per product in [`quad_rows`].
const QUAD_ROWS: usize = 128;
/// Columns of `H` per product in [`quad_rows`].
const QUAD_PANEL: usize = 128;

/// `Σ_r m_r H m_rᵀ` with row `r` of `m` written by `row(r, out)`, in f64: chunks of rows are
/// made and multiplied by a panel of `H` at a time, so neither `m` nor `M·H` is ever held whole
/// (for a 4096 × 14336 layer each would be 470 MB). `H` being symmetric, a panel's columns
/// meet only the rows of `H` from the panel on: the square on the diagonal once, the part
/// below it twice (`m H mᵀ = Σ_i h_ii m_i² + 2 Σ_{i>j} m_i h_ij m_j`), which halves the
/// multiply-adds; these products are most of a large layer's GPTQ time. Each chunk's sum is
/// taken in a fixed order and the chunks' sums in row order, whatever the scheduling.
pub fn quad_rows(
    rows: usize,
    cols: usize,
    h: HRef<'_>,
    row: &(dyn Fn(usize, &mut [f64]) + Sync),
) -> f64 {
    let parts: Vec<f64> = (0..rows.div_ceil(QUAD_ROWS))
        .into_par_iter()
        .map(|c| {
            let r0 = c * QUAD_ROWS;
            let r = QUAD_ROWS.min(rows - r0);
            let mut buf = vec![0f64; cols];
            let mut m = Mat::<f64>::zeros(r, cols);
            for i in 0..r {
                row(r0 + i, &mut buf);
                for (j, v) in buf.iter().enumerate() {
                    m[(i, j)] = *v;
                }
            }
            let mut out = Mat::<f64>::zeros(r, QUAD_PANEL.min(cols));
            let mut sum = 0f64;
            for c0 in (0..cols).step_by(QUAD_PANEL) {
                let pw = QUAD_PANEL.min(cols - c0);
                let below = cols - c0 - pw;
                let widened;
                // Rows c0.. of the panel's columns.
                let panel = match h {
                    HRef::F64(h) => h.submatrix(c0, c0, cols - c0, pw),
                    HRef::SymF32 { sums, factor } => {
                        widened = Mat::<f64>::from_fn(cols - c0, pw, |i, j| {
                            sums[(c0 + j) * cols + c0 + i] as f64 * factor
                        });
                        widened.as_ref()
                    }
                };
                let mut out = out.as_mut().subcols_mut(0, pw);
                let (diag, rest) = panel.split_at_row(pw);
                matmul(
                    out.as_mut(),
                    Accum::Replace,
                    m.as_ref().subcols(c0, pw),
                    diag,
                    1.0,
                    Par::Seq,
                );
                if below > 0 {
                    matmul(
                        out.as_mut(),
                        Accum::Add,
                        m.as_ref().subcols(c0 + pw, below),
                        rest,
                        2.0,
                        Par::Seq,
                    );
                }
                for j in 0..pw {
                    for i in 0..r {
                        sum += m[(i, c0 + j)] * out[(i, j)];
                    }
                }
            }
            sum
        })
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form against the plain double sum, for widths that end in a short panel.
    #[test]
    fn quadratic_forms_match_the_plain_sum() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut f = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for (rows, cols) in [(3, 5), (130, 128), (7, 300)] {
            let a: Vec<f64> = (0..cols * cols).map(|_| f()).collect();
            let mut h = vec![0f64; cols * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] = a[i * cols + j] + a[j * cols + i];
                }
            }
            let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let m: Vec<f64> = (0..rows * cols).map(|_| f()).collect();
            let plain = |h: &dyn Fn(usize, usize) -> f64| {
                let mut s = 0f64;
                for r in 0..rows {
                    for i in 0..cols {
                        for j in 0..cols {
                            s += m[r * cols + i] * h(i, j) * m[r * cols + j];
                        }
                    }
                }
                s
            };
            let want = plain(&|i, j| h[i * cols + j]);
            let got = quad(&m, cols, &hmat(&h, cols));
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{rows}x{cols}: {got} vs {want}"
            );
            let want = plain(&|i, j| hf[i * cols + j] as f64 * 0.5);
            let got = quad_rows(
                rows,
                cols,
                HRef::SymF32 {
                    sums: &hf,
                    factor: 0.5,
                },
                &|r, out| out.copy_from_slice(&m[r * cols..(r + 1) * cols]),
            );
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{rows}x{cols}: {got} vs {want}"
            );
        }
    }
}

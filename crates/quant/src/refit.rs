//! Progressive pass after rounding: with the codes fixed, re-fit every group's scale (and min)
//! to minimise the layer's output error on the calibration inputs.
//!
//! For one row, the reconstruction is linear in the group parameters: `ŵ = A θ`, where column
//! `2g` of `A` holds the group's code values (times the scale) and column `2g+1` ones (times the
//! min, asymmetric grids). Minimising `(ŵ − w) H (ŵ − w)ᵀ` is the small least-squares system
//! `(Aᵀ H A) θ = Aᵀ H w` per row. New parameters are rounded to f16 and kept for a row only if
//! its error really went down, so the pass can never make a layer worse.

use crate::{pack, Grid, QuantizedTensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use half::f16;
use rayon::prelude::*;

/// One row's error before and after, and its new (scale, min) per group when they helped.
type RowFit = (f64, f64, Option<Vec<(f16, f16)>>);

/// Output squared error of one row: `d H dᵀ`.
fn row_err(d: &[f64], h: &[f64], n: usize) -> f64 {
    let mut s = 0.0;
    for i in 0..n {
        if d[i] == 0.0 {
            continue;
        }
        let row = &h[i * n..(i + 1) * n];
        let hd: f64 = row.iter().zip(d).map(|(a, b)| a * b).sum();
        s += d[i] * hd;
    }
    s
}

/// Re-fits scales (and mins) of `q` against `w` (row-major, the weight the codes stand for)
/// under `h` (`cols × cols`, row-major). Returns the summed output error before and after.
pub fn refit_scales(q: &mut QuantizedTensor, w: &[f32], h: &[f64]) -> (f64, f64) {
    let (rows, cols) = (q.rows, q.cols);
    let gpr = q.groups_per_row();
    let gs = q.group_size;
    let codes = pack::unpack(&q.codes, q.bits, rows * cols);
    let half = (1u32 << (q.bits - 1)) as f64;
    let asym = q.grid == Grid::Asymmetric;
    let k = if asym { 2 * gpr } else { gpr };
    let deq = q.dequantize();
    let results: Vec<RowFit> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let base = r * cols;
            let wr: Vec<f64> = w[base..base + cols].iter().map(|&v| v as f64).collect();
            let d0: Vec<f64> = (0..cols).map(|c| deq[base + c] as f64 - wr[c]).collect();
            let before = row_err(&d0, h, cols);
            // Basis values: the code term per column, and its group index.
            let cval: Vec<f64> = (0..cols)
                .map(|c| {
                    let v = codes[base + c] as f64;
                    if asym {
                        v
                    } else {
                        v - half
                    }
                })
                .collect();
            let grp: Vec<usize> = (0..cols).map(|c| c / gs).collect();
            let idx = |c: usize, which: usize| if asym { 2 * grp[c] + which } else { grp[c] };
            let mut m = vec![0f64; k * k];
            let mut b = vec![0f64; k];
            for i in 0..cols {
                let hrow = &h[i * cols..(i + 1) * cols];
                let hw: f64 = hrow.iter().zip(&wr).map(|(a, x)| a * x).sum();
                b[idx(i, 0)] += cval[i] * hw;
                if asym {
                    b[idx(i, 1)] += hw;
                }
                for j in 0..cols {
                    let hij = hrow[j];
                    if hij == 0.0 {
                        continue;
                    }
                    m[idx(i, 0) * k + idx(j, 0)] += cval[i] * hij * cval[j];
                    if asym {
                        m[idx(i, 0) * k + idx(j, 1)] += cval[i] * hij;
                        m[idx(i, 1) * k + idx(j, 0)] += hij * cval[j];
                        m[idx(i, 1) * k + idx(j, 1)] += hij;
                    }
                }
            }
            // A tiny ridge keeps groups whose inputs never fire (zero rows of H) solvable.
            let tr = (0..k).map(|i| m[i * k + i]).sum::<f64>() / k as f64;
            let mm = Mat::<f64>::from_fn(k, k, |i, j| {
                m[i * k + j] + if i == j { 1e-9 * tr.max(1e-30) } else { 0.0 }
            });
            let Ok(llt) = mm.llt(Side::Lower) else {
                return (before, before, None);
            };
            let rhs = Mat::<f64>::from_fn(k, 1, |i, _| b[i]);
            let theta = llt.solve(&rhs);
            let params: Vec<(f16, f16)> = (0..gpr)
                .map(|g| {
                    if asym {
                        (
                            f16::from_f64(theta[(2 * g, 0)]),
                            f16::from_f64(theta[(2 * g + 1, 0)]),
                        )
                    } else {
                        (f16::from_f64(theta[(g, 0)]), f16::ZERO)
                    }
                })
                .collect();
            if params.iter().any(|(s, m)| !s.is_finite() || !m.is_finite()) {
                return (before, before, None);
            }
            let d1: Vec<f64> = (0..cols)
                .map(|c| {
                    let (s, mn) = params[grp[c]];
                    s.to_f64() * cval[c] + if asym { mn.to_f64() } else { 0.0 } - wr[c]
                })
                .collect();
            let after = row_err(&d1, h, cols);
            if after < before {
                (before, after, Some(params))
            } else {
                (before, before, None)
            }
        })
        .collect();
    let (mut tb, mut ta) = (0.0, 0.0);
    for (r, (b, a, p)) in results.into_iter().enumerate() {
        tb += b;
        ta += a;
        if let Some(p) = p {
            for (g, (s, m)) in p.into_iter().enumerate() {
                q.scales[r * gpr + g] = s;
                if asym {
                    q.mins[r * gpr + g] = m;
                }
            }
        }
    }
    (tb, ta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtn::{quantize_rtn, RtnConfig};

    #[test]
    fn refit_lowers_output_error_keeps_codes_and_reports_truthfully() {
        for grid in [Grid::Symmetric, Grid::Asymmetric] {
            let (rows, cols, n) = (16, 48, 200);
            let (w, _, h) = crate::test_layer((rows, cols, n), 11, (3, 8.0));
            let hm = h.matrix();
            let mut q = quantize_rtn(&w, rows, cols, &RtnConfig::new(3, 16, grid)).unwrap();
            let codes = q.codes.clone();
            let (before, after) = refit_scales(&mut q, &w, &hm);
            assert!(after < 0.95 * before, "{grid:?}: {before} -> {after}");
            assert_eq!(q.codes, codes);
            // The reported figure is the real error of the stored parameters.
            let deq = q.dequantize();
            let mut real = 0.0;
            for r in 0..rows {
                let d: Vec<f64> = (0..cols)
                    .map(|c| (deq[r * cols + c] - w[r * cols + c]) as f64)
                    .collect();
                real += row_err(&d, &hm, cols);
            }
            assert!(
                (real - after).abs() <= 1e-6 * after.max(1e-12),
                "{real} vs {after}"
            );
        }
    }
}

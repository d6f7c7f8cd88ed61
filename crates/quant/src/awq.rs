//! AWQ: activation-aware per-input-channel scaling.
//!
//! Channels that carry large activations matter more; multiplying their weight columns by
//! `s_j > 1` before rounding (and dividing the layer input by `s_j`, which the caller folds into
//! the preceding norm or layer so the network computes the same function) gives them a finer
//! effective grid. `s = a^α` with `a` the mean |activation| per channel; α is searched on a grid
//! to minimise the layers' output error on the calibration inputs, measured exactly as
//! `Σ_r Δw_r H Δw_rᵀ` from the input Gram matrix `H`, so no activations need to be kept.

use crate::rtn::{quantize_rtn, RtnConfig};
use crate::{Grid, QuantError};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct AwqConfig {
    pub bits: u8,
    pub group_size: usize,
    pub grid: Grid,
    /// Number of α values tried in [0, 1) (AutoAWQ uses 20).
    pub n_grid: usize,
}

#[derive(Debug, Clone)]
pub struct AwqSearch {
    /// Per-input-channel scales to multiply weight columns by (and divide inputs by).
    pub scales: Vec<f32>,
    pub alpha: f32,
    /// Output squared error summed over the layers with the chosen scales.
    pub error: f64,
    /// The same without scaling (α = 0): what the search bought.
    pub error_plain: f64,
}

/// `Σ_r (w_r − q_r) H (w_r − q_r)ᵀ` with `H` row-major `cols × cols`. Rows go in fixed chunks,
/// each a sequential faer product, and the chunk sums add in order: the result does not depend
/// on the thread count.
pub fn output_sq_error(w: &[f32], q: &[f32], cols: usize, h: &Mat<f64>) -> f64 {
    const CHUNK: usize = 64;
    let parts: Vec<f64> = w
        .par_chunks(CHUNK * cols)
        .zip(q.par_chunks(CHUNK * cols))
        .map(|(wc, qc)| {
            let r = wc.len() / cols;
            let d =
                Mat::<f64>::from_fn(r, cols, |i, j| (wc[i * cols + j] - qc[i * cols + j]) as f64);
            let mut dh = Mat::<f64>::zeros(r, cols);
            matmul(
                dh.as_mut(),
                Accum::Replace,
                d.as_ref(),
                h.as_ref(),
                1.0,
                Par::Seq,
            );
            let mut s = 0.0;
            for i in 0..r {
                for j in 0..cols {
                    s += dh[(i, j)] * d[(i, j)];
                }
            }
            s
        })
        .collect();
    parts.iter().sum()
}

/// Scales `s = a^α / sqrt(max · min)` (AutoAWQ's normalisation keeps them around 1).
pub fn scales_for(act: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = act.iter().map(|a| a.max(1e-4).powf(alpha)).collect();
    let (mx, mn) = s
        .iter()
        .fold((f32::MIN, f32::MAX), |(mx, mn), &v| (mx.max(v), mn.min(v)));
    let norm = (mx * mn).sqrt().max(1e-12);
    s.iter().map(|v| v / norm).collect()
}

/// Multiplies column `j` of a row-major matrix by `s[j]`.
pub fn scale_cols(w: &mut [f32], cols: usize, s: &[f32]) {
    for row in w.chunks_mut(cols) {
        for (x, k) in row.iter_mut().zip(s) {
            *x *= k;
        }
    }
}

/// Searches α for a group of layers that share one input (`layers`: row-major weights with
/// their row counts). `h` is the input's `2/n Σ xᵀx`, `act` the mean |x| per channel.
pub fn search_scales(
    layers: &[(&[f32], usize)],
    cols: usize,
    h: &[f64],
    act: &[f32],
    cfg: &AwqConfig,
) -> Result<AwqSearch, QuantError> {
    if act.len() != cols || h.len() != cols * cols {
        return Err(QuantError::Shape {
            rows: act.len(),
            cols,
            len: h.len(),
        });
    }
    let hm = Mat::<f64>::from_fn(cols, cols, |i, j| h[i * cols + j]);
    let rtn = RtnConfig {
        bits: cfg.bits,
        group_size: cfg.group_size,
        grid: cfg.grid,
    };
    let mut best: Option<AwqSearch> = None;
    let mut plain = 0.0;
    for k in 0..cfg.n_grid.max(1) {
        let alpha = k as f32 / cfg.n_grid.max(1) as f32;
        let s = scales_for(act, alpha);
        let mut err = 0.0;
        for &(w, rows) in layers {
            let mut ws = w.to_vec();
            scale_cols(&mut ws, cols, &s);
            let mut deq = quantize_rtn(&ws, rows, cols, &rtn)?.dequantize();
            let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
            scale_cols(&mut deq, cols, &inv);
            err += output_sq_error(w, &deq, cols, &hm);
        }
        if k == 0 {
            plain = err;
        }
        if best.as_ref().is_none_or(|b| err < b.error) {
            best = Some(AwqSearch {
                scales: s,
                alpha,
                error: err,
                error_plain: 0.0,
            });
        }
    }
    let mut b = best.expect("at least one grid point");
    b.error_plain = plain;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_lcg as lcg;

    #[test]
    fn scaling_salient_channels_lowers_output_error_and_never_loses() {
        let (rows, cols, n) = (32, 64, 256);
        // A few input channels carry 30x larger activations.
        let (w, x, h) = crate::test_layer((rows, cols, n), 7, (4, 30.0));
        let act: Vec<f32> = (0..cols)
            .map(|j| (0..n).map(|r| x[r * cols + j].abs()).sum::<f32>() / n as f32)
            .collect();
        let cfg = AwqConfig {
            bits: 3,
            group_size: 32,
            grid: Grid::Asymmetric,
            n_grid: 10,
        };
        let r = search_scales(&[(&w, rows)], cols, &h.matrix(), &act, &cfg).unwrap();
        assert!(r.alpha > 0.0, "no scaling chosen");
        assert!(
            r.error < 0.9 * r.error_plain,
            "{} vs {}",
            r.error,
            r.error_plain
        );
        assert!(r.scales[0] > r.scales[10]);
        // Deterministic.
        let again = search_scales(&[(&w, rows)], cols, &h.matrix(), &act, &cfg).unwrap();
        assert_eq!(r.scales, again.scales);
        assert_eq!(r.error.to_bits(), again.error.to_bits());
    }

    #[test]
    fn sq_error_matches_direct_sum() {
        let (rows, cols) = (70, 8);
        let mut seed = 3;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f32> = w.iter().map(|v| v + 0.01 * lcg(&mut seed)).collect();
        let h: Vec<f64> = (0..cols * cols)
            .map(|k| if k / cols == k % cols { 2.0 } else { 0.1 })
            .collect();
        let hm = Mat::<f64>::from_fn(cols, cols, |i, j| h[i * cols + j]);
        let mut direct = 0.0;
        for r in 0..rows {
            for i in 0..cols {
                for j in 0..cols {
                    let di = (w[r * cols + i] - q[r * cols + i]) as f64;
                    let dj = (w[r * cols + j] - q[r * cols + j]) as f64;
                    direct += di * h[i * cols + j] * dj;
                }
            }
        }
        let got = output_sq_error(&w, &q, cols, &hm);
        assert!((got - direct).abs() < 1e-9 * direct.abs().max(1.0));
    }
}

//! GPTQ (Frantar et al., 2022): quantize one column at a time and push each column's rounding
//! error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
//! inputs, so the layer's *output* error is what gets minimised.
//!
//! Rows are independent in GPTQ (the Hessian is shared, the updates are per row), so this CPU
//! version runs each row's whole column sweep as contiguous AXPYs, rows in parallel, instead of
//! the GPU formulation's lazy block updates. The result is the same arithmetic. Cholesky and
//! inverse come from faer.

use crate::ggml::{self, BlockHead, BlockType};
use crate::rtn::{code_at, value_at, Fit, RtnConfig};
use crate::{groups_per_row, Grid, QuantError, QuantizedTensor};
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptqConfig {
    pub bits: u8,
    /// Columns per group; 0 = per output channel.
    pub group_size: usize,
    pub grid: Grid,
    #[serde(flatten)]
    pub sweep: Sweep,
}

/// How the column sweep runs, on any grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// Dampening added to the Hessian diagonal, as a fraction of its mean (GPTQ uses 0.01).
    pub damp: f64,
    /// Quantize columns in order of decreasing Hessian diagonal. Group parameters are then
    /// fixed from the original weights ("static groups") so the stored layout is unchanged.
    pub act_order: bool,
    /// Fit each group's range by [`crate::range`]'s search, weighted by the Hessian diagonal,
    /// instead of its min/max.
    #[serde(default)]
    pub range_search: bool,
    /// Shrink the Hessian's off-diagonal terms by this fraction (0 = GPTQ's Hessian, 1 = its
    /// diagonal alone, which leaves no error to spread: importance-weighted rounding, as with
    /// llama.cpp's imatrix). The cross-correlations of one text's inputs are what GPTQ's error
    /// feedback exploits, and the part of them specific to that text is what does not carry
    /// over to another.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hessian_shrink: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Running sum of `xᵀx` over calibration rows for one layer input.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub dim: usize,
    sum: Vec<f64>,
    rows: usize,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Hessian {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// Adds a precomputed Gram matrix `xᵀx` (dim × dim, row-major) of `rows` input rows.
    pub fn add_gram(&mut self, gram: &[f32], rows: usize) {
        assert_eq!(gram.len(), self.sum.len(), "Gram matrix has the wrong size");
        for (s, &g) in self.sum.iter_mut().zip(gram) {
            *s += g as f64;
        }
        self.rows += rows;
    }

    /// Adds input rows directly (for small dims and tests).
    pub fn add_rows(&mut self, x: &[f32]) {
        let d = self.dim;
        for r in x.chunks_exact(d) {
            for (i, &xi) in r.iter().enumerate() {
                for (s, &xj) in self.sum[i * d..(i + 1) * d].iter_mut().zip(r) {
                    *s += xi as f64 * xj as f64;
                }
            }
            self.rows += 1;
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds another set of inputs' statistics (the same width).
    pub fn add(&mut self, other: &Hessian) {
        assert_eq!(self.dim, other.dim, "Hessians of different widths");
        for (s, o) in self.sum.iter_mut().zip(&other.sum) {
            *s += o;
        }
        self.rows += other.rows;
    }

    /// The diagonal of [`Hessian::matrix`]: each input's importance to the layer's output (what
    /// llama.cpp's importance matrix holds), without building the whole matrix.
    pub fn diagonal(&self) -> Vec<f32> {
        let k = 2.0 / self.rows.max(1) as f64;
        (0..self.dim)
            .map(|i| (self.sum[i * (self.dim + 1)] * k) as f32)
            .collect()
    }

    /// The statistics of inputs scaled per channel by `d` (`x_j → d_j x_j`): `D H D`.
    pub fn scaled(&self, d: &[f32]) -> Hessian {
        let n = self.dim;
        let mut sum = self.sum.clone();
        for i in 0..n {
            for j in 0..n {
                sum[i * n + j] *= d[i] as f64 * d[j] as f64;
            }
        }
        Hessian {
            dim: n,
            sum,
            rows: self.rows,
        }
    }

    /// `H = 2/n · Σ xᵀx`.
    pub fn matrix(&self) -> Vec<f64> {
        let k = self.factor();
        self.sum.iter().map(|v| v * k).collect()
    }

    /// [`Hessian::matrix`] as a faer matrix, built without the row-major copy.
    pub fn mat(&self) -> Mat<f64> {
        let (n, k) = (self.dim, self.factor());
        Mat::<f64>::from_fn(n, n, |i, j| self.sum[i * n + j] * k)
    }

    fn factor(&self) -> f64 {
        2.0 / self.rows.max(1) as f64
    }
}

/// `Σ_r (w_r − q_r) H (w_r − q_r)ᵀ / Σ_r w_r H w_rᵀ`: the relative error of the layer's output
/// on the calibration inputs, the quantity GPTQ minimises.
pub fn output_rel_error(w: &[f32], q: &[f32], cols: usize, h: &Hessian) -> f64 {
    let hm = h.mat();
    let rows = w.len() / cols;
    let num = crate::linalg::quad_rows(rows, cols, &hm, &|r, out| {
        let at = r * cols;
        for (o, (a, b)) in out.iter_mut().zip(w[at..].iter().zip(&q[at..])) {
            *o = (*a - *b) as f64;
        }
    });
    let den = crate::linalg::quad_rows(rows, cols, &hm, &|r, out| {
        for (o, a) in out.iter_mut().zip(&w[r * cols..]) {
            *o = *a as f64;
        }
    });
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Upper Cholesky factor of `(H + λI)⁻¹`, row-major. Each intermediate n×n matrix is freed as
/// soon as the next exists: for a 14336-wide layer each is 1.6 GB.
fn inverse_hessian_factor(mut m: Mat<f64>, n: usize, damp: f64) -> Result<Vec<f64>, QuantError> {
    let mean_diag = (0..n).map(|i| m[(i, i)]).sum::<f64>() / n as f64;
    let lambda = damp * mean_diag.max(1e-12);
    for i in 0..n {
        m[(i, i)] += lambda;
    }
    let llt = m.llt(Side::Lower).map_err(|_| {
        QuantError::Corrupt("Hessian is not positive definite even after dampening".into())
    })?;
    drop(m);
    let inv = llt.inverse();
    drop(llt);
    let l = inv
        .llt(Side::Lower)
        .map_err(|_| QuantError::Corrupt("inverse Hessian is not positive definite".into()))?;
    drop(inv);
    let lm = l.L();
    // U = Lᵀ, so U[i][j] = L[j][i].
    Ok((0..n * n)
        .map(|k| {
            if k % n >= k / n {
                lm[(k % n, k / n)]
            } else {
                0.0
            }
        })
        .collect())
}

/// What every GPTQ variant needs from the Hessian: dead inputs, the column order and the upper
/// Cholesky factor of the dampened inverse (in that order).
pub(crate) struct Prepared {
    pub dead: Vec<bool>,
    pub perm: Vec<usize>,
    pub u: Vec<f64>,
}

pub(crate) fn prepare(
    h: &Hessian,
    cols: usize,
    damp: f64,
    act_order: bool,
    shrink: f64,
) -> Result<Prepared, QuantError> {
    if !(0.0..=1.0).contains(&shrink) {
        return Err(QuantError::Corrupt(format!(
            "the Hessian shrinkage must lie in 0..=1, got {shrink}"
        )));
    }
    // The statistics as GPTQ uses them, built straight into the permuted matrix (no other
    // n×n copy): off-diagonal terms shrunk, an input that never fires given a unit diagonal
    // (it carries no information; its weights cannot matter and are zeroed).
    let k = 2.0 / h.rows().max(1) as f64;
    let diag: Vec<f64> = (0..cols).map(|i| h.sum[i * cols + i] * k).collect();
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    let diag: Vec<f64> = diag
        .iter()
        .zip(&dead)
        .map(|(&d, &z)| if z { 1.0 } else { d })
        .collect();
    let perm: Vec<usize> = if act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        p
    } else {
        (0..cols).collect()
    };
    let value = |a: usize, b: usize| {
        if a == b {
            return diag[a];
        }
        let v = h.sum[a * cols + b] * k;
        if shrink > 0.0 {
            v * (1.0 - shrink)
        } else {
            v
        }
    };
    let hp = Mat::<f64>::from_fn(cols, cols, |i, j| value(perm[i], perm[j]));
    let u = inverse_hessian_factor(hp, cols, damp)?;
    Ok(Prepared { dead, perm, u })
}

/// A row with dead inputs zeroed, and its working copy in quantization order.
pub(crate) fn start_row(row: &[f32], dead: &[bool], perm: &[usize]) -> (Vec<f32>, Vec<f64>) {
    let orig: Vec<f32> = row
        .iter()
        .zip(dead)
        .map(|(&v, &d)| if d { 0.0 } else { v })
        .collect();
    let x = perm.iter().map(|&c| orig[c] as f64).collect();
    (orig, x)
}

/// Rows of `W` swept together: each row of `U` is read once per tile instead of once per row.
const TILE: usize = 16;

/// GPTQ's column sweep over the rows of row-major `w` (`cols` wide), a tile of rows at a time:
/// `start` makes a row's state, `step(state, i)` does column `i` of that row, `finish` turns
/// the state into the row's result. Within a tile column `i` is done for every row before
/// column `i + 1`, so the row of `U` that column's update reads (1.6 GB in all for a 14336-wide
/// layer) comes from memory once per tile, not once per row. Rows never interact, and each
/// row's operations run in the same order as one row alone, so the codes are the same.
pub(crate) fn sweep_rows<S, R: Send>(
    w: &[f32],
    cols: usize,
    start: &(dyn Fn(&[f32]) -> S + Sync),
    step: &(dyn Fn(&mut S, usize) + Sync),
    finish: &(dyn Fn(S) -> R + Sync),
) -> Vec<R> {
    w.par_chunks(cols * TILE)
        .flat_map_iter(|tile| {
            let mut rows: Vec<S> = tile.chunks(cols).map(start).collect();
            for i in 0..cols {
                for r in &mut rows {
                    step(r, i);
                }
            }
            rows.into_iter().map(finish)
        })
        .collect()
}

/// GPTQ's update: column `i` was stored as `q`; spread its error over the columns after it.
#[inline]
pub(crate) fn push_error(x: &mut [f64], i: usize, q: f64, u: &[f64], cols: usize) {
    let err = (x[i] - q) / u[i * cols + i];
    let urow = &u[i * cols..(i + 1) * cols];
    for j in i + 1..cols {
        x[j] -= err * urow[j];
    }
}

/// GPTQ onto the exact grid of a GGML block type; returns the type's bytes (row-major blocks).
///
/// Block parameters are fitted when the sweep enters a block, from the error-updated weights
/// (as GPTQ fits its groups), weighting each column by its Hessian diagonal the way llama.cpp
/// uses an importance matrix. With `act_order` they are fitted once from the original weights
/// ("static groups"), since columns then arrive out of block order.
pub fn quantize_gptq_ggml(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    ty: BlockType,
    sweep: Sweep,
) -> Result<Vec<u8>, QuantError> {
    let Sweep {
        damp,
        act_order,
        range_search,
        hessian_shrink,
    } = sweep;
    if h.dim != cols {
        return Err(QuantError::Shape {
            rows,
            cols: h.dim,
            len: w.len(),
        });
    }
    if rows * cols != w.len() {
        return Err(QuantError::Shape {
            rows,
            cols,
            len: w.len(),
        });
    }
    if !ty.fits(cols) {
        return Err(QuantError::Corrupt(format!(
            "rows of {cols} values do not fit {}'s blocks of {}",
            ty.name(),
            ty.block_len()
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite(i));
    }
    let Prepared { dead, perm, u } = prepare(h, cols, damp, act_order, hessian_shrink)?;
    let imp = h.diagonal();
    let (n, sl) = (ty.block_len(), ty.sub_len());
    let nblocks = cols / n;
    struct Row {
        x: Vec<f64>,
        heads: Vec<Option<BlockHead>>,
        codes: Vec<u8>,
    }
    let start = |row: &[f32]| {
        let (orig, x) = start_row(row, &dead, &perm);
        let mut heads: Vec<Option<BlockHead>> = vec![None; nblocks];
        if act_order {
            for (b, hd) in heads.iter_mut().enumerate() {
                let r = b * n..(b + 1) * n;
                *hd = Some(ggml::fit_block(
                    ty,
                    &orig[r.clone()],
                    Some(&imp[r]),
                    range_search,
                ));
            }
        }
        Row {
            x,
            heads,
            codes: vec![0u8; cols],
        }
    };
    let step = |r: &mut Row, i: usize| {
        let c = perm[i];
        let b = c / n;
        if r.heads[b].is_none() {
            // Natural order: the block's columns are all still ahead, at x[c..c + n].
            let cur: Vec<f32> = r.x[c..c + n].iter().map(|&v| v as f32).collect();
            r.heads[b] = Some(ggml::fit_block(
                ty,
                &cur,
                Some(&imp[c..c + n]),
                range_search,
            ));
        }
        let g = ggml::affine(ty, r.heads[b].as_ref().unwrap(), (c % n) / sl);
        let code = g.code(r.x[i] as f32);
        r.codes[c] = code;
        push_error(&mut r.x, i, g.value(code) as f64, &u, cols);
    };
    let finish = |r: Row| {
        let mut out = Vec::with_capacity(ty.bytes_for(cols));
        for b in 0..nblocks {
            ggml::encode_block(
                ty,
                r.heads[b].as_ref().unwrap(),
                &r.codes[b * n..(b + 1) * n],
                &mut out,
            );
        }
        out
    };
    let rows_out = sweep_rows(w, cols, &start, &step, &finish);
    Ok(rows_out.concat())
}

/// Quantizes `w` (row-major `rows × cols`, rows = output channels) with GPTQ against the
/// inputs summarised by `h` (dim = cols).
pub fn quantize_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    cfg: &GptqConfig,
) -> Result<QuantizedTensor, QuantError> {
    if h.dim != cols {
        return Err(QuantError::Shape {
            rows,
            cols: h.dim,
            len: w.len(),
        });
    }
    let gs = crate::check_input(w, rows, cols, cfg.bits, cfg.group_size)?;
    let gpr = groups_per_row(cols, gs);
    let Sweep {
        damp,
        act_order,
        range_search,
        hessian_shrink,
    } = cfg.sweep;
    let Prepared { dead, perm, u } = prepare(h, cols, damp, act_order, hessian_shrink)?;
    let imp: Vec<f32>;
    let fit = if range_search {
        imp = h.diagonal();
        Fit::Search(Some(&imp))
    } else {
        Fit::MinMax
    };

    struct Row {
        x: Vec<f64>,
        scales: Vec<f16>,
        mins: Vec<f16>,
        /// The same, widened once.
        wide: Vec<(f32, f32)>,
        codes: Vec<u8>,
        scratch: Vec<u8>,
    }
    let start = |row: &[f32]| {
        let (orig, x) = start_row(row, &dead, &perm);
        let mut r = Row {
            x,
            scales: vec![f16::ZERO; gpr],
            mins: vec![f16::ZERO; gpr],
            wide: vec![(0f32, 0f32); gpr],
            codes: vec![0u8; cols],
            scratch: vec![0u8; gs],
        };
        if act_order {
            for g in 0..gpr {
                let (c0, c1) = (g * gs, ((g + 1) * gs).min(cols));
                let (s, m) = fit.group(
                    &orig[c0..c1],
                    c0,
                    cfg.bits,
                    cfg.grid,
                    &mut r.scratch[..c1 - c0],
                );
                r.scales[g] = s;
                r.mins[g] = m;
                r.wide[g] = (s.to_f32(), m.to_f32());
            }
        }
        r
    };
    let step = |r: &mut Row, i: usize| {
        let c = perm[i];
        let g = c / gs;
        if !act_order && c.is_multiple_of(gs) {
            let c1 = (c + gs).min(cols);
            let cur: Vec<f32> = r.x[c..c1].iter().map(|&v| v as f32).collect();
            let (s, m) = fit.group(&cur, c, cfg.bits, cfg.grid, &mut r.scratch[..c1 - c]);
            r.scales[g] = s;
            r.mins[g] = m;
            r.wide[g] = (s.to_f32(), m.to_f32());
        }
        let (s, m) = r.wide[g];
        let code = code_at(r.x[i] as f32, s, m, cfg.bits, cfg.grid);
        r.codes[c] = code;
        let q = value_at(code, s, m, cfg.bits, cfg.grid) as f64;
        push_error(&mut r.x, i, q, &u, cols);
    };
    let finish = |r: Row| (r.codes, r.scales, r.mins);
    let results = sweep_rows(w, cols, &start, &step, &finish);

    let mut all_codes = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows * gpr);
    let mut mins = Vec::new();
    for (c, s, m) in results {
        all_codes.extend(c);
        scales.extend(s);
        mins.extend(m);
    }
    Ok(RtnConfig::new(cfg.bits, gs, cfg.grid).packed(rows, cols, &all_codes, scales, mins))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtn::quantize_rtn;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Correlated inputs with a few strong channels, like real activations.
    fn inputs(n: usize, d: usize, rng: &mut Rng) -> Vec<f32> {
        let mut x = vec![0f32; n * d];
        for r in 0..n {
            let common = rng.f();
            for c in 0..d {
                let scale = if c % 7 == 0 { 4.0 } else { 1.0 };
                x[r * d + c] = scale * (rng.f() + 0.8 * common);
            }
        }
        x
    }

    /// GPTQ as published: dampening 0.01, no activation order, range search or shrinkage.
    fn plain(bits: u8, group_size: usize, grid: Grid) -> GptqConfig {
        GptqConfig {
            bits,
            group_size,
            grid,
            sweep: Sweep {
                damp: 0.01,
                act_order: false,
                range_search: false,
                hessian_shrink: 0.0,
            },
        }
    }

    fn setup(rows: usize, cols: usize) -> (Vec<f32>, Hessian) {
        let mut rng = Rng(99);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.f() * 0.1).collect();
        let x = inputs(256, cols, &mut rng);
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        (w, h)
    }

    #[test]
    fn beats_rtn_on_output_error() {
        let (rows, cols) = (24, 96);
        let (w, h) = setup(rows, cols);
        for (bits, grid, act_order) in [
            (3, Grid::Asymmetric, false),
            (4, Grid::Symmetric, false),
            (2, Grid::Asymmetric, true),
            (3, Grid::Symmetric, true),
        ] {
            let rtn = quantize_rtn(&w, rows, cols, &RtnConfig::new(bits, 32, grid)).unwrap();
            let mut cfg = plain(bits, 32, grid);
            cfg.sweep.act_order = act_order;
            let g = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
            let er = output_rel_error(&w, &rtn.dequantize(), cols, &h);
            let eg = output_rel_error(&w, &g.dequantize(), cols, &h);
            assert!(
                eg < 0.8 * er,
                "bits {bits} {grid:?} act_order {act_order}: GPTQ {eg} vs RTN {er}"
            );
        }
    }

    #[test]
    fn hessian_shrink_runs_from_gptq_to_rounding() {
        let (rows, cols) = (24, 96);
        let (w, h) = setup(rows, cols);
        let run = |shrink: f64| {
            let mut cfg = plain(3, 32, Grid::Asymmetric);
            cfg.sweep.hessian_shrink = shrink;
            quantize_gptq(&w, rows, cols, &h, &cfg)
        };
        // The diagonal alone spreads no error: the codes are round-to-nearest's.
        let rtn = quantize_rtn(&w, rows, cols, &RtnConfig::new(3, 32, Grid::Asymmetric)).unwrap();
        assert_eq!(run(1.0).unwrap().codes, rtn.codes);
        // In between, the error on the true Hessian lies between the two ends' here.
        let err = |s: f64| output_rel_error(&w, &run(s).unwrap().dequantize(), cols, &h);
        let (e0, e_half, e1) = (err(0.0), err(0.5), err(1.0));
        assert!(e0 < e_half && e_half < e1, "{e0} {e_half} {e1}");
        assert!(run(1.5).is_err() && run(-0.1).is_err());
    }

    /// Rows swept in tiles give each row the codes it gets swept alone (37 rows: two full
    /// tiles and a short one).
    #[test]
    fn tiles_of_rows_give_each_row_its_own_codes() {
        let (rows, cols) = (37, 64);
        let (w, h) = setup(rows, cols);
        for act_order in [false, true] {
            let mut cfg = plain(3, 32, Grid::Asymmetric);
            cfg.sweep.act_order = act_order;
            let all = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
            let alone: Vec<QuantizedTensor> = w
                .chunks(cols)
                .map(|row| quantize_gptq(row, 1, cols, &h, &cfg).unwrap())
                .collect();
            let deq = all.dequantize();
            for (r, q) in alone.iter().enumerate() {
                assert_eq!(q.dequantize(), deq[r * cols..(r + 1) * cols], "row {r}");
            }
            let ty = BlockType::Q4_0;
            let all = quantize_gptq_ggml(&w, rows, cols, &h, ty, cfg.sweep).unwrap();
            let row_bytes = ty.bytes_for(cols);
            for (r, row) in w.chunks(cols).enumerate() {
                let one = quantize_gptq_ggml(row, 1, cols, &h, ty, cfg.sweep).unwrap();
                assert_eq!(one, all[r * row_bytes..(r + 1) * row_bytes], "row {r}");
            }
        }
    }

    #[test]
    fn codes_lie_on_the_stored_grid_and_are_deterministic() {
        let (rows, cols) = (8, 80); // 80 = 2×32 + 16: a short last group
        let (w, h) = setup(rows, cols);
        let cfg = plain(3, 32, Grid::Asymmetric);
        let a = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
        let b = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.groups_per_row(), 3);
        assert_eq!(a.scales.len(), 24);
        let (c, s, m) = QuantizedTensor::expected_lengths(rows, cols, 3, 32, Grid::Asymmetric);
        assert_eq!(
            (a.codes.len(), a.scales.len() * 2, a.mins.len() * 2),
            (c, s, m)
        );
    }

    #[test]
    fn dead_inputs_get_zero_weight() {
        let (rows, cols) = (4, 16);
        let (w, _) = setup(rows, cols);
        let mut rng = Rng(5);
        let mut x = inputs(64, cols, &mut rng);
        for r in 0..64 {
            x[r * cols + 3] = 0.0;
        }
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        let cfg = plain(4, 0, Grid::Symmetric);
        let q = quantize_gptq(&w, rows, cols, &h, &cfg)
            .unwrap()
            .dequantize();
        for r in 0..rows {
            assert_eq!(q[r * cols + 3], 0.0);
        }
    }

    #[test]
    fn range_search_lowers_the_output_error_at_low_bits() {
        let (rows, cols) = (32, 128);
        let (_, h) = setup(rows, cols);
        let mut rng = Rng(5);
        // Bell-shaped weights with rare large ones, as trained layers have.
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let v = (rng.f() + rng.f() + rng.f() + rng.f()) * 0.05;
                if i % 61 == 0 {
                    v * 6.0
                } else {
                    v
                }
            })
            .collect();
        for (bits, grid, act_order) in [
            (2, Grid::Asymmetric, false),
            (2, Grid::Asymmetric, true),
            (3, Grid::Asymmetric, false),
            (3, Grid::Symmetric, true),
        ] {
            let err = |range_search: bool| {
                let mut cfg = plain(bits, 64, grid);
                cfg.sweep.act_order = act_order;
                cfg.sweep.range_search = range_search;
                let q = quantize_gptq(&w, rows, cols, &h, &cfg).unwrap();
                output_rel_error(&w, &q.dequantize(), cols, &h)
            };
            let (plain, searched) = (err(false), err(true));
            assert!(
                searched < 0.95 * plain,
                "{bits}-bit {grid:?} act_order {act_order}: {searched} vs {plain}"
            );
        }
    }

    #[test]
    fn gram_and_rows_agree() {
        let mut rng = Rng(3);
        let x = inputs(10, 6, &mut rng);
        let mut a = Hessian::new(6);
        a.add_rows(&x);
        let mut gram = vec![0f32; 36];
        for r in x.chunks(6) {
            for i in 0..6 {
                for j in 0..6 {
                    gram[i * 6 + j] += r[i] * r[j];
                }
            }
        }
        let mut b = Hessian::new(6);
        b.add_gram(&gram, 10);
        for (p, q) in a.matrix().iter().zip(b.matrix()) {
            assert!((p - q).abs() < 1e-4);
        }
    }

    #[test]
    fn gptq_onto_ggml_grids_beats_their_rtn_and_is_deterministic() {
        use crate::ggml::{self, BlockType};
        let (rows, cols) = (12, 512);
        let (w, h) = setup(rows, cols);
        for (ty, act_order) in [
            (BlockType::Q4_0, false),
            (BlockType::Q4_1, true),
            (BlockType::Q5_0, false),
            (BlockType::Q3K, false),
            (BlockType::Q4K, true),
            (BlockType::Q6K, false),
            (BlockType::Q2K, false),
            (BlockType::IQ4NL, true),
            (BlockType::IQ4XS, false),
        ] {
            let rtn = ggml::quantize_rtn(ty, &w, rows, cols, None, false).unwrap();
            let sweep = Sweep {
                damp: 0.01,
                act_order,
                range_search: false,
                hessian_shrink: 0.0,
            };
            let g = quantize_gptq_ggml(&w, rows, cols, &h, ty, sweep).unwrap();
            assert_eq!(g.len(), rtn.len());
            let again = quantize_gptq_ggml(&w, rows, cols, &h, ty, sweep).unwrap();
            assert_eq!(g, again, "{}: not deterministic", ty.name());
            let deq = |b: &[u8]| ggml::dequantize(ty, b, w.len()).unwrap();
            let er = output_rel_error(&w, &deq(&rtn), cols, &h);
            let eg = output_rel_error(&w, &deq(&g), cols, &h);
            assert!(
                eg < 0.8 * er,
                "{} act_order {act_order}: GPTQ {eg} vs RTN {er}",
                ty.name()
            );
        }
    }
}

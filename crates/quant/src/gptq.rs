//! GPTQ (Frantar et al., 2022): quantize one column at a time and push each column's rounding
//! error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
//! inputs, so the layer's *output* error is what gets minimised.
//!
//! Rows are independent in GPTQ (the Hessian is shared, the updates are per row), so this CPU
//! version sweeps tiles of rows in parallel, each column's error pushed at once within its block
//! of columns and to the rest of the row when the block is done (the GPU formulation's lazy
//! batch, in the same arithmetic order as pushing each error to the whole row). The Cholesky
//! factorisation and triangular solves come from faer.

use crate::ggml::{self, BlockHead, BlockType};
use crate::rtn::{code_at, value_at, Fit, RtnConfig};
use crate::{groups_per_row, Grid, QuantError, QuantizedTensor};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, MatMut, MatRef, Par};
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
    /// Set each group's step to this multiple of its RMS ([`Fit::Step`]) instead of fitting
    /// its range; takes the place of `range_search`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<f32>,
}

impl Sweep {
    /// How each group's grid is fitted; `imp` is the Hessian diagonal the search weighs by.
    fn fit<'a>(&self, imp: &'a [f32]) -> Fit<'a> {
        Fit::of(self.step, self.range_search, Some(imp))
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Running sum of `xᵀx` over calibration rows for one layer input, in f32 as GPTQ's reference
/// keeps it: for a 14336-wide layer it is 0.8 GB, and GPTQ's factorisation needs another n×n
/// matrix (in f64) beside it.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub dim: usize,
    sum: Vec<f32>,
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

    /// Adds input rows (row-major, `dim` wide): `xᵀx` is multiplied straight into the sums, so
    /// no n×n temporary exists (for a 14336-wide input it would be another 0.8 GB).
    pub fn add_inputs(&mut self, x: &[f32]) {
        let (n, rows) = (self.dim, x.len() / self.dim.max(1));
        assert_eq!(rows * n, x.len(), "input rows have the wrong width");
        let xm = MatRef::from_row_major_slice(x, rows, n);
        // The sums are symmetric, so their row-major storage reads as column-major.
        let sums = MatMut::from_column_major_slice_mut(&mut self.sum, n, n);
        matmul(sums, Accum::Add, xm.transpose(), xm, 1.0, Par::rayon(0));
        self.rows += rows;
    }

    /// Adds input rows one product at a time (for small dims and tests).
    pub fn add_rows(&mut self, x: &[f32]) {
        let d = self.dim;
        for r in x.chunks_exact(d) {
            for (i, &xi) in r.iter().enumerate() {
                for (s, &xj) in self.sum[i * d..(i + 1) * d].iter_mut().zip(r) {
                    *s += xi * xj;
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
        let k = self.factor();
        (0..self.dim)
            .map(|i| (self.sum[i * (self.dim + 1)] as f64 * k) as f32)
            .collect()
    }

    /// The statistics of inputs scaled per channel by `d` (`x_j → d_j x_j`): `D H D`.
    pub fn scaled(&self, d: &[f32]) -> Hessian {
        let n = self.dim;
        let mut sum = self.sum.clone();
        for i in 0..n {
            for j in 0..n {
                sum[i * n + j] = (sum[i * n + j] as f64 * d[i] as f64 * d[j] as f64) as f32;
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
        self.sum.iter().map(|&v| v as f64 * k).collect()
    }

    /// `H` at row `i`, column `j`.
    #[inline]
    fn at(&self, i: usize, j: usize) -> f64 {
        self.sum[i * self.dim + j] as f64 * self.factor()
    }

    /// `H` as [`crate::linalg::quad_rows`] reads it: widened a panel at a time.
    fn href(&self) -> crate::linalg::HRef<'_> {
        crate::linalg::HRef::SymF32 {
            sums: &self.sum,
            factor: self.factor(),
        }
    }

    fn factor(&self) -> f64 {
        2.0 / self.rows.max(1) as f64
    }
}

/// `Σ_r (w_r − q_r) H (w_r − q_r)ᵀ / Σ_r w_r H w_rᵀ`: the relative error of the layer's output
/// on the calibration inputs, the quantity GPTQ minimises.
pub fn output_rel_error(w: &[f32], q: &[f32], cols: usize, h: &Hessian) -> f64 {
    ratio(output_error(w, q, cols, h), output_energy(w, cols, h))
}

/// `num / den`, 0 when `den` is not positive (a layer whose inputs never fire).
pub fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// `Σ_r (w_r − q_r) H (w_r − q_r)ᵀ`, in f64 from the f32 sums without an n×n copy.
pub fn output_error(w: &[f32], q: &[f32], cols: usize, h: &Hessian) -> f64 {
    crate::linalg::quad_rows(w.len() / cols, cols, h.href(), &|r, out| {
        let at = r * cols;
        for (o, (a, b)) in out.iter_mut().zip(w[at..].iter().zip(&q[at..])) {
            *o = (*a - *b) as f64;
        }
    })
}

/// `Σ_r w_r H w_rᵀ`: the output's energy, [`output_error`]'s scale.
pub fn output_energy(w: &[f32], cols: usize, h: &Hessian) -> f64 {
    crate::linalg::quad_rows(w.len() / cols, cols, h.href(), &|r, out| {
        for (o, a) in out.iter_mut().zip(&w[r * cols..]) {
            *o = *a as f64;
        }
    })
}

/// Upper Cholesky factor `U` of `(H + λI)⁻¹`, row-major, where `h(i, j)` is `H` in sweep
/// order, built in one n×n buffer (for a 14336-wide layer 1.6 GB; inverse-then-factor held
/// three). With `J` the order reversal, `J (H + λI) J = L Lᵀ` gives
/// `(H + λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`, and `J L⁻¹ J` is upper triangular with a positive
/// diagonal: it is `U`. So one factorisation and one triangular inverse, both in place.
fn inverse_hessian_factor(
    n: usize,
    h: &(dyn Fn(usize, usize) -> f64 + Sync),
    damp: f64,
) -> Result<Vec<f64>, QuantError> {
    let mean_diag = (0..n).map(|i| h(i, i)).sum::<f64>() / n as f64;
    let lambda = damp * mean_diag.max(1e-12);
    // Column-major J (H + λI) J, lower triangle (from H's lower triangle, read along its
    // rows); the factorisation's result is read from the lower triangle only.
    let mut buf = vec![0f64; n * n];
    buf.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(b, col)| {
            for (a, v) in col.iter_mut().enumerate().skip(b) {
                *v = h(n - 1 - b, n - 1 - a) + if a == b { lambda } else { 0.0 };
            }
        });
    let par = Par::rayon(0);
    {
        use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
        let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, par, Default::default()));
        cholesky_in_place(
            MatMut::from_column_major_slice_mut(&mut buf, n, n),
            Default::default(),
            par,
            MemStack::new(&mut mem),
            Default::default(),
        )
        .map_err(|_| {
            QuantError::Corrupt("Hessian is not positive definite even after dampening".into())
        })?;
    }
    invert_lower_in_place(&mut buf, n, par);
    // buf holds L⁻¹ column-major, so U[i][j] = L⁻¹[n-1-i][n-1-j] = buf[n² - 1 - (j·n + i)]:
    // reversed, buf is U column-major.
    buf.reverse();
    transpose_in_place(&mut buf, n);
    Ok(buf)
}

/// Replaces `L` (column-major, lower triangular, `n × n`) by `L⁻¹`, a panel of columns at a
/// time: panel `J` of `L⁻¹` is `L[j0.., j0..]⁻¹ E_J`, which reads only columns from `j0` on,
/// so each solved panel can take its own columns' place. The upper triangle becomes zero.
fn invert_lower_in_place(buf: &mut [f64], n: usize, par: Par) {
    const PANEL: usize = 128;
    let mut panel = vec![0f64; n * PANEL.min(n)];
    for j0 in (0..n).step_by(PANEL) {
        let (jb, m) = (PANEL.min(n - j0), n - j0);
        let p = &mut panel[..m * jb];
        p.fill(0.0);
        for k in 0..jb {
            p[k * m + k] = 1.0;
        }
        let l = MatRef::from_column_major_slice(buf, n, n).submatrix(j0, j0, m, m);
        solve_lower_triangular_in_place(l, MatMut::from_column_major_slice_mut(p, m, jb), par);
        for k in 0..jb {
            let col = &mut buf[(j0 + k) * n..(j0 + k + 1) * n];
            col[..j0].fill(0.0);
            col[j0..].copy_from_slice(&p[k * m..(k + 1) * m]);
        }
    }
}

/// Transposes a row-major `n × n` matrix in place, in tiles so both sides stay in cache.
fn transpose_in_place(buf: &mut [f64], n: usize) {
    const T: usize = 64;
    for i0 in (0..n).step_by(T) {
        for j0 in (i0..n).step_by(T) {
            for i in i0..(i0 + T).min(n) {
                for j in j0.max(i + 1)..(j0 + T).min(n) {
                    buf.swap(i * n + j, j * n + i);
                }
            }
        }
    }
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
    let diag: Vec<f64> = (0..cols).map(|i| h.at(i, i)).collect();
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
        let v = h.at(a, b);
        if shrink > 0.0 {
            v * (1.0 - shrink)
        } else {
            v
        }
    };
    let u = inverse_hessian_factor(cols, &|i, j| value(perm[i], perm[j]), damp)?;
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
const TILE: usize = 32;

/// Columns whose errors reach the columns after them together, once the block is done (GPTQ's
/// lazy batch): a row is then streamed once per block, not once per column.
const BLOCK: usize = 128;

/// Columns of a row updated at a time after a block: that stretch of the row stays in L1 and
/// the block's rows of `U` over it in L2 while every row of the tile passes.
const STRETCH: usize = 256;

#[cfg(test)]
thread_local! {
    /// Tests: one block per row, so every error reaches the whole row at once.
    static SWEEP_WHOLE_ROWS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Where the block starting at sweep position `i1` ends. A group's parameters are fitted from
/// its columns' current values when the sweep enters it (`group`: natural order), so a group
/// must lie inside one block or start one: blocks are whole groups, or end at a group start.
fn block_end(i1: usize, cols: usize, group: Option<usize>, block: usize) -> usize {
    let end = match group {
        Some(g) if g > 0 && g <= block => i1 + block / g * g,
        Some(g) if g > 0 => (i1 + block).min((i1 / g + 1) * g),
        _ => i1 + block,
    };
    end.min(cols)
}

/// Makes a row's state and its working copy in sweep order.
pub(crate) type RowStart<'a, S> = dyn Fn(&[f32]) -> (S, Vec<f64>) + Sync + 'a;

/// GPTQ's column sweep over the rows of row-major `w` (`cols` wide) against `U`, a tile of
/// rows at a time: `start` makes a row's state and working copy `x` (sweep order),
/// `step(state, x, i)` stores column `i` and returns the value stored, `finish` turns the state
/// into the row's result. Column `i`'s error `(x_i − q) / U_ii` goes at once to the rest of its
/// block and, when the block is done, to the columns after it (`group` as in [`block_end`]).
/// Every `x_j` still receives each earlier column's update in column order, so the codes are
/// those of pushing each error to the whole row at once, and a row's codes do not depend on
/// the rows beside it.
pub(crate) fn sweep_rows<S, R: Send>(
    w: &[f32],
    cols: usize,
    u: &[f64],
    group: Option<usize>,
    start: &RowStart<'_, S>,
    step: &(dyn Fn(&mut S, &[f64], usize) -> f64 + Sync),
    finish: &(dyn Fn(S) -> R + Sync),
) -> Vec<R> {
    #[cfg(not(test))]
    let block = BLOCK;
    // A whole number of groups covering the row: `block_end` then ends the first block at
    // the row's end.
    #[cfg(test)]
    let block = match (SWEEP_WHOLE_ROWS.with(|b| b.get()), group) {
        (true, Some(g)) if g > 0 => cols.div_ceil(g) * g,
        (true, _) => cols.max(1),
        (false, _) => BLOCK,
    };
    w.par_chunks(cols * TILE)
        .flat_map_iter(|tile| {
            let (mut rows, mut xs): (Vec<S>, Vec<Vec<f64>>) = tile.chunks(cols).map(start).unzip();
            let mut errs = vec![0f64; xs.len() * block];
            let mut i1 = 0;
            while i1 < cols {
                let i2 = block_end(i1, cols, group, block);
                for i in i1..i2 {
                    let (urow, ui) = (&u[i * cols + i + 1..i * cols + i2], u[i * cols + i]);
                    for (r, (s, x)) in rows.iter_mut().zip(&mut xs).enumerate() {
                        let e = (x[i] - step(s, x, i)) / ui;
                        errs[r * block + i - i1] = e;
                        for (xj, uj) in x[i + 1..i2].iter_mut().zip(urow) {
                            *xj -= e * uj;
                        }
                    }
                }
                for j0 in (i2..cols).step_by(STRETCH) {
                    let j1 = (j0 + STRETCH).min(cols);
                    for (x, es) in xs.iter_mut().zip(errs.chunks(block)) {
                        trailing_update(&mut x[j0..j1], &es[..i2 - i1], &u[i1 * cols + j0..], cols);
                    }
                }
                i1 = i2;
            }
            rows.into_iter().map(finish)
        })
        .collect()
}

/// `x_j −= e_k u[k·stride + j]` for each `k` in order, four `k` at a time so `x_j` is loaded and
/// stored once per four updates; the same operations in the same order as one `k` at a time.
/// Compiled for AVX2 as well when the CPU has it (wider lanes, no fused multiply-add, so the
/// same bits).
fn trailing_update(x: &mut [f64], e: &[f64], u: &[f64], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { trailing_update_avx2(x, e, u, stride) };
    }
    trailing_update_any(x, e, u, stride)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn trailing_update_avx2(x: &mut [f64], e: &[f64], u: &[f64], stride: usize) {
    trailing_update_any(x, e, u, stride)
}

#[inline(always)]
fn trailing_update_any(x: &mut [f64], e: &[f64], u: &[f64], stride: usize) {
    let n = x.len();
    let urow = |k: usize| &u[k * stride..k * stride + n];
    let quads = e.len() / 4 * 4;
    for k in (0..quads).step_by(4) {
        let (u0, u1, u2, u3) = (urow(k), urow(k + 1), urow(k + 2), urow(k + 3));
        let (e0, e1, e2, e3) = (e[k], e[k + 1], e[k + 2], e[k + 3]);
        for ((((xj, a), b), c), d) in x.iter_mut().zip(u0).zip(u1).zip(u2).zip(u3) {
            *xj = *xj - e0 * a - e1 * b - e2 * c - e3 * d;
        }
    }
    for (k, &ek) in e.iter().enumerate().skip(quads) {
        for (xj, uj) in x.iter_mut().zip(urow(k)) {
            *xj -= ek * uj;
        }
    }
}

/// GPTQ's update: column `i` was stored as `q`; spread its error over the columns after it.
#[inline]
pub(crate) fn push_error(x: &mut [f64], i: usize, q: f64, u: &[f64], cols: usize) {
    let err = (x[i] - q) / u[i * cols + i];
    for (xj, uj) in x[i + 1..]
        .iter_mut()
        .zip(&u[i * cols + i + 1..(i + 1) * cols])
    {
        *xj -= err * uj;
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
        ..
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
        (
            Row {
                heads,
                codes: vec![0u8; cols],
            },
            x,
        )
    };
    let step = |r: &mut Row, x: &[f64], i: usize| {
        let c = perm[i];
        let b = c / n;
        if r.heads[b].is_none() {
            // Natural order: the block's columns are all still ahead, at x[c..c + n].
            let cur: Vec<f32> = x[c..c + n].iter().map(|&v| v as f32).collect();
            r.heads[b] = Some(ggml::fit_block(
                ty,
                &cur,
                Some(&imp[c..c + n]),
                range_search,
            ));
        }
        let g = ggml::affine(ty, r.heads[b].as_ref().unwrap(), (c % n) / sl);
        let code = g.code(x[i] as f32);
        r.codes[c] = code;
        g.value(code) as f64
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
    let group = (!act_order).then_some(n);
    let rows_out = sweep_rows(w, cols, &u, group, &start, &step, &finish);
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
        ..
    } = cfg.sweep;
    let Prepared { dead, perm, u } = prepare(h, cols, damp, act_order, hessian_shrink)?;
    let imp = if range_search {
        h.diagonal()
    } else {
        Vec::new()
    };
    let fit = cfg.sweep.fit(&imp);

    struct Row {
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
        (r, x)
    };
    let step = |r: &mut Row, x: &[f64], i: usize| {
        let c = perm[i];
        let g = c / gs;
        if !act_order && c.is_multiple_of(gs) {
            let c1 = (c + gs).min(cols);
            let cur: Vec<f32> = x[c..c1].iter().map(|&v| v as f32).collect();
            let (s, m) = fit.group(&cur, c, cfg.bits, cfg.grid, &mut r.scratch[..c1 - c]);
            r.scales[g] = s;
            r.mins[g] = m;
            r.wide[g] = (s.to_f32(), m.to_f32());
        }
        let (s, m) = r.wide[g];
        let code = code_at(x[i] as f32, s, m, cfg.bits, cfg.grid);
        r.codes[c] = code;
        value_at(code, s, m, cfg.bits, cfg.grid) as f64
    };
    let finish = |r: Row| (r.codes, r.scales, r.mins);
    let group = (!act_order).then_some(gs);
    let results = sweep_rows(w, cols, &u, group, &start, &step, &finish);

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
                step: None,
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

    /// The four-at-a-time update gives the bits of one error at a time, in order (7 errors:
    /// a group of four and three left over; both the AVX2 and the plain build).
    #[test]
    fn trailing_update_is_one_error_at_a_time() {
        let mut rng = Rng(11);
        let (len, stride, k) = (37, 50, 7);
        let u: Vec<f64> = (0..k * stride).map(|_| rng.f() as f64 * 1.37).collect();
        let e: Vec<f64> = (0..k).map(|_| rng.f() as f64 * 0.91).collect();
        let x0: Vec<f64> = (0..len).map(|_| rng.f() as f64 * 3.1).collect();
        let mut want = x0.clone();
        for (j, &ej) in e.iter().enumerate() {
            for (xi, ui) in want.iter_mut().zip(&u[j * stride..]) {
                *xi -= ej * ui;
            }
        }
        let (mut fast, mut plain) = (x0.clone(), x0);
        trailing_update(&mut fast, &e, &u, stride);
        trailing_update_any(&mut plain, &e, &u, stride);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&want));
        assert_eq!(bits(&plain), bits(&want));
    }

    /// Errors pushed a block at a time give the codes of pushing each to the whole row at
    /// once, for group sizes below, at, above and across the block width, and per channel.
    #[test]
    fn blocked_sweep_gives_the_unblocked_codes() {
        let (rows, cols) = (40, 600);
        let (w, h) = setup(rows, cols);
        // One worker thread, so the flag set on it is the one the sweep reads.
        let both = |f: &(dyn Fn() -> Vec<u8> + Sync)| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let run = |whole: bool| {
                pool.install(|| {
                    SWEEP_WHOLE_ROWS.with(|b| b.set(whole));
                    f()
                })
            };
            (run(false), run(true))
        };
        for (gs, act_order) in [
            (32, false),
            (48, false),
            (128, false),
            (200, false),
            (0, false),
            (64, true),
        ] {
            let mut cfg = plain(3, gs, Grid::Asymmetric);
            cfg.sweep.act_order = act_order;
            let (a, b) = both(&|| quantize_gptq(&w, rows, cols, &h, &cfg).unwrap().codes);
            assert_eq!(a, b, "group {gs} act_order {act_order}");
        }
        for ty in [BlockType::Q4_0, BlockType::Q4K] {
            let cols = 512;
            let (w, h) = setup(rows, cols);
            let sweep = plain(4, 32, Grid::Symmetric).sweep;
            let (a, b) = both(&|| quantize_gptq_ggml(&w, rows, cols, &h, ty, sweep).unwrap());
            assert_eq!(a, b, "{}", ty.name());
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

    /// The in-place factor is the upper Cholesky factor of the dampened inverse (checked as
    /// `Uᵀ U (H + λI) = I`), across two panels and a short one, and the same bits whatever the
    /// thread count.
    #[test]
    fn inverse_factor_in_place() {
        let n = 300;
        let (_, h) = setup(1, n);
        let hm = h.matrix();
        let lambda = 0.01 * (0..n).map(|i| hm[i * n + i]).sum::<f64>() / n as f64;
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| inverse_hessian_factor(n, &|i, j| h.at(i, j), 0.01).unwrap())
        };
        let u = run(2);
        assert_eq!(u, run(1));
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            assert!(u[i * n..i * n + i].iter().all(|&v| v == 0.0), "row {i}");
        }
        // (Uᵀ U)[i][k] = Σ_r U[r][i] U[r][k]; times (H + λI) must give the identity.
        let mut inv = vec![0f64; n * n];
        for r in 0..n {
            for i in 0..n {
                let a = u[r * n + i];
                for k in 0..n {
                    inv[i * n + k] += a * u[r * n + k];
                }
            }
        }
        let mut worst = 0f64;
        for i in 0..n {
            for j in 0..n {
                let mut v = inv[i * n + j] * lambda;
                for k in 0..n {
                    v += inv[i * n + k] * hm[k * n + j];
                }
                worst = worst.max((v - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        assert!(worst < 1e-8, "Uᵀ U (H + λI) is off the identity by {worst}");
    }

    #[test]
    fn products_and_rows_agree() {
        let mut rng = Rng(3);
        let x = inputs(10, 6, &mut rng);
        let mut a = Hessian::new(6);
        a.add_rows(&x);
        let mut b = Hessian::new(6);
        b.add_inputs(&x[..24]);
        b.add_inputs(&x[24..]);
        assert_eq!((a.rows(), b.rows()), (10, 10));
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
                step: None,
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

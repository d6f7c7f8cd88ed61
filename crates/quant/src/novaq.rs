//! NOVAQ: normalized residual vector quantization with calibration-aware assignment and
//! teacher-guided codebook refinement — adaptq's sub-3-bit engine.
//!
//! 1. **Normalization.** Each output row loses its mean and is divided by its RMS; each input
//!    column is divided by its own RMS, which tames outlier input channels. The three vectors
//!    are stored as f16 and count in the bits per weight.
//! 2. **Residual vector codebooks.** Rows are cut into vectors of `dim` consecutive values. A
//!    first codebook of `2^b1` centroids is fitted by weighted k-means (seeded k-means++ start,
//!    Lloyd iterations until the objective improves by less than `tolerance`), then a second
//!    codebook of `2^b2` centroids on the residuals. The weight of each value in the distance
//!    is its input channel's Hessian diagonal times its de-normalization scale², i.e. the error
//!    is measured where it matters: in the layer's output on the calibration inputs.
//! 3. **Assignment with error feedback.** With a Hessian, codes are chosen GPTQ-style (as in
//!    GPTVQ): vectors are assigned left to right and each value's error is pushed onto the
//!    columns not yet assigned through the inverse Hessian's Cholesky factor. A small beam over
//!    first-stage candidates picks the best pair of codes.
//! 4. **Teacher-guided refinement.** With the codes fixed, the layer's output error
//!    `Σ_r (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ` is quadratic in the codebook entries: conjugate gradient
//!    solves it for both codebooks jointly; then each row's mean and scale are re-solved in
//!    closed form (2×2 least squares), then the codebooks again.
//!
//! The subspace dimension and stage widths are planned per layer ([`plan`]): the most bits that
//! fit the target once this layer's codebooks, scales and means are paid for.
//!
//! k-means is hand-written: the crates of the field do not offer per-coordinate weights with a
//! seeded, platform-independent k-means++ start, which determinism needs.

use crate::gptq::{prepare, push_error, start_row, Hessian, Prepared};
use crate::linalg::{hmat, quad, times_h};
use crate::rng::Rng;
use crate::QuantError;
use adaptq_loader::codebook::{self, StageRef};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rounds of code assignment and codebook refinement (each kept only if it lowers the error).
const REFINE_ROUNDS: usize = 3;

/// Settings of one NOVAQ run; recorded whole in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NovaqConfig {
    /// Bits per weight per layer, every overhead (codebooks, scales, means) included.
    pub target_bits: f64,
    /// Most centroids of the first stage (a power of two).
    pub level1_centroids: usize,
    /// Most centroids of the residual stage (a power of two; 0 or 1 = no residual stage).
    pub level2_centroids: usize,
    pub min_subspace_dim: usize,
    pub max_subspace_dim: usize,
    /// Lloyd iterations at most, per stage.
    pub max_iterations: usize,
    /// Stop k-means when the objective improves by less than this fraction.
    pub tolerance: f64,
    pub seed: u64,
    /// Conjugate-gradient iterations of teacher-guided refinement per round (0 = off).
    pub refine_iterations: usize,
    /// Hessian dampening for the error-feedback assignment (fraction of the mean diagonal).
    pub damp: f64,
    /// First-stage candidates tried per vector when choosing the residual code.
    pub beam: usize,
    /// Vectors drawn (seeded) to fit the codebooks; all vectors are then assigned.
    pub kmeans_sample: usize,
}

impl Default for NovaqConfig {
    fn default() -> Self {
        NovaqConfig {
            target_bits: 2.5,
            level1_centroids: 256,
            level2_centroids: 256,
            min_subspace_dim: 2,
            max_subspace_dim: 16,
            max_iterations: 25,
            tolerance: 1e-4,
            seed: 0,
            refine_iterations: 12,
            damp: 0.01,
            beam: 4,
            kmeans_sample: 65536,
        }
    }
}

/// Subspace dimension and code width of each stage (`stage_bits[1] == 0`: one stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub dim: usize,
    pub stage_bits: [u8; 2],
}

impl Plan {
    pub fn stages(&self) -> Vec<u8> {
        self.stage_bits.iter().copied().filter(|&b| b > 0).collect()
    }
    /// Stored bits of a `rows × cols` tensor: codes, f16 codebooks, f16 row scale/mean and
    /// column scale.
    pub fn storage_bits(&self, rows: usize, cols: usize) -> u64 {
        let nv = codebook::vectors_per_row(cols, self.dim) as u64;
        let st = self.stages();
        let codes: u64 = st
            .iter()
            .map(|&b| codebook::packed_len(rows * nv as usize, b) as u64 * 8)
            .sum();
        let books: u64 = st.iter().map(|&b| (1u64 << b) * self.dim as u64 * 16).sum();
        codes + books + rows as u64 * 32 + cols as u64 * 16
    }
    pub fn bits_per_weight(&self, rows: usize, cols: usize) -> f64 {
        self.storage_bits(rows, cols) as f64 / (rows * cols) as f64
    }
}

fn log2_pow2(n: usize, what: &str) -> Result<u8, QuantError> {
    if n <= 1 {
        return Ok(0);
    }
    if !n.is_power_of_two() || n > 1 << 16 {
        return Err(QuantError::Corrupt(format!(
            "{what} must be a power of two up to 65536, got {n}"
        )));
    }
    Ok(n.trailing_zeros() as u8)
}

/// Adaptive subspace planning: among subspace dimensions in `[min, max]` and stage widths up
/// to the configured centroid counts, the layout whose codes carry the most bits per weight
/// while codes, codebooks, scales and means together still fit `target_bits` for this layer's
/// shape. Small layers pay relatively more for their codebooks and row/column parameters, so
/// they get smaller codebooks or shorter vectors than large ones. Ties go to the larger
/// dimension (where vector quantization gains most), then to the larger first stage.
pub fn plan(rows: usize, cols: usize, cfg: &NovaqConfig) -> Result<Plan, QuantError> {
    let b1max = log2_pow2(cfg.level1_centroids, "--level1-centroids")?;
    let b2max = log2_pow2(cfg.level2_centroids, "--level2-centroids")?;
    if b1max == 0 {
        return Err(QuantError::Corrupt(
            "--level1-centroids must be at least 2".into(),
        ));
    }
    if cfg.min_subspace_dim == 0 || cfg.min_subspace_dim > cfg.max_subspace_dim {
        return Err(QuantError::Corrupt(format!(
            "subspace dimensions must satisfy 1 <= min <= max, got {}..{}",
            cfg.min_subspace_dim, cfg.max_subspace_dim
        )));
    }
    // (code bits per weight, layout)
    let mut best: Option<(f64, Plan)> = None;
    for dim in cfg.min_subspace_dim..=cfg.max_subspace_dim.min(cols) {
        let nvec = rows * codebook::vectors_per_row(cols, dim);
        for b1 in 1..=b1max {
            if (1usize << b1) > nvec {
                break;
            }
            for b2 in 0..=b2max.min(b1) {
                let p = Plan {
                    dim,
                    stage_bits: [b1, b2],
                };
                if p.bits_per_weight(rows, cols) > cfg.target_bits + 1e-9 {
                    continue;
                }
                let code = (b1 + b2) as f64 / dim as f64;
                let better = |(b, q): (f64, Plan)| {
                    code > b + 1e-9
                        || (code > b - 1e-9
                            && (dim > q.dim || (dim == q.dim && b1 > q.stage_bits[0])))
                };
                if best.is_none_or(better) {
                    best = Some((code, p));
                }
            }
        }
    }
    best.map(|(_, p)| p).ok_or(QuantError::NoLayout {
        rows,
        cols,
        bits: cfg.target_bits,
    })
}

/// A NOVAQ-coded tensor: see [`adaptq_loader::codebook`] for the decoding rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodebookTensor {
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub stages: Vec<Stage>,
    pub row_scale: Vec<f16>,
    pub row_mean: Vec<f16>,
    pub col_scale: Vec<f16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub bits: u8,
    /// `2^bits × dim` centroids, row-major.
    pub centroids: Vec<f16>,
    /// One code per vector, row-major, packed at `bits` bits.
    pub codes: Vec<u8>,
}

fn f32s(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

impl CodebookTensor {
    pub fn dequantize(&self) -> Vec<f32> {
        self.try_dequantize()
            .expect("parts were built for this shape")
    }
    /// Decodes, or `None` when the parts do not fit the shape (a corrupt bundle).
    pub fn try_dequantize(&self) -> Option<Vec<f32>> {
        let books: Vec<Vec<f32>> = self.stages.iter().map(|s| f32s(&s.centroids)).collect();
        let refs: Vec<StageRef> = self
            .stages
            .iter()
            .zip(&books)
            .map(|(s, b)| StageRef {
                bits: s.bits,
                centroids: b,
                codes: &s.codes,
            })
            .collect();
        codebook::decode(
            self.rows,
            self.cols,
            self.dim,
            &refs,
            &f32s(&self.row_scale),
            &f32s(&self.row_mean),
            &f32s(&self.col_scale),
        )
    }
    pub fn payload_bytes(&self) -> usize {
        self.stages
            .iter()
            .map(|s| s.codes.len() + 2 * s.centroids.len())
            .sum::<usize>()
            + 2 * (self.row_scale.len() + self.row_mean.len() + self.col_scale.len())
    }
    pub fn plan(&self) -> Plan {
        let b = |i: usize| self.stages.get(i).map_or(0, |s| s.bits);
        Plan {
            dim: self.dim,
            stage_bits: [b(0), b(1)],
        }
    }
}

/// What a NOVAQ run measured for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NovaqReport {
    pub plan: Plan,
    pub bits_per_weight: f64,
    /// Lloyd iterations run per stage.
    pub kmeans_iterations: [usize; 2],
    /// Output error (relative, Hessian-weighted) with the k-means codebooks, before refinement.
    pub error_before_refine: f64,
    /// The same after teacher-guided refinement (equal to the above when it is off).
    pub error_after_refine: f64,
}

/// Result of weighted k-means.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// `k × d` centroids, row-major.
    pub centroids: Vec<f32>,
    pub iterations: usize,
    pub objective: f64,
}

/// For each vector, the nearest centroid under per-coordinate weights and its distance.
/// Distances are expanded as `Σ w x² − 2 Σ (w x) c + Σ w c²` so the bulk is one matrix product.
fn nearest(x: &[f32], w: &[f32], d: usize, cent: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let k = cent.len() / d;
    const CHUNK: usize = 4096;
    let b = Mat::<f32>::from_fn(2 * d, k, |t, j| {
        if t < d {
            -2.0 * cent[j * d + t]
        } else {
            let c = cent[j * d + t - d];
            c * c
        }
    });
    let parts: Vec<(Vec<u32>, Vec<f32>)> = x
        .par_chunks(CHUNK * d)
        .zip(w.par_chunks(CHUNK * d))
        .map(|(xc, wc)| {
            let n = xc.len() / d;
            let a = Mat::<f32>::from_fn(n, 2 * d, |i, t| {
                if t < d {
                    wc[i * d + t] * xc[i * d + t]
                } else {
                    wc[i * d + t - d]
                }
            });
            let mut dm = Mat::<f32>::zeros(n, k);
            matmul(
                dm.as_mut(),
                Accum::Replace,
                a.as_ref(),
                b.as_ref(),
                1.0,
                Par::Seq,
            );
            let mut best = vec![0u32; n];
            let mut bd = vec![f32::INFINITY; n];
            for j in 0..k {
                let col = dm.col_as_slice(j);
                for i in 0..n {
                    if col[i] < bd[i] {
                        bd[i] = col[i];
                        best[i] = j as u32;
                    }
                }
            }
            for i in 0..n {
                let base: f32 = (0..d)
                    .map(|t| wc[i * d + t] * xc[i * d + t] * xc[i * d + t])
                    .sum();
                bd[i] = (bd[i] + base).max(0.0);
            }
            (best, bd)
        })
        .collect();
    let mut a = Vec::with_capacity(x.len() / d);
    let mut dist = Vec::with_capacity(x.len() / d);
    for (p, q) in parts {
        a.extend(p);
        dist.extend(q);
    }
    (a, dist)
}

fn wdist(x: &[f32], w: &[f32], c: &[f32]) -> f32 {
    x.iter()
        .zip(w)
        .zip(c)
        .map(|((x, w), c)| w * (x - c) * (x - c))
        .sum()
}

/// Weighted k-means of `n = x.len() / d` vectors: minimises `Σ_i Σ_t w_it (x_it − c_{a(i),t})²`
/// from a seeded k-means++ start. Deterministic: sums run in vector order.
pub fn kmeans(
    x: &[f32],
    w: &[f32],
    d: usize,
    k: usize,
    max_iter: usize,
    tol: f64,
    seed: u64,
) -> KMeans {
    let n = x.len() / d;
    assert!(n >= k && k > 0, "k-means needs at least k vectors");
    let mut rng = Rng(seed);
    // k-means++: first centre uniform, then each with probability ∝ its current distance.
    let mut cent = Vec::with_capacity(k * d);
    let first = (rng.next() % n as u64) as usize;
    cent.extend_from_slice(&x[first * d..(first + 1) * d]);
    let mut mind: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| wdist(&x[i * d..(i + 1) * d], &w[i * d..(i + 1) * d], &cent[..d]))
        .collect();
    for j in 1..k {
        let total: f64 = mind.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut r = rng.unit() * total;
            let mut p = n - 1;
            for (i, &v) in mind.iter().enumerate() {
                r -= v as f64;
                if r <= 0.0 && v > 0.0 {
                    p = i;
                    break;
                }
            }
            p
        } else {
            // Every vector already sits on a centre: duplicate one, it is harmless.
            j % n
        };
        let c = x[pick * d..(pick + 1) * d].to_vec();
        mind.par_iter_mut().enumerate().for_each(|(i, m)| {
            let v = wdist(&x[i * d..(i + 1) * d], &w[i * d..(i + 1) * d], &c);
            if v < *m {
                *m = v;
            }
        });
        cent.extend(c);
    }
    let mut prev = f64::INFINITY;
    let mut iterations = 0;
    let mut objective;
    loop {
        let (a, dist) = nearest(x, w, d, &cent);
        objective = dist.iter().map(|&v| v as f64).sum::<f64>();
        if iterations >= max_iter || (prev.is_finite() && prev - objective <= tol * prev) {
            break;
        }
        prev = objective;
        iterations += 1;
        let mut num = vec![0f64; k * d];
        let mut den = vec![0f64; k * d];
        let mut count = vec![0usize; k];
        for i in 0..n {
            let j = a[i] as usize;
            count[j] += 1;
            for t in 0..d {
                let wv = w[i * d + t] as f64;
                num[j * d + t] += wv * x[i * d + t] as f64;
                den[j * d + t] += wv;
            }
        }
        // Empty clusters restart on the worst-served vectors, farthest first.
        let empty = count.iter().filter(|&&c| c == 0).count();
        let mut far: Vec<usize> = Vec::new();
        if empty > 0 {
            far = (0..n).collect();
            far.sort_by(|&p, &q| dist[q].total_cmp(&dist[p]).then(p.cmp(&q)));
            far.truncate(empty);
        }
        let mut far = far.into_iter();
        for j in 0..k {
            if count[j] == 0 {
                if let Some(i) = far.next() {
                    cent[j * d..(j + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                }
                continue;
            }
            for t in 0..d {
                if den[j * d + t] > 0.0 {
                    cent[j * d + t] = (num[j * d + t] / den[j * d + t]) as f32;
                }
            }
        }
    }
    KMeans {
        centroids: cent,
        iterations,
        objective,
    }
}

fn f16v(v: f64) -> f16 {
    f16::from_f64(v)
}

/// Normalization parameters, already rounded to f16 (so everything after uses stored values).
#[derive(Clone)]
struct Norm {
    mean: Vec<f16>,
    scale: Vec<f16>,
    col: Vec<f16>,
}

fn normalize(w: &[f32], rows: usize, cols: usize) -> Norm {
    let mean: Vec<f16> = w
        .chunks(cols)
        .map(|r| f16v(r.iter().map(|&v| v as f64).sum::<f64>() / cols as f64))
        .collect();
    let mut col2 = vec![0f64; cols];
    for (r, m) in w.chunks(cols).zip(&mean) {
        let m = m.to_f64();
        for (s, &v) in col2.iter_mut().zip(r) {
            *s += (v as f64 - m).powi(2);
        }
    }
    let rms: Vec<f64> = col2.iter().map(|s| (s / rows as f64).sqrt()).collect();
    let avg = rms.iter().sum::<f64>() / cols as f64;
    // Column scales relative to their average (so row scales keep the magnitude), floored so a
    // near-dead column cannot blow its values up.
    let col: Vec<f16> = rms
        .iter()
        .map(|&v| {
            if avg > 0.0 {
                f16v((v / avg).max(1e-2))
            } else {
                f16::ONE
            }
        })
        .collect();
    let scale = w
        .chunks(cols)
        .zip(&mean)
        .map(|(r, m)| {
            let m = m.to_f64();
            let s = r
                .iter()
                .zip(&col)
                .map(|(&v, k)| ((v as f64 - m) / k.to_f64()).powi(2))
                .sum::<f64>()
                / cols as f64;
            let s = s.sqrt();
            if s > 0.0 && f16v(s).to_f64() > 0.0 {
                f16v(s)
            } else {
                f16::ONE
            }
        })
        .collect();
    Norm { mean, scale, col }
}

/// Per-row data of the error-feedback sweep: the chosen codes of both stages.
type RowCodes = (Vec<u16>, Vec<u16>);

/// Quantizes `w` (row-major `rows × cols`) with NOVAQ. With `h`, codes are chosen with error
/// feedback and the codebooks refined against the layer's output on the calibration inputs;
/// without, distances are plain (per-scale weighted) and there is no refinement.
pub fn quantize_novaq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: Option<&Hessian>,
    cfg: &NovaqConfig,
) -> Result<(CodebookTensor, NovaqReport), QuantError> {
    crate::check_matrix(w, rows, cols)?;
    if let Some(h) = h {
        if h.dim != cols {
            return Err(QuantError::Shape {
                rows,
                cols: h.dim,
                len: w.len(),
            });
        }
    }
    let p = plan(rows, cols, cfg)?;
    let d = p.dim;
    let nv = codebook::vectors_per_row(cols, d);
    let hm = h.map(|h| h.matrix());
    let hdiag: Vec<f64> = match &hm {
        Some(m) => (0..cols).map(|i| m[i * cols + i]).collect(),
        None => vec![1.0; cols],
    };
    let norm = normalize(w, rows, cols);
    let rs: Vec<f64> = norm.scale.iter().map(|v| v.to_f64()).collect();
    let rm: Vec<f64> = norm.mean.iter().map(|v| v.to_f64()).collect();
    let ck: Vec<f64> = norm.col.iter().map(|v| v.to_f64()).collect();

    // Normalized vectors, padded to whole vectors with zero-weight coordinates.
    let n = rows * nv;
    let mut z = vec![0f32; n * d];
    let mut zw = vec![0f32; n * d];
    for r in 0..rows {
        for c in 0..cols {
            let i = (r * nv + c / d) * d + c % d;
            z[i] = ((w[r * cols + c] as f64 - rm[r]) / (rs[r] * ck[c])) as f32;
            zw[i] = (hdiag[c] * (rs[r] * ck[c]).powi(2)) as f32;
        }
    }
    // Average weights to O(1) so f32 distance sums stay well-conditioned.
    let wmean = zw.iter().map(|&v| v as f64).sum::<f64>() / zw.len() as f64;
    if wmean > 0.0 {
        zw.iter_mut().for_each(|v| *v = (*v as f64 / wmean) as f32);
    }
    // A seeded sample fits the codebooks.
    let mut rng = Rng(cfg.seed ^ 0x4E4F_5641_5100_0000 ^ ((rows as u64) << 20) ^ cols as u64);
    let sample: Vec<usize> = if n > cfg.kmeans_sample.max(1) {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..cfg.kmeans_sample {
            let j = i + (rng.next() % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut s = idx[..cfg.kmeans_sample].to_vec();
        s.sort_unstable();
        s
    } else {
        (0..n).collect()
    };
    let gather = |v: &[f32]| -> Vec<f32> {
        sample
            .iter()
            .flat_map(|&i| v[i * d..(i + 1) * d].iter().copied())
            .collect()
    };
    let (sx, sw) = (gather(&z), gather(&zw));
    let stages_bits = p.stages();
    let mut books: Vec<Vec<f32>> = Vec::new();
    let mut iters = [0usize; 2];
    let mut resid = sx.clone();
    for (s, &b) in stages_bits.iter().enumerate() {
        let km = kmeans(
            &resid,
            &sw,
            d,
            1 << b,
            cfg.max_iterations,
            cfg.tolerance,
            rng.next(),
        );
        iters[s] = km.iterations;
        let (a, _) = nearest(&resid, &sw, d, &km.centroids);
        for (i, &j) in a.iter().enumerate() {
            for t in 0..d {
                resid[i * d + t] -= km.centroids[j as usize * d + t];
            }
        }
        // Codebooks are stored in f16: fit the assignment to the values that will be stored.
        books.push(
            km.centroids
                .iter()
                .map(|&v| f16::from_f32(v).to_f32())
                .collect(),
        );
    }

    let codes = assign(w, rows, cols, &p, &norm, &books, &zw, h, cfg)?;
    let mut t = build(rows, cols, &p, &norm, &books, &codes);
    let err = |t: &CodebookTensor| match &hm {
        Some(m) => rel_error(w, &t.dequantize(), cols, m),
        None => rel_error_plain(w, &t.dequantize()),
    };
    let before = err(&t);
    let mut after = before;
    if let (Some(m), true) = (&hm, cfg.refine_iterations > 0) {
        let (mut norm, mut books, mut codes) = (norm, books, codes);
        // Codes and codebooks are fitted in turn (as Lloyd alternates assignment and centroid
        // update): refined codebooks move the best codes, which the error-feedback sweep then
        // finds again. A round is kept only when the stored (f16) result really is better.
        for round in 0..REFINE_ROUNDS {
            if round > 0 {
                codes = assign(w, rows, cols, &p, &norm, &books, &zw, h, cfg)?;
            }
            let (mut norm2, mut books2, it) = (norm.clone(), books.clone(), cfg.refine_iterations);
            refine_books(w, rows, cols, &p, &norm2, &mut books2, &codes, m, it);
            refit_rows(w, rows, cols, &p, &mut norm2, &books2, &codes, m);
            refine_books(w, rows, cols, &p, &norm2, &mut books2, &codes, m, it);
            let t2 = build(rows, cols, &p, &norm2, &books2, &codes);
            let e2 = err(&t2);
            if e2 >= after {
                break;
            }
            t = t2;
            after = e2;
            (norm, books) = (norm2, books2);
        }
    }
    let report = NovaqReport {
        plan: p,
        bits_per_weight: p.bits_per_weight(rows, cols),
        kmeans_iterations: iters,
        error_before_refine: before,
        error_after_refine: after,
    };
    debug_assert_eq!(t.payload_bytes() * 8, p.storage_bits(rows, cols) as usize);
    Ok((t, report))
}

fn build(
    rows: usize,
    cols: usize,
    p: &Plan,
    norm: &Norm,
    books: &[Vec<f32>],
    codes: &[RowCodes],
) -> CodebookTensor {
    let stages = p
        .stages()
        .iter()
        .enumerate()
        .map(|(s, &bits)| {
            let all: Vec<u16> = codes
                .iter()
                .flat_map(|rc| if s == 0 { rc.0.clone() } else { rc.1.clone() })
                .collect();
            Stage {
                bits,
                centroids: books[s].iter().map(|&v| f16::from_f32(v)).collect(),
                codes: codebook::pack(&all, bits),
            }
        })
        .collect();
    CodebookTensor {
        rows,
        cols,
        dim: p.dim,
        stages,
        row_scale: norm.scale.clone(),
        row_mean: norm.mean.clone(),
        col_scale: norm.col.clone(),
    }
}

/// Chooses every vector's codes. With a Hessian: left-to-right with GPTQ error feedback, the
/// distance of each value weighted by `(scale / U_ii)²`; without: nearest under `zw`.
#[allow(clippy::too_many_arguments)]
fn assign(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Plan,
    norm: &Norm,
    books: &[Vec<f32>],
    zw: &[f32],
    h: Option<&Hessian>,
    cfg: &NovaqConfig,
) -> Result<Vec<RowCodes>, QuantError> {
    let d = p.dim;
    let nv = codebook::vectors_per_row(cols, d);
    let k1 = books[0].len() / d;
    let two = books.len() > 1;
    let beam = cfg.beam.clamp(1, k1);
    let prepared = match h {
        Some(h) => Some(prepare(h, cols, cfg.damp, false, 0.0)?),
        None => None,
    };
    let ck: Vec<f64> = norm.col.iter().map(|v| v.to_f64()).collect();
    // The stored column scales widened once: the error feedback reads one per weight.
    let col32: Vec<f32> = norm.col.iter().map(|v| v.to_f32()).collect();
    let out = (0..rows)
        .into_par_iter()
        .map(|r| {
            let (m, s) = (norm.mean[r].to_f64(), norm.scale[r].to_f64());
            let (m32, s32) = (norm.mean[r].to_f32(), norm.scale[r].to_f32());
            let row = &w[r * cols..(r + 1) * cols];
            let (mut x, dead, u) = match &prepared {
                Some(Prepared { dead, perm, u }) => {
                    let (_, x) = start_row(row, dead, perm);
                    (x, Some(dead), Some(u))
                }
                None => (row.iter().map(|&v| v as f64).collect(), None, None),
            };
            let mut c1 = vec![0u16; nv];
            let mut c2 = vec![0u16; if two { nv } else { 0 }];
            let mut zv = vec![0f64; d];
            let mut wv = vec![0f64; d];
            let zoff = vec![0f64; d];
            let mut cand: Vec<(f64, usize)> = Vec::with_capacity(k1);
            for v in 0..nv {
                let c0 = v * d;
                let len = (c0 + d).min(cols) - c0;
                for t in 0..len {
                    let c = c0 + t;
                    zv[t] = (x[c] - m) / (s * ck[c]);
                    wv[t] = match (u, dead) {
                        (Some(u), Some(dead)) if !dead[c] => {
                            let uu = u[c * cols + c];
                            (s * ck[c] / uu).powi(2)
                        }
                        (Some(_), _) => 0.0,
                        _ => zw[(r * nv + v) * d + t] as f64,
                    };
                }
                let dist = |cent: &[f32], off: &[f64]| -> f64 {
                    (0..len)
                        .map(|t| wv[t] * (zv[t] - off[t] - cent[t] as f64).powi(2))
                        .sum()
                };
                cand.clear();
                for k in 0..k1 {
                    cand.push((dist(&books[0][k * d..(k + 1) * d], &zoff), k));
                }
                let (best1, best2) = if two {
                    let by = |a: &(f64, usize), b: &(f64, usize)| {
                        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
                    };
                    if beam < cand.len() {
                        cand.select_nth_unstable_by(beam, by);
                        cand.truncate(beam);
                    }
                    cand.sort_by(by);
                    let k2 = books[1].len() / d;
                    let mut best = (f64::INFINITY, 0usize, 0usize);
                    for &(_, k) in cand.iter().take(beam) {
                        let base: Vec<f64> = (0..d).map(|t| books[0][k * d + t] as f64).collect();
                        for j in 0..k2 {
                            let e = dist(&books[1][j * d..(j + 1) * d], &base);
                            if e < best.0 {
                                best = (e, k, j);
                            }
                        }
                    }
                    (best.1, best.2)
                } else {
                    let b = cand
                        .iter()
                        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                        .expect("codebook is not empty");
                    (b.1, 0)
                };
                c1[v] = best1 as u16;
                if two {
                    c2[v] = best2 as u16;
                }
                if let Some(u) = u {
                    for t in 0..len {
                        let mut val = books[0][best1 * d + t];
                        if two {
                            val += books[1][best2 * d + t];
                        }
                        let q = (m32 + s32 * (col32[c0 + t] * val)) as f64;
                        push_error(&mut x, c0 + t, q, u, cols);
                    }
                }
            }
            (c1, c2)
        })
        .collect();
    Ok(out)
}

/// `Σ (w−q) H (w−q)ᵀ / Σ w H wᵀ` over rows.
fn rel_error(w: &[f32], q: &[f32], cols: usize, hm: &[f64]) -> f64 {
    let e: Vec<f64> = w.iter().zip(q).map(|(a, b)| (a - b) as f64).collect();
    let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let h = hmat(hm, cols);
    let num = quad(&e, cols, &h);
    let den = quad(&wf, cols, &h);
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

fn rel_error_plain(w: &[f32], q: &[f32]) -> f64 {
    let num: f64 = w.iter().zip(q).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|&a| (a as f64).powi(2)).sum();
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// `V[r][c] = s_r k_c Σ_s θ_s[code_s(r, c/d)][c%d]`: the part of the reconstruction that is
/// linear in the codebooks.
fn apply_books(
    rows: usize,
    cols: usize,
    d: usize,
    sk: &[f64],
    theta: &[Vec<f64>],
    codes: &[RowCodes],
) -> Vec<f64> {
    let mut v = vec![0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (vi, t) = (c / d, c % d);
            let mut acc = theta[0][codes[r].0[vi] as usize * d + t];
            if theta.len() > 1 {
                acc += theta[1][codes[r].1[vi] as usize * d + t];
            }
            v[r * cols + c] = sk[r * cols + c] * acc;
        }
    }
    v
}

/// Adjoint of [`apply_books`]: scatters `g[r][c] · s_r k_c` onto the codebook entries used.
fn adjoint_books(
    rows: usize,
    cols: usize,
    d: usize,
    sk: &[f64],
    g: &[f64],
    codes: &[RowCodes],
    sizes: &[usize],
) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0f64; n]).collect();
    for r in 0..rows {
        for c in 0..cols {
            let (vi, t) = (c / d, c % d);
            let x = g[r * cols + c] * sk[r * cols + c];
            out[0][codes[r].0[vi] as usize * d + t] += x;
            if out.len() > 1 {
                out[1][codes[r].1[vi] as usize * d + t] += x;
            }
        }
    }
    out
}

fn dot(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>())
        .sum()
}

/// Teacher-guided refinement of the codebooks with codes fixed: conjugate gradient on the
/// quadratic `Σ_r (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ`.
#[allow(clippy::too_many_arguments)]
fn refine_books(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Plan,
    norm: &Norm,
    books: &mut [Vec<f32>],
    codes: &[RowCodes],
    hm: &[f64],
    iters: usize,
) {
    let d = p.dim;
    let h = hmat(hm, cols);
    let sk: Vec<f64> = (0..rows * cols)
        .map(|i| norm.scale[i / cols].to_f64() * norm.col[i % cols].to_f64())
        .collect();
    let mut theta: Vec<Vec<f64>> = books
        .iter()
        .map(|b| b.iter().map(|&v| v as f64).collect())
        .collect();
    let sizes: Vec<usize> = theta.iter().map(|t| t.len()).collect();
    let v = apply_books(rows, cols, d, &sk, &theta, codes);
    // E = W − mean − V: the output error's source.
    let e: Vec<f64> = (0..rows * cols)
        .map(|i| w[i] as f64 - norm.mean[i / cols].to_f64() - v[i])
        .collect();
    let eh = times_h(&e, cols, &h);
    // Residual of the normal equations (−½ the gradient).
    let mut res = adjoint_books(rows, cols, d, &sk, &eh, codes, &sizes);
    let mut dir = res.clone();
    let mut rr = dot(&res, &res);
    let r0 = rr;
    for _ in 0..iters {
        if rr <= 1e-20 * r0.max(1e-300) {
            break;
        }
        let pv = apply_books(rows, cols, d, &sk, &dir, codes);
        let ph = times_h(&pv, cols, &h);
        let curv: f64 = pv.iter().zip(&ph).map(|(a, b)| a * b).sum();
        if curv <= 0.0 {
            break;
        }
        let alpha = rr / curv;
        for (t, q) in theta.iter_mut().zip(&dir) {
            t.iter_mut().zip(q).for_each(|(a, b)| *a += alpha * b);
        }
        let aq = adjoint_books(rows, cols, d, &sk, &ph, codes, &sizes);
        for (r, q) in res.iter_mut().zip(&aq) {
            r.iter_mut().zip(q).for_each(|(a, b)| *a -= alpha * b);
        }
        let rr2 = dot(&res, &res);
        let beta = rr2 / rr;
        rr = rr2;
        for (p, r) in dir.iter_mut().zip(&res) {
            p.iter_mut().zip(r).for_each(|(a, b)| *a = b + beta * *a);
        }
    }
    for (b, t) in books.iter_mut().zip(&theta) {
        for (x, y) in b.iter_mut().zip(t) {
            *x = f16::from_f64(*y).to_f32();
        }
    }
}

/// Re-solves each row's mean and scale for the current codes and codebooks (2×2 least squares
/// under `H`).
#[allow(clippy::too_many_arguments)]
fn refit_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Plan,
    norm: &mut Norm,
    books: &[Vec<f32>],
    codes: &[RowCodes],
    hm: &[f64],
) {
    let d = p.dim;
    let h = hmat(hm, cols);
    let kc: Vec<f64> = (0..rows * cols)
        .map(|i| norm.col[i % cols].to_f64())
        .collect();
    let theta: Vec<Vec<f64>> = books
        .iter()
        .map(|b| b.iter().map(|&v| v as f64).collect())
        .collect();
    // u_r[c] = k_c · decoded codebook sum: ŵ_r = mean_r + scale_r · u_r.
    let u = apply_books(rows, cols, d, &kc, &theta, codes);
    let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let uh = times_h(&u, cols, &h);
    let h1: Vec<f64> = (0..cols)
        .map(|i| hm[i * cols..(i + 1) * cols].iter().sum())
        .collect();
    let one_h_one: f64 = h1.iter().sum();
    for r in 0..rows {
        let ur = &u[r * cols..(r + 1) * cols];
        let uhr = &uh[r * cols..(r + 1) * cols];
        let wr = &wf[r * cols..(r + 1) * cols];
        let a11 = one_h_one;
        let a12: f64 = ur.iter().zip(&h1).map(|(a, b)| a * b).sum();
        let a22: f64 = ur.iter().zip(uhr).map(|(a, b)| a * b).sum();
        let b1: f64 = wr.iter().zip(&h1).map(|(a, b)| a * b).sum();
        let b2: f64 = wr.iter().zip(uhr).map(|(a, b)| a * b).sum();
        let det = a11 * a22 - a12 * a12;
        if det.abs() <= 1e-12 * (a11 * a22).abs().max(1e-300) {
            continue;
        }
        let m = (b1 * a22 - b2 * a12) / det;
        let s = (a11 * b2 - a12 * b1) / det;
        if s.is_finite() && m.is_finite() && s > 0.0 && f16v(s).to_f64() > 0.0 {
            norm.mean[r] = f16v(m);
            norm.scale[r] = f16v(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Hessian) {
        let mut rng = Rng(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (rng.gauss() * 0.05 * if i % cols == 3 { 6.0 } else { 1.0 }) as f32)
            .collect();
        let mut x = vec![0f32; 512 * cols];
        for r in 0..512 {
            let common = rng.gauss();
            for c in 0..cols {
                let s = if c % 5 == 0 { 3.0 } else { 1.0 };
                x[r * cols + c] = (s * (rng.gauss() + 0.5 * common)) as f32;
            }
        }
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        (w, h)
    }

    fn small_cfg(target: f64) -> NovaqConfig {
        NovaqConfig {
            target_bits: target,
            level1_centroids: 64,
            level2_centroids: 16,
            min_subspace_dim: 2,
            max_subspace_dim: 8,
            max_iterations: 20,
            kmeans_sample: 4096,
            ..NovaqConfig::default()
        }
    }

    #[test]
    fn plan_fits_the_budget_counting_every_overhead() {
        let cfg = NovaqConfig::default();
        for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
            for target in [1.0, 1.5, 2.0, 2.5] {
                let p = plan(
                    rows,
                    cols,
                    &NovaqConfig {
                        target_bits: target,
                        ..cfg
                    },
                )
                .unwrap();
                let bpw = p.bits_per_weight(rows, cols);
                assert!(
                    bpw <= target && bpw > target - 0.4,
                    "{rows}x{cols} {target}: {p:?} {bpw}"
                );
                let code: f64 = p.stages().iter().map(|&b| b as f64).sum::<f64>() / p.dim as f64;
                assert!(
                    code > target - 0.5,
                    "{rows}x{cols} {target}: {p:?} codes {code}"
                );
            }
        }
        assert!(plan(
            4,
            4,
            &NovaqConfig {
                target_bits: 1.0,
                ..cfg
            }
        )
        .is_err());
    }

    #[test]
    fn kmeans_is_seeded_and_finds_separated_clusters() {
        let mut rng = Rng(5);
        let centres = [[0.0f32, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]];
        let x: Vec<f32> = (0..400)
            .flat_map(|i| {
                let c = centres[i % 4];
                [
                    c[0] + 0.1 * rng.gauss() as f32,
                    c[1] + 0.1 * rng.gauss() as f32,
                ]
            })
            .collect();
        let w = vec![1.0f32; x.len()];
        let a = kmeans(&x, &w, 2, 4, 50, 1e-6, 9);
        let b = kmeans(&x, &w, 2, 4, 50, 1e-6, 9);
        assert_eq!(a.centroids, b.centroids);
        // Each true centre has a centroid within 0.1.
        for c in centres {
            assert!(a
                .centroids
                .chunks(2)
                .any(|k| (k[0] - c[0]).abs() < 0.1 && (k[1] - c[1]).abs() < 0.1));
        }
        assert!(a.objective / 400.0 < 0.05);
    }

    #[test]
    fn codes_decode_to_the_reported_error_and_size() {
        let (rows, cols) = (48, 40);
        let (w, h) = data(rows, cols, 1);
        let (t, rep) = quantize_novaq(&w, rows, cols, Some(&h), &small_cfg(3.0)).unwrap();
        assert_eq!(
            t.payload_bytes() as u64 * 8,
            t.plan().storage_bits(rows, cols)
        );
        assert!(rep.bits_per_weight <= 3.0);
        let got = rel_error(&w, &t.dequantize(), cols, &h.matrix());
        assert!((got - rep.error_after_refine).abs() < 1e-12);
        assert!(got < 0.2, "relative output error {got}");
    }

    #[test]
    fn error_feedback_and_refinement_lower_the_output_error() {
        let (rows, cols) = (64, 48);
        let (w, h) = data(rows, cols, 2);
        let cfg = small_cfg(2.5);
        let hm = h.matrix();
        let (plain, _) = quantize_novaq(&w, rows, cols, None, &cfg).unwrap();
        let plain_err = rel_error(&w, &plain.dequantize(), cols, &hm);
        let (_, rep) = quantize_novaq(&w, rows, cols, Some(&h), &cfg).unwrap();
        assert!(
            rep.error_before_refine < plain_err,
            "feedback {} vs plain {plain_err}",
            rep.error_before_refine
        );
        assert!(
            rep.error_after_refine < 0.97 * rep.error_before_refine,
            "refined {} vs {}",
            rep.error_after_refine,
            rep.error_before_refine
        );
    }

    #[test]
    fn same_seed_same_bytes() {
        let (rows, cols) = (40, 36);
        let (w, h) = data(rows, cols, 3);
        let cfg = small_cfg(2.0);
        let a = quantize_novaq(&w, rows, cols, Some(&h), &cfg).unwrap().0;
        let b = quantize_novaq(&w, rows, cols, Some(&h), &cfg).unwrap().0;
        assert_eq!(a, b);
        let c = quantize_novaq(&w, rows, cols, Some(&h), &NovaqConfig { seed: 1, ..cfg })
            .unwrap()
            .0;
        assert_ne!(a.stages[0].centroids, c.stages[0].centroids);
    }
}

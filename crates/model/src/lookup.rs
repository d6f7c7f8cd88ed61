//! NOVAQ codebook weights run on their codes: a lookup kernel.
//!
//! A weight decodes as `row_mean[r] + row_scale[r] · col_scale[c] · Σ_s C_s[code_s(r, v)][c − v·dim]`
//! ([`adaptq_loader::codebook`]), so a row's product with `x` is
//! `row_mean[r] · Σx + row_scale[r] · Σ_s Σ_v T_s[v][code_s(r, v)]`, where each stage's table
//! `T_s[v][k]` is centroid `k` dotted with vector `v` of `col_scale ⊙ x`. The tables are built
//! once per activation row (columns × centroids multiply-adds per stage, shared by every row),
//! and each row then sums one table entry per vector and stage instead of `dim` products:
//! nothing is dequantized, and the codes (two bytes per vector and stage) are all a token reads
//! of the matrix. No activation rounding: the result is the dequantized product up to the
//! order of the float sums.

use adaptq_quant::novaq::CodebookTensor;
use anyhow::{bail, Result};

struct Stage {
    /// Centroids in the book.
    k: usize,
    /// `k × dim` values.
    centroids: Vec<f32>,
    /// The same, `dim × k`: a table's `k` entries for one vector are then `dim` vertical
    /// multiply-adds of whole rows, which vectorize across the centroids.
    by_dim: Vec<f32>,
    /// One code per vector, `rows × vectors`.
    codes: Vec<u16>,
}

/// A NOVAQ-coded weight `[rows, cols]`, codes unpacked to one `u16` each.
pub struct CodebookMatrix {
    rows: usize,
    cols: usize,
    dim: usize,
    /// Vectors per row, `ceil(cols / dim)`.
    nv: usize,
    stages: Vec<Stage>,
    row_scale: Vec<f32>,
    row_mean: Vec<f32>,
    col_scale: Vec<f32>,
}

impl CodebookMatrix {
    pub fn new(t: &CodebookTensor) -> Result<Self> {
        let (rows, cols, dim) = (t.rows, t.cols, t.dim);
        let bits: Vec<u8> = t.stages.iter().map(|s| s.bits).collect();
        if !adaptq_loader::codebook::valid_layout(dim, &bits)
            || cols == 0
            || t.row_scale.len() != rows
            || t.row_mean.len() != rows
            || t.col_scale.len() != cols
        {
            bail!("a codebook of dim {dim}, stage widths {bits:?} does not fit [{rows}, {cols}]");
        }
        let nv = adaptq_loader::codebook::vectors_per_row(cols, dim);
        let nvec = rows
            .checked_mul(nv)
            .ok_or_else(|| anyhow::anyhow!("tensor size overflows"))?;
        let stages = t
            .stages
            .iter()
            .map(|s| {
                let k = 1usize << s.bits;
                let codes = adaptq_loader::codebook::unpack(&s.codes, s.bits, nvec);
                match codes {
                    Some(codes) if Some(s.centroids.len()) == k.checked_mul(dim) => {
                        let centroids: Vec<f32> = s.centroids.iter().map(|c| c.to_f32()).collect();
                        let by_dim = (0..dim * k)
                            .map(|i| centroids[(i % k) * dim + i / k])
                            .collect();
                        Ok(Stage {
                            k,
                            centroids,
                            by_dim,
                            codes,
                        })
                    }
                    _ => bail!("a codebook stage of {} bits does not fit its shape", s.bits),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let f32s = |v: &[half::f16]| v.iter().map(|x| x.to_f32()).collect();
        Ok(CodebookMatrix {
            rows,
            cols,
            dim,
            nv,
            stages,
            row_scale: f32s(&t.row_scale),
            row_mean: f32s(&t.row_mean),
            col_scale: f32s(&t.col_scale),
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The weight as f32, with the decoder's arithmetic in its order (the same bits).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Rows `first..` as f32 into `out` (whole rows).
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let mut acc = vec![0f32; self.dim];
        for (i, row) in out.chunks_mut(self.cols).enumerate() {
            let r = first + i;
            for (v, ws) in row.chunks_mut(self.dim).enumerate() {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for s in &self.stages {
                    let k = s.codes[r * self.nv + v] as usize;
                    for (a, c) in acc.iter_mut().zip(&s.centroids[k * self.dim..]) {
                        *a += c;
                    }
                }
                let c0 = v * self.dim;
                for (i, w) in ws.iter_mut().enumerate() {
                    *w = self.row_mean[r] + self.row_scale[r] * (self.col_scale[c0 + i] * acc[i]);
                }
            }
        }
    }

    /// `out[r] = row r · x` for every row, rows split across the thread pool.
    pub fn gemv(&self, x: &[f32], out: &mut [f32]) {
        let xs: Vec<f32> = x.iter().zip(&self.col_scale).map(|(a, b)| a * b).collect();
        let xsum: f32 = x.iter().sum();
        let tables: Vec<Vec<f32>> = self
            .stages
            .iter()
            .map(|s| {
                let mut t = vec![0f32; self.nv * s.k];
                crate::team::for_chunks(&mut t, s.k, |v, tv| {
                    let xv = &xs[v * self.dim..((v + 1) * self.dim).min(self.cols)];
                    table(xv, &s.by_dim, tv);
                });
                t
            })
            .collect();
        const ROWS: usize = 32;
        let gather = self.gathers();
        crate::team::for_chunks(out, ROWS, |c, o| {
            for (i, o) in o.iter_mut().enumerate() {
                let r = c * ROWS + i;
                let acc = match gather {
                    // SAFETY: `gathers` checked the CPU and that every table index fits in i32.
                    #[cfg(target_arch = "x86_64")]
                    true => unsafe { row_gathered(&self.stages, &tables, r, self.nv) },
                    _ => row_looked_up(&self.stages, &tables, r, self.nv),
                };
                *o = self.row_mean[r] * xsum + self.row_scale[r] * acc;
            }
        });
    }

    /// Whether rows take their table entries by AVX-512 gathers (16 per instruction).
    fn gathers(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let fits = |s: &Stage| {
                s.k.checked_mul(self.nv)
                    .is_some_and(|n| n <= i32::MAX as usize)
            };
            std::arch::is_x86_feature_detected!("avx512f") && self.stages.iter().all(fits)
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Row `r`'s sum of one table entry per vector and stage. Four running sums, so the additions
/// do not wait on each other; the mask (books hold a power of two) lets the compiler drop the
/// bounds checks.
fn row_looked_up(stages: &[Stage], tables: &[Vec<f32>], r: usize, nv: usize) -> f32 {
    let mut acc = [0f32; 4];
    for (s, t) in stages.iter().zip(tables) {
        let codes = &s.codes[r * nv..(r + 1) * nv];
        let mask = s.k - 1;
        let mut quads = t.chunks_exact(4 * s.k).zip(codes.chunks_exact(4));
        for (tq, cq) in &mut quads {
            for l in 0..4 {
                let tv = &tq[l * s.k..(l + 1) * s.k];
                acc[l] += tv[cq[l] as usize & mask];
            }
        }
        let done = codes.len() / 4 * 4;
        for (tv, &code) in t[done * s.k..].chunks_exact(s.k).zip(&codes[done..]) {
            acc[0] += tv[code as usize & mask];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// [`row_looked_up`] sixteen vectors at a time: codes widened to 32 bits, masked, offset by
/// each vector's table and gathered. The same entries summed in another order.
///
/// # Safety
/// The CPU has AVX-512F, and `nv · k` fits in i32 for every stage.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_gathered(stages: &[Stage], tables: &[Vec<f32>], r: usize, nv: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut tail = 0f32;
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (s, t) in stages.iter().zip(tables) {
        let codes = &s.codes[r * nv..(r + 1) * nv];
        let k = s.k as i32;
        let mask = _mm512_set1_epi32(k - 1);
        let step = _mm512_set1_epi32(16 * k);
        let mut base = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(k));
        let full = nv / 16 * 16;
        for (j, c) in codes[..full].chunks_exact(16).enumerate() {
            let c = _mm512_cvtepu16_epi32(_mm256_loadu_si256(c.as_ptr().cast()));
            let idx = _mm512_add_epi32(base, _mm512_and_si512(c, mask));
            let e = _mm512_i32gather_ps::<4>(idx, t.as_ptr());
            acc[j % 2] = _mm512_add_ps(acc[j % 2], e);
            base = _mm512_add_epi32(base, step);
        }
        for (v, &code) in (full..nv).zip(&codes[full..]) {
            tail += t[v * s.k + (code as usize & (s.k - 1))];
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + tail
}

/// One vector's table: `t[k] = Σ_d xv[d] · C[k][d]` for every centroid `k`, from the centroids
/// stored `dim × k`, summed over `d` in order (the in-order dot products' values, up to the
/// sign of a zero).
fn table(xv: &[f32], by_dim: &[f32], t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { table_avx512(xv, by_dim, t) };
    }
    table_any(xv, by_dim, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn table_avx512(xv: &[f32], by_dim: &[f32], t: &mut [f32]) {
    table_any(xv, by_dim, t)
}

/// Plain loops (a closure would not inherit the caller's target features).
#[inline(always)]
fn table_any(xv: &[f32], by_dim: &[f32], t: &mut [f32]) {
    let k = t.len();
    t.fill(0.0);
    for (&a, c) in xv.iter().zip(by_dim.chunks_exact(k)) {
        for (e, &c) in t.iter_mut().zip(c) {
            *e += a * c;
        }
    }
}

impl crate::llama::RowKernel for CodebookMatrix {
    fn dims(&self) -> (usize, usize) {
        CodebookMatrix::dims(self)
    }
    fn rows_into(&self, first: usize, out: &mut [f32]) {
        self.dequantize_rows(first, out)
    }
    fn gemv(&self, x: &[f32], out: &mut [f32]) {
        CodebookMatrix::gemv(self, x, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptq_quant::novaq::Stage as Book;
    use half::f16;

    /// Seeded codebook tensors with a short last vector, decoded and multiplied both ways; the
    /// second has rows of more than 16 vectors (the gathered loop, and its tail).
    #[test]
    fn lookup_is_the_dequantized_product() {
        lookup_case(9, 50, 6);
        lookup_case(5, 200, 3);
    }

    fn lookup_case(rows: usize, cols: usize, dim: usize) {
        let nv = cols.div_ceil(dim);
        let h = |i: usize, a: f32| f16::from_f32(((i as f32) * a).sin() * 0.5);
        let book = |bits: u8, a: f32| {
            let k = 1usize << bits;
            let codes: Vec<u16> = (0..rows * nv).map(|i| ((i * 7 + 3) % k) as u16).collect();
            Book {
                bits,
                centroids: (0..k * dim).map(|i| h(i, a)).collect(),
                codes: adaptq_loader::codebook::pack(&codes, bits),
            }
        };
        let t = CodebookTensor {
            rows,
            cols,
            dim,
            stages: vec![book(5, 0.7), book(3, 1.3)],
            row_scale: (0..rows).map(|i| h(i, 0.9)).collect(),
            row_mean: (0..rows).map(|i| h(i, 0.3)).collect(),
            col_scale: (0..cols)
                .map(|i| f16::from_f32(1.0 + 0.01 * i as f32))
                .collect(),
        };
        let m = CodebookMatrix::new(&t).unwrap();
        let w = m.dequantize();
        assert_eq!(w, t.dequantize(), "same bits as the decoder");
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.41).cos()).collect();
        let mut out = vec![0f32; rows];
        m.gemv(&x, &mut out);
        for (r, &got) in out.iter().enumerate() {
            let want: f64 = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!((got as f64 - want).abs() < 1e-4, "row {r}: {got} vs {want}");
        }
        #[cfg(target_arch = "x86_64")]
        if m.gathers() {
            let tables: Vec<Vec<f32>> = m
                .stages
                .iter()
                .map(|s| (0..nv * s.k).map(|i| (i as f32 * 0.37).sin()).collect())
                .collect();
            for r in 0..rows {
                let a = unsafe { row_gathered(&m.stages, &tables, r, nv) };
                let b = row_looked_up(&m.stages, &tables, r, nv);
                assert!((a - b).abs() < 1e-4, "row {r}: {a} gathered, {b} looked up");
            }
        }
        let mut bad = t.clone();
        bad.stages[1].codes.pop();
        assert!(CodebookMatrix::new(&bad).is_err());
    }
}

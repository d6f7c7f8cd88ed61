//! adaptq's own integer grids (any width 2–8, any group size, symmetric or with a min) run on
//! their codes: the packed runtime's kernel for the grids that have no GGML twin (widths
//! 2, 3, 6, 7; 8 bits with a min; groups that are not a multiple of 32).
//!
//! Activations are rounded to 8 bits in blocks of 32 columns from the row's start (the last
//! block may be shorter), each block with an f32 step `amax / 127`, as llama.cpp's Q8_0 does
//! but with the step unrounded. A weight group meets those blocks in segments; each segment's
//! integer dot product of codes and rounded activations is exact in `i32`, and the row's
//! result sums `scale · step · (dot − offset · Σq)` (symmetric) or
//! `scale · step · dot + min · step · Σq` (with a min) over its segments in f32.
//!
//! Hand-written because candle's quantized matmuls take only GGML block types. The same loop
//! is compiled twice, for AVX2 and for any x86-64/other CPU, and the AVX2 copy is chosen at
//! run time where the CPU has it.

use adaptq_quant::{Grid, QuantizedTensor};
use anyhow::{bail, Result};

/// Columns per block of rounded activations.
pub const ACT_BLOCK: usize = 32;

/// A weight `[rows, cols]` on an integer grid, codes held one per byte (widths above 4) or two
/// per byte (widths up to 4: each block of 32 columns in 16 bytes, column `j` in the low
/// nibble of byte `j` and column `j + 16` in its high nibble, as Q4_0 lays them, so a whole
/// block unpacks with two masks), f16 scales and mins widened once.
pub struct IntMatrix {
    rows: usize,
    cols: usize,
    nibbles: bool,
    /// Bytes per row of codes.
    row_bytes: usize,
    codes: Vec<u8>,
    /// `rows × groups` scales and mins (mins empty when symmetric).
    scales: Vec<f32>,
    mins: Vec<f32>,
    groups: usize,
    /// The code of zero on a symmetric grid (`2^(bits−1)`); 0 with a min.
    offset: i32,
    /// Where the weight groups meet the activation blocks; the same for every row.
    segments: Vec<Segment>,
}

/// Columns `start..start + len` of one weight group inside one activation block.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    start: usize,
    len: usize,
    group: usize,
    block: usize,
}

/// One row of activations rounded to 8 bits.
pub struct Rounded {
    pub(crate) q: Vec<i8>,
    /// Step of each block of [`ACT_BLOCK`] columns.
    pub(crate) steps: Vec<f32>,
}

/// Rounds `x` to 8 bits per block of [`ACT_BLOCK`] values.
pub fn round_row(x: &[f32]) -> Rounded {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { round_row_avx512(x) };
    }
    round_row_any(x)
}

/// [`round_row_any`] on AVX-512, two registers per block of 32: the same codes and steps
/// (the compiler's version converts each code to `i8` one value at a time, for the saturating
/// cast). Rounding half away from zero is `trunc(v + copysign(0.49999997, v))`, exact for every
/// f32 (LLVM lowers `f32::round` the same way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_row_avx512(x: &[f32]) -> Rounded {
    use std::arch::x86_64::*;
    let full = x.len() / ACT_BLOCK * ACT_BLOCK;
    let mut q = vec![0i8; x.len()];
    let mut steps = Vec::with_capacity(x.len().div_ceil(ACT_BLOCK));
    let half = _mm512_set1_ps(0.49999997);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for (b, qb) in x[..full]
        .chunks_exact(ACT_BLOCK)
        .zip(q.chunks_exact_mut(ACT_BLOCK))
    {
        let v = [
            _mm512_loadu_ps(b.as_ptr()),
            _mm512_loadu_ps(b.as_ptr().add(16)),
        ];
        // `max_ps(a, b)` is `b` where either is NaN: `max(|v|, m)` keeps `m` past a NaN, as
        // `block_step` skips NaN.
        let m = _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps());
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[1]), m));
        let d = amax / 127.0;
        let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        for (h, v) in v.into_iter().enumerate() {
            let s = _mm512_mul_ps(v, inv);
            let sign = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(i32::MIN));
            let bias = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(half)));
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(
                _mm512_add_ps(s, bias),
            );
            // The clamp would take NaN (from NaN, or 0 · ∞ when the step underflows) to -127;
            // `NaN as i8` is 0.
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(s, s);
            let r = _mm512_maskz_mov_ps(ordered, _mm512_min_ps(_mm512_max_ps(r, lo), hi));
            let codes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r));
            _mm_storeu_si128(qb.as_mut_ptr().add(16 * h).cast(), codes);
        }
        steps.push(d);
    }
    let tail = round_row_any(&x[full..]);
    q[full..].copy_from_slice(&tail.q);
    steps.extend(tail.steps);
    Rounded { q, steps }
}

/// Plain loops, no closures: a closure is a function of its own and would not inherit the
/// caller's target features (the rounding would go back to a libm call per value).
#[inline(always)]
fn round_row_any(x: &[f32]) -> Rounded {
    let mut q = vec![0i8; x.len()];
    let mut steps = Vec::with_capacity(x.len().div_ceil(ACT_BLOCK));
    for (b, qb) in x.chunks(ACT_BLOCK).zip(q.chunks_mut(ACT_BLOCK)) {
        let (d, inv) = block_step(b);
        for (c, &v) in qb.iter_mut().zip(b) {
            *c = code(v, inv) as i8;
        }
        steps.push(d);
    }
    Rounded { q, steps }
}

/// Rounds `x` in place to the values [`round_row`] stands for (`step(d) · q` per block of
/// [`ACT_BLOCK`]), with each block's step passed through `step` (GGML blocks store it as f16):
/// a batch's rows as the one-row kernels see them, without the codes.
pub fn round_in_place(x: &mut [f32], step: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { round_in_place_avx512(x, step) };
    }
    round_in_place_any(x, step)
}

/// [`round_in_place_any`] compiled for AVX-512, where rounding a vector is one instruction
/// sequence instead of a libm call per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_in_place_avx512(x: &mut [f32], step: impl Fn(f32) -> f32) {
    round_in_place_any(x, step)
}

#[inline(always)]
fn round_in_place_any(x: &mut [f32], step: impl Fn(f32) -> f32) {
    for b in x.chunks_mut(ACT_BLOCK) {
        let (d, inv) = block_step(b);
        let d = step(d);
        for v in b.iter_mut() {
            *v = d * code(*v, inv);
        }
    }
}

/// A block's step `amax / 127` and its inverse (0 for an all-zero block).
#[inline(always)]
fn block_step(b: &[f32]) -> (f32, f32) {
    // In 16 lanes so the loop vectorizes (a maximum is exact in any order); `>` skips NaN as
    // `f32::max` does.
    let mut lanes = [0f32; 16];
    let chunks = b.chunks_exact(16);
    let mut amax = 0f32;
    for v in chunks.remainder() {
        amax = amax.max(v.abs());
    }
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = if v.abs() > *m { v.abs() } else { *m };
        }
    }
    for &v in &lanes {
        amax = amax.max(v);
    }
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// `v`'s 8-bit code (an integer in `-127..=127`, as f32).
#[inline(always)]
fn code(v: f32, inv: f32) -> f32 {
    (v * inv).round().clamp(-127.0, 127.0)
}

impl Rounded {
    /// The rounded values as floats (`step · q`).
    pub fn values(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.steps[i / ACT_BLOCK] * q as f32)
            .collect()
    }
}

impl IntMatrix {
    /// Takes a tensor's codes as they are stored (packed LSB-first) and re-lays them per row.
    pub fn new(t: &QuantizedTensor) -> Result<Self> {
        let (rows, cols) = (t.rows, t.cols);
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| anyhow::anyhow!("tensor size overflows"))?;
        let groups = t.groups_per_row();
        let group = if t.group_size == 0 || t.group_size >= cols {
            cols
        } else {
            t.group_size
        };
        let asym = t.grid == Grid::Asymmetric;
        if !(2..=8).contains(&t.bits)
            || cols == 0
            || t.codes.len() != adaptq_quant::pack::packed_len(n, t.bits)
            || t.scales.len() != rows * groups
            || (asym && t.mins.len() != rows * groups)
        {
            bail!(
                "an integer grid of {} bits in groups of {} does not fit [{rows}, {cols}]",
                t.bits,
                t.group_size
            );
        }
        let codes = adaptq_quant::pack::unpack(&t.codes, t.bits, n);
        let nibbles = t.bits <= 4;
        let row_bytes = if nibbles {
            cols.div_ceil(ACT_BLOCK) * ACT_BLOCK / 2
        } else {
            cols
        };
        let mut laid = vec![0u8; rows * row_bytes];
        for (row, out) in codes.chunks(cols).zip(laid.chunks_mut(row_bytes)) {
            if nibbles {
                for (c, &code) in row.iter().enumerate() {
                    let (byte, shift) = nibble_at(c);
                    out[byte] |= code << shift;
                }
            } else {
                out.copy_from_slice(row);
            }
        }
        let mut segments = Vec::new();
        for g in 0..groups {
            let (g0, g1) = (g * group, ((g + 1) * group).min(cols));
            let mut at = g0;
            while at < g1 {
                let block = at / ACT_BLOCK;
                let end = ((block + 1) * ACT_BLOCK).min(g1);
                segments.push(Segment {
                    start: at,
                    len: end - at,
                    group: g,
                    block,
                });
                at = end;
            }
        }
        Ok(IntMatrix {
            rows,
            cols,
            nibbles,
            row_bytes,
            codes: laid,
            scales: t.scales.iter().map(|s| s.to_f32()).collect(),
            mins: t.mins.iter().map(|s| s.to_f32()).collect(),
            groups,
            offset: if asym { 0 } else { 1 << (t.bits - 1) },
            segments,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.mins.len())
    }

    /// The weight as f32, row-major: `scale · (code − offset)` or `scale · code + min`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Rows `first..` as f32 into `out` (whole rows).
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_mut(self.cols).enumerate() {
            let r = first + i;
            for s in &self.segments {
                let g = r * self.groups + s.group;
                let (scale, min) = (self.scales[g], self.mins.get(g).copied().unwrap_or(0.0));
                for (c, o) in (s.start..s.start + s.len).zip(&mut row[s.start..]) {
                    let code = self.code(r, c) as i32 - self.offset;
                    *o = scale * code as f32 + min;
                }
            }
        }
    }

    fn code(&self, r: usize, c: usize) -> u8 {
        let row = &self.codes[r * self.row_bytes..(r + 1) * self.row_bytes];
        match self.nibbles {
            true => {
                let (byte, shift) = nibble_at(c);
                (row[byte] >> shift) & 15
            }
            false => row[c],
        }
    }

    /// The integer dot product of row `r`'s codes in `s` with the rounded activations.
    #[inline(always)]
    fn segment_dot(&self, r: usize, s: &Segment, q: &[i8]) -> i32 {
        let row = &self.codes[r * self.row_bytes..(r + 1) * self.row_bytes];
        let q = &q[s.start..s.start + s.len];
        if !self.nibbles {
            return row[s.start..s.start + s.len]
                .iter()
                .zip(q)
                .map(|(&c, &v)| c as i32 * v as i32)
                .sum();
        }
        if s.len == ACT_BLOCK {
            let bytes = &row[s.start / 2..s.start / 2 + ACT_BLOCK / 2];
            let (lo, hi) = q.split_at(ACT_BLOCK / 2);
            let mut dot = 0i32;
            for ((&b, &l), &h) in bytes.iter().zip(lo).zip(hi) {
                dot += (b & 15) as i32 * l as i32 + (b >> 4) as i32 * h as i32;
            }
            return dot;
        }
        (s.start..s.start + s.len)
            .zip(q)
            .map(|(c, &v)| {
                let (byte, shift) = nibble_at(c);
                ((row[byte] >> shift) & 15) as i32 * v as i32
            })
            .sum()
    }

    /// Row `r` times the rounded activations; `qsums` holds each segment's sum of them.
    #[inline(always)]
    fn row_dot(&self, r: usize, x: &Rounded, qsums: &[i32]) -> f32 {
        let mut acc = 0f32;
        for (s, &qsum) in self.segments.iter().zip(qsums) {
            let g = r * self.groups + s.group;
            let dot = self.segment_dot(r, s, &x.q);
            let step = x.steps[s.block];
            acc += match self.mins.get(g) {
                Some(&min) => self.scales[g] * step * dot as f32 + min * step * qsum as f32,
                None => self.scales[g] * step * (dot - self.offset * qsum) as f32,
            };
        }
        acc
    }

    /// `out[r] = row r · x` for every row, rows split across the thread pool.
    pub fn gemv(&self, x: &Rounded, out: &mut [f32]) {
        const ROWS: usize = 16;
        let qsums: Vec<i32> = self
            .segments
            .iter()
            .map(|s| {
                x.q[s.start..s.start + s.len]
                    .iter()
                    .map(|&v| v as i32)
                    .sum()
            })
            .collect();
        crate::team::for_chunks(out, ROWS, |c, o| {
            let r0 = c * ROWS;
            rows_dot(self, x, &qsums, r0, o);
        });
    }
}

/// Byte and shift of column `c`'s nibble: block `c / 32` in 16 bytes, `j = c % 32` low in byte
/// `j` below 16, high in byte `j − 16` above.
fn nibble_at(c: usize) -> (usize, u32) {
    let j = c % ACT_BLOCK;
    (
        c / ACT_BLOCK * (ACT_BLOCK / 2) + j % 16,
        4 * (j / 16) as u32,
    )
}

impl crate::llama::RowKernel for IntMatrix {
    fn dims(&self) -> (usize, usize) {
        IntMatrix::dims(self)
    }
    fn rows_into(&self, first: usize, out: &mut [f32]) {
        self.dequantize_rows(first, out)
    }
    fn gemv(&self, x: &[f32], out: &mut [f32]) {
        IntMatrix::gemv(self, &round_row(x), out)
    }
    fn round_batch_row(&self, x: &mut [f32]) {
        round_in_place(x, |d| d)
    }
}

/// Fills `out` with rows `r0..` times `x`, on the best loop the CPU runs.
fn rows_dot(m: &IntMatrix, x: &Rounded, qsums: &[i32], r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { rows_dot_avx2(m, x, qsums, r0, out) };
    }
    rows_dot_any(m, x, qsums, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_dot_avx2(m: &IntMatrix, x: &Rounded, qsums: &[i32], r0: usize, out: &mut [f32]) {
    rows_dot_any(m, x, qsums, r0, out)
}

#[inline(always)]
fn rows_dot_any(m: &IntMatrix, x: &Rounded, qsums: &[i32], r0: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = m.row_dot(r0 + i, x, qsums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptq_quant::{quantize_rtn, RtnConfig};

    fn wave(n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * a).sin() + 0.4 * (i as f32 * 0.13).cos()) * 0.2)
            .collect()
    }

    /// The vector rounding gives the portable loop's codes and steps, ties (±k.5 after
    /// scaling) and zero blocks included, with a short last block.
    #[test]
    fn vector_rounding_is_the_portable_rounding() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut x = wave(32 * 8 + 13, 2.3);
            // A block whose step is 1: every value a tie.
            for (i, v) in x[32..64].iter_mut().enumerate() {
                *v = if i == 0 {
                    127.0
                } else {
                    (i as f32 - 16.0) + 0.5
                };
            }
            x[64..96].fill(0.0);
            x[96..128].iter_mut().for_each(|v| *v = -*v * 1e-30);
            // NaN in the first register's lanes, infinity, and a step so small that its
            // inverse is infinite (0 · ∞ for the zeros).
            x[128 + 3] = f32::NAN;
            x[128 + 19] = 5.0;
            x[160 + 7] = f32::INFINITY;
            x[192..224].fill(0.0);
            x[192] = 1e-38;
            x[224 + 20] = f32::NAN;
            for n in [0, 5, 32, 64, x.len()] {
                let (a, b) = (unsafe { round_row_avx512(&x[..n]) }, round_row_any(&x[..n]));
                assert_eq!(a.q, b.q, "{n} values");
                assert_eq!(a.steps, b.steps, "{n} values");
            }
            return;
        }
        eprintln!("no AVX-512 on this CPU: nothing to compare");
    }

    /// Every width, both grids, groups that are and are not multiples of 32, a short last
    /// group and a row of one group: the stored grid round-trips, every segment's integer
    /// dot is the exact sum of code × rounded activation, and each row's product is the
    /// dequantized weights times the rounded activations to float tolerance.
    #[test]
    fn kernel_is_the_dequantized_product_of_rounded_activations() {
        let (rows, cols) = (5, 200);
        let w = wave(rows * cols, 0.77);
        let x = wave(cols, 1.9).iter().map(|v| v * 7.0).collect::<Vec<_>>();
        let rx = round_row(&x);
        let xv = rx.values();
        for bits in 2..=8u8 {
            for grid in [Grid::Symmetric, Grid::Asymmetric] {
                for group in [32, 48, 7, 64, 200] {
                    let q =
                        quantize_rtn(&w, rows, cols, &RtnConfig::new(bits, group, grid)).unwrap();
                    let m = IntMatrix::new(&q).unwrap();
                    let deq = q.dequantize();
                    assert_eq!(m.dequantize(), deq, "{bits} bits {grid:?} g{group}");
                    let codes = adaptq_quant::pack::unpack(&q.codes, bits, rows * cols);
                    for r in 0..rows {
                        for s in &m.segments {
                            let want: i64 = (s.start..s.start + s.len)
                                .map(|c| codes[r * cols + c] as i64 * rx.q[c] as i64)
                                .sum();
                            assert_eq!(m.segment_dot(r, s, &rx.q) as i64, want);
                        }
                    }
                    let mut out = vec![0f32; rows];
                    m.gemv(&rx, &mut out);
                    for (r, &got) in out.iter().enumerate() {
                        let want: f64 = deq[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(&xv)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        let tol = 1e-5
                            * deq
                                .iter()
                                .zip(&xv)
                                .map(|(a, b)| (a * b).abs() as f64)
                                .sum::<f64>();
                        assert!(
                            (got as f64 - want).abs() <= tol.max(1e-6),
                            "{bits} bits {grid:?} g{group} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn segments_cover_each_row_once_in_order() {
        let q = quantize_rtn(
            &wave(2 * 100, 0.3),
            2,
            100,
            &RtnConfig::new(3, 48, Grid::Symmetric),
        )
        .unwrap();
        let m = IntMatrix::new(&q).unwrap();
        let starts: Vec<(usize, usize, usize)> = m
            .segments
            .iter()
            .map(|s| (s.start, s.len, s.group))
            .collect();
        assert_eq!(
            starts,
            vec![
                (0, 32, 0),
                (32, 16, 0),
                (48, 16, 1),
                (64, 32, 1),
                (96, 4, 2)
            ]
        );
    }

    #[test]
    fn rounding_is_per_block_of_32() {
        let mut x = vec![0.01f32; 40];
        x[0] = 1.27;
        x[35] = -0.5;
        let r = round_row(&x);
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.q[0], 127);
        assert_eq!(r.q[35], -127);
        assert_eq!(r.q[1], 1);
    }
}

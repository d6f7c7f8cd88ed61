//! Float weights the packed runtime multiplies row by row: f16 (a bundle's unquantized
//! embedding and head, f16 source tensors) and f32 (F32 files, and whatever is dequantized at
//! load, e.g. NOVAQ). Kept row-major `[out, in]`; one token's product is a dot of each row with
//! the activations, rows split across the thread pool, so generation reads each weight once
//! at memory speed. An f16 row is widened in registers (AVX-512) or a slice at a time into a
//! buffer on the stack, so a token reads half the bytes an f32 copy would and the model holds
//! half the memory.
//! Hand-written because candle's quantized matmul widens f16 weights to f32 at load, and its
//! gemm, built for batches, runs one row of activations at a third of memory speed.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Values widened per step.
const CHUNK: usize = 256;

/// An element type of [`RowMatrix`].
pub trait Element: Copy + Send + Sync + 'static {
    /// `w · x`, widening `w` through `buf` (at least [`CHUNK`] long) when it is not f32.
    fn dot(w: &[Self], x: &[f32], buf: &mut [f32]) -> f32;
    /// Four rows' [`Element::dot`] at once, where a kernel for it exists.
    fn dot4(w: [&[Self]; 4], x: &[f32]) -> Option<[f32; 4]>;
    /// `w` as f32 into `out`.
    fn widen(w: &[Self], out: &mut [f32]);
    /// `w` itself when it is f32.
    fn as_f32(w: &[Self]) -> Option<&[f32]>;
}

impl Element for f16 {
    fn dot(w: &[Self], x: &[f32], buf: &mut [f32]) -> f32 {
        if let Some(d) = crate::llama::dot_f16(w, x) {
            return d;
        }
        w.chunks(CHUNK)
            .zip(x.chunks(CHUNK))
            .map(|(w, x)| {
                let b = &mut buf[..w.len()];
                w.convert_to_f32_slice(b);
                crate::llama::dot(b, x)
            })
            .sum()
    }
    fn dot4(w: [&[Self]; 4], x: &[f32]) -> Option<[f32; 4]> {
        crate::llama::dot4_f16(w, x)
    }
    fn widen(w: &[Self], out: &mut [f32]) {
        w.convert_to_f32_slice(out)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Element for f32 {
    fn dot(w: &[Self], x: &[f32], _: &mut [f32]) -> f32 {
        crate::llama::dot(w, x)
    }
    fn dot4(w: [&[Self]; 4], x: &[f32]) -> Option<[f32; 4]> {
        crate::llama::dot4(w, x)
    }
    fn widen(w: &[Self], out: &mut [f32]) {
        out.copy_from_slice(w)
    }
    fn as_f32(w: &[Self]) -> Option<&[f32]> {
        Some(w)
    }
}

/// `[rows, cols]` values, row-major.
pub struct RowMatrix<T> {
    rows: usize,
    cols: usize,
    w: Vec<T>,
}

pub type F16Matrix = RowMatrix<f16>;

impl<T: Element> RowMatrix<T> {
    /// `None` when `w` does not hold `rows × cols` values.
    pub fn new(w: Vec<T>, rows: usize, cols: usize) -> Option<Self> {
        (rows.checked_mul(cols) == Some(w.len()) && cols > 0).then_some(RowMatrix { rows, cols, w })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.w.len()];
        T::widen(&self.w, &mut out);
        out
    }

    /// Rows `ids` as f32, one after another (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, o) in ids.iter().zip(out.chunks_mut(self.cols)) {
            let r = id as usize * self.cols;
            T::widen(&self.w[r..r + self.cols], o);
        }
        out
    }

    /// `out[r] = row r · x` for every row, rows split across the thread pool.
    pub fn gemv(&self, x: &[f32], out: &mut [f32]) {
        const ROWS: usize = 64;
        let row = |r: usize| &self.w[r * self.cols..(r + 1) * self.cols];
        crate::team::for_chunks(out, ROWS, |c, o| {
            let mut buf = [0f32; CHUNK];
            let r0 = c * ROWS;
            let mut i = 0;
            while i + 4 <= o.len() {
                let w = [
                    row(r0 + i),
                    row(r0 + i + 1),
                    row(r0 + i + 2),
                    row(r0 + i + 3),
                ];
                match T::dot4(w, x) {
                    Some(d) => o[i..i + 4].copy_from_slice(&d),
                    None => break,
                }
                i += 4;
            }
            for (j, o) in o.iter_mut().enumerate().skip(i) {
                *o = T::dot(row(r0 + j), x, &mut buf);
            }
        });
    }
}

impl<T: Element> crate::llama::RowKernel for RowMatrix<T> {
    fn dims(&self) -> (usize, usize) {
        RowMatrix::dims(self)
    }
    fn rows_into(&self, first: usize, out: &mut [f32]) {
        let r = first * self.cols;
        T::widen(&self.w[r..r + out.len()], out)
    }
    fn as_f32(&self) -> Option<&[f32]> {
        T::as_f32(&self.w)
    }
    fn gemv(&self, x: &[f32], out: &mut [f32]) {
        RowMatrix::gemv(self, x, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Element>(w: Vec<T>, rows: usize, cols: usize) {
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let m = RowMatrix::new(w, rows, cols).unwrap();
        let wf = m.to_f32();
        let mut out = vec![0f32; rows];
        m.gemv(&x, &mut out);
        for (r, &got) in out.iter().enumerate() {
            let want: f64 = wf[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            assert!((got as f64 - want).abs() < 1e-4, "row {r}: {got} vs {want}");
            // Rows taken four at a time sum as one row at a time does.
            let one = T::dot(&m.w[r * cols..(r + 1) * cols], &x, &mut [0f32; CHUNK]);
            assert_eq!(got.to_bits(), one.to_bits(), "row {r}");
        }
        assert_eq!(m.rows_f32(&[3]), wf[3 * cols..4 * cols]);
    }

    #[test]
    fn gemv_is_the_widened_product() {
        let (rows, cols) = (70, 300);
        let v = |i: usize| ((i as f32) * 0.37).sin();
        check(
            (0..rows * cols).map(|i| f16::from_f32(v(i))).collect(),
            rows,
            cols,
        );
        check((0..rows * cols).map(v).collect::<Vec<f32>>(), rows, cols);
        assert!(F16Matrix::new(vec![f16::ZERO; 5], 2, 3).is_none());
    }
}

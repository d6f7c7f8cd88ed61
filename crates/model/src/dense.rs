//! f32 products of borrowed, strided slices on the `gemm` crate (the gemm candle's matmul
//! runs), called without building tensors: a packed batch times its weight dequantized once
//! per pass, and attention's score and value products read straight from the KV cache's
//! layout. A tensor round trip would copy every operand once more.

use gemm::{gemm, Parallelism};

/// `rows × cols` values of `data`, row `r` starting at `r · stride` (columns adjacent).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> View<'a> {
    /// A dense row-major matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            stride: cols,
        }
    }

    /// `rows × cols` values from `data[from..]`, rows `stride` apart.
    pub fn at(data: &'a [f32], from: usize, rows: usize, cols: usize, stride: usize) -> Self {
        View {
            data: &data[from..],
            rows,
            cols,
            stride,
        }
    }

    /// Panics unless every element the view names lies in `data`.
    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            assert!(self.cols <= self.stride || self.rows == 1, "rows overlap");
            let last = (self.rows - 1)
                .checked_mul(self.stride)
                .and_then(|v| v.checked_add(self.cols));
            assert!(
                last.is_some_and(|l| l <= self.data.len()),
                "view outside its data"
            );
        }
    }
}

/// How the right operand enters the product.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Right {
    /// `b` is `[k, n]`.
    AsIs,
    /// `b` is `[n, k]`: the product takes `bᵀ` (weights stored `[out, in]`, keys).
    Transposed,
}

/// `out = a · b` (or `a · bᵀ`), `out` being `[m, n]` with rows `out_stride` apart, overwritten.
/// `threads`: split the product across the rayon pool (false inside a task already split).
pub(crate) fn mul(
    a: View,
    b: View,
    right: Right,
    out: &mut [f32],
    out_stride: usize,
    threads: bool,
) {
    a.check();
    b.check();
    let (m, k) = (a.rows, a.cols);
    let (kb, n) = match right {
        Right::AsIs => (b.rows, b.cols),
        Right::Transposed => (b.cols, b.rows),
    };
    assert_eq!(k, kb, "inner dimensions differ");
    View {
        data: out,
        rows: m,
        cols: n,
        stride: out_stride,
    }
    .check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            out[r * out_stride..r * out_stride + n].fill(0.0);
        }
        return;
    }
    // `gemm` takes (column stride, row stride) per operand.
    let (rhs_cs, rhs_rs) = match right {
        Right::AsIs => (1, b.stride as isize),
        Right::Transposed => (b.stride as isize, 1),
    };
    let par = match threads && rayon::current_num_threads() > 1 {
        true => Parallelism::Rayon(rayon::current_num_threads()),
        false => Parallelism::None,
    };
    // SAFETY: the checks above keep every element each operand's strides reach inside its
    // slice, and `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            false,
            a.data.as_ptr(),
            1,
            a.stride as isize,
            b.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: View, b: View, right: Right) -> Vec<f32> {
        let n = match right {
            Right::AsIs => b.cols,
            Right::Transposed => b.rows,
        };
        let at = |v: &View, r: usize, c: usize| v.data[r * v.stride + c];
        let mut out = vec![0f32; a.rows * n];
        for i in 0..a.rows {
            for j in 0..n {
                out[i * n + j] = (0..a.cols)
                    .map(|p| {
                        at(&a, i, p)
                            * match right {
                                Right::AsIs => at(&b, p, j),
                                Right::Transposed => at(&b, j, p),
                            }
                    })
                    .sum();
            }
        }
        out
    }

    /// Strided operands (every other row of a wider buffer) and a strided destination give
    /// the plain product, both ways round, on one thread and on the pool.
    #[test]
    fn strided_products_are_the_plain_product() {
        let wave = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<_>>();
        let (m, k, n) = (37, 70, 45);
        let a = wave(m * 2 * k, 0.37);
        let b = wave(n * 3 * k, 0.91);
        let av = View {
            data: &a,
            rows: m,
            cols: k,
            stride: 2 * k,
        };
        for right in [Right::AsIs, Right::Transposed] {
            let (rows, cols) = match right {
                Right::AsIs => (k, n),
                Right::Transposed => (n, k),
            };
            let bv = View {
                data: &b[5..],
                rows,
                cols,
                stride: 3 * cols,
            };
            let want = naive(av, bv, right);
            for threads in [false, true] {
                let mut out = vec![f32::NAN; m * (n + 3)];
                mul(av, bv, right, &mut out, n + 3, threads);
                for i in 0..m {
                    for j in 0..n {
                        let (g, w) = (out[i * (n + 3) + j], want[i * n + j]);
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{i},{j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "view outside its data")]
    fn a_view_past_its_data_is_refused() {
        let a = vec![0f32; 10];
        let mut out = vec![0f32; 4];
        mul(
            View::dense(&a, 2, 6),
            View::dense(&a, 6, 2),
            Right::AsIs,
            &mut out,
            2,
            false,
        );
    }
}

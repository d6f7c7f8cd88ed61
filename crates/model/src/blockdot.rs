//! GGML weights run on their stored blocks by adaptq's own dot kernels: the packed runtime's
//! products for GGUF files and `--ggml-type` bundles of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and
//! Q6_K (the types llama-quantize's common presets put on rows of any width: SmolLM2's Q4_K_M
//! file is Q5_0, Q4_K, Q6_K and Q8_0).
//!
//! Activations are rounded to 8 bits per block of 32 with the step `amax / 127` stored as f16
//! ([`crate::intgrid::round_row`] with f16 steps), as llama.cpp rounds them for the 32-blocks
//! (for k-quants llama.cpp rounds per 256 with one f32 step; the finer rounding here is closer
//! to the exact product). Each (sub-)block's integer dot product with its activations is exact
//! in `i32`; the row sums them with the blocks' scales in f32. A batch of rows is multiplied in
//! f32 by the dequantized weight after the same rounding ([`crate::llama::RowKernel`]): the
//! same function up to the order of the float sums, and faster than these kernels row by row.
//!
//! Hand-written because candle's CPU kernels for these types take one block per step and widen
//! each f16 scale through a function call (Q4_1, Q5_0 and Q5_1 have no SIMD there at all), and
//! its k-quant matmuls run on a spinning thread pool of their own beside rayon's. One AVX2 loop
//! per type, AVX-512 (with VNNI) loops for Q4_0, Q5_0, Q8_0, Q4_K and Q6_K, chosen at run time, and
//! a portable loop for every type on the quant crate's block decoder.

use crate::intgrid::{round_row, Rounded, ACT_BLOCK};
use adaptq_quant::ggml::BlockType;
use anyhow::{bail, Result};
use half::f16;

/// The block types these kernels run.
pub fn runs(ty: BlockType) -> bool {
    matches!(
        ty,
        BlockType::Q4_0
            | BlockType::Q4_1
            | BlockType::Q5_0
            | BlockType::Q5_1
            | BlockType::Q8_0
            | BlockType::Q4K
            | BlockType::Q6K
    )
}

/// A weight `[rows, cols]` held as its GGML blocks, row-major.
pub struct BlockMatrix {
    ty: BlockType,
    rows: usize,
    cols: usize,
    /// Bytes per row of blocks.
    row_bytes: usize,
    data: Vec<u8>,
}

impl BlockMatrix {
    /// Takes `rows × cols` values stored as `ty` blocks.
    pub fn new(ty: BlockType, data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols);
        if !runs(ty)
            || cols == 0
            || !cols.is_multiple_of(ty.block_len())
            || n.is_none_or(|n| data.len() != ty.bytes_for(n))
        {
            bail!(
                "{} data of {} bytes does not hold [{rows}, {cols}] for the block kernels",
                ty.name(),
                data.len()
            );
        }
        Ok(BlockMatrix {
            ty,
            rows,
            cols,
            row_bytes: cols / ty.block_len() * ty.block_bytes(),
            data,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The weight as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        adaptq_quant::ggml::dequantize(self.ty, &self.data, self.rows * self.cols)
            .expect("sizes checked at construction")
    }

    /// Rows `ids` as f32, one after another (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let r = id as usize * self.row_bytes;
            let row = adaptq_quant::ggml::dequantize(
                self.ty,
                &self.data[r..r + self.row_bytes],
                self.cols,
            );
            out.extend(row.expect("sizes checked at construction"));
        }
        out
    }

    /// `out[r] = row r · x` for every row (`x` rounded by [`round_act`]), rows split across
    /// the thread pool.
    pub fn gemv(&self, x: &Rounded, out: &mut [f32]) {
        assert!(
            x.q.len() == self.cols && out.len() == self.rows,
            "gemv shapes"
        );
        const ROWS: usize = 16;
        let sums = self.min_sums(x);
        let rb = self.row_bytes;
        crate::team::for_chunks(out, ROWS, |c, o| {
            let r0 = c * ROWS;
            let rows = &self.data[r0 * rb..(r0 + o.len()) * rb];
            rows_dot(self.ty, rows, rb, x, &sums, o);
        });
    }

    /// Each activation block's `step · Σq`, for the types whose rows take it ([`needs_sums`]).
    fn min_sums(&self, x: &Rounded) -> Vec<f32> {
        match needs_sums(self.ty) {
            true => {
                x.q.chunks(ACT_BLOCK)
                    .zip(&x.steps)
                    .map(|(b, d)| d * b.iter().map(|&v| v as i32).sum::<i32>() as f32)
                    .collect()
            }
            false => Vec::new(),
        }
    }
}

/// Rounds one row of activations as the block kernels take it.
pub fn round_act(x: &[f32]) -> Rounded {
    let mut r = round_row(x);
    r.steps
        .iter_mut()
        .for_each(|d| *d = f16::from_f32(*d).to_f32());
    r
}

impl crate::llama::RowKernel for BlockMatrix {
    fn dims(&self) -> (usize, usize) {
        BlockMatrix::dims(self)
    }
    fn rows_into(&self, first: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        let bytes = &self.data[first * self.row_bytes..(first + n) * self.row_bytes];
        let rows = adaptq_quant::ggml::dequantize(self.ty, bytes, out.len());
        out.copy_from_slice(&rows.expect("sizes checked at construction"));
    }
    fn gemv(&self, x: &[f32], out: &mut [f32]) {
        BlockMatrix::gemv(self, &round_act(x), out)
    }
    fn round_batch_row(&self, x: &mut [f32]) {
        crate::intgrid::round_in_place(x, |d| f16::from_f32(d).to_f32())
    }
}

/// Types whose AVX2 rows take each activation block's `step · Σq` (for their mins, or their
/// zero code's offset).
fn needs_sums(ty: BlockType) -> bool {
    // Q8_0's AVX-512 loop takes its signed codes as unsigned (plus 128) and subtracts
    // `128 · d · step · Σq` again.
    !matches!(ty, BlockType::Q6K)
}

/// Rows `rows` (each `row_bytes` long) times the rounded activations into `out`, on the best
/// loop the CPU runs.
fn rows_dot(
    ty: BlockType,
    rows: &[u8],
    row_bytes: usize,
    x: &Rounded,
    sums: &[f32],
    out: &mut [f32],
) {
    rows_dot_on(Level::best(), ty, rows, row_bytes, x, sums, out)
}

/// The instruction sets a kernel may use, from the plainest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Level {
    Any,
    Avx2,
    /// AVX-512 with byte operations and VNNI's `u8 × i8` dot product, for the 32-block types
    /// with one scale (two blocks per register); the others run on the AVX2 loops.
    Avx512,
}

impl Level {
    /// The best level this CPU runs, detected once (every product's task asks).
    fn best() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                        return Level::Avx512;
                    }
                    return Level::Avx2;
                }
            }
            Level::Any
        })
    }
}

/// [`rows_dot`] on the loops of `level` (which the CPU must run).
fn rows_dot_on(
    level: Level,
    ty: BlockType,
    rows: &[u8],
    row_bytes: usize,
    x: &Rounded,
    sums: &[f32],
    out: &mut [f32],
) {
    assert!(
        level <= Level::best(),
        "{level:?} kernels on a CPU without them"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if level == Level::Avx512 && avx512::runs(ty) {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI and AVX2/FMA/F16C (asserted above).
            return unsafe { avx512::rows_dot(ty, rows, row_bytes, x, sums, out) };
        }
        if level >= Level::Avx2 {
            // SAFETY: the CPU has AVX2, FMA and F16C (asserted above).
            return unsafe { avx2::rows_dot(ty, rows, row_bytes, x, sums, out) };
        }
    }
    for (row, o) in rows.chunks_exact(row_bytes).zip(out) {
        *o = row_dot_any(ty, row, x, sums);
    }
}

/// The portable loop, for every type through the quant crate's block decoder: each
/// sub-block's integer dot product with its activations, then its grid's scale and offset.
fn row_dot_any(ty: BlockType, row: &[u8], x: &Rounded, _sums: &[f32]) -> f32 {
    let (bl, sl) = (ty.block_len(), ty.sub_len());
    let mut codes = vec![0u8; bl];
    let mut acc = 0f32;
    for (i, b) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let h = adaptq_quant::ggml::decode_block(ty, b, &mut codes);
        for (s, cs) in codes.chunks(sl).enumerate() {
            let at = i * bl + s * sl;
            let q = &x.q[at..at + sl];
            let step = x.steps[at / ACT_BLOCK];
            let g = adaptq_quant::ggml::affine(ty, &h, s);
            let qsum: i32 = q.iter().map(|&v| v as i32).sum();
            let dot: i32 = cs.iter().zip(q).map(|(&c, &v)| c as i32 * v as i32).sum();
            acc += match g.off {
                Some(o) => g.a * step * (dot - o * qsum) as f32,
                None => g.a * step * dot as f32 + g.b * step * qsum as f32,
            };
        }
    }
    acc
}

/// Calls `f(first, count)` over `rows` rows in tiles of four (each activation block loaded once
/// for four rows, four weight streams in flight), then one row at a time.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn in_tiles(rows: usize, mut f: impl FnMut(usize, usize)) {
    let mut r = 0;
    while r < rows {
        let take = if r + 4 <= rows { 4 } else { 1 };
        f(r, take);
        r += take;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{in_tiles, Rounded, ACT_BLOCK};
    use adaptq_quant::ggml::BlockType;
    use std::arch::x86_64::*;

    /// 16 bytes of nibbles as 32 bytes: low nibbles, then high ones (columns 0..16, 16..32).
    #[inline(always)]
    pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
        let b = _mm_loadu_si128(p as *const __m128i);
        let lo = _mm_and_si128(b, _mm_set1_epi8(15));
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
        _mm256_set_m128i(hi, lo)
    }

    /// 32 bits as 32 bytes, 0xFF where the bit is set.
    #[inline(always)]
    unsafe fn bits(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let b = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(b, mask), _mm256_set1_epi64x(-1))
    }

    /// Eight i32 partial sums of `w · x`, `w` signed bytes.
    #[inline(always)]
    unsafe fn dot_signed(w: __m256i, x: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// Eight i32 partial sums of `w · x`, `w` unsigned bytes below 128.
    #[inline(always)]
    unsafe fn dot_unsigned(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// One block type's layout: block bytes, its codes times the activations, and the term
    /// per activation block's `step · Σq` (the min, or the zero code's offset times the scale:
    /// codes taken unsigned save the two sign operations a signed product needs).
    pub(super) trait Layout {
        const BYTES: usize;
        const MIN: bool;
        /// Eight i32 partial sums of the block at `b`'s codes times the activations `x`.
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i;
        /// The factor of `step · Σq` (when `MIN`).
        unsafe fn min(_b: *const u8) -> f32 {
            0.0
        }
    }

    pub(super) struct Q8_0;
    impl Layout for Q8_0 {
        const BYTES: usize = 34;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i {
            dot_signed(_mm256_loadu_si256(b.add(2) as *const __m256i), x)
        }
    }

    /// Five-bit codes: the nibbles at `qs` with the fifth bits of `qh`.
    #[inline(always)]
    unsafe fn fives(qh: *const u8, qs: *const u8) -> __m256i {
        let qh = u32::from_le((qh as *const u32).read_unaligned());
        let hi = _mm256_and_si256(bits(qh), _mm256_set1_epi8(16));
        _mm256_or_si256(nibbles(qs), hi)
    }

    pub(super) struct Q4_0;
    impl Layout for Q4_0 {
        const BYTES: usize = 18;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i {
            dot_unsigned(nibbles(b.add(2)), x)
        }
        #[inline(always)]
        unsafe fn min(b: *const u8) -> f32 {
            -8.0 * h16(b)
        }
    }

    pub(super) struct Q5_0;
    impl Layout for Q5_0 {
        const BYTES: usize = 22;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i {
            dot_unsigned(fives(b.add(2), b.add(6)), x)
        }
        #[inline(always)]
        unsafe fn min(b: *const u8) -> f32 {
            -16.0 * h16(b)
        }
    }

    struct Q4_1;
    impl Layout for Q4_1 {
        const BYTES: usize = 20;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i {
            dot_unsigned(nibbles(b.add(4)), x)
        }
        #[inline(always)]
        unsafe fn min(b: *const u8) -> f32 {
            h16(b.add(2))
        }
    }

    struct Q5_1;
    impl Layout for Q5_1 {
        const BYTES: usize = 24;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn dot(b: *const u8, x: __m256i) -> __m256i {
            dot_unsigned(fives(b.add(4), b.add(8)), x)
        }
        #[inline(always)]
        unsafe fn min(b: *const u8) -> f32 {
            h16(b.add(2))
        }
    }

    #[inline(always)]
    pub(super) unsafe fn h16(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le(bits) as i32)))
    }

    /// `R` rows from `p` (each `rb` bytes, `n` blocks) into `out[..R]`: each activation block
    /// is loaded once for all of them, and `R` weight streams are in flight together.
    #[inline(always)]
    unsafe fn tile<T: Layout, const R: usize>(
        p: *const u8,
        rb: usize,
        n: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        let q = x.q.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        for i in 0..n {
            let xv = _mm256_loadu_si256(q.add(i * ACT_BLOCK) as *const __m256i);
            let step = *x.steps.get_unchecked(i);
            for k in 0..R {
                let b = p.add(k * rb + i * T::BYTES);
                let scale = _mm256_set1_ps(h16(b) * step);
                acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(T::dot(b, xv)), acc[k]);
                if T::MIN {
                    mins[k] += T::min(b) * *sums.get_unchecked(i);
                }
            }
        }
        for k in 0..R {
            out[k] = hsum(acc[k]) + mins[k];
        }
    }

    /// Rows four at a time, then one at a time.
    #[inline(always)]
    unsafe fn rows_of<T: Layout>(
        rows: &[u8],
        rb: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        let n = rb / T::BYTES;
        assert!(rb == n * T::BYTES && rows.len() == out.len() * rb);
        assert!(x.q.len() >= n * ACT_BLOCK && x.steps.len() >= n && (!T::MIN || sums.len() >= n));
        in_tiles(out.len(), |r, take| {
            let (p, o) = (rows.as_ptr().add(r * rb), &mut out[r..r + take]);
            match take {
                4 => tile::<T, 4>(p, rb, n, x, sums, o),
                _ => tile::<T, 1>(p, rb, n, x, sums, o),
            }
        });
    }

    /// Q4_K: super-blocks of 256 in eight sub-blocks of 32 with 6-bit scales and mins; each
    /// sub-block meets one activation block.
    #[inline(always)]
    unsafe fn row_q4k(p: *const u8, n: usize, x: &Rounded, sums: &[f32]) -> f32 {
        let q = x.q.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for i in 0..n {
            let b = p.add(i * 144);
            let (d, dmin) = (h16(b), h16(b.add(2)));
            let sc = std::slice::from_raw_parts(b.add(4), 12);
            for j in 0..4 {
                let qs = _mm256_loadu_si256(b.add(16 + 32 * j) as *const __m256i);
                let lo = _mm256_and_si256(qs, _mm256_set1_epi8(15));
                let hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), _mm256_set1_epi8(15));
                for (k, w) in [(2 * j, lo), (2 * j + 1, hi)] {
                    let (s, m) = if k < 4 {
                        (sc[k] & 63, sc[k + 4] & 63)
                    } else {
                        (
                            (sc[k + 4] & 15) | ((sc[k - 4] >> 6) << 4),
                            (sc[k + 4] >> 4) | ((sc[k] >> 6) << 4),
                        )
                    };
                    let a = i * 8 + k;
                    let xv = _mm256_loadu_si256(q.add(a * ACT_BLOCK) as *const __m256i);
                    let scale = _mm256_set1_ps(d * s as f32 * *x.steps.get_unchecked(a));
                    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot_unsigned(w, xv)), acc);
                    mins += dmin * m as f32 * *sums.get_unchecked(a);
                }
            }
        }
        hsum(acc) - mins
    }

    /// Q6_K: super-blocks of 256 in sixteen sub-blocks of 16 with i8 scales; an activation
    /// block of 32 spans two of them, whose scales weight its two halves.
    #[inline(always)]
    unsafe fn row_q6k(p: *const u8, n: usize, x: &Rounded) -> f32 {
        let q = x.q.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(15);
        let m2 = _mm256_set1_epi8(3);
        for i in 0..n {
            let b = p.add(i * 210);
            let d = h16(b.add(208));
            for half in 0..2 {
                let ql = b.add(64 * half);
                let qh = _mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i);
                let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let sc = b.add(192 + 8 * half) as *const i8;
                let parts = [
                    (_mm256_and_si256(ql0, m4), qh),
                    (_mm256_and_si256(ql1, m4), _mm256_srli_epi16(qh, 2)),
                    (
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_srli_epi16(qh, 4),
                    ),
                    (
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_srli_epi16(qh, 6),
                    ),
                ];
                for (k, (lo, hi)) in parts.into_iter().enumerate() {
                    let hi = _mm256_slli_epi16(_mm256_and_si256(hi, m2), 4);
                    let w = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
                    let a = i * 8 + half * 4 + k;
                    let xv = _mm256_loadu_si256(q.add(a * ACT_BLOCK) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                    let scales = _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(2 * k + 1) as i16),
                        _mm_set1_epi16(*sc.add(2 * k) as i16),
                    );
                    let dot = _mm256_madd_epi16(p16, scales);
                    let scale = _mm256_set1_ps(d * *x.steps.get_unchecked(a));
                    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc);
                }
            }
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_dot(
        ty: BlockType,
        rows: &[u8],
        rb: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        match ty {
            BlockType::Q8_0 => rows_of::<Q8_0>(rows, rb, x, sums, out),
            BlockType::Q4_0 => rows_of::<Q4_0>(rows, rb, x, sums, out),
            BlockType::Q5_0 => rows_of::<Q5_0>(rows, rb, x, sums, out),
            BlockType::Q4_1 => rows_of::<Q4_1>(rows, rb, x, sums, out),
            BlockType::Q5_1 => rows_of::<Q5_1>(rows, rb, x, sums, out),
            BlockType::Q4K | BlockType::Q6K => {
                let bb = ty.block_bytes();
                let n = rb / bb;
                assert!(rb == n * bb && rows.len() == out.len() * rb);
                assert!(x.q.len() >= n * 256 && x.steps.len() >= n * 8);
                let k4 = ty == BlockType::Q4K;
                assert!(!k4 || sums.len() >= n * 8);
                for (r, o) in out.iter_mut().enumerate() {
                    let p = rows.as_ptr().add(r * rb);
                    *o = match k4 {
                        true => row_q4k(p, n, x, sums),
                        false => row_q6k(p, n, x),
                    };
                }
            }
            _ => unreachable!("BlockMatrix holds only the types `runs` accepts"),
        }
    }
}

/// Two blocks per 512-bit register: the codes of blocks `i` and `i + 1` as 64 unsigned bytes
/// against the 64 activations they meet, multiplied and summed four at a time by VNNI's
/// `vpdpbusd` (no 16-bit step to saturate), each block's `d · step` spread over its eight
/// lanes. Signed Q8_0 codes are flipped to unsigned (`w + 128`) and `128 · Σq` subtracted
/// through the activation sums, as the offset types' zero code is. An odd last block runs on
/// the AVX2 loop's step.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{h16, hsum, nibbles, Layout, Q4_0, Q5_0, Q8_0};
    use super::{in_tiles, Rounded, ACT_BLOCK};
    use adaptq_quant::ggml::BlockType;
    use std::arch::x86_64::*;

    pub fn runs(ty: BlockType) -> bool {
        matches!(
            ty,
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::Q4K | BlockType::Q6K
        )
    }

    /// A type whose block starts with its f16 scale `d` and whose value is `d · (code + OFFSET)`.
    trait Pair: Layout {
        /// The factor of `d · step · Σq` in a block's value.
        const OFFSET: f32;
        /// The codes of the blocks at `a` and `b` as 64 unsigned bytes, `a`'s first.
        unsafe fn codes(a: *const u8, b: *const u8) -> __m512i;
    }

    /// `[p[0], p[1], 0, 0]`, `p` at any alignment (an f32 slice's).
    #[inline(always)]
    unsafe fn two(p: *const f32) -> __m128 {
        _mm_castsi128_ps(_mm_loadl_epi64(p as *const __m128i))
    }

    /// The nibbles at `a` and `b` (16 bytes each), each block's low nibbles then its high ones.
    #[inline(always)]
    unsafe fn nibble_pair(a: *const u8, b: *const u8) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(nibbles(a)), nibbles(b), 1)
    }

    impl Pair for Q4_0 {
        const OFFSET: f32 = -8.0;
        #[inline(always)]
        unsafe fn codes(a: *const u8, b: *const u8) -> __m512i {
            nibble_pair(a.add(2), b.add(2))
        }
    }

    impl Pair for Q5_0 {
        const OFFSET: f32 = -16.0;
        #[inline(always)]
        unsafe fn codes(a: *const u8, b: *const u8) -> __m512i {
            let qh = |p: *const u8| u32::from_le((p.add(2) as *const u32).read_unaligned()) as u64;
            let fifth = _mm512_maskz_mov_epi8(qh(a) | qh(b) << 32, _mm512_set1_epi8(16));
            _mm512_or_si512(nibble_pair(a.add(6), b.add(6)), fifth)
        }
    }

    impl Pair for Q8_0 {
        const OFFSET: f32 = -128.0;
        #[inline(always)]
        unsafe fn codes(a: *const u8, b: *const u8) -> __m512i {
            let lo = _mm256_loadu_si256(a.add(2) as *const __m256i);
            let hi = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_xor_si512(z, _mm512_set1_epi8(-128))
        }
    }

    /// `R` rows from `p` (each `rb` bytes, `n` blocks) into `out[..R]`.
    #[inline(always)]
    unsafe fn tile<T: Pair, const R: usize>(
        p: *const u8,
        rb: usize,
        n: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        let q = x.q.as_ptr();
        // Lane l of a pair's 16 dot sums belongs to block l / 8.
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut offs = [_mm_setzero_ps(); R];
        let mut i = 0;
        while i + 2 <= n {
            let xv = _mm512_loadu_si512(q.add(i * ACT_BLOCK) as *const __m512i);
            let steps = two(x.steps.as_ptr().add(i));
            let qsums = two(sums.as_ptr().add(i));
            let qsums = _mm_mul_ps(qsums, _mm_set1_ps(T::OFFSET));
            for k in 0..R {
                let a = p.add(k * rb + i * T::BYTES);
                let b = a.add(T::BYTES);
                let bits = |p: *const u8| u16::from_le((p as *const u16).read_unaligned()) as u32;
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128((bits(a) | bits(b) << 16) as i32));
                let scale =
                    _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(d, steps)));
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), T::codes(a, b), xv);
                acc[k] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[k]);
                offs[k] = _mm_fmadd_ps(d, qsums, offs[k]);
            }
            i += 2;
        }
        for k in 0..R {
            let o = offs[k];
            let mut v =
                _mm512_reduce_add_ps(acc[k]) + _mm_cvtss_f32(_mm_add_ss(o, _mm_movehdup_ps(o)));
            if i < n {
                let xv = _mm256_loadu_si256(q.add(i * ACT_BLOCK) as *const __m256i);
                let a = p.add(k * rb + i * T::BYTES);
                let step = *x.steps.get_unchecked(i);
                let dot = _mm256_cvtepi32_ps(<T as Layout>::dot(a, xv));
                let s = h16(a) * step;
                v += s * hsum(dot);
                if T::MIN {
                    v += T::min(a) * *sums.get_unchecked(i);
                }
            }
            out[k] = v;
        }
    }

    #[inline(always)]
    unsafe fn rows_of<T: Pair>(rows: &[u8], rb: usize, x: &Rounded, sums: &[f32], out: &mut [f32]) {
        let n = rb / T::BYTES;
        assert!(rb == n * T::BYTES && rows.len() == out.len() * rb);
        assert!(x.q.len() >= n * ACT_BLOCK && x.steps.len() >= n && sums.len() >= n);
        in_tiles(out.len(), |r, take| {
            let (p, o) = (rows.as_ptr().add(r * rb), &mut out[r..r + take]);
            match take {
                4 => tile::<T, 4>(p, rb, n, x, sums, o),
                _ => tile::<T, 1>(p, rb, n, x, sums, o),
            }
        });
    }

    /// Q4_K's eight 6-bit scales and eight 6-bit mins of the super-block at `b`, as bytes
    /// (scales first): the same unpacking as the portable decoder, four bytes at a time.
    #[inline(always)]
    unsafe fn q4k_scales(b: *const u8) -> [u32; 4] {
        let w = |o: usize| u32::from_le((b.add(4 + o) as *const u32).read_unaligned());
        let (a, c, e) = (w(0), w(4), w(8));
        let (m6, m4, m2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
        [
            a & m6,
            (e & m4) | (((a >> 6) & m2) << 4),
            c & m6,
            ((e >> 4) & m4) | (((c >> 6) & m2) << 4),
        ]
    }

    /// Q4_K rows (super-blocks of 256 in eight sub-blocks of 32): a sub-block pair's codes
    /// are one 32-byte load's low and high nibbles, meeting 64 adjacent activations; each
    /// super-block's eight `d · scale · step` are computed together and spread over the pair's
    /// lanes, its mins applied to the activation sums in eight lanes.
    #[inline(always)]
    unsafe fn rows_q4k<const R: usize>(
        p: *const u8,
        rb: usize,
        n: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        let q = x.q.as_ptr();
        let low = _mm256_set1_epi8(15);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        for i in 0..n {
            let steps = _mm256_loadu_ps(x.steps.as_ptr().add(i * 8));
            let qsums = _mm256_loadu_ps(sums.as_ptr().add(i * 8));
            let mut scale = [_mm256_setzero_ps(); R];
            for k in 0..R {
                let b = p.add(k * rb + i * 144);
                let sm = q4k_scales(b);
                let bytes = _mm_set_epi32(sm[3] as i32, sm[2] as i32, sm[1] as i32, sm[0] as i32);
                let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                let (d, dmin) = (h16(b), h16(b.add(2)));
                scale[k] = _mm256_mul_ps(_mm256_mul_ps(f(bytes), _mm256_set1_ps(d)), steps);
                let m = _mm256_mul_ps(f(_mm_srli_si128(bytes, 8)), _mm256_set1_ps(dmin));
                mins[k] = _mm256_fmadd_ps(m, qsums, mins[k]);
            }
            for j in 0..4 {
                let xv = _mm512_loadu_si512(q.add((i * 8 + 2 * j) * ACT_BLOCK) as *const __m512i);
                let lanes = _mm512_set_epi32(
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j + 1) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                    (2 * j) as i32,
                );
                for k in 0..R {
                    let qs =
                        _mm256_loadu_si256(p.add(k * rb + i * 144 + 16 + 32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(qs, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), low);
                    let codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
                    let s = _mm512_permutexvar_ps(lanes, _mm512_castps256_ps512(scale[k]));
                    acc[k] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot), acc[k]);
                }
            }
        }
        for k in 0..R {
            out[k] = _mm512_reduce_add_ps(acc[k]) - hsum(mins[k]);
        }
    }

    /// Q6_K rows (super-blocks of 256 in sixteen sub-blocks of 16 with i8 scales): two
    /// activation blocks per step, their codes (low nibbles of one 64-byte load, two high bits
    /// each from the same 32 bytes shifted by two amounts) taken unsigned and `32 · Σx` of each
    /// lane's four activations subtracted again. A lane's four values share one sub-block, so
    /// each lane takes its sub-block's scale before the sums meet.
    #[inline(always)]
    unsafe fn rows_q6k<const R: usize>(
        p: *const u8,
        rb: usize,
        n: usize,
        x: &Rounded,
        out: &mut [f32],
    ) {
        let q = x.q.as_ptr();
        let (m4, m2, ones) = (
            _mm512_set1_epi8(15),
            _mm512_set1_epi8(3),
            _mm512_set1_epi8(1),
        );
        let zero = _mm512_setzero_si512();
        // Lane l covers values 4l..4l+4: sub-block l / 4 of the pair, activation block l / 8.
        let sub = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let block = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); R];
        for i in 0..n {
            for half in 0..2 {
                for pair in 0..2 {
                    let a = i * 8 + half * 4 + 2 * pair;
                    let xv = _mm512_loadu_si512(q.add(a * ACT_BLOCK) as *const __m512i);
                    let xs = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, ones, xv), 5);
                    let steps = two(x.steps.as_ptr().add(a));
                    let steps = _mm512_permutexvar_ps(block, _mm512_castps128_ps512(steps));
                    // The high bits of the pair's first block sit `4 · pair` up, the second's
                    // two more.
                    let shift = _mm512_inserti64x4(
                        _mm512_set1_epi16(4 * pair as i16),
                        _mm256_set1_epi16(4 * pair as i16 + 2),
                        1,
                    );
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let b = p.add(k * rb + i * 210);
                        let ql = _mm512_loadu_si512(b.add(64 * half) as *const __m512i);
                        let lo = match pair {
                            0 => _mm512_and_si512(ql, m4),
                            _ => _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        };
                        let qh = _mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i);
                        let qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);
                        let hi = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), m2);
                        let codes = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
                        let dot = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, codes, xv), xs);
                        let sc = (b.add(192 + 8 * half + 4 * pair) as *const i32).read_unaligned();
                        let sc = _mm512_cvtepi8_epi32(_mm_set1_epi32(sc));
                        let sc = _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(sub, sc));
                        let scale = _mm512_mul_ps(
                            sc,
                            _mm512_mul_ps(_mm512_set1_ps(h16(b.add(208))), steps),
                        );
                        *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
                    }
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn rows_dot(
        ty: BlockType,
        rows: &[u8],
        rb: usize,
        x: &Rounded,
        sums: &[f32],
        out: &mut [f32],
    ) {
        match ty {
            BlockType::Q8_0 => rows_of::<Q8_0>(rows, rb, x, sums, out),
            BlockType::Q4_0 => rows_of::<Q4_0>(rows, rb, x, sums, out),
            BlockType::Q5_0 => rows_of::<Q5_0>(rows, rb, x, sums, out),
            BlockType::Q4K | BlockType::Q6K => {
                let (k4, bb) = (ty == BlockType::Q4K, ty.block_bytes());
                let n = rb / bb;
                assert!(rb == n * bb && rows.len() == out.len() * rb);
                assert!(x.q.len() >= n * 256 && x.steps.len() >= n * 8);
                assert!(!k4 || sums.len() >= n * 8);
                in_tiles(out.len(), |r, take| {
                    let (p, o) = (rows.as_ptr().add(r * rb), &mut out[r..r + take]);
                    match (k4, take) {
                        (true, 4) => rows_q4k::<4>(p, rb, n, x, sums, o),
                        (true, _) => rows_q4k::<1>(p, rb, n, x, sums, o),
                        (false, 4) => rows_q6k::<4>(p, rb, n, x, o),
                        (false, _) => rows_q6k::<1>(p, rb, n, x, o),
                    }
                });
            }
            _ => unreachable!("`runs` accepts only these"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptq_quant::ggml::{quantize_rtn, BlockType};

    fn wave(n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * a).sin() + 0.3 * (i as f32 * 0.07).cos()) * 0.8)
            .collect()
    }

    const TYPES: [BlockType; 7] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
        BlockType::Q4K,
        BlockType::Q6K,
    ];

    /// Holds every row of `m` times `x` (rounded), on the gemv, the single-row kernel and the
    /// portable loop, to the dequantized weight times the rounded activations in f64.
    fn check(m: &BlockMatrix, x: &[f32]) {
        let (ty, (rows, cols)) = (m.ty, m.dims());
        let wf = m.dequantize();
        let r = round_act(x);
        let xr = r.values();
        let mut out = vec![0f32; rows];
        m.gemv(&r, &mut out);
        let sums = m.min_sums(&r);
        for (i, &got) in out.iter().enumerate() {
            let terms = wf[i * cols..(i + 1) * cols].iter().zip(&xr);
            let want: f64 = terms.clone().map(|(&a, &b)| a as f64 * b as f64).sum();
            let size: f64 = terms.map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let tol = 1e-5 * (1.0 + size);
            assert!(
                (got as f64 - want).abs() < tol,
                "{ty:?} row {i}: {got} vs {want}"
            );
            let row = &m.data[i * m.row_bytes..(i + 1) * m.row_bytes];
            let any = row_dot_any(ty, row, &r, &sums);
            assert!((any as f64 - want).abs() < tol, "{ty:?} portable row {i}");
        }
        // Every loop this CPU runs, on all rows at once (tiles of four and single rows) and
        // on each row alone.
        for level in [Level::Any, Level::Avx2, Level::Avx512] {
            if level > Level::best() {
                continue;
            }
            let mut all = vec![0f32; m.rows];
            rows_dot_on(level, ty, &m.data, m.row_bytes, &r, &sums, &mut all);
            for (i, &got) in all.iter().enumerate() {
                let row = &m.data[i * m.row_bytes..(i + 1) * m.row_bytes];
                let mut one = [0f32];
                rows_dot_on(level, ty, row, m.row_bytes, &r, &sums, &mut one);
                let terms = wf[i * cols..(i + 1) * cols].iter().zip(&xr);
                let want: f64 = terms.clone().map(|(&a, &b)| a as f64 * b as f64).sum();
                let size: f64 = terms.map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let tol = 1e-5 * (1.0 + size);
                assert!(
                    (got as f64 - want).abs() < tol,
                    "{ty:?} {level:?} row {i} in a tile"
                );
                assert!(
                    (one[0] as f64 - want).abs() < tol,
                    "{ty:?} {level:?} row {i} alone"
                );
            }
        }
    }

    /// Every type's kernel (each loop the CPU runs, and the portable loop) gives the
    /// dequantized weight times the rounded activations: the integer parts exactly, so the
    /// only difference is the order of the float sums. Rows of one block and of an odd number
    /// of blocks reach the paired loops' single last block.
    #[test]
    fn kernels_are_the_dequantized_product_of_rounded_activations() {
        let rows = 37;
        for ty in TYPES {
            let bl = ty.block_len();
            for cols in [bl, if bl == 256 { 512 } else { 160 }] {
                let w = wave(rows * cols, 0.37);
                let bytes = quantize_rtn(ty, &w, rows, cols, None, false).unwrap();
                check(
                    &BlockMatrix::new(ty, bytes, rows, cols).unwrap(),
                    &wave(cols, 1.3),
                );
            }
        }
        assert!(BlockMatrix::new(BlockType::Q4_0, vec![0; 17], 1, 32).is_err());
        assert!(BlockMatrix::new(BlockType::Q4K, vec![0; 144], 1, 128).is_err());
        assert!(BlockMatrix::new(BlockType::Q5K, vec![0; 176], 1, 256).is_err());
    }

    /// Blocks of random bytes reach what a quantizer rarely writes (Q8_0 codes of -128, Q6_K
    /// scales of -128, 6-bit Q4_K scales and mins of 63, every fifth bit set) and activations
    /// with a ±127 code in every block: the kernels' byte and 16-bit products must not
    /// saturate. The f16 scales are set to finite values.
    #[test]
    fn random_blocks_with_extreme_codes_give_the_dequantized_product() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut byte = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        };
        let rows = 21;
        for ty in TYPES {
            let cols = if ty.block_len() == 256 { 512 } else { 160 };
            let mut bytes: Vec<u8> = (0..rows * ty.bytes_for(cols)).map(|_| byte()).collect();
            // Offsets of each block's f16 fields.
            let halves: &[usize] = match ty {
                BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q4K => &[0, 2],
                BlockType::Q6K => &[208],
                _ => &[0],
            };
            for b in bytes.chunks_mut(ty.block_bytes()) {
                for &at in halves {
                    let v = f16::from_f32((b[at] as f32 - 127.5) / 256.0);
                    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            if ty == BlockType::Q8_0 {
                bytes[2] = 0x80;
            }
            let x: Vec<f32> = (0..cols)
                .map(|i| match i % 32 {
                    0 => 3.0,
                    17 => -3.0,
                    _ => (i as f32 * 0.77).sin() * 2.9,
                })
                .collect();
            check(&BlockMatrix::new(ty, bytes, rows, cols).unwrap(), &x);
        }
    }

    #[test]
    fn activation_steps_are_f16() {
        let r = round_act(&wave(64, 0.9));
        for d in &r.steps {
            assert_eq!(f16::from_f32(*d).to_f32(), *d);
        }
    }
}

//! llama.cpp's block formats (Q4_0 … Q8_0, Q2_K … Q6_K, IQ4_NL) as quantization *grids*.
//!
//! Every GGML type dequantizes a code `q` of a sub-block to either `A·(q − off)` (symmetric
//! types), `A·q + B` (types with a min) or `A·table[q]` (IQ4_NL), where `A`, `B` come from the block's stored scale
//! fields in the type's own encoding (f16 super-scales times 4/6/8-bit sub-scales). Seen that
//! way, any quantizer that picks integer codes against fixed per-sub-block parameters can write
//! straight onto a GGML grid: [`fit_block`] chooses the encoded parameters, [`affine`] gives a
//! sub-block's grid, whose [`Affine::code`] and [`Affine::value`] round and reconstruct with
//! *exactly* the arithmetic llama.cpp's (and candle's) dequantizers use, and [`encode_block`]
//! lays the bits out. GPTQ uses this to store optimized values rather than values re-rounded by
//! `llama-quantize`.
//!
//! The type table itself (names, ids, block sizes, fallbacks) is the format crate's
//! ([`adaptq_loader::ggml`]), re-exported here.
//!
//! Written here rather than taken from candle because candle's encoders only do
//! round-to-nearest from f32 (no way to hand them chosen codes), which is what GPTQ/AWQ need.

// Block layouts are specified by byte and bit index; index loops mirror that specification.
#![allow(clippy::needless_range_loop)]

use crate::{range, QuantError};
use half::f16;
use serde::{Deserialize, Serialize};

pub use adaptq_loader::ggml::{nearest, twin, BlockType, ALL, IQ4NL_VALUES, QK_K};

/// Which GGML types a model's tensors get.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GgmlSpec {
    /// Type for linear layers whose rows fit it; others take its [`BlockType::fallback`].
    pub linear: BlockType,
    /// Type for embedding / output tables; `None` keeps them as float.
    pub embedding: Option<BlockType>,
}

impl GgmlSpec {
    /// The type a linear layer with rows of `cols` values gets, and whether that is a fallback.
    pub fn linear_for(&self, cols: usize) -> Result<(BlockType, bool), QuantError> {
        pick(self.linear, cols)
    }
}

/// `want` if rows of `cols` fit it, else its fallback (then Q8_0), with whether that is a
/// fallback; an error naming the type when nothing fits (rows not a multiple of 32).
pub fn pick(want: BlockType, cols: usize) -> Result<(BlockType, bool), QuantError> {
    want.for_rows(cols).ok_or_else(|| {
        QuantError::Corrupt(format!(
            "rows of {cols} values fit no GGML block type (they need a multiple of 32); {} asked",
            want.name()
        ))
    })
}

/// A block's scale fields, in the type's encoding. For Q4_1/Q5_1 `dmin` holds the min `m`
/// itself; for k-quants `sc`/`mn` hold the integer sub-block scales/mins (Q3_K: 0..63 with 32 as
/// zero, Q6_K: an i8 stored as u8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockHead {
    pub d: f16,
    pub dmin: f16,
    pub sc: [u8; 16],
    pub mn: [u8; 16],
}

impl BlockHead {
    fn new(d: f16, dmin: f16) -> Self {
        BlockHead {
            d,
            dmin,
            sc: [0; 16],
            mn: [0; 16],
        }
    }
}

/// The map of one sub-block: value = `a·(q − off)`, `a·q + b`, or `a·table[q]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub a: f32,
    pub b: f32,
    pub off: Option<i32>,
    pub max_code: i32,
    /// Levels of a non-linear grid (IQ4_NL), ascending, indexed by code.
    pub table: Option<&'static [i8; 16]>,
}

impl Affine {
    /// The value code `q` decodes to, with the dequantizers' operation order.
    #[inline]
    pub fn value(&self, q: u8) -> f32 {
        if let Some(t) = self.table {
            return self.a * t[q as usize & 15] as f32;
        }
        match self.off {
            Some(o) => self.a * (q as i32 - o) as f32,
            None => self.a * q as f32 + self.b,
        }
    }

    /// The nearest code to `x` on this grid.
    #[inline]
    pub fn code(&self, x: f32) -> u8 {
        if let Some(t) = self.table {
            return nearest_level(t, self.a, x);
        }
        if self.a == 0.0 {
            return self.off.unwrap_or(0) as u8;
        }
        let r = match self.off {
            Some(o) => (x / self.a).round() + o as f32,
            None => ((x - self.b) / self.a).round(),
        };
        let q = r.clamp(0.0, self.max_code as f32) as i32;
        // Division rounding can land one step off the true nearest value; check neighbours.
        let mut best = q;
        let mut err = (self.value(q as u8) - x).abs();
        for c in [q - 1, q + 1] {
            if (0..=self.max_code).contains(&c) {
                let e = (self.value(c as u8) - x).abs();
                if e < err {
                    err = e;
                    best = c;
                }
            }
        }
        best as u8
    }
}

/// The code of `table`'s level nearest `x` once scaled by `a` (a table level is ascending, so
/// a negative `a` reverses it; `a = 0` maps everything to 0 and any code is as good).
fn nearest_level(table: &[i8; 16], a: f32, x: f32) -> u8 {
    let mut best = (f32::INFINITY, 0u8);
    for (q, &l) in table.iter().enumerate() {
        let e = (a * l as f32 - x).abs();
        if e < best.0 {
            best = (e, q as u8);
        }
    }
    best.1
}

/// The grid of sub-block `s` of a block.
pub fn affine(ty: BlockType, h: &BlockHead, s: usize) -> Affine {
    let d = h.d.to_f32();
    let max_code = ty.max_code();
    let (a, b) = match ty {
        BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::IQ4NL => (d, 0.0),
        BlockType::Q4_1 | BlockType::Q5_1 => (d, h.dmin.to_f32()),
        BlockType::Q2K | BlockType::Q4K | BlockType::Q5K => {
            (d * h.sc[s] as f32, -(h.dmin.to_f32() * h.mn[s] as f32))
        }
        BlockType::Q3K | BlockType::IQ4XS => (d * (h.sc[s] as f32 - 32.0), 0.0),
        BlockType::Q6K => (d * (h.sc[s] as i8) as f32, 0.0),
    };
    Affine {
        a,
        b,
        off: ty.zero_code(),
        max_code,
        table: matches!(ty, BlockType::IQ4NL | BlockType::IQ4XS).then_some(&IQ4NL_VALUES),
    }
}

fn to_f16(x: f32) -> f16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0))
}

/// Weighted squared error of `x` rounded onto `g`.
fn sub_error(g: &Affine, x: &[f32], w: Option<&[f32]>) -> f64 {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let e = (g.value(g.code(v)) - v) as f64;
            e * e * w.map_or(1.0, |w| w[i] as f64)
        })
        .sum()
}

/// Chooses a block's encoded parameters for the values `x` (one block), minimising the
/// (optionally importance-weighted) squared rounding error over a small neighbourhood of the
/// min/max fit for each sub-block. With `search`, each (sub-)block's range comes from
/// [`crate::range`]'s clipping search instead of its min/max (IQ4_NL always searches).
pub fn fit_block(ty: BlockType, x: &[f32], w: Option<&[f32]>, search: bool) -> BlockHead {
    debug_assert_eq!(x.len(), ty.block_len());
    let sl = ty.sub_len();
    let nsub = ty.block_len() / sl;
    let maxq = ty.max_code() as f32;
    match ty {
        BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => {
            let half = 1i32 << (ty.bits() - 1);
            if search {
                let d = range::search_symmetric(x, w, half, |d| to_f16(d).to_f32());
                return BlockHead::new(to_f16(d), f16::ZERO);
            }
            let m = signed_extreme(x);
            BlockHead::new(to_f16(m / -(half as f32)), f16::ZERO)
        }
        BlockType::Q4_1 | BlockType::Q5_1 => {
            if search {
                let (s, m) = range::search_affine(x, w, ty.max_code() as u32, false, |s, m| {
                    (to_f16(s).to_f32(), to_f16(m).to_f32())
                });
                return BlockHead::new(to_f16(s), to_f16(m));
            }
            let (lo, hi) = min_max(x);
            BlockHead::new(to_f16((hi - lo) / maxq), to_f16(lo))
        }
        BlockType::IQ4NL => fit_iq4nl(x, w),
        BlockType::IQ4XS => fit_iq4xs(x, w),
        BlockType::Q2K | BlockType::Q4K | BlockType::Q5K => {
            // Per sub-block: scale (max−min)/maxq and a min ≤ 0 (the format stores −min ≥ 0).
            let levels = if ty == BlockType::Q2K { 15.0 } else { 63.0 };
            let mut scales = [0f32; 16];
            let mut mins = [0f32; 16];
            for s in 0..nsub {
                let xs = &x[s * sl..(s + 1) * sl];
                let (sc, lo) = if search {
                    let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
                    range::search_affine(xs, ws, ty.max_code() as u32, true, |s, m| (s, m))
                } else {
                    let (lo, hi) = min_max(xs);
                    let lo = lo.min(0.0);
                    ((hi - lo) / maxq, lo)
                };
                scales[s] = sc;
                mins[s] = -lo;
            }
            let smax = scales[..nsub].iter().cloned().fold(0f32, f32::max);
            let mmax = mins[..nsub].iter().cloned().fold(0f32, f32::max);
            let mut h = BlockHead::new(to_f16(smax / levels), to_f16(mmax / levels));
            let (d, dm) = (h.d.to_f32(), h.dmin.to_f32());
            for s in 0..nsub {
                let l0 = if d > 0.0 {
                    (scales[s] / d).round()
                } else {
                    0.0
                };
                // Round the min *up* first so the grid still reaches the sub-block's minimum.
                let m0 = if dm > 0.0 { (mins[s] / dm).ceil() } else { 0.0 };
                let xs = &x[s * sl..(s + 1) * sl];
                let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
                let mut best = (f64::INFINITY, 0u8, 0u8);
                for dl in [-1.0f32, 0.0, 1.0, 2.0] {
                    for dmn in [-1.0f32, 0.0, 1.0] {
                        let l = (l0 + dl).clamp(0.0, levels) as u8;
                        let m = (m0 + dmn).clamp(0.0, levels) as u8;
                        h.sc[s] = l;
                        h.mn[s] = m;
                        let e = sub_error(&affine(ty, &h, s), xs, ws);
                        if e < best.0 {
                            best = (e, l, m);
                        }
                    }
                }
                h.sc[s] = best.1;
                h.mn[s] = best.2;
            }
            h
        }
        BlockType::Q3K | BlockType::Q6K => {
            let half = (1u32 << (ty.bits() - 1)) as f32;
            let (lim_lo, lim_hi, zero) = if ty == BlockType::Q3K {
                (-32.0f32, 31.0f32, 32.0f32)
            } else {
                (-128.0, 127.0, 0.0)
            };
            let mut scales = [0f32; 16];
            for s in 0..nsub {
                let xs = &x[s * sl..(s + 1) * sl];
                scales[s] = if search {
                    let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
                    range::search_symmetric(xs, ws, half as i32, |d| d)
                } else {
                    signed_extreme(xs) / -half
                };
            }
            let amax = scales[..nsub].iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut h = BlockHead::new(to_f16(amax / lim_hi), f16::ZERO);
            let d = h.d.to_f32();
            for s in 0..nsub {
                let l0 = if d > 0.0 {
                    (scales[s] / d).round()
                } else {
                    0.0
                };
                let xs = &x[s * sl..(s + 1) * sl];
                let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
                let mut best = (f64::INFINITY, 0u8);
                for dl in [-1.0f32, 0.0, 1.0] {
                    let l = (l0 + dl).clamp(lim_lo, lim_hi);
                    let enc = if ty == BlockType::Q3K {
                        (l + zero) as u8
                    } else {
                        (l as i8) as u8
                    };
                    h.sc[s] = enc;
                    let e = sub_error(&affine(ty, &h, s), xs, ws);
                    if e < best.0 {
                        best = (e, enc);
                    }
                }
                h.sc[s] = best.1;
            }
            h
        }
    }
}

/// IQ4_NL's scale for one block, as llama.cpp's `quantize_row_iq4_nl_impl` searches it: the
/// scale that maps the largest-magnitude value onto the table's far end (−127), then the inverse
/// scales that map it 1…7 table units either side, each with its codes' weighted least-squares
/// scale; the candidate of least weighted error once stored in f16 wins.
fn fit_iq4nl(x: &[f32], w: Option<&[f32]>) -> BlockHead {
    let max = signed_extreme(x);
    if max == 0.0 {
        return BlockHead::new(f16::ZERO, f16::ZERO);
    }
    let t0 = IQ4NL_VALUES[0] as f32;
    let mut best = (f64::INFINITY, f16::ZERO);
    for step in -7..=7 {
        let id = (step as f32 + t0) / max;
        let (mut qx, mut qq) = (0f64, 0f64);
        for (i, &v) in x.iter().enumerate() {
            let q = nearest_level(&IQ4NL_VALUES, 1.0, id * v) as usize;
            let l = IQ4NL_VALUES[q] as f64;
            let wi = w.map_or(1.0, |w| w[i] as f64);
            qx += wi * l * v as f64;
            qq += wi * l * l;
        }
        let mut cands = [to_f16(1.0 / id), f16::ZERO];
        if qq > 0.0 {
            cands[1] = to_f16((qx / qq) as f32);
        }
        for d in cands {
            let h = BlockHead::new(d, f16::ZERO);
            let e = sub_error(&affine(BlockType::IQ4NL, &h, 0), x, w);
            if e < best.0 {
                best = (e, d);
            }
        }
    }
    BlockHead::new(best.1, f16::ZERO)
}

/// IQ4_XS's scales for one super-block, as llama.cpp's `quantize_row_iq4_xs_impl` chooses them:
/// IQ4_NL's search per 32 values, the largest-magnitude of those scales mapped to −32 of the
/// 6-bit signed sub-scales, and each sub-scale then the best of its rounding and neighbours.
fn fit_iq4xs(x: &[f32], w: Option<&[f32]>) -> BlockHead {
    let sl = 32;
    let mut scales = [0f32; 8];
    for (s, sc) in scales.iter_mut().enumerate() {
        let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
        *sc = fit_iq4nl(&x[s * sl..(s + 1) * sl], ws).d.to_f32();
    }
    let max = signed_extreme(&scales);
    let mut h = BlockHead::new(to_f16(-max / 32.0), f16::ZERO);
    let d = h.d.to_f32();
    for s in 0..8 {
        let l0 = if d != 0.0 {
            (scales[s] / d).round()
        } else {
            0.0
        };
        let xs = &x[s * sl..(s + 1) * sl];
        let ws = w.map(|w| &w[s * sl..(s + 1) * sl]);
        let mut best = (f64::INFINITY, 32u8);
        for dl in [-1.0f32, 0.0, 1.0] {
            let enc = ((l0 + dl).clamp(-32.0, 31.0) + 32.0) as u8;
            h.sc[s] = enc;
            let e = sub_error(&affine(BlockType::IQ4XS, &h, s), xs, ws);
            if e < best.0 {
                best = (e, enc);
            }
        }
        h.sc[s] = best.1;
    }
    h
}

fn signed_extreme(x: &[f32]) -> f32 {
    x.iter()
        .copied()
        .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        })
}

/// Appends one block's bytes: `codes` are the block's `block_len` codes in value order.
pub fn encode_block(ty: BlockType, h: &BlockHead, codes: &[u8], out: &mut Vec<u8>) {
    let n = ty.block_len();
    debug_assert_eq!(codes.len(), n);
    let start = out.len();
    out.resize(start + ty.block_bytes(), 0);
    let b = &mut out[start..];
    match ty {
        BlockType::Q4_0
        | BlockType::Q4_1
        | BlockType::Q5_0
        | BlockType::Q5_1
        | BlockType::IQ4NL => {
            let has_m = matches!(ty, BlockType::Q4_1 | BlockType::Q5_1);
            b[0..2].copy_from_slice(&h.d.to_le_bytes());
            let mut p = 2;
            if has_m {
                b[2..4].copy_from_slice(&h.dmin.to_le_bytes());
                p = 4;
            }
            if ty.bits() == 5 {
                let mut qh = 0u32;
                for (j, &c) in codes.iter().enumerate() {
                    qh |= ((c as u32 >> 4) & 1) << j;
                }
                b[p..p + 4].copy_from_slice(&qh.to_le_bytes());
                p += 4;
            }
            for j in 0..16 {
                b[p + j] = (codes[j] & 0xF) | ((codes[j + 16] & 0xF) << 4);
            }
        }
        BlockType::Q8_0 => {
            b[0..2].copy_from_slice(&h.d.to_le_bytes());
            for j in 0..32 {
                b[2 + j] = (codes[j] as i32 - 128) as i8 as u8;
            }
        }
        BlockType::IQ4XS => {
            // d | scales_h (2 high bits per sub-block) | scales_l[4] (low nibbles) | qs[128]
            b[0..2].copy_from_slice(&h.d.to_le_bytes());
            let mut high = 0u16;
            for s in 0..8 {
                let ls = h.sc[s] & 63;
                b[4 + s / 2] |= (ls & 0xF) << (4 * (s % 2));
                high |= ((ls >> 4) as u16) << (2 * s);
                for j in 0..16 {
                    b[8 + 16 * s + j] =
                        (codes[32 * s + j] & 0xF) | ((codes[32 * s + j + 16] & 0xF) << 4);
                }
            }
            b[2..4].copy_from_slice(&high.to_le_bytes());
        }
        BlockType::Q2K => {
            // scales[16] | qs[64] | d | dmin
            for s in 0..16 {
                b[s] = (h.sc[s] & 0xF) | (h.mn[s] << 4);
            }
            for (i, &c) in codes.iter().enumerate() {
                let (half, j, l) = (i / 128, (i % 128) / 32, i % 32);
                b[16 + 32 * half + l] |= (c & 3) << (2 * j);
            }
            b[80..82].copy_from_slice(&h.d.to_le_bytes());
            b[82..84].copy_from_slice(&h.dmin.to_le_bytes());
        }
        BlockType::Q3K => {
            // hmask[32] | qs[64] | scales[12] | d
            for (i, &c) in codes.iter().enumerate() {
                let (half, j, l) = (i / 128, (i % 128) / 32, i % 32);
                b[32 + 32 * half + l] |= (c & 3) << (2 * j);
                if c & 4 != 0 {
                    b[l] |= 1 << (4 * half + j);
                }
            }
            let sc = &mut b[96..108];
            for j in 0..16 {
                let l = h.sc[j];
                if j < 8 {
                    sc[j] = l & 0xF;
                } else {
                    sc[j - 8] |= (l & 0xF) << 4;
                }
                sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            b[108..110].copy_from_slice(&h.d.to_le_bytes());
        }
        BlockType::Q4K | BlockType::Q5K => {
            // d | dmin | scales[12] | (qh[32]) | qs[128]
            b[0..2].copy_from_slice(&h.d.to_le_bytes());
            b[2..4].copy_from_slice(&h.dmin.to_le_bytes());
            let sc = &mut b[4..16];
            for j in 0..8 {
                let (ls, lm) = (h.sc[j], h.mn[j]);
                if j < 4 {
                    sc[j] = ls;
                    sc[j + 4] = lm;
                } else {
                    sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                    sc[j - 4] |= (ls >> 4) << 6;
                    sc[j] |= (lm >> 4) << 6;
                }
            }
            let qs0 = if ty == BlockType::Q5K { 48 } else { 16 };
            for (i, &c) in codes.iter().enumerate() {
                let (chunk, k, l) = (i / 64, (i % 64) / 32, i % 32);
                b[qs0 + 32 * chunk + l] |= (c & 0xF) << (4 * k);
                if ty == BlockType::Q5K && c & 16 != 0 {
                    b[16 + l] |= 1 << (2 * chunk + k);
                }
            }
        }
        BlockType::Q6K => {
            // ql[128] | qh[64] | scales[16] | d
            for (i, &c) in codes.iter().enumerate() {
                let (half, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let ql = 64 * half + l + if k % 2 == 1 { 32 } else { 0 };
                b[ql] |= (c & 0xF) << if k >= 2 { 4 } else { 0 };
                b[128 + 32 * half + l] |= ((c >> 4) & 3) << (2 * k);
            }
            b[192..208].copy_from_slice(&h.sc);
            b[208..210].copy_from_slice(&h.d.to_le_bytes());
        }
    }
    let _ = n;
}

/// Reads one block back into its parameters and codes (the inverse of [`encode_block`]).
pub fn decode_block(ty: BlockType, b: &[u8], codes: &mut [u8]) -> BlockHead {
    let rd = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
    match ty {
        BlockType::Q4_0
        | BlockType::Q4_1
        | BlockType::Q5_0
        | BlockType::Q5_1
        | BlockType::IQ4NL => {
            let has_m = matches!(ty, BlockType::Q4_1 | BlockType::Q5_1);
            let h = BlockHead::new(rd(0), if has_m { rd(2) } else { f16::ZERO });
            let mut p = if has_m { 4 } else { 2 };
            let mut qh = 0u32;
            if ty.bits() == 5 {
                qh = u32::from_le_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]]);
                p += 4;
            }
            for j in 0..16 {
                codes[j] = (b[p + j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
                codes[j + 16] = (b[p + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
            }
            h
        }
        BlockType::Q8_0 => {
            for j in 0..32 {
                codes[j] = ((b[2 + j] as i8) as i32 + 128) as u8;
            }
            BlockHead::new(rd(0), f16::ZERO)
        }
        BlockType::IQ4XS => {
            let mut h = BlockHead::new(rd(0), f16::ZERO);
            let high = u16::from_le_bytes([b[2], b[3]]);
            for s in 0..8 {
                let low = (b[4 + s / 2] >> (4 * (s % 2))) & 0xF;
                h.sc[s] = low | ((((high >> (2 * s)) & 3) as u8) << 4);
                for j in 0..16 {
                    codes[32 * s + j] = b[8 + 16 * s + j] & 0xF;
                    codes[32 * s + j + 16] = b[8 + 16 * s + j] >> 4;
                }
            }
            h
        }
        BlockType::Q2K => {
            let mut h = BlockHead::new(rd(80), rd(82));
            for s in 0..16 {
                h.sc[s] = b[s] & 0xF;
                h.mn[s] = b[s] >> 4;
            }
            for (i, c) in codes.iter_mut().enumerate() {
                let (half, j, l) = (i / 128, (i % 128) / 32, i % 32);
                *c = (b[16 + 32 * half + l] >> (2 * j)) & 3;
            }
            h
        }
        BlockType::Q3K => {
            let mut h = BlockHead::new(rd(108), f16::ZERO);
            let sc = &b[96..108];
            for j in 0..16 {
                let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
                let hi = (sc[j % 4 + 8] >> (2 * (j / 4))) & 3;
                h.sc[j] = lo | (hi << 4);
            }
            for (i, c) in codes.iter_mut().enumerate() {
                let (half, j, l) = (i / 128, (i % 128) / 32, i % 32);
                let low = (b[32 + 32 * half + l] >> (2 * j)) & 3;
                let high = (b[l] >> (4 * half + j)) & 1;
                *c = low | (high << 2);
            }
            h
        }
        BlockType::Q4K | BlockType::Q5K => {
            let mut h = BlockHead::new(rd(0), rd(2));
            let sc = &b[4..16];
            for j in 0..8 {
                if j < 4 {
                    h.sc[j] = sc[j] & 63;
                    h.mn[j] = sc[j + 4] & 63;
                } else {
                    h.sc[j] = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
                    h.mn[j] = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
                }
            }
            let qs0 = if ty == BlockType::Q5K { 48 } else { 16 };
            for (i, c) in codes.iter_mut().enumerate() {
                let (chunk, k, l) = (i / 64, (i % 64) / 32, i % 32);
                let mut v = (b[qs0 + 32 * chunk + l] >> (4 * k)) & 0xF;
                if ty == BlockType::Q5K {
                    v |= ((b[16 + l] >> (2 * chunk + k)) & 1) << 4;
                }
                *c = v;
            }
            h
        }
        BlockType::Q6K => {
            let mut h = BlockHead::new(rd(208), f16::ZERO);
            h.sc.copy_from_slice(&b[192..208]);
            for (i, c) in codes.iter_mut().enumerate() {
                let (half, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let ql = 64 * half + l + if k % 2 == 1 { 32 } else { 0 };
                let lo = (b[ql] >> if k >= 2 { 4 } else { 0 }) & 0xF;
                let hi = (b[128 + 32 * half + l] >> (2 * k)) & 3;
                *c = lo | (hi << 4);
            }
            h
        }
    }
}

fn check_shape(ty: BlockType, len: usize, rows: usize, cols: usize) -> Result<(), QuantError> {
    if rows * cols != len {
        return Err(QuantError::Shape { rows, cols, len });
    }
    if !ty.fits(cols) {
        return Err(QuantError::Corrupt(format!(
            "rows of {cols} values do not fit {}'s blocks of {}",
            ty.name(),
            ty.block_len()
        )));
    }
    Ok(())
}

/// Round-to-nearest onto `ty`'s grid; `importance` (one weight per column, e.g. the diagonal
/// of the input Hessian) steers the choice of block scales like llama.cpp's imatrix, and
/// `search` fits ranges by clipping search ([`fit_block`]).
pub fn quantize_rtn(
    ty: BlockType,
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
    search: bool,
) -> Result<Vec<u8>, QuantError> {
    check_shape(ty, w.len(), rows, cols)?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite(i));
    }
    let n = ty.block_len();
    let mut out = Vec::with_capacity(ty.bytes_for(w.len()));
    let mut codes = vec![0u8; n];
    for row in w.chunks(cols) {
        for (bi, x) in row.chunks(n).enumerate() {
            let imp = importance.map(|v| &v[bi * n..(bi + 1) * n]);
            let h = fit_block(ty, x, imp, search);
            let sl = ty.sub_len();
            for (s, xs) in x.chunks(sl).enumerate() {
                let g = affine(ty, &h, s);
                for (c, &v) in codes[s * sl..(s + 1) * sl].iter_mut().zip(xs) {
                    *c = g.code(v);
                }
            }
            encode_block(ty, &h, &codes, &mut out);
        }
    }
    Ok(out)
}

/// The GGML type whose grid *is* this integer grid ([`twin`]), with the codes re-laid as its
/// blocks: lossless. `None` when there is no twin or the parts do not fit the shape.
pub fn from_int(q: &crate::QuantizedTensor) -> Option<(BlockType, Vec<u8>)> {
    let ty = twin(q.bits, q.grid, q.group_size, q.cols)?;
    let n = q.rows.checked_mul(q.cols)?;
    let gpr = q.groups_per_row();
    let groups = q.rows.checked_mul(gpr)?;
    let asym = q.grid == crate::Grid::Asymmetric;
    if q.codes.len() != crate::pack::packed_len(n, q.bits)
        || q.scales.len() != groups
        || (asym && q.mins.len() != groups)
    {
        return None;
    }
    let group = match q.group_size {
        0 => q.cols,
        g => g.min(q.cols),
    };
    let codes = crate::pack::unpack(&q.codes, q.bits, n);
    let mut out = Vec::with_capacity(ty.bytes_for(n));
    for (j, c) in codes.chunks(32).enumerate() {
        let (r, col) = (j * 32 / q.cols, j * 32 % q.cols);
        let g = r * gpr + col / group;
        let min = if asym { q.mins[g] } else { f16::ZERO };
        encode_block(ty, &BlockHead::new(q.scales[g], min), c, &mut out);
    }
    Some((ty, out))
}

/// Blocks of one type as a linear map per sub-block: value `a[s]·level + b[s]`, where `level`
/// is the element's code as its grid reads it (`q − zero`, `q`, or the IQ4 table's level) and
/// `s` its sub-block. The products are the dequantizers' own, so the values are exact: with the
/// codes fixed this is what refinement trains.
#[derive(Debug, Clone, PartialEq)]
pub struct SubAffine {
    pub codes: Vec<u8>,
    pub levels: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// `n` values of `ty` blocks as their [`SubAffine`] form.
pub fn sub_affine(ty: BlockType, bytes: &[u8], n: usize) -> Result<SubAffine, QuantError> {
    dequantize(ty, bytes, n)?;
    let bl = ty.block_len();
    let sl = ty.sub_len();
    let mut out = SubAffine {
        codes: Vec::with_capacity(n),
        levels: Vec::with_capacity(n),
        a: Vec::with_capacity(n / sl),
        b: Vec::with_capacity(n / sl),
    };
    let mut codes = vec![0u8; bl];
    for blk in bytes.chunks(ty.block_bytes()) {
        let h = decode_block(ty, blk, &mut codes);
        for (s, cs) in codes.chunks(sl).enumerate() {
            let g = affine(ty, &h, s);
            out.a.push(g.a);
            out.b.push(g.b);
            out.levels
                .extend(cs.iter().map(|&q| match (g.table, g.off) {
                    (Some(t), _) => t[q as usize & 15] as f32,
                    (None, Some(o)) => (q as i32 - o) as f32,
                    (None, None) => q as f32,
                }));
        }
        out.codes.extend_from_slice(&codes);
    }
    Ok(out)
}

/// Integer multipliers `k ∈ lo..=hi` of one f16 step `d` with `d·k` nearest `x` in squared
/// error: every step that maps the largest magnitude to one of the upper half of the
/// multipliers is tried, each refitted by least squares to its rounded multipliers. Values that
/// came from such a step are found again exactly.
fn fit_steps(x: &[f32], lo: i32, hi: i32) -> (f16, Vec<i32>) {
    let zero = (f16::ZERO, vec![0.clamp(lo, hi); x.len()]);
    let top = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if top == 0.0 || !top.is_finite() {
        return zero;
    }
    let round = |d: f32| -> Vec<i32> {
        x.iter()
            .map(|v| ((v / d).round() as i32).clamp(lo, hi))
            .collect()
    };
    let err = |d: f32, k: &[i32]| -> f64 {
        x.iter()
            .zip(k)
            .map(|(v, &k)| (*v as f64 - d as f64 * k as f64).powi(2))
            .sum()
    };
    let reach = hi.max(-lo);
    let mut best = (err(0.0, &zero.1), zero.clone());
    // A signed range is not symmetric (-32..=31): a negative step reaches the other end.
    let signs: &[f32] = if lo < 0 { &[1.0, -1.0] } else { &[1.0] };
    for (&sign, m) in signs
        .iter()
        .flat_map(|s| ((reach / 2).max(1)..=reach).map(move |m| (s, m)))
    {
        let mut d = to_f16(sign * top / m as f32).to_f32();
        for _ in 0..2 {
            if d == 0.0 {
                break;
            }
            let k = round(d);
            let e = err(d, &k);
            if e < best.0 {
                best = (e, (to_f16(d), k.clone()));
            }
            let (num, den) = x.iter().zip(&k).fold((0f64, 0f64), |(n, q), (v, &k)| {
                (n + *v as f64 * k as f64, q + (k as f64) * (k as f64))
            });
            if den == 0.0 {
                break;
            }
            d = to_f16((num / den) as f32).to_f32();
        }
    }
    best.1
}

/// Writes blocks of `ty` holding `codes` whose sub-block maps come as near `a`, `b` as the
/// type's scale fields allow: f16 steps and mins, and for k-quants integer sub-scales (and
/// sub-mins) of a shared f16 step ([`fit_steps`]). Types without a min ignore `b`.
pub fn encode_affine(
    ty: BlockType,
    codes: &[u8],
    a: &[f32],
    b: &[f32],
) -> Result<Vec<u8>, QuantError> {
    let (bl, sl) = (ty.block_len(), ty.sub_len());
    let subs = bl / sl;
    if !codes.len().is_multiple_of(bl) || a.len() * sl != codes.len() || b.len() != a.len() {
        return Err(QuantError::Corrupt(format!(
            "{} codes of {} values with {} scales and {} mins do not make whole blocks",
            ty.name(),
            codes.len(),
            a.len(),
            b.len()
        )));
    }
    let mut out = Vec::with_capacity(ty.bytes_for(codes.len()));
    for (j, cs) in codes.chunks(bl).enumerate() {
        let (a, b) = (&a[j * subs..(j + 1) * subs], &b[j * subs..(j + 1) * subs]);
        let mut h = BlockHead::new(to_f16(a[0]), f16::ZERO);
        let ints = |k: Vec<i32>, dst: &mut [u8; 16]| {
            for (d, v) in dst.iter_mut().zip(k) {
                *d = v as u8;
            }
        };
        match ty {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::IQ4NL => {}
            BlockType::Q4_1 | BlockType::Q5_1 => h.dmin = to_f16(b[0]),
            BlockType::Q2K | BlockType::Q4K | BlockType::Q5K => {
                let top = if ty == BlockType::Q2K { 15 } else { 63 };
                let (d, k) = fit_steps(a, 0, top);
                let mins: Vec<f32> = b.iter().map(|v| -v).collect();
                let (dm, m) = fit_steps(&mins, 0, top);
                (h.d, h.dmin) = (d, dm);
                ints(k, &mut h.sc);
                ints(m, &mut h.mn);
            }
            BlockType::Q3K | BlockType::IQ4XS => {
                let (d, k) = fit_steps(a, -32, 31);
                h.d = d;
                ints(k.into_iter().map(|v| v + 32).collect(), &mut h.sc);
            }
            BlockType::Q6K => {
                let (d, k) = fit_steps(a, -128, 127);
                h.d = d;
                ints(k, &mut h.sc);
            }
        }
        encode_block(ty, &h, cs, &mut out);
    }
    Ok(out)
}

/// Decodes `n` values of `ty` blocks with the dequantizers' arithmetic.
pub fn dequantize(ty: BlockType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let bl = ty.block_len();
    if !n.is_multiple_of(bl) || bytes.len() != ty.bytes_for(n) {
        return Err(QuantError::Corrupt(format!(
            "{} data of {} bytes cannot hold {n} values",
            ty.name(),
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut codes = vec![0u8; bl];
    let sl = ty.sub_len();
    for b in bytes.chunks(ty.block_bytes()) {
        let h = decode_block(ty, b, &mut codes);
        for (s, cs) in codes.chunks(sl).enumerate() {
            let g = affine(ty, &h, s);
            out.extend(cs.iter().map(|&c| g.value(c)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
                // Some outliers and an all-positive stretch, as real rows have.
                if i % 97 == 0 {
                    u * 0.8
                } else if (i / 256) % 3 == 2 {
                    u.abs() * 0.05 + 0.01
                } else {
                    u * 0.1
                }
            })
            .collect()
    }

    /// The sub-block form decodes to the blocks' values exactly; written back unchanged it
    /// gives blocks that decode the same (k-quants: to within their integer sub-scales), and a
    /// moved scale moves the values.
    #[test]
    fn sub_affine_is_exact_and_encodes_back() {
        let (rows, cols) = (2, 512);
        let w = weights(rows * cols, 9);
        for t in ALL {
            let bytes = quantize_rtn(t, &w, rows, cols, None, false).unwrap();
            let n = rows * cols;
            let f = sub_affine(t, &bytes, n).unwrap();
            let sl = t.sub_len();
            let vals: Vec<f32> = (0..n)
                .map(|i| f.a[i / sl] * f.levels[i] + f.b[i / sl])
                .collect();
            let deq = dequantize(t, &bytes, n).unwrap();
            assert_eq!(vals, deq, "{}", t.name());
            let again = encode_affine(t, &f.codes, &f.a, &f.b).unwrap();
            let back = dequantize(t, &again, n).unwrap();
            let err = back
                .iter()
                .zip(&deq)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f32>()
                / deq.iter().map(|x| x * x).sum::<f32>();
            assert!(err < 1e-4, "{}: {err}", t.name());
            if !t.is_k() {
                assert_eq!(again, bytes, "{}", t.name());
            }
            let a2: Vec<f32> = f.a.iter().map(|v| v * 1.1).collect();
            let moved = dequantize(t, &encode_affine(t, &f.codes, &a2, &f.b).unwrap(), n).unwrap();
            assert!(encode_affine(t, &f.codes, &a2[1..], &f.b).is_err());
            assert_ne!(moved, deq, "{}", t.name());
        }
    }

    #[test]
    fn encode_decode_round_trips_and_error_shrinks_with_bits() {
        let (rows, cols) = (4, 512);
        let w = weights(rows * cols, 5);
        let mut errs = Vec::new();
        for t in ALL {
            let bytes = quantize_rtn(t, &w, rows, cols, None, false).unwrap();
            assert_eq!(bytes.len(), t.bytes_for(w.len()), "{}", t.name());
            let back = dequantize(t, &bytes, w.len()).unwrap();
            let mse: f64 = w
                .iter()
                .zip(&back)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / w.len() as f64;
            let var: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / w.len() as f64;
            errs.push((t, mse / var));
            // Re-encoding the decoded codes gives the same bytes.
            let mut again = Vec::new();
            let mut codes = vec![0u8; t.block_len()];
            for b in bytes.chunks(t.block_bytes()) {
                let h = decode_block(t, b, &mut codes);
                encode_block(t, &h, &codes, &mut again);
            }
            assert_eq!(again, bytes, "{}", t.name());
        }
        let rel = |t| errs.iter().find(|(x, _)| *x == t).unwrap().1;
        assert!(rel(BlockType::Q2K) > rel(BlockType::Q3K));
        assert!(rel(BlockType::Q3K) > rel(BlockType::Q4K));
        assert!(rel(BlockType::Q4K) > rel(BlockType::Q5K));
        assert!(rel(BlockType::Q5K) > rel(BlockType::Q6K));
        assert!(rel(BlockType::Q4_0) > rel(BlockType::Q5_0));
        assert!(rel(BlockType::Q5_0) > rel(BlockType::Q8_0));
        // The non-linear levels fit bell-shaped weights better than Q4_0's even steps.
        assert!(rel(BlockType::IQ4NL) < rel(BlockType::Q4_0), "{errs:?}");
        assert!(rel(BlockType::Q8_0) < 1e-4, "{errs:?}");
        assert!(rel(BlockType::Q2K) < 0.5, "{errs:?}");
    }

    /// Our decoder must agree bit for bit with candle's GGML dequantizers (llama.cpp's arithmetic).
    #[test]
    fn dequantization_matches_candle_exactly() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        let (rows, cols) = (3, 768);
        let w = weights(rows * cols, 11);
        for t in ALL {
            let bytes = quantize_rtn(t, &w, rows, cols, None, false).unwrap();
            let ours = dequantize(t, &bytes, w.len()).unwrap();
            let dt = match t {
                BlockType::IQ4NL => {
                    // candle has no IQ4_NL: ggml's `dequantize_row_iq4_nl`, written out.
                    for (i, a) in ours.iter().enumerate() {
                        let b = &bytes[i / 32 * 18..];
                        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        let nib = if i % 32 < 16 {
                            b[2 + i % 16] & 15
                        } else {
                            b[2 + i % 16] >> 4
                        };
                        let want = d * IQ4NL_VALUES[nib as usize] as f32;
                        assert_eq!(a.to_bits(), want.to_bits(), "IQ4_NL value {i}");
                    }
                    continue;
                }
                BlockType::IQ4XS => {
                    // Nor IQ4_XS: ggml's `dequantize_row_iq4_xs`, written out.
                    for (i, a) in ours.iter().enumerate() {
                        let b = &bytes[i / 256 * 136..];
                        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        let (ib, k) = ((i % 256) / 32, i % 32);
                        let high = u16::from_le_bytes([b[2], b[3]]);
                        let ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) as i32
                            | ((((high >> (2 * ib)) & 3) as i32) << 4);
                        let q = b[8 + 16 * ib + k % 16];
                        let nib = if k < 16 { q & 15 } else { q >> 4 };
                        let want = d * (ls - 32) as f32 * IQ4NL_VALUES[nib as usize] as f32;
                        assert_eq!(a.to_bits(), want.to_bits(), "IQ4_XS value {i}");
                    }
                    continue;
                }
                BlockType::Q4_0 => GgmlDType::Q4_0,
                BlockType::Q4_1 => GgmlDType::Q4_1,
                BlockType::Q5_0 => GgmlDType::Q5_0,
                BlockType::Q5_1 => GgmlDType::Q5_1,
                BlockType::Q8_0 => GgmlDType::Q8_0,
                BlockType::Q2K => GgmlDType::Q2K,
                BlockType::Q3K => GgmlDType::Q3K,
                BlockType::Q4K => GgmlDType::Q4K,
                BlockType::Q5K => GgmlDType::Q5K,
                BlockType::Q6K => GgmlDType::Q6K,
            };
            let dev = candle_core::Device::Cpu;
            let q = qtensor_from_ggml(dt, &bytes, vec![w.len()], &dev).unwrap();
            let theirs: Vec<f32> = q.dequantize(&dev).unwrap().to_vec1().unwrap();
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{} value {i}: {a} vs {b}",
                    t.name()
                );
            }
        }
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let (rows, cols) = (8, 256);
        let w = weights(rows * cols, 9);
        let imp: Vec<f32> = (0..cols)
            .map(|c| if c % 5 == 0 { 50.0 } else { 1.0 })
            .collect();
        for t in [BlockType::Q2K, BlockType::Q3K, BlockType::Q4K] {
            let werr = |b: &[u8]| {
                let d = dequantize(t, b, w.len()).unwrap();
                w.iter()
                    .zip(&d)
                    .enumerate()
                    .map(|(i, (a, b))| ((a - b) as f64).powi(2) * imp[i % cols] as f64)
                    .sum::<f64>()
            };
            let plain = werr(&quantize_rtn(t, &w, rows, cols, None, false).unwrap());
            let steered = werr(&quantize_rtn(t, &w, rows, cols, Some(&imp), false).unwrap());
            assert!(steered <= plain, "{}: {steered} > {plain}", t.name());
        }
    }

    #[test]
    fn range_search_lowers_the_error_on_every_type() {
        let (rows, cols) = (16, 256);
        let w = weights(rows * cols, 11);
        let imp: Vec<f32> = (0..cols)
            .map(|c| if c % 7 == 0 { 20.0 } else { 1.0 })
            .collect();
        for t in adaptq_loader::ggml::ALL {
            for imp in [None, Some(&imp[..])] {
                let werr = |b: &[u8]| {
                    let d = dequantize(t, b, w.len()).unwrap();
                    w.iter()
                        .zip(&d)
                        .enumerate()
                        .map(|(i, (a, b))| {
                            ((a - b) as f64).powi(2) * imp.map_or(1.0, |v| v[i % cols] as f64)
                        })
                        .sum::<f64>()
                };
                let plain = werr(&quantize_rtn(t, &w, rows, cols, imp, false).unwrap());
                let searched = werr(&quantize_rtn(t, &w, rows, cols, imp, true).unwrap());
                println!("{} {}: {:.4}", t.name(), imp.is_some(), searched / plain);
                // The IQ4 types always search their scale (llama.cpp's fit): the flag changes
                // nothing there.
                if matches!(t, BlockType::IQ4NL | BlockType::IQ4XS) {
                    assert_eq!(searched, plain, "{}", t.name());
                    continue;
                }
                // 6–8-bit grids have little range to clip: they must not lose; every other type
                // must gain.
                let bound = match t {
                    BlockType::Q6K | BlockType::Q8_0 => 1.0,
                    _ => 0.99,
                };
                assert!(
                    searched <= plain * bound,
                    "{} weighted {}: {searched} vs {plain}",
                    t.name(),
                    imp.is_some()
                );
            }
        }
    }

    #[test]
    fn rows_that_do_not_fit_are_refused_with_the_type_named() {
        let w = vec![0.1f32; 576];
        let e = quantize_rtn(BlockType::Q4K, &w, 1, 576, None, false).unwrap_err();
        assert!(e.to_string().contains("Q4_K"), "{e}");
        assert_eq!(BlockType::Q4K.fallback(), BlockType::Q5_0);
        assert!(BlockType::Q5_0.fits(576));
    }

    #[test]
    fn matching_integer_grids_convert_losslessly() {
        use crate::{quantize_rtn as int_rtn, Grid, RtnConfig};
        let (rows, cols) = (3, 96);
        let w = weights(rows * cols, 4);
        for (bits, grid, ty) in [
            (4, Grid::Symmetric, BlockType::Q4_0),
            (4, Grid::Asymmetric, BlockType::Q4_1),
            (5, Grid::Symmetric, BlockType::Q5_0),
            (5, Grid::Asymmetric, BlockType::Q5_1),
            (8, Grid::Symmetric, BlockType::Q8_0),
        ] {
            let q = int_rtn(&w, rows, cols, &RtnConfig::new(bits, 32, grid)).unwrap();
            let (t, bytes) = from_int(&q).unwrap();
            assert_eq!(t, ty);
            let a = dequantize(t, &bytes, w.len()).unwrap();
            let b = q.dequantize();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}",
                t.name()
            );
        }
        // Wider groups repeat their scale in each block; a short last group too.
        for (g, grid) in [
            (64, Grid::Asymmetric),
            (96, Grid::Symmetric),
            (64, Grid::Symmetric),
        ] {
            let q = int_rtn(&w, rows, cols, &RtnConfig::new(4, g, grid)).unwrap();
            let (t, bytes) = from_int(&q).unwrap();
            let a = dequantize(t, &bytes, w.len()).unwrap();
            assert_eq!(a, q.dequantize(), "group {g}");
        }
        let q = int_rtn(&w, rows, cols, &RtnConfig::new(4, 48, Grid::Symmetric)).unwrap();
        assert!(from_int(&q).is_none());
        let q = int_rtn(&w, rows, cols, &RtnConfig::new(3, 32, Grid::Symmetric)).unwrap();
        assert!(from_int(&q).is_none());
    }
}

//! NOVAQ's stored form and its decoder: residual vector codebooks over normalized weights.
//!
//! A row of `cols` weights is cut into `ceil(cols / dim)` vectors of `dim` consecutive values
//! (the last one shorter when `dim` does not divide `cols`). Each stage `s` stores one code per
//! vector, an index into its codebook of `2^bits_s` centroids of `dim` values. A weight decodes
//! as
//!
//! `w[r][c] = row_mean[r] + row_scale[r] * (col_scale[c] * Σ_s C_s[code_s(r, c / dim)][c % dim])`
//!
//! in f32, in exactly that order, so every decoder (this one, the quantizer's own check, a
//! canister) gets the same bits. Codes are packed LSB-first at their stage's width (1–16 bits).

use alloc::vec;
use alloc::vec::Vec;

/// Bytes needed for `n` codes of `bits` bits (saturating, as [`crate::pack::packed_len`]).
pub fn packed_len(n: usize, bits: u8) -> usize {
    crate::pack::packed_len(n, bits)
}

/// Bytes needed for `n` codes of `bits` bits; `None` when that does not fit a `usize`.
pub fn checked_packed_len(n: usize, bits: u8) -> Option<usize> {
    crate::pack::checked_packed_len(n, bits)
}

/// Packs codes (each `< 2^bits`, `bits` in 1..=16) into an LSB-first bit stream.
pub fn pack(codes: &[u16], bits: u8) -> Vec<u8> {
    assert!((1..=16).contains(&bits), "code width must be 1..=16 bits");
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    let mask = (1u32 << bits) - 1;
    let mut pos = 0usize;
    for &c in codes {
        let v = (c as u32 & mask) << (pos % 8);
        let b = pos / 8;
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            if *byte != 0 {
                out[b + i] |= byte;
            }
        }
        pos += bits as usize;
    }
    out
}

/// Unpacks `n` codes of `bits` bits; `None` when `bytes` is too short.
pub fn unpack(bytes: &[u8], bits: u8, n: usize) -> Option<Vec<u16>> {
    if !(1..=16).contains(&bits) || bytes.len() < packed_len(n, bits) {
        return None;
    }
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    let mut pos = 0usize;
    for _ in 0..n {
        let b = pos / 8;
        let mut w = 0u32;
        for i in 0..3 {
            if let Some(&x) = bytes.get(b + i) {
                w |= (x as u32) << (8 * i);
            }
        }
        out.push(((w >> (pos % 8)) & mask) as u16);
        pos += bits as usize;
    }
    Some(out)
}

/// One residual stage: `2^bits` centroids of `dim` values, and one packed code per vector.
#[derive(Debug, Clone, Copy)]
pub struct StageRef<'a> {
    pub bits: u8,
    pub centroids: &'a [f32],
    pub codes: &'a [u8],
}

/// Vectors per row.
pub fn vectors_per_row(cols: usize, dim: usize) -> usize {
    cols.div_ceil(dim)
}

/// Decodes a codebook tensor to f32, row-major; `None` when a part has the wrong size, a
/// stage width is outside 1..=16 or a size overflows. The output is `rows * cols` values,
/// which the caller bounds (the bundle's layout check ties it to the stored bytes).
pub fn decode(
    rows: usize,
    cols: usize,
    dim: usize,
    stages: &[StageRef],
    row_scale: &[f32],
    row_mean: &[f32],
    col_scale: &[f32],
) -> Option<Vec<f32>> {
    if dim == 0 || row_scale.len() != rows || row_mean.len() != rows || col_scale.len() != cols {
        return None;
    }
    let nv = vectors_per_row(cols, dim);
    let nvec = rows.checked_mul(nv)?;
    let numel = rows.checked_mul(cols)?;
    let codes: Vec<Vec<u16>> = stages
        .iter()
        .map(|s| {
            if !(1..=16).contains(&s.bits) {
                return None;
            }
            let k = 1usize << s.bits;
            (Some(s.centroids.len()) == k.checked_mul(dim))
                .then(|| unpack(s.codes, s.bits, nvec))
                .flatten()
        })
        .collect::<Option<_>>()?;
    // Sized from the shape, so asked for fallibly: a 32-bit reader may not have the room.
    let mut out = Vec::new();
    out.try_reserve_exact(numel).ok()?;
    out.resize(numel, 0f32);
    // Only the first `min(dim, cols)` sums of a vector are used; `dim` itself is unbounded
    // when there are no stages.
    let mut acc = vec![0f32; dim.min(cols)];
    for r in 0..rows {
        for v in 0..nv {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (s, cs) in stages.iter().zip(&codes) {
                let k = cs[r * nv + v] as usize;
                for (a, c) in acc.iter_mut().zip(&s.centroids[k * dim..(k + 1) * dim]) {
                    *a += c;
                }
            }
            let c0 = v * dim;
            let c1 = (c0 + dim).min(cols);
            for c in c0..c1 {
                out[r * cols + c] = row_mean[r] + row_scale[r] * (col_scale[c] * acc[c - c0]);
            }
        }
    }
    Some(out)
}

/// Most residual stages a tensor may have.
pub const MAX_STAGES: usize = 4;

/// Whether `dim` and `stage_bits` describe a codebook layout adaptq stores: `dim` ≥ 1 and
/// 1..=[`MAX_STAGES`] stages of 1..=16 bits. Every reader and the layout check ask this.
pub fn valid_layout(dim: usize, stage_bits: &[u8]) -> bool {
    dim > 0
        && (1..=MAX_STAGES).contains(&stage_bits.len())
        && stage_bits.iter().all(|b| (1..=16).contains(b))
}

/// Part names and lengths of a NOVAQ tensor of `rows × cols`, in stored order, in `u64` (the
/// same on every platform); `None` when the layout is not [`valid_layout`] or a length
/// overflows.
pub fn parts(
    rows: u64,
    cols: u64,
    dim: usize,
    stage_bits: &[u8],
) -> Option<Vec<(&'static str, u64)>> {
    const BOOK: [&str; MAX_STAGES] = ["codebook0", "codebook1", "codebook2", "codebook3"];
    const CODES: [&str; MAX_STAGES] = ["codes0", "codes1", "codes2", "codes3"];
    if !valid_layout(dim, stage_bits) {
        return None;
    }
    let dim = dim as u64;
    let nvec = rows.checked_mul(cols.div_ceil(dim))?;
    let mut v = vec![
        ("row_scale", rows.checked_mul(2)?),
        ("row_mean", rows.checked_mul(2)?),
        ("col_scale", cols.checked_mul(2)?),
    ];
    for (s, &b) in stage_bits.iter().enumerate() {
        v.push((BOOK[s], (1u64 << b).checked_mul(dim)?.checked_mul(2)?));
        v.push((CODES[s], nvec.checked_mul(b as u64)?.div_ceil(8)));
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_every_width() {
        for bits in 1..=16u8 {
            let codes: Vec<u16> = (0..37u32)
                .map(|i| ((i * 2654435761) >> 7) as u16 & ((1u32 << bits) - 1) as u16)
                .collect();
            let p = pack(&codes, bits);
            assert_eq!(p.len(), packed_len(codes.len(), bits));
            assert_eq!(unpack(&p, bits, codes.len()).unwrap(), codes);
        }
        assert!(unpack(&[0u8; 2], 12, 2).is_none());
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        assert!(parts(u64::MAX / 2, 4, 2, &[8]).is_none());
        assert!(parts(4, 4, usize::MAX / 4, &[8]).is_none());
        assert!(parts(4, 4, 0, &[8]).is_none());
        assert!(parts(4, 4, 2, &[17]).is_none());
        assert!(parts(4, 4, 2, &[1; 5]).is_none());
        assert_eq!(parts(2, 3, 2, &[1]).unwrap().len(), 5);
        let bad = StageRef {
            bits: 200,
            centroids: &[],
            codes: &[],
        };
        assert!(decode(0, 0, 1, &[bad], &[], &[], &[]).is_none());
    }

    #[test]
    fn decodes_sum_of_stages_with_scales() {
        // 1 row, 3 cols, dim 2: vectors [c0 c1] [c2 -].
        let c1 = [1.0f32, 2.0, 3.0, 4.0]; // 2 centroids
        let c2 = [0.5f32, 0.25, -0.5, -0.25];
        let s1 = pack(&[1, 0], 1);
        let s2 = pack(&[0, 1], 1);
        let out = decode(
            1,
            3,
            2,
            &[
                StageRef {
                    bits: 1,
                    centroids: &c1,
                    codes: &s1,
                },
                StageRef {
                    bits: 1,
                    centroids: &c2,
                    codes: &s2,
                },
            ],
            &[2.0],
            &[1.0],
            &[1.0, 1.0, 0.5],
        )
        .unwrap();
        assert_eq!(
            out,
            vec![1.0 + 2.0 * 3.5, 1.0 + 2.0 * 4.25, 1.0 + 2.0 * 0.25]
        );
    }
}

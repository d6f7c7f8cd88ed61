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

/// Bytes needed for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
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

/// Decodes a codebook tensor to f32, row-major; `None` when a part has the wrong size or a
/// code points past its codebook.
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
    let codes: Vec<Vec<u16>> = stages
        .iter()
        .map(|s| {
            let k = 1usize << s.bits;
            (s.centroids.len() == k * dim)
                .then(|| unpack(s.codes, s.bits, rows * nv))
                .flatten()
        })
        .collect::<Option<_>>()?;
    let mut out = vec![0f32; rows * cols];
    let mut acc = vec![0f32; dim];
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

/// Part names and lengths of a NOVAQ tensor, in stored order.
pub fn parts(
    rows: usize,
    cols: usize,
    dim: usize,
    stage_bits: &[u8],
) -> Vec<(&'static str, usize)> {
    const BOOK: [&str; 4] = ["codebook0", "codebook1", "codebook2", "codebook3"];
    const CODES: [&str; 4] = ["codes0", "codes1", "codes2", "codes3"];
    let nv = vectors_per_row(cols, dim.max(1));
    let mut v = vec![
        ("row_scale", rows * 2),
        ("row_mean", rows * 2),
        ("col_scale", cols * 2),
    ];
    for (s, &b) in stage_bits.iter().enumerate().take(4) {
        v.push((BOOK[s], (1usize << b.min(16)) * dim * 2));
        v.push((CODES[s], packed_len(rows * nv, b.min(16))));
    }
    v
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

//! Ternary weights (BitNet b1.58's absmean rule, applied after training): each group keeps one
//! scale `s = mean|w|` and codes in {−1, 0, +1} = round(w / s) clipped.
//!
//! Stored on adaptq's 2-bit symmetric grid, whose values are `s·(q − 2)`: codes 1, 2, 3 stand
//! for −s, 0, +s exactly, so bundles, `verify`, `eval` and the exports need nothing new. That
//! costs 2 bits per weight plus the f16 scale per group (1.58 bits would need base-3 packing).
//! A model not trained ternary loses most of its quality this way; the numbers say how much.

use crate::{groups_per_row, pack, Grid, QuantError, QuantizedTensor};
use half::f16;

/// Ternary codes for a row-major `rows × cols` matrix, `group_size` columns per scale.
pub fn quantize_ternary(
    w: &[f32],
    rows: usize,
    cols: usize,
    group_size: usize,
) -> Result<QuantizedTensor, QuantError> {
    let gs = crate::check_input(w, rows, cols, 2, group_size)?;
    let gpr = groups_per_row(cols, gs);
    let mut codes = vec![2u8; w.len()];
    let mut scales = Vec::with_capacity(rows * gpr);
    for r in 0..rows {
        for g in 0..gpr {
            let (c0, c1) = (r * cols + g * gs, r * cols + ((g + 1) * gs).min(cols));
            let x = &w[c0..c1];
            let mean = x.iter().map(|v| v.abs() as f64).sum::<f64>() / x.len() as f64;
            let s = f16::from_f32((mean as f32).min(65504.0));
            let sf = s.to_f32();
            if sf > 0.0 {
                for (c, &v) in codes[c0..c1].iter_mut().zip(x) {
                    *c = ((v / sf).round().clamp(-1.0, 1.0) + 2.0) as u8;
                }
            }
            scales.push(s);
        }
    }
    Ok(QuantizedTensor {
        rows,
        cols,
        bits: 2,
        group_size: gs,
        grid: Grid::Symmetric,
        codes: pack::pack(&codes, 2),
        scales,
        mins: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_minus_zero_plus_absmean() {
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 29 % 41) as f32 - 20.0) * 0.01)
            .collect();
        let q = quantize_ternary(&w, 2, 64, 32).unwrap();
        let d = q.dequantize();
        for (g, chunk) in w.chunks(32).enumerate() {
            let s = q.scales[g].to_f32();
            let mean = chunk.iter().map(|v| v.abs()).sum::<f32>() / 32.0;
            assert!((s - mean).abs() <= mean * 1e-3);
            for (i, &v) in chunk.iter().enumerate() {
                let x = d[g * 32 + i];
                assert!(x == 0.0 || x == s || x == -s, "{x} not in {{-s, 0, s}}");
                let want = (v / s).round().clamp(-1.0, 1.0) * s;
                assert_eq!(x, want);
            }
        }
        assert_eq!(q.bits_per_weight(), 2.0 + 16.0 / 32.0);
    }

    #[test]
    fn an_all_zero_group_stays_zero() {
        let q = quantize_ternary(&[0.0; 64], 1, 64, 32).unwrap();
        assert!(q.dequantize().iter().all(|v| *v == 0.0));
    }
}

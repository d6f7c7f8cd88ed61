//! Round-to-nearest (RTN) quantization: the baseline every calibrated method must beat.

use crate::{groups_per_row, pack, Grid, QuantError, QuantizedTensor};
use half::f16;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RtnConfig {
    /// Code width, 2–8.
    pub bits: u8,
    /// Columns per group; 0 means per-channel (one group per row).
    pub group_size: usize,
    pub grid: Grid,
}

impl RtnConfig {
    /// The tensor of unpacked `codes` with this (resolved) group size; `mins` are dropped on the
    /// symmetric grid, which stores none.
    pub(crate) fn packed(
        &self,
        rows: usize,
        cols: usize,
        codes: &[u8],
        scales: Vec<f16>,
        mins: Vec<f16>,
    ) -> QuantizedTensor {
        QuantizedTensor {
            rows,
            cols,
            bits: self.bits,
            group_size: self.group_size,
            grid: self.grid,
            codes: pack::pack(codes, self.bits),
            scales,
            mins: if self.grid == Grid::Asymmetric {
                mins
            } else {
                Vec::new()
            },
        }
    }

    pub const fn new(bits: u8, group_size: usize, grid: Grid) -> Self {
        RtnConfig {
            bits,
            group_size,
            grid,
        }
    }
}

/// Rounds `x` to f16, saturating instead of overflowing to infinity.
fn to_f16(x: f32) -> f16 {
    f16::from_f32(x.clamp(-65504.0, 65504.0))
}

/// Quantizes one group, writing codes into `out`; returns (scale, min) in f16.
///
/// Symmetric: the group's signed extreme `m` maps exactly to code 0 (`d = m / -2^(b-1)`), the
/// llama.cpp Q4_0 choice, which uses all `2^b` levels instead of wasting one on symmetry.
/// Asymmetric: `[min, max]` spread over `2^b - 1` steps. The f16-rounded parameters are used to
/// pick codes, so dequantization reproduces exactly what was chosen.
pub fn quantize_group(x: &[f32], bits: u8, grid: Grid, out: &mut [u8]) -> (f16, f16) {
    let maxq = ((1u32 << bits) - 1) as f32;
    match grid {
        Grid::Symmetric => {
            let half = (1u32 << (bits - 1)) as f32;
            let m = x
                .iter()
                .copied()
                .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
            let d = to_f16(m / -half);
            let df = d.to_f32();
            let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
            for (o, &v) in out.iter_mut().zip(x) {
                *o = ((v * inv).round() + half).clamp(0.0, maxq) as u8;
            }
            (d, f16::ZERO)
        }
        Grid::Asymmetric => {
            let (lo, hi) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let s = to_f16((hi - lo) / maxq);
            let m = to_f16(lo);
            let (sf, mf) = (s.to_f32(), m.to_f32());
            let inv = if sf != 0.0 { 1.0 / sf } else { 0.0 };
            for (o, &v) in out.iter_mut().zip(x) {
                *o = ((v - mf) * inv).round().clamp(0.0, maxq) as u8;
            }
            (s, m)
        }
    }
}

/// How a group's range is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit<'a> {
    /// The group's min and max (or signed extreme) map to the end codes.
    MinMax,
    /// [`crate::range`]'s search, weighted by one importance per column of the row (e.g. the
    /// input Hessian's diagonal) when given.
    Search(Option<&'a [f32]>),
    /// Entropy-coded uniform grid: the step is this multiple of the group's RMS (its standard
    /// deviation about the mean, on the asymmetric grid, which centres on the mean), whatever
    /// its range; the code width only bounds the codes. With an entropy coder behind it
    /// (the bundle's rANS stage) each code costs about its entropy, and at a given rate a
    /// uniform step beats a range-fitted grid of fewer levels (entropy-coded scalar
    /// quantization; the tests below measure it at under 0.75x the error of a fitted g32 grid
    /// at the same stored bits). On a group wider than a few dozen values the step is set by
    /// its spread, not its two extremes, so a whole row can share one scale.
    Step(f32),
}

impl<'a> Fit<'a> {
    /// The fit a run's settings ask for: a step wins over the range search, which weighs its
    /// candidates by `imp` when given.
    pub fn of(step: Option<f32>, range_search: bool, imp: Option<&'a [f32]>) -> Self {
        match (step, range_search) {
            (Some(k), _) => Fit::Step(k),
            (None, true) => Fit::Search(imp),
            (None, false) => Fit::MinMax,
        }
    }

    /// Fits the group at columns `c0..c0 + x.len()` of a row and writes its codes to `out`.
    pub fn group(&self, x: &[f32], c0: usize, bits: u8, grid: Grid, out: &mut [u8]) -> (f16, f16) {
        let imp = match *self {
            Fit::MinMax => return quantize_group(x, bits, grid, out),
            Fit::Step(k) => return step_group(x, k, bits, grid, out),
            Fit::Search(imp) => imp,
        };
        let w = imp.map(|v| &v[c0..c0 + x.len()]);
        let (s, m) = match grid {
            Grid::Symmetric => {
                let half = 1i32 << (bits - 1);
                let d = crate::range::search_symmetric(x, w, half, |d| to_f16(d).to_f32());
                (to_f16(d), f16::ZERO)
            }
            Grid::Asymmetric => {
                let (s, m) = crate::range::search_affine(x, w, (1 << bits) - 1, false, |s, m| {
                    (to_f16(s).to_f32(), to_f16(m).to_f32())
                });
                (to_f16(s), to_f16(m))
            }
        };
        for (o, &v) in out.iter_mut().zip(x) {
            *o = code_of(v, s, m, bits, grid);
        }
        (s, m)
    }
}

/// [`Fit::Step`] for one group: symmetric `d = k·rms`; asymmetric `s = k·std` with the grid's
/// middle code on the group's mean. The step widens where the codes would otherwise clip the
/// group's extremes: a clipped outlier costs far more than the finer step saves.
fn step_group(x: &[f32], k: f32, bits: u8, grid: Grid, out: &mut [u8]) -> (f16, f16) {
    let n = x.len().max(1) as f64;
    let mean = match grid {
        Grid::Symmetric => 0.0,
        Grid::Asymmetric => x.iter().map(|&v| v as f64).sum::<f64>() / n,
    };
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let (lo, hi) = x.iter().fold((mean, mean), |(l, h), &v| {
        (l.min(v as f64), h.max(v as f64))
    });
    // Codes reach `half` steps below the centre and `half - 1` above it.
    let half = (1u32 << (bits - 1)) as f64;
    let fits = ((mean - lo) / half).max((hi - mean) / (half - 1.0).max(1.0));
    let s = to_f16((k as f64 * var.sqrt()).max(fits) as f32);
    let m = match grid {
        Grid::Symmetric => f16::ZERO,
        Grid::Asymmetric => to_f16((mean - half * s.to_f32() as f64) as f32),
    };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code_of(v, s, m, bits, grid);
    }
    (s, m)
}

/// Code of one value on a group's grid (the same rule [`quantize_group`] applies).
#[inline]
pub fn code_of(v: f32, scale: f16, min: f16, bits: u8, grid: Grid) -> u8 {
    code_at(v, scale.to_f32(), min.to_f32(), bits, grid)
}

/// [`code_of`] with the group's f16 scale and min already widened: a column sweep reads them
/// once per value, and the conversion would cost as much as the rounding.
#[inline]
pub fn code_at(v: f32, s: f32, min: f32, bits: u8, grid: Grid) -> u8 {
    let maxq = ((1u32 << bits) - 1) as f32;
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    match grid {
        Grid::Symmetric => ((v * inv).round() + (1u32 << (bits - 1)) as f32).clamp(0.0, maxq) as u8,
        Grid::Asymmetric => ((v - min) * inv).round().clamp(0.0, maxq) as u8,
    }
}

/// Value a code stands for on a group's grid (scale and min widened from f16).
#[inline]
pub fn value_at(code: u8, s: f32, min: f32, bits: u8, grid: Grid) -> f32 {
    match grid {
        Grid::Symmetric => s * (code as f32 - (1u32 << (bits - 1)) as f32),
        Grid::Asymmetric => s * code as f32 + min,
    }
}

/// Quantizes a row-major `rows × cols` matrix with round-to-nearest.
pub fn quantize_rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &RtnConfig,
) -> Result<QuantizedTensor, QuantError> {
    quantize_rtn_fit(w, rows, cols, cfg, Fit::MinMax)
}

/// Round-to-nearest with each group's range chosen by `fit`.
pub fn quantize_rtn_fit(
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &RtnConfig,
    fit: Fit,
) -> Result<QuantizedTensor, QuantError> {
    let gs = crate::check_input(w, rows, cols, cfg.bits, cfg.group_size)?;
    if let Fit::Search(Some(imp)) = fit {
        if imp.len() != cols {
            return Err(QuantError::Shape {
                rows: 1,
                cols,
                len: imp.len(),
            });
        }
    }
    let gpr = groups_per_row(cols, gs);
    let mut codes = vec![0u8; w.len()];
    let mut scales = Vec::with_capacity(rows * gpr);
    let mut mins = Vec::new();
    for r in 0..rows {
        for g in 0..gpr {
            let c0 = r * cols + g * gs;
            let c1 = r * cols + ((g + 1) * gs).min(cols);
            let (s, m) = fit.group(&w[c0..c1], g * gs, cfg.bits, cfg.grid, &mut codes[c0..c1]);
            scales.push(s);
            mins.push(m);
        }
    }
    Ok(RtnConfig::new(cfg.bits, gs, cfg.grid).packed(rows, cols, &codes, scales, mins))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random weights (xorshift), roughly Gaussian-ish via sum of uniforms.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.max(1);
        let mut u = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32
        };
        (0..n)
            .map(|_| (u() + u() + u() + u() - 2.0) * 0.05)
            .collect()
    }

    fn configs() -> Vec<RtnConfig> {
        let mut v = Vec::new();
        for bits in 2..=8 {
            for gs in [0usize, 32, 64, 128] {
                for grid in [Grid::Symmetric, Grid::Asymmetric] {
                    v.push(RtnConfig {
                        bits,
                        group_size: gs,
                        grid,
                    });
                }
            }
        }
        v
    }

    #[test]
    fn values_lie_on_the_grid_and_error_is_bounded() {
        let (rows, cols) = (6, 200); // 200 = not a multiple of any group size
        let w = weights(rows * cols, 7);
        for cfg in configs() {
            let q = quantize_rtn(&w, rows, cols, &cfg).unwrap();
            let deq = q.dequantize();
            let codes = pack::unpack(&q.codes, q.bits, rows * cols);
            let gpr = q.groups_per_row();
            let half = (1u32 << (cfg.bits - 1)) as f32;
            for r in 0..rows {
                for c in 0..cols {
                    let g = r * gpr + c / q.group_size;
                    let s = q.scales[g].to_f32();
                    let i = r * cols + c;
                    assert!((codes[i] as u32) < (1 << cfg.bits));
                    // On the grid: dequantized value is exactly scale*code(+offset).
                    let expect = match cfg.grid {
                        Grid::Symmetric => s * (codes[i] as f32 - half),
                        Grid::Asymmetric => s * codes[i] as f32 + q.mins[g].to_f32(),
                    };
                    assert_eq!(deq[i], expect);
                    // Round-to-nearest error: half a step, plus the f16 rounding of the scale
                    // (2^-11 relative) amplified by the code magnitude, plus the f16 min.
                    // Symmetric grids have one level fewer on the side opposite the extreme,
                    // so values there may clip by up to one whole step.
                    let range = (1u32 << cfg.bits) as f32 * s.abs();
                    let steps = match cfg.grid {
                        Grid::Symmetric => 1.0,
                        Grid::Asymmetric => 0.5,
                    };
                    let bound = steps * s.abs() + range * 1e-3 + 1e-6;
                    let err = (w[i] - deq[i]).abs();
                    assert!(err <= bound, "{cfg:?} r{r} c{c}: err {err} > bound {bound}");
                }
            }
        }
    }

    #[test]
    fn more_bits_less_error() {
        let w = weights(64 * 256, 3);
        for grid in [Grid::Symmetric, Grid::Asymmetric] {
            let mut last = f64::INFINITY;
            for bits in 2..=8 {
                let cfg = RtnConfig {
                    bits,
                    group_size: 64,
                    grid,
                };
                let q = quantize_rtn(&w, 64, 256, &cfg).unwrap();
                let e = crate::metrics::layer_error(&w, &q.dequantize()).rel_mse;
                assert!(e < last * 0.6, "{grid:?} bits {bits}: {e} vs {last}");
                last = e;
            }
        }
    }

    /// Empirical entropy of the codes, bits per code: what an order-0 entropy coder stores.
    fn entropy(q: &QuantizedTensor) -> f64 {
        let n = q.rows * q.cols;
        let mut count = [0u64; 256];
        for c in pack::unpack(&q.codes, q.bits, n) {
            count[c as usize] += 1;
        }
        count
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.log2()
            })
            .sum()
    }

    #[test]
    fn an_entropy_coded_step_beats_a_range_fitted_grid_at_the_same_rate() {
        let (rows, cols) = (64, 512);
        let w = weights(rows * cols, 11);
        let scale_bits = |q: &QuantizedTensor| {
            16.0 * (q.scales.len() + q.mins.len()) as f64 / (rows * cols) as f64
        };
        let err = |q: &QuantizedTensor| crate::metrics::layer_error(&w, &q.dequantize()).rel_mse;
        for bits in [3u8, 4] {
            let fitted =
                quantize_rtn(&w, rows, cols, &RtnConfig::new(bits, 32, Grid::Symmetric)).unwrap();
            let budget = entropy(&fitted) + scale_bits(&fitted);
            // The finest step (of a ladder) whose entropy-coded codes fit the same budget.
            let cfg = RtnConfig::new(8, 0, Grid::Symmetric);
            let step = (0..100)
                .map(|i| {
                    quantize_rtn_fit(&w, rows, cols, &cfg, Fit::Step(0.05 * 1.03f32.powi(i)))
                        .unwrap()
                })
                .find(|q| entropy(q) + scale_bits(q) <= budget)
                .unwrap();
            assert!(
                err(&step) < 0.75 * err(&fitted),
                "{bits} bits: step {} vs fitted {} at {budget:.3} bits",
                err(&step),
                err(&fitted)
            );
        }
    }

    #[test]
    fn the_step_grid_follows_the_spread_not_the_extremes() {
        // Same spread, one outlier: the step does not widen with it (a range fit would), and
        // the asymmetric grid centres on the mean.
        let step = |w: &[f32], bits: u8| {
            let cfg = RtnConfig::new(bits, 0, Grid::Symmetric);
            quantize_rtn_fit(w, 1, 512, &cfg, Fit::Step(0.5)).unwrap()
        };
        let mut w = weights(512, 5);
        let plain = step(&w, 8);
        w[7] = 0.5;
        let outlier = step(&w, 8);
        let ratio = outlier.scales[0].to_f32() / plain.scales[0].to_f32();
        assert!((1.0..1.3).contains(&ratio), "step grew {ratio}x");
        // Unless 4-bit codes would clip it: then the step widens to keep it.
        let q = step(&w, 4);
        let e = crate::metrics::layer_error(&w, &q.dequantize()).max_abs;
        assert!(
            e <= 0.5 * q.scales[0].to_f32() as f64 + 1e-3,
            "clipped: error {e}"
        );
        let shifted: Vec<f32> = weights(512, 5).iter().map(|v| v + 3.0).collect();
        let q = quantize_rtn_fit(
            &shifted,
            1,
            512,
            &RtnConfig::new(6, 0, Grid::Asymmetric),
            Fit::Step(0.5),
        )
        .unwrap();
        let codes = pack::unpack(&q.codes, 6, 512);
        let mean = codes.iter().map(|&c| c as f64).sum::<f64>() / 512.0;
        assert!((mean - 32.0).abs() < 1.0, "codes centre at {mean}");
        let e = crate::metrics::layer_error(&shifted, &q.dequantize()).max_abs;
        assert!(e <= 0.5 * q.scales[0].to_f32() as f64 + 3e-3, "error {e}");
    }

    #[test]
    fn symmetric_keeps_zero_and_extreme_exact() {
        let w = vec![0.0, 0.3, -1.0, 0.5];
        let q = quantize_rtn(&w, 1, 4, &RtnConfig::new(4, 0, Grid::Symmetric)).unwrap();
        let d = q.dequantize();
        assert_eq!(d[0], 0.0);
        assert_eq!(d[2], -1.0);
    }

    #[test]
    fn values_already_on_a_grid_are_lossless() {
        // A group that is exactly s*q + m for q in 0..16 round-trips exactly at 4-bit asym.
        let s = 0.0625f32;
        let m = -0.5f32;
        let w: Vec<f32> = (0..32).map(|i| s * (i % 16) as f32 + m).collect();
        let cfg = RtnConfig {
            bits: 4,
            group_size: 32,
            grid: Grid::Asymmetric,
        };
        let q = quantize_rtn(&w, 1, 32, &cfg).unwrap();
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn sizes_and_bpw() {
        let w = weights(10 * 576, 1);
        let cfg = RtnConfig {
            bits: 4,
            group_size: 128,
            grid: Grid::Symmetric,
        };
        let q = quantize_rtn(&w, 10, 576, &cfg).unwrap();
        assert_eq!(q.groups_per_row(), 5); // 4×128 + one of 64
        assert_eq!(q.codes.len(), 10 * 576 / 2);
        assert_eq!(q.scales.len(), 50);
        assert!(q.mins.is_empty());
        let bpw = q.bits_per_weight();
        assert!((bpw - (4.0 + 50.0 * 16.0 / 5760.0)).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_input() {
        let cfg = RtnConfig {
            bits: 9,
            group_size: 0,
            grid: Grid::Symmetric,
        };
        assert_eq!(quantize_rtn(&[0.0], 1, 1, &cfg), Err(QuantError::Bits(9)));
        let cfg = RtnConfig { bits: 4, ..cfg };
        assert!(matches!(
            quantize_rtn(&[0.0, 1.0], 1, 3, &cfg),
            Err(QuantError::Shape { .. })
        ));
        assert_eq!(
            quantize_rtn(&[0.0, f32::NAN], 1, 2, &cfg),
            Err(QuantError::NonFinite(1))
        );
    }

    #[test]
    fn all_zero_group() {
        for grid in [Grid::Symmetric, Grid::Asymmetric] {
            let cfg = RtnConfig {
                bits: 3,
                group_size: 4,
                grid,
            };
            let q = quantize_rtn(&[0.0; 8], 2, 4, &cfg).unwrap();
            assert_eq!(q.dequantize(), vec![0.0; 8]);
        }
    }
}

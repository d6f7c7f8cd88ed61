//! Range search: the (optionally importance-weighted) MSE-optimal clipping of one group's range.
//!
//! A min/max fit spends levels on the group's extremes; at 2–3 bits clipping them lowers the
//! error of everything else by more than it costs the outliers. Each candidate range keeps a
//! fraction `p` of the min/max range (1.0 down to 0.5), centred; two Lloyd steps (codes, then the
//! weighted least-squares scale and offset for those codes) let it move off centre; the candidate
//! of least weighted error *after* the caller's rounding of the parameters (e.g. to f16) wins.
//! The min/max fit is always a candidate, so the search never does worse than it on the weights
//! it is given. Weights are a per-value importance, e.g. the input Hessian's diagonal.

/// Fractions of the min/max range tried, beyond 1.0 itself.
const STEPS: usize = 20;
const STEP: f32 = 0.025;
/// Lloyd refinements per candidate.
const REFINE: usize = 2;

#[inline]
fn weight(w: Option<&[f32]>, i: usize) -> f64 {
    w.map_or(1.0, |w| w[i] as f64)
}

/// Best affine grid `value = s·q + m`, `q ∈ 0..=nmax`, for `x`. `round` maps a candidate to the
/// parameters the format stores (f16, or identity when the caller rounds later); with
/// `min_nonpositive` the offset is kept ≤ 0 (k-quants store −m as an unsigned multiple).
pub fn search_affine(
    x: &[f32],
    w: Option<&[f32]>,
    nmax: u32,
    min_nonpositive: bool,
    round: impl Fn(f32, f32) -> (f32, f32),
) -> (f32, f32) {
    let nmax_f = nmax as f32;
    let (mut lo, hi) = min_max(x);
    if min_nonpositive {
        lo = lo.min(0.0);
    }
    let first = round((hi - lo) / nmax_f, lo);
    if hi <= lo || !hi.is_finite() || !lo.is_finite() || !first.0.is_finite() {
        return first;
    }
    let err = |s: f32, m: f32| -> f64 {
        let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let q = ((v - m) * inv).round().clamp(0.0, nmax_f);
                let e = (s * q + m - v) as f64;
                e * e * weight(w, i)
            })
            .sum()
    };
    let mut best = (err(first.0, first.1), first);
    let mid = 0.5 * (lo + hi);
    for k in 0..=STEPS {
        let half = 0.5 * (1.0 - STEP * k as f32) * (hi - lo);
        let (mut s, mut m) = (2.0 * half / nmax_f, mid - half);
        if min_nonpositive {
            m = m.min(0.0);
        }
        for _ in 0..REFINE {
            match least_squares_affine(x, w, s, m, nmax_f, min_nonpositive) {
                Some(p) => (s, m) = p,
                None => break,
            }
        }
        let (rs, rm) = round(s, m);
        if rs <= 0.0 || !rs.is_finite() || !rm.is_finite() {
            continue;
        }
        let e = err(rs, rm);
        if e < best.0 {
            best = (e, (rs, rm));
        }
    }
    best.1
}

/// Codes of `x` on `(s, m)`, then the weighted least-squares `(s, m)` for those codes.
fn least_squares_affine(
    x: &[f32],
    w: Option<&[f32]>,
    s: f32,
    m: f32,
    nmax: f32,
    min_nonpositive: bool,
) -> Option<(f32, f32)> {
    let inv = 1.0 / s;
    let (mut sw, mut sl, mut sll, mut sx, mut slx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (i, &v) in x.iter().enumerate() {
        let l = ((v - m) * inv).round().clamp(0.0, nmax) as f64;
        let wi = weight(w, i);
        let v = v as f64;
        sw += wi;
        sl += wi * l;
        sll += wi * l * l;
        sx += wi * v;
        slx += wi * l * v;
    }
    let det = sw * sll - sl * sl;
    if det <= 1e-30 * sw * sll.max(1e-30) {
        return None;
    }
    let mut ns = (sw * slx - sl * sx) / det;
    let mut nm = (sll * sx - sl * slx) / det;
    if min_nonpositive && nm > 0.0 {
        nm = 0.0;
        ns = slx / sll;
    }
    (ns > 0.0 && ns.is_finite() && nm.is_finite()).then_some((ns as f32, nm as f32))
}

/// Best symmetric scale `d` for `value = d·l`, `l ∈ −half..=half−1` (Q4_0's layout: the signed
/// extreme maps to −half). `round` maps a candidate scale to the stored one.
pub fn search_symmetric(
    x: &[f32],
    w: Option<&[f32]>,
    half: i32,
    round: impl Fn(f32) -> f32,
) -> f32 {
    let m = x
        .iter()
        .copied()
        .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
    let first = round(m / -(half as f32));
    if m == 0.0 || !first.is_finite() {
        return first;
    }
    let (lo, hi) = (-(half as f32), (half - 1) as f32);
    let err = |d: f32| -> f64 {
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let e = (d * (v * inv).round().clamp(lo, hi) - v) as f64;
                e * e * weight(w, i)
            })
            .sum()
    };
    let mut best = (err(first), first);
    for k in 0..=STEPS {
        let mut d = m / -(half as f32) * (1.0 - STEP * k as f32);
        for _ in 0..REFINE {
            let inv = 1.0 / d;
            let (mut lx, mut ll) = (0f64, 0f64);
            for (i, &v) in x.iter().enumerate() {
                let l = (v * inv).round().clamp(lo, hi) as f64;
                let wi = weight(w, i);
                lx += wi * l * v as f64;
                ll += wi * l * l;
            }
            if ll <= 0.0 || lx == 0.0 {
                break;
            }
            d = (lx / ll) as f32;
        }
        let rd = round(d);
        if rd == 0.0 || !rd.is_finite() {
            continue;
        }
        let e = err(rd);
        if e < best.0 {
            best = (e, rd);
        }
    }
    best.1
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_ish(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng(seed);
        (0..n).map(|_| r.gauss() as f32).collect()
    }

    fn affine_err(x: &[f32], s: f32, m: f32, nmax: f32) -> f64 {
        x.iter()
            .map(|&v| {
                let q = ((v - m) / s).round().clamp(0.0, nmax);
                ((s * q + m - v) as f64).powi(2)
            })
            .sum()
    }

    #[test]
    fn clipping_beats_min_max_at_low_bits_and_never_loses() {
        let mut gain2 = 0.0;
        for seed in 1..40 {
            let mut x = gaussian_ish(64, seed);
            x[5] = 3.5; // one outlier, as real weight groups have
            let (lo, hi) = min_max(&x);
            for bits in [2u32, 3, 4, 8] {
                let nmax = ((1 << bits) - 1) as f32;
                let plain = affine_err(&x, (hi - lo) / nmax, lo, nmax);
                let (s, m) = search_affine(&x, None, (1 << bits) - 1, false, |s, m| (s, m));
                let searched = affine_err(&x, s, m, nmax);
                assert!(
                    searched <= plain * (1.0 + 1e-9),
                    "bits {bits}: {searched} > {plain}"
                );
                if bits == 2 {
                    gain2 += searched / plain;
                }
            }
        }
        // Mean error ratio at 2 bits over the seeds: clipping pays clearly.
        assert!(gain2 / 39.0 < 0.8, "mean ratio {}", gain2 / 39.0);
    }

    #[test]
    fn weights_steer_the_fit() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 / 31.0 - 0.2).collect();
        let mut w = vec![1e-3f32; 32];
        for v in &mut w[..8] {
            *v = 1.0;
        }
        let (s, m) = search_affine(&x, Some(&w), 3, false, |s, m| (s, m));
        let weighted = |s: f32, m: f32| -> f64 {
            x.iter()
                .zip(&w)
                .map(|(&v, &wi)| {
                    let q = ((v - m) / s).round().clamp(0.0, 3.0);
                    ((s * q + m - v) as f64).powi(2) * wi as f64
                })
                .sum()
        };
        let (lo, hi) = min_max(&x);
        assert!(weighted(s, m) < 0.5 * weighted((hi - lo) / 3.0, lo));
    }

    #[test]
    fn symmetric_search_never_loses_and_keeps_zero_groups() {
        for seed in 1..20 {
            let x = gaussian_ish(32, seed);
            for half in [2, 4, 8, 128] {
                let m = x
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let e = |d: f32| -> f64 {
                    x.iter()
                        .map(|&v| {
                            let l = (v / d).round().clamp(-(half as f32), (half - 1) as f32);
                            ((d * l - v) as f64).powi(2)
                        })
                        .sum()
                };
                let d = search_symmetric(&x, None, half, |d| d);
                assert!(e(d) <= e(m / -(half as f32)) * (1.0 + 1e-9));
            }
        }
        assert_eq!(search_symmetric(&[0.0; 8], None, 8, |d| d), 0.0);
        let (s, m) = search_affine(&[0.25; 8], None, 15, false, |s, m| (s, m));
        assert_eq!((s, m), (0.0, 0.25));
    }
}

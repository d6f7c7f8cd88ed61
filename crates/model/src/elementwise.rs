//! Element-wise work of the packed runtime's pass that libm would do one value per call, and
//! reductions that stay scalar unless split into lanes: attention's softmax and SwiGLU. Hand-written (a Cephes-style
//! polynomial, the approach of llama.cpp's `ggml_v_expf`) so the loops vectorize; within
//! 2 ulp of `f32::exp` over the range a softmax or a sigmoid uses (tested below). The exact
//! kernels keep candle's and libm's functions, so calibration's activations do not move.

/// Values per task of [`swiglu`].
const CHUNK: usize = 4096;

/// `e^x` for every value of `x`, in place (0 below `e^-87.3`, where f32 runs out; +inf from
/// about 88.38, a little before f32 overflows at 88.72: softmax and SwiGLU never go there).
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { exp_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { exp_avx2(x) };
    }
    x.iter_mut().for_each(|v| *v = exp(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = exp(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = exp(*v));
}

/// Attention's softmax over one query's scores, in place: `x · scale`, soft-capped to
/// `c · tanh(x / c)` where the model caps (Gemma), then normalized exponentials.
pub fn softmax_in_place(p: &mut [f32], scale: f32, cap: Option<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { softmax_avx512(p, scale, cap) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { softmax_avx2(p, scale, cap) };
    }
    softmax(p, scale, cap)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(p: &mut [f32], scale: f32, cap: Option<f32>) {
    softmax(p, scale, cap)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(p: &mut [f32], scale: f32, cap: Option<f32>) {
    softmax(p, scale, cap)
}

/// Lanes of the maximum and the sum, so both loops vectorize.
const LANES: usize = 16;

#[inline(always)]
fn softmax(p: &mut [f32], scale: f32, cap: Option<f32>) {
    p.iter_mut().for_each(|x| *x *= scale);
    if let Some(c) = cap {
        p.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
    }
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = p.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (m, &v) in max.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = max.iter().fold(tail, |m, &v| m.max(v));
    p.iter_mut().for_each(|x| *x = exp(*x - max));
    let mut sum = [0f32; LANES];
    let chunks = p.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (s, &v) in sum.iter_mut().zip(c) {
            *s += v;
        }
    }
    let inv = 1.0 / (sum.iter().sum::<f32>() + tail);
    p.iter_mut().for_each(|x| *x *= inv);
}

/// `e^x`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r`, `2^n` put in
/// the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = (p * r * r + r) + 1.0;
    // `n + 127` lands in the low mantissa bits of `2^23 + n + 127`; shifted into the exponent
    // field it is `2^n` (a float-to-int cast would not vectorize, for its saturation).
    let scale = f32::from_bits((n + (8_388_608.0 + 127.0)).to_bits() << 23);
    if x < -87.3 {
        0.0
    } else {
        e * scale
    }
}

/// `out = silu(g) · u` (SwiGLU's product, `silu(g) = g / (1 + e^-g)`), split across the pool.
pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == out.len() && u.len() == out.len(),
        "swiglu of unequal lengths"
    );
    crate::team::for_chunks(out, CHUNK, |c, o| {
        let at = c * CHUNK..c * CHUNK + o.len();
        let (g, u) = (&g[at.clone()], &u[at]);
        o.iter_mut().zip(g).for_each(|(o, g)| *o = -g);
        exp_in_place(o);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + *o) * u;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Every 97th f32 bit pattern in the range softmax and sigmoid use is within 2 ulp of
    /// libm's `exp`, on the vector build and on the plain one; below the range, 0.
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let xs: Vec<f32> = (0..u32::MAX / 97)
            .map(|i| f32::from_bits(i * 97))
            .filter(|v| v.is_finite() && v.abs() <= 87.0)
            .flat_map(|v| [v, -v])
            .collect();
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        for (x, f) in xs.iter().zip(&fast) {
            let want = x.exp();
            assert!(ulps(*f, want) <= 2, "exp({x}) = {f}, libm {want}");
            assert_eq!(
                f.to_bits(),
                exp(*x).to_bits(),
                "vector and plain differ at {x}"
            );
        }
        let mut low = vec![-87.4f32, -100.0, f32::NEG_INFINITY];
        exp_in_place(&mut low);
        assert_eq!(low, vec![0.0; 3]);
    }

    /// Softmax (scaled, capped or not) sums to 1 and matches libm's within float tolerance.
    #[test]
    fn softmax_matches_the_plain_formula() {
        for (n, cap) in [
            (1, None),
            (15, None),
            (16, Some(30.0)),
            (515, None),
            (515, Some(50.0)),
        ] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.73).sin() * 40.0).collect();
            let mut p = x.clone();
            softmax_in_place(&mut p, 0.125, cap);
            let s: Vec<f32> = x
                .iter()
                .map(|v| v * 0.125)
                .map(|v| cap.map_or(v, |c: f32| c * (v / c).tanh()))
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = s.iter().map(|v| (v - max).exp()).sum();
            for (g, v) in p.iter().zip(&s) {
                let want = (v - max).exp() / sum;
                assert!((g - want).abs() <= 1e-6 + 1e-5 * want, "{n}: {g} vs {want}");
            }
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let g: Vec<f32> = (0..10_000)
            .map(|i| (i as f32 * 0.37).sin() * 12.0)
            .collect();
        let u: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0f32; g.len()];
        swiglu(&g, &u, &mut out);
        for ((o, g), u) in out.iter().zip(&g).zip(&u) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{o} vs {want}"
            );
        }
    }
}

//! Weight-space error measures recorded per layer in `verification.json`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerError {
    /// ||W - Q||² / ||W||².
    pub rel_mse: f64,
    /// cos(W, Q) over the flattened matrix.
    pub cosine: f64,
    /// max |W - Q|.
    pub max_abs: f64,
}

/// Compares a reference tensor with its reconstruction (f64 accumulation).
pub fn layer_error(reference: &[f32], approx: &[f32]) -> LayerError {
    assert_eq!(reference.len(), approx.len());
    layer_error_pairs(reference.iter().copied().zip(approx.iter().copied()))
}

/// [`layer_error`] over `(reference, approx)` pairs, for an approximation computed on the fly
/// rather than held as a second copy of a large tensor.
pub fn layer_error_pairs(pairs: impl IntoIterator<Item = (f32, f32)>) -> LayerError {
    let (mut num, mut den, mut dot, mut na, mut maxa) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (w, q) in pairs {
        let (w, q) = (w as f64, q as f64);
        let d = w - q;
        num += d * d;
        den += w * w;
        dot += w * q;
        na += q * q;
        maxa = maxa.max(d.abs());
    }
    let rel_mse = if den > 0.0 {
        num / den
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let cosine = if den > 0.0 && na > 0.0 {
        dot / (den.sqrt() * na.sqrt())
    } else if den == 0.0 && na == 0.0 {
        1.0
    } else {
        0.0
    };
    LayerError {
        rel_mse,
        cosine,
        max_abs: maxa,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn identical_is_perfect() {
        let w = [1.0, -2.0, 3.5];
        let e = layer_error(&w, &w);
        assert_eq!(e.rel_mse, 0.0);
        assert!((e.cosine - 1.0).abs() < 1e-12);
    }
    #[test]
    fn known_error() {
        let e = layer_error(&[3.0, 4.0], &[3.0, 3.0]);
        assert!((e.rel_mse - 1.0 / 25.0).abs() < 1e-12);
        assert!((e.max_abs - 1.0).abs() < 1e-12);
        assert!(e.cosine < 1.0 && e.cosine > 0.98);
    }
}

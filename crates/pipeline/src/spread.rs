//! NOVAQ's bits spread over the linear layers by sensitivity: `target_bits` becomes the layers'
//! average (every overhead counted, weighted by size), and each layer's own target is chosen
//! where it removes the most predicted error per bit.
//!
//! The prediction: each layer's relative output error of round-to-nearest at 2, 3 and 4 bits
//! (asymmetric groups of 32) on the calibration inputs of the unquantized (rotated, when asked)
//! model ([`crate::apq::walk_layers`]), log-linear between widths, read at the code bits NOVAQ's
//! plan gives the layer at each candidate target. Rounding to nearest is not NOVAQ; what ranks
//! the layers is how much their output error weighs and how fast it falls with bits, which the
//! two share. [`crate::apq::allocate_options`] spends the budget, as APQ's widths do.

use crate::apq::{allocate_options, rel_errors, walk_layers};
use crate::calibrate::Blocks;
use adaptq_model::llama::Llama;
use adaptq_quant::novaq::{plan, NovaqConfig};
use adaptq_quant::Grid;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// Per-layer targets the allocation chooses from (bits per weight, overheads included).
pub const CANDIDATES: [f64; 10] = [1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0];

/// Widths of the round-to-nearest probe.
const PROBE: [u8; 3] = [2, 3, 4];

/// The relative error predicted at `bits` from errors measured at [`PROBE`]'s widths:
/// log-linear between neighbours, the nearest segment's slope beyond them.
pub fn predict(errors: &[f64; 3], bits: f64) -> f64 {
    let ln: Vec<f64> = errors.iter().map(|e| e.max(1e-12).ln()).collect();
    let (lo, a, b) = if bits <= 3.0 {
        (2.0, ln[0], ln[1])
    } else {
        (3.0, ln[1], ln[2])
    };
    (a + (bits - lo) * (b - a)).exp()
}

/// A layer's option: `(stored bits, predicted error, target)`.
pub type Layout = (u64, f64, f64);

/// One layer's options by increasing bits, one per distinct plan.
pub fn options(rows: usize, cols: usize, errors: &[f64; 3], cfg: &NovaqConfig) -> Vec<Layout> {
    let mut out: Vec<Layout> = Vec::new();
    for t in CANDIDATES {
        let Ok(p) = plan(
            rows,
            cols,
            &NovaqConfig {
                target_bits: t,
                ..*cfg
            },
        ) else {
            continue;
        };
        let code = p.stages().iter().map(|&b| b as f64).sum::<f64>() / p.dim as f64;
        let bits = p.storage_bits(rows, cols);
        if out.last().is_some_and(|o| o.0 >= bits) {
            continue;
        }
        out.push((bits, predict(errors, code), t));
    }
    out
}

/// Chooses every linear layer's target so their stored bits stay within `cfg.target_bits`
/// times their weights. The tied embedding (walked as the head) is not a NOVAQ layer.
pub fn targets(
    m: &Llama,
    blocks: Blocks,
    windows: &[Vec<u32>],
    cfg: &NovaqConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<String, f64>> {
    // (name, options, weights)
    let mut layers: Vec<(String, Vec<Layout>, usize)> = Vec::new();
    walk_layers(
        m,
        blocks,
        windows,
        false,
        progress,
        &mut |name, w, rows, cols, h, _| {
            if name == m.embed_name {
                return Ok(());
            }
            let e = rel_errors(w, rows, cols, h, &PROBE, 32, Grid::Asymmetric)?;
            let errors = [e[&2], e[&3], e[&4]];
            let o = options(rows, cols, &errors, cfg);
            if o.is_empty() {
                bail!(
                    "no NOVAQ layout of '{name}' ({rows}x{cols}) fits {:?}..{:?} bits",
                    CANDIDATES[0],
                    CANDIDATES[CANDIDATES.len() - 1]
                );
            }
            layers.push((name.to_string(), o, rows * cols));
            Ok(())
        },
    )?;
    let params: usize = layers.iter().map(|l| l.2).sum();
    let budget = (params as f64 * cfg.target_bits).floor() as u64;
    let opts: Vec<Vec<(u64, f64)>> = layers
        .iter()
        .map(|l| l.1.iter().map(|&(b, e, _)| (b, e)).collect())
        .collect();
    let Some((pick, _)) = allocate_options(&opts, budget) else {
        bail!(
            "an average of {} bits per weight cannot hold even the smallest NOVAQ layouts ({} bits each at least)",
            cfg.target_bits,
            CANDIDATES[0]
        );
    };
    Ok(layers
        .into_iter()
        .zip(pick)
        .map(|((name, o, _), i)| (name, o[i].2))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_interpolates_and_extends_the_probe() {
        let e = [0.16, 0.04, 0.01];
        assert!((predict(&e, 2.0) - 0.16).abs() < 1e-12);
        assert!((predict(&e, 2.5) - 0.08).abs() < 1e-12);
        assert!((predict(&e, 4.0) - 0.01).abs() < 1e-12);
        assert!((predict(&e, 1.5) - 0.32).abs() < 1e-12);
    }

    #[test]
    fn options_grow_in_bits_and_shrink_in_error() {
        let cfg = NovaqConfig::default();
        let o = options(576, 1536, &[0.16, 0.04, 0.01], &cfg);
        assert!(o.len() >= 5, "{o:?}");
        for p in o.windows(2) {
            assert!(p[1].0 > p[0].0 && p[1].1 < p[0].1, "{o:?}");
        }
        for &(bits, _, t) in &o {
            assert!(bits as f64 <= t * (576.0 * 1536.0));
        }
    }

    /// Two layers of one shape, one four times as sensitive: it gets the bits, the average
    /// holds.
    #[test]
    fn the_sensitive_layer_gets_the_bits_within_the_average() {
        let cfg = NovaqConfig::default();
        let a = options(576, 576, &[0.4, 0.1, 0.025], &cfg);
        let b = options(576, 576, &[0.1, 0.025, 0.00625], &cfg);
        let n = 576 * 576;
        let budget = (2.0 * n as f64 * 2.5) as u64;
        let opts: Vec<Vec<(u64, f64)>> = [&a, &b]
            .iter()
            .map(|o| o.iter().map(|&(b, e, _)| (b, e)).collect())
            .collect();
        let (pick, used) = allocate_options(&opts, budget).unwrap();
        assert!(used <= budget);
        assert!(
            a[pick[0]].2 > b[pick[1]].2,
            "{:?} {:?}",
            a[pick[0]],
            b[pick[1]]
        );
        assert!(a[pick[0]].2 > 2.5 && b[pick[1]].2 < 2.5);
    }
}

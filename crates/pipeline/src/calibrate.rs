//! Calibration: deterministic windows of calibration text, and GPTQ run layer by layer so each
//! block is calibrated on the outputs of the already-quantized blocks before it.

use adaptq_model::llama::Llama;
use adaptq_quant::gptq::{output_rel_error, quantize_gptq, GptqConfig, Hessian};
use adaptq_quant::{quantize_rtn, QuantizedTensor, RtnConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// How calibration text is sampled; recorded in the manifest and verification.json.
#[derive(Debug, Clone, Serialize)]
pub struct CalibConfig {
    /// File name only (no folder: bundles must not depend on where the user keeps files).
    pub file: String,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibInfo {
    #[serde(flatten)]
    pub config: CalibConfig,
    pub text_tokens: usize,
    /// SHA-256 of the sampled token ids (little-endian u32, windows in order).
    pub fingerprint: String,
}

/// SplitMix64, so sampling is reproducible from the seed alone on every platform.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws `n` windows of `len` tokens at seeded random offsets.
pub fn sample_windows(tokens: &[u32], n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if len < 2 || tokens.len() < len {
        bail!(
            "calibration text has {} tokens, fewer than one window of {len}",
            tokens.len()
        );
    }
    let mut st = seed;
    let span = (tokens.len() - len + 1) as u64;
    Ok((0..n)
        .map(|_| {
            let o = (splitmix(&mut st) % span) as usize;
            tokens[o..o + len].to_vec()
        })
        .collect())
}

pub fn fingerprint(windows: &[Vec<u32>]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for w in windows {
        for t in w {
            h.update(t.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Tokenizes the calibration file and samples its windows.
pub fn prepare(
    tok: &tokenizers::Tokenizer,
    path: &Path,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, CalibInfo)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading calibration text {}", path.display()))?;
    let tokens = adaptq_model::tokenizer::encode(tok, &text)?;
    let windows = sample_windows(&tokens, samples, seq_len, seed)
        .with_context(|| format!("calibration file {}", path.display()))?;
    let info = CalibInfo {
        config: CalibConfig {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            samples,
            seq_len,
            seed,
        },
        text_tokens: tokens.len(),
        fingerprint: fingerprint(&windows),
    };
    Ok((windows, info))
}

/// One calibrated layer: its codes and the output error GPTQ reached vs plain rounding.
pub struct Calibrated {
    pub q: QuantizedTensor,
    /// Hessian-weighted relative output error of the stored weights.
    pub output_rel_error: f64,
    /// The same measure for round-to-nearest at the same config, for comparison.
    pub rtn_output_rel_error: f64,
}

/// Runs GPTQ over every linear layer of `m`, block by block. After a block is quantized its
/// weights are replaced by their reconstructions, and the calibration activations are pushed
/// through the quantized block to become the next block's inputs. `progress(block, blocks)`.
pub fn gptq_llama(
    m: &mut Llama,
    windows: &[Vec<u32>],
    cfg: &GptqConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<String, Calibrated>> {
    let mut xs: Vec<Tensor> = windows.iter().map(|w| m.embed(w)).collect::<Result<_>>()?;
    let mut out = BTreeMap::new();
    let n = m.blocks.len();
    for b in 0..n {
        let mut hs: BTreeMap<String, Hessian> = BTreeMap::new();
        {
            // q, k and v share one input tensor: compute its Gram matrix once.
            let mut last: Option<(candle_core::TensorId, Vec<f32>, usize)> = None;
            let mut hook = |name: &str, x: &Tensor| -> Result<()> {
                let (rows, dim) = x.dims2()?;
                if last.as_ref().is_none_or(|(id, _, _)| *id != x.id()) {
                    let g = x.t()?.matmul(x)?.flatten_all()?.to_vec1::<f32>()?;
                    last = Some((x.id(), g, rows));
                }
                let (_, g, rows) = last.as_ref().expect("set above");
                hs.entry(name.to_string())
                    .or_insert_with(|| Hessian::new(dim))
                    .add_gram(g, *rows);
                Ok(())
            };
            for x in &xs {
                let mut h: Option<adaptq_model::llama::Hook> = Some(&mut hook);
                m.block(b, x, 0, None, &mut h)?;
            }
        }
        for lin in m.blocks[b].linears_mut() {
            let h = hs
                .get(&lin.name)
                .with_context(|| format!("no calibration inputs reached '{}'", lin.name))?;
            let (w, rows, cols) = lin.weight_rows()?;
            let q = quantize_gptq(&w, rows, cols, h, cfg)
                .with_context(|| format!("GPTQ on '{}'", lin.name))?;
            let deq = q.dequantize();
            let rtn = quantize_rtn(
                &w,
                rows,
                cols,
                &RtnConfig {
                    bits: cfg.bits,
                    group_size: cfg.group_size,
                    grid: cfg.grid,
                },
            )?;
            let c = Calibrated {
                output_rel_error: output_rel_error(&w, &deq, cols, h),
                rtn_output_rel_error: output_rel_error(&w, &rtn.dequantize(), cols, h),
                q,
            };
            lin.set_weight(deq)?;
            out.insert(lin.name.clone(), c);
        }
        xs = xs
            .iter()
            .map(|x| m.block(b, x, 0, None, &mut None))
            .collect::<Result<_>>()?;
        progress(b + 1, n);
    }
    Ok(out)
}

/// Loads the model at `path`, samples calibration windows and runs GPTQ on every linear layer.
pub fn run_gptq(
    src: Box<dyn adaptq_source::TensorSource>,
    calib: &Path,
    samples: usize,
    seq_len: usize,
    seed: u64,
    cfg: &GptqConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(BTreeMap<String, Calibrated>, CalibInfo)> {
    let loaded = adaptq_model::load_weights(adaptq_model::from_source(src), "model".into())?;
    let (windows, info) = prepare(&loaded.tokenizer, calib, samples, seq_len, seed)?;
    let mut llama = match loaded.kind {
        adaptq_model::ModelKind::Llama(l) => l,
        adaptq_model::ModelKind::Bert(_) => bail!(
            "GPTQ calibration runs on decoder (Llama-family) models; use --method rtn for BERT"
        ),
    };
    let out = gptq_llama(&mut llama, &windows, cfg, progress)?;
    Ok((out, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn windows_are_seeded_and_in_range() {
        let toks: Vec<u32> = (0..1000).collect();
        let a = sample_windows(&toks, 5, 64, 1).unwrap();
        assert_eq!(a, sample_windows(&toks, 5, 64, 1).unwrap());
        assert_ne!(a, sample_windows(&toks, 5, 64, 2).unwrap());
        for w in &a {
            assert_eq!(w.len(), 64);
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1),
                "a window is a contiguous span"
            );
        }
        assert_ne!(
            fingerprint(&a),
            fingerprint(&sample_windows(&toks, 5, 64, 2).unwrap())
        );
        assert!(sample_windows(&toks[..10], 1, 64, 0).is_err());
    }
}

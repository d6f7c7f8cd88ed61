//! GGUF type mixes: one GGML type per tensor under an overall bits-per-weight budget.
//!
//! Every tensor is counted as llama.cpp counts a file (bytes of every tensor × 8 / parameters),
//! so norms (f32) and any tensor outside the mix are charged at what they are stored as. The
//! mixed tensors — every linear layer, the embedding table and the output head — are profiled
//! like APQ's widths ([`crate::apq::walk_layers`]): for each GGML type their rows fit, the
//! relative output error of rounding onto it (steered by the input Hessian's diagonal) on the
//! unquantized model's calibration inputs (an untied embedding, a lookup, by its plain relative
//! squared error). Types that cost more without lowering the error are dropped, and
//! [`crate::apq::allocate_options`] spends the budget where it removes most error per bit.

use crate::apq::{allocate_options, walk_layers, RelError};
use crate::options::EmbeddingMode;
use adaptq_model::llama::Llama;
use adaptq_quant::ggml::BlockType;
use adaptq_quant::gptq::Hessian;
use adaptq_source::model::role_of;
use adaptq_source::{TensorRole, TensorSource};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// The GGML types a mix chooses from, cheapest first within each block length.
pub const MIX_TYPES: [BlockType; 12] = [
    BlockType::Q2K,
    BlockType::Q3K,
    BlockType::IQ4XS,
    BlockType::IQ4NL,
    BlockType::Q4_0,
    BlockType::Q4K,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5K,
    BlockType::Q5_1,
    BlockType::Q6K,
    BlockType::Q8_0,
];

/// One mixed tensor: what each type it fits would cost and the error it is predicted to make.
#[derive(Debug, Clone, Serialize)]
pub struct TypeProfile {
    pub name: String,
    pub params: usize,
    /// `(type, bits, weighted relative output error)`, by increasing bits; dominated types
    /// (no cheaper and no better than another) are left out.
    pub options: Vec<(BlockType, u64, f64)>,
}

/// The chosen types, with what the choice predicted.
#[derive(Debug, Clone, Serialize)]
pub struct MixPlan {
    pub target_bpw: f64,
    /// The llama-quantize type name `target_bpw` was computed for, when one was given.
    pub like: Option<String>,
    /// Bits per weight of the whole file as planned (every tensor counted).
    pub planned_bpw: f64,
    pub total_params: u64,
    /// Bits of the tensors outside the mix (norms, a separate head, ...).
    pub fixed_bits: u64,
    pub types: BTreeMap<String, BlockType>,
    /// Predicted (weighted) relative output error per mixed tensor at its chosen type.
    pub predicted: BTreeMap<String, f64>,
    pub profile: Vec<TypeProfile>,
}

impl MixPlan {
    /// `(type, tensors, parameters)` per type chosen, in [`MIX_TYPES`] order.
    pub fn histogram(&self) -> Vec<(BlockType, usize, u64)> {
        MIX_TYPES
            .iter()
            .filter_map(|&t| {
                let picked: Vec<&TypeProfile> = self
                    .profile
                    .iter()
                    .filter(|p| self.types.get(&p.name) == Some(&t))
                    .collect();
                (!picked.is_empty()).then(|| {
                    let params = picked.iter().map(|p| p.params as u64).sum();
                    (t, picked.len(), params)
                })
            })
            .collect()
    }
}

/// What a mix is asked for: the overall budget (bits per weight, or the size of the
/// llama-quantize file of a type name), and how tensors outside it are stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixTarget {
    pub target_bpw: Option<f64>,
    pub like: Option<String>,
    pub embeddings: EmbeddingMode,
    /// The types the mix may choose from (a subset of [`MIX_TYPES`]).
    pub types: Vec<BlockType>,
}

impl MixTarget {
    /// The budget in bits per weight for the model in `src`.
    pub fn bpw(&self, src: &dyn TensorSource) -> Result<f64> {
        match (&self.like, self.target_bpw) {
            (Some(name), _) => crate::like::preset_bpw(src, name),
            (None, Some(b)) => Ok(b),
            (None, None) => bail!("a type mix needs a budget: target bits per weight or like"),
        }
    }
}

/// `(parameters, bits)` of the whole model as its GGUF will store it, counting every tensor not
/// in `mixed` at its stored width (norms f32, a separate embedding or head at `embedding`'s
/// type or as `embeddings` says).
pub fn outside_bits(
    src: &dyn TensorSource,
    mixed: &dyn Fn(&str) -> bool,
    embedding: Option<BlockType>,
    embeddings: EmbeddingMode,
) -> Result<(u64, u64)> {
    let (mut params, mut bits) = (0u64, 0u64);
    for info in src.tensors() {
        let n = info.numel() as u64;
        params = params.checked_add(n).context("parameter count overflows")?;
        if mixed(&info.name) {
            continue;
        }
        let cols = *info.shape.last().unwrap_or(&1);
        let b = match role_of(info) {
            _ if !info.dtype.is_float() => info.byte_len as u64 * 8,
            TensorRole::Embedding | TensorRole::Output if info.shape.len() == 2 => {
                match embedding.and_then(|t| t.for_rows(cols)) {
                    Some((t, _)) => t.bytes_for_u64(n).context("tensor size overflows")? * 8,
                    None if embeddings == EmbeddingMode::F16 => n * 16,
                    None => n * 32,
                }
            }
            _ => n * 32,
        };
        bits = bits.checked_add(b).context("bit count overflows")?;
    }
    Ok((params, bits))
}

/// The options of one tensor: each type its rows fit, rounded with the Hessian diagonal as
/// importance, its output error relative to the layer's output energy, times `weight`.
fn options_of(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: Option<&Hessian>,
    weight: f64,
    types: &[BlockType],
    range_search: bool,
) -> Result<Vec<(BlockType, u64, f64)>> {
    let imp = h.map(Hessian::diagonal);
    let rel = RelError::new(w, cols, h);
    let mut all = Vec::new();
    for ty in MIX_TYPES
        .into_iter()
        .filter(|t| types.contains(t) && t.fits(cols))
    {
        let bytes =
            adaptq_quant::ggml::quantize_rtn(ty, w, rows, cols, imp.as_deref(), range_search)?;
        let q = adaptq_quant::ggml::dequantize(ty, &bytes, w.len())?;
        let err = rel.of(&q) * weight;
        all.push((ty, bytes.len() as u64 * 8, err));
    }
    if all.is_empty() {
        bail!(
            "rows of {cols} values fit none of the mix's GGML types ({})",
            types
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    all.sort_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)));
    let mut kept: Vec<(BlockType, u64, f64)> = Vec::new();
    for o in all {
        if kept.last().is_none_or(|k| o.2 < k.2 && o.1 > k.1) {
            kept.push(o);
        }
    }
    Ok(kept)
}

/// What a mix must fit in: the whole file's bits per weight, over every parameter of the model,
/// with the bits of the tensors outside the mix already spent (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub target_bpw: f64,
    pub total_params: u64,
    pub fixed_bits: u64,
}

/// Profiles `m` on `windows` and chooses a type per mixed tensor, among `types`, so the whole
/// file stays within `budget`.
pub fn choose(
    m: &Llama,
    blocks: crate::calibrate::Blocks,
    windows: &[Vec<u32>],
    budget: Budget,
    types: &[BlockType],
    range_search: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MixPlan> {
    let mut profile = Vec::new();
    walk_layers(
        m,
        blocks,
        windows,
        true,
        progress,
        &mut |name, w, rows, cols, h, weight| {
            profile.push(TypeProfile {
                name: name.to_string(),
                params: rows * cols,
                options: options_of(w, rows, cols, h, weight, types, range_search)?,
            });
            Ok(())
        },
    )?;
    plan(profile, budget)
}

/// The allocation step of [`choose`], on a profile already measured.
pub fn plan(profile: Vec<TypeProfile>, budget: Budget) -> Result<MixPlan> {
    let Budget {
        target_bpw,
        total_params,
        fixed_bits,
    } = budget;
    if !(target_bpw.is_finite() && target_bpw > 0.0) {
        bail!("target bits per weight must be a positive number, got {target_bpw}");
    }
    let total_budget = (target_bpw * total_params as f64) as u64;
    let options: Vec<Vec<(u64, f64)>> = profile
        .iter()
        .map(|p| p.options.iter().map(|&(_, b, e)| (b, e)).collect())
        .collect();
    let budget = total_budget.saturating_sub(fixed_bits);
    let Some((pick, used)) = allocate_options(&options, budget) else {
        let need: u64 = options.iter().map(|o| o[0].0).sum::<u64>() + fixed_bits;
        bail!(
            "{target_bpw} bits per weight cannot hold this model as GGUF: its cheapest types \
             need {:.3} (every tensor counted, norms at f32)",
            need as f64 / total_params as f64
        );
    };
    let types = profile
        .iter()
        .zip(&pick)
        .map(|(p, &i)| (p.name.clone(), p.options[i].0))
        .collect();
    let predicted = profile
        .iter()
        .zip(&pick)
        .map(|(p, &i)| (p.name.clone(), p.options[i].2))
        .collect();
    Ok(MixPlan {
        target_bpw,
        like: None,
        planned_bpw: (used + fixed_bits) as f64 / total_params as f64,
        total_params,
        fixed_bits,
        types,
        predicted,
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(name: &str, params: usize, opts: &[(BlockType, f64)]) -> TypeProfile {
        TypeProfile {
            name: name.into(),
            params,
            options: opts
                .iter()
                .map(|&(t, e)| (t, t.bytes_for(params) as u64 * 8, e))
                .collect(),
        }
    }

    #[test]
    fn budget_goes_to_the_sensitive_tensor_and_is_kept() {
        let n = 256 * 64;
        let prof = || {
            vec![
                tp(
                    "sensitive",
                    n,
                    &[
                        (BlockType::Q2K, 1.0),
                        (BlockType::Q4K, 0.1),
                        (BlockType::Q8_0, 0.001),
                    ],
                ),
                tp(
                    "robust",
                    n,
                    &[
                        (BlockType::Q2K, 0.02),
                        (BlockType::Q4K, 0.005),
                        (BlockType::Q8_0, 0.0001),
                    ],
                ),
            ]
        };
        // 64 f32 norm values outside the mix.
        let budget = |target_bpw| Budget {
            target_bpw,
            total_params: (2 * n + 64) as u64,
            fixed_bits: 64 * 32,
        };
        let p = plan(prof(), budget(4.0)).unwrap();
        assert_eq!(p.types["sensitive"], BlockType::Q4K);
        assert_eq!(p.types["robust"], BlockType::Q2K);
        assert!(p.planned_bpw <= 4.0, "{}", p.planned_bpw);
        let p = plan(prof(), budget(9.0)).unwrap();
        assert_eq!(p.types["sensitive"], BlockType::Q8_0);
        assert!(
            plan(prof(), budget(2.0)).is_err(),
            "below the cheapest types"
        );
    }
}

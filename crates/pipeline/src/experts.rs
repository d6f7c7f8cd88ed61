//! Calibration statistics for mixture-of-experts blocks.
//!
//! Each expert's input Hessian comes from the calibration tokens the router sends it, not
//! weighted by the router's probability: GPTQ minimizes the expert's own output error, and
//! the probability scales that output after the fact, so weighting would only shrink the
//! statistics of tokens the expert half-serves. An expert reached by fewer tokens than its
//! input width has a rank-deficient Hessian (GPTQ would fit the few tokens it saw and damping
//! would decide the rest); such an expert gets the statistics of every calibration token
//! entering the block run through it, added to those of its routed tokens. An expert no token
//! reaches is quantized on all-token statistics alone: never skipped, never left in float.
//! `verification.json` lists, per expert, its routed tokens and the rule used.

use crate::acts::Windows;
use adaptq_model::llama::{Block, Llama};
use adaptq_quant::gptq::Hessian;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::rc::Rc;

/// Statistics from the routed tokens alone.
pub const ROUTED: &str = "routed";
/// Routed tokens plus every token entering the block.
pub const WITH_ALL_TOKENS: &str = "routed+all-tokens";

/// How one expert was calibrated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpertRecord {
    pub block: usize,
    pub expert: usize,
    /// Calibration tokens the router sent to the expert.
    pub tokens: usize,
    /// [`ROUTED`] or [`WITH_ALL_TOKENS`].
    pub rule: String,
}

/// `xᵀx` of activations `x: [rows, dim]`, row-major.
pub(crate) fn gram(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.t()?.matmul(x)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Completes `hs` (input Hessians by layer name, from the routed tokens) for block `b`'s
/// experts as the module says, and records the rule each expert got. Nothing for a dense block.
pub fn complete(
    m: &Llama,
    blk: &Block,
    b: usize,
    xs: &dyn Windows,
    hs: &mut BTreeMap<String, Rc<Hessian>>,
) -> Result<Vec<ExpertRecord>> {
    let Some(e) = blk.experts() else {
        return Ok(Vec::new());
    };
    let all = hs
        .get(&e.router.name)
        .with_context(|| format!("no calibration inputs reached '{}'", e.router.name))?
        .clone();
    let mut records = Vec::with_capacity(e.experts.len());
    let mut starved = Vec::new();
    for (j, x) in e.experts.iter().enumerate() {
        let tokens = hs.get(&x.gate.name).map_or(0, |h| h.rows());
        let rule = match tokens < x.gate.cols() {
            true => {
                starved.push(j);
                WITH_ALL_TOKENS
            }
            false => ROUTED,
        };
        records.push(ExpertRecord {
            block: b,
            expert: j,
            tokens,
            rule: rule.into(),
        });
    }
    if starved.is_empty() {
        return Ok(records);
    }
    let mut down: Vec<Hessian> = starved
        .iter()
        .map(|&j| Hessian::new(e.experts[j].down.cols()))
        .collect();
    xs.each(&mut |x| {
        let h = m.mlp_input(blk, b, x)?;
        for (&j, acc) in starved.iter().zip(&mut down) {
            let mid = e.experts[j].mid(&h)?;
            acc.add_gram(&gram(&mid)?, mid.dims2()?.0);
        }
        Ok(())
    })?;
    for (&j, d) in starved.iter().zip(down) {
        let x = &e.experts[j];
        // gate and up read one input: one Hessian, shared as collect_stats shares it.
        let mut gu = hs
            .get(&x.gate.name)
            .map_or(Hessian::new(all.dim), |h| (**h).clone());
        gu.add(&all);
        let gu = Rc::new(gu);
        hs.insert(x.gate.name.clone(), gu.clone());
        hs.insert(x.up.name.clone(), gu);
        let mut dh = hs
            .get(&x.down.name)
            .map_or(Hessian::new(d.dim), |h| (**h).clone());
        dh.add(&d);
        hs.insert(x.down.name.clone(), Rc::new(dh));
    }
    Ok(records)
}

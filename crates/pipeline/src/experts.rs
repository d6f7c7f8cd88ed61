//! Calibration statistics for mixture-of-experts blocks.
//!
//! Each expert's input Hessian comes from the calibration tokens the router sends it, not
//! weighted by the router's probability: GPTQ minimizes the expert's own output error, and
//! the probability scales that output after the fact, so weighting would only shrink the
//! statistics of tokens the expert half-serves. An expert reached by fewer tokens than one of
//! its input widths has a rank-deficient Hessian (GPTQ would fit the few tokens it saw and damping
//! would decide the rest); such an expert gets the statistics of every calibration token
//! entering the block run through it, added to those of its routed tokens. An expert no token
//! reaches is quantized on all-token statistics alone: never skipped, never left in float.
//! `verification.json` lists, per expert, its routed tokens and the rule used.
//!
//! The statistics pass keeps the block's MLP inputs rather than every expert's Hessian; each
//! expert's are built just before it is rounded and freed after, so a block's experts never
//! hold their Hessians at once.

use crate::acts::{Acts, Spill, Windows};
use adaptq_model::llama::moe::Experts;
use adaptq_model::llama::Block;
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

/// Adds activations `x: [rows, dim]` (f32) to `h`'s statistics.
pub(crate) fn add_inputs(h: &mut Hessian, x: &Tensor) -> Result<()> {
    h.add_inputs(&x.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// What a mixture block's statistics pass keeps so each expert's Hessians can be built when
/// the expert's turn comes: one expert's at a time (a 14336-wide expert's down projection
/// alone has a 1.6 GB Hessian, and Mixtral has 8 per block).
pub struct Routing {
    block: usize,
    /// The MLP input of each calibration window (what the router and every expert read),
    /// held or spilled as the block's inputs are.
    inputs: Acts,
    /// Per window, the rows the router sent each expert.
    routes: Vec<Vec<Vec<u32>>>,
    /// The inputs' Hessian: the router's, which is every token entering the block.
    all: Option<Rc<Hessian>>,
}

impl Routing {
    /// An empty record for block `block`, its MLP inputs placed as `bytes` of them fit under
    /// `spill`.
    pub fn new(block: usize, bytes: u64, spill: Option<&Spill>) -> Result<Routing> {
        Ok(Routing {
            block,
            inputs: Acts::sink(bytes, spill)?,
            routes: Vec::new(),
            all: None,
        })
    }

    /// Records one window's MLP input `h` and where the router sends its rows.
    pub fn push(&mut self, e: &Experts, h: &Tensor) -> Result<()> {
        self.routes.push(e.routed_rows(h)?);
        self.inputs.push(h)
    }

    /// Sets the inputs' Hessian once the pass is over.
    pub fn set_all(&mut self, all: Rc<Hessian>) {
        self.all = Some(all);
    }

    /// Expert `j`'s Hessians (gate and up share one; down's), as the module says, and the
    /// record of how they were built. An expert routed fewer tokens than either of its input
    /// widths (the hidden size, its own width) takes the all-token statistics too.
    pub fn expert(&self, e: &Experts, j: usize) -> Result<(Hessian, Hessian, ExpertRecord)> {
        let x = &e.experts[j];
        let (mut gu, mut down) = (Hessian::new(x.gate.cols()), Hessian::new(x.down.cols()));
        let mut w = 0;
        self.inputs.each(&mut |h| {
            let rows = self.routes[w].get(j).cloned().unwrap_or_default();
            w += 1;
            if rows.is_empty() {
                return Ok(());
            }
            let n = rows.len();
            let xj = h.index_select(&Tensor::from_vec(rows, n, h.device())?, 0)?;
            add_inputs(&mut gu, &xj)?;
            add_inputs(&mut down, &x.mid(&xj)?)?;
            Ok(())
        })?;
        let tokens = gu.rows();
        let rule = match tokens < x.gate.cols().max(x.down.cols()) {
            true => {
                let all = self
                    .all
                    .as_ref()
                    .context("the router's statistics are missing")?;
                gu.add(all);
                self.inputs
                    .each(&mut |h| add_inputs(&mut down, &x.mid(h)?))?;
                WITH_ALL_TOKENS
            }
            false => ROUTED,
        };
        let record = ExpertRecord {
            block: self.block,
            expert: j,
            tokens,
            rule: rule.into(),
        };
        Ok((gu, down, record))
    }
}

/// Before layer `name` of `blk` is rounded: when it is the first layer of an expert (its
/// gate), builds that expert's Hessians into `hs` under its three layers' names and returns
/// its record. Nothing for any other layer.
pub fn before_layer(
    routing: Option<&Routing>,
    blk: &Block,
    name: &str,
    hs: &mut BTreeMap<String, Rc<Hessian>>,
) -> Result<Option<ExpertRecord>> {
    let (Some(r), Some(e)) = (routing, blk.experts()) else {
        return Ok(None);
    };
    let Some(j) = e.experts.iter().position(|x| x.gate.name == name) else {
        return Ok(None);
    };
    let (gu, down, record) = r.expert(e, j)?;
    let x = &e.experts[j];
    let gu = Rc::new(gu);
    hs.insert(x.gate.name.clone(), gu.clone());
    hs.insert(x.up.name.clone(), gu);
    hs.insert(x.down.name.clone(), Rc::new(down));
    Ok(Some(record))
}

/// Names of expert `j`'s layers: gate, up, down.
pub fn expert_layers_of(blk: &Block, j: usize) -> Vec<String> {
    blk.experts()
        .and_then(|e| e.experts.get(j))
        .map(|x| vec![x.gate.name.clone(), x.up.name.clone(), x.down.name.clone()])
        .unwrap_or_default()
}

/// Names of `blk`'s routed experts' layers, whose statistics [`Routing`] builds (a shared
/// expert reads every token and is collected like a dense MLP).
pub fn expert_layers(blk: &Block) -> std::collections::BTreeSet<String> {
    blk.experts()
        .into_iter()
        .flat_map(|e| &e.experts)
        .flat_map(|x| [&x.gate.name, &x.up.name, &x.down.name])
        .cloned()
        .collect()
}

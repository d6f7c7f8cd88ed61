//! APQ: per-layer widths from measured sensitivity under a size budget, then fail-safe
//! promotion of the worst layers until a perplexity gate passes.
//!
//! Sensitivity: for every linear layer and every candidate width, the relative output error
//! `Σ Δw H Δwᵀ / Σ w H wᵀ` of round-to-nearest on the unquantized model's calibration inputs
//! (the embedding table, tied to the head, is measured on the head's inputs). The allocator
//! minimises the sum of these predicted errors under the bit budget by greedy upgrades in order
//! of error removed per bit spent, which is optimal for convex error curves.

use crate::calibrate::{collect_stats, Blocks, CalibSpec, Calibration, Rounding};
use adaptq_model::llama::Llama;
use adaptq_quant::awq::output_sq_error;
use adaptq_quant::gptq::Hessian;
use adaptq_quant::{quantize_rtn, Grid, RtnConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use faer::Mat;
use serde::Serialize;
use std::collections::BTreeMap;

/// Widths APQ chooses from.
pub const CANDIDATES: [u8; 6] = [2, 3, 4, 5, 6, 8];

#[derive(Debug, Clone, Serialize)]
pub struct LayerProfile {
    pub name: String,
    pub params: usize,
    pub groups: usize,
    /// Relative output error of round-to-nearest at each candidate width.
    pub errors: BTreeMap<u8, f64>,
}

/// The relative error of replacing a tensor `w` by `q`: of the layer's output under its input
/// Hessian, `Σ Δw H Δwᵀ / Σ w H wᵀ`, or for a lookup table (no input statistics) the plain
/// `Σ Δw² / Σ w²`.
pub(crate) struct RelError<'a> {
    w: &'a [f32],
    cols: usize,
    h: Option<Mat<f64>>,
    energy: f64,
}

impl<'a> RelError<'a> {
    pub(crate) fn new(w: &'a [f32], cols: usize, h: Option<&Hessian>) -> Self {
        let h = h.map(|h| {
            let hm = h.matrix();
            Mat::<f64>::from_fn(cols, cols, |i, j| hm[i * cols + j])
        });
        let mut r = RelError {
            w,
            cols,
            h,
            energy: 1.0,
        };
        r.energy = r.sq_error(&vec![0f32; w.len()]).max(1e-30);
        r
    }

    fn sq_error(&self, q: &[f32]) -> f64 {
        match &self.h {
            Some(m) => output_sq_error(self.w, q, self.cols, m),
            None => self
                .w
                .iter()
                .zip(q)
                .map(|(&a, &b)| ((a - b) as f64).powi(2))
                .sum(),
        }
    }

    pub(crate) fn of(&self, q: &[f32]) -> f64 {
        self.sq_error(q) / self.energy
    }
}

pub(crate) fn rel_errors(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: Option<&Hessian>,
    widths: &[u8],
    group_size: usize,
    grid: Grid,
) -> Result<BTreeMap<u8, f64>> {
    let rel = RelError::new(w, cols, h);
    let mut out = BTreeMap::new();
    for &b in widths {
        let q = quantize_rtn(
            w,
            rows,
            cols,
            &RtnConfig {
                bits: b,
                group_size,
                grid,
            },
        )?;
        out.insert(b, rel.of(&q.dequantize()));
    }
    Ok(out)
}

/// What [`walk_layers`] calls per tensor: `(name, weight, rows, cols, input Hessian (none for an
/// embedding table, a lookup), weight of its error)`.
pub type Visit<'a> =
    dyn FnMut(&str, &[f32], usize, usize, Option<&Hessian>, f64) -> Result<()> + 'a;

/// Visits every linear layer (and a tied embedding, on the head's inputs) of the unquantized
/// model with its weight and input Hessian, block by block: `visit(name, w, rows, cols, h,
/// weight)`, `weight` being how much the tensor's relative error counts. With `untied_ends` an
/// untied model's head (on its inputs) and embedding table (plain squared error: a lookup has
/// no input statistics) are visited too. APQ's widths and the GGUF type mix profile through it.
pub fn walk_layers(
    m: &Llama,
    blocks: crate::calibrate::Blocks,
    windows: &[Vec<u32>],
    untied_ends: bool,
    progress: &mut dyn FnMut(usize, usize),
    visit: &mut Visit,
) -> Result<()> {
    let mut xs: Vec<Tensor> = windows.iter().map(|w| m.embed(w)).collect::<Result<_>>()?;
    let n = blocks.count(m);
    for b in 0..n {
        let mut slot = None;
        let blk = blocks.get(m, b, &mut slot)?;
        let (mut hs, _, routing) = collect_stats(m, blk, b, &xs, None)?;
        for lin in blk.linears() {
            crate::experts::before_layer(routing.as_ref(), blk, &lin.name, &mut hs)?;
            let (w, rows, cols) = lin.weight_rows()?;
            // Taken out: an expert's Hessians live only while its layers are visited.
            let h = hs
                .remove(&lin.name)
                .with_context(|| format!("no calibration inputs reached '{}'", lin.name))?;
            visit(&lin.name, &w, rows, cols, Some(h.as_ref()), 1.0)?;
        }
        xs = xs
            .iter()
            .map(|x| m.block_with(blk, b, x, 0, None, &mut None))
            .collect::<Result<_>>()?;
        progress(b + 1, n + 1);
    }
    if m.tied() || untied_ends {
        let (rows, cols) = m.embed_dims();
        let h = crate::calibrate::head_hessian(m, &xs)?;
        // The head makes every logit (and a tied table is every token's input too): its error
        // reaches the output undamped, where a block's is one of n in the residual stream.
        // Weighting it as much as all blocks together is a heuristic, recorded here.
        if m.tied() {
            visit(
                &m.embed_name,
                &m.embedding_rows()?,
                rows,
                cols,
                Some(&h),
                n as f64,
            )?;
        } else {
            let head = match blocks {
                crate::calibrate::Blocks::Held => m.head_rows()?,
                crate::calibrate::Blocks::Stream(w) => w.read(&m.head_name)?,
            };
            visit(&m.head_name, &head, rows, cols, Some(&h), n as f64)?;
            visit(&m.embed_name, &m.embedding_rows()?, rows, cols, None, 1.0)?;
        }
    }
    progress(n + 1, n + 1);
    Ok(())
}

/// Measures every layer's sensitivity on the unquantized model.
pub fn profile(
    m: &Llama,
    windows: &[Vec<u32>],
    widths: &[u8],
    group_size: usize,
    grid: Grid,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerProfile>> {
    let gpr = |cols: usize| adaptq_quant::groups_per_row(cols, group_size);
    let mut out = Vec::new();
    walk_layers(
        m,
        crate::calibrate::Blocks::Held,
        windows,
        false,
        progress,
        &mut |name, w, rows, cols, h, weight| {
            out.push(LayerProfile {
                name: name.to_string(),
                params: rows * cols,
                groups: rows * gpr(cols),
                errors: rel_errors(w, rows, cols, h, widths, group_size, grid)?
                    .into_iter()
                    .map(|(b, e)| (b, e * weight))
                    .collect(),
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Bits a layer costs at width `b`: codes plus f16 scale (and f16 min when asymmetric) per group.
pub fn layer_bits(p: &LayerProfile, b: u8, grid: Grid) -> u64 {
    let per_group = if grid == Grid::Asymmetric { 32 } else { 16 };
    p.params as u64 * b as u64 + p.groups as u64 * per_group
}

/// Chooses one option per item so the summed cost stays within `budget`, minimising the summed
/// error: every item starts at its first option, then the move of one item to any costlier option
/// that removes the most error per extra bit is taken until none fits or none gains (ties: earlier
/// item, then the cheaper option). Any costlier option, not only the next: with a dozen GGML
/// types, an option barely better than the one below it must not hide a much better one above
/// it. `options[i]` is item i's `(bits, error)` list in order of increasing bits. Returns the
/// chosen index per item and the bits used, or `None` when even the first options overrun.
pub fn allocate_options(options: &[Vec<(u64, f64)>], budget: u64) -> Option<(Vec<usize>, u64)> {
    let mut pick = vec![0usize; options.len()];
    let mut used: u64 = options.iter().map(|o| o[0].0).sum();
    if used > budget {
        return None;
    }
    loop {
        let mut best: Option<(f64, usize, usize, u64)> = None;
        for (i, o) in options.iter().enumerate() {
            let (cur_bits, cur_err) = o[pick[i]];
            for (j, &(next_bits, next_err)) in o.iter().enumerate().skip(pick[i] + 1) {
                let extra = next_bits.saturating_sub(cur_bits);
                if used + extra > budget {
                    continue;
                }
                let gain = (cur_err - next_err) / extra.max(1) as f64;
                if best.is_none_or(|(g, ..)| gain > g) {
                    best = Some((gain, i, j, extra));
                }
            }
        }
        let Some((gain, i, j, extra)) = best else {
            break;
        };
        if gain <= 0.0 {
            break;
        }
        pick[i] = j;
        used += extra;
    }
    Some((pick, used))
}

/// Chooses a width per layer so the total stays within `budget_bits`, minimising the summed
/// predicted error. Starts every layer at the narrowest width; fails if even that does not fit.
pub fn allocate(
    profiles: &[LayerProfile],
    budget_bits: u64,
    grid: Grid,
) -> Result<BTreeMap<String, u8>> {
    let options: Vec<Vec<(u64, f64)>> = profiles
        .iter()
        .map(|p| {
            p.errors
                .iter()
                .map(|(&b, &e)| (layer_bits(p, b, grid), e))
                .collect()
        })
        .collect();
    let params = profiles.iter().map(|p| p.params).sum::<usize>() as f64;
    let Some((pick, _)) = allocate_options(&options, budget_bits) else {
        let narrowest = profiles
            .iter()
            .filter_map(|p| p.errors.keys().next())
            .min()
            .unwrap_or(&0);
        let need: u64 = options.iter().map(|o| o[0].0).sum();
        bail!(
            "the budget of {:.3} bits per weight cannot hold even {narrowest}-bit codes everywhere ({:.3} needed)",
            budget_bits as f64 / params,
            need as f64 / params
        );
    };
    Ok(profiles
        .iter()
        .zip(pick)
        .map(|(p, i)| (p.name.clone(), *p.errors.keys().nth(i).expect("an option")))
        .collect())
}

/// One promotion round: which layers were widened and the perplexity gate's reading after it.
#[derive(Debug, Clone, Serialize)]
pub struct Promotion {
    pub round: usize,
    pub promoted: Vec<(String, u8, u8)>,
    pub heldout_ppl_delta_pct: f64,
    pub bits_per_weight: f64,
}

/// Widens the `k` layers with the largest output error to their next candidate width and
/// re-quantizes them with their stored Hessians. Returns what changed (empty: nothing to do).
pub fn promote(
    m: &mut Llama,
    cal: &mut Calibration,
    spec: &mut CalibSpec,
    k: usize,
) -> Result<Vec<(String, u8, u8)>> {
    let mut cands: Vec<(f64, String)> = cal
        .layers
        .iter()
        .filter(|(n, c)| c.output_rel_error.is_finite() && cal.hessians.contains_key(*n))
        .filter(|(n, _)| spec.width(n) < *CANDIDATES.last().unwrap())
        .map(|(n, c)| (c.output_rel_error, n.clone()))
        .collect();
    cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut changed = Vec::new();
    for (_, name) in cands.into_iter().take(k) {
        let from = spec.width(&name);
        let to = *CANDIDATES
            .iter()
            .find(|&&b| b > from)
            .expect("filtered above");
        spec.widths.insert(name.clone(), to);
        let h = &cal.hessians[&name];
        let lin = m
            .blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .find(|l| l.name == name)
            .expect("layer of this model");
        let c = cal.layers.get_mut(&name).expect("listed");
        // Re-quantize the (scaled) weight the codes stand for, not the reconstruction.
        let (rows, cols) = (c.q.rows(), c.q.cols());
        let w = c.scaled_weight.clone().expect("kept with hessians");
        let q = spec.round_reporting(&w, rows, cols, h, to)?.0;
        let deq = q.dequantize();
        c.output_rel_error = adaptq_quant::gptq::output_rel_error(&w, &deq, cols, h);
        c.q = adaptq_quant::LayerCodes::Int(q);
        lin.set_weight(deq)?;
        changed.push((name, from, to));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, params: usize, e: &[(u8, f64)]) -> LayerProfile {
        LayerProfile {
            name: name.into(),
            params,
            groups: params / 128,
            errors: e.iter().copied().collect(),
        }
    }

    #[test]
    fn allocation_spends_bits_where_they_remove_most_error() {
        let ps = vec![
            p(
                "sensitive",
                1280,
                &[(2, 1.0), (3, 0.3), (4, 0.08), (8, 0.001)],
            ),
            p(
                "robust",
                1280,
                &[(2, 0.05), (3, 0.012), (4, 0.003), (8, 0.0001)],
            ),
        ];
        // Room for 3.5 bits on average plus scales.
        let budget = (2 * 1280) as u64 * 35 / 10 + 2 * 10 * 16;
        let w = allocate(&ps, budget, Grid::Symmetric).unwrap();
        assert!(w["sensitive"] > w["robust"], "{w:?}");
        let used: u64 = ps
            .iter()
            .map(|x| layer_bits(x, w[&x.name], Grid::Symmetric))
            .sum();
        assert!(used <= budget);
        // An impossible budget is an error, not a silent overrun.
        assert!(allocate(&ps, 1000, Grid::Symmetric).is_err());
    }

    #[test]
    fn allocation_jumps_past_an_option_that_barely_helps() {
        // Item 0's middle option removes almost nothing; its last removes nearly everything.
        // A next-option-only greedy would spend the budget on item 1 instead.
        let options = vec![
            vec![(100, 1.0), (110, 0.99), (150, 0.01)],
            vec![(100, 0.5), (150, 0.4)],
        ];
        let (pick, used) = allocate_options(&options, 250).unwrap();
        assert_eq!(pick, vec![2, 0]);
        assert_eq!(used, 250);
        // Over budget from the start: None.
        assert!(allocate_options(&options, 199).is_none());
    }
}

/// Perplexity of `m` on `windows`, every position scored (the held-out gate's measure).
pub fn heldout_ppl(m: &Llama, windows: &[Vec<u32>]) -> Result<f64> {
    let mut s = adaptq_eval::Scorer::default();
    for w in windows {
        let logits = m.forward(w, None, None)?.to_vec2::<f32>()?;
        s.add(&logits[..w.len() - 1], &w[1..]);
    }
    Ok(s.ppl().0)
}

/// APQ's settings, resolved from the options.
#[derive(Debug, Clone, Serialize)]
pub struct ApqSettings {
    /// Overall bits per weight, every tensor (embeddings, head, norms) counted.
    pub target_bpw: f64,
    /// Allowed widths (subset of [`CANDIDATES`]).
    pub widths: Vec<u8>,
    pub group_size: usize,
    pub grid: Grid,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub range_search: bool,
    #[serde(flatten)]
    pub transforms: crate::options::TransformOptions,
    #[serde(flatten)]
    pub gptq: crate::options::GptqSettings,
    /// Promotion stops before overall bits per weight would pass this.
    pub max_bpw: Option<f64>,
    #[serde(flatten)]
    pub promotion: crate::options::Promotion,
    /// Gold prompts for the spot-check gate (greedy continuations vs the unquantized model).
    pub gold_prompts: Vec<String>,
    pub gold_tokens: usize,
    /// The embedding table (and a separate head) held at this width; the budget left is
    /// allocated over the linear layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_bits: Option<u8>,
}

/// What APQ produced: the calibration (codes, folded norms), sampling info, the sections for
/// verification.json and the gates it measured.
pub struct ApqOutcome {
    pub cal: Calibration,
    pub info: crate::calibrate::CalibInfo,
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub gates: Vec<crate::quantize::Gate>,
}

fn bpw_of(
    profiles: &[LayerProfile],
    spec: &CalibSpec,
    other_bits: u64,
    total: u64,
    grid: Grid,
) -> f64 {
    let q: u64 = profiles
        .iter()
        .map(|p| layer_bits(p, spec.width(&p.name), grid))
        .sum();
    (q + other_bits) as f64 / total as f64
}

/// The candidate widths among `asked`, in candidate order.
fn allowed_widths(asked: &[u8]) -> Result<Vec<u8>> {
    let w: Vec<u8> = CANDIDATES
        .iter()
        .copied()
        .filter(|b| asked.contains(b))
        .collect();
    if w.is_empty() {
        bail!("no APQ width in {asked:?} (candidates: {CANDIDATES:?})");
    }
    Ok(w)
}

/// Sizes that decide the overall bits per weight of an allocation.
struct Size<'a> {
    profiles: &'a [LayerProfile],
    /// Bits of what APQ does not quantize (norms), and every parameter counted.
    other_bits: u64,
    total: u64,
}

fn pass(ok: bool) -> adaptq_bundle::GateStatus {
    adaptq_bundle::GateStatus::of(ok)
}

/// Promotes the worst layers a round at a time until the held-out perplexity is within the
/// gate, every layer is at the widest width, the rounds run out, or the size budget would be
/// passed (then the last round is undone). Returns the final perplexity, the rounds and why
/// promotion stopped.
#[allow(clippy::too_many_arguments)]
fn promote_until_gate(
    m: &mut Llama,
    cal: &mut Calibration,
    spec: &mut CalibSpec,
    s: &ApqSettings,
    size: &Size,
    held: &[Vec<u32>],
    base_ppl: f64,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(f64, Vec<Promotion>, String)> {
    let mut ppl = heldout_ppl(m, held)?;
    let delta = |p: f64| (p / base_ppl - 1.0) * 100.0;
    let mut rounds = Vec::new();
    let mut stop_reason = "gate passed".to_string();
    for round in 1..=s.promotion.max_rounds {
        if delta(ppl) <= s.promotion.max_ppl_delta {
            break;
        }
        if round == s.promotion.max_rounds {
            stop_reason = format!("{} promotion rounds used", s.promotion.max_rounds);
        }
        let before = spec.clone();
        let changed = promote(m, cal, spec, s.promotion.promote_per_round)?;
        if changed.is_empty() {
            stop_reason = "every layer is at the widest width".into();
            break;
        }
        let bpw = bpw_of(size.profiles, spec, size.other_bits, size.total, s.grid);
        if s.max_bpw.is_some_and(|mx| bpw > mx) {
            // Undo: the size budget wins over the quality gate, and the gate reports FAIL.
            undo(m, cal, &before, &changed)?;
            *spec = before;
            stop_reason = "size budget (max_bpw) exhausted".into();
            break;
        }
        ppl = heldout_ppl(m, held)?;
        progress("promote", round, s.promotion.max_rounds);
        rounds.push(Promotion {
            round,
            promoted: changed,
            heldout_ppl_delta_pct: delta(ppl),
            bits_per_weight: bpw,
        });
    }
    Ok((ppl, rounds, stop_reason))
}

/// Puts promoted layers back at their previous width, in the codes and in the model.
fn undo(
    m: &mut Llama,
    cal: &mut Calibration,
    before: &CalibSpec,
    changed: &[(String, u8, u8)],
) -> Result<()> {
    for (name, from, _) in changed {
        let h = &cal.hessians[name];
        let c = cal.layers.get_mut(name).expect("promoted layer");
        let w = c.scaled_weight.clone().expect("kept");
        let (rows, cols) = (c.q.rows(), c.q.cols());
        let q = before.round_reporting(&w, rows, cols, h, *from)?.0;
        let deq = q.dequantize();
        c.output_rel_error = adaptq_quant::gptq::output_rel_error(&w, &deq, cols, h);
        c.q = adaptq_quant::LayerCodes::Int(q);
        m.blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .find(|l| &l.name == name)
            .expect("layer")
            .set_weight(deq)?;
    }
    Ok(())
}

/// Layer-error outliers: log10 relative output error above Q3 + 3 IQR.
fn outlier_gate(cal: &Calibration) -> crate::quantize::Gate {
    let mut errs: Vec<(f64, &String)> = cal
        .layers
        .iter()
        .filter(|(_, c)| c.output_rel_error.is_finite() && c.output_rel_error > 0.0)
        .map(|(n, c)| (c.output_rel_error.log10(), n))
        .collect();
    errs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let q = |f: f64| errs[((errs.len() - 1) as f64 * f) as usize].0;
    let fence = q(0.75) + 3.0 * (q(0.75) - q(0.25));
    let outliers: Vec<String> = errs
        .iter()
        .filter(|(e, _)| *e > fence)
        .map(|(e, n)| format!("{n} ({:.4})", 10f64.powf(*e)))
        .collect();
    crate::quantize::Gate {
        name: "layer_error_outliers".into(),
        status: pass(outliers.is_empty()),
        detail: if outliers.is_empty() {
            format!("no layer's output error above 10^{fence:.2} (Q3 + 3 IQR of log10 errors)")
        } else {
            format!("above 10^{fence:.2}: {}", outliers.join(", "))
        },
    }
}

/// Determinism: the first layer re-quantized from the same inputs gives the same codes.
fn determinism_gate(cal: &Calibration, spec: &CalibSpec) -> Result<Option<crate::quantize::Gate>> {
    let Some((name, c)) = cal
        .layers
        .iter()
        .find(|(n, _)| cal.hessians.contains_key(*n))
    else {
        return Ok(None);
    };
    let w = c.scaled_weight.as_ref().expect("kept");
    let (rows, cols) = (c.q.rows(), c.q.cols());
    let again = spec
        .round_reporting(w, rows, cols, &cal.hessians[name], spec.width(name))?
        .0;
    let same = c.q.as_int() == Some(&again);
    Ok(Some(crate::quantize::Gate {
        name: "determinism".into(),
        status: pass(same),
        detail: format!(
            "'{name}' re-quantized from the same inputs gives identical codes and scales: {same}"
        ),
    }))
}

/// The gold-prompt gate, when there are gold prompts.
fn gold_gate(
    gold: &[adaptq_model::generate::SpotCheck],
    tokens: usize,
) -> Option<crate::quantize::Gate> {
    if gold.is_empty() {
        return None;
    }
    let fails = gold.iter().filter(|c| c.status == "FAIL").count();
    let agree = gold.iter().map(|c| c.token_agreement).sum::<f64>() / gold.len() as f64;
    Some(crate::quantize::Gate {
        name: "gold_prompts".into(),
        status: pass(fails == 0),
        detail: format!(
            "{} gold prompts, {tokens} greedy tokens each: {:.1}% of the unquantized model's tokens reproduced; {fails} failed (looping or silent where the unquantized model is not)",
            gold.len(),
            agree * 100.0
        ),
    })
}

/// GPTQ at the allocated widths, the narrowest for a layer not listed.
fn spec_of(
    s: &ApqSettings,
    bits: u8,
    widths: BTreeMap<String, u8>,
    rotate: Option<u64>,
) -> CalibSpec {
    CalibSpec {
        bits,
        group_size: s.group_size,
        grid: s.grid,
        rounding: Rounding::Gptq(s.gptq),
        awq: s.transforms.awq,
        widths,
        embed_bits: s.embed_bits,
        keep_hessians: true,
        refit: s.transforms.refit,
        ggml: None,
        rotate,
        range_search: s.range_search,
        entropy_step: None,
        embed_step: None,
        ggml_types: Default::default(),
        mix: None,
        novaq_spread: false,
        novaq_targets: Default::default(),
    }
}

/// The whole APQ pipeline on a decoder model: profile, allocate, calibrate (AWQ/GPTQ at the
/// chosen widths), then promote the worst layers until the held-out perplexity gate passes or
/// the size budget / round limit is reached. `progress(stage, done, total)`.
pub fn run(
    src: &dyn adaptq_source::TensorSource,
    calib: &std::path::Path,
    samples: usize,
    seq_len: usize,
    seed: u64,
    s: &ApqSettings,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<ApqOutcome> {
    use crate::calibrate::sample_windows;
    use crate::quantize::Gate;
    let loaded = adaptq_model::load_weights(adaptq_model::borrowed_source(src), "model".into())?;
    let tokens = crate::calibrate::read_tokens(&loaded.tokenizer, calib)?;
    let mut loaded = loaded;
    // Gold prompts: the unquantized model's greedy continuations, to compare with at the end.
    let gold_opts = adaptq_model::generate::Options {
        max_tokens: s.gold_tokens,
        temperature: 0.0,
        seed: 0,
    };
    let gold_ref = s
        .gold_prompts
        .iter()
        .map(|p| adaptq_model::generate::generate(&loaded, p, &gold_opts, &mut |_| {}))
        .collect::<Result<Vec<_>>>()?;
    let m = match &mut loaded.kind {
        adaptq_model::ModelKind::Llama(l) => l,
        adaptq_model::ModelKind::Bert(_) => bail!("APQ runs on decoder (Llama-family) models"),
    };
    // The last tenth of the text is held out: the gate never sees calibration tokens.
    let cut = tokens.len() * 9 / 10;
    let mut windows = sample_windows(&tokens[..cut], samples, seq_len, seed)?;
    let mut held = sample_windows(
        &tokens[cut..],
        s.promotion.heldout_windows,
        seq_len,
        seed ^ 0x5EED,
    )?;
    // Rotated first, so the profile measures the weights the codes will hold (W·R on rotated
    // inputs); the function, and so the held-out perplexity, does not change.
    let rotate = s.transforms.rotate.then_some(seed);
    if let Some(seed) = rotate {
        m.rotate(seed)?;
    }
    crate::calibrate::bos_first(&mut windows, m.desc.decoder.bos);
    crate::calibrate::bos_first(&mut held, m.desc.decoder.bos);
    let info = crate::calibrate::calib_info(calib, seq_len, seed, tokens.len(), &windows);
    let base_ppl = heldout_ppl(m, &held)?;
    let widths = allowed_widths(&s.widths)?;
    let n_prof = samples.min(16);
    let mut profiles = profile(
        m,
        &windows[..n_prof],
        &widths,
        s.group_size,
        s.grid,
        &mut |d, t| progress("profile", d, t),
    )?;
    if let Some(b) = s.embed_bits {
        // Pinned: the table's only option is its width, so allocation spends the rest.
        for p in profiles.iter_mut().filter(|p| p.name == m.embed_name) {
            p.errors.retain(|&w, _| w == b);
        }
    }
    let quant_params: u64 = profiles.iter().map(|p| p.params as u64).sum();
    let d = &m.desc;
    let other_params = (d.n_layers * 2 * d.hidden + d.hidden) as u64;
    let other_bits = other_params * 32;
    let total = quant_params + other_params;
    let budget = ((s.target_bpw * total as f64) as u64).saturating_sub(other_bits);
    let alloc = allocate(&profiles, budget, s.grid)?;
    let predicted: f64 = profiles.iter().map(|p| p.errors[&alloc[&p.name]]).sum();
    let mut spec = spec_of(s, widths[0], alloc.clone(), rotate);
    let mut cal =
        crate::calibrate::calibrate_llama(m, Blocks::Held, &windows, &spec, &mut |d, t| {
            progress("calibrate", d, t)
        })?;
    let size = Size {
        profiles: &profiles,
        other_bits,
        total,
    };
    let (ppl, rounds, stop_reason) =
        promote_until_gate(m, &mut cal, &mut spec, s, &size, &held, base_ppl, progress)?;
    let delta = |p: f64| (p / base_ppl - 1.0) * 100.0;
    let mut gates = vec![Gate {
        name: "heldout_ppl_delta".into(),
        status: pass(delta(ppl) <= s.promotion.max_ppl_delta),
        detail: format!(
            "held-out perplexity {ppl:.4} vs {base_ppl:.4} unquantized ({:+.2}%) on {} windows of {seq_len} tokens from the last tenth of {}; limit {:+.2}%; promotion stopped: {stop_reason}",
            delta(ppl),
            held.len(),
            info.config.file,
            s.promotion.max_ppl_delta
        ),
    }];
    gates.push(outlier_gate(&cal));
    gates.extend(determinism_gate(&cal, &spec)?);
    // Gold prompts: the quantized model's greedy continuations against the unquantized ones.
    let mut gold = Vec::new();
    for (p, r) in s.gold_prompts.iter().zip(gold_ref) {
        let c = adaptq_model::generate::generate(&loaded, p, &gold_opts, &mut |_| {})?;
        gold.push(adaptq_model::generate::judge(p, r, c));
    }
    gates.extend(gold_gate(&gold, s.gold_tokens));
    let mut extra = serde_json::Map::new();
    extra.insert("gold_prompts".into(), serde_json::to_value(&gold)?);
    extra.insert(
        "apq".into(),
        serde_json::json!({
            "settings": s,
            "predicted_error_sum": predicted,
            "allocation": alloc,
            "final_widths": profiles.iter().map(|p| (p.name.clone(), spec.width(&p.name))).collect::<BTreeMap<_, _>>(),
            "bits_per_weight_planned": bpw_of(&profiles, &spec, other_bits, total, s.grid),
            "profile": profiles,
            "heldout": {"windows": held.len(), "seq_len": seq_len, "base_ppl": base_ppl, "ppl": ppl, "delta_pct": delta(ppl)},
            "promotion_rounds": rounds,
        }),
    );
    if !cal.awq.is_empty() {
        extra.insert("awq".into(), serde_json::to_value(&cal.awq)?);
    }
    cal.hessians.clear();
    for c in cal.layers.values_mut() {
        c.scaled_weight = None;
    }
    Ok(ApqOutcome {
        cal,
        info,
        extra,
        gates,
    })
}

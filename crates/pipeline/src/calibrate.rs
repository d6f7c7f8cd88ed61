//! Calibration: deterministic windows of calibration text, and GPTQ run layer by layer so each
//! block is calibrated on the outputs of the already-quantized blocks before it.

use crate::acts::{Acts, Spill};
use adaptq_model::llama::{Block, Llama};
use adaptq_model::Weights;
use adaptq_quant::awq::{search_scales, AwqConfig};
use adaptq_quant::ggml::{BlockType, GgmlSpec};
use adaptq_quant::gptq::{
    output_energy, output_error, output_rel_error, quantize_gptq, quantize_gptq_ggml, ratio,
    GptqConfig, Hessian, Sweep,
};
use adaptq_quant::rtn::{quantize_rtn_fit, Fit};
use adaptq_quant::LayerCodes;
use adaptq_quant::{quantize_rtn, Grid, QuantizedTensor, RtnConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

pub use adaptq_bundle::verification::{CalibConfig, CalibInfo};

/// Draws `n` windows of `len` tokens at seeded random offsets.
pub fn sample_windows(tokens: &[u32], n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if len < 2 || tokens.len() < len {
        bail!(
            "calibration text has {} tokens, fewer than one window of {len}",
            tokens.len()
        );
    }
    // SplitMix64, so sampling is reproducible from the seed alone on every platform.
    let mut rng = adaptq_quant::rng::Rng(seed);
    let span = tokens.len() - len + 1;
    Ok((0..n)
        .map(|_| {
            let o = rng.below(span);
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

/// The calibration file's tokens.
pub fn read_tokens(tok: &tokenizers::Tokenizer, path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading calibration text {}", path.display()))?;
    adaptq_model::tokenizer::encode(tok, &text)
}

/// What is recorded of `windows`, sampled from the `text_tokens` tokens of `path`.
pub fn calib_info(
    path: &Path,
    seq_len: usize,
    seed: u64,
    text_tokens: usize,
    windows: &[Vec<u32>],
) -> CalibInfo {
    CalibInfo {
        config: CalibConfig {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            samples: windows.len(),
            seq_len,
            seed,
        },
        text_tokens,
        fingerprint: fingerprint(windows),
    }
}

/// Puts `bos` first in every window, as llama.cpp's imatrix and perplexity do for a model that
/// asks for one (Gemma): without it such a model's first position is far off what it was
/// trained on, and so are the activations calibration collects.
pub fn bos_first(windows: &mut [Vec<u32>], bos: Option<u32>) {
    if let Some(b) = bos {
        for t in windows.iter_mut().filter_map(|w| w.first_mut()) {
            *t = b;
        }
    }
}

/// Tokenizes the calibration file and samples its windows, `bos` first in each (see
/// [`bos_first`]).
pub fn prepare(
    tok: &tokenizers::Tokenizer,
    bos: Option<u32>,
    path: &Path,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, CalibInfo)> {
    let tokens = read_tokens(tok, path)?;
    let mut windows = sample_windows(&tokens, samples, seq_len, seed)
        .with_context(|| format!("calibration file {}", path.display()))?;
    bos_first(&mut windows, bos);
    let info = calib_info(path, seq_len, seed, tokens.len(), &windows);
    Ok((windows, info))
}

/// One calibrated layer: its codes and the output error reached vs plain rounding.
pub struct CalibratedLayer {
    pub q: LayerCodes,
    /// Which method produced the codes ("gptq", "awq+rtn", "awq+gptq", "rtn").
    pub method: &'static str,
    /// The codes approximate `diag(row_scale) · W · diag(col_scale)` (AWQ scaling, folded
    /// exactly into the neighbouring norm or layer); `None` = unscaled.
    pub col_scale: Option<Vec<f32>>,
    pub row_scale: Option<Vec<f32>>,
    /// Hessian-weighted relative output error of the stored weights.
    pub output_rel_error: f64,
    /// The same measure for round-to-nearest of the original weight at the same width.
    pub rtn_output_rel_error: f64,
    /// The (scaled) weight before rounding, kept for re-quantization when promoting.
    pub scaled_weight: Option<Vec<f32>>,
    /// Fraction of the output error the scale re-fit removed (progressive pass), or NOVAQ's
    /// teacher-guided refinement removed.
    pub refit_error_reduction: Option<f64>,
    /// NOVAQ's layout and measurements for this layer.
    pub novaq: Option<adaptq_quant::novaq::NovaqReport>,
    /// The exact weight the codes approximate when it is not the source's (rotated models).
    pub reference_weight: Option<Vec<f32>>,
}

/// What the reports say of a calibrated layer: kept in memory when its codes are not.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    pub method: &'static str,
    pub output_rel_error: f64,
    pub rtn_output_rel_error: f64,
    pub refit_error_reduction: Option<f64>,
    pub novaq: Option<adaptq_quant::novaq::NovaqReport>,
}

impl CalibratedLayer {
    pub fn summary(&self) -> LayerSummary {
        LayerSummary {
            method: self.method,
            output_rel_error: self.output_rel_error,
            rtn_output_rel_error: self.rtn_output_rel_error,
            refit_error_reduction: self.refit_error_reduction,
            novaq: self.novaq,
        }
    }

    /// The tensor the codes stand for, from the source weight `w` (row-major, `cols` wide).
    pub fn reference(&self, w: &[f32], cols: usize) -> Vec<f32> {
        if let Some(r) = &self.reference_weight {
            return r.clone();
        }
        let mut x = w.to_vec();
        if let Some(s) = &self.col_scale {
            adaptq_quant::awq::scale_cols(&mut x, cols, s);
        }
        if let Some(r) = &self.row_scale {
            for (row, k) in x.chunks_mut(cols).zip(r) {
                row.iter_mut().for_each(|v| *v *= k);
            }
        }
        x
    }
}

/// How each linear layer is rounded after (optional) AWQ scaling.
#[derive(Debug, Clone, Copy)]
pub enum Rounding {
    Rtn,
    Gptq(crate::options::GptqSettings),
    /// NOVAQ residual vector codebooks (the layer seed is derived from the config's seed and
    /// the layer name).
    Novaq(adaptq_quant::novaq::NovaqConfig),
}

/// What calibration does to every layer.
#[derive(Debug, Clone)]
pub struct CalibSpec {
    pub bits: u8,
    pub group_size: usize,
    pub grid: Grid,
    pub rounding: Rounding,
    /// Search and fold AWQ scales before rounding.
    pub awq: bool,
    /// Per-tensor widths (APQ); tensors not listed use `bits`. The embedding table is
    /// quantized only when listed here or given `embed_bits`.
    pub widths: BTreeMap<String, u8>,
    /// Width of the output head (a tied table, or a head of its own), calibrated on the
    /// head's inputs with GPTQ rounding, when `widths` does not list it.
    pub embed_bits: Option<u8>,
    /// Keep each layer's Hessian (for re-quantizing promoted layers).
    pub keep_hessians: bool,
    /// Progressive pass: re-fit group scales/mins to the output error with codes fixed.
    pub refit: bool,
    /// Round linear layers onto llama.cpp block grids instead of adaptq's own groups.
    pub ggml: Option<GgmlSpec>,
    /// Rotate every linear layer's input by seeded Hadamard rotations first (`--rotate`).
    pub rotate: Option<u64>,
    /// Fit group ranges by the Hessian-weighted clipping search (`--range-search`).
    pub range_search: bool,
    /// Step of each group as a multiple of its RMS ([`Fit::Step`]), instead of its range.
    pub entropy_step: Option<f32>,
    /// The embedding table's and head's step, when not `entropy_step`.
    pub embed_step: Option<f32>,
    /// GGML type per tensor (a type mix); others take `ggml`'s type.
    pub ggml_types: BTreeMap<String, BlockType>,
    /// Choose `ggml_types` by profiling first, under this budget.
    pub mix: Option<crate::mix::MixTarget>,
    /// NOVAQ's `target_bits` is the linear layers' average: choose each layer's own target by
    /// profiling first ([`crate::spread`]).
    pub novaq_spread: bool,
    /// NOVAQ target per layer (a spread); others take the config's.
    pub novaq_targets: BTreeMap<String, f64>,
}

impl CalibSpec {
    fn method(&self) -> &'static str {
        match (self.awq, self.rounding) {
            (false, Rounding::Rtn) => "rtn",
            (false, Rounding::Gptq(_)) => "gptq",
            (true, Rounding::Rtn) => "awq+rtn",
            (true, Rounding::Gptq(_)) => "awq+gptq",
            (false, Rounding::Novaq(_)) => "novaq",
            (true, Rounding::Novaq(_)) => "awq+novaq",
        }
    }
    /// GPTQ's column sweep with these settings.
    fn sweep(&self, g: crate::options::GptqSettings) -> Sweep {
        Sweep {
            damp: g.damp,
            act_order: g.act_order,
            range_search: self.range_search,
            hessian_shrink: g.hessian_shrink,
            step: self.entropy_step,
        }
    }
    /// The spec the embedding table and head are rounded with: their own step.
    fn table(&self) -> CalibSpec {
        CalibSpec {
            entropy_step: self.embed_step.or(self.entropy_step),
            ..self.clone()
        }
    }
    /// How round-to-nearest fits a group: `imp` weighs the range search, when it runs.
    fn rtn_fit<'a>(&self, imp: Option<&'a [f32]>) -> Fit<'a> {
        Fit::of(self.entropy_step, self.range_search, imp)
    }
    pub fn width(&self, name: &str) -> u8 {
        self.widths.get(name).copied().unwrap_or(self.bits)
    }
    /// The embedding table's width, `None` when calibration does not quantize it. `embed_bits`
    /// applies to a tied table only: an untied table is a lookup, rounded alone (its separate
    /// head is [`calibrate_head`]'s).
    fn embed_width(&self, m: &Llama) -> Option<u8> {
        let tied = self.embed_bits.filter(|_| m.tied());
        self.widths.get(&m.embed_name).copied().or(tied)
    }
    /// Rounds `w` at `bits` against `h` as the spec says, then (with `refit`) re-fits the
    /// group parameters; also returns the refit's output error before and after.
    pub fn round_reporting(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &Hessian,
        bits: u8,
    ) -> Result<(QuantizedTensor, Option<(f64, f64)>)> {
        let rtn = RtnConfig {
            bits,
            group_size: self.group_size,
            grid: self.grid,
        };
        let mut q = match self.rounding {
            Rounding::Rtn => {
                let imp = h.diagonal();
                quantize_rtn_fit(w, rows, cols, &rtn, self.rtn_fit(Some(&imp)))?
            }
            Rounding::Gptq(g) => quantize_gptq(
                w,
                rows,
                cols,
                h,
                &GptqConfig {
                    bits,
                    group_size: self.group_size,
                    grid: self.grid,
                    sweep: self.sweep(g),
                },
            )?,
            Rounding::Novaq(_) => bail!("NOVAQ layers are coded by `round_novaq`"),
        };
        let gain = self
            .refit
            .then(|| adaptq_quant::refit::refit_scales(&mut q, w, &h.matrix()));
        Ok((q, gain))
    }

    /// Rounds onto a GGML type's grid: GPTQ when the spec says so, else round-to-nearest with
    /// the input Hessian's diagonal steering the block scales (llama.cpp's imatrix idea).
    pub fn round_ggml(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &Hessian,
        ty: BlockType,
    ) -> Result<LayerCodes> {
        let bytes = match self.rounding {
            Rounding::Rtn => {
                let imp = h.diagonal();
                adaptq_quant::ggml::quantize_rtn(ty, w, rows, cols, Some(&imp), self.range_search)?
            }
            Rounding::Gptq(g) => quantize_gptq_ggml(w, rows, cols, h, ty, self.sweep(g))?,
            Rounding::Novaq(_) => bail!("NOVAQ codebooks cannot be stored as GGML blocks"),
        };
        Ok(LayerCodes::Ggml {
            ty,
            rows,
            cols,
            bytes,
        })
    }

    /// Codes a layer with NOVAQ; the seed is mixed with the layer name so layers of one shape
    /// do not share their k-means draws.
    pub fn round_novaq(
        &self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &Hessian,
    ) -> Result<(LayerCodes, adaptq_quant::novaq::NovaqReport)> {
        let Rounding::Novaq(cfg) = self.rounding else {
            bail!("round_novaq needs NOVAQ rounding");
        };
        let cfg = adaptq_quant::novaq::NovaqConfig {
            seed: layer_seed(cfg.seed, name),
            target_bits: self
                .novaq_targets
                .get(name)
                .copied()
                .unwrap_or(cfg.target_bits),
            ..cfg
        };
        let (t, rep) = adaptq_quant::novaq::quantize_novaq(w, rows, cols, Some(h), &cfg)?;
        Ok((LayerCodes::Codebook(t), rep))
    }
}

/// A per-layer seed: FNV-1a of the name mixed into the run's seed (stable on every platform).
pub fn layer_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    seed ^ h
}

/// AWQ search result for one group of layers sharing an input.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AwqGroup {
    pub layers: Vec<String>,
    pub alpha: f32,
    /// Output squared error with the chosen scales / without, summed over the group.
    pub error: f64,
    pub error_plain: f64,
}

/// Everything calibration produced.
#[derive(Default)]
pub struct Calibration {
    /// Layers whose codes are held in memory.
    pub layers: BTreeMap<String, CalibratedLayer>,
    /// Layers whose codes a checkpoint file holds instead (a checkpointed run's finished
    /// blocks): memory does not grow with depth. The bundle writer reads them back.
    pub saved: BTreeMap<String, (crate::checkpoint::SavedFile, LayerSummary)>,
    /// Norm weights changed by folding AWQ scales: stored instead of the source's.
    pub overrides: BTreeMap<String, Vec<f32>>,
    pub awq: Vec<AwqGroup>,
    /// Input Hessians by layer (when `keep_hessians`), in the scaled space of the codes.
    pub hessians: BTreeMap<String, Hessian>,
    /// The GGUF type mix chosen before calibrating, when one was asked for.
    pub mix: Option<crate::mix::MixPlan>,
    /// NOVAQ's per-layer targets chosen before calibrating, when spread.
    pub novaq_targets: BTreeMap<String, f64>,
    /// Bytes of one set of calibration activations, and whether they were spilled to scratch.
    pub acts: Option<(u64, bool)>,
    /// How each expert of a mixture was calibrated.
    pub experts: Vec<crate::experts::ExpertRecord>,
}

impl Calibration {
    /// Adds what a later block (or the tail) calibrated.
    pub fn absorb(&mut self, other: Calibration) {
        self.layers.extend(other.layers);
        self.saved.extend(other.saved);
        self.overrides.extend(other.overrides);
        self.awq.extend(other.awq);
        self.experts.extend(other.experts);
        self.hessians.extend(other.hessians);
        if other.mix.is_some() {
            self.mix = other.mix;
        }
        self.novaq_targets.extend(other.novaq_targets);
        if other.acts.is_some() {
            self.acts = other.acts;
        }
    }
}

impl Calibration {
    /// The report of layer `name`, held or saved.
    pub fn summary(&self, name: &str) -> Option<LayerSummary> {
        match self.layers.get(name) {
            Some(c) => Some(c.summary()),
            None => self.saved.get(name).map(|(_, s)| s.clone()),
        }
    }

    /// Every calibrated layer's report, by name.
    pub fn summaries(&self) -> BTreeMap<&str, LayerSummary> {
        let held = self.layers.iter().map(|(n, c)| (n.as_str(), c.summary()));
        let saved = self.saved.iter().map(|(n, (_, s))| (n.as_str(), s.clone()));
        held.chain(saved).collect()
    }
}

/// Input statistics of every linear layer of block `b`: Hessians and mean |x| per channel.
/// Layers that read one input (q, k and v; gate and up) share one Hessian: for a 14336-wide
/// MLP each is 1.6 GB. A mixture's routed experts are not among them: their statistics are
/// built one expert at a time from the [`crate::experts::Routing`] kept instead
/// ([`crate::experts::before_layer`]).
pub type BlockStats = (
    BTreeMap<String, Rc<Hessian>>,
    BTreeMap<String, Vec<f32>>,
    Option<crate::experts::Routing>,
);

/// Runs `blk` as block `b` on `xs` and collects each linear layer's input statistics; a
/// mixture's MLP inputs are kept as the block's inputs would be under `spill`.
pub fn collect_stats(
    m: &Llama,
    blk: &Block,
    b: usize,
    xs: &dyn crate::acts::Windows,
    spill: Option<&crate::acts::Spill>,
) -> Result<BlockStats> {
    let mut hs: BTreeMap<String, Hessian> = BTreeMap::new();
    let mut abs: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
    // Each layer's name -> the first layer seen reading the same input tensor.
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let experts = crate::experts::expert_layers(blk);
    let mut routing = match blk.experts() {
        Some(_) => Some(crate::experts::Routing::new(b, xs.bytes(), spill)?),
        None => None,
    };
    let router = blk.experts().map(|e| (e, e.router.name.clone()));
    {
        let mut last: Option<(candle_core::TensorId, String)> = None;
        let mut hook = |name: &str, x: &Tensor| -> Result<()> {
            if experts.contains(name) {
                return Ok(());
            }
            if let (Some((e, r)), Some(routing)) = (&router, routing.as_mut()) {
                if r == name {
                    routing.push(e, x)?;
                }
            }
            let (rows, dim) = x.dims2()?;
            if last.as_ref().is_none_or(|(id, _)| *id != x.id()) {
                let a = x.abs()?.sum(0)?.to_vec1::<f32>()?;
                let h = hs
                    .entry(name.to_string())
                    .or_insert_with(|| Hessian::new(dim));
                crate::experts::add_inputs(h, x)?;
                let e = abs
                    .entry(name.to_string())
                    .or_insert_with(|| (vec![0.0; dim], 0));
                e.0.iter_mut().zip(a).for_each(|(s, v)| *s += v as f64);
                e.1 += rows;
                last = Some((x.id(), name.to_string()));
            }
            let (_, first) = last.as_ref().expect("set above");
            owner
                .entry(name.to_string())
                .or_insert_with(|| first.clone());
            Ok(())
        };
        xs.each(&mut |x| {
            let mut h: Option<adaptq_model::llama::Hook> = Some(&mut hook);
            m.block_with(blk, b, x, 0, None, &mut h).map(drop)
        })?;
    }
    let shared: BTreeMap<String, Rc<Hessian>> =
        hs.into_iter().map(|(k, h)| (k, Rc::new(h))).collect();
    let act: BTreeMap<String, Vec<f32>> = abs
        .into_iter()
        .map(|(k, (s, n))| (k, s.iter().map(|v| (v / n.max(1) as f64) as f32).collect()))
        .collect();
    let hs: BTreeMap<String, Rc<Hessian>> = owner
        .iter()
        .map(|(name, first)| (name.clone(), shared[first].clone()))
        .collect();
    let act = owner
        .iter()
        .map(|(name, first)| (name.clone(), act[first].clone()))
        .collect();
    if let (Some((_, r)), Some(routing)) = (&router, routing.as_mut()) {
        let all = hs
            .get(r)
            .with_context(|| format!("no calibration inputs reached '{r}'"))?;
        routing.set_all(all.clone());
    }
    Ok((hs, act, routing))
}

/// Searches AWQ scales for one group and applies them to the group's weights.
fn awq_group(
    spec: &CalibSpec,
    lins: &mut [&mut adaptq_model::llama::Linear],
    h: &Hessian,
    act: &[f32],
) -> Result<(Vec<f32>, AwqGroup)> {
    let ws: Vec<(Vec<f32>, usize, usize)> = lins
        .iter()
        .map(|l| l.weight_rows())
        .collect::<Result<_>>()?;
    let cols = ws[0].2;
    let bits = lins
        .iter()
        .map(|l| spec.width(&l.name))
        .min()
        .unwrap_or(spec.bits);
    let refs: Vec<(&[f32], usize)> = ws.iter().map(|(w, r, _)| (w.as_slice(), *r)).collect();
    let r = search_scales(
        &refs,
        cols,
        &h.matrix(),
        act,
        &AwqConfig {
            bits,
            group_size: spec.group_size,
            grid: spec.grid,
            n_grid: 20,
        },
    )?;
    for (l, (mut w, _, _)) in lins.iter_mut().zip(ws) {
        adaptq_quant::awq::scale_cols(&mut w, cols, &r.scales);
        l.set_weight(w)?;
    }
    let g = AwqGroup {
        layers: lins.iter().map(|l| l.name.clone()).collect(),
        alpha: r.alpha,
        error: r.error,
        error_plain: r.error_plain,
    };
    Ok((r.scales, g))
}

fn inverse(s: &[f32]) -> Vec<f32> {
    s.iter().map(|v| 1.0 / v).collect()
}

/// Hands memory freed to the allocator back to the system. glibc keeps freed heap memory for
/// reuse; after tokenizing the calibration text and after each block that is tens of MB the
/// process keeps resident for nothing, and calibration's peak is what decides which models fit.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where calibration finds the blocks: held by the model, or read from the file one at a time
/// (the model a shell from [`Llama::load_shell`]), so memory holds one block's weights in f32
/// and never the whole model.
#[derive(Clone, Copy)]
pub enum Blocks<'a> {
    Held,
    Stream(&'a dyn Weights),
}

impl Blocks<'_> {
    /// Block `b` to read: the model's own, or loaded into `slot`.
    pub fn get<'s>(
        &self,
        m: &'s Llama,
        b: usize,
        slot: &'s mut Option<Block>,
    ) -> Result<&'s Block> {
        Ok(match self {
            Blocks::Held => &m.blocks[b],
            Blocks::Stream(w) => {
                let mut blk = m.load_block(*w, b)?;
                // A rotated shell's blocks are rotated as they load.
                if m.rotation_seed().is_some() {
                    m.rotate_block(&mut blk)?;
                }
                slot.insert(blk)
            }
        })
    }

    /// How many blocks the model has.
    pub fn count(&self, m: &Llama) -> usize {
        match self {
            Blocks::Held => m.blocks.len(),
            Blocks::Stream(_) => m.desc.n_layers,
        }
    }
}

/// Which blocks a calibration pass covers, what it starts from and where it saves each block.
pub struct Job<'a> {
    /// Blocks `from..end` are calibrated.
    pub from: usize,
    pub end: usize,
    /// The inputs of block `from`; `None`: embed the windows, then run the float blocks before
    /// `from`.
    pub xs: Option<Acts>,
    /// Where activations go when they do not fit in memory; `None`: always held.
    pub spill: Option<&'a Spill>,
    /// What earlier blocks calibrated (a resumed run's), carried into the result.
    pub done: Calibration,
    /// Each block's outputs for the next block are the float block's, not the quantized one's.
    pub fp_inputs: bool,
    /// Saves each block's codes and the next block's inputs as soon as they exist.
    pub save: Option<&'a mut crate::checkpoint::Checkpoint>,
}

impl Job<'_> {
    /// Every block of an `n`-block model, from the embedded windows, saved nowhere.
    pub fn whole(n: usize) -> Job<'static> {
        Job {
            from: 0,
            end: n,
            xs: None,
            done: Calibration::default(),
            fp_inputs: false,
            save: None,
            spill: None,
        }
    }
}

/// Calibrates every linear layer of `m`, block by block: [`calibrate_job`] over all blocks.
pub fn calibrate_llama(
    m: &mut Llama,
    blocks: Blocks,
    windows: &[Vec<u32>],
    spec: &CalibSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    let n = blocks.count(m);
    calibrate_job(m, blocks, windows, spec, Job::whole(n), progress)
}

/// Calibrates the linear layers of blocks `job.from..job.end`, in order. After a block is
/// quantized its weights are replaced by their reconstructions (and its norms by their
/// AWQ-folded values), and the calibration activations are pushed through the quantized block
/// (the float one with `fp_inputs`) to become the next block's inputs. Held blocks stay in the
/// model, quantized; streamed ones are dropped once calibrated. A pass that ends at the last
/// block then calibrates a quantized embedding table or head. `progress(block, blocks)`.
pub fn calibrate_job(
    m: &mut Llama,
    blocks: Blocks,
    windows: &[Vec<u32>],
    spec: &CalibSpec,
    mut job: Job,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    let n = blocks.count(m);
    if job.from > job.end || job.end > n {
        bail!(
            "blocks {}..{} are not within the model's {n}",
            job.from,
            job.end
        );
    }
    let mut out = std::mem::take(&mut job.done);
    // APQ rotates the model before it profiles the layers.
    if let Some(seed) = spec.rotate.filter(|&s| m.rotation_seed() != Some(s)) {
        m.rotate(seed)?;
    }
    // Float blocks run before the first calibrated one when its inputs must be computed.
    let first = match job.xs {
        Some(_) => job.from,
        None => 0,
    };
    let spill = job.spill;
    let mut xs = match job.xs.take() {
        Some(xs) => xs.placed(spill)?,
        None => {
            let tokens: usize = windows.iter().map(Vec::len).sum();
            let bytes = (tokens * m.embed_dims().1 * 4) as u64;
            Acts::build(windows.len(), bytes, spill, &mut |i| m.embed(&windows[i]))?
        }
    };
    let last = job.end == n;
    // A streamed run reads the table again at the end, and only if it quantizes it.
    let table_at_end = last && (spec.embed_width(m).is_some() || (m.tied() && spec.ggml.is_some()));
    if let Blocks::Stream(_) = blocks {
        m.unload_embedding();
    }
    if let (Blocks::Held, false) = (blocks, first == 0 && job.from == 0 && job.end == n) {
        bail!("a model held in memory is calibrated whole");
    }
    let mut held = std::mem::take(&mut m.blocks).into_iter();
    let mut done = Vec::new();
    for b in first..job.end {
        let mut blk = match blocks {
            Blocks::Held => held
                .next()
                .context("the model holds fewer blocks than it declares")?,
            Blocks::Stream(w) => {
                let mut blk = m.load_block(w, b)?;
                if spec.rotate.is_some() {
                    m.rotate_block(&mut blk)?;
                }
                blk
            }
        };
        if b < job.from {
            xs = xs.map(spill, &mut |x| m.block_with(&blk, b, x, 0, None, &mut None))?;
            continue;
        }
        let mut part = Calibration::default();
        let flow = Flow {
            fp_inputs: job.fp_inputs,
            spill,
        };
        xs = calibrate_block(m, &mut blk, b, xs, spec, flow, &mut part)?;
        if let Some(cp) = job.save.as_deref_mut() {
            part = cp.save_block(b, part, &xs)?;
        }
        out.absorb(part);
        if let Blocks::Held = blocks {
            done.push(blk);
        }
        trim_heap();
        progress(b + 1, n);
    }
    out.acts = Some((xs.bytes(), xs.is_spilled()));
    m.blocks = done;
    if !last {
        return Ok(out);
    }
    if let (Blocks::Stream(w), true) = (blocks, table_at_end) {
        m.load_embedding(w)?;
    }
    let mut tail = Calibration::default();
    if let Some(bits) = spec.embed_width(m) {
        let c = calibrate_embedding(m, spec, &xs, bits)?;
        m.set_embedding(c.q.dequantize())?;
        tail.layers.insert(m.embed_name.clone(), c);
    } else if let Some((name, c)) = calibrate_head(m, blocks, spec, &xs)? {
        tail.layers.insert(name, c);
    }
    if let Some(cp) = job.save {
        tail = cp.save_tail(tail)?;
    }
    out.absorb(tail);
    Ok(out)
}

/// How activations flow from block to block.
#[derive(Clone, Copy, Default)]
pub struct Flow<'a> {
    /// The next block's inputs are the float block's outputs.
    pub fp_inputs: bool,
    /// Where activations go when they do not fit in memory; `None`: always held.
    pub spill: Option<&'a Spill>,
}

/// Calibrates block `b`'s layers on its inputs `xs`, leaves their reconstructions in `blk` and
/// returns the next block's inputs: the quantized block's outputs, or with `fp_inputs` the
/// float block's.
fn calibrate_block(
    m: &Llama,
    blk: &mut Block,
    b: usize,
    xs: Acts,
    spec: &CalibSpec,
    flow: Flow,
    out: &mut Calibration,
) -> Result<Acts> {
    let forward = |blk: &Block, xs: &Acts| -> Result<Acts> {
        xs.map(flow.spill, &mut |x| {
            m.block_with(blk, b, x, 0, None, &mut None)
        })
    };
    let fp_out = match flow.fp_inputs {
        true => Some(forward(blk, &xs)?),
        false => None,
    };
    let (mut hs, act, routing) = collect_stats(m, blk, b, &xs, flow.spill)?;
    // AWQ changes the weights (never a mixture's experts); without it a layer's own weight is
    // the original.
    let experts = crate::experts::expert_layers(blk);
    let originals: BTreeMap<String, Vec<f32>> = match spec.awq {
        true => blk
            .linears_mut()
            .into_iter()
            .filter(|l| !experts.contains(&l.name))
            .map(|l| Ok((l.name.clone(), l.weight_rows()?.0)))
            .collect::<Result<_>>()?,
        false => BTreeMap::new(),
    };
    let mut orig_h = hs.clone();
    let mut scales = Scales::default();
    if spec.awq {
        fold_awq(spec, blk, &orig_h, &act, &mut hs, &mut scales, out)?;
    }
    let names: Vec<String> = blk.linears().iter().map(|l| l.name.clone()).collect();
    for (i, name) in names.iter().enumerate() {
        // An expert's Hessians are built when its first layer comes (AWQ leaves experts be,
        // so they are their own originals).
        if let Some(r) = crate::experts::before_layer(routing.as_ref(), blk, name, &mut hs)? {
            for l in crate::experts::expert_layers_of(blk, r.expert) {
                orig_h.insert(l.clone(), hs[&l].clone());
            }
            out.experts.push(r);
        }
        let lin = blk.linears_mut().swap_remove(i);
        // Taken out, so each Hessian is freed once the last layer reading it is rounded.
        let h = hs
            .remove(&lin.name)
            .with_context(|| format!("no calibration inputs reached '{}'", lin.name))?;
        let oh = orig_h.remove(&lin.name).expect("same layers as hs");
        let ow = originals.get(&lin.name).map(Vec::as_slice);
        let c = round_linear(spec, lin, ow, &h, &oh, &mut scales)?;
        lin.set_weight(c.q.dequantize())?;
        if spec.keep_hessians {
            out.hessians.insert(lin.name.clone(), Hessian::clone(&h));
        }
        out.layers.insert(lin.name.clone(), c);
    }
    drop(originals);
    match fp_out {
        Some(next) => Ok(next),
        None => forward(blk, &xs),
    }
}

/// AWQ's column scales (inputs) and row scales (outputs) of a block's layers, by name.
#[derive(Default)]
struct Scales {
    col: BTreeMap<String, Vec<f32>>,
    row: BTreeMap<String, Vec<f32>>,
}

/// Searches AWQ scales for the block's three input groups and folds them exactly: 1/s into
/// the attention and MLP norms, and for `down` into `up`'s output rows. The Hessians in `hs`
/// become those of the scaled inputs.
fn fold_awq(
    spec: &CalibSpec,
    blk: &mut adaptq_model::llama::Block,
    orig_h: &BTreeMap<String, Rc<Hessian>>,
    act: &BTreeMap<String, Vec<f32>>,
    hs: &mut BTreeMap<String, Rc<Hessian>>,
    scales: &mut Scales,
    out: &mut Calibration,
) -> Result<()> {
    let need = |name: &str| {
        orig_h
            .get(name)
            .zip(act.get(name))
            .with_context(|| format!("no calibration inputs reached '{name}'"))
    };
    let mut rescale = |names: &[&String], inv: &[f32]| {
        for l in names {
            let scaled = hs[*l].scaled(inv);
            hs.insert((*l).clone(), Rc::new(scaled));
        }
    };
    // attention input: q, k, v (or a fused qkv) share it; fold 1/s into the attention norm.
    let names = |ls: &[adaptq_model::llama::Linear]| -> Vec<String> {
        ls.iter().map(|l| l.name.clone()).collect()
    };
    let qkv = names(&blk.qkv);
    let (h, a) = need(&qkv[0])?;
    let (s, g) = awq_group(spec, &mut blk.qkv.iter_mut().collect::<Vec<_>>(), h, a)?;
    let folded = blk.div_attn_norm(&s)?;
    out.overrides.insert(blk.attn_norm_name.clone(), folded);
    for l in &qkv {
        scales.col.insert(l.clone(), s.clone());
    }
    out.awq.push(g);
    rescale(&qkv.iter().collect::<Vec<_>>(), &inverse(&s));
    // A mixture's MLP input also feeds its router (kept in float): its groups are the
    // experts', each with inputs of its own, so only the attention input is scaled.
    let Some((gate_up, _)) = blk.dense_mlp() else {
        return Ok(());
    };
    // MLP input: gate and up (or a fused gate | up) share it; fold into the MLP norm.
    let gate_up_names = names(gate_up);
    let (h, a) = need(&gate_up_names[0])?;
    let (s, g) = awq_group(spec, &mut gate_up.iter_mut().collect::<Vec<_>>(), h, a)?;
    let folded = blk.div_ffn_norm(&s)?;
    out.overrides.insert(blk.ffn_norm_name.clone(), folded);
    for l in &gate_up_names {
        scales.col.insert(l.clone(), s.clone());
    }
    out.awq.push(g);
    rescale(&gate_up_names.iter().collect::<Vec<_>>(), &inverse(&s));
    // down's input is act(gate)·up: scaling up's output rows by 1/s divides it by s.
    let (gate_up, down) = blk.dense_mlp().expect("dense, as above");
    let down_name = down.name.clone();
    let (h, a) = need(&down_name)?;
    let (s, g) = awq_group(spec, &mut [down], h, a)?;
    let inv = inverse(&s);
    // The layer whose output rows are up's: the second half of a fused gate | up.
    let first = match gate_up.len() {
        1 => gate_up[0].rows() / 2,
        _ => 0,
    };
    let up = gate_up.last_mut().expect("gate and up");
    let (mut uw, ur, uc) = up.weight_rows()?;
    // Row factors of the whole layer: 1 on a fused gate half.
    let mut row = vec![1.0; ur];
    row[first..].copy_from_slice(&inv);
    for (r, k) in uw.chunks_mut(uc).zip(&row) {
        r.iter_mut().for_each(|v| *v *= k);
    }
    up.set_weight(uw)?;
    scales.row.insert(up.name.clone(), row);
    scales.col.insert(down_name.clone(), s);
    out.awq.push(g);
    rescale(&[&down_name], &inv);
    Ok(())
}

/// Rounds one linear layer as the spec says, measuring its output error on the calibration
/// inputs against plain rounding of the original weight `ow` (inputs `oh`) at the same width;
/// `None` when the layer's weight is still the original. The weight is taken out of `lin`
/// (the caller sets the reconstruction).
fn round_linear(
    spec: &CalibSpec,
    lin: &mut adaptq_model::llama::Linear,
    ow: Option<&[f32]>,
    h: &Hessian,
    oh: &Hessian,
    scales: &mut Scales,
) -> Result<CalibratedLayer> {
    let bits = spec.width(&lin.name);
    let (w, rows, cols) = lin.take_weight()?;
    let ow = ow.unwrap_or(&w);
    let rtn_same_width = || -> Result<Vec<f32>> {
        let cfg = RtnConfig {
            bits,
            group_size: spec.group_size,
            grid: spec.grid,
        };
        Ok(quantize_rtn(ow, rows, cols, &cfg)?.dequantize())
    };
    let mut novaq = None;
    let ((q, refit), rtn) = if let Rounding::Novaq(_) = spec.rounding {
        let (q, rep) = spec
            .round_novaq(&lin.name, &w, rows, cols, h)
            .with_context(|| format!("quantizing '{}' with NOVAQ", lin.name))?;
        novaq = Some(rep);
        (
            (q, Some((rep.error_before_refine, rep.error_after_refine))),
            rtn_same_width()?,
        )
    } else if let Some(g) = &spec.ggml {
        let ty = match spec.ggml_types.get(&lin.name) {
            Some(&t) => t,
            None => g.linear_for(cols)?.0,
        };
        let q = spec
            .round_ggml(&w, rows, cols, h, ty)
            .with_context(|| format!("quantizing '{}' as {}", lin.name, ty.name()))?;
        let rtn = adaptq_quant::ggml::quantize_rtn(ty, ow, rows, cols, None, false)?;
        let rtn = adaptq_quant::ggml::dequantize(ty, &rtn, ow.len())?;
        ((q, None), rtn)
    } else {
        let (q, refit) = spec
            .round_reporting(&w, rows, cols, h, bits)
            .with_context(|| format!("quantizing '{}'", lin.name))?;
        ((LayerCodes::Int(q), refit), rtn_same_width()?)
    };
    // Without AWQ both errors are on the same weights and inputs: one energy term serves both
    // (each term costs a product with the n×n Hessian).
    let energy = output_energy(&w, cols, h);
    let rtn_energy = match std::ptr::eq(ow, w.as_slice()) && std::ptr::eq(h, oh) {
        true => energy,
        false => output_energy(ow, cols, oh),
    };
    Ok(CalibratedLayer {
        output_rel_error: ratio(output_error(&w, &q.dequantize(), cols, h), energy),
        rtn_output_rel_error: ratio(output_error(ow, &rtn, cols, oh), rtn_energy),
        method: spec.method(),
        col_scale: scales.col.remove(&lin.name),
        row_scale: scales.row.remove(&lin.name),
        scaled_weight: spec.keep_hessians.then(|| w.clone()),
        refit_error_reduction: refit_reduction(refit),
        novaq,
        reference_weight: spec.rotate.is_some().then(|| w.clone()),
        q,
    })
}

/// The fraction of the error a re-fit removed, from (before, after).
fn refit_reduction(refit: Option<(f64, f64)>) -> Option<f64> {
    refit.map(|(b, a)| if b > 0.0 { 1.0 - a / b } else { 0.0 })
}

/// The embedding table at `bits`. A tied table is also the output head: with GPTQ it is
/// calibrated as the head, on the final norm's outputs of the already-quantized network
/// (the head decides every logit); otherwise it is rounded to nearest.
fn calibrate_embedding(
    m: &Llama,
    spec: &CalibSpec,
    xs: &Acts,
    bits: u8,
) -> Result<CalibratedLayer> {
    let (vocab, hidden) = m.embed_dims();
    let e = m.embedding_rows()?;
    let spec = &spec.table();
    let (q, method, err, refit) = if m.tied() && matches!(spec.rounding, Rounding::Gptq(_)) {
        let h = head_hessian(m, xs)?;
        let (q, refit) = spec
            .round_reporting(&e, vocab, hidden, &h, bits)
            .with_context(|| format!("quantizing '{}' as the output head", m.embed_name))?;
        let err = output_rel_error(&e, &q.dequantize(), hidden, &h);
        (q, "gptq", err, refit)
    } else {
        let cfg = RtnConfig {
            bits,
            group_size: spec.group_size,
            grid: spec.grid,
        };
        (
            quantize_rtn_fit(&e, vocab, hidden, &cfg, spec.rtn_fit(None))?,
            "rtn",
            f64::NAN,
            None,
        )
    };
    Ok(CalibratedLayer {
        q: LayerCodes::Int(q),
        method,
        col_scale: None,
        row_scale: None,
        output_rel_error: err,
        rtn_output_rel_error: f64::NAN,
        scaled_weight: None,
        refit_error_reduction: refit_reduction(refit),
        novaq: None,
        reference_weight: None,
    })
}

/// The output head's input statistics: the final norm's outputs for the last block's outputs
/// `xs`.
pub fn head_hessian(m: &Llama, xs: &dyn crate::acts::Windows) -> Result<Hessian> {
    let mut h = Hessian::new(m.embed_dims().1);
    xs.each(&mut |x| crate::experts::add_inputs(&mut h, &m.final_normed(x)?))?;
    Ok(h)
}

/// The output head (a tied embedding table, or a head of its own) rounded against the head's
/// inputs (the final norm's outputs of the already-quantized network) as a linear layer is:
/// onto its GGML type (GPTQ when calibrating with GPTQ, else round-to-nearest steered by their
/// importance), or, for an untied head on adaptq's grid, by GPTQ at the embedding width (a
/// tied table on that grid is [`calibrate_embedding`]'s). `None` when neither applies. An
/// untied embedding table is a lookup with no input statistics; it is left to plain rounding.
fn calibrate_head(
    m: &Llama,
    blocks: Blocks,
    spec: &CalibSpec,
    xs: &Acts,
) -> Result<Option<(String, CalibratedLayer)>> {
    let name = if m.tied() {
        &m.embed_name
    } else {
        &m.head_name
    };
    let (vocab, hidden) = m.embed_dims();
    /// What the head is rounded onto.
    enum Onto {
        Ggml(BlockType),
        Int(u8),
    }
    let onto = match (&spec.ggml, &spec.rounding) {
        (Some(g), _) => match spec.ggml_types.get(name).copied().or(g.embedding) {
            Some(ty) => Onto::Ggml(
                adaptq_quant::ggml::pick(ty, hidden)
                    .with_context(|| format!("tensor '{name}'"))?
                    .0,
            ),
            None => return Ok(None),
        },
        (None, Rounding::Gptq(_)) if !m.tied() => {
            match spec.widths.get(name).copied().or(spec.embed_bits) {
                Some(b) => Onto::Int(b),
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let h = head_hessian(m, xs)?;
    let spec = &spec.table();
    let w = match blocks {
        _ if m.tied() => m.embedding_rows()?,
        Blocks::Held => m.head_rows()?,
        Blocks::Stream(src) => src.read(name)?,
    };
    let (q, rtn, refit) = match onto {
        Onto::Ggml(ty) => {
            let q = spec
                .round_ggml(&w, vocab, hidden, &h, ty)
                .with_context(|| {
                    format!("quantizing '{name}' as the output head, {}", ty.name())
                })?;
            let rtn = adaptq_quant::ggml::quantize_rtn(ty, &w, vocab, hidden, None, false)?;
            (q, adaptq_quant::ggml::dequantize(ty, &rtn, w.len())?, None)
        }
        Onto::Int(bits) => {
            let (q, refit) = spec
                .round_reporting(&w, vocab, hidden, &h, bits)
                .with_context(|| format!("quantizing '{name}' as the output head"))?;
            let cfg = RtnConfig {
                bits,
                group_size: spec.group_size,
                grid: spec.grid,
            };
            let rtn = quantize_rtn(&w, vocab, hidden, &cfg)?.dequantize();
            (LayerCodes::Int(q), rtn, refit)
        }
    };
    let c = CalibratedLayer {
        output_rel_error: output_rel_error(&w, &q.dequantize(), hidden, &h),
        rtn_output_rel_error: output_rel_error(&w, &rtn, hidden, &h),
        method: spec.method(),
        col_scale: None,
        row_scale: None,
        scaled_weight: None,
        refit_error_reduction: refit_reduction(refit),
        novaq: None,
        reference_weight: None,
        q,
    };
    Ok(Some((name.clone(), c)))
}

/// The calibration windows: `samples` windows of `seq_len` tokens from the text at `path`,
/// placed by `seed`.
pub struct Sampling<'a> {
    pub path: &'a Path,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// Runs calibration (GPTQ / AWQ / both) on a decoder model from `src`, activations flowing as
/// `flow` says. `job` saves each block and says where to start.
pub fn run(
    src: &dyn adaptq_source::TensorSource,
    sampling: &Sampling,
    spec: &CalibSpec,
    flow: Flow,
    job: Option<&crate::checkpoint::JobPlan>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Calibration, CalibInfo)> {
    let Sampling {
        path: calib,
        samples,
        seq_len,
        seed,
    } = *sampling;
    let w = adaptq_model::borrowed_source(src);
    let desc = w.desc().clone();
    if desc.family != adaptq_source::model::Family::Llama {
        bail!("calibrated methods run on decoder (Llama-family) models; quantize BERT with rtn")
    }
    let tokenizer = w.tokenizer()?;
    let (windows, info) = prepare(&tokenizer, desc.decoder.bos, calib, samples, seq_len, seed)?;
    drop(tokenizer);
    trim_heap();
    let mut begin = job
        .map(|j| j.begin(src, &info, desc.n_layers, flow.spill))
        .transpose()?;
    let mut pass = |llama: &mut Llama, spec: &CalibSpec, progress: &mut dyn FnMut(usize, usize)| {
        let blocks = Blocks::Stream(w.as_ref());
        let Some(b) = begin.as_mut() else {
            let job = Job {
                fp_inputs: flow.fp_inputs,
                spill: flow.spill,
                ..Job::whole(desc.n_layers)
            };
            return calibrate_job(llama, blocks, &windows, spec, job, progress);
        };
        // A finished checkpoint (killed while the bundle was written) has nothing left to run;
        // a type mix is still chosen, as it is not saved.
        if b.checkpoint.state.complete() {
            return Ok(std::mem::take(&mut b.done));
        }
        let job = Job {
            from: b.from,
            end: b.end,
            xs: b.xs.take(),
            done: std::mem::take(&mut b.done),
            fp_inputs: flow.fp_inputs,
            spill: flow.spill,
            save: Some(&mut b.checkpoint),
        };
        calibrate_job(llama, blocks, &windows, spec, job, progress)
    };
    let mut llama = Llama::load_shell(&desc, w.as_ref())?;
    let blocks = Blocks::Stream(w.as_ref());
    if let (true, Rounding::Novaq(cfg)) = (spec.novaq_spread, spec.rounding) {
        // Profiled on the weights the codes will hold: rotated first when asked.
        if let Some(seed) = spec.rotate {
            llama.rotate(seed)?;
        }
        let n_prof = windows.len().min(16);
        let mut done = 0;
        let targets =
            crate::spread::targets(&llama, blocks, &windows[..n_prof], &cfg, &mut |d, t| {
                done = d;
                progress(d, t + desc.n_layers)
            })?;
        let spec = CalibSpec {
            novaq_targets: targets.clone(),
            ..spec.clone()
        };
        let offset = done;
        let mut out = pass(&mut llama, &spec, &mut |d, t| {
            progress(offset + d, offset + t)
        })?;
        out.novaq_targets = targets;
        return Ok((out, info));
    }
    let Some(target) = &spec.mix else {
        let cal = pass(&mut llama, spec, progress)?;
        return Ok((cal, info));
    };
    // The embedding and head join the mix only when they are quantized at all: a float table
    // (`f16`) stays float and is charged as such.
    let embedding = spec.ggml.and_then(|g| g.embedding);
    let ends = embedding.is_some();
    let names: std::collections::BTreeSet<String> = (0..desc.n_layers)
        .flat_map(|b| llama.linear_names(b))
        .chain(ends.then(|| llama.embed_name.clone()))
        .chain((ends && !llama.tied()).then(|| llama.head_name.clone()))
        .collect();
    let (params, fixed) =
        crate::mix::outside_bits(src, &|n| names.contains(n), embedding, target.embeddings)?;
    // Profiling runs on a subset of the windows, as APQ's does: it ranks tensors, it does not
    // fit them.
    let n_prof = windows.len().min(16);
    let mut done = 0;
    let mut mix = crate::mix::choose(
        &llama,
        blocks,
        &windows[..n_prof],
        crate::mix::Budget {
            target_bpw: target.bpw(src)?,
            total_params: params,
            fixed_bits: fixed,
        },
        &target.types,
        spec.range_search,
        &mut |d, t| {
            done = d;
            progress(d, t + desc.n_layers)
        },
    )?;
    let spec = CalibSpec {
        ggml_types: mix.types.clone(),
        ..spec.clone()
    };
    let offset = done;
    let mut out = pass(&mut llama, &spec, &mut |d, t| {
        progress(offset + d, offset + t)
    })?;
    mix.like = target.like.clone();
    out.mix = Some(mix);
    Ok((out, info))
}

/// The method-specific sections of `verification.json` a calibration produced: the AWQ
/// search, and NOVAQ's per-layer layout.
pub fn verification_sections(
    cal: &Calibration,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut extra = serde_json::Map::new();
    if !cal.awq.is_empty() {
        extra.insert("awq".into(), serde_json::to_value(&cal.awq)?);
    }
    if !cal.experts.is_empty() {
        extra.insert("experts".into(), serde_json::to_value(&cal.experts)?);
    }
    let novaq: Vec<serde_json::Value> = cal
        .summaries()
        .into_iter()
        .filter_map(|(name, c)| {
            let mut v = serde_json::to_value(c.novaq.as_ref()?).ok()?;
            v["name"] = name.into();
            Some(v)
        })
        .collect();
    if !novaq.is_empty() {
        extra.insert("novaq".into(), novaq.into());
    }
    if let Some(mix) = &cal.mix {
        let measured: BTreeMap<&String, f64> = mix
            .types
            .keys()
            .filter_map(|n| Some((n, cal.summary(n)?.output_rel_error)))
            .collect();
        extra.insert(
            "gguf_mix".into(),
            serde_json::json!({
                "target_bpw": mix.target_bpw,
                "like": mix.like,
                "planned_bpw": mix.planned_bpw,
                "total_params": mix.total_params,
                "fixed_bits": mix.fixed_bits,
                "types": mix.types,
                "histogram": mix.histogram().iter().map(|(t, n, p)| {
                    serde_json::json!({"type": t.name(), "tensors": n, "params": p})
                }).collect::<Vec<_>>(),
                "predicted_rel_error": mix.predicted,
                "measured_rel_error": measured,
                "profile": mix.profile,
            }),
        );
    }
    Ok(extra)
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

//! [`Plan`]: quantize options validated once, in the library, into what the run will do.
//! Every refusal of a combination lives in [`Plan::new`], so a program calling the library
//! gets the same checks as the command line; [`Plan::run`] opens the source once and drives
//! the one path: calibrate (when the method needs it), write the bundle, export a GGUF.

use crate::apq::ApqSettings;
use crate::calibrate::{CalibSpec, Rounding};
use crate::options::{Choice, EmbeddingMode, Lossless, Method, OutputFormat, QuantizeOptions};
use crate::quantize::{
    quantize_model, NovaqSettings, Precomputed, QuantizeConfig, QuantizeSummary, RotateSettings,
    Target,
};
use adaptq_bundle::output::{check_replaceable, Kind, Staged};
use adaptq_quant::ggml::{BlockType, GgmlSpec};
use adaptq_quant::Grid;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Reports how far a run is. Stages follow each other; each counts its own units.
pub trait Progress {
    /// A stage begins: `what` (gptq, profile, quantize, export…) over `total` `unit`s.
    fn stage(&mut self, what: &str, unit: &'static str, total: usize);
    /// `done` of `total` units of the current stage; `bytes`: source bytes read so far.
    fn advance(&mut self, done: usize, total: usize, bytes: u64);
    /// A line worth telling the user (where memory went, say).
    fn note(&mut self, _line: &str) {}
}

/// Runs without reporting.
impl Progress for () {
    fn stage(&mut self, _: &str, _: &'static str, _: usize) {}
    fn advance(&mut self, _: usize, _: usize, _: u64) {}
}

/// Refusals a front end may want to explain in its own terms (which flag to add).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The method calibrates, and no calibration text was given.
    #[error("method {0} needs calibration text (e.g. ../shared/corpora/austen/emma.txt)")]
    NeedsCalibration(&'static str),
    /// Rotation was asked for without calibration text.
    #[error("rotation needs calibration text: rotated layers are quantized through the calibrated pipeline")]
    RotationNeedsCalibration,
    /// A NOVAQ setting was given with another method.
    #[error("preset, target_bits and spread_bits are NOVAQ settings; they need method novaq")]
    NovaqOnly,
}

/// What runs before the bundle is written.
enum Stage {
    /// Every tensor is rounded on its own (RTN, ternary, GGML RTN, NOVAQ without text).
    Direct,
    Calibrate {
        calib: PathBuf,
        spec: CalibSpec,
    },
    Apq {
        calib: PathBuf,
        settings: ApqSettings,
    },
}

/// A validated quantize run.
pub struct Plan {
    options: QuantizeOptions,
    src: String,
    out: PathBuf,
    stage: Stage,
    config: QuantizeConfig,
    /// The block range of a part job.
    range: Option<std::ops::Range<usize>>,
}

/// What a block-range job wrote: a part for `adaptq merge`.
pub struct PartOutcome {
    pub dir: PathBuf,
    pub state: crate::checkpoint::State,
}

/// What a run wrote.
pub struct Outcome {
    pub summary: QuantizeSummary,
    /// The bundle folder, or the GGUF file with `format: gguf`.
    pub out: PathBuf,
    pub gguf: Option<adaptq_export::ExportSummary>,
}

impl Outcome {
    /// Every gate passed.
    pub fn passed(&self) -> bool {
        self.summary.verification.overall_status.passed()
    }
}

fn parse_ggml(s: &str) -> Result<BlockType> {
    BlockType::parse(s).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown GGML type '{s}'; choose one of {}",
            adaptq_quant::ggml::ALL.map(|t| t.name()).join(", ")
        )
    })
}

/// The GGML types of a run, refusing what cannot be written onto them.
fn ggml_spec(o: &QuantizeOptions, grid: Grid) -> Result<Option<GgmlSpec>> {
    let linear = match (&o.output.ggml_type, o.output.format) {
        (Some(t), _) => parse_ggml(t)?,
        (None, OutputFormat::Gguf) => adaptq_quant::ggml::nearest(o.bits.hi, grid),
        (None, OutputFormat::Bundle) => return Ok(None),
    };
    match o.method {
        Method::Apq => bail!("apq mixes adaptq widths; GGML types are not supported with it yet (quantize APQ to a bundle, then export it to GGUF)"),
        Method::Novaq => bail!("NOVAQ codebooks are not GGML blocks; quantize to a bundle (a GGUF export re-rounds them)"),
        _ if o.transforms.refit => bail!("refit re-fits adaptq group scales; it does not apply to GGML types"),
        _ => {}
    }
    let embedding = match o.output.ggml_embedding_type.to_ascii_lowercase().as_str() {
        "f16" | "f32" => None,
        t => Some(parse_ggml(t)?),
    };
    Ok(Some(GgmlSpec { linear, embedding }))
}

/// Refuses rotation where it cannot work.
fn check_rotation(o: &QuantizeOptions, ggml: bool) -> Result<()> {
    if !o.transforms.rotate {
        return Ok(());
    }
    if o.method == Method::Ternary {
        bail!("rotation works with method rtn, gptq, apq or novaq, not ternary");
    }
    if ggml {
        bail!("rotation needs an online rotation llama.cpp does not run; quantize to a bundle");
    }
    if o.calibration.calib.is_none() {
        return Err(PlanError::RotationNeedsCalibration.into());
    }
    if o.transforms.awq || o.method == Method::Awq {
        bail!("rotation cannot be combined with AWQ: AWQ folds its scales into the norms and up's rows, before the online rotations");
    }
    Ok(())
}

/// The entropy-coded grid: a step for methods that round onto adaptq's groups, coded by rANS.
fn check_entropy_step(o: &QuantizeOptions, ggml: bool) -> Result<()> {
    let Some(k) = o.grid.entropy_step else {
        if o.grid.embed_step.is_some() {
            bail!(
                "embed_step is the table's entropy-coded step; set entropy_step for the layers too"
            );
        }
        return Ok(());
    };
    for (key, k) in [
        ("entropy_step", k),
        ("embed_step", o.grid.embed_step.unwrap_or(k)),
    ] {
        if !(k.is_finite() && k > 0.0 && k <= 4.0) {
            bail!("{key} is a step in units of each group's RMS, above 0 and at most 4; got {k}");
        }
    }
    if o.grid.embed_step.is_some() && o.grid.embeddings != EmbeddingMode::Quant {
        bail!("embed_step applies to a quantized table: set embeddings to quant");
    }
    match o.method {
        Method::Rtn | Method::Gptq | Method::Awq => {}
        Method::Apq => bail!(
            "apq plans fixed code widths; it does not plan an entropy-coded step (use method gptq)"
        ),
        m => bail!(
            "entropy_step sets adaptq's integer grid; method {} does not round onto it",
            m.name()
        ),
    }
    if ggml {
        bail!(
            "GGML types have their own block scales; entropy_step applies to adaptq's bundle grid"
        );
    }
    if o.grid.range_search {
        bail!("entropy_step sets each group's step; range_search would fit its range instead: choose one");
    }
    if o.output.lossless != Lossless::Rans {
        bail!(
            "entropy_step codes cost their entropy only when entropy-coded: set lossless to rans"
        );
    }
    Ok(())
}

/// NOVAQ's settings from the options; `None` for other methods.
fn novaq_settings(o: &QuantizeOptions) -> Result<Option<NovaqSettings>> {
    if o.method != Method::Novaq {
        if o.novaq.preset.is_some() || o.novaq.target_bits.is_some() || o.novaq.spread_bits {
            return Err(PlanError::NovaqOnly.into());
        }
        return Ok(None);
    }
    if o.novaq.spread_bits && o.calibration.calib.is_none() {
        bail!("spread_bits chooses each layer's bits by measured sensitivity: give calibration text (calib)");
    }
    Ok(Some(NovaqSettings {
        preset: o.novaq.preset.map(|p| p.name().to_string()),
        spread: o.novaq.spread_bits,
        targets: Default::default(),
        config: adaptq_quant::novaq::NovaqConfig {
            target_bits: o
                .novaq
                .target_bits
                .or(o.novaq.preset.map(|p| p.target_bits()))
                .unwrap_or(2.5),
            level1_centroids: o.novaq.codebooks.level1_centroids,
            level2_centroids: o.novaq.codebooks.level2_centroids,
            min_subspace_dim: o.novaq.codebooks.min_subspace_dim,
            max_subspace_dim: o.novaq.codebooks.max_subspace_dim,
            max_iterations: o.novaq.search.max_iterations,
            tolerance: o.novaq.search.tolerance,
            seed: o.seed,
            refine_iterations: o.novaq.search.refine_iterations,
            damp: o.calibration.gptq.damp,
            ..Default::default()
        },
    }))
}

/// `embed_bits` names a width of adaptq's grid for a table that is quantized onto it.
fn check_embed_bits(o: &QuantizeOptions, ggml: bool) -> Result<()> {
    let Some(b) = o.grid.embed_bits else {
        return Ok(());
    };
    if !(2..=8).contains(&b) {
        bail!("embed_bits must be between 2 and 8, got {b}");
    }
    match o.method {
        Method::Apq
            if !crate::apq::CANDIDATES.contains(&b) || !(o.bits.lo..=o.bits.hi).contains(&b) =>
        {
            bail!(
            "with apq, embed_bits pins the table to one of its widths: one of {:?} within bits {}",
            crate::apq::CANDIDATES,
            o.bits
        )
        }
        Method::Apq => Ok(()),
        Method::Novaq | Method::Ternary => bail!(
            "embed_bits is a width on adaptq's integer grid; method {} does not round onto it",
            o.method.name()
        ),
        _ if ggml => {
            bail!("with GGML types the table's type is the embedding type; leave embed_bits out")
        }
        _ if o.grid.embeddings != EmbeddingMode::Quant => {
            bail!("embed_bits sets the width of a quantized embedding table: give embeddings quant")
        }
        _ => Ok(()),
    }
}

/// The width of an embedding table quantized on adaptq's grid: `embed_bits`, else `bits`.
fn quantized_embed_bits(o: &QuantizeOptions) -> Option<u8> {
    (o.grid.embeddings == EmbeddingMode::Quant).then(|| o.grid.embed_bits.unwrap_or(o.bits.hi))
}

/// NOVAQ has no grid: its bundles name the RTN it is compared with per layer (the integer
/// width below the budget, group 64, asymmetric).
fn novaq_comparison(n: &NovaqSettings) -> (u8, usize) {
    ((n.config.target_bits.floor() as u8).clamp(2, 8), 64)
}

/// A GGUF type mix, asked for by a bit budget on a run that writes GGML types (APQ's budget is
/// its own).
fn mix_target(o: &QuantizeOptions, ggml: bool) -> Option<crate::mix::MixTarget> {
    if o.apq.target_bpw.is_none() && o.output.like.is_none() {
        return None;
    }
    (ggml && o.method != Method::Apq).then(|| crate::mix::MixTarget {
        target_bpw: o.apq.target_bpw,
        like: o.output.like.clone(),
        embeddings: o.grid.embeddings,
        types: mix_types(o).unwrap_or_default(),
    })
}

/// The types a mix may choose from: `mix_types` parsed, or every mix type.
fn mix_types(o: &QuantizeOptions) -> Result<Vec<BlockType>> {
    let Some(list) = &o.output.mix_types else {
        return Ok(crate::mix::MIX_TYPES.to_vec());
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let t = parse_ggml(name)?;
        if !crate::mix::MIX_TYPES.contains(&t) {
            bail!(
                "a type mix chooses among {}; '{name}' is not one of them",
                crate::mix::MIX_TYPES.map(|t| t.name()).join(", ")
            );
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("mix_types names no GGML type");
    }
    Ok(out)
}

/// Refuses a bit budget the run cannot spend.
fn check_budget(o: &QuantizeOptions, ggml: bool) -> Result<()> {
    if o.output.mix_types.is_some() {
        if o.apq.target_bpw.is_none() && o.output.like.is_none() {
            bail!("mix_types narrows a GGUF type mix; give it a budget (target_bpw or like)");
        }
        mix_types(o)?;
    }
    if let Some(name) = &o.output.like {
        if o.apq.target_bpw.is_some() {
            bail!("give a type mix one budget: target_bpw or like, not both");
        }
        if o.method == Method::Apq {
            bail!("like names a GGUF type mix; method apq has its own budget (target_bpw)");
        }
        if !crate::like::PRESETS.contains(&name.to_ascii_uppercase().as_str()) {
            bail!(
                "unknown llama.cpp type name '{name}' for like; known: {}",
                crate::like::PRESETS.join(", ")
            );
        }
    } else if o.apq.target_bpw.is_none() || o.method == Method::Apq {
        return Ok(());
    }
    if !ggml {
        bail!(
            "target_bpw (or like) is a budget for method apq, or for a GGUF type mix (format \
             gguf or a ggml_type); method {} writing a bundle has no budget to spend",
            o.method.name()
        );
    }
    if !matches!(o.method, Method::Rtn | Method::Gptq | Method::Awq) {
        bail!(
            "a GGUF type mix rounds with rtn, gptq or awq, not {}",
            o.method.name()
        );
    }
    if o.calibration.calib.is_none() {
        bail!("a GGUF type mix is chosen by measured sensitivity: give calibration text (calib)");
    }
    Ok(())
}

/// Refuses job settings (resume, block ranges, float inputs) where they cannot apply.
fn check_job(o: &QuantizeOptions, stage: &Stage) -> Result<Option<std::ops::Range<usize>>> {
    let j = &o.job;
    let fp = o.calibration.calib_inputs == crate::options::CalibInputs::Fp;
    let asked = j.resume || j.blocks.is_some() || j.inputs_from.is_some() || fp;
    let spec = match stage {
        Stage::Calibrate { spec, .. } => spec,
        _ if !asked => return Ok(None),
        _ => bail!(
            "resume, blocks, inputs_from and calib_inputs apply to the block-by-block \
             calibration of methods gptq, awq, novaq (with calib) and calibrated rtn (rotate \
             or a type mix); method {} {}",
            o.method.name(),
            match o.method {
                Method::Apq => "re-runs the whole model while promoting layers",
                _ => "does not calibrate here",
            }
        ),
    };
    if j.no_checkpoint && (j.resume || j.blocks.is_some()) {
        bail!("no_checkpoint saves nothing: it cannot be combined with resume or blocks");
    }
    let Some(r) = &j.blocks else {
        if j.inputs_from.is_some() {
            bail!("inputs_from names the part before a block range: give blocks too");
        }
        return Ok(None);
    };
    let range = crate::checkpoint::parse_range(r)?;
    if spec.mix.is_some() {
        bail!(
            "a GGUF type mix is chosen over the whole model; it cannot be split into block ranges"
        );
    }
    if spec.novaq_spread {
        bail!("spread_bits spreads NOVAQ's bits over the whole model; it cannot be split into block ranges");
    }
    Ok(Some(range))
}

/// The calibration stage of a method, or [`Stage::Direct`].
fn stage(
    o: &QuantizeOptions,
    grid: Grid,
    ggml: Option<GgmlSpec>,
    novaq: Option<&NovaqSettings>,
) -> Result<Stage> {
    let calib = || {
        o.calibration
            .calib
            .clone()
            .ok_or(PlanError::NeedsCalibration(o.method.name()))
    };
    let rotate = o.transforms.rotate.then_some(o.seed);
    Ok(match o.method {
        Method::Rtn | Method::Ternary
            if !o.transforms.rotate && mix_target(o, ggml.is_some()).is_none() =>
        {
            Stage::Direct
        }
        Method::Novaq if o.calibration.calib.is_none() => Stage::Direct,
        Method::Apq => {
            let overhead = match (o.grid.group_size, o.grid.sym) {
                (0, _) => 0.0,
                (g, true) => 16.0 / g as f64,
                (g, false) => 32.0 / g as f64,
            };
            let (lo, hi) = (o.bits.lo, o.bits.hi);
            Stage::Apq {
                calib: calib()?,
                settings: ApqSettings {
                    target_bpw: o
                        .apq
                        .target_bpw
                        .unwrap_or((lo + hi) as f64 / 2.0 + overhead),
                    widths: crate::apq::CANDIDATES
                        .iter()
                        .copied()
                        .filter(|b| (lo..=hi).contains(b))
                        .collect(),
                    group_size: o.grid.group_size,
                    grid,
                    range_search: o.grid.range_search,
                    transforms: o.transforms.clone(),
                    gptq: o.calibration.gptq,
                    max_bpw: o.gates.max_bpw,
                    promotion: o.apq.promotion,
                    gold_prompts: Vec::new(),
                    gold_tokens: o.apq.gold.gold_tokens,
                    embed_bits: o.grid.embed_bits,
                },
            }
        }
        _ => {
            let spec = match novaq {
                Some(n) => CalibSpec {
                    bits: novaq_comparison(n).0,
                    group_size: novaq_comparison(n).1,
                    grid: Grid::Asymmetric,
                    rounding: Rounding::Novaq(n.config),
                    awq: false,
                    widths: Default::default(),
                    embed_bits: None,
                    keep_hessians: false,
                    refit: false,
                    ggml: None,
                    rotate,
                    range_search: false,
                    entropy_step: None,
                    embed_step: None,
                    ggml_types: Default::default(),
                    mix: None,
                    novaq_spread: n.spread,
                    novaq_targets: Default::default(),
                },
                None => CalibSpec {
                    bits: o.bits.hi,
                    group_size: o.grid.group_size,
                    grid,
                    rounding: match o.method {
                        Method::Gptq => Rounding::Gptq(o.calibration.gptq),
                        _ => Rounding::Rtn,
                    },
                    awq: o.transforms.awq || o.method == Method::Awq,
                    widths: Default::default(),
                    // GPTQ calibrates a quantized head (a tied table too) on its inputs.
                    embed_bits: (ggml.is_none() && o.method.runs_gptq())
                        .then(|| quantized_embed_bits(o))
                        .flatten(),
                    keep_hessians: false,
                    refit: o.transforms.refit,
                    ggml,
                    rotate,
                    range_search: o.grid.range_search,
                    entropy_step: o.grid.entropy_step,
                    embed_step: o.grid.embed_step,
                    ggml_types: Default::default(),
                    mix: mix_target(o, ggml.is_some()),
                    novaq_spread: false,
                    novaq_targets: Default::default(),
                },
            };
            Stage::Calibrate {
                calib: calib()?,
                spec,
            }
        }
    })
}

impl Plan {
    /// Validates `options`: every refusal of a setting or combination happens here.
    pub fn new(options: QuantizeOptions) -> Result<Plan> {
        let o = &options;
        let Some(src) = o.src.clone() else {
            bail!(
                "no model to quantize: give a file, folder or hf://, https://, ollama:// locator"
            );
        };
        let Some(out) = o.out.clone() else {
            bail!("no output: name the bundle folder (or .gguf file) to write");
        };
        if o.bits.lo != o.bits.hi && o.method != Method::Apq {
            bail!("bits {} is a range; only method apq mixes widths", o.bits);
        }
        let grid = if o.grid.sym {
            Grid::Symmetric
        } else {
            Grid::Asymmetric
        };
        let shrink = o.calibration.gptq.hessian_shrink;
        if !(0.0..=1.0).contains(&shrink) {
            bail!("hessian_shrink is a fraction from 0 to 1, got {shrink}");
        }
        let ggml = ggml_spec(o, grid)?;
        check_embed_bits(o, ggml.is_some())?;
        check_refine(o)?;
        check_rotation(o, ggml.is_some())?;
        check_entropy_step(o, ggml.is_some())?;
        check_budget(o, ggml.is_some())?;
        let novaq = novaq_settings(o)?;
        let stage = stage(o, grid, ggml, novaq.as_ref())?;
        let range = check_job(o, &stage)?;
        let (bits, group_size) = match (o.method, &novaq) {
            // Ternary codes live on the 2-bit symmetric grid; record what is stored.
            (Method::Ternary, _) => (2, o.grid.group_size),
            (_, Some(n)) => novaq_comparison(n),
            _ => (o.bits.hi, o.grid.group_size),
        };
        let config = QuantizeConfig {
            method: o.method,
            bits,
            group_size,
            grid: if (o.grid.sym && novaq.is_none()) || o.method == Method::Ternary {
                Grid::Symmetric
            } else {
                Grid::Asymmetric
            },
            // Embeddings are part of APQ's mix: they take the width it chose.
            embeddings: match o.method {
                Method::Apq => EmbeddingMode::Quant,
                _ => o.grid.embeddings,
            },
            seed: o.seed,
            shard_max_bytes: o.output.shard_size,
            min_cosine: o.gates.min_cosine,
            max_bpw: o.gates.max_bpw,
            gptq: o.method.runs_gptq().then_some(o.calibration.gptq),
            calibration: None,
            ggml,
            novaq,
            rotate: o.transforms.rotate.then(|| RotateSettings {
                kind: "hadamard".into(),
                seed: o.seed,
            }),
            lossless: (o.output.lossless == Lossless::Rans).then_some(Lossless::Rans),
            range_search: o.grid.range_search,
            entropy_step: o.grid.entropy_step,
            embed_step: o.grid.embed_step,
            embed_bits: o.grid.embed_bits,
            ggml_types: Default::default(),
            options: Some(o.recorded()),
        };
        Ok(Plan {
            options,
            src,
            out,
            stage,
            config,
            range,
        })
    }

    pub fn options(&self) -> &QuantizeOptions {
        &self.options
    }

    /// The source as given (a path or a remote locator).
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Checks the output, opens the source once, calibrates if the method needs it, writes
    /// the bundle and, for `format: gguf`, exports it.
    pub fn run(&self, progress: &mut dyn Progress) -> Result<Outcome> {
        self.check_output()?;
        let opened = adaptq_remote::open(&self.src).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.run_on(opened.source.as_ref(), &opened.locator, progress)
    }

    /// Whether this run is a block-range job ([`Plan::run_part`]).
    pub fn is_part(&self) -> bool {
        self.range.is_some()
    }

    /// A block-range job: calibrates its blocks into the part folder `out` (resuming it with
    /// `resume`), for [`Plan::merge`].
    pub fn run_part(&self, progress: &mut dyn Progress) -> Result<PartOutcome> {
        let opened = adaptq_remote::open(&self.src).map_err(|e| anyhow::anyhow!("{e}"))?;
        let job = self
            .job(&opened.locator)
            .filter(|_| self.range.is_some())
            .context("not a block-range job: run it with Plan::run")?;
        self.calibrate(opened.source.as_ref(), Some(&job), progress)?;
        let mut cp = crate::checkpoint::Checkpoint::open(&job.dir)?;
        // The last range's outputs feed no later block.
        if cp.state.end == cp.state.blocks {
            cp.drop_acts()?;
        }
        Ok(PartOutcome {
            dir: job.dir,
            state: cp.state.clone(),
        })
    }

    /// Joins the parts of one run (each from [`Plan::run_part`]) into the bundle (or GGUF)
    /// at `out`: the bytes one uninterrupted run with the same settings writes.
    pub fn merge(
        parts: &[PathBuf],
        out: &Path,
        force: bool,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        let parts = crate::checkpoint::open_parts(parts)?;
        let first = &parts[0].state;
        let mut options = first.options.clone();
        options.out = Some(out.to_path_buf());
        options.force = force;
        options.job = Default::default();
        let plan = Plan::new(options)?;
        plan.check_output()?;
        progress.stage("merge", "parts", parts.len());
        let mut cal = crate::calibrate::Calibration::default();
        for (i, p) in parts.iter().enumerate() {
            cal.absorb(p.calibration()?);
            progress.advance(i + 1, parts.len(), 0);
        }
        let info = first.calib.clone();
        let (locator, fingerprint) = (first.locator.clone(), first.fingerprint.clone());
        drop(parts);
        let opened = adaptq_remote::open(&plan.src).map_err(|e| anyhow::anyhow!("{e}"))?;
        let source = opened.source.as_ref();
        let now = crate::checkpoint::fingerprint(
            &plan.options.calibration_recorded(),
            &info,
            source,
            &locator,
        )?;
        if now != fingerprint {
            bail!(
                "{} is not the model the parts were calibrated on (or it changed since)",
                plan.src
            );
        }
        let pre = StageOutput {
            extra: crate::calibrate::verification_sections(&cal)?,
            cal,
            info,
            gates: Vec::new(),
        };
        plan.write(source, &locator, Some(pre), progress)
    }

    /// How the calibrated stage saves its progress: into `OUT.checkpoint` beside the output,
    /// or into the part folder of a range job. `None` for stages that do not stream blocks.
    fn job(&self, locator: &str) -> Option<crate::checkpoint::JobPlan> {
        let Stage::Calibrate { .. } = &self.stage else {
            return None;
        };
        let o = &self.options;
        if o.job.no_checkpoint {
            return None;
        }
        Some(crate::checkpoint::JobPlan {
            dir: match self.range {
                Some(_) => self.out.clone(),
                None => checkpoint_dir(&self.out),
            },
            range: self.range.clone(),
            resume: o.job.resume,
            force: o.force,
            fp_inputs: o.calibration.calib_inputs == crate::options::CalibInputs::Fp,
            inputs_from: o.job.inputs_from.clone(),
            options: o.clone(),
            recorded: o.calibration_recorded(),
            locator: locator.to_string(),
        })
    }

    /// Where calibration activations go when they do not fit in memory.
    fn spill(&self) -> crate::acts::Spill {
        let o = &self.options;
        let dir = match (&o.job.scratch, self.out.parent()) {
            (Some(d), _) => d.clone(),
            (None, Some(p)) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        crate::acts::Spill {
            dir,
            limit: o
                .job
                .scratch_limit
                .map_or_else(crate::acts::Spill::default_limit, |m| {
                    m.saturating_mul(1 << 20)
                }),
        }
    }

    /// What is at the output, checked before any work.
    fn check_output(&self) -> Result<()> {
        let kind = match self.options.output.format {
            OutputFormat::Gguf => gguf_kind(),
            OutputFormat::Bundle => Kind::Folder,
        };
        Ok(check_replaceable(&self.out, self.options.force, kind)?)
    }

    /// [`Plan::run`] on a source already open (`locator` is what the manifest records).
    pub fn run_on(
        &self,
        source: &dyn adaptq_source::TensorSource,
        locator: &str,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        if self.range.is_some() {
            bail!("a block-range job writes a part: run it with Plan::run_part");
        }
        self.check_output()?;
        let refine = self.options.refine.refine != crate::options::RefineMode::Off;
        if refine && source.desc().decoder.moe.is_some() {
            bail!("refinement of mixture-of-experts models is not built; quantize without refine");
        }
        let job = self.job(locator);
        let mut pre = self.calibrate(source, job.as_ref(), progress)?;
        if refine {
            pre = Some(self.refine(source, pre, progress)?);
        }
        let outcome = self.write(source, locator, pre, progress)?;
        if let Some(j) = job {
            crate::checkpoint::Checkpoint::remove(&j.dir)?;
        }
        Ok(outcome)
    }

    /// The settings the bundle is written with: the plan's, plus what calibration chose.
    fn write_config(&self, pre: Option<&StageOutput>) -> QuantizeConfig {
        let mut config = self.config.clone();
        config.calibration = pre.map(|p| p.info.config.clone());
        if let Some(mix) = pre.and_then(|p| p.cal.mix.as_ref()) {
            config.ggml_types = mix.types.clone();
        }
        if let (Some(n), Some(p)) = (config.novaq.as_mut(), pre) {
            n.targets = p.cal.novaq_targets.clone();
        }
        config
    }

    /// Teacher-guided refinement of the calibrated stage's codes (or of every tensor's own
    /// rounding when nothing calibrated), on the calibration windows.
    fn refine(
        &self,
        source: &dyn adaptq_source::TensorSource,
        pre: Option<StageOutput>,
        progress: &mut dyn Progress,
    ) -> Result<StageOutput> {
        let o = &self.options;
        let calib = o
            .calibration
            .calib
            .as_ref()
            .context("refinement needs calibration text (calib, e.g. emma.txt)")?;
        let w = adaptq_model::borrowed_source(source);
        let tok = w.tokenizer()?;
        let (windows, info) = crate::calibrate::prepare(
            &tok,
            w.desc().decoder.bos,
            calib,
            o.refine
                .refine_samples
                .unwrap_or(o.calibration.calib_samples),
            o.calibration.seq_len,
            o.seed,
        )?;
        drop((tok, w));
        let mut stage = pre.unwrap_or_else(|| StageOutput {
            cal: Default::default(),
            info,
            extra: Default::default(),
            gates: Vec::new(),
        });
        let config = self.write_config(Some(&stage));
        let settings = crate::refine::RefineSettings {
            mode: o.refine.refine,
            epochs: o.refine.refine_epochs,
            lr: o.refine.refine_lr,
            e2e_lr: o.refine.refine_e2e_lr,
            cosine_weight: o.refine.kd_cosine_weight,
            seed: o.seed,
            top_k: crate::refine::TOP_K,
        };
        let report = crate::refine::run(
            source,
            &config,
            &mut stage.cal,
            &windows,
            &settings,
            &mut phases(progress),
        )?;
        stage.extra.insert("refine".into(), report);
        Ok(stage)
    }

    /// Writes the bundle from the calibrated stage's output `pre` (and exports the GGUF).
    fn write(
        &self,
        source: &dyn adaptq_source::TensorSource,
        locator: &str,
        pre: Option<StageOutput>,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        let o = &self.options;
        // A GGUF is built from a bundle in a scratch folder beside the file, dropped after.
        let scratch = match o.output.format {
            OutputFormat::Gguf => Some(Staged::scratch(&self.out)?),
            OutputFormat::Bundle => None,
        };
        let (bundle, force) = match &scratch {
            Some(s) => (s.path().join("bundle"), false),
            None => (self.out.clone(), o.force),
        };
        let config = self.write_config(pre.as_ref());
        progress.stage("quantize", "tensors", source.tensors().len());
        let summary = quantize_model(
            source,
            &Target {
                locator,
                model_id: o.model_id.as_deref(),
                out: &bundle,
                force,
            },
            &config,
            pre.as_ref().map(|p| p.borrow()),
            &mut |d, t, b| progress.advance(d, t, b),
        )?;
        let gguf = match scratch {
            Some(_) => Some(export_gguf(&bundle, &self.out, None, o.force, progress)?),
            None => None,
        };
        Ok(Outcome {
            summary,
            out: self.out.clone(),
            gguf,
        })
    }

    /// The calibration stage's codes, or `None` when every tensor is rounded on its own.
    fn calibrate(
        &self,
        source: &dyn adaptq_source::TensorSource,
        job: Option<&crate::checkpoint::JobPlan>,
        progress: &mut dyn Progress,
    ) -> Result<Option<StageOutput>> {
        let o = &self.options;
        let blocks = source.desc().n_layers;
        Ok(match &self.stage {
            Stage::Direct => None,
            Stage::Calibrate { calib, spec } => {
                progress.stage(o.method.name(), "blocks", blocks);
                // One limit for the run and for what it reports.
                let spill = self.spill();
                let (cal, info) = crate::calibrate::run(
                    source,
                    &crate::calibrate::Sampling {
                        path: calib,
                        samples: o.calibration.calib_samples,
                        seq_len: o.calibration.seq_len,
                        seed: o.seed,
                    },
                    spec,
                    crate::calibrate::Flow {
                        fp_inputs: o.calibration.calib_inputs == crate::options::CalibInputs::Fp,
                        spill: Some(&spill),
                    },
                    job,
                    &mut |d, t| progress.advance(d, t, 0),
                )?;
                if let Some((bytes, spilled)) = cal.acts {
                    let mib = |b: u64| b as f64 / (1 << 20) as f64;
                    progress.note(&format!(
                        "calibration activations: {:.0} MiB per set, {} (limit {:.0} MiB)",
                        mib(bytes),
                        match spilled {
                            true => format!("spilled to {}", spill.dir.display()),
                            false => "held in memory".to_string(),
                        },
                        mib(spill.limit)
                    ));
                }
                let extra = crate::calibrate::verification_sections(&cal)?;
                Some(StageOutput {
                    cal,
                    info,
                    extra,
                    gates: Vec::new(),
                })
            }
            Stage::Apq { calib, settings } => {
                let settings = ApqSettings {
                    gold_prompts: read_prompts(o.apq.gold.gold_prompts.as_deref())?,
                    ..settings.clone()
                };
                let out = crate::apq::run(
                    source,
                    calib,
                    o.calibration.calib_samples,
                    o.calibration.seq_len,
                    o.seed,
                    &settings,
                    &mut phases(progress),
                )?;
                Some(StageOutput {
                    cal: out.cal,
                    info: out.info,
                    extra: out.extra,
                    gates: out.gates,
                })
            }
        })
    }
}

/// What a calibrated stage hands to the bundle writer.
struct StageOutput {
    cal: crate::calibrate::Calibration,
    info: crate::calibrate::CalibInfo,
    extra: serde_json::Map<String, serde_json::Value>,
    gates: Vec<crate::quantize::Gate>,
}

impl StageOutput {
    fn borrow(&self) -> Precomputed<'_> {
        Precomputed {
            cal: &self.cal,
            info: &self.info,
            extra: self.extra.clone(),
            gates: self.gates.clone(),
        }
    }
}

/// Progress of a stage that names its own phases: each new phase starts a stage of steps.
fn phases(progress: &mut dyn Progress) -> impl FnMut(&str, usize, usize) + '_ {
    let mut current = String::new();
    move |phase, done, total| {
        if phase != current {
            current = phase.to_string();
            progress.stage(phase, "steps", total);
        }
        progress.advance(done, total, 0);
    }
}

/// Refinement keeps four activation streams of every window in memory (2.4 MB a window for
/// SmolLM2 at 256 tokens): the cap keeps a typo from exhausting it after calibration.
const MAX_REFINE_SAMPLES: usize = 1024;

/// Refinement's settings, and what it cannot run with.
fn check_refine(o: &QuantizeOptions) -> Result<()> {
    let r = &o.refine;
    if r.refine == crate::options::RefineMode::Off {
        return Ok(());
    }
    if o.calibration.calib.is_none() {
        bail!("refinement needs calibration text (calib, e.g. emma.txt)");
    }
    if o.job.blocks.is_some() {
        bail!("refinement trains across blocks; it cannot run in a block-range job");
    }
    if r.refine_epochs == 0 {
        bail!("refine_epochs must be at least 1");
    }
    if !(r.refine_lr.is_finite() && r.refine_lr > 0.0) {
        bail!("refine_lr must be a positive number, got {}", r.refine_lr);
    }
    if let Some(lr) = r.refine_e2e_lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
        bail!("refine_e2e_lr must be a positive number, got {lr}");
    }
    if !(r.kd_cosine_weight.is_finite() && r.kd_cosine_weight >= 0.0) {
        bail!(
            "kd_cosine_weight must be zero or more, got {}",
            r.kd_cosine_weight
        );
    }
    match r.refine_samples {
        Some(n) if n < 2 => {
            bail!("refinement holds out some of its windows: refine_samples must be at least 2")
        }
        Some(n) if n > MAX_REFINE_SAMPLES => bail!(
            "refine_samples is {n}; refinement holds every window's activations in memory, \
             so at most {MAX_REFINE_SAMPLES}"
        ),
        None if o.calibration.calib_samples < 2 => {
            bail!("refinement holds out some calibration windows: calib_samples must be at least 2")
        }
        _ => {}
    }
    Ok(())
}

/// Where a whole run keeps its checkpoint: `OUT.checkpoint` beside the output.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".checkpoint");
    PathBuf::from(name)
}

/// Gold prompts, one per line (blank lines skipped); the built-in set when no file is given.
pub fn read_prompts(file: Option<&Path>) -> Result<Vec<String>> {
    let text = match file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading gold prompts {}: {e}", p.display()))?,
        None => include_str!("../../../prompts/gold.txt").to_string(),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// What a forced run may replace at a GGUF output path: a GGUF adaptq wrote.
pub fn gguf_kind() -> Kind<'static> {
    Kind::File {
        is_ours: &adaptq_export::is_adaptq_gguf,
    }
}

/// Opens a bundle after checking every hash: exports never start from a bundle that fails.
pub fn verified_bundle(dir: &Path) -> Result<adaptq_bundle::Bundle> {
    if !dir.join(adaptq_bundle::MANIFEST).exists() {
        bail!("{}: not a bundle (no manifest.json)", dir.display());
    }
    let rep = adaptq_bundle::verify_bundle(dir, |_| {});
    if !rep.ok() {
        bail!(
            "{} does not verify; refusing to export it:\n{}",
            dir.display(),
            rep.problems.join("\n")
        );
    }
    Ok(adaptq_bundle::Bundle::open(dir)?)
}

/// Verifies the bundle at `dir` and writes it as a GGUF file at `out`.
pub fn export_gguf(
    dir: &Path,
    out: &Path,
    force_type: Option<BlockType>,
    force: bool,
    progress: &mut dyn Progress,
) -> Result<adaptq_export::ExportSummary> {
    check_replaceable(out, force, gguf_kind())?;
    let b = verified_bundle(dir)?;
    progress.stage("export", "tensors", b.manifest.tensors.len());
    adaptq_export::export_gguf(
        &b,
        out,
        &adaptq_export::ExportOptions { force_type, force },
        &mut |d, t| progress.advance(d, t, 0),
    )
}

/// Parses a GGML type name, listing the known ones when it is not one.
pub fn ggml_type(s: &str) -> Result<BlockType> {
    parse_ggml(s)
}

//! Every quantize setting in one serde type, [`QuantizeOptions`]: the command line parses its
//! flags into it, a YAML file (`--config`) holds the same keys (the long flag names with `_`
//! for `-`), and [`crate::Plan::new`] validates it. Defaults live here only.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A setting with a fixed set of named values, so a front end can list and explain them.
pub trait Choice: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
    /// One line on what the value does.
    fn help(self) -> &'static str;
    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }
}

/// Implements [`Choice`] from `(variant, name, help)` rows.
macro_rules! choice {
    ($t:ty { $($v:ident => $name:literal, $help:literal;)* }) => {
        impl Choice for $t {
            const ALL: &'static [Self] = &[$(<$t>::$v),*];
            fn name(self) -> &'static str {
                match self { $(<$t>::$v => $name),* }
            }
            fn help(self) -> &'static str {
                match self { $(<$t>::$v => $help),* }
            }
        }
    };
}

/// How the linear layers are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
    Awq,
    Apq,
    Ternary,
    Novaq,
}

impl Method {
    /// Whether this method rounds with GPTQ (APQ runs it at the widths it allocates), so the
    /// GPTQ settings (hessian_shrink) shape its bundle.
    pub fn runs_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::Apq)
    }
}

choice!(Method {
    Rtn => "rtn", "Round-to-nearest, per group.";
    Gptq => "gptq", "GPTQ: Hessian-aware rounding from calibration text (calib).";
    Awq => "awq", "AWQ: activation-aware channel scales folded into the norms, then round-to-nearest.";
    Apq => "apq", "APQ: per-layer widths from measured sensitivity under target_bpw (embeddings and head included), GPTQ at those widths, then promotion of the worst layers until the held-out perplexity gate (max_ppl_delta) passes or the budget runs out.";
    Ternary => "ternary", "Ternary: codes in {-1, 0, +1} times a per-group scale mean|w| (BitNet b1.58's rule, applied after training), stored at 2 bits plus the f16 scale. A model not trained ternary loses most of its quality; measure it with `eval --base`.";
    Novaq => "novaq", "NOVAQ: rows normalized, cut into vectors coded by two residual k-means codebooks sized per layer to target_bits (every overhead counted). With calibration text: Hessian-weighted distances, GPTQ-style error feedback, codebooks refined against each layer's output. Without: plain weighted k-means.";
});

/// What to do with embedding tables and a separate output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingMode {
    F16,
    F32,
    Quant,
}

choice!(EmbeddingMode {
    F16 => "f16", "Keep as f16 (embeddings are sensitive and, tied, double as the head).";
    F32 => "f32", "Keep as f32.";
    Quant => "quant", "Quantize with the linear layers' scheme.";
});

/// What the run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Bundle,
    Gguf,
}

choice!(OutputFormat {
    Bundle => "bundle", "adaptq's verified bundle folder.";
    Gguf => "gguf", "One GGUF v3 file for llama.cpp / Ollama / LM Studio.";
});

/// Lossless stage on the packed codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lossless {
    None,
    Rans,
}

choice!(Lossless {
    None => "none", "Codes stored as packed.";
    Rans => "rans", "Entropy-code the packed codes with rANS (parts that would not shrink stay packed).";
});

/// NOVAQ's named budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Balanced,
    HighQuality,
    Aggressive,
}

choice!(Preset {
    Balanced => "balanced", "About 1.5 bits per weight on the linear layers.";
    HighQuality => "high-quality", "About 2.5 bits per weight.";
    Aggressive => "aggressive", "About 1.0 bit per weight (quality drops sharply; measure it).";
});

impl Preset {
    pub fn target_bits(self) -> f64 {
        match self {
            Preset::Balanced => 1.5,
            Preset::HighQuality => 2.5,
            Preset::Aggressive => 1.0,
        }
    }
}

/// What each block is calibrated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibInputs {
    Quantized,
    Fp,
}

choice!(CalibInputs {
    Quantized => "quantized", "Each block on the outputs of the blocks before it as quantized, so it can correct their error (GPTQ's own order). A block-range job then starts from the previous range's saved activations (--inputs-from).";
    Fp => "fp", "Each block on the unquantized model's activations (llm-compressor's basic pipeline): block ranges are independent and run in parallel, each after a float forward pass up to its first block.";
});

/// Teacher-guided refinement after rounding ([`crate::refine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RefineMode {
    #[default]
    Off,
    Blockwise,
    E2e,
    Both,
}

choice!(RefineMode {
    Off => "off", "No refinement: the codes and scales calibration produced.";
    Blockwise => "blockwise", "Each block's scales, mins, codebooks and norms trained so its output on the quantized model's own inputs matches the unquantized block's on the unquantized model's inputs, so each block also makes up for the error of the blocks before it (relative squared error plus kd_cosine_weight times the cosine distance); one block in memory for gradients.";
    E2e => "e2e", "The whole model's scales, mins, codebooks and norms (the embedding's too when it is quantized) trained to the unquantized model's next-token distribution: KL(teacher || student) on its top-k tokens plus the tail, plus kd_cosine_weight times the cosine distance of the last hidden states.";
    Both => "both", "blockwise, then e2e.";
});

impl RefineMode {
    pub fn blockwise(self) -> bool {
        matches!(self, RefineMode::Blockwise | RefineMode::Both)
    }
    pub fn e2e(self) -> bool {
        matches!(self, RefineMode::E2e | RefineMode::Both)
    }
}

/// Refinement's option keys.
const REFINE_KEYS: [&str; 6] = [
    "refine",
    "refine_epochs",
    "refine_lr",
    "kd_cosine_weight",
    "refine_samples",
    "refine_e2e_lr",
];

/// Teacher-guided refinement settings. Codes stay fixed: the bit budget does not change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefineOptions {
    pub refine: RefineMode,
    /// Passes over the training windows per phase (each block, then the whole model); a phase
    /// stops early when the loss on the held-out windows rises.
    pub refine_epochs: usize,
    /// Adam step size at the start of each phase (then decayed to zero on a half cosine), in
    /// relative units: scales move as `s·(1 + δ)`, norms likewise.
    pub refine_lr: f64,
    /// Weight of the cosine distance between student and teacher block outputs in the loss.
    pub kd_cosine_weight: f64,
    /// Windows of the calibration text refinement trains and judges on, sampled like
    /// calibration's with the same seed; unset: `calib_samples`. Calibration needs few windows
    /// for its Hessians; training the codebooks against a teacher fits so few windows.
    pub refine_samples: Option<usize>,
    /// Adam step size at the start of the end-to-end phase; unset: `refine_lr`. Every layer
    /// moves the KL at once there, so the step one block takes can overshoot.
    pub refine_e2e_lr: Option<f64>,
}

impl Default for RefineOptions {
    fn default() -> Self {
        RefineOptions {
            refine: RefineMode::Off,
            refine_epochs: 2,
            refine_lr: 1e-3,
            kd_cosine_weight: 0.1,
            refine_samples: None,
            refine_e2e_lr: None,
        }
    }
}

/// Code widths: one (`4`) or, for APQ, a range (`3-4`). Written as a number or a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bits {
    pub lo: u8,
    pub hi: u8,
}

impl Bits {
    pub const fn one(b: u8) -> Bits {
        Bits { lo: b, hi: b }
    }
}

impl std::fmt::Display for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.hi)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl std::str::FromStr for Bits {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Bits> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let width = |x: &str| -> Result<u8> {
            let v: u8 = x.trim().parse().with_context(|| {
                format!("bits '{s}': expected a width like 4 or a range like 3-4")
            })?;
            if !(2..=8).contains(&v) {
                bail!("bits '{s}': widths must be between 2 and 8");
            }
            Ok(v)
        };
        let (lo, hi) = (width(a)?, width(b)?);
        if lo > hi {
            bail!("bits '{s}': the range must run low-high");
        }
        Ok(Bits { lo, hi })
    }
}

impl Serialize for Bits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u8(self.hi)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for Bits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Bits, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Every setting of a quantize run, with its default, in groups by stage. Each group is
/// flattened, so a config file (and the manifest) holds one flat mapping whose keys are the
/// long flag names with `_` for `-`; a key that names no setting is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantizeOptions {
    /// The model: a local file or folder, `hf://…`, `http(s)://…` or `ollama://…`.
    pub src: Option<String>,
    /// The bundle folder (or, with `format: gguf`, the .gguf file) to write.
    pub out: Option<PathBuf>,
    pub method: Method,
    pub bits: Bits,
    #[serde(flatten)]
    pub grid: GridOptions,
    #[serde(flatten)]
    pub transforms: TransformOptions,
    #[serde(flatten)]
    pub calibration: CalibOptions,
    #[serde(flatten)]
    pub apq: ApqOptions,
    #[serde(flatten)]
    pub novaq: NovaqOptions,
    #[serde(flatten)]
    pub output: OutputOptions,
    #[serde(flatten)]
    pub gates: GateOptions,
    #[serde(flatten)]
    pub job: JobOptions,
    #[serde(flatten)]
    pub refine: RefineOptions,
    /// Seed for every random choice; recorded in the manifest.
    pub seed: u64,
    pub model_id: Option<String>,
    /// Replace `out` if adaptq wrote it.
    pub force: bool,
}

/// The integer grid every method but NOVAQ rounds onto.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GridOptions {
    /// Columns per scale group; 0 = one group per output channel.
    pub group_size: usize,
    pub sym: bool,
    pub embeddings: EmbeddingMode,
    /// Code width of the embedding table and a separate head when they are quantized; `None`:
    /// the linear layers' width. A tied table decides every logit, so a wider table is often
    /// the cheapest bits spent.
    pub embed_bits: Option<u8>,
    /// Fit each group's range by an (importance-weighted) MSE clipping search, not min/max.
    pub range_search: bool,
    /// Entropy-coded grid: each group's step is this multiple of its RMS, the code width only
    /// a bound; the rANS stage then stores codes at about their entropy.
    pub entropy_step: Option<f32>,
    /// The embedding table's and a separate head's step (default: `entropy_step`).
    pub embed_step: Option<f32>,
}

/// How a calibrated run is split and carried over crashes. None of these change the bytes of
/// the bundle: a resumed run, or ranges merged, write what one uninterrupted run writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobOptions {
    /// Continue the run whose checkpoint is beside `out` (or in the part `out`).
    pub resume: bool,
    /// Calibrate only blocks `A..B` (half-open) and write a part for `adaptq merge`.
    pub blocks: Option<String>,
    /// The part that ends where this range starts (`calib_inputs: quantized` only).
    pub inputs_from: Option<PathBuf>,
    /// Save no checkpoint: nothing to resume, no disk used for it.
    pub no_checkpoint: bool,
    /// Folder for activations that do not fit in memory (default: the output's folder).
    pub scratch: Option<PathBuf>,
    /// MiB of one set of calibration activations held in memory before they are spilled
    /// (default: a quarter of the memory available at the start).
    pub scratch_limit: Option<u64>,
}

/// Changes to the weights around rounding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformOptions {
    /// Search and fold AWQ scales before GPTQ/APQ rounding (implied by `method: awq`).
    pub awq: bool,
    /// Re-fit group scales (and mins) to each layer's output error, codes fixed.
    pub refit: bool,
    /// Seeded Hadamard rotation of every linear layer's input.
    pub rotate: bool,
}

/// The calibration text and how it is sampled (calibrated methods).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CalibOptions {
    pub calib: Option<PathBuf>,
    pub calib_samples: usize,
    pub seq_len: usize,
    pub calib_inputs: CalibInputs,
    #[serde(flatten)]
    pub gptq: GptqSettings,
}

/// GPTQ's own settings; the manifest records them as given.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptqSettings {
    /// Hessian dampening, a fraction of the mean diagonal.
    pub damp: f64,
    pub act_order: bool,
    /// Fraction by which the Hessian's off-diagonal terms are shrunk toward zero: estimated
    /// from a few thousand tokens of one text, they are noisier than the diagonal.
    pub hessian_shrink: f64,
}

/// GPTQ's settings as a manifest records them: a shrinkage of 0 (the default) is left out, so a
/// bundle made before the setting existed keeps its digest.
pub(crate) fn gptq_record<S: serde::Serializer>(
    g: &Option<GptqSettings>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let mut v = serde_json::to_value(g).map_err(serde::ser::Error::custom)?;
    if let Some(m) = v.as_object_mut() {
        if m.get("hessian_shrink").and_then(|x| x.as_f64()) == Some(0.0) {
            m.remove("hessian_shrink");
        }
    }
    v.serialize(s)
}

/// APQ's budget and the gates its promotion loop answers to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApqOptions {
    /// Overall bits per weight to aim for, every tensor counted.
    pub target_bpw: Option<f64>,
    #[serde(flatten)]
    pub promotion: Promotion,
    #[serde(flatten)]
    pub gold: GoldOptions,
}

/// When APQ promotes layers to wider codes, and when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Promotion {
    /// Gate: held-out perplexity may rise at most this many percent over the unquantized model.
    pub max_ppl_delta: f64,
    pub promote_per_round: usize,
    pub max_rounds: usize,
    /// Held-out windows (from the end of the calibration text) the gate is measured on.
    pub heldout_windows: usize,
}

/// APQ's gold-prompt gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GoldOptions {
    /// One prompt per line; the built-in gold prompts when unset.
    pub gold_prompts: Option<PathBuf>,
    pub gold_tokens: usize,
}

/// NOVAQ's budget and codebook search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NovaqOptions {
    pub preset: Option<Preset>,
    /// Bits per weight of each linear layer (the preset's, or 2.5, when unset).
    pub target_bits: Option<f64>,
    /// `target_bits` as the linear layers' average, each layer's own chosen by sensitivity.
    pub spread_bits: bool,
    #[serde(flatten)]
    pub codebooks: CodebookOptions,
    #[serde(flatten)]
    pub search: SearchOptions,
}

/// NOVAQ codebook sizes and vector dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CodebookOptions {
    pub level1_centroids: usize,
    pub level2_centroids: usize,
    pub min_subspace_dim: usize,
    pub max_subspace_dim: usize,
}

/// NOVAQ's k-means and refinement effort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchOptions {
    pub max_iterations: usize,
    pub tolerance: f64,
    pub refine_iterations: usize,
}

/// What is written, and how its bytes are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputOptions {
    pub format: OutputFormat,
    /// A llama.cpp type name (Q4_0, Q4_K, …) for the linear layers.
    pub ggml_type: Option<String>,
    /// The embedding / output table's llama.cpp type, or f16/f32 to keep it as float.
    pub ggml_embedding_type: String,
    /// A llama-quantize type name whose file size a GGUF type mix aims at.
    pub like: Option<String>,
    /// The GGML types a type mix may choose from, comma-separated (all when unset).
    pub mix_types: Option<String>,
    pub lossless: Lossless,
    pub shard_size: u64,
}

/// Limits the verification report checks the bundle against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GateOptions {
    pub min_cosine: f64,
    pub max_bpw: Option<f64>,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            src: None,
            out: None,
            method: Method::Rtn,
            bits: Bits::one(4),
            grid: GridOptions::default(),
            transforms: TransformOptions::default(),
            calibration: CalibOptions::default(),
            apq: ApqOptions::default(),
            novaq: NovaqOptions::default(),
            output: OutputOptions::default(),
            gates: GateOptions::default(),
            job: JobOptions::default(),
            refine: RefineOptions::default(),
            seed: 0,
            model_id: None,
            force: false,
        }
    }
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            group_size: 128,
            sym: false,
            embeddings: EmbeddingMode::F16,
            embed_bits: None,
            range_search: false,
            entropy_step: None,
            embed_step: None,
        }
    }
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions {
            calib: None,
            calib_samples: 32,
            seq_len: 512,
            calib_inputs: CalibInputs::Quantized,
            gptq: GptqSettings::default(),
        }
    }
}

impl Default for GptqSettings {
    fn default() -> Self {
        GptqSettings {
            damp: 0.05,
            act_order: false,
            // Chosen on validation text never reported (persuasion.txt, Brown skills-hobbies):
            // of 0, 0.25, 0.5, 0.75 and 1, 0.25 gave the lowest KLD on both (README).
            hessian_shrink: 0.25,
        }
    }
}

impl Default for Promotion {
    fn default() -> Self {
        Promotion {
            max_ppl_delta: 2.0,
            promote_per_round: 4,
            max_rounds: 6,
            heldout_windows: 4,
        }
    }
}

impl Default for GoldOptions {
    fn default() -> Self {
        GoldOptions {
            gold_prompts: None,
            gold_tokens: 16,
        }
    }
}

impl Default for NovaqOptions {
    fn default() -> Self {
        let novaq = adaptq_quant::novaq::NovaqConfig::default();
        NovaqOptions {
            preset: None,
            target_bits: None,
            spread_bits: false,
            codebooks: CodebookOptions {
                level1_centroids: novaq.level1_centroids,
                level2_centroids: novaq.level2_centroids,
                min_subspace_dim: novaq.min_subspace_dim,
                max_subspace_dim: novaq.max_subspace_dim,
            },
            search: SearchOptions {
                max_iterations: novaq.max_iterations,
                tolerance: novaq.tolerance,
                refine_iterations: novaq.refine_iterations,
            },
        }
    }
}

impl Default for CodebookOptions {
    fn default() -> Self {
        NovaqOptions::default().codebooks
    }
}

impl Default for SearchOptions {
    fn default() -> Self {
        NovaqOptions::default().search
    }
}

impl Default for OutputOptions {
    fn default() -> Self {
        OutputOptions {
            format: OutputFormat::Bundle,
            ggml_type: None,
            ggml_embedding_type: "q8_0".into(),
            like: None,
            mix_types: None,
            lossless: Lossless::None,
            shard_size: adaptq_bundle::MAX_SHARD_BYTES,
        }
    }
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            min_cosine: 0.9,
            max_bpw: None,
        }
    }
}

impl QuantizeOptions {
    /// Reads a YAML config. Unknown keys are refused with their name; relative paths in the
    /// file are taken from the file's own folder, so a config works from any directory.
    pub fn from_yaml_file(path: &Path) -> Result<QuantizeOptions> {
        Self::merged(&Self::yaml_map(path)?, &serde_json::Value::Null)
    }

    /// The keys a YAML config sets (checked against this type, paths resolved), as JSON, so
    /// a front end can lay its own settings over them with [`QuantizeOptions::merged`].
    pub fn yaml_map(path: &Path) -> Result<serde_json::Value> {
        let text = adaptq_source::blob::read_small(path, CONFIG_LIMIT)
            .with_context(|| format!("reading config {}", path.display()))?;
        let text = String::from_utf8(text)
            .map_err(|_| anyhow::anyhow!("config {} is not UTF-8 text", path.display()))?;
        let mut v: serde_json::Value = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        if v.is_null() {
            v = serde_json::Value::Object(Default::default());
        }
        let Some(map) = v.as_object_mut() else {
            bail!("config {}: expected a mapping of settings", path.display());
        };
        let base = path.parent().unwrap_or(Path::new(""));
        for key in ["src", "calib", "gold_prompts", "out"] {
            if let Some(serde_json::Value::String(p)) = map.get(key) {
                // A locator (hf://, https://, ollama://) is not a path.
                if key == "src" && p.contains("://") {
                    continue;
                }
                let p = base.join(p).to_string_lossy().into_owned();
                map.insert(key.into(), p.into());
            }
        }
        // Checked here so the error names the file as well as the key.
        QuantizeOptions::merged(&v, &serde_json::Value::Null)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(v)
    }

    /// The defaults, overlaid by `file`'s keys, overlaid by `given`'s (each a JSON object of
    /// option keys, or null).
    pub fn merged(file: &serde_json::Value, given: &serde_json::Value) -> Result<QuantizeOptions> {
        let mut v = serde_json::to_value(QuantizeOptions::default())?;
        let all = v.as_object_mut().expect("options serialize as an object");
        for layer in [file, given] {
            for (k, x) in layer.as_object().into_iter().flatten() {
                // Every key is present in the defaults (an unset one as null), so one missing
                // there names no setting: serde's own check does not see through `flatten`.
                let Some(slot) = all.get_mut(k) else {
                    bail!(
                        "unknown field `{k}` (the keys are the long flag names with `_` for `-`)"
                    );
                };
                *slot = x.clone();
            }
        }
        serde_json::from_value(v).map_err(|e| Self::name_bad_key(file, given).unwrap_or(e.into()))
    }

    /// serde's type errors do not name the key through `flatten` ("expected u8"): find the
    /// first key that fails alone on the defaults and name it with its value.
    fn name_bad_key(file: &serde_json::Value, given: &serde_json::Value) -> Option<anyhow::Error> {
        let defaults = serde_json::to_value(QuantizeOptions::default()).ok()?;
        for layer in [file, given] {
            for (k, x) in layer.as_object().into_iter().flatten() {
                let mut v = defaults.clone();
                v.as_object_mut()?.insert(k.clone(), x.clone());
                if let Err(e) = serde_json::from_value::<QuantizeOptions>(v) {
                    return Some(anyhow::anyhow!("{k} = {x}: {e}"));
                }
            }
        }
        None
    }

    /// The options as YAML, as `--print-config` shows them and a config file takes them.
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_saphyr::to_string(self)?)
    }

    /// What a calibration checkpoint is keyed on: [`QuantizeOptions::recorded`] less
    /// refinement's settings. Refinement runs after calibration and is not saved, so a
    /// resumed run may refine differently.
    pub fn calibration_recorded(&self) -> serde_json::Value {
        // Recorded as refinement off, not recorded and then cut: `recorded` fills some gaps with
        // the last key, so the key order (which the fingerprint hashes) depends on what was set.
        let mut o = self.clone();
        o.refine = RefineOptions::default();
        o.recorded()
    }

    /// What the manifest records: every setting that decides the bundle's bytes, with paths
    /// cut to file names (a bundle must not depend on where the user keeps files), and without
    /// where it was written or whether that replaced anything.
    pub fn recorded(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("options serialize");
        let map = v.as_object_mut().expect("an object");
        // Keys added later are taken out first, keeping the others' order (the manifest's
        // bytes, and so its digest, follow it); `remove` below moves the last key into the gap,
        // as it did when bundles were first recorded.
        let calib_inputs = map.shift_remove("calib_inputs");
        // The embedding's own width and refinement's keys appear only when set; taken out here,
        // before the removals below fill gaps, so a bundle made without them keeps its digest.
        if self.grid.embed_bits.is_none() {
            map.shift_remove("embed_bits");
        }
        if self.refine.refine == RefineMode::Off {
            for key in REFINE_KEYS {
                map.shift_remove(key);
            }
        }
        if self.refine.refine_samples.is_none() {
            map.shift_remove("refine_samples");
        }
        // Without an end-to-end phase its step decides nothing.
        if self.refine.refine_e2e_lr.is_none() || !self.refine.refine.e2e() {
            map.shift_remove("refine_e2e_lr");
        }
        for key in [
            "resume",
            "blocks",
            "inputs_from",
            "no_checkpoint",
            "scratch",
            "scratch_limit",
        ] {
            map.shift_remove(key);
        }
        for key in ["src", "out", "force"] {
            map.remove(key);
        }
        // Settings added after bundles were first recorded appear only when set, so a bundle
        // made without them keeps its digest.
        for key in [
            "range_search",
            "entropy_step",
            "embed_step",
            "spread_bits",
            "like",
            "mix_types",
            "hessian_shrink",
        ] {
            let unset = match map.get(key) {
                Some(serde_json::Value::Bool(false) | serde_json::Value::Null) => true,
                Some(serde_json::Value::Number(n)) => n.as_f64() == Some(0.0),
                _ => false,
            };
            if unset {
                map.remove(key);
            }
        }
        // Only GPTQ reads the shrinkage: other methods' bundles do not depend on it.
        if !self.method.runs_gptq() {
            map.remove("hessian_shrink");
        }
        if let Some(c) = calib_inputs.filter(|c| c != "quantized") {
            map.insert("calib_inputs".into(), c);
        }
        for key in ["calib", "gold_prompts"] {
            if let Some(serde_json::Value::String(p)) = map.get(key) {
                let name = Path::new(p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                map.insert(key.into(), name.into());
            }
        }
        v
    }
}

/// Largest config file read.
const CONFIG_LIMIT: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.yaml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn yaml_keys_are_flag_names_and_unknown_keys_are_named() {
        let (d, p) = yaml(
            "method: gptq\nbits: 3-4\ngroup_size: 64\ncalib: emma.txt\nsym: true\nsrc: m.gguf\n",
        );
        let o = QuantizeOptions::from_yaml_file(&p).unwrap();
        assert_eq!(o.method, Method::Gptq);
        assert_eq!(o.bits, Bits { lo: 3, hi: 4 });
        assert_eq!(o.grid.group_size, 64);
        assert!(o.grid.sym);
        assert_eq!(
            o.calibration.calib.as_deref(),
            Some(d.path().join("emma.txt").as_path())
        );
        assert_eq!(
            o.src,
            Some(d.path().join("m.gguf").to_string_lossy().into_owned())
        );
        assert_eq!(
            o.calibration.seq_len,
            QuantizeOptions::default().calibration.seq_len
        );
        let (_d, p) = yaml("src: hf://org/model\n");
        let o = QuantizeOptions::from_yaml_file(&p).unwrap();
        assert_eq!(o.src.as_deref(), Some("hf://org/model"));

        let (_d, p) = yaml("method: rtn\ngroup-size: 64\n");
        let e = QuantizeOptions::from_yaml_file(&p).unwrap_err().to_string();
        assert!(e.contains("group-size") && e.contains("q.yaml"), "{e}");
        let (_d, p) = yaml("bits: 9\n");
        let e = format!("{:#}", QuantizeOptions::from_yaml_file(&p).unwrap_err());
        assert!(e.contains("between 2 and 8"), "{e}");
        let (_d, p) = yaml("- 1\n- 2\n");
        assert!(QuantizeOptions::from_yaml_file(&p).is_err());
        let given = serde_json::json!({"sym": true, "embed_bits": 300});
        let e = QuantizeOptions::merged(&serde_json::Value::Null, &given).unwrap_err();
        assert!(e.to_string().starts_with("embed_bits = 300: "), "{e}");
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let mut o = QuantizeOptions {
            method: Method::Apq,
            bits: Bits { lo: 2, hi: 8 },
            ..Default::default()
        };
        o.novaq.preset = Some(Preset::HighQuality);
        o.apq.target_bpw = Some(3.25);
        o.calibration.gptq.damp = 0.125;
        let (_d, p) = yaml(&o.to_yaml().unwrap());
        assert_eq!(QuantizeOptions::from_yaml_file(&p).unwrap(), o);
        let (_d, p) = yaml("");
        assert_eq!(
            QuantizeOptions::from_yaml_file(&p).unwrap(),
            QuantizeOptions::default()
        );
    }

    #[test]
    fn flags_override_the_file() {
        let file = serde_json::json!({"bits": 3, "seed": 5});
        let given = serde_json::json!({"bits": "4"});
        let o = QuantizeOptions::merged(&file, &given).unwrap();
        assert_eq!((o.bits, o.seed), (Bits::one(4), 5));
    }

    #[test]
    fn recorded_options_hold_no_paths() {
        let mut o = QuantizeOptions {
            src: Some("/home/u/m.gguf".into()),
            out: Some("/home/u/b".into()),
            ..Default::default()
        };
        o.calibration.calib = Some("/home/u/emma.txt".into());
        let r = o.recorded();
        assert!(r.get("src").is_none() && r.get("out").is_none());
        assert_eq!(r["calib"], "emma.txt");
    }

    /// Refinement's settings decide the bundle's bytes but not calibration's: a checkpoint
    /// made with one refinement resumes under another.
    #[test]
    fn refinement_keys_are_recorded_but_do_not_key_the_checkpoint() {
        let plain = QuantizeOptions::default();
        assert!(plain.recorded().get("refine").is_none());
        assert!(plain.recorded().get("refine_samples").is_none());
        let mut o = plain.clone();
        o.refine.refine = RefineMode::Both;
        o.refine.refine_lr = 0.003;
        o.refine.refine_samples = Some(64);
        o.refine.refine_e2e_lr = Some(3e-4);
        let r = o.recorded();
        assert_eq!(r["refine_e2e_lr"].as_f64(), Some(3e-4));
        assert_eq!(
            (r["refine"].as_str(), r["refine_samples"].as_u64()),
            (Some("both"), Some(64))
        );
        o.refine.refine_samples = None;
        o.refine.refine_e2e_lr = None;
        assert!(o.recorded().get("refine_samples").is_none());
        assert!(o.recorded().get("refine_e2e_lr").is_none());
        assert_ne!(o.recorded(), plain.recorded());
        // The fingerprint hashes the bytes, key order included.
        let bytes = |o: &QuantizeOptions| serde_json::to_vec(&o.calibration_recorded()).unwrap();
        for (samples, lr) in [(None, None), (Some(64), None), (None, Some(1e-4))] {
            o.refine.refine_samples = samples;
            o.refine.refine_e2e_lr = lr;
            assert_eq!(bytes(&o), bytes(&plain));
        }
        o.refine.refine = RefineMode::Blockwise;
        assert!(o.recorded().get("refine_e2e_lr").is_none());
        o.bits = Bits::one(3);
        assert_ne!(bytes(&o), bytes(&plain));
    }
}

//! `quantize`: stream a source tensor by tensor through a quantizer into a bundle.

use adaptq_bundle::codec::{encode_codes, encode_f16, encode_f32, encode_raw, Encoded};
use adaptq_bundle::manifest::SourceRef;
use adaptq_bundle::verification::GateLimits;
use adaptq_bundle::{BundleWriter, WriterOptions, MODEL_META, VERIFICATION};
use adaptq_quant::ggml::GgmlSpec;
use adaptq_quant::rtn::{quantize_rtn_fit, Fit};
use adaptq_quant::{Grid, LayerCodes, RtnConfig};
use adaptq_source::model::{layer_of, role_of};
use adaptq_source::{TensorRole, TensorSource};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

pub use crate::options::{EmbeddingMode, GptqSettings, Method};

/// Everything that decides the bytes of a bundle. Recorded whole in the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeConfig {
    pub method: Method,
    pub bits: u8,
    /// 0 = per-channel.
    pub group_size: usize,
    pub grid: Grid,
    pub embeddings: EmbeddingMode,
    /// Code width of a quantized embedding table and separate head, when not `bits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_bits: Option<u8>,
    /// Seed for every random choice (RTN makes none; recorded so later methods share the field).
    pub seed: u64,
    pub shard_max_bytes: u64,
    /// Gate: every quantized tensor must keep at least this weight cosine similarity.
    pub min_cosine: f64,
    /// Gate: overall bits per weight must not exceed this, when set.
    pub max_bpw: Option<f64>,
    /// GPTQ settings (method gptq only).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::options::gptq_record"
    )]
    pub gptq: Option<GptqSettings>,
    /// Calibration sampling (calibrated methods only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calibrate::CalibConfig>,
    /// Store llama.cpp block types (for GGUF export) instead of adaptq's own groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ggml: Option<GgmlSpec>,
    /// NOVAQ settings (method novaq only), the preset named when one was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub novaq: Option<NovaqSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate: Option<RotateSettings>,
    /// Lossless stage on code parts (`rans`), when one runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lossless: Option<crate::options::Lossless>,
    /// Group ranges fitted by clipping search instead of min/max.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub range_search: bool,
    /// Each group's step as a multiple of its RMS (entropy-coded grid), instead of its range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy_step: Option<f32>,
    /// The embedding table's and a separate head's step, when not `entropy_step`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_step: Option<f32>,
    /// GGML type per tensor of a type mix; a listed tensor takes this over `ggml`'s types.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ggml_types: BTreeMap<String, adaptq_quant::ggml::BlockType>,
    /// The settings as given ([`crate::QuantizeOptions::recorded`]), so a run can be repeated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Value>,
}

/// The input rotations a bundle's weights carry; the model re-applies them online on load.
#[derive(Debug, Clone, Serialize)]
pub struct RotateSettings {
    pub kind: String,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NovaqSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// `config.target_bits` is the linear layers' average, spread by sensitivity.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub spread: bool,
    /// Each layer's own target, when spread.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, f64>,
    #[serde(flatten)]
    pub config: adaptq_quant::novaq::NovaqConfig,
}

/// Codes already computed by a calibrated method, with what calibration measured.
pub struct Precomputed<'a> {
    /// The codes (held, or saved in checkpoint files), and the tensors stored instead of the
    /// source's (norms with AWQ scales folded in).
    pub cal: &'a crate::calibrate::Calibration,
    pub info: &'a crate::calibrate::CalibInfo,
    /// Extra sections for verification.json (AWQ search, APQ allocation, promotions, gates).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Gates measured by the calibrated pipeline (perplexity delta, spot checks, ...).
    pub gates: Vec<Gate>,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        QuantizeConfig {
            method: Method::Rtn,
            bits: 4,
            group_size: 128,
            grid: Grid::Symmetric,
            embeddings: EmbeddingMode::F16,
            embed_bits: None,
            seed: 0,
            shard_max_bytes: adaptq_bundle::MAX_SHARD_BYTES,
            min_cosine: 0.9,
            max_bpw: None,
            gptq: None,
            calibration: None,
            ggml: None,
            novaq: None,
            rotate: None,
            lossless: None,
            range_search: false,
            entropy_step: None,
            embed_step: None,
            ggml_types: BTreeMap::new(),
            options: None,
        }
    }
}

/// Progress after each tensor: (tensors done, tensors total, source bytes read so far).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, u64);

pub use adaptq_bundle::verification::{Gate, GateStatus, TensorReport, Totals, Verification};

pub struct QuantizeSummary {
    pub manifest: adaptq_bundle::Manifest,
    pub verification: Verification,
}

/// Companion files copied into the bundle so it is self-contained for eval/export.
fn companion_files(src: &dyn TensorSource) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(md) = src.gguf_metadata() {
        out.push(("gguf-metadata.json".to_string(), gguf_metadata_json(md)));
    }
    if let Some(dir) = src.companion_dir() {
        let mut names = vec!["LICENSE", "LICENSE.txt", "LICENSE.md"];
        if src.format() == "safetensors" {
            names.extend(["config.json", "tokenizer.json", "tokenizer_config.json"]);
        }
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                // Regular files of bounded size only: a model folder is a stranger's too.
                let bytes = adaptq_source::blob::read_small(&p, COMPANION_LIMIT)?;
                let name = if n.starts_with("LICENSE") {
                    "LICENSE"
                } else {
                    n
                };
                if !out.iter().any(|(k, _)| k == name) {
                    out.push((name.to_string(), bytes));
                }
            }
        }
    }
    Ok(out)
}

/// GGUF metadata as JSON with each value's GGUF type, so a GGUF can be rebuilt from a bundle.
pub fn gguf_metadata_json(md: &adaptq_source::gguf::Metadata) -> Vec<u8> {
    use adaptq_source::gguf::Value;
    fn conv(v: &Value) -> serde_json::Value {
        use serde_json::json;
        match v {
            Value::U8(x) => json!({"type": "u8", "value": x}),
            Value::I8(x) => json!({"type": "i8", "value": x}),
            Value::U16(x) => json!({"type": "u16", "value": x}),
            Value::I16(x) => json!({"type": "i16", "value": x}),
            Value::U32(x) => json!({"type": "u32", "value": x}),
            Value::I32(x) => json!({"type": "i32", "value": x}),
            Value::F32(x) => json!({"type": "f32", "value": x}),
            Value::Bool(x) => json!({"type": "bool", "value": x}),
            Value::String(x) => json!({"type": "string", "value": x}),
            Value::U64(x) => json!({"type": "u64", "value": x}),
            Value::I64(x) => json!({"type": "i64", "value": x}),
            Value::F64(x) => json!({"type": "f64", "value": x}),
            Value::Array(a) => json!({"type": "array", "element_type": a.element_type(),
                "value": a.iter().map(|i| conv(&i)["value"].clone()).collect::<Vec<_>>()}),
        }
    }
    let entries: Vec<serde_json::Value> = md
        .entries
        .iter()
        .map(|(k, v)| {
            let mut o = conv(v);
            o["key"] = serde_json::Value::String(k.clone());
            o
        })
        .collect();
    serde_json::to_vec(&entries).expect("metadata serializes")
}

/// Where a bundle goes and what it is called.
pub struct Target<'a> {
    /// What the user named as the source (recorded as a locator, never as an absolute path).
    pub locator: &'a str,
    /// Model id for the manifest; the source's own name when `None`.
    pub model_id: Option<&'a str>,
    pub out: &'a Path,
    /// Replace an existing bundle folder.
    pub force: bool,
}

/// Largest licence or tokenizer file copied from a source folder into a bundle.
const COMPANION_LIMIT: u64 = 64 << 20;

/// Whether a source tensor is quantized; embeddings and a separate head only when asked.
pub(crate) fn is_quantized(
    info: &adaptq_source::TensorInfo,
    role: TensorRole,
    cfg: &QuantizeConfig,
) -> bool {
    match role {
        TensorRole::Linear => true,
        TensorRole::Embedding | TensorRole::Output => {
            info.shape.len() == 2
                && match cfg.ggml {
                    Some(g) => g.embedding.is_some() || cfg.ggml_types.contains_key(&info.name),
                    None => cfg.embeddings == EmbeddingMode::Quant,
                }
        }
        _ => false,
    }
}

/// Codes for a tensor no calibration stage produced: each method's rounding on its own.
pub(crate) fn direct_codes(
    x: &[f32],
    info: &adaptq_source::TensorInfo,
    role: TensorRole,
    cfg: &QuantizeConfig,
) -> Result<(LayerCodes, &'static str)> {
    let cols = *info.shape.last().unwrap_or(&1);
    let rows = x.len() / cols.max(1);
    let calibrated_only = match cfg.ggml {
        Some(_) => cfg.method != Method::Rtn,
        None => !matches!(cfg.method, Method::Rtn | Method::Ternary | Method::Novaq),
    };
    if calibrated_only && role == TensorRole::Linear {
        bail!(
            "method {:?} produced no codes for linear tensor '{}'",
            cfg.method,
            info.name
        );
    }
    let named = |what: &str| format!("quantizing tensor '{}'{what}", info.name);
    if let Some(g) = cfg.ggml {
        let ty = match (cfg.ggml_types.get(&info.name), role) {
            (Some(&t), _) => t,
            (None, TensorRole::Linear) => g.linear,
            (None, _) => g.embedding.expect("only quantized with an embedding type"),
        };
        let (ty, _) = adaptq_quant::ggml::pick(ty, cols)
            .with_context(|| format!("tensor '{}'", info.name))?;
        let bytes = adaptq_quant::ggml::quantize_rtn(ty, x, rows, cols, None, cfg.range_search)
            .with_context(|| named(&format!(" as {}", ty.name())))?;
        return Ok((
            LayerCodes::Ggml {
                ty,
                rows,
                cols,
                bytes,
            },
            "rtn",
        ));
    }
    Ok(match cfg.method {
        Method::Ternary => (
            LayerCodes::Int(
                adaptq_quant::ternary::quantize_ternary(x, rows, cols, cfg.group_size)
                    .with_context(|| named(""))?,
            ),
            "ternary",
        ),
        Method::Novaq => {
            // No calibration (an encoder, say): plain weighted k-means, no refinement.
            let ncfg = cfg
                .novaq
                .as_ref()
                .map(|n| n.config)
                .context("method novaq needs its settings")?;
            let ncfg = adaptq_quant::novaq::NovaqConfig {
                seed: crate::calibrate::layer_seed(ncfg.seed, &info.name),
                ..ncfg
            };
            let (t, _) = adaptq_quant::novaq::quantize_novaq(x, rows, cols, None, &ncfg)
                .with_context(|| named(" with NOVAQ"))?;
            (LayerCodes::Codebook(t), "novaq")
        }
        _ => {
            let rtn = RtnConfig {
                bits: match role {
                    TensorRole::Linear => cfg.bits,
                    _ => cfg.embed_bits.unwrap_or(cfg.bits),
                },
                group_size: cfg.group_size,
                grid: cfg.grid,
            };
            let step = match role {
                TensorRole::Linear => cfg.entropy_step,
                _ => cfg.embed_step.or(cfg.entropy_step),
            };
            let fit = Fit::of(step, cfg.range_search, None);
            (
                LayerCodes::Int(
                    quantize_rtn_fit(x, rows, cols, &rtn, fit).with_context(|| named(""))?,
                ),
                "rtn",
            )
        }
    })
}

/// One source tensor as it is stored.
fn encode_tensor(
    src: &dyn TensorSource,
    info: &adaptq_source::TensorInfo,
    cfg: &QuantizeConfig,
    pre: Option<&Precomputed>,
    layer: Option<&crate::calibrate::CalibratedLayer>,
) -> Result<Encoded> {
    let role = role_of(info);
    if !info.dtype.is_float() {
        let raw = src.raw_bytes(&info.name)?.to_vec();
        return Ok(encode_raw(info.dtype.name(), raw));
    }
    let x = match pre.and_then(|p| p.cal.overrides.get(&info.name)) {
        Some(v) if v.len() == info.numel() => v.clone(),
        Some(_) => bail!("replacement for '{}' has the wrong size", info.name),
        None => src.read_f32(&info.name)?,
    };
    if !is_quantized(info, role, cfg) {
        let keep_f16 = matches!(role, TensorRole::Embedding | TensorRole::Output)
            && cfg.embeddings == EmbeddingMode::F16;
        return Ok(if keep_f16 {
            encode_f16(&x)
        } else {
            encode_f32(&x)
        });
    }
    match layer {
        Some(c) => {
            if c.q.rows().checked_mul(c.q.cols()) != Some(x.len()) {
                bail!(
                    "calibrated codes for '{}' do not match its shape {:?}",
                    info.name,
                    info.shape
                );
            }
            Ok(encode_codes(&c.reference(&x, c.q.cols()), &c.q, c.method)?)
        }
        None => {
            let (codes, method) = direct_codes(&x, info, role, cfg)?;
            Ok(encode_codes(&x, &codes, method)?)
        }
    }
}

/// Codes of layers a checkpoint holds ([`crate::calibrate::Calibration::saved`]), read back
/// one file at a time: tensors come block by block, so each file is read once and memory
/// holds one block's codes.
#[derive(Default)]
struct SavedCodes {
    file: Option<(crate::checkpoint::SavedFile, crate::calibrate::Calibration)>,
}

impl SavedCodes {
    /// The codes of layer `name` when `cal` says a file holds them.
    fn take(
        &mut self,
        cal: &crate::calibrate::Calibration,
        name: &str,
    ) -> Result<Option<crate::calibrate::CalibratedLayer>> {
        let Some((file, _)) = cal.saved.get(name) else {
            return Ok(None);
        };
        if self.file.as_ref().is_none_or(|(f, _)| f != file) {
            self.file = None;
            self.file = Some((file.clone(), file.read()?));
        }
        let (_, held) = self.file.as_mut().expect("read above");
        match held.layers.remove(name) {
            Some(c) => Ok(Some(c)),
            None => bail!("{} holds no codes for '{name}'", file.path.display()),
        }
    }
}

/// The `verification.json` line of a stored tensor.
fn tensor_report(
    info: &adaptq_source::TensorInfo,
    enc: &Encoded,
    bytes: u64,
    pre: Option<&Precomputed>,
) -> TensorReport {
    let raw_bytes: u64 = enc.parts.iter().map(|(_, b)| b.len() as u64).sum();
    let params = info.numel();
    let cal = pre.and_then(|p| p.cal.summary(&info.name));
    TensorReport {
        name: info.name.clone(),
        role: role_of(info).name().into(),
        layer: layer_of(&info.name),
        encoding: enc.encoding.label(),
        params,
        bytes,
        bits_per_weight: bytes as f64 * 8.0 / params.max(1) as f64,
        lossless_ratio: (bytes != raw_bytes).then(|| raw_bytes as f64 / bytes.max(1) as f64),
        raw_bytes,
        error: enc.error,
        output_rel_error: cal
            .as_ref()
            .map(|c| c.output_rel_error)
            .filter(|v| v.is_finite()),
        rtn_output_rel_error: cal
            .as_ref()
            .map(|c| c.rtn_output_rel_error)
            .filter(|v| v.is_finite()),
        refit_error_reduction: cal.and_then(|c| c.refit_error_reduction),
    }
}

/// Quantizes `src` into a bundle at `target.out`: every tensor in the source's order, through
/// the codes `pre` holds for it or its method's own rounding.
pub fn quantize_model(
    src: &dyn TensorSource,
    target: &Target,
    cfg: &QuantizeConfig,
    pre: Option<Precomputed>,
    progress: Progress,
) -> Result<QuantizeSummary> {
    if !(2..=8).contains(&cfg.bits) {
        bail!("code widths must be between 2 and 8 bits, got {}", cfg.bits);
    }
    let desc = src.desc().clone();
    let mut w = BundleWriter::create(
        target.out,
        WriterOptions {
            shard_max_bytes: cfg.shard_max_bytes,
            force: target.force,
            lossless: cfg.lossless == Some(crate::options::Lossless::Rans),
        },
    )?;
    let infos = src.tensors().to_vec();
    let total = infos.len();
    let mut reports = Vec::with_capacity(total);
    let mut read_bytes = 0u64;
    let mut all_finite = true;
    let mut saved = SavedCodes::default();
    for (i, info) in infos.iter().enumerate() {
        let read = match pre.as_ref() {
            Some(p) => saved.take(p.cal, &info.name)?,
            None => None,
        };
        let layer = read
            .as_ref()
            .or_else(|| pre.as_ref().and_then(|p| p.cal.layers.get(&info.name)));
        let enc = encode_tensor(src, info, cfg, pre.as_ref(), layer)?;
        drop(read);
        all_finite &= enc.error.is_none_or(|e| e.rel_mse.is_finite());
        let part_refs: Vec<(&str, &[u8])> =
            enc.parts.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        w.add_tensor(
            &info.name,
            &info.shape,
            role_of(info).name(),
            enc.method,
            enc.encoding.clone(),
            &part_refs,
        )
        .with_context(|| format!("writing tensor '{}'", info.name))?;
        let raw: u64 = enc.parts.iter().map(|(_, b)| b.len() as u64).sum();
        let bytes = w.tensors().last().map_or(raw, |t| t.payload_len());
        reports.push(tensor_report(info, &enc, bytes, pre.as_ref()));
        read_bytes += info.byte_len as u64;
        progress(i + 1, total, read_bytes);
    }

    let extra_gates = pre.as_ref().map(|p| p.gates.clone()).unwrap_or_default();
    let shards = w
        .tensors()
        .iter()
        .flat_map(|t| t.segments.iter().map(|s| s.shard))
        .max()
        .map_or(0, |m| m + 1);
    let limits = GateLimits {
        min_cosine: cfg.min_cosine,
        max_bpw: cfg.max_bpw,
        lossless: cfg.lossless.is_some(),
    };
    let mut verification = Verification::build(reports, shards, all_finite, limits, extra_gates);
    verification.calibration = pre.as_ref().map(|p| p.info.clone());
    if let Some(p) = &pre {
        verification.extra = p.extra.clone();
    }
    let meta = serde_json::to_vec_pretty(&desc.to_meta_json())?;
    w.add_file(MODEL_META, &meta)?;
    w.add_file(VERIFICATION, &serde_json::to_vec_pretty(&verification)?)?;
    for (name, bytes) in companion_files(src)? {
        w.add_file(&name, &bytes)?;
    }
    let model_id = target
        .model_id
        .map(str::to_string)
        .or_else(|| desc.name.clone())
        .unwrap_or_else(|| adaptq_remote::locator_for(target.locator));
    let manifest = w.finish(
        &model_id,
        SourceRef {
            locator: adaptq_remote::locator_for(target.locator),
            format: src.format().into(),
            tensor_count: total,
        },
        serde_json::to_value(cfg)?,
    )?;
    Ok(QuantizeSummary {
        manifest,
        verification,
    })
}

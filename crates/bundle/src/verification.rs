//! `verification.json`: what a quantize run measured (per-tensor error and size, totals, the
//! sampling of the calibration text) and its gates. Written and read back through these
//! types, so `report`, `stats` and the tests see the same fields the writer wrote.

use adaptq_quant::metrics::LayerError;
use serde::{Deserialize, Serialize};

/// A gate's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum GateStatus {
    Pass,
    Fail,
}

impl GateStatus {
    pub fn of(ok: bool) -> GateStatus {
        if ok {
            GateStatus::Pass
        } else {
            GateStatus::Fail
        }
    }
    pub fn passed(self) -> bool {
        self == GateStatus::Pass
    }
}

impl std::fmt::Display for GateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateStatus::Pass => "PASS",
            GateStatus::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gate {
    pub name: String,
    pub status: GateStatus,
    pub detail: String,
}

/// How calibration text is sampled; recorded in the manifest and verification.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibConfig {
    /// File name only (no folder: bundles must not depend on where the user keeps files).
    pub file: String,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibInfo {
    #[serde(flatten)]
    pub config: CalibConfig,
    pub text_tokens: usize,
    /// SHA-256 of the sampled token ids (little-endian u32, windows in order).
    pub fingerprint: String,
}

/// Per-tensor line of `verification.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub role: String,
    pub layer: Option<usize>,
    pub encoding: String,
    pub params: usize,
    pub bytes: u64,
    pub bits_per_weight: f64,
    /// Bytes before the lossless stage (equal to `bytes` when it is off or did not help).
    #[serde(skip)]
    pub raw_bytes: u64,
    /// `raw / stored` when the lossless stage coded this tensor's codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lossless_ratio: Option<f64>,
    #[serde(flatten)]
    pub error: Option<LayerError>,
    /// Hessian-weighted relative output error on the calibration inputs (calibrated methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// The same for round-to-nearest at the same config: what calibration bought.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtn_output_rel_error: Option<f64>,
    /// Fraction of the output error removed by re-fitting scales with codes fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refit_error_reduction: Option<f64>,
}

impl TensorReport {
    /// Floating-point values (everything but raw integer tensors carried through).
    pub fn is_float(&self) -> bool {
        !self.encoding.starts_with("raw")
    }
    /// Stored as codes (integer grid, GGML blocks or codebooks).
    pub fn is_quantized(&self) -> bool {
        ["int", "ggml", "novaq"]
            .iter()
            .any(|p| self.encoding.starts_with(p))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Totals {
    pub params: u64,
    pub quantized_params: u64,
    pub payload_bytes: u64,
    pub quantized_payload_bytes: u64,
    pub bits_per_weight: f64,
    pub bits_per_quantized_weight: f64,
    pub source_f16_bytes: u64,
    pub compression_vs_f16: f64,
    pub shards: usize,
    /// Quantized payload before the lossless stage / after it (present when it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lossless_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibInfo>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub gates: Vec<Gate>,
    /// Method-specific sections (AWQ search, APQ allocation, promotion rounds).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "OVERALL_STATUS")]
    pub overall_status: GateStatus,
}

/// What decides the standard gates of a bundle.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Every quantized tensor must keep at least this weight cosine similarity.
    pub min_cosine: f64,
    /// Overall bits per weight must not exceed this, when set.
    pub max_bpw: Option<f64>,
    /// The lossless stage ran (its ratio is reported).
    pub lossless: bool,
}

impl Verification {
    /// Totals and the standard gates (finite values, weight cosine, size budget) over
    /// `tensors`, then `extra_gates`; OVERALL_STATUS passes only if every gate does.
    pub fn build(
        tensors: Vec<TensorReport>,
        shards: usize,
        all_finite: bool,
        limits: GateLimits,
        extra_gates: Vec<Gate>,
    ) -> Verification {
        let float = tensors.iter().filter(|t| t.is_float());
        let params: u64 = float.clone().map(|t| t.params as u64).sum();
        let payload: u64 = float.map(|t| t.bytes).sum();
        let quant: Vec<&TensorReport> = tensors.iter().filter(|t| t.is_quantized()).collect();
        let qparams: u64 = quant.iter().map(|t| t.params as u64).sum();
        let qbytes: u64 = quant.iter().map(|t| t.bytes).sum();
        let qraw: u64 = quant.iter().map(|t| t.raw_bytes).sum();
        let bpw = payload as f64 * 8.0 / params.max(1) as f64;
        let totals = Totals {
            params,
            quantized_params: qparams,
            payload_bytes: payload,
            quantized_payload_bytes: qbytes,
            bits_per_weight: bpw,
            bits_per_quantized_weight: qbytes as f64 * 8.0 / qparams.max(1) as f64,
            source_f16_bytes: params * 2,
            compression_vs_f16: (params * 2) as f64 / payload.max(1) as f64,
            shards,
            lossless_ratio: limits.lossless.then(|| qraw as f64 / qbytes.max(1) as f64),
        };
        let worst = quant
            .iter()
            .filter_map(|t| t.error.map(|e| (e.cosine, t.name.as_str())))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let (wc, wn) = worst.unwrap_or((1.0, "-"));
        let mut gates = vec![
            Gate {
                name: "reconstruction_finite".into(),
                status: GateStatus::of(all_finite),
                detail: "every stored tensor decodes to finite values".into(),
            },
            Gate {
                name: "weight_cosine".into(),
                status: GateStatus::of(wc >= limits.min_cosine),
                detail: format!(
                    "lowest weight cosine {wc:.6} ({wn}); required >= {}",
                    limits.min_cosine
                ),
            },
        ];
        if let Some(max) = limits.max_bpw {
            gates.push(Gate {
                name: "size_budget".into(),
                status: GateStatus::of(bpw <= max),
                detail: format!("{bpw:.4} bits per weight overall; budget {max}"),
            });
        }
        gates.extend(extra_gates);
        let overall = GateStatus::of(gates.iter().all(|g| g.status.passed()));
        Verification {
            schema_version: 1,
            calibration: None,
            tensors,
            totals,
            gates,
            extra: serde_json::Map::new(),
            overall_status: overall,
        }
    }

    /// Reads a bundle's `verification.json`.
    pub fn read(bundle: &crate::Bundle) -> crate::Result<Verification> {
        let bytes = bundle.read_file(crate::VERIFICATION)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            crate::BundleError::Invalid(format!(
                "{}: {} is not a verification report: {e}",
                bundle.dir.display(),
                crate::VERIFICATION
            ))
        })
    }
}

//! `stats` on a bundle: sizes, bits per weight (recomputed from the shard files), compression
//! against f16, and a per-layer error summary.

use crate::verification::{TensorReport, Verification};
use crate::{Bundle, Encoding, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct BundleStats {
    pub model_id: String,
    pub tensors: usize,
    pub shards: usize,
    /// Sum of the shard files' sizes on disk.
    pub shard_bytes: u64,
    /// Shards plus manifest and side files.
    pub bundle_bytes: u64,
    pub params: u64,
    pub quantized_params: u64,
    /// shard bytes × 8 / float params.
    pub bits_per_weight: f64,
    /// Payload bits of quantized tensors / their params (scales and mins included).
    pub bits_per_quantized_weight: f64,
    pub f16_bytes: u64,
    pub compression_vs_f16: f64,
    pub by_encoding: Vec<EncodingStats>,
    pub error_summary: Option<ErrorSummary>,
}

#[derive(Debug, Serialize)]
pub struct EncodingStats {
    pub encoding: String,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorSummary {
    pub layers: usize,
    pub rel_mse_mean: f64,
    pub rel_mse_max: f64,
    pub rel_mse_max_tensor: String,
    pub cosine_min: f64,
    pub cosine_mean: f64,
}

pub fn bundle_stats(dir: &Path) -> Result<BundleStats> {
    let b = Bundle::open(dir)?;
    let m = &b.manifest;
    let mut shard_bytes = 0u64;
    for s in &m.shards {
        let p = dir.join(&s.file);
        shard_bytes += std::fs::metadata(&p).map_err(crate::io_err(&p))?.len();
    }
    let mut bundle_bytes = 0u64;
    for e in std::fs::read_dir(dir).map_err(crate::io_err(dir))? {
        bundle_bytes += e
            .and_then(|e| e.metadata())
            .map_err(crate::io_err(dir))?
            .len();
    }
    let mut params = 0u64;
    let mut qparams = 0u64;
    let mut qbytes = 0u64;
    let mut raw_bytes = 0u64;
    let mut by: Vec<EncodingStats> = Vec::new();
    for t in &m.tensors {
        let label = t.encoding.label();
        let n = t.numel() as u64;
        match t.encoding {
            Encoding::Raw { .. } => raw_bytes += t.payload_len(),
            Encoding::Int { .. } | Encoding::Ggml { .. } | Encoding::Codebook { .. } => {
                qparams += n;
                qbytes += t.payload_len();
                params += n;
            }
            _ => params += n,
        }
        match by.iter_mut().find(|e| e.encoding == label) {
            Some(e) => {
                e.tensors += 1;
                e.params += n;
                e.bytes += t.payload_len();
            }
            None => by.push(EncodingStats {
                encoding: label,
                tensors: 1,
                params: n,
                bytes: t.payload_len(),
            }),
        }
    }
    by.sort_by_key(|e| std::cmp::Reverse(e.bytes));
    let float_bytes = shard_bytes - raw_bytes;
    let error_summary = Verification::read(&b)
        .ok()
        .and_then(|v| summarize_errors(&v.tensors));
    Ok(BundleStats {
        model_id: m.model_id.clone(),
        tensors: m.tensors.len(),
        shards: m.shards.len(),
        shard_bytes,
        bundle_bytes,
        params,
        quantized_params: qparams,
        bits_per_weight: float_bytes as f64 * 8.0 / params.max(1) as f64,
        bits_per_quantized_weight: qbytes as f64 * 8.0 / qparams.max(1) as f64,
        f16_bytes: params * 2,
        compression_vs_f16: (params * 2) as f64 / float_bytes.max(1) as f64,
        by_encoding: by,
        error_summary,
    })
}

fn summarize_errors(tensors: &[TensorReport]) -> Option<ErrorSummary> {
    let mut rows: Vec<(String, f64, f64)> = tensors
        .iter()
        .filter(|t| t.is_quantized())
        .filter_map(|t| Some((t.name.clone(), t.error?.rel_mse, t.error?.cosine)))
        .collect();
    if rows.is_empty() {
        return None;
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let n = rows.len() as f64;
    Some(ErrorSummary {
        layers: rows.len(),
        rel_mse_mean: rows.iter().map(|r| r.1).sum::<f64>() / n,
        rel_mse_max: rows[0].1,
        rel_mse_max_tensor: rows[0].0.clone(),
        cosine_min: rows.iter().map(|r| r.2).fold(f64::INFINITY, f64::min),
        cosine_mean: rows.iter().map(|r| r.2).sum::<f64>() / n,
    })
}

//! How values become a tensor's stored parts: each encoding of [`crate::Encoding`] from what a
//! quantizer produced (integer codes, GGML blocks, NOVAQ codebooks) or from float values,
//! with the weight error of the stored values against the values they stand for.

use crate::Encoding;
use adaptq_quant::metrics::{layer_error, layer_error_pairs, LayerError};
use adaptq_quant::{Grid, LayerCodes, QuantizedTensor};

/// One tensor as it will be stored.
pub struct Encoded {
    pub encoding: Encoding,
    /// Which method produced the values (`none` when kept).
    pub method: &'static str,
    pub parts: Vec<(&'static str, Vec<u8>)>,
    /// Weight error of the stored values; `None` for raw tensors and f32 copies.
    pub error: Option<LayerError>,
}

impl Encoded {
    /// Bytes of every part.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

fn f16_bytes(v: &[half::f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The error of `stored` against `x`; a value that does not decode finite makes it infinite.
fn error_of(x: &[f32], stored: &[f32]) -> LayerError {
    let mut e = layer_error(x, stored);
    if stored.iter().any(|v| !v.is_finite()) {
        e.rel_mse = f64::INFINITY;
    }
    e
}

/// Integer codes on a per-group grid: parts `codes`, `scales` and (asymmetric) `mins`.
pub fn encode_int(x: &[f32], q: &QuantizedTensor, method: &'static str) -> Encoded {
    let mut parts = vec![("codes", q.codes.clone()), ("scales", f16_bytes(&q.scales))];
    if q.grid == Grid::Asymmetric {
        parts.push(("mins", f16_bytes(&q.mins)));
    }
    Encoded {
        encoding: Encoding::Int {
            bits: q.bits,
            group_size: q.group_size,
            grid: q.grid,
        },
        method,
        parts,
        error: Some(error_of(x, &q.dequantize())),
    }
}

/// NOVAQ codebooks: row/column normalization, then per stage its codebook and codes.
pub fn encode_codebook(
    x: &[f32],
    t: &adaptq_quant::novaq::CodebookTensor,
    method: &'static str,
) -> Encoded {
    const BOOK: [&str; 2] = ["codebook0", "codebook1"];
    const CODES: [&str; 2] = ["codes0", "codes1"];
    let mut parts = vec![
        ("row_scale", f16_bytes(&t.row_scale)),
        ("row_mean", f16_bytes(&t.row_mean)),
        ("col_scale", f16_bytes(&t.col_scale)),
    ];
    for (s, st) in t.stages.iter().enumerate() {
        parts.push((BOOK[s], f16_bytes(&st.centroids)));
        parts.push((CODES[s], st.codes.clone()));
    }
    Encoded {
        encoding: Encoding::Codebook {
            dim: t.dim,
            stage_bits: t.stages.iter().map(|s| s.bits).collect(),
        },
        method,
        parts,
        error: Some(error_of(x, &t.dequantize())),
    }
}

/// llama.cpp blocks of one type, part `blocks`.
pub fn encode_ggml(
    x: &[f32],
    ty: adaptq_quant::ggml::BlockType,
    bytes: Vec<u8>,
    method: &'static str,
) -> Result<Encoded, adaptq_quant::QuantError> {
    let deq = adaptq_quant::ggml::dequantize(ty, &bytes, x.len())?;
    Ok(Encoded {
        encoding: Encoding::Ggml { ggml_type: ty },
        method,
        parts: vec![("blocks", bytes)],
        error: Some(error_of(x, &deq)),
    })
}

/// Codes of any kind, measured against `reference`, the values they stand for.
pub fn encode_codes(
    reference: &[f32],
    codes: &LayerCodes,
    method: &'static str,
) -> Result<Encoded, adaptq_quant::QuantError> {
    Ok(match codes {
        LayerCodes::Int(q) => encode_int(reference, q, method),
        LayerCodes::Ggml { ty, bytes, .. } => encode_ggml(reference, *ty, bytes.clone(), method)?,
        LayerCodes::Codebook(t) => encode_codebook(reference, t, method),
    })
}

/// Float values as f16, part `data`.
pub fn encode_f16(x: &[f32]) -> Encoded {
    // One pass, with no second f32 copy: embedding tables are the largest tensors kept in f16.
    let mut bytes = Vec::with_capacity(x.len() * 2);
    let mut finite = true;
    let mut error = layer_error_pairs(x.iter().map(|&v| {
        let h = half::f16::from_f32(v);
        bytes.extend_from_slice(&h.to_le_bytes());
        let back = h.to_f32();
        finite &= back.is_finite();
        (v, back)
    }));
    if !finite {
        error.rel_mse = f64::INFINITY;
    }
    Encoded {
        encoding: Encoding::F16,
        method: "none",
        parts: vec![("data", bytes)],
        error: Some(error),
    }
}

/// Float values kept as f32, part `data`.
pub fn encode_f32(x: &[f32]) -> Encoded {
    Encoded {
        encoding: Encoding::F32,
        method: "none",
        parts: vec![("data", x.iter().flat_map(|v| v.to_le_bytes()).collect())],
        error: None,
    }
}

/// Bytes carried through unchanged (integer tensors), part `data`.
pub fn encode_raw(dtype: String, raw: Vec<u8>) -> Encoded {
    Encoded {
        encoding: Encoding::Raw {
            dtype,
            byte_len: raw.len(),
        },
        method: "none",
        parts: vec![("data", raw)],
        error: None,
    }
}

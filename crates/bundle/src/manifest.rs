//! `manifest.json`: the bundle's index. Field order here is the order in the file.

use adaptq_quant::ggml::BlockType;
use adaptq_quant::Grid;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub model_id: String,
    pub generator: Generator,
    pub source: SourceRef,
    /// The full quantization config as the pipeline ran it, seed included.
    pub quantization: serde_json::Value,
    pub shard_max_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    pub shards: Vec<ShardInfo>,
    /// Digests of the other files of the bundle, by file name (sorted).
    pub files: Vec<FileDigest>,
    pub global_digest: String,
    pub manifest_digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generator {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    /// Where the model came from: a file name (never an absolute path), `hf://…`, a URL.
    pub locator: String,
    pub format: String,
    pub tensor_count: usize,
}

/// How a tensor's payload encodes its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case")]
pub enum Encoding {
    /// Integer codes on a per-group grid (RTN, GPTQ, AWQ all write this):
    /// parts `codes`, `scales` (f16) and, for asymmetric grids, `mins` (f16).
    Int {
        bits: u8,
        group_size: usize,
        grid: Grid,
    },
    /// llama.cpp blocks of one GGML type (row-major, as in a GGUF), part `blocks`.
    Ggml { ggml_type: BlockType },
    /// NOVAQ residual vector codebooks (see `adaptq_loader::codebook`): parts `row_scale`,
    /// `row_mean` (f16 per row), `col_scale` (f16 per column), then per stage `s`
    /// `codebook{s}` (f16, `2^bits × dim`) and `codes{s}` (packed at `bits`).
    Codebook { dim: usize, stage_bits: Vec<u8> },
    /// Little-endian f16 values, part `data`.
    F16,
    /// Little-endian f32 values, part `data`.
    F32,
    /// Bytes copied from the source unchanged (integer tensors), part `data`.
    Raw { dtype: String, byte_len: usize },
}

impl Encoding {
    /// (part name, byte length) that a tensor of `shape` must have in this encoding: the
    /// loader's [`adaptq_loader::expected_parts`], which `verify` and every reader check. Empty
    /// when the encoding's parameters are out of range or a size overflows, so no parts match.
    pub fn expected_parts(&self, shape: &[usize]) -> Vec<(&'static str, u64)> {
        adaptq_loader::expected_parts(&self.to_loader(), &shape_u64(shape)).unwrap_or_default()
    }

    /// The same encoding in the loader's schema.
    pub fn to_loader(&self) -> adaptq_loader::Encoding {
        use adaptq_loader::Encoding as L;
        match self {
            Encoding::Int {
                bits,
                group_size,
                grid,
            } => L::Int {
                bits: *bits,
                group_size: *group_size,
                grid: match grid {
                    Grid::Symmetric => adaptq_loader::Grid::Symmetric,
                    Grid::Asymmetric => adaptq_loader::Grid::Asymmetric,
                },
            },
            Encoding::Ggml { ggml_type } => L::Ggml {
                ggml_type: ggml_type.name().to_string(),
            },
            Encoding::Codebook { dim, stage_bits } => L::Codebook {
                dim: *dim,
                stage_bits: stage_bits.clone(),
            },
            Encoding::F16 => L::F16,
            Encoding::F32 => L::F32,
            Encoding::Raw { dtype, byte_len } => L::Raw {
                dtype: dtype.clone(),
                byte_len: *byte_len,
            },
        }
    }

    pub fn label(&self) -> String {
        match self {
            Encoding::Int {
                bits,
                group_size,
                grid,
            } => format!(
                "int{bits}-g{group_size}-{}",
                match grid {
                    Grid::Symmetric => "sym",
                    Grid::Asymmetric => "asym",
                }
            ),
            Encoding::Ggml { ggml_type } => format!("ggml-{}", ggml_type.name()),
            Encoding::Codebook { dim, stage_bits } => format!(
                "novaq-d{dim}-{}",
                stage_bits
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            Encoding::F16 => "f16".into(),
            Encoding::F32 => "f32".into(),
            Encoding::Raw { dtype, .. } => format!("raw-{dtype}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// linear, embedding, output, norm, bias, other.
    pub role: String,
    /// Which algorithm produced the values (rtn, gptq, …; `none` when kept).
    pub method: String,
    pub encoding: Encoding,
    pub parts: Vec<Part>,
    /// Where the payload (the parts concatenated) lies, in order.
    pub segments: Vec<Segment>,
}

impl TensorEntry {
    /// Bytes stored (saturating; exact for a manifest that passed the layout check).
    pub fn payload_len(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.length))
    }
    /// Values (saturating; exact for a manifest that passed the layout check).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }
}

impl Encoding {
    /// Width and count of the symbols of a code part (the lossless stage codes those).
    pub fn code_symbols(&self, part: &str, shape: &[usize]) -> Option<(u8, usize)> {
        let numel = usize::try_from(adaptq_loader::layout::numel(&shape_u64(shape))?).ok()?;
        match self {
            Encoding::Int { bits, .. } if part == "codes" => Some((*bits, numel)),
            Encoding::Codebook { dim, stage_bits } => {
                let s: usize = part.strip_prefix("codes")?.parse().ok()?;
                let cols = *shape.last().unwrap_or(&1);
                let nv = adaptq_loader::codebook::vectors_per_row(cols, (*dim).max(1));
                let rows = numel.checked_div(cols).unwrap_or(0);
                Some((*stage_bits.get(s)?, rows.checked_mul(nv)?))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub name: String,
    /// Bytes stored.
    pub length: u64,
    /// Set when the lossless stage coded this part: decode to get `raw_length` bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lossless: Option<Lossless>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lossless {
    /// `rans`: see `adaptq_loader::rans`.
    pub scheme: String,
    pub raw_length: u64,
}

impl Part {
    /// The part's length once decoded.
    pub fn raw_length(&self) -> u64 {
        self.lossless.as_ref().map_or(self.length, |l| l.raw_length)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub shard: usize,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A shape as the loader's layout check reads it (`u64` dimensions on every platform).
pub fn shape_u64(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaders_ggml_table_matches_the_block_types() {
        for t in adaptq_quant::ggml::ALL {
            let name = serde_json::to_value(t).unwrap();
            assert_eq!(name, t.name(), "serialized name of {t:?}");
            assert_eq!(
                adaptq_loader::ggml_block(t.name()),
                Some((t.block_len(), t.block_bytes())),
                "{t:?}"
            );
            let enc = Encoding::Ggml { ggml_type: t };
            assert_eq!(
                enc.expected_parts(&[2, t.block_len() * 3]),
                vec![("blocks", t.bytes_for(6 * t.block_len()) as u64)]
            );
        }
        assert_eq!(adaptq_loader::ggml_block("Q4_K_M"), None);
    }
}

//! The `manifest.json` schema: the bundle's index, as the writer serializes it and every reader
//! parses it. Field order here is the order in the file, so the same bundle always gives the
//! same bytes (and manifest digest).
//!
//! Parsing is not checking: a parsed [`Manifest`] is used only after
//! [`crate::layout::check_layout`] accepted it. Sizes are `u64` on every platform, so a 32-bit
//! reader parses exactly the manifests a 64-bit one does.

use crate::ggml::BlockType;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub model_id: String,
    pub generator: Generator,
    pub source: SourceRef,
    /// The full quantization config as the pipeline ran it, seed included (not read back).
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

/// How a tensor's codes map back to real values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grid {
    /// `w = scale * (q - 2^(bits-1))`: zero is exact, no per-group offset.
    Symmetric,
    /// `w = scale * q + min`: each group spans its own [min, max].
    Asymmetric,
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
    /// NOVAQ residual vector codebooks ([`crate::codebook`]): parts `row_scale`, `row_mean`
    /// (f16 per row), `col_scale` (f16 per column), then per stage `s` `codebook{s}`
    /// (f16, `2^bits × dim`) and `codes{s}` (packed at `bits`).
    Codebook { dim: usize, stage_bits: Vec<u8> },
    /// Little-endian f16 values, part `data`.
    F16,
    /// Little-endian f32 values, part `data`.
    F32,
    /// Bytes copied from the source unchanged (integer tensors), part `data`.
    Raw { dtype: String, byte_len: usize },
}

impl Encoding {
    /// A short name for reports: `int4-g128-sym`, `ggml-Q4_K`, `novaq-d8-12+4`, `f16`, …
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

    /// The width of the codes in part `name`, if it is a code part (`codes`, `codes{s}`): the
    /// only parts the lossless stage codes.
    pub fn code_bits(&self, name: &str) -> Option<u8> {
        match self {
            Encoding::Int { bits, .. } if name == "codes" => Some(*bits),
            Encoding::Codebook { stage_bits, .. } => {
                let s: usize = name.strip_prefix("codes")?.parse().ok()?;
                stage_bits.get(s).copied()
            }
            _ => None,
        }
    }

    /// Width and count of the codes in part `name` of a tensor of `shape`, if it is a code
    /// part; `None` too when the shape holds more than [`crate::layout::MAX_NUMEL`] values.
    pub fn code_symbols(&self, name: &str, shape: &[u64]) -> Option<(u8, u64)> {
        let bits = self.code_bits(name)?;
        let numel = crate::layout::numel(shape)?;
        match self {
            Encoding::Codebook { dim, .. } => {
                let cols = *shape.last().unwrap_or(&1);
                let rows = numel.checked_div(cols).unwrap_or(0);
                Some((bits, rows.checked_mul(cols.div_ceil((*dim).max(1) as u64))?))
            }
            _ => Some((bits, numel)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// `u64` on every platform: a 32-bit reader parses the same manifests a 64-bit one does.
    pub shape: Vec<u64>,
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

    /// Values (saturating; exact for a manifest that passed the layout check and fits the
    /// platform).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
            .unwrap_or(usize::MAX)
    }

    /// The shape as `usize` dimensions (saturating; exact where they fit the platform).
    pub fn dims(&self) -> Vec<usize> {
        self.shape
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// Values per row: the last dimension (1 for a scalar), saturating like [`Self::dims`].
    pub fn cols(&self) -> usize {
        self.shape
            .last()
            .map_or(1, |&d| usize::try_from(d).unwrap_or(usize::MAX))
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

/// A part coded by the bundle's lossless stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lossless {
    /// `rans`: see [`crate::rans`].
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

/// A side file (model.meta, verification.json, LICENSE, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Shard `i`'s file name; the layout check ties every shard to its place in the list.
pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

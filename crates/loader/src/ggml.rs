//! The one table of GGML tensor types: ids, llama.cpp names, block sizes, code widths and
//! llama.cpp's fallbacks for rows that do not fit a block type.
//!
//! [`BlockType`] is a quantized block type, what a bundle's `ggml` encoding and adaptq's GGML
//! quantizers hold; [`GgmlType`] is every type a GGUF reader knows (the block types and the
//! float types). The GGUF reader, the quantizers, the bundle layout check, the GGUF exporter and
//! this crate's loader all read sizes and names from here.

use crate::manifest::Grid;
use serde::{Deserialize, Serialize};

/// The quantized GGML block types adaptq reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    #[serde(rename = "Q2_K")]
    Q2K,
    #[serde(rename = "Q3_K")]
    Q3K,
    #[serde(rename = "Q4_K")]
    Q4K,
    #[serde(rename = "Q5_K")]
    Q5K,
    #[serde(rename = "Q6_K")]
    Q6K,
    /// 4-bit codes into a fixed non-linear table of 16 levels ([`IQ4NL_VALUES`]) times one f16
    /// scale per 32 values: Q4_0's size and layout, a better-spread grid, and 32-value blocks
    /// that fit rows k-quants cannot.
    #[serde(rename = "IQ4_NL")]
    IQ4NL,
    /// IQ4_NL's table in 256-value super-blocks: an f16 scale times a 6-bit signed scale per 32
    /// values (4.25 bits per weight).
    #[serde(rename = "IQ4_XS")]
    IQ4XS,
}

/// The 16 levels of IQ4_NL (ggml-common.h's `kvalues_iq4nl`), in code order.
pub const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Every block type, in [`BlockType`] order.
pub const ALL: [BlockType; 12] = [
    BlockType::Q4_0,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5_1,
    BlockType::Q8_0,
    BlockType::Q2K,
    BlockType::Q3K,
    BlockType::Q4K,
    BlockType::Q5K,
    BlockType::Q6K,
    BlockType::IQ4NL,
    BlockType::IQ4XS,
];

/// Super-block length of the k-quants.
pub const QK_K: usize = 256;

/// One row of the table: ggml type id, llama.cpp name, values per block, bytes per block.
type Row = (u32, &'static str, usize, usize);

impl BlockType {
    const fn row(self) -> Row {
        match self {
            Self::Q4_0 => (2, "Q4_0", 32, 18),
            Self::Q4_1 => (3, "Q4_1", 32, 20),
            Self::Q5_0 => (6, "Q5_0", 32, 22),
            Self::Q5_1 => (7, "Q5_1", 32, 24),
            Self::Q8_0 => (8, "Q8_0", 32, 34),
            Self::Q2K => (10, "Q2_K", QK_K, 84),
            Self::Q3K => (11, "Q3_K", QK_K, 110),
            Self::Q4K => (12, "Q4_K", QK_K, 144),
            Self::Q5K => (13, "Q5_K", QK_K, 176),
            Self::Q6K => (14, "Q6_K", QK_K, 210),
            Self::IQ4NL => (20, "IQ4_NL", 32, 18),
            Self::IQ4XS => (23, "IQ4_XS", QK_K, 136),
        }
    }

    /// llama.cpp's name (`Q4_0`, `Q4_K`, …), as the manifest stores it.
    pub const fn name(self) -> &'static str {
        self.row().1
    }

    /// ggml's type id (the number stored in a GGUF tensor info).
    pub const fn ggml_id(self) -> u32 {
        self.row().0
    }

    /// Values per block.
    pub const fn block_len(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        self.row().3
    }

    /// Parses a name with any case and underscores: `q4_0`, `Q4_K`, `q6k`.
    pub fn parse(s: &str) -> Option<Self> {
        fn letters(s: &str) -> impl Iterator<Item = u8> + '_ {
            s.bytes()
                .filter(|b| *b != b'_')
                .map(|b| b.to_ascii_uppercase())
        }
        ALL.into_iter().find(|t| letters(t.name()).eq(letters(s)))
    }

    /// Whether this is a k-quant (256-value super-blocks).
    pub fn is_k(self) -> bool {
        self.block_len() == QK_K
    }

    /// Values sharing one (scale, min) pair.
    pub fn sub_len(self) -> usize {
        match self {
            Self::Q2K | Self::Q3K | Self::Q6K => 16,
            _ => 32,
        }
    }

    /// Code bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::Q2K => 2,
            Self::Q3K => 3,
            Self::Q4_0 | Self::Q4_1 | Self::Q4K | Self::IQ4NL | Self::IQ4XS => 4,
            Self::Q5_0 | Self::Q5_1 | Self::Q5K => 5,
            Self::Q6K => 6,
            Self::Q8_0 => 8,
        }
    }

    /// The largest code.
    pub fn max_code(self) -> i32 {
        (1 << self.bits()) - 1
    }

    /// For symmetric types, the code that stands for zero; `None` for types with a min and for
    /// IQ4_NL, whose table has no zero.
    pub fn zero_code(self) -> Option<i32> {
        match self {
            Self::Q4_0 => Some(8),
            Self::Q5_0 => Some(16),
            Self::Q8_0 => Some(128),
            Self::Q3K => Some(4),
            Self::Q6K => Some(32),
            _ => None,
        }
    }

    /// Bits per weight, block overhead included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// Whether a row of `cols` values can be stored in this type.
    pub fn fits(self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.block_len())
    }

    /// The type used instead when rows do not fit a k-quant: llama.cpp's choices Q4_K→Q5_0,
    /// Q5_K→Q5_1, Q6_K→Q8_0; for Q2_K/Q3_K IQ4_NL where llama.cpp takes Q4_0 (the same size on
    /// a better grid: 0.66× Q4_0's KLD on SmolLM2, README); IQ4_XS→IQ4_NL as llama.cpp.
    pub fn fallback(self) -> BlockType {
        match self {
            Self::Q2K | Self::Q3K | Self::IQ4XS => Self::IQ4NL,
            Self::Q4K => Self::Q5_0,
            Self::Q5K => Self::Q5_1,
            Self::Q6K => Self::Q8_0,
            t => t,
        }
    }

    /// The type rows of `cols` values get when this one is asked for: itself, else its
    /// [`fallback`](Self::fallback), else Q8_0; with whether that is a different type. `None`
    /// when nothing fits (rows not a multiple of 32).
    pub fn for_rows(self, cols: usize) -> Option<(BlockType, bool)> {
        [self, self.fallback(), Self::Q8_0]
            .into_iter()
            .find(|t| t.fits(cols))
            .map(|t| (t, t != self))
    }

    /// Bytes for `n` values (`n` a multiple of the block length).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    /// Bytes for `n` values in `u64`; `None` on overflow.
    pub fn bytes_for_u64(self, n: u64) -> Option<u64> {
        (n / self.block_len() as u64).checked_mul(self.block_bytes() as u64)
    }
}

impl core::fmt::Display for BlockType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The block type nearest an integer grid of `bits` (with llama.cpp's symmetric and min
/// layouts): what a `--bits` request, or an integer tensor with no exact twin, becomes in GGML.
pub fn nearest(bits: u8, grid: Grid) -> BlockType {
    match (bits, grid) {
        (0..=2, _) => BlockType::Q2K,
        (3, _) => BlockType::Q3K,
        (4, Grid::Symmetric) => BlockType::Q4_0,
        (4, Grid::Asymmetric) => BlockType::Q4_1,
        (5, Grid::Symmetric) => BlockType::Q5_0,
        (5, Grid::Asymmetric) => BlockType::Q5_1,
        (6, _) => BlockType::Q6K,
        _ => BlockType::Q8_0,
    }
}

/// The block type whose grid *is* adaptq's integer grid of `bits` in groups of `group_size`
/// on rows of `cols` values (4/5 bits either way, or 8 bits symmetric, in groups of a multiple
/// of 32 on rows of a multiple of 32: each 32-value block repeats its group's scale), so codes
/// move between the two losslessly; `None` when there is none.
pub fn twin(bits: u8, grid: Grid, group_size: usize, cols: usize) -> Option<BlockType> {
    let ty = match (bits, grid) {
        (4, Grid::Symmetric) => BlockType::Q4_0,
        (4, Grid::Asymmetric) => BlockType::Q4_1,
        (5, Grid::Symmetric) => BlockType::Q5_0,
        (5, Grid::Asymmetric) => BlockType::Q5_1,
        (8, Grid::Symmetric) => BlockType::Q8_0,
        _ => return None,
    };
    let group = if group_size == 0 {
        cols
    } else {
        group_size.min(cols)
    };
    (group.is_multiple_of(32) && cols.is_multiple_of(32) && cols > 0).then_some(ty)
}

/// Every tensor type adaptq's GGUF reader knows: the floats and the [`BlockType`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Block(BlockType),
}

impl GgmlType {
    pub const Q4_0: Self = Self::Block(BlockType::Q4_0);
    pub const Q4_1: Self = Self::Block(BlockType::Q4_1);
    pub const Q5_0: Self = Self::Block(BlockType::Q5_0);
    pub const Q5_1: Self = Self::Block(BlockType::Q5_1);
    pub const Q8_0: Self = Self::Block(BlockType::Q8_0);
    pub const Q2K: Self = Self::Block(BlockType::Q2K);
    pub const Q3K: Self = Self::Block(BlockType::Q3K);
    pub const Q4K: Self = Self::Block(BlockType::Q4K);
    pub const Q5K: Self = Self::Block(BlockType::Q5K);
    pub const Q6K: Self = Self::Block(BlockType::Q6K);
    pub const IQ4NL: Self = Self::Block(BlockType::IQ4NL);

    const fn row(self) -> Row {
        match self {
            Self::F32 => (0, "F32", 1, 4),
            Self::F16 => (1, "F16", 1, 2),
            Self::BF16 => (30, "BF16", 1, 2),
            Self::Block(b) => b.row(),
        }
    }

    /// The type stored under ggml type id `id`, if adaptq reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::BF16]
            .into_iter()
            .chain(ALL.map(Self::Block))
            .find(|t| t.id() == id)
    }

    /// ggml's type id.
    pub const fn id(self) -> u32 {
        self.row().0
    }

    /// llama.cpp's name (`F16`, `Q4_K`, …).
    pub const fn name(self) -> &'static str {
        self.row().1
    }

    /// (values per block, bytes per block), as in ggml.
    pub const fn block(self) -> (usize, usize) {
        let r = self.row();
        (r.2, r.3)
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Block(_))
    }
}

impl From<BlockType> for GgmlType {
    fn from(b: BlockType) -> Self {
        Self::Block(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for t in ALL {
            assert_eq!(BlockType::parse(t.name()), Some(t));
            assert_eq!(GgmlType::from_id(t.ggml_id()), Some(GgmlType::Block(t)));
            assert_eq!(t.bytes_for(3 * t.block_len()), 3 * t.block_bytes());
        }
        assert_eq!(BlockType::parse("q4k"), Some(BlockType::Q4K));
        assert_eq!(BlockType::parse("iq4_nl"), Some(BlockType::IQ4NL));
        assert_eq!(BlockType::parse("q4_k_m"), None);
        assert_eq!(BlockType::parse("q7_0"), None);
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
        assert_eq!(GgmlType::from_id(4), None);
    }

    #[test]
    fn rows_that_do_not_fit_fall_back() {
        assert_eq!(BlockType::Q4K.for_rows(576), Some((BlockType::Q5_0, true)));
        assert_eq!(BlockType::Q6K.for_rows(512), Some((BlockType::Q6K, false)));
        assert_eq!(BlockType::Q4_0.for_rows(100), None);
    }
}

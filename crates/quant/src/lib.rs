//! Quantizers: pure math on f32 weight matrices. No I/O, no CLI types.
//!
//! A weight is a row-major `rows × cols` matrix (one row per output channel). Groups run along a
//! row; when `cols` is not a multiple of the group size the row's last group is shorter, so any
//! bit width works on any shape (576-wide rows included).

pub mod awq;
pub mod ggml;
pub mod gptq;
pub mod hadamard;
pub mod linalg;
pub mod metrics;
pub mod novaq;
pub mod range;
pub mod rng;
pub use adaptq_loader::pack;
pub mod refit;
pub mod rtn;
pub mod ternary;

pub use metrics::LayerError;
pub use rtn::{quantize_rtn, RtnConfig};

use half::f16;

/// How the codes of a [`QuantizedTensor`] map back to real values (the bundle format's grid).
pub use adaptq_loader::Grid;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("bits must be between 2 and 8, got {0}")]
    Bits(u8),
    #[error("shape {rows}x{cols} does not match {len} values")]
    Shape {
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("weights contain a non-finite value at index {0}")]
    NonFinite(usize),
    #[error("{0}")]
    Corrupt(String),
    /// No NOVAQ layout of the tensor fits the bit budget: codebooks and row scales alone need
    /// more.
    #[error(
        "no NOVAQ layout of a {rows}x{cols} tensor fits {bits} bits per weight (codebooks and \
         row scales alone need more); a larger bit budget or sub-space width fits"
    )]
    NoLayout { rows: usize, cols: usize, bits: f64 },
}

/// A quantized matrix: bit-packed codes plus f16 per-group scales (and mins when asymmetric).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizedTensor {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    /// Columns per group; equal to `cols` for per-channel quantization.
    pub group_size: usize,
    pub grid: Grid,
    /// `rows * cols` codes of `bits` bits, row-major, packed LSB-first.
    pub codes: Vec<u8>,
    /// One scale per group, row-major (`rows * groups_per_row`).
    pub scales: Vec<f16>,
    /// One min per group for [`Grid::Asymmetric`], empty otherwise.
    pub mins: Vec<f16>,
}

impl QuantizedTensor {
    pub fn groups_per_row(&self) -> usize {
        groups_per_row(self.cols, self.group_size)
    }

    /// Reconstructs the f32 matrix exactly as the codes and f16 parameters define it.
    pub fn dequantize(&self) -> Vec<f32> {
        let codes = pack::unpack(&self.codes, self.bits, self.rows * self.cols);
        let gpr = self.groups_per_row();
        let mut out = vec![0f32; self.rows * self.cols];
        let half = (1u32 << (self.bits - 1)) as f32;
        for r in 0..self.rows {
            for g in 0..gpr {
                let s = self.scales[r * gpr + g].to_f32();
                let c0 = g * self.group_size;
                let c1 = (c0 + self.group_size).min(self.cols);
                let base = r * self.cols;
                match self.grid {
                    Grid::Symmetric => {
                        for c in c0..c1 {
                            out[base + c] = s * (codes[base + c] as f32 - half);
                        }
                    }
                    Grid::Asymmetric => {
                        let m = self.mins[r * gpr + g].to_f32();
                        for c in c0..c1 {
                            out[base + c] = s * codes[base + c] as f32 + m;
                        }
                    }
                }
            }
        }
        out
    }

    /// Serialized payload size in bytes (codes + scales + mins).
    pub fn payload_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + 2 * self.mins.len()
    }

    /// Bits per weight including scale/min overhead.
    pub fn bits_per_weight(&self) -> f64 {
        self.payload_bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// Byte lengths of (codes, scales, mins) a tensor of this shape and config must have.
    pub fn expected_lengths(
        rows: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
        grid: Grid,
    ) -> (usize, usize, usize) {
        let groups = rows * groups_per_row(cols, group_size);
        let codes = pack::packed_len(rows * cols, bits);
        let mins = if grid == Grid::Asymmetric {
            groups * 2
        } else {
            0
        };
        (codes, groups * 2, mins)
    }
}

/// A quantized layer in either of adaptq's code layouts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LayerCodes {
    /// adaptq's own per-group grid (any width 2–8, any group size).
    Int(QuantizedTensor),
    /// llama.cpp blocks of one GGML type, row-major.
    Ggml {
        ty: ggml::BlockType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    },
    /// NOVAQ residual vector codebooks.
    Codebook(novaq::CodebookTensor),
}

impl LayerCodes {
    pub fn rows(&self) -> usize {
        match self {
            LayerCodes::Int(q) => q.rows,
            LayerCodes::Ggml { rows, .. } => *rows,
            LayerCodes::Codebook(c) => c.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            LayerCodes::Int(q) => q.cols,
            LayerCodes::Ggml { cols, .. } => *cols,
            LayerCodes::Codebook(c) => c.cols,
        }
    }
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            LayerCodes::Int(q) => q.dequantize(),
            LayerCodes::Ggml {
                ty,
                rows,
                cols,
                bytes,
            } => ggml::dequantize(*ty, bytes, rows * cols)
                .expect("blocks were written for this shape"),
            LayerCodes::Codebook(c) => c.dequantize(),
        }
    }
    /// The integer-grid form; `None` for GGML blocks.
    pub fn as_int(&self) -> Option<&QuantizedTensor> {
        match self {
            LayerCodes::Int(q) => Some(q),
            LayerCodes::Ggml { .. } | LayerCodes::Codebook(_) => None,
        }
    }
}

/// A `rows × cols` matrix of finite values, or the reason it is not one.
pub(crate) fn check_matrix(w: &[f32], rows: usize, cols: usize) -> Result<(), QuantError> {
    if rows * cols != w.len() || rows == 0 || cols == 0 {
        return Err(QuantError::Shape {
            rows,
            cols,
            len: w.len(),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite(i));
    }
    Ok(())
}

/// Checks a matrix before quantization; returns the effective group size (0 or a size of at
/// least `cols` both mean one group per row).
pub(crate) fn check_input(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
) -> Result<usize, QuantError> {
    if !(2..=8).contains(&bits) {
        return Err(QuantError::Bits(bits));
    }
    check_matrix(w, rows, cols)?;
    Ok(if group_size == 0 || group_size >= cols {
        cols
    } else {
        group_size
    })
}

/// Groups per row; `group_size == 0` means one group per row (per-channel).
pub fn groups_per_row(cols: usize, group_size: usize) -> usize {
    if group_size == 0 || group_size >= cols {
        1
    } else {
        cols.div_ceil(group_size)
    }
}

/// A seeded LCG draw uniform in [-0.5, 0.5), for the tests' weights and activations.
#[cfg(test)]
pub(crate) fn test_lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}

/// A seeded test layer: `rows × cols` weights, `n` activation rows whose first `salient`
/// channels are `gain` times larger (as in real LLMs), and their Hessian.
#[cfg(test)]
pub(crate) fn test_layer(
    (rows, cols, n): (usize, usize, usize),
    seed: u64,
    (salient, gain): (usize, f32),
) -> (Vec<f32>, Vec<f32>, gptq::Hessian) {
    let mut seed = seed;
    let w: Vec<f32> = (0..rows * cols).map(|_| test_lcg(&mut seed)).collect();
    let x: Vec<f32> = (0..n * cols)
        .map(|i| test_lcg(&mut seed) * if i % cols < salient { gain } else { 1.0 })
        .collect();
    let mut h = gptq::Hessian::new(cols);
    h.add_rows(&x);
    (w, x, h)
}

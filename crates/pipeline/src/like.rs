//! The size of llama-quantize's file of a named type for a model (`--like Q4_K_M`), so a type
//! mix can aim at it without llama.cpp at hand.
//!
//! The rules are those of `llama_tensor_get_type` in the reference build (llama-cpp-python
//! 0.3.36's llama.cpp) for dense models with an importance matrix, as the benchmarks make
//! them: the base type of the name, the tensors it bumps (`attn_v`, `ffn_down`, `attn_output`,
//! the head) and the fallbacks for rows a 256-value block does not divide. A test compares the
//! estimate with llama-quantize's own files. Only sizes are computed here: i-quant names whose
//! grids adaptq cannot write (IQ2_XS, IQ3_XXS, ...) still give a size to aim at.

use adaptq_source::model::role_of;
use adaptq_source::{TensorRole, TensorSource};
use anyhow::{bail, Result};

/// A storage type llama-quantize may choose, by its bits per 256 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum T {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    IQ4NL,
    IQ4XS,
    IQ3XXS,
    IQ3S,
    IQ2XS,
    IQ2S,
    /// What llama.cpp stores a tensor as when not even the fallback's blocks divide its rows.
    F16,
}

impl T {
    /// `(values per block, bytes per block)` as ggml stores them.
    fn block(self) -> (u64, u64) {
        match self {
            T::Q2K => (256, 84),
            T::Q3K => (256, 110),
            T::Q4K => (256, 144),
            T::Q5K => (256, 176),
            T::Q6K => (256, 210),
            T::IQ4XS => (256, 136),
            T::IQ3XXS => (256, 98),
            T::IQ3S => (256, 110),
            T::IQ2XS => (256, 74),
            T::IQ2S => (256, 82),
            T::Q4_0 | T::IQ4NL => (32, 18),
            T::Q4_1 => (32, 20),
            T::Q5_0 => (32, 22),
            T::Q5_1 => (32, 24),
            T::Q8_0 => (32, 34),
            T::F16 => (1, 2),
        }
    }

    /// llama.cpp's `tensor_type_fallback` for rows of `cols` values: the 32-value type of a
    /// 256-value one, and F16 when even that does not divide the rows.
    fn fitted(self, cols: u64) -> T {
        if cols.is_multiple_of(self.block().0) {
            return self;
        }
        let t = match self {
            T::IQ4XS | T::IQ3XXS | T::IQ3S | T::IQ2XS | T::IQ2S => T::IQ4NL,
            T::Q2K | T::Q3K => T::Q4_0,
            T::Q4K => T::Q5_0,
            T::Q5K => T::Q5_1,
            T::Q6K => T::Q8_0,
            t => t,
        };
        if cols.is_multiple_of(t.block().0) {
            t
        } else {
            T::F16
        }
    }
}

/// The llama-quantize type names `--like` knows, with their base type.
pub const PRESETS: [&str; 11] = [
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "IQ3_XXS",
    "IQ2_XS",
];

fn base(preset: &str) -> Option<T> {
    Some(match preset {
        "Q2_K" => T::Q2K,
        "Q3_K_S" | "Q3_K_M" => T::Q3K,
        "Q4_0" => T::Q4_0,
        "Q4_K_S" | "Q4_K_M" => T::Q4K,
        "Q5_K_M" => T::Q5K,
        "Q6_K" => T::Q6K,
        "IQ4_XS" => T::IQ4XS,
        "IQ3_XXS" => T::IQ3XXS,
        "IQ2_XS" => T::IQ2XS,
        _ => return None,
    })
}

/// The tensor kinds the rules single out, from GGUF or Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `attn_v`, and a fused `attn_qkv`, which llama.cpp's rules count as an `attn_v`.
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnDown,
    Other,
}

fn kind(name: &str) -> Kind {
    let has = |a: &str, b: &str| name.contains(a) || name.contains(b);
    if has("attn_v.", "v_proj.") || has("attn_qkv.", "qkv_proj.") {
        Kind::AttnV
    } else if has("attn_k.", "k_proj.") {
        Kind::AttnK
    } else if has("attn_q.", "q_proj.") {
        Kind::AttnQ
    } else if has("attn_output.", "o_proj.") {
        Kind::AttnOutput
    } else if has("ffn_down.", "down_proj.") {
        Kind::FfnDown
    } else {
        Kind::Other
    }
}

/// `i < n/8 || i >= 7n/8 || (i − n/8) % 3 == 2`, llama.cpp's layers that get more bits.
fn more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
}

/// Bits per weight of llama-quantize's `preset` file for the model in `src`, every tensor
/// counted (1-D tensors and anything else it does not quantize as f32, or as stored when not
/// float).
pub fn preset_bpw(src: &dyn TensorSource, preset: &str) -> Result<f64> {
    let Some(b) = base(&preset.to_ascii_uppercase()) else {
        bail!(
            "unknown llama.cpp type name '{preset}' for like; known: {}",
            PRESETS.join(", ")
        );
    };
    let preset = preset.to_ascii_uppercase();
    let d = src.desc();
    let gqa = d.n_heads / d.n_kv_heads.max(1);
    let n = d.n_layers as i64;
    let tied = !src
        .tensors()
        .iter()
        .any(|t| role_of(t) == TensorRole::Output);
    let (mut i_v, mut i_down) = (0i64, 0i64);
    let (mut params, mut bits) = (0u64, 0u64);
    for info in src.tensors() {
        let numel = info.numel() as u64;
        params += numel;
        let role = role_of(info);
        let cols = *info.shape.last().unwrap_or(&1) as u64;
        // llama-quantize re-rounds every 2-D weight, whatever the source stores it as.
        let quantizable = info.shape.len() >= 2
            && matches!(
                role,
                TensorRole::Linear | TensorRole::Embedding | TensorRole::Output
            );
        if !quantizable {
            bits += if info.dtype.is_float() {
                numel * 32
            } else {
                info.byte_len as u64 * 8
            };
            continue;
        }
        let p = preset.as_str();
        let t = match role {
            TensorRole::Output | TensorRole::Embedding if role == TensorRole::Output || tied => {
                if !cols.is_multiple_of(b.block().0) {
                    T::Q8_0
                } else if matches!(p, "IQ2_XS" | "IQ3_XXS") {
                    T::Q5K
                } else {
                    T::Q6K
                }
            }
            TensorRole::Embedding => match p {
                "IQ2_XS" => T::Q2K,
                "IQ3_XXS" => T::IQ3S,
                _ => b,
            },
            _ => linear_type(p, b, kind(&info.name), gqa, n, &mut i_v, &mut i_down),
        };
        let (len, bytes) = t.fitted(cols).block();
        bits += numel / len * bytes * 8;
    }
    if params == 0 {
        bail!("the model has no tensors");
    }
    Ok(bits as f64 / params as f64)
}

/// A block linear's type under `preset` (base `b`), advancing llama.cpp's per-kind counters.
fn linear_type(p: &str, b: T, k: Kind, gqa: usize, n: i64, i_v: &mut i64, i_down: &mut i64) -> T {
    match k {
        Kind::AttnV => {
            let i = *i_v;
            *i_v += 1;
            match p {
                "IQ2_XS" => {
                    if gqa >= 4 {
                        T::Q4K
                    } else {
                        T::Q2K
                    }
                }
                "Q2_K" if gqa >= 4 => T::Q4K,
                "Q2_K" => T::Q3K,
                "IQ3_XXS" if gqa >= 4 => T::Q4K,
                "Q3_K_M" if i < 2 => T::Q5K,
                "Q3_K_M" => T::Q4K,
                "IQ4_XS" if gqa >= 4 => T::Q5K,
                "Q4_K_M" | "Q5_K_M" if more_bits(i, n) => T::Q6K,
                "Q4_K_S" if i < 4 => T::Q5K,
                _ => b,
            }
        }
        Kind::FfnDown => {
            let i = *i_down;
            *i_down += 1;
            match p {
                "IQ2_XS" if i < n / 8 => T::Q2K,
                "Q2_K" => T::Q3K,
                "Q3_K_M" if i < n / 16 => T::Q5K,
                "Q3_K_M" => T::Q4K,
                "Q4_K_M" | "Q5_K_M" if more_bits(i, n) => T::Q6K,
                "Q4_K_S" if i < n / 8 => T::Q5K,
                "Q4_0" if i < n / 8 => T::Q4_1,
                _ => b,
            }
        }
        Kind::AttnOutput => match p {
            "Q2_K" => T::Q3K,
            "IQ3_XXS" => T::IQ3S,
            "Q3_K_M" => T::Q4K,
            _ => b,
        },
        Kind::AttnK | Kind::AttnQ if p == "IQ3_XXS" => T::IQ2S,
        _ => b,
    }
}

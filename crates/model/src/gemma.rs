//! What Gemma 2 and 3 add to the Llama block, as llama.cpp's `gemma2` and `gemma3` graphs
//! compute it: the embedding scaled by √hidden, RMSNorm after attention and after the MLP as
//! well as before, GeGLU (tanh-approximated GELU) instead of SwiGLU, sliding-window layers
//! (Gemma 3's with their own RoPE base), a query scale from the head width, soft-capped
//! attention scores (Gemma 2) and logits. Gemma 3's q/k norms are the shared
//! [`crate::llama::QkNorm`].
//!
//! Gemma's norms multiply by `1 + w`: GGUF files store the sum, and [`crate::llama`] adds the 1
//! to a Hugging Face checkpoint's weights as it loads them, so the norms are plain RMSNorm.

use crate::llama::rms_norm;
use adaptq_source::model::{Gemma, ModelDesc};
use anyhow::Result;
use candle_core::Tensor;

/// The norms a Gemma block applies to the attention and MLP outputs before each residual add.
pub struct PostNorms {
    pub(crate) attn: Tensor,
    pub(crate) ffn: Tensor,
}

impl PostNorms {
    pub(crate) fn after_attn(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        rms_norm(x, &self.attn, eps)
    }

    pub(crate) fn after_ffn(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        rms_norm(x, &self.ffn, eps)
    }
}

/// The per-model part: scales, RoPE tables' bases and which layers slide.
pub(crate) struct GemmaModel {
    pub(crate) cfg: Gemma,
    /// √hidden in f32, as llama.cpp's `ggml_scale(inp, sqrtf(n_embd))`.
    pub(crate) embed_scale: f32,
    /// Inverse RoPE frequencies of the sliding layers (base `rope_theta_swa`).
    pub(crate) inv_freq_swa: Vec<f32>,
}

/// `c·tanh(x / c)` when a cap is set.
fn softcap(x: Tensor, cap: Option<f32>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((x / c as f64)?.tanh()? * c as f64)?,
        None => x,
    })
}

impl GemmaModel {
    pub(crate) fn new(desc: &ModelDesc, cfg: &Gemma) -> Self {
        GemmaModel {
            cfg: cfg.clone(),
            embed_scale: (desc.hidden as f32).sqrt(),
            inv_freq_swa: crate::llama::inv_freq(cfg.rope_theta_swa, desc.head_dim(), 1.0),
        }
    }

    /// Does layer `i` attend only within the window? Then its keys `window` or more positions
    /// behind the query are masked (llama.cpp's `LLAMA_SWA_TYPE_STANDARD`).
    pub(crate) fn window(&self, i: usize) -> Option<usize> {
        match self.cfg.sliding.get(i) {
            Some(true) => self.cfg.sliding_window,
            _ => None,
        }
    }

    /// Attention scores after Gemma 2's soft cap (before the mask, as in llama.cpp).
    pub(crate) fn cap_scores(&self, scores: Tensor) -> Result<Tensor> {
        softcap(scores, self.cfg.attn_softcap)
    }

    /// Logits after the final soft cap, when the model has one.
    pub(crate) fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        softcap(logits, self.cfg.final_softcap)
    }
}

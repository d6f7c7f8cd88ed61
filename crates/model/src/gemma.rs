//! What Gemma 3 adds to the Llama block, as llama.cpp's `gemma3` graph computes it: the
//! embedding scaled by √hidden, RMSNorm on each query and key head, RMSNorm after attention and
//! after the MLP as well as before, GeGLU (tanh-approximated GELU) instead of SwiGLU, sliding-window
//! layers with their own RoPE base, a query scale from the head width, optional logit soft-cap.
//!
//! The GGUF converter already added Gemma's `1 + w` to every norm weight, so the norms are the
//! plain RMSNorm of [`crate::llama`]. Only GGUF names are read: a Hugging Face checkpoint stores
//! `w` and names the norms differently, and no gemma3 `config.json` is accepted by the source.

use crate::llama::{rms_norm, vec_tensor};
use crate::Weights;
use adaptq_source::model::{Gemma3, ModelDesc};
use anyhow::Result;
use candle_core::Tensor;

/// A Gemma 3 block's norms beyond the Llama pair (`attn_norm`, `ffn_norm`).
pub struct GemmaNorms {
    /// Per-head RMSNorm of queries and keys, `[head_dim]`.
    q: Tensor,
    k: Tensor,
    /// After the attention output projection, before the residual add.
    attn_post: Tensor,
    /// After the MLP's down projection, before the residual add.
    ffn_post: Tensor,
}

impl GemmaNorms {
    pub(crate) fn load(w: &dyn Weights, i: usize, desc: &ModelDesc) -> Result<Self> {
        let (d, hd) = (desc.hidden, desc.head_dim());
        let t = |n: &str, len| vec_tensor(w, &format!("blk.{i}.{n}.weight"), len);
        Ok(GemmaNorms {
            q: t("attn_q_norm", hd)?,
            k: t("attn_k_norm", hd)?,
            attn_post: t("post_attention_norm", d)?,
            ffn_post: t("post_ffw_norm", d)?,
        })
    }

    /// Normalizes `q: [T, H, hd]` and `k: [T, KV, hd]` head by head.
    pub(crate) fn qk(&self, q: &Tensor, k: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        Ok((rms_norm(q, &self.q, eps)?, rms_norm(k, &self.k, eps)?))
    }

    pub(crate) fn after_attn(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        rms_norm(x, &self.attn_post, eps)
    }

    pub(crate) fn after_ffn(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        rms_norm(x, &self.ffn_post, eps)
    }
}

/// The per-model part: scales, RoPE tables' bases and which layers slide.
pub(crate) struct GemmaModel {
    pub(crate) cfg: Gemma3,
    /// √hidden in f32, as llama.cpp's `ggml_scale(inp, sqrtf(n_embd))`.
    pub(crate) embed_scale: f32,
    /// Inverse RoPE frequencies of the sliding layers (base `rope_theta_swa`).
    pub(crate) inv_freq_swa: Vec<f32>,
}

impl GemmaModel {
    pub(crate) fn new(desc: &ModelDesc, cfg: &Gemma3) -> Self {
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

    /// `c·tanh(logits / c)` when the model caps its logits.
    pub(crate) fn softcap(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.cfg.final_softcap {
            Some(c) => ((logits / c as f64)?.tanh()? * c as f64)?,
            None => logits,
        })
    }
}

//! The model description shared by every source format: which architecture, its
//! hyper-parameters, and what each tensor is for (so the quantizer knows what to touch).

use crate::blob::read_small;
use crate::gguf::{Metadata, Value};
use crate::{Result, SourceError, TensorInfo};
use std::path::Path;

/// Model families adaptq runs forward passes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2, SmolLM: decoder-only, RMSNorm, RoPE, SwiGLU; Gemma 3 too, with
    /// its extra norms and sliding layers in [`DecoderTraits`].
    Llama,
    /// BERT encoders (MiniLM): LayerNorm, absolute positions, GELU.
    Bert,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Bert => "bert",
        }
    }
}

/// How rotary embeddings pair up dimensions. GGUF llama files store Q/K rows permuted so that
/// adjacent pairs rotate together; Hugging Face checkpoints (and GGUF qwen2) rotate halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    AdjacentPairs,
    Halves,
}

/// What a tensor does in the network; decides whether it is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A 2-D projection weight inside a block: the quantizer's target.
    Linear,
    /// Token (or position/type) embedding table.
    Embedding,
    /// Separate output head (absent when tied to the embedding).
    Output,
    Norm,
    Bias,
    /// A mixture-of-experts router (and Qwen2-MoE's shared-expert gate): kept in float, as
    /// llama.cpp's quantizer keeps it, since one wrong rounding reroutes whole tokens; it is
    /// a `experts × hidden` matrix, a sliver of the model.
    Router,
    /// Anything else (e.g. integer position ids): carried through unchanged.
    Other,
}

impl TensorRole {
    pub fn name(self) -> &'static str {
        match self {
            TensorRole::Linear => "linear",
            TensorRole::Embedding => "embedding",
            TensorRole::Output => "output",
            TensorRole::Norm => "norm",
            TensorRole::Bias => "bias",
            TensorRole::Router => "router",
            TensorRole::Other => "other",
        }
    }
}

/// Architecture and hyper-parameters, read from GGUF metadata or `config.json`.
#[derive(Debug, Clone)]
pub struct ModelDesc {
    pub family: Family,
    /// Architecture string as the source names it (`llama`, `qwen2`, `BertModel`, …).
    pub architecture: String,
    pub name: Option<String>,
    pub license: Option<String>,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
    pub rope_style: RopeStyle,
    pub tied_embeddings: bool,
    /// Where the tokenizer comes from: `gguf:<model>` or `tokenizer.json`.
    pub tokenizer_id: String,
    /// What the decoder does beyond the plain Llama block; the default for Llama-family files.
    pub decoder: DecoderTraits,
}

/// Decoder settings that plain Llama files leave at their defaults. Kept apart from the
/// `ModelDesc` fields every source fills, so a new family adds here, not to each constructor.
/// Written into a bundle's `model.meta` beside those fields, each only when set, so a Llama
/// bundle's model.meta (and its digest) carries none of them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecoderTraits {
    /// Width of one attention head when it is not hidden / heads (Gemma 3 270M: 256, with a
    /// hidden size of 640 and 4 heads), from GGUF `attention.key_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Token llama.cpp puts first in every perplexity window (`tokenizer.ggml.add_bos_token`):
    /// scores are only comparable with it in the same place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos: Option<u32>,
    /// RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// Factor on RoPE's cos and sin (`rope.scaling.attn_factor`; Phi-3's long-context files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_attn_factor: Option<f32>,
    /// Context the model was trained at (`rope.scaling.original_context_length`): a longer one
    /// takes Phi-3's `rope_factors_long`, as in llama.cpp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_original_context: Option<usize>,
    /// Per-frequency RoPE divisors a `config.json` defines: Llama 3's `rope_scaling`, or
    /// Phi-3's LongRoPE short factors. GGUF files hold them as tensors (`rope_freqs`,
    /// `rope_factors_short`) instead, so these stay unset for GGUF sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_factors: Option<Vec<f32>>,
    /// Phi-3's LongRoPE long factors from `config.json` (GGUF: `rope_factors_long`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_factors_long: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemma: Option<Gemma>,
    /// OLMoE normalizes the whole query (key) projection, not each head.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm_full: bool,
    /// Mixture-of-experts blocks in place of the MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<Moe>,
}

/// A sparse mixture-of-experts MLP as llama.cpp's `build_moe_ffn` runs it for Mixtral
/// (`llama` with experts), Qwen2-MoE, Qwen3-MoE and OLMoE: a softmax over the router's logits,
/// the `used` experts of highest probability, each a SwiGLU MLP of width `expert_ffn`, their
/// outputs summed weighted by those probabilities.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moe {
    pub experts: usize,
    pub used: usize,
    pub expert_ffn: usize,
    /// Whether the chosen probabilities are divided by their sum (Mixtral, Qwen3-MoE) or used
    /// as they are (Qwen2-MoE, OLMoE).
    pub norm_weights: bool,
    /// Width of Qwen2-MoE's shared expert, which every token runs, gated by
    /// `sigmoid(w · x)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_ffn: Option<usize>,
}

/// Most experts of any released model are 384 (Kimi K2); the limit bounds a header's claim.
pub const MAX_EXPERTS: usize = 4096;

/// What Gemma 2 and 3 add to the Llama block beyond q/k norms, with the values llama.cpp
/// derives for them: the embedding scaled by √hidden, norms after attention and the MLP,
/// GeGLU, sliding-window layers, a query scale, soft-capped scores and logits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gemma {
    /// Sliding layers mask keys this many positions or more behind the query; `None` makes
    /// every layer global.
    pub sliding_window: Option<usize>,
    /// Per layer: does it attend only within the window (and use the local RoPE base)?
    pub sliding: Vec<bool>,
    /// RoPE base of the sliding layers (Gemma 3's `rope.freq_base_swa`; Gemma 2 has one base).
    pub rope_theta_swa: f32,
    /// Factor on positions in the global layers' RoPE: 1 / `rope.scaling.factor` (linear).
    pub rope_scale: f32,
    /// Factor on the queries before `q·k` (llama.cpp's `f_attention_scale`).
    pub query_scale: f32,
    /// `c·tanh(s/c)` on the attention scores when set (Gemma 2's `attn_logit_softcapping`).
    #[serde(default)]
    pub attn_softcap: Option<f32>,
    /// `c·tanh(logits/c)` on the output when set (`final_logit_softcapping`).
    #[serde(default)]
    pub final_softcap: Option<f32>,
}

impl ModelDesc {
    pub fn head_dim(&self) -> usize {
        self.decoder
            .head_dim
            .unwrap_or(self.hidden / self.n_heads.max(1))
    }

    /// The JSON written as a bundle's `model.meta`.
    pub fn to_meta_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "family": self.family.name(),
            "architecture": self.architecture,
            "name": self.name,
            "tokenizer": self.tokenizer_id,
            "vocab_size": self.vocab_size,
            "context_length": self.context_length,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "ffn_dim": self.ffn_dim,
            "rope_theta": self.rope_theta,
            "norm_eps": self.norm_eps,
            "rope_style": match self.rope_style {
                RopeStyle::AdjacentPairs => "adjacent-pairs",
                RopeStyle::Halves => "halves",
            },
            "tied_embeddings": self.tied_embeddings,
            "license": self.license,
        });
        if let Ok(serde_json::Value::Object(t)) = serde_json::to_value(&self.decoder) {
            v.as_object_mut().expect("an object").extend(t);
        }
        v
    }

    /// Reads back what [`ModelDesc::to_meta_json`] wrote, with the same limits as a GGUF or
    /// `config.json` source: a bundle can be re-hashed after editing `model.meta`, so its
    /// numbers are as untrusted as any header's. `n_tensors` is how many tensors the bundle
    /// holds; `path` names the file in errors.
    pub fn from_meta_json(v: &serde_json::Value, n_tensors: usize, path: &Path) -> Result<Self> {
        let missing = |k: &str| SourceError::Config {
            path: path.into(),
            why: format!("model.meta has no valid \"{k}\""),
        };
        let u = |k: &str| {
            v[k].as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| missing(k))
        };
        let s = |k: &str| v[k].as_str().map(str::to_string);
        let f = |k: &str| v[k].as_f64().ok_or_else(|| missing(k));
        ModelDesc {
            family: match v["family"].as_str() {
                Some("llama") => Family::Llama,
                Some("bert") => Family::Bert,
                _ => return Err(missing("family")),
            },
            architecture: s("architecture").ok_or_else(|| missing("architecture"))?,
            name: s("name"),
            license: s("license"),
            n_layers: u("n_layers")?,
            hidden: u("hidden")?,
            n_heads: u("n_heads")?,
            n_kv_heads: u("n_kv_heads")?,
            ffn_dim: u("ffn_dim")?,
            vocab_size: u("vocab_size")?,
            context_length: u("context_length")?,
            rope_theta: f("rope_theta")? as f32,
            norm_eps: f("norm_eps")? as f32,
            rope_style: match v["rope_style"]
                .as_str()
                .ok_or_else(|| missing("rope_style"))?
            {
                "adjacent-pairs" => RopeStyle::AdjacentPairs,
                _ => RopeStyle::Halves,
            },
            tied_embeddings: v["tied_embeddings"]
                .as_bool()
                .ok_or_else(|| missing("tied_embeddings"))?,
            tokenizer_id: s("tokenizer").ok_or_else(|| missing("tokenizer"))?,
            decoder: serde_json::from_value(v.clone()).map_err(|e| SourceError::Config {
                path: path.into(),
                why: format!("model.meta: {e}"),
            })?,
        }
        .checked(n_tensors, path)
    }

    pub fn from_gguf(md: &Metadata, infos: &[TensorInfo], path: &Path) -> Result<Self> {
        let arch = md
            .get_str("general.architecture")
            .ok_or_else(|| SourceError::Config {
                path: path.into(),
                why: "GGUF metadata has no general.architecture".into(),
            })?
            .to_string();
        let (family, rope_style) = match arch.as_str() {
            "llama" | "mistral" | "smollm" => (Family::Llama, RopeStyle::AdjacentPairs),
            "qwen2" | "qwen3" | "gemma2" | "gemma3" | "phi3" | "qwen2moe" | "qwen3moe"
            | "olmoe" => (Family::Llama, RopeStyle::Halves),
            "bert" => (Family::Bert, RopeStyle::Halves),
            _ => {
                return Err(SourceError::UnsupportedArch {
                    path: path.into(),
                    arch,
                })
            }
        };
        let need = |k: &str| -> Result<usize> {
            md.get_u64(&format!("{arch}.{k}"))
                .map(|v| v as usize)
                .ok_or_else(|| SourceError::Config {
                    path: path.into(),
                    why: format!("GGUF metadata lacks {arch}.{k}"),
                })
        };
        let n_heads = need("attention.head_count")?;
        let vocab = infos
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .map(|t| t.shape[0])
            .or_else(|| md.get_str_array("tokenizer.ggml.tokens").map(|t| t.len()))
            .unwrap_or(0);
        let mut desc = ModelDesc {
            family,
            name: md.get_str("general.name").map(str::to_string),
            license: md.get_str("general.license").map(str::to_string),
            n_layers: need("block_count")?,
            hidden: need("embedding_length")?,
            n_heads,
            n_kv_heads: md
                .get_u64(&format!("{arch}.attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(n_heads),
            ffn_dim: need("feed_forward_length")?,
            vocab_size: vocab,
            context_length: need("context_length")?,
            rope_theta: md
                .get_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10000.0) as f32,
            norm_eps: md
                .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .or_else(|| md.get_f64(&format!("{arch}.attention.layer_norm_epsilon")))
                .unwrap_or(1e-5) as f32,
            rope_style,
            tied_embeddings: !infos.iter().any(|t| t.name == "output.weight"),
            tokenizer_id: format!(
                "gguf:{}",
                md.get_str("tokenizer.ggml.model").unwrap_or("none")
            ),
            decoder: DecoderTraits {
                head_dim: md
                    .get_u64(&format!("{arch}.attention.key_length"))
                    .map(|v| v as usize),
                bos: match md
                    .get("tokenizer.ggml.add_bos_token")
                    .and_then(|v| v.as_bool())
                {
                    Some(true) => md
                        .get_u64("tokenizer.ggml.bos_token_id")
                        .map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
                    _ => None,
                },
                qk_norm: matches!(arch.as_str(), "qwen3" | "gemma3" | "qwen3moe" | "olmoe"),
                qk_norm_full: arch == "olmoe",
                moe: moe_from_gguf(md, &arch, path)?,
                rope_attn_factor: md
                    .get_f64(&format!("{arch}.rope.scaling.attn_factor"))
                    .filter(|&f| f != 1.0)
                    .map(|f| f as f32),
                rope_original_context: md
                    .get_u64(&format!("{arch}.rope.scaling.original_context_length"))
                    .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
                ..DecoderTraits::default()
            },
            architecture: arch,
        }
        .checked(infos.len(), path)?;
        if let Some(r) = md.get_u64(&format!("{}.rope.dimension_count", desc.architecture)) {
            if r != desc.head_dim() as u64 {
                return Err(SourceError::Config {
                    path: path.into(),
                    why: format!(
                        "RoPE turns {r} of each head's {} dimensions; partial rotary \
                         embeddings are not supported",
                        desc.head_dim()
                    ),
                });
            }
        }
        if let Some(m) = desc.decoder.moe.as_mut() {
            // llama.cpp's default widths where the file gives none.
            if m.expert_ffn == 0 {
                m.expert_ffn = desc.ffn_dim / m.used;
            }
            if let Some(s) = m.shared_ffn.as_mut().filter(|s| **s == 0) {
                *s = desc.ffn_dim;
            }
            desc = desc.checked(infos.len(), path)?;
        }
        if matches!(desc.architecture.as_str(), "gemma2" | "gemma3") {
            desc.decoder.gemma = Some(gemma_from_gguf(md, &desc, path)?);
            desc = desc.checked(infos.len(), path)?;
        }
        Ok(desc)
    }

    /// Refuses hyper-parameters no real model has: code downstream sizes buffers and loops from
    /// them, so a header claiming 2^60 layers must fail here, naming the file, not abort later.
    pub(crate) fn checked(self, n_tensors: usize, path: &Path) -> Result<Self> {
        let bad = |why: String| {
            Err(SourceError::Config {
                path: path.into(),
                why,
            })
        };
        for (what, v) in [
            ("hidden size", self.hidden),
            ("attention head count", self.n_heads),
            ("key/value head count", self.n_kv_heads),
            ("feed-forward size", self.ffn_dim),
            ("vocabulary size", self.vocab_size),
            ("context length", self.context_length),
            ("head width", self.decoder.head_dim.unwrap_or(0)),
        ] {
            if v > MAX_DIM {
                return bad(format!("{what} {v} is over the limit of {MAX_DIM}"));
            }
        }
        if self.n_layers > n_tensors {
            return bad(format!(
                "{} layers claimed but the file holds only {n_tensors} tensors",
                self.n_layers
            ));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_kv_heads > self.n_heads {
            return bad(format!(
                "{} attention heads with {} key/value heads is not a valid layout",
                self.n_heads, self.n_kv_heads
            ));
        }
        if let Some(b) = self.decoder.bos.filter(|&b| b as usize >= self.vocab_size) {
            return bad(format!(
                "beginning-of-text token {b} is outside the vocabulary of {}",
                self.vocab_size
            ));
        }
        let half = self.head_dim() / 2;
        for f in [&self.decoder.rope_factors, &self.decoder.rope_factors_long]
            .into_iter()
            .flatten()
        {
            if f.len() != half || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return bad(format!(
                    "{} RoPE factors for {half} frequencies, or one not positive",
                    f.len()
                ));
            }
        }
        if let Some(m) = &self.decoder.moe {
            if m.used == 0 || m.used > m.experts || m.experts > MAX_EXPERTS {
                return bad(format!(
                    "{} of {} experts per token is not a valid mixture (at most {MAX_EXPERTS})",
                    m.used, m.experts
                ));
            }
            for (what, v) in [
                ("expert width", m.expert_ffn),
                ("shared expert width", m.shared_ffn.unwrap_or(0)),
            ] {
                if v > MAX_DIM {
                    return bad(format!("{what} {v} is over the limit of {MAX_DIM}"));
                }
            }
        }
        if let Some(g) = &self.decoder.gemma {
            if g.sliding.len() != self.n_layers {
                return bad(format!(
                    "{} sliding-window flags for {} layers",
                    g.sliding.len(),
                    self.n_layers
                ));
            }
        }
        Ok(self)
    }
}

/// The mixture a GGUF file declares: `expert_count` > 0 on `llama` (Mixtral), required by the
/// MoE architectures. Widths of 0 stand for llama.cpp's defaults, filled in once the dense
/// width is known (expert: `feed_forward_length / expert_used_count`; shared: the dense
/// width).
fn moe_from_gguf(md: &Metadata, arch: &str, path: &Path) -> Result<Option<Moe>> {
    let get = |k: &str| {
        md.get_u64(&format!("{arch}.{k}"))
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    let moe_arch = matches!(arch, "qwen2moe" | "qwen3moe" | "olmoe");
    let experts = get("expert_count").unwrap_or(0);
    if experts == 0 && !moe_arch {
        return Ok(None);
    }
    let uses_own_width = matches!(arch, "qwen2moe" | "qwen3moe");
    Ok(Some(Moe {
        experts,
        used: get("expert_used_count").ok_or_else(|| SourceError::Config {
            path: path.into(),
            why: format!("GGUF metadata lacks {arch}.expert_used_count"),
        })?,
        expert_ffn: match uses_own_width {
            true => get("expert_feed_forward_length").unwrap_or(0),
            false => get("feed_forward_length").unwrap_or(0),
        },
        norm_weights: matches!(arch, "llama" | "qwen3moe"),
        shared_ffn: (arch == "qwen2moe")
            .then(|| get("expert_shared_feed_forward_length").unwrap_or(0)),
    }))
}

/// Gemma 2's and 3's settings as llama.cpp's `load_arch_hparams` derives them. Gemma 3 has a
/// sliding window only when `attention.sliding_window` is positive, and a local RoPE base of
/// 10000 unless given; Gemma 2 always slides (window 4096 unless given) with one RoPE base, and
/// always soft-caps scores (50) and logits (30) unless other caps are given. The layer pattern
/// comes from `attention.sliding_window_pattern` (a flag per layer, or a period whose last layer
/// is global; default 2 for Gemma 2, 6 for Gemma 3). The 27B's query scale comes from hidden /
/// heads where every other size uses the head width. `desc` has been checked, so its layer
/// count is backed by the file.
fn gemma_from_gguf(md: &Metadata, desc: &ModelDesc, path: &Path) -> Result<Gemma> {
    let arch = &desc.architecture;
    let gemma2 = arch == "gemma2";
    let key = |k: &str| format!("{arch}.{k}");
    let bad = |why: String| SourceError::Config {
        path: path.into(),
        why,
    };
    let window = md
        .get_u64(&key("attention.sliding_window"))
        .or(gemma2.then_some(4096))
        .filter(|&w| w > 0)
        .map(|w| usize::try_from(w).unwrap_or(usize::MAX));
    let n = desc.n_layers;
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding = match (window, md.get(&pattern_key)) {
        (None, _) => vec![false; n],
        (Some(_), Some(Value::Array(a))) => a
            .iter()
            .map(|x| x.as_bool())
            .collect::<Option<Vec<bool>>>()
            .ok_or_else(|| bad(format!("{pattern_key} is not a list of flags")))?,
        (Some(_), v) => {
            let default = if gemma2 { 2 } else { 6 };
            let p = v.map_or(Some(default), |v| v.as_u64()).ok_or_else(|| {
                bad(format!(
                    "{pattern_key} is neither a period nor a list of flags"
                ))
            })?;
            (0..n as u64).map(|i| p == 0 || i % p < p - 1).collect()
        }
    };
    if sliding.len() != n {
        return Err(bad(format!(
            "{pattern_key} lists {} layers, the model has {n}",
            sliding.len()
        )));
    }
    let is_27b = n == if gemma2 { 46 } else { 62 };
    let head_width = if is_27b {
        desc.hidden / desc.n_heads
    } else {
        desc.head_dim()
    };
    let scaling = md.get_str(&key("rope.scaling.type")).unwrap_or("linear");
    let factor = md
        .get_f64(&key("rope.scaling.factor"))
        .or_else(|| md.get_f64(&key("rope.scale_linear")))
        .filter(|&f| f != 0.0 && f != 1.0);
    if let (Some(f), false) = (factor, matches!(scaling, "linear" | "none")) {
        return Err(bad(format!(
            "RoPE scaling '{scaling}' (factor {f}) is not supported"
        )));
    }
    let cap = |k: &str, default: f64| {
        md.get_f64(&key(k))
            .or(gemma2.then_some(default))
            .filter(|&c| c > 0.0)
            .map(|c| c as f32)
    };
    let swa_default = if gemma2 {
        desc.rope_theta as f64
    } else {
        10000.0
    };
    Ok(Gemma {
        sliding_window: window,
        sliding,
        rope_theta_swa: md
            .get_f64(&key("rope.freq_base_swa"))
            .unwrap_or(swa_default) as f32,
        rope_scale: factor.map_or(1.0, |f| (1.0 / f) as f32),
        query_scale: 1.0 / (head_width as f32).sqrt(),
        attn_softcap: if gemma2 {
            cap("attn_logit_softcapping", 50.0)
        } else {
            None
        },
        final_softcap: cap("final_logit_softcapping", 30.0),
    })
}

/// Largest hyper-parameter (hidden size, vocabulary, context length, …) accepted.
const MAX_DIM: usize = 1 << 24;
/// Largest `config.json` read.
pub(crate) const MAX_CONFIG: u64 = 16 << 20;
/// Largest model card read when looking for its license.
const MAX_README: u64 = 4 << 20;

/// The `license:` of a model card's YAML front matter (README.md next to config.json).
pub(crate) fn readme_license(config: &Path) -> Option<String> {
    let bytes = read_small(&config.with_file_name("README.md"), MAX_README).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let front = text.strip_prefix("---")?.split("\n---").next()?;
    front
        .lines()
        .find_map(|l| l.strip_prefix("license:"))
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// Classifies a tensor by its name and shape, for GGUF and Hugging Face naming alike.
pub fn role_of(info: &TensorInfo) -> TensorRole {
    let n = info.name.as_str();
    if !info.dtype.is_float() {
        return TensorRole::Other;
    }
    if n.ends_with(".bias") {
        return TensorRole::Bias;
    }
    if n.contains("norm") || n.contains("LayerNorm") || n.contains("ln_") {
        return TensorRole::Norm;
    }
    if n.contains("embd") || n.contains("embed") || n.contains("embeddings") {
        return TensorRole::Embedding;
    }
    if n == "output.weight" || n == "lm_head.weight" {
        return TensorRole::Output;
    }
    if n.contains("ffn_gate_inp")
        || n.ends_with(".mlp.gate.weight")
        || n.ends_with("block_sparse_moe.gate.weight")
        || n.ends_with("shared_expert_gate.weight")
    {
        return TensorRole::Router;
    }
    if info.shape.len() == 2 && n.ends_with(".weight") {
        return TensorRole::Linear;
    }
    TensorRole::Other
}

/// Block index of a tensor (`blk.N.`, `layers.N.`, `layer.N.`), if it lives in a block.
pub fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        if matches!(w[0], "blk" | "layers" | "layer" | "h") {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> serde_json::Value {
        ModelDesc {
            family: Family::Bert,
            architecture: "BertModel".into(),
            name: None,
            license: None,
            n_layers: 2,
            hidden: 8,
            n_heads: 2,
            n_kv_heads: 2,
            ffn_dim: 16,
            vocab_size: 10,
            context_length: 4,
            rope_theta: 10000.0,
            norm_eps: 1e-12,
            rope_style: RopeStyle::Halves,
            tied_embeddings: false,
            tokenizer_id: "tokenizer.json".into(),
            decoder: DecoderTraits::default(),
        }
        .to_meta_json()
    }

    fn read(v: &serde_json::Value) -> Result<ModelDesc> {
        ModelDesc::from_meta_json(v, 40, Path::new("b/model.meta"))
    }

    #[test]
    fn meta_json_round_trips() {
        let d = read(&meta()).unwrap();
        assert_eq!((d.n_layers, d.hidden, d.n_heads), (2, 8, 2));
    }

    /// Gemma's traits survive a bundle's model.meta, and a Llama's meta has no trace of them.
    #[test]
    fn decoder_traits_round_trip_and_are_checked() {
        let plain = meta();
        assert!(["gemma", "bos", "qk_norm", "head_dim"]
            .iter()
            .all(|k| plain.get(k).is_none()));
        let mut d = read(&meta()).unwrap();
        d.decoder = DecoderTraits {
            head_dim: Some(6),
            bos: Some(2),
            qk_norm: true,
            rope_attn_factor: Some(1.25),
            rope_original_context: Some(4096),
            rope_factors: Some(vec![1.0, 2.0, 4.0]),
            rope_factors_long: Some(vec![1.5, 3.0, 6.0]),
            gemma: Some(Gemma {
                sliding_window: Some(512),
                sliding: vec![true, false],
                rope_theta_swa: 10000.0,
                rope_scale: 0.125,
                query_scale: 0.0625,
                attn_softcap: Some(50.0),
                final_softcap: None,
            }),
            qk_norm_full: true,
            moe: Some(Moe {
                experts: 8,
                used: 2,
                expert_ffn: 96,
                norm_weights: false,
                shared_ffn: Some(192),
            }),
        };
        let back = read(&d.to_meta_json()).unwrap();
        assert_eq!(back.decoder, d.decoder);
        assert_eq!(back.head_dim(), 6);

        let mut v = d.to_meta_json();
        v["bos"] = 10.into();
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        let mut v = d.to_meta_json();
        v["gemma"]["sliding"] = serde_json::json!([true]);
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("1 sliding-window flags for 2 layers"), "{e}");
        let mut v = d.to_meta_json();
        v["gemma"]["query_scale"] = "x".into();
        assert!(read(&v).is_err());
        // A bundle's mixture is checked as a GGUF header's is.
        let mut v = d.to_meta_json();
        v["moe"]["used"] = 9.into();
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("9 of 8 experts"), "{e}");
        let mut v = d.to_meta_json();
        v["rope_factors"] = serde_json::json!([1.0, 2.0]);
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("2 RoPE factors for 3 frequencies"), "{e}");
        v["rope_factors"] = serde_json::json!([1.0, 0.0, 2.0]);
        assert!(read(&v).is_err());
    }

    #[test]
    fn meta_json_runs_the_source_limits() {
        let mut v = meta();
        v["n_heads"] = 0.into();
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("attention heads"), "{e}");

        let mut v = meta();
        v["n_layers"] = (1u64 << 40).into();
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("layers claimed"), "{e}");

        let mut v = meta();
        v["hidden"] = (1u64 << 40).into();
        assert!(read(&v).is_err());

        let mut v = meta();
        v.as_object_mut().unwrap().remove("ffn_dim");
        let e = read(&v).unwrap_err().to_string();
        assert!(e.contains("ffn_dim"), "{e}");
    }
}

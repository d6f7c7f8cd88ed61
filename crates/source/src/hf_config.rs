//! A Hugging Face checkpoint's `config.json` read into a [`ModelDesc`]: the Llama-family
//! architectures with what each adds (Qwen3's q/k norms, Gemma 2/3's settings, Llama 3's and
//! Phi-3's RoPE factors), in the terms llama.cpp's converter writes into a GGUF, so that a
//! checkpoint and its converted GGUF describe the same function.

use crate::blob::read_small;
use crate::model::{
    readme_license, DecoderTraits, Family, Gemma, ModelDesc, Moe, RopeStyle, MAX_CONFIG,
};
use crate::{Result, SourceError, TensorInfo};
use serde_json::Value;
use std::path::Path;

impl ModelDesc {
    pub fn from_hf_config(config: &Path, infos: &[TensorInfo]) -> Result<Self> {
        let text = read_small(config, MAX_CONFIG).map_err(|e| SourceError::Config {
            path: config.into(),
            why: format!(
                "cannot read config.json next to the weights ({}); it names the architecture",
                match e {
                    SourceError::Io { source, .. } => source.to_string(),
                    SourceError::NotFound { .. } => "no such file".to_string(),
                    other => other.to_string(),
                }
            ),
        })?;
        let c: Value = serde_json::from_slice(&text).map_err(|e| SourceError::Config {
            path: config.into(),
            why: format!("invalid JSON: {e}"),
        })?;
        let model_type = c["model_type"].as_str().unwrap_or("").to_string();
        let architecture = c["architectures"][0]
            .as_str()
            .unwrap_or(&model_type)
            .to_string();
        let family = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" | "smollm" | "gemma2" | "gemma3_text"
            | "phi3" | "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" => Family::Llama,
            "bert" => Family::Bert,
            _ => {
                return Err(SourceError::UnsupportedArch {
                    path: config.into(),
                    arch: if model_type.is_empty() {
                        architecture
                    } else {
                        model_type
                    },
                })
            }
        };
        let bad = |why: String| SourceError::Config {
            path: config.into(),
            why,
        };
        let u = |k: &str| {
            c[k].as_u64()
                .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
        };
        let need = |k: &str| u(k).ok_or_else(|| bad(format!("config.json lacks \"{k}\"")));
        let n_heads = need("num_attention_heads")?;
        let has_head = infos.iter().any(|t| t.name == "lm_head.weight");
        let gemma = model_type.starts_with("gemma");
        let mut desc = ModelDesc {
            family,
            architecture,
            name: c["_name_or_path"].as_str().map(str::to_string),
            license: readme_license(config),
            n_layers: need("num_hidden_layers")?,
            hidden: need("hidden_size")?,
            n_heads,
            n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
            ffn_dim: need("intermediate_size")?,
            vocab_size: need("vocab_size")?,
            context_length: u("max_position_embeddings").unwrap_or(2048),
            rope_theta: c["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
            norm_eps: c["rms_norm_eps"]
                .as_f64()
                .or(c["layer_norm_eps"].as_f64())
                .unwrap_or(1e-5) as f32,
            rope_style: RopeStyle::Halves,
            // Gemma checkpoints tie the head unless they say otherwise.
            tied_embeddings: family == Family::Llama
                && (c["tie_word_embeddings"].as_bool().unwrap_or(gemma) || !has_head),
            tokenizer_id: "tokenizer.json".into(),
            decoder: DecoderTraits {
                // Only when it is not hidden / heads, as GGUF's `attention.key_length`.
                head_dim: u("head_dim")
                    .filter(|&h| Some(h) != u("hidden_size").map(|d| d / n_heads.max(1))),
                qk_norm: matches!(
                    model_type.as_str(),
                    "qwen3" | "gemma3_text" | "qwen3_moe" | "olmoe"
                ),
                qk_norm_full: model_type == "olmoe",
                moe: moe_from_hf(&c, &model_type).map_err(bad)?,
                ..DecoderTraits::default()
            },
        }
        .checked(infos.len(), config)?;
        if family == Family::Llama {
            rope_scaling(&c, &model_type, &mut desc).map_err(bad)?;
        }
        if gemma {
            desc.decoder.gemma =
                Some(gemma_from_hf(&c, model_type == "gemma2", &desc).map_err(bad)?);
        }
        desc.checked(infos.len(), config)
    }
}

/// The mixture a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE `config.json` declares, with
/// transformers' defaults. Qwen-MoE checkpoints with dense layers among the sparse ones
/// (`decoder_sparse_step` > 1, `mlp_only_layers`) are refused: every block here is one kind.
fn moe_from_hf(c: &Value, model_type: &str) -> std::result::Result<Option<Moe>, String> {
    let u = |k: &str| {
        c[k].as_u64()
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    let need = |k: &str| u(k).ok_or_else(|| format!("config.json lacks \"{k}\""));
    let (experts, width) = match model_type {
        "mixtral" => (need("num_local_experts")?, need("intermediate_size")?),
        "qwen2_moe" | "qwen3_moe" => (need("num_experts")?, need("moe_intermediate_size")?),
        "olmoe" => (need("num_experts")?, need("intermediate_size")?),
        _ => return Ok(None),
    };
    if model_type.starts_with("qwen") {
        let dense = c["mlp_only_layers"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if dense || u("decoder_sparse_step").unwrap_or(1) != 1 {
            return Err("dense MLP layers among the mixture-of-experts layers \
                        (decoder_sparse_step, mlp_only_layers) are not supported"
                .into());
        }
    }
    Ok(Some(Moe {
        experts,
        used: need("num_experts_per_tok")?,
        expert_ffn: width,
        // transformers' Mixtral always divides by the sum; the others read norm_topk_prob,
        // which their configurations default to false.
        norm_weights: model_type == "mixtral" || c["norm_topk_prob"].as_bool().unwrap_or(false),
        shared_ffn: match model_type {
            "qwen2_moe" => Some(need("shared_expert_intermediate_size")?),
            _ => None,
        },
    }))
}

/// `rope_scaling` as llama.cpp's converter turns it into per-frequency factors: Llama 3's
/// smooth interpolation between `low_freq_factor` and `high_freq_factor` wavelengths, and
/// Phi-3's LongRoPE lists with the attention factor `√(1 + ln s / ln n₀)` for a context
/// stretched `s` times past the trained `n₀`. Gemma's linear scaling is read with the rest of
/// Gemma's settings; anything else is refused, naming the type.
fn rope_scaling(
    c: &Value,
    model_type: &str,
    desc: &mut ModelDesc,
) -> std::result::Result<(), String> {
    let rs = &c["rope_scaling"];
    if rs.is_null() || model_type.starts_with("gemma") {
        return Ok(());
    }
    let kind = rs["rope_type"]
        .as_str()
        .or(rs["type"].as_str())
        .unwrap_or("");
    let num = |k: &str| {
        rs[k]
            .as_f64()
            .ok_or_else(|| format!("rope_scaling of type '{kind}' lacks a number \"{k}\""))
    };
    let list = |k: &str| -> std::result::Result<Vec<f32>, String> {
        rs[k]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
            .ok_or_else(|| format!("rope_scaling \"{k}\" is not a list of numbers"))
    };
    match kind {
        "llama3" => {
            let orig = num("original_max_position_embeddings")?;
            desc.decoder.rope_factors = Some(llama3_factors(
                desc.rope_theta as f64,
                desc.head_dim(),
                num("factor")?,
                num("low_freq_factor")?,
                num("high_freq_factor")?,
                orig,
            ));
        }
        "longrope" | "su" => {
            desc.decoder.rope_factors = Some(list("short_factor")?);
            desc.decoder.rope_factors_long = Some(list("long_factor")?);
            let orig = c["original_max_position_embeddings"]
                .as_u64()
                .or(rs["original_max_position_embeddings"].as_u64())
                .ok_or("LongRoPE scaling without \"original_max_position_embeddings\"")?;
            if orig < 2 {
                return Err(format!(
                    "LongRoPE scaling from a trained context of {orig} tokens"
                ));
            }
            let orig = usize::try_from(orig).unwrap_or(usize::MAX);
            desc.decoder.rope_original_context = Some(orig);
            let scale = desc.context_length as f64 / orig as f64;
            let factor = match rs["attention_factor"].as_f64() {
                Some(f) => f,
                None if scale > 1.0 => (1.0 + scale.ln() / (orig as f64).ln()).sqrt(),
                None => 1.0,
            };
            desc.decoder.rope_attn_factor = (factor != 1.0).then_some(factor as f32);
        }
        "default" => {}
        other => return Err(format!("RoPE scaling '{other}' is not supported")),
    }
    Ok(())
}

/// Llama 3.1's RoPE factors: 1 for wavelengths under `orig / high`, `factor` over
/// `orig / low`, and a smooth blend between, per frequency `base^(-2i/hd)`.
fn llama3_factors(base: f64, hd: usize, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| {
            let freq = base.powf(-2.0 * i as f64 / hd as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// Gemma 2's and 3's settings as transformers reads them: sliding layers from `layer_types`
/// (else Gemma 2's even layers, or Gemma 3's `sliding_window_pattern` whose last layer of
/// each period is global), the local RoPE base `rope_local_base_freq`, linear `rope_scaling`
/// of the global layers, the query scale `query_pre_attn_scalar^-½` and the soft caps, where
/// a `null` cap is none and an absent one Gemma 2's default (50 on scores, 30 on logits).
fn gemma_from_hf(c: &Value, gemma2: bool, desc: &ModelDesc) -> std::result::Result<Gemma, String> {
    let n = desc.n_layers;
    let window = match &c["sliding_window"] {
        Value::Null if c.get("sliding_window").is_some() => None,
        v => Some(v.as_u64().unwrap_or(4096)).filter(|&w| w > 0),
    }
    .map(|w| usize::try_from(w).unwrap_or(usize::MAX));
    let sliding: Vec<bool> = match (&c["layer_types"], window) {
        (_, None) => vec![false; n],
        (Value::Array(a), _) => a
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "layer_types holds {t}, not sliding_attention or full_attention"
                )),
            })
            .collect::<std::result::Result<_, _>>()?,
        _ if gemma2 => (0..n).map(|i| i % 2 == 0).collect(),
        _ => {
            let p = c["sliding_window_pattern"].as_u64().unwrap_or(6) as usize;
            (0..n).map(|i| p == 0 || (i + 1) % p != 0).collect()
        }
    };
    if sliding.len() != n {
        return Err(format!(
            "layer_types lists {} layers, the model has {n}",
            sliding.len()
        ));
    }
    let rs = &c["rope_scaling"];
    let rope_scale = match rs["rope_type"].as_str().or(rs["type"].as_str()) {
        None if rs.is_null() => 1.0,
        Some("linear") => match rs["factor"].as_f64() {
            Some(f) if f > 0.0 => (1.0 / f) as f32,
            _ => return Err("linear rope_scaling without a positive \"factor\"".into()),
        },
        Some("default") => 1.0,
        other => {
            return Err(format!(
                "RoPE scaling '{}' is not supported",
                other.unwrap_or("?")
            ))
        }
    };
    let cap = |k: &str, default: f64| match c.get(k) {
        None if gemma2 => Some(default as f32),
        None => None,
        Some(v) => v.as_f64().filter(|&x| x > 0.0).map(|x| x as f32),
    };
    let scalar = c["query_pre_attn_scalar"]
        .as_f64()
        .unwrap_or(desc.head_dim() as f64);
    Ok(Gemma {
        sliding_window: window,
        sliding,
        rope_theta_swa: match gemma2 {
            true => desc.rope_theta,
            false => c["rope_local_base_freq"].as_f64().unwrap_or(10000.0) as f32,
        },
        rope_scale,
        query_scale: (1.0 / scalar.sqrt()) as f32,
        attn_softcap: cap("attn_logit_softcapping", 50.0),
        final_softcap: cap("final_logit_softcapping", 30.0),
    })
}

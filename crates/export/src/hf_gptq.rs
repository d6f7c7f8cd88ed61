//! Bundle → Hugging Face GPTQ checkpoint (transformers / vLLM / gptqmodel read it).
//!
//! Each linear layer becomes `qweight` (int32, `[in / (32/bits), out]`, codes of the transposed
//! weight packed LSB-first along the input axis), `qzeros` (int32, `[groups, out / (32/bits)]`,
//! the legacy "gptq" v1 layout storing zero − 1), `scales` (f16, `[groups, out]`) and `g_idx`
//! (int32, the group of each input column). GPTQ's zero points are integers, so adaptq's
//! symmetric grid (`w = s·(q − 2^(b−1))`) maps exactly; asymmetric grids (a float min) do not,
//! and are refused rather than silently re-rounded. GGUF-sourced llama Q/K rows are un-permuted
//! back to Hugging Face's rotate-half layout (whole rows move, so values stay exact).

use crate::safetensors::{Dtype, ShardedWriter, StTensor};
use adaptq_bundle::output::Kind as OutKind;
use adaptq_bundle::{Bundle, Encoding, TensorEntry};
use adaptq_quant::{pack, Grid, QuantizedTensor};
use adaptq_source::model::{Family, ModelDesc as Meta, RopeStyle};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct HfGptqOptions {
    /// Largest safetensors shard; more than one shard adds `model.safetensors.index.json`.
    pub max_shard_bytes: u64,
    /// Replace an existing output folder (only one adaptq wrote: see `adaptq_bundle::output`).
    pub force: bool,
}

impl Default for HfGptqOptions {
    fn default() -> Self {
        HfGptqOptions {
            max_shard_bytes: 4 << 30,
            force: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HfGptqSummary {
    pub bits: u8,
    pub group_size: usize,
    pub shards: Vec<String>,
    pub tensor_bytes: u64,
    pub files: Vec<String>,
}

/// Llama tensor names as (GGUF, Hugging Face): whole names, then the per-layer parts
/// (`blk.{n}.{gguf}.{suffix}` ↔ `model.layers.{n}.{hf}.{suffix}`). Both directions read this.
pub(crate) const WHOLE_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];
pub(crate) const LAYER_PARTS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Mixtral's mixture parts as (GGUF, Hugging Face): the router, then the experts' matrices
/// (`blk.{n}.{gguf}.{j}.weight` ↔ `model.layers.{n}.block_sparse_moe.experts.{j}.{hf}.weight`,
/// the per-expert names adaptq reads a GGUF stack as).
pub(crate) const ROUTER: (&str, &str) = ("ffn_gate_inp", "block_sparse_moe.gate");
pub(crate) const EXPERT_PARTS: [(&str, &str); 3] = [
    ("ffn_gate_exps", "w1"),
    ("ffn_up_exps", "w3"),
    ("ffn_down_exps", "w2"),
];

/// Hugging Face name of a GGUF llama tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// One name table read both ways: GGUF → Hugging Face when `to_hf`, else back.
pub(crate) fn rename(name: &str, to_hf: bool) -> Option<String> {
    let orient = |&(g, h): &(&'static str, &'static str)| if to_hf { (g, h) } else { (h, g) };
    let (from_prefix, to_prefix) = orient(&("blk.", "model.layers."));
    if let Some((_, to)) = WHOLE_NAMES.iter().map(orient).find(|(f, _)| *f == name) {
        return Some(to.to_string());
    }
    let (n, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let experts = "block_sparse_moe.experts";
    if let Some(e) = rename_expert(rest, to_hf, experts) {
        return Some(format!("{to_prefix}{n}.{e}"));
    }
    LAYER_PARTS
        .iter()
        .chain([&ROUTER])
        .map(orient)
        .find_map(|(from, to)| {
            let suffix = rest.strip_prefix(from)?.strip_prefix('.')?;
            (!suffix.contains('.')).then(|| format!("{to_prefix}{n}.{to}.{suffix}"))
        })
}

/// An expert's matrix within a layer, renamed: `ffn_gate_exps.{j}.weight` ↔
/// `{experts}.{j}.w1.weight`.
fn rename_expert(rest: &str, to_hf: bool, experts: &str) -> Option<String> {
    let (part, j) = match to_hf {
        true => {
            let (part, tail) = rest.split_once('.')?;
            (part, tail.strip_suffix(".weight")?)
        }
        false => {
            let (j, part) = rest
                .strip_prefix(experts)?
                .strip_prefix('.')?
                .split_once('.')?;
            (part.strip_suffix(".weight")?, j)
        }
    };
    j.parse::<usize>().ok()?;
    EXPERT_PARTS.iter().find_map(|&(g, h)| match to_hf {
        true => (part == g).then(|| format!("{experts}.{j}.{h}.weight")),
        false => (part == h).then(|| format!("{g}.{j}.weight")),
    })
}

/// For GGUF Q/K weights: the source row of each Hugging Face row, the inverse of
/// [`crate::gguf::permute_rows`] (llama.cpp's converter moved HF row `h·hd + j·hd/2 + i` to
/// `h·hd + 2i + j`; this undoes it).
pub fn unpermute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let mut src = vec![0; rows];
    for (g, &hf) in crate::gguf::permute_rows(rows, heads).iter().enumerate() {
        src[hf] = g;
    }
    src
}

fn permuted_heads(m: &Meta, gguf: &str) -> Option<usize> {
    if m.rope_style != RopeStyle::AdjacentPairs {
        return None;
    }
    if gguf.ends_with(".attn_q.weight") {
        Some(m.n_heads)
    } else if gguf.ends_with(".attn_k.weight") {
        Some(m.n_kv_heads)
    } else {
        None
    }
}

/// GPTQ tensors of one layer: (qweight, qzeros, scales, g_idx) as little-endian bytes.
pub fn pack_gptq(q: &QuantizedTensor, row_order: Option<&[usize]>) -> Result<[Vec<u8>; 4]> {
    if q.grid != Grid::Symmetric {
        bail!("GPTQ zero points are integers; adaptq's asymmetric grid stores a float min (a symmetric grid is needed)");
    }
    if !matches!(q.bits, 2 | 4 | 8) {
        bail!(
            "the GPTQ checkpoint format packs 2, 4 or 8 bits here, not {}",
            q.bits
        );
    }
    let b = q.bits as usize;
    let pf = 32 / b;
    let (rows, cols) = (q.rows, q.cols);
    if !cols.is_multiple_of(pf) || !rows.is_multiple_of(pf) {
        bail!("a {rows}×{cols} layer cannot be packed {pf} codes per int32");
    }
    let gpr = q.groups_per_row();
    let gs = q.group_size;
    let codes = pack::unpack(&q.codes, q.bits, rows * cols);
    let order: Vec<usize> = match row_order {
        Some(o) => o.to_vec(),
        None => (0..rows).collect(),
    };
    // qweight[i / pf][j] holds codes[j][i] for the pf inputs i of that word (out = j).
    let mut qweight = Vec::with_capacity(cols / pf * rows * 4);
    for iw in 0..cols / pf {
        for &r in &order {
            let mut word = 0u32;
            for k in 0..pf {
                word |= (codes[r * cols + iw * pf + k] as u32) << (b * k);
            }
            qweight.extend_from_slice(&word.to_le_bytes());
        }
    }
    let zero = (1u32 << (b - 1)) - 1; // v1 format: zero − 1
    let mut qzeros = Vec::with_capacity(gpr * rows / pf * 4);
    let mut zword = 0u32;
    for k in 0..pf {
        zword |= zero << (b * k);
    }
    for _ in 0..gpr * rows / pf {
        qzeros.extend_from_slice(&zword.to_le_bytes());
    }
    let mut scales = Vec::with_capacity(gpr * rows * 2);
    for g in 0..gpr {
        for &r in &order {
            scales.extend_from_slice(&q.scales[r * gpr + g].to_le_bytes());
        }
    }
    let g_idx: Vec<u8> = (0..cols)
        .flat_map(|c| ((c / gs) as i32).to_le_bytes())
        .collect();
    Ok([qweight, qzeros, scales, g_idx])
}

/// An f32 as the f64 of its shortest decimal form (`1e-5`, not `9.999999747378752e-6`), so
/// config.json carries the value model.meta was written with.
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The bundle's own model description; the checkpoint is written for Llama-family decoders only.
fn meta_of(bundle: &Bundle) -> Result<Meta> {
    let v: serde_json::Value =
        serde_json::from_slice(&bundle.read_file(adaptq_bundle::MODEL_META)?)
            .context("model.meta")?;
    let meta = Meta::from_meta_json(
        &v,
        bundle.manifest.tensors.len(),
        Path::new(adaptq_bundle::MODEL_META),
    )?;
    let has = |part: &str| {
        bundle
            .manifest
            .tensors
            .iter()
            .any(|t| t.name.contains(part))
    };
    let rope_freqs = has("rope_freqs.weight") || has("rope_factors_");
    // Gemma's norms, GeGLU and layer pattern, Qwen3's q/k norms, Llama 3's RoPE scaling, Phi-3's
    // fused projections and Qwen2's biases each need their own config.json, not the plain Llama
    // one written here.
    let unlike = if meta.family != Family::Llama {
        Some("it is not a Llama-family decoder")
    } else if meta.decoder.gemma.is_some() {
        Some("Gemma's extra norms and sliding layers")
    } else if meta
        .decoder
        .moe
        .as_ref()
        .is_some_and(|m| m.shared_ffn.is_some() || !m.norm_weights)
    {
        Some("its mixture of experts is not Mixtral's")
    } else if meta.decoder.qk_norm {
        Some("its q/k norms")
    } else if rope_freqs || meta.decoder.rope_factors.is_some() {
        Some("its RoPE frequency factors")
    } else if meta.decoder.head_dim.is_some() {
        Some("its head width differs from hidden size / heads")
    } else if has(".attn_qkv.") || has(".qkv_proj.") || has("gate_up") {
        Some("its fused projections (Phi-3)")
    } else if has(".bias") {
        Some("its attention biases (Qwen2)")
    } else {
        None
    };
    if let Some(why) = unlike {
        bail!(
            "Hugging Face GPTQ export writes plain Llama checkpoints; this bundle ({}) cannot \
             be one: {why}",
            meta.architecture
        );
    }
    Ok(meta)
}

/// Calls `f` with each tensor of `bundle` as the Hugging Face checkpoint means it: its HF name
/// and its dequantized f32 values in HF row order (for checks against an independent unpacker).
pub fn for_each_hf_tensor(bundle: &Bundle, f: &mut dyn FnMut(&str, &[f32])) -> Result<()> {
    let meta = meta_of(bundle)?;
    for t in &bundle.manifest.tensors {
        let v = hf_values(bundle, &meta, t)?;
        f(&hf_tensor_name(&meta, t)?, &v);
    }
    Ok(())
}

/// The Hugging Face name of a bundle tensor (GGUF-sourced bundles are renamed).
fn hf_tensor_name(meta: &Meta, t: &TensorEntry) -> Result<String> {
    if meta.rope_style == RopeStyle::AdjacentPairs {
        hf_name(&t.name).with_context(|| format!("tensor '{}' has no Hugging Face name", t.name))
    } else {
        Ok(t.name.clone())
    }
}

/// A tensor's f32 values in Hugging Face row order (Q/K rows of GGUF sources un-permuted).
fn hf_values(bundle: &Bundle, meta: &Meta, t: &TensorEntry) -> Result<Vec<f32>> {
    let v = bundle.read_f32(&t.name)?;
    Ok(match permuted_heads(meta, &t.name) {
        Some(h) => {
            let (rows, cols) = (t.dims()[0], t.cols());
            unpermute_rows(rows, h)
                .iter()
                .flat_map(|&r| v[r * cols..(r + 1) * cols].to_vec())
                .collect()
        }
        None => v,
    })
}

/// One output tensor before its bytes exist.
struct Planned<'a> {
    entry: &'a TensorEntry,
    hf: String,
    kind: Kind,
}

enum Kind {
    Gptq,
    Float(Dtype),
}

/// Each tensor of the bundle with its Hugging Face name and how it is written; the one
/// width and group size of its GPTQ layers.
fn plan_tensors<'a>(bundle: &'a Bundle, meta: &Meta) -> Result<(Vec<Planned<'a>>, u8, usize)> {
    let mut cfg: Option<(u8, usize)> = None;
    let mut plan = Vec::new();
    for t in &bundle.manifest.tensors {
        let hf = hf_tensor_name(meta, t)?;
        let kind = match (&t.encoding, t.role.as_str()) {
            (
                Encoding::Int {
                    bits,
                    group_size,
                    grid,
                },
                "linear",
            ) => {
                if *grid != Grid::Symmetric {
                    bail!("tensor '{}': GPTQ zero points are integers; adaptq's asymmetric grid stores a float min; a Hugging Face GPTQ export needs a symmetric grid", t.name);
                }
                match cfg {
                    None => cfg = Some((*bits, *group_size)),
                    Some(c) if c != (*bits, *group_size) => bail!(
                        "tensor '{}' is {}-bit group {}, others {}-bit group {}: a GPTQ checkpoint has one width and group size (APQ mixes cannot be exported this way)",
                        t.name, bits, group_size, c.0, c.1
                    ),
                    _ => {}
                }
                Kind::Gptq
            }
            (Encoding::Int { .. }, _) | (Encoding::Ggml { .. }, _) => {
                if matches!(t.encoding, Encoding::Ggml { .. }) && t.role == "linear" {
                    bail!(
                        "tensor '{}' holds GGML blocks; export those to GGUF",
                        t.name
                    );
                }
                Kind::Float(Dtype::F16)
            }
            (Encoding::Codebook { .. }, _) => bail!(
                "tensor '{}' holds NOVAQ codebooks, which a GPTQ checkpoint cannot hold",
                t.name
            ),
            (Encoding::F16, _) => Kind::Float(Dtype::F16),
            (Encoding::F32, _) => Kind::Float(Dtype::F32),
            (Encoding::Raw { dtype, .. }, _) => bail!("tensor '{}' holds raw {dtype} data", t.name),
        };
        plan.push(Planned { entry: t, hf, kind });
    }

    let (bits, group_size) = cfg.context("no quantized linear layer to export")?;
    Ok((plan, bits, group_size))
}

/// Every output tensor with its size, in order, for the streaming writer.
fn layout(plan: &[Planned], bits: u8, group_size: usize) -> Vec<StTensor> {
    let mut st: Vec<StTensor> = Vec::new();
    for p in plan {
        let shape = p.entry.dims();
        match p.kind {
            Kind::Gptq => {
                let (rows, cols) = (shape[0], shape[1]);
                let pf = 32 / bits as usize;
                let groups = adaptq_quant::groups_per_row(cols, group_size);
                let base = p.hf.trim_end_matches(".weight");
                st.push(StTensor::new(
                    format!("{base}.qweight"),
                    Dtype::I32,
                    vec![cols / pf, rows],
                ));
                st.push(StTensor::new(
                    format!("{base}.qzeros"),
                    Dtype::I32,
                    vec![groups, rows / pf],
                ));
                st.push(StTensor::new(
                    format!("{base}.scales"),
                    Dtype::F16,
                    vec![groups, rows],
                ));
                st.push(StTensor::new(
                    format!("{base}.g_idx"),
                    Dtype::I32,
                    vec![cols],
                ));
            }
            Kind::Float(d) => st.push(StTensor::new(p.hf.clone(), d, shape)),
        }
    }
    st
}

/// Streams every planned tensor into the writer: GPTQ layers packed, the rest as floats.
fn write_tensors(
    w: &mut ShardedWriter,
    bundle: &Bundle,
    meta: &Meta,
    plan: &[Planned],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    for (i, p) in plan.iter().enumerate() {
        let t = p.entry;
        match p.kind {
            Kind::Gptq => {
                let q = bundle.quantized(t)?;
                let order = permuted_heads(meta, &t.name).map(|h| unpermute_rows(q.rows, h));
                let parts = pack_gptq(&q, order.as_deref())
                    .with_context(|| format!("tensor '{}'", t.name))?;
                for part in parts {
                    w.write_next(&part)?;
                }
            }
            Kind::Float(d) => {
                let v = hf_values(bundle, meta, t)?;
                let bytes: Vec<u8> = match d {
                    Dtype::F16 => v
                        .iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                    _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                w.write_next(&bytes)?;
            }
        }
        progress(i + 1, plan.len());
    }
    Ok(())
}

/// config.json, quantize_config.json and the tokenizer files beside the shards in `dir`;
/// their names are added to `files`.
fn side_files(
    bundle: &Bundle,
    meta: &Meta,
    bits: u8,
    group_size: usize,
    dir: &Path,
    files: &mut Vec<String>,
) -> Result<()> {
    let mut qcfg = json!({
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": false,
        "sym": true,
        "static_groups": false,
        "true_sequential": true,
        "checkpoint_format": "gptq",
        "damp_percent": 0.05,
    });
    if let Some(m) = &meta.decoder.moe {
        // Without the list, transformers would make the float router a GPTQ layer too.
        let experts = |parts: &[&str]| -> Vec<String> {
            (0..m.experts)
                .flat_map(|j| {
                    parts
                        .iter()
                        .map(move |p| format!("block_sparse_moe.experts.{j}.{p}"))
                })
                .collect()
        };
        qcfg["modules_in_block_to_quantize"] = json!([
            ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
            ["self_attn.o_proj"],
            experts(&["w1", "w3"]),
            experts(&["w2"]),
        ]);
    }
    // Special tokens and the chat template, from the source GGUF's metadata when there is one.
    let gmd: Vec<serde_json::Value> = bundle
        .read_file(crate::gguf::GGUF_METADATA)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let gget = |k: &str| {
        gmd.iter()
            .find(|e| e["key"] == k)
            .map(|e| e["value"].clone())
    };
    let token = |id: &Option<serde_json::Value>| {
        let tokens = gget("tokenizer.ggml.tokens")?;
        tokens.get(id.as_ref()?.as_u64()? as usize).cloned()
    };
    let (bos, eos) = (
        gget("tokenizer.ggml.bos_token_id"),
        gget("tokenizer.ggml.eos_token_id"),
    );
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta.hidden,
        "intermediate_size": meta.ffn_dim,
        "num_attention_heads": meta.n_heads,
        "num_key_value_heads": meta.n_kv_heads,
        "num_hidden_layers": meta.n_layers,
        "vocab_size": meta.vocab_size,
        "max_position_embeddings": meta.context_length,
        "rms_norm_eps": shortest(meta.norm_eps),
        "rope_theta": shortest(meta.rope_theta),
        "hidden_act": "silu",
        "tie_word_embeddings": meta.tied_embeddings,
        "torch_dtype": "float16",
        "quantization_config": qcfg,
    });
    if let Some(m) = &meta.decoder.moe {
        config["architectures"] = json!(["MixtralForCausalLM"]);
        config["model_type"] = json!("mixtral");
        config["intermediate_size"] = json!(m.expert_ffn);
        config["num_local_experts"] = json!(m.experts);
        config["num_experts_per_tok"] = json!(m.used);
    }
    if let (Some(b), Some(e)) = (&bos, &eos) {
        config["bos_token_id"] = b.clone();
        config["eos_token_id"] = e.clone();
    }
    // Writes a side file into the staged folder and lists it.
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        std::fs::write(dir.join(name), bytes)?;
        files.push(name.to_string());
        Ok(())
    };
    put("config.json", &serde_json::to_vec_pretty(&config)?)?;
    put("quantize_config.json", &serde_json::to_vec_pretty(&qcfg)?)?;
    let mut has_tokenizer = false;
    for f in ["tokenizer.json", "tokenizer_config.json", "LICENSE"] {
        if let Ok(b) = bundle.read_file(f) {
            put(f, &b)?;
            has_tokenizer |= f == "tokenizer.json";
        }
    }
    if !has_tokenizer {
        if let Ok(md) = bundle.read_file(crate::gguf::GGUF_METADATA) {
            let v: serde_json::Value = serde_json::from_slice(&md)?;
            let vocab = adaptq_model::tokenizer::GgufVocab::from_metadata_json(&v)?;
            let tok = adaptq_model::tokenizer::from_gguf(&vocab)?;
            let text = tok
                .to_string(true)
                .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
            put("tokenizer.json", text.as_bytes())?;
            let mut tc = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": meta.context_length,
            });
            if let Some(t) = token(&bos) {
                tc["bos_token"] = t;
            }
            if let Some(t) = token(&eos) {
                tc["eos_token"] = t;
            }
            if let Some(b) = gget("tokenizer.ggml.add_bos_token") {
                tc["add_bos_token"] = b;
            }
            if let Some(t) = gget("tokenizer.chat_template") {
                tc["chat_template"] = t;
            }
            put("tokenizer_config.json", &serde_json::to_vec_pretty(&tc)?)?;
        }
    }
    Ok(())
}

/// Writes `bundle` as a Hugging Face GPTQ checkpoint folder at `out` (built under a temporary
/// name and renamed when complete).
pub fn export_hf_gptq(
    bundle: &Bundle,
    out: &Path,
    opts: &HfGptqOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HfGptqSummary> {
    let staged = crate::staged_for(bundle, out, opts.force, OutKind::Folder)?;
    let meta = meta_of(bundle)?;
    let (plan, bits, group_size) = plan_tensors(bundle, &meta)?;
    let st = layout(&plan, bits, group_size);
    let tmp = staged.path().to_path_buf();
    let mut w = ShardedWriter::create(&tmp, st, opts.max_shard_bytes)?;
    write_tensors(&mut w, bundle, &meta, &plan, progress)?;
    let (shards, tensor_bytes) = w.finish()?;
    let mut files = shards.clone();
    side_files(bundle, &meta, bits, group_size, &tmp, &mut files)?;
    files.sort();
    // Lists what was written, so a later forced export may replace exactly this folder.
    staged.mark()?;
    staged.commit(OutKind::Folder)?;
    Ok(HfGptqSummary {
        bits,
        group_size,
        shards,
        tensor_bytes,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptq_quant::{quantize_rtn, RtnConfig};

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: HF row h·hd + j·hd/2 + i → GGUF row h·hd + 2i + j.
        let (heads, hd) = (3, 8);
        let rows = heads * hd;
        let mut gguf_of_hf = vec![0; rows];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    gguf_of_hf[h * hd + j * hd / 2 + i] = h * hd + 2 * i + j;
                }
            }
        }
        assert_eq!(unpermute_rows(rows, heads), gguf_of_hf);
    }

    #[test]
    fn packed_codes_decode_to_the_same_weights() {
        let (rows, cols) = (16, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        for bits in [2u8, 4, 8] {
            let q =
                quantize_rtn(&w, rows, cols, &RtnConfig::new(bits, 32, Grid::Symmetric)).unwrap();
            let [qw, qz, sc, gi] = pack_gptq(&q, None).unwrap();
            let b = bits as usize;
            let pf = 32 / b;
            let word =
                |v: &[u8], i: usize| u32::from_le_bytes(v[4 * i..4 * i + 4].try_into().unwrap());
            let deq = q.dequantize();
            for j in 0..rows {
                for i in 0..cols {
                    let code = (word(&qw, (i / pf) * rows + j) >> (b * (i % pf))) & ((1 << b) - 1);
                    let g = word(&gi, i) as usize;
                    let z = ((word(&qz, g * rows / pf + j / pf) >> (b * (j % pf)))
                        & ((1 << b) - 1))
                        + 1;
                    let s = half::f16::from_le_bytes([
                        sc[2 * (g * rows + j)],
                        sc[2 * (g * rows + j) + 1],
                    ]);
                    let v = s.to_f32() * (code as f32 - z as f32);
                    assert_eq!(
                        v.to_bits(),
                        deq[j * cols + i].to_bits(),
                        "bits {bits} ({j},{i})"
                    );
                }
            }
        }
        let q = quantize_rtn(&w, rows, cols, &RtnConfig::new(4, 32, Grid::Asymmetric)).unwrap();
        assert!(pack_gptq(&q, None)
            .unwrap_err()
            .to_string()
            .contains("symmetric grid"));
    }

    #[test]
    fn names_follow_transformers() {
        for (gguf, hf) in [
            (
                "blk.7.ffn_down.weight",
                "model.layers.7.mlp.down_proj.weight",
            ),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            ("token_embd.weight", "model.embed_tokens.weight"),
            (
                "blk.3.ffn_up_exps.5.weight",
                "model.layers.3.block_sparse_moe.experts.5.w3.weight",
            ),
            (
                "blk.1.ffn_gate_inp.weight",
                "model.layers.1.block_sparse_moe.gate.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), Some(hf));
            assert_eq!(crate::gguf::gguf_name(hf).as_deref(), Some(gguf));
        }
        assert!(hf_name("blk.0.mystery.weight").is_none());
        assert!(hf_name("blk.0.ffn_up_exps.x.weight").is_none());
    }
}

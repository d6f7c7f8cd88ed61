//! Bundle → GGUF v3.
//!
//! Each tensor is written in the best form the bundle allows: GGML blocks are copied as they
//! are; integer grids that *are* a GGML grid (group 32, 4/5/8 bits) are re-laid losslessly;
//! anything else is decoded and rounded onto the nearest GGML type, and the summary says so.
//! Metadata (architecture, tokenizer) comes from the bundle's copy of the source GGUF's.

use adaptq_bundle::output::Kind as OutKind;
use adaptq_bundle::{Bundle, Encoding, TensorEntry};
use adaptq_quant::ggml::{self, BlockType};
use adaptq_source::gguf::{Array, Value};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::BufWriter;
use std::path::Path;

use crate::writer::{GgufWriter, TensorPlan};

/// The bundle file holding the source GGUF's metadata (written by `quantize`).
pub const GGUF_METADATA: &str = "gguf-metadata.json";

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Re-round every quantized tensor that is not already this type onto it (k-quants fall
    /// back where rows do not fit). `None`: keep each tensor's own type where it has one.
    pub force_type: Option<BlockType>,
    /// Replace an existing output file (only a GGUF adaptq wrote).
    pub force: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedTensor {
    pub name: String,
    /// GGML type name written (`Q4_0`, `F16`, …).
    pub ggml_type: String,
    /// Whether the values are exactly the bundle's (no re-rounding).
    pub exact: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub file_bytes: u64,
    pub tensor_bytes: u64,
    pub params: u64,
    /// Tensor bytes × 8 / every parameter (llama.cpp's "bpw overall" in the anchors).
    pub bits_per_weight: f64,
    pub tensors: Vec<ExportedTensor>,
}

/// How one bundle tensor becomes GGUF bytes.
enum Route {
    Copy(BlockType),
    Relay(BlockType),
    Reround(BlockType, String),
    F16,
    F32,
}

impl Route {
    fn ggml_id(&self) -> u32 {
        match self {
            Route::Copy(t) | Route::Relay(t) | Route::Reround(t, _) => t.ggml_id(),
            Route::F16 => 1,
            Route::F32 => 0,
        }
    }
    fn bytes(&self, numel: usize) -> usize {
        match self {
            Route::Copy(t) | Route::Relay(t) | Route::Reround(t, _) => t.bytes_for(numel),
            Route::F16 => numel * 2,
            Route::F32 => numel * 4,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Route::Copy(t) | Route::Relay(t) | Route::Reround(t, _) => t.name(),
            Route::F16 => "F16",
            Route::F32 => "F32",
        }
    }
}

fn route(t: &TensorEntry, opts: &ExportOptions) -> Result<Route> {
    let cols = t.cols();
    let reround = |want: BlockType, why: String| -> Result<Route> {
        let (ty, fell) = ggml::pick(want, cols).with_context(|| format!("tensor '{}'", t.name))?;
        let why = if fell {
            format!(
                "{why}; rows of {cols} do not fit {}, used {}",
                want.name(),
                ty.name()
            )
        } else {
            why
        };
        Ok(Route::Reround(ty, why))
    };
    Ok(match &t.encoding {
        Encoding::Ggml { ggml_type } => match opts.force_type {
            Some(f) if f != *ggml_type => {
                reround(f, format!("{} re-rounded as asked", ggml_type.name()))?
            }
            _ => Route::Copy(*ggml_type),
        },
        Encoding::Int {
            bits,
            group_size,
            grid,
        } => {
            let exact = ggml::twin(*bits, *grid, *group_size, cols);
            match (exact, opts.force_type) {
                (Some(e), None) => Route::Relay(e),
                (Some(e), Some(f)) if f == e => Route::Relay(e),
                (_, Some(f)) => reround(f, format!("{} re-rounded as asked", t.encoding.label()))?,
                (None, None) => reround(
                    ggml::nearest(*bits, *grid),
                    format!(
                        "{} has no GGML twin (those are 4 or 5 bits, or 8 bits symmetric, in groups of a multiple of 32)",
                        t.encoding.label()
                    ),
                )?,
            }
        }
        Encoding::Codebook { .. } => match opts.force_type {
            Some(f) => reround(
                f,
                format!("{} decoded and re-rounded as asked", t.encoding.label()),
            )?,
            None => bail!(
                "tensor '{}' holds NOVAQ codebooks, which llama.cpp cannot run; pass --type T to \
                 re-round the decoded weights onto a GGML type (this loses NOVAQ's accuracy)",
                t.name
            ),
        },
        Encoding::F16 => Route::F16,
        Encoding::F32 => Route::F32,
        Encoding::Raw { dtype, .. } => {
            bail!(
                "tensor '{}' holds raw {dtype} data, which GGUF export does not carry",
                t.name
            )
        }
    })
}

/// GGUF metadata back from the bundle's JSON copy.
pub fn metadata_from_json(bytes: &[u8]) -> Result<Vec<(String, Value)>> {
    let v: serde_json::Value = serde_json::from_slice(bytes).context("gguf-metadata.json")?;
    let items = v.as_array().context("gguf-metadata.json is not a list")?;
    fn scalar(ty: &str, v: &serde_json::Value) -> Option<Value> {
        Some(match ty {
            "u8" => Value::U8(v.as_u64()? as u8),
            "i8" => Value::I8(v.as_i64()? as i8),
            "u16" => Value::U16(v.as_u64()? as u16),
            "i16" => Value::I16(v.as_i64()? as i16),
            "u32" => Value::U32(v.as_u64()? as u32),
            "i32" => Value::I32(v.as_i64()? as i32),
            "f32" => Value::F32(v.as_f64()? as f32),
            "bool" => Value::Bool(v.as_bool()?),
            "string" => Value::String(v.as_str()?.to_string()),
            "u64" => Value::U64(v.as_u64()?),
            "i64" => Value::I64(v.as_i64()?),
            "f64" => Value::F64(v.as_f64()?),
            _ => return None,
        })
    }
    const NAMES: [&str; 13] = [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ];
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let key = it["key"].as_str().context("metadata entry without a key")?;
        let ty = it["type"].as_str().unwrap_or("");
        let val = if ty == "array" {
            let ety = it["element_type"].as_u64().unwrap_or(u64::MAX) as u32;
            let ename = NAMES.get(ety as usize).copied().unwrap_or("?");
            let vals = it["value"]
                .as_array()
                .with_context(|| format!("metadata '{key}'"))?;
            let items = vals
                .iter()
                .map(|x| scalar(ename, x))
                .collect::<Option<Vec<_>>>()
                .and_then(|items| Array::from_values(ety, items))
                .with_context(|| format!("metadata array '{key}' of {ename} cannot be rebuilt"))?;
            Value::Array(items)
        } else {
            scalar(ty, &it["value"]).with_context(|| format!("metadata '{key}' ({ty})"))?
        };
        out.push((key.to_string(), val));
    }
    Ok(out)
}

/// GGUF name of a Hugging Face llama tensor (the inverse of [`crate::hf_gptq::hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    crate::hf_gptq::rename(hf, false)
}

/// llama.cpp's converter order for Q/K rows: GGUF row `h·hd + 2i + j` holds Hugging Face row
/// `h·hd + j·hd/2 + i` (so that RoPE pairs adjacent values).
pub fn permute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut src = vec![0; rows];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                src[h * hd + 2 * i + j] = h * hd + j * (hd / 2) + i;
            }
        }
    }
    src
}

/// Refuses Hugging Face bundles whose decoder the `llama` metadata written for them cannot
/// describe (head widths, q/k norms, Gemma's settings, RoPE factors, other architectures):
/// dropping those silently would give a file that runs and computes something else.
fn check_hf_exportable(meta: &serde_json::Value) -> Result<()> {
    if meta["family"] != "llama" {
        bail!(
            "GGUF export from safetensors covers Llama-family models; this bundle is {}",
            meta["family"]
        );
    }
    // The class name, or the model type where config.json names no class.
    let arch = meta["architecture"].as_str().unwrap_or("?");
    let extra = HF_UNEXPORTED.iter().find(|k| meta.get(**k).is_some());
    if !matches!(
        arch,
        "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral"
    ) || extra.is_some()
    {
        bail!(
            "GGUF export from a Hugging Face checkpoint covers plain Llama and Mistral layouts; \
             this bundle is {arch}{}. Convert the checkpoint with llama.cpp's \
             convert_hf_to_gguf.py and quantize that GGUF instead",
            extra.map_or(String::new(), |k| format!(" with {k}"))
        );
    }
    Ok(())
}

/// `model.meta` keys of decoder settings the Hugging Face → GGUF path does not write.
const HF_UNEXPORTED: &[&str] = &[
    "head_dim",
    "qk_norm",
    "gemma",
    "rope_factors",
    "rope_factors_long",
    "rope_attn_factor",
];

/// Most tokens a tokenizer.json may give ids to (the largest vocabularies in use are ~260k):
/// ids come from the file, and the table is allocated from the largest.
const MAX_VOCAB: u64 = 1 << 24;

/// The token strings of a tokenizer.json by id, with GGUF token types (1 normal, 3 control,
/// 4 user-defined, 5 unused for ids nothing names).
fn hf_vocab(tokenizer: &serde_json::Value) -> Result<(Vec<Value>, Vec<i32>)> {
    let vocab = tokenizer["model"]["vocab"]
        .as_object()
        .context("tokenizer.json has no vocab")?;
    let added: &[serde_json::Value] = tokenizer["added_tokens"]
        .as_array()
        .map_or(&[], Vec::as_slice);
    let n = vocab
        .values()
        .filter_map(|v| v.as_u64())
        .chain(added.iter().filter_map(|a| a["id"].as_u64()))
        .max()
        .map_or(0, |m| m.saturating_add(1));
    if n > MAX_VOCAB {
        bail!(
            "tokenizer.json gives a token id {}, past the {MAX_VOCAB} this export accepts",
            n - 1
        );
    }
    let n = n as usize;
    let mut tokens = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        if let Some(i) = id.as_u64() {
            tokens[i as usize] = Some(t.clone());
        }
    }
    for a in added {
        if let (Some(i), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            tokens[i as usize] = Some(c.to_string());
            types[i as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    Ok((tokens, types))
}

/// GGUF metadata for a Hugging Face llama checkpoint: architecture from `config.json`,
/// vocabulary, token types and merges from `tokenizer.json` (byte-level BPE), special ids and
/// chat template from `config.json` / `tokenizer_config.json`.
pub fn metadata_from_hf(
    name: &str,
    config: &serde_json::Value,
    tokenizer: &serde_json::Value,
    tok_config: Option<&serde_json::Value>,
) -> Result<Vec<(String, Value)>> {
    let u = |k: &str| -> Result<u32> {
        config[k]
            .as_u64()
            .map(|v| v as u32)
            .with_context(|| format!("config.json lacks {k}"))
    };
    let heads = u("num_attention_heads")?;
    let hidden = u("hidden_size")?;
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        bail!(
            "tokenizer.json model is {}; GGUF export handles byte-level BPE",
            model["type"]
        );
    }
    let (tokens, types) = hf_vocab(tokenizer)?;
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .context("tokenizer.json has no merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or(""),
                p[1].as_str().unwrap_or("")
            ))),
            _ => bail!("tokenizer.json has a merge that is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<_>>()?;
    // llama.cpp names the pre-tokenizer; the name is the one whose splits are this file's.
    let ignore_merges = tokenizer["model"]["ignore_merges"] == true;
    let pre =
        adaptq_model::tokenizer::llama_cpp_pre_name(&tokenizer["pre_tokenizer"], ignore_merges)
            .context(
                "tokenizer.json's pre-tokenizer splits text unlike every llama.cpp pre-tokenizer \
             adaptq knows, so there is no tokenizer.ggml.pre to write",
            )?;
    let s = |v: &str| Value::String(v.to_string());
    let mut md = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".into(), s(name)),
        (
            "llama.block_count".into(),
            Value::U32(u("num_hidden_layers")?),
        ),
        (
            "llama.context_length".into(),
            Value::U32(u("max_position_embeddings")?),
        ),
        ("llama.embedding_length".into(), Value::U32(hidden)),
        (
            "llama.feed_forward_length".into(),
            Value::U32(u("intermediate_size")?),
        ),
        ("llama.attention.head_count".into(), Value::U32(heads)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(u("num_key_value_heads").unwrap_or(heads)),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config["rope_theta"].as_f64().unwrap_or(10000.0) as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(tokens.len() as u32)),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(hidden / heads),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::from_values(8, tokens).context("tokens")?),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::from_values(8, merges).context("merges")?),
        ),
    ];
    for (k, key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(v) = config[k].as_u64() {
            md.push((key.into(), Value::U32(v as u32)));
        }
    }
    if let Some(tc) = tok_config {
        if let Some(b) = tc["add_bos_token"].as_bool() {
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
        if let Some(t) = tc["chat_template"].as_str() {
            md.push(("tokenizer.chat_template".into(), s(t)));
        }
    }
    Ok(md)
}

/// llama.cpp's `general.file_type` for a file mostly of `t`.
fn file_type(t: Option<BlockType>) -> u32 {
    match t {
        None => 1,
        Some(BlockType::Q4_0) => 2,
        Some(BlockType::Q4_1) => 3,
        Some(BlockType::Q8_0) => 7,
        Some(BlockType::Q5_0) => 8,
        Some(BlockType::Q5_1) => 9,
        Some(BlockType::Q2K) => 10,
        Some(BlockType::Q3K) => 11,
        Some(BlockType::Q4K) => 14,
        Some(BlockType::Q5K) => 16,
        Some(BlockType::Q6K) => 18,
        Some(BlockType::IQ4NL) => 25,
        Some(BlockType::IQ4XS) => 30,
    }
}

fn set(md: &mut Vec<(String, Value)>, key: &str, v: Value) {
    match md.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = v,
        None => md.push((key.to_string(), v)),
    }
}

/// Whether `path` is a GGUF file adaptq wrote (its `general.quantized_by` says so): the only
/// kind of file a forced export replaces.
pub fn is_adaptq_gguf(path: &Path) -> bool {
    adaptq_source::blob::MmapBlob::open(path)
        .and_then(|b| adaptq_source::gguf::read_header(&b))
        .is_ok_and(|h| h.metadata.get_str("general.quantized_by") == Some("adaptq"))
}

fn ours() -> OutKind<'static> {
    OutKind::File {
        is_ours: &is_adaptq_gguf,
    }
}

/// Writes `bundle` as a GGUF v3 file at `out` (via a temporary name, renamed when complete).
pub fn export_gguf(
    bundle: &Bundle,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportSummary> {
    let staged = crate::staged_for(bundle, out, opts.force, ours())?;
    // GGUF sources carry their metadata; Hugging Face llama checkpoints get it built from
    // config.json + tokenizer.json, their tensors renamed and Q/K rows permuted.
    let meta: serde_json::Value =
        serde_json::from_slice(&bundle.read_file(adaptq_bundle::MODEL_META)?)
            .context("model.meta")?;
    let (mut md, hf) = match bundle.read_file(GGUF_METADATA) {
        Ok(b) => (metadata_from_json(&b)?, None),
        Err(_) => {
            let json = |f: &str| -> Result<serde_json::Value> {
                let b = bundle.read_file(f).map_err(|_| {
                    anyhow::anyhow!(
                        "{}: no {f} in the bundle, so there is no tokenizer/architecture to put in a GGUF",
                        bundle.dir.display()
                    )
                })?;
                serde_json::from_slice(&b).with_context(|| f.to_string())
            };
            check_hf_exportable(&meta)?;
            let tc = json("tokenizer_config.json").ok();
            let md = metadata_from_hf(
                &bundle.manifest.model_id,
                &json("config.json")?,
                &json("tokenizer.json")?,
                tc.as_ref(),
            )?;
            let heads = (
                meta["n_heads"].as_u64().unwrap_or(1) as usize,
                meta["n_kv_heads"].as_u64().unwrap_or(1) as usize,
            );
            (md, Some(heads))
        }
    };
    let tensors = &bundle.manifest.tensors;
    let mut routes: Vec<Route> = tensors
        .iter()
        .map(|t| route(t, opts))
        .collect::<Result<_>>()?;
    let groups = stacks(tensors, &mut routes)?;
    // Name the file by what most of its parameters are stored as.
    let mut by_type: Vec<(BlockType, u64)> = Vec::new();
    for (t, r) in tensors.iter().zip(&routes) {
        if let Route::Copy(b) | Route::Relay(b) | Route::Reround(b, _) = r {
            match by_type.iter_mut().find(|(x, _)| x == b) {
                Some(e) => e.1 += t.numel() as u64,
                None => by_type.push((*b, t.numel() as u64)),
            }
        }
    }
    let main = by_type.iter().max_by_key(|(_, n)| *n).map(|(t, _)| *t);
    set(&mut md, "general.file_type", Value::U32(file_type(main)));
    set(&mut md, "general.quantization_version", Value::U32(2));
    set(
        &mut md,
        "general.quantized_by",
        Value::String("adaptq".into()),
    );
    let (names, plan) = plan_groups(&groups, tensors, &routes, hf.is_some())?;
    let tensor_bytes: u64 = plan.iter().map(|p| p.bytes).sum();

    let tmp = staged.path().to_path_buf();
    let result = (|| -> Result<Vec<ExportedTensor>> {
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = GgufWriter::new(BufWriter::new(f), &md, plan)?;
        let mut report = Vec::with_capacity(tensors.len());
        for (i, (g, name)) in groups.iter().zip(&names).enumerate() {
            let (t, r) = (&tensors[g.members[0]], &routes[g.members[0]]);
            let mut bytes = Vec::new();
            for &m in &g.members {
                let part = encode(bundle, &tensors[m], &routes[m])
                    .with_context(|| format!("tensor '{}'", tensors[m].name))?;
                bytes.extend_from_slice(&part);
            }
            let heads = hf.and_then(|(q, kv)| {
                if name.ends_with(".attn_q.weight") {
                    Some(q)
                } else if name.ends_with(".attn_k.weight") {
                    Some(kv)
                } else {
                    None
                }
            });
            if let Some(h) = heads {
                // Every GGUF type stores rows contiguously: permuting whole rows is exact.
                let rows = t.dims()[0];
                let rb = bytes.len() / rows;
                let src = permute_rows(rows, h);
                bytes = src
                    .iter()
                    .flat_map(|&r| bytes[r * rb..(r + 1) * rb].to_vec())
                    .collect();
            }
            w.write_tensor(name, &bytes)?;
            let rerounded = g.members.iter().map(|&m| &routes[m]).find_map(|r| match r {
                Route::Reround(_, why) => Some(why.clone()),
                _ => None,
            });
            report.push(ExportedTensor {
                name: name.clone(),
                ggml_type: r.name().to_string(),
                exact: rerounded.is_none(),
                note: rerounded,
            });
            progress(i + 1, groups.len());
        }
        let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(report)
    })();
    let report = result?;
    staged.commit(ours())?;
    let params: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
    Ok(ExportSummary {
        file_bytes: std::fs::metadata(out)?.len(),
        tensor_bytes,
        params,
        bits_per_weight: tensor_bytes as f64 * 8.0 / params.max(1) as f64,
        tensors: report,
    })
}

/// Each GGUF tensor's name (Hugging Face names renamed when `hf`) and its place in the file.
fn plan_groups(
    groups: &[Group],
    tensors: &[TensorEntry],
    routes: &[Route],
    hf: bool,
) -> Result<(Vec<String>, Vec<TensorPlan>)> {
    let names: Vec<String> = groups
        .iter()
        .map(|g| {
            let t = &tensors[g.members[0]];
            match (hf, &g.stacked) {
                (_, Some(name)) => Ok(name.clone()),
                (true, None) => gguf_name(&t.name)
                    .with_context(|| format!("tensor '{}' has no llama.cpp name", t.name)),
                (false, None) => Ok(t.name.clone()),
            }
        })
        .collect::<Result<_>>()?;
    let plan: Vec<TensorPlan> = groups
        .iter()
        .zip(&names)
        .map(|(g, n)| {
            let t = &tensors[g.members[0]];
            let mut shape = t.dims();
            if g.stacked.is_some() {
                shape.insert(0, g.members.len());
            }
            let r = &routes[g.members[0]];
            TensorPlan {
                name: n.clone(),
                shape,
                ggml_type: r.ggml_id(),
                bytes: g
                    .members
                    .iter()
                    .map(|&i| routes[i].bytes(tensors[i].numel()) as u64)
                    .sum(),
            }
        })
        .collect();
    Ok((names, plan))
}

/// One tensor of the GGUF file: a bundle tensor, or a mixture's experts stacked again.
struct Group {
    /// Bundle tensors, in the order their bytes follow each other.
    members: Vec<usize>,
    /// The stacked tensor's GGUF name (`blk.N.ffn_gate_exps.weight`).
    stacked: Option<String>,
}

/// The file's tensors in bundle order, each expert stack (the matrices a GGUF source's
/// stacked tensor was read as, [`adaptq_source::gguf::expert_name`]) joined again where its
/// expert 0 stood: llama.cpp reads a block's experts from one 3-D tensor of one type, so an
/// expert on another type than expert 0 (APQ may give experts different widths) is re-rounded
/// onto expert 0's type, and the report says so.
fn stacks(tensors: &[TensorEntry], routes: &mut [Route]) -> Result<Vec<Group>> {
    let expert = |name: &str| -> Option<(String, usize)> {
        let (stem, j) = name.strip_suffix(".weight")?.rsplit_once('.')?;
        let j: usize = j.parse().ok()?;
        let stacked = format!("{stem}.weight");
        adaptq_source::gguf::expert_stem(&stacked)?;
        Some((stacked, j))
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut at: std::collections::BTreeMap<String, usize> = Default::default();
    let mut indices: Vec<Vec<(usize, usize)>> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        match expert(&t.name) {
            Some((stacked, j)) => {
                let g = *at.entry(stacked.clone()).or_insert_with(|| {
                    groups.push(Group {
                        members: Vec::new(),
                        stacked: Some(stacked),
                    });
                    indices.push(Vec::new());
                    groups.len() - 1
                });
                indices[g].push((j, i));
            }
            None => {
                groups.push(Group {
                    members: vec![i],
                    stacked: None,
                });
                indices.push(Vec::new());
            }
        }
    }
    for (g, mut idx) in groups.iter_mut().zip(indices) {
        let Some(name) = &g.stacked else { continue };
        idx.sort_unstable();
        if idx.iter().enumerate().any(|(k, &(j, _))| k != j) {
            bail!("the experts of '{name}' are not numbered 0..{}", idx.len());
        }
        g.members = idx.into_iter().map(|(_, i)| i).collect();
        let first = &tensors[g.members[0]];
        let (ty, dims) = (routes[g.members[0]].ggml_id(), first.dims());
        for &m in &g.members[1..] {
            if tensors[m].dims() != dims {
                bail!(
                    "expert '{}' is {:?}, expert 0 of its stack is {dims:?}",
                    tensors[m].name,
                    tensors[m].dims()
                );
            }
            if routes[m].ggml_id() != ty {
                let why = format!(
                    "{} re-rounded onto {}: a stack of experts has one type",
                    tensors[m].encoding.label(),
                    routes[g.members[0]].name()
                );
                routes[m] = match &routes[g.members[0]] {
                    Route::Copy(b) | Route::Relay(b) | Route::Reround(b, _) => {
                        Route::Reround(*b, why)
                    }
                    Route::F16 => Route::F16,
                    Route::F32 => Route::F32,
                };
            }
        }
    }
    Ok(groups)
}

fn encode(bundle: &Bundle, t: &TensorEntry, r: &Route) -> Result<Vec<u8>> {
    let cols = t.cols();
    Ok(match r {
        Route::Copy(_) => bundle.payload(t)?,
        Route::Relay(_) => {
            let q = bundle.quantized(t)?;
            ggml::from_int(&q)
                .context("integer grid has no GGML twin")?
                .1
        }
        Route::Reround(ty, _) => {
            let x = bundle.read_f32(&t.name)?;
            ggml::quantize_rtn(*ty, &x, x.len() / cols, cols, None, false)?
        }
        Route::F16 => match t.encoding {
            Encoding::F16 => bundle.payload(t)?,
            _ => bundle
                .read_f32(&t.name)?
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        },
        Route::F32 => match t.encoding {
            Encoding::F32 => bundle.payload(t)?,
            _ => bundle
                .read_f32(&t.name)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokenizer_id_past_the_limit_is_refused_before_allocating() {
        let t = serde_json::json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1u64 << 40}}});
        let e = hf_vocab(&t).unwrap_err().to_string();
        assert!(e.contains("1099511627776"), "{e}");
        let t = serde_json::json!({"model": {"vocab": {"a": 0, "b": 2}},
            "added_tokens": [{"id": 1, "content": "<s>", "special": true}]});
        let (tokens, types) = hf_vocab(&t).unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(types, vec![1, 3, 1]);
    }

    /// Only what the `llama` metadata can describe leaves a Hugging Face bundle as GGUF.
    #[test]
    fn hf_bundles_the_llama_metadata_cannot_describe_are_refused() {
        let plain = serde_json::json!({"family": "llama", "architecture": "LlamaForCausalLM"});
        check_hf_exportable(&plain).unwrap();
        let mut qwen = plain.clone();
        qwen["architecture"] = "Qwen2ForCausalLM".into();
        let e = check_hf_exportable(&qwen).unwrap_err().to_string();
        assert!(
            e.contains("Qwen2ForCausalLM") && e.contains("convert_hf_to_gguf"),
            "{e}"
        );
        let mut llama3 = plain.clone();
        llama3["rope_factors"] = serde_json::json!([1.0, 8.0]);
        let e = check_hf_exportable(&llama3).unwrap_err().to_string();
        assert!(e.contains("with rope_factors"), "{e}");
    }
}

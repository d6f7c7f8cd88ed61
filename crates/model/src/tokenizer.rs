//! Tokenizers: from a `tokenizer.json`, or rebuilt from a GGUF file's own vocabulary, merges and
//! token types (GGUF models ship no tokenizer.json). The GGUF case is expressed as a Hugging Face
//! tokenizer definition and handed to the `tokenizers` crate, so BPE itself is not re-implemented.

use adaptq_source::gguf::Metadata;
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::path::Path;

/// Most bytes of a `tokenizer.json` read, as for any companion file (adaptq-remote's
/// `COMPANION_MAX`): the largest real ones are some 35 MB.
pub const TOKENIZER_MAX: u64 = 64 << 20;

/// Reads a local `tokenizer.json`: a regular file of at most [`TOKENIZER_MAX`] bytes, so a link
/// to `/dev/zero` or a FIFO in its place is an error, not an out-of-memory abort or a hang.
pub fn from_file(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = adaptq_source::blob::read_small(path, TOKENIZER_MAX)?;
    from_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses a `tokenizer.json`, dropping any padding/truncation it configures: adaptq feeds whole
/// sequences without attention masks, and pad tokens would be attended (MiniLM's file pads to
/// 128).
pub fn from_bytes(bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    let mut t =
        tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    t.with_padding(None);
    t.with_truncation(None)
        .map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    Ok(t)
}

/// The tokenizer fields of a GGUF file.
pub struct GgufVocab {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i64>,
}

impl GgufVocab {
    pub fn from_metadata(md: &Metadata) -> Result<Self> {
        let strs = |k: &str| -> Vec<String> {
            md.get_str_array(k)
                .map(|v| v.into_iter().map(str::to_string).collect())
                .unwrap_or_default()
        };
        Ok(GgufVocab {
            model: md.get_str("tokenizer.ggml.model").unwrap_or("").to_string(),
            pre: md
                .get_str("tokenizer.ggml.pre")
                .unwrap_or("default")
                .to_string(),
            tokens: strs("tokenizer.ggml.tokens"),
            merges: strs("tokenizer.ggml.merges"),
            token_types: md
                .get_i64_array("tokenizer.ggml.token_type")
                .unwrap_or_default(),
        })
    }

    /// From a bundle's `gguf-metadata.json` (list of {key, type, value}).
    pub fn from_metadata_json(v: &serde_json::Value) -> Result<Self> {
        let entries = v
            .as_array()
            .ok_or_else(|| anyhow!("gguf-metadata.json is not a list"))?;
        let get = |k: &str| entries.iter().find(|e| e["key"] == k).map(|e| &e["value"]);
        let strs = |k: &str| -> Vec<String> {
            get(k)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(GgufVocab {
            model: get("tokenizer.ggml.model")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .into(),
            pre: get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default")
                .into(),
            tokens: strs("tokenizer.ggml.tokens"),
            merges: strs("tokenizer.ggml.merges"),
            token_types: get("tokenizer.ggml.token_type")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
                .unwrap_or_default(),
        })
    }
}

/// GGUF token type for control tokens (`<|im_start|>` …), which become special added tokens.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Builds a byte-level BPE tokenizer (GGUF `gpt2` model) equivalent to the original
/// `tokenizer.json`. The pre-tokenizer follows `tokenizer.ggml.pre`, as llama.cpp does.
pub fn from_gguf(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    if v.model != "gpt2" {
        bail!(
            "GGUF tokenizer model '{}' is not supported yet (only byte-level BPE, 'gpt2'); \
             put the model's tokenizer.json next to it",
            v.model
        );
    }
    if v.tokens.is_empty() {
        bail!("GGUF file has no tokenizer.ggml.tokens");
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match v.pre.as_str() {
        // SmolLM and StarCoder split every digit on its own before the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level,
        other => bail!("GGUF pre-tokenizer '{other}' is not supported yet (supported: smollm, starcoder, gpt2)"),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = v
        .tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(v.token_types.get(*i), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": v.token_types[i] == CONTROL})
        })
        .collect();
    let def = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": v.merges},
    });
    let text = serde_json::to_string(&def)?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| anyhow!("building the tokenizer from GGUF vocabulary: {e}"))
}

/// Encodes text without adding special tokens (the llama.cpp perplexity convention when the
/// GGUF says `add_bos_token = false`).
pub fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

pub fn decode(tok: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false).map_err(|e| anyhow!("decoding: {e}"))
}

/// Encodes with the tokenizer's own special tokens (BERT's `[CLS] … [SEP]`).
pub fn encode_special(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, true)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

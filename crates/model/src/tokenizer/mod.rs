//! Tokenizers: from a `tokenizer.json`, or rebuilt from a GGUF file's own vocabulary (GGUF
//! models ship no tokenizer.json) so that the ids equal llama.cpp's for the same text.
//!
//! The GGUF case follows llama.cpp's src/llama-vocab.cpp: SentencePiece vocabularies
//! (`tokenizer.ggml.model = "llama"`, see `spm.rs`) and byte-level BPE ones (`"gpt2"`, with the
//! regex split that `tokenizer.ggml.pre` names, see `bpe.rs`). Both are expressed as a Hugging
//! Face tokenizer definition and handed to the `tokenizers` crate, which keeps the public type
//! (`tokenizers::Tokenizer`) every caller already holds. What llama.cpp does around the model
//! is reproduced here: the special tokens it cuts out of the text first (control, user-defined
//! and unknown tokens, as `llama-tokenize` does by default), the whitespace some of them
//! swallow, and BOS/EOS (added by [`encode_special`], as by llama.cpp's `add_special`).

mod bpe;
mod spm;
mod vocab;

pub use bpe::llama_cpp_pre_name;
pub use vocab::GgufVocab;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
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

/// A GGUF tokenizer kind (model or pre-tokenizer) whose llama.cpp rules are not reproduced
/// here; [`from_gguf_or_companion`] falls back to a `tokenizer.json` on this error only.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is not supported; put the model's tokenizer.json next to the GGUF file",
            self.0
        )
    }
}

impl std::error::Error for Unsupported {}

fn unsupported(what: String) -> anyhow::Error {
    Unsupported(what).into()
}

/// Builds the tokenizer llama.cpp would use for this GGUF vocabulary.
pub fn from_gguf(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    if v.tokens.is_empty() {
        bail!("GGUF file has no tokenizer.ggml.tokens");
    }
    let s = v.settings()?;
    let texts = texts(v);
    let ids = ids_by_text(&texts);
    let parts = match s.pre {
        None => spm::parts(&ids, &v.scores, s.space_prefix)?,
        Some(pre) => bpe::parts(&v.merges, &ids, pre),
    };
    let vocab: serde_json::Map<String, Value> = ids
        .iter()
        .map(|(t, &i)| (t.to_string(), json!(i)))
        .collect();
    let mut model = parts.model;
    model["vocab"] = Value::Object(vocab);
    let def = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(v, &texts, &ids),
        "normalizer": parts.normalizer,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": post_processor(&texts, &s),
        "decoder": parts.decoder,
        "model": model,
    });
    serde_json::from_value::<tokenizers::Tokenizer>(def)
        .map_err(|e| anyhow!("building the tokenizer from GGUF vocabulary: {e}"))
}

/// The GGUF vocabulary's tokenizer, or, when its kind is [`Unsupported`], the `tokenizer.json`
/// in `companion` (the folder of the GGUF file) if there is one.
pub fn from_gguf_or_companion(
    v: &GgufVocab,
    companion: Option<&Path>,
) -> Result<tokenizers::Tokenizer> {
    match from_gguf(v) {
        Err(e) if e.is::<Unsupported>() => {
            match companion
                .map(|d| d.join("tokenizer.json"))
                .filter(|p| p.exists())
            {
                Some(p) => from_file(&p),
                None => Err(e),
            }
        }
        r => r,
    }
}

/// The pieces of a Hugging Face definition that differ between SentencePiece and BPE.
struct Parts {
    model: Value,
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
}

/// Token texts as llama.cpp holds them: an empty one gets a placeholder.
fn texts(v: &GgufVocab) -> Vec<String> {
    let name = |(i, t): (usize, &String)| {
        if t.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            t.clone()
        }
    };
    v.tokens.iter().enumerate().map(name).collect()
}

/// Text to id; where texts repeat, the last id wins, as in llama.cpp's `token_to_id`.
fn ids_by_text(texts: &[String]) -> HashMap<&str, u32> {
    texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((t.as_str(), u32::try_from(i).ok()?)))
        .collect()
}

const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Texts llama.cpp makes control tokens whatever their GGUF type: the end-of-generation and
/// fill-in-the-middle markers it recognises by text (it marks only the first FIM candidate it
/// meets; every candidate is taken here), and gpt-oss's markers, which it makes user-defined.
const SPECIAL_BY_TEXT: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
    "<|channel|>",
    "<|message|>",
    "<|start|>",
    "<|constrain|>",
];

/// The tokens llama.cpp cuts out of the text before tokenizing it (`tokenizer_st_partition`
/// with `parse_special`, `llama-tokenize`'s default): control, user-defined and unknown ones.
/// Under a Phi-3 model name most of them also swallow the whitespace after them.
fn added_tokens(v: &GgufVocab, texts: &[String], ids: &HashMap<&str, u32>) -> Vec<Value> {
    // Gemma 4 and PLaMo say `</s>` is an ordinary token, and llama.cpp then treats it as one.
    let plain_eos = ["<|tool_response>", "<|plamo:eos|>"]
        .iter()
        .any(|t| ids.contains_key(t));
    let name = v.name.to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    let mut out = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let ty = v.token_types.get(i).copied();
        let by_type = matches!(ty, Some(UNKNOWN | CONTROL | USER_DEFINED));
        let wanted = if t == "</s>" && plain_eos {
            false
        } else {
            by_type || SPECIAL_BY_TEXT.contains(&t.as_str())
        };
        if !wanted || ids.get(t.as_str()).map(|&id| id as usize) != Some(i) {
            continue;
        }
        let rstrip = phi3 && !["<unk>", "<s>", "<|endoftext|>"].contains(&t.as_str());
        out.push(
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": rstrip, "normalized": false, "special": ty != Some(USER_DEFINED)}),
        );
    }
    out
}

/// BOS/EOS around the text when special tokens are asked for ([`encode_special`]).
fn post_processor(texts: &[String], s: &vocab::Settings) -> Value {
    let bos = s.bos.filter(|_| s.add_bos);
    let eos = s.eos.filter(|_| s.add_eos);
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |name: &str| json!({"SpecialToken": {"id": name, "type_id": 0}});
    let seq = |id: &str, ty: u32| json!({"Sequence": {"id": id, "type_id": ty}});
    let around = |inner: Vec<Value>| -> Vec<Value> {
        let first = bos.map(|_| special("bos"));
        let last = eos.map(|_| special("eos"));
        first.into_iter().chain(inner).chain(last).collect()
    };
    let tokens: serde_json::Map<String, Value> = [("bos", bos), ("eos", eos)]
        .into_iter()
        .filter_map(|(name, id)| {
            let id = id?;
            let text = &texts[id as usize];
            Some((
                name.to_string(),
                json!({"id": name, "ids": [id], "tokens": [text]}),
            ))
        })
        .collect();
    json!({"type": "TemplateProcessing", "single": around(vec![seq("A", 0)]),
        "pair": around(vec![seq("A", 0), seq("B", 1)]), "special_tokens": tokens})
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

/// Encodes with the tokenizer's own special tokens (BERT's `[CLS] … [SEP]`; for a GGUF
/// vocabulary the BOS/EOS llama.cpp adds with `add_special`).
pub fn encode_special(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, true)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, TinyLlama,
//! Phi-3, Gemma 3) as llama.cpp tokenizes them (`llm_tokenizer_spm_session`).
//!
//! llama.cpp does not rank merges. It starts from the characters of each text fragment (spaces
//! written as `▁`, one prepended when `add_space_prefix`), repeatedly joins the adjacent pair
//! whose concatenation is the vocabulary piece of highest score (the leftmost pair on a tie),
//! and writes characters no piece covers as `<0xNN>` byte tokens. That is rank-driven BPE
//! with byte fallback once every split of every piece into two pieces is a merge ranked by the
//! joined piece's score, so the `tokenizers` crate runs it and the public type stays
//! `tokenizers::Tokenizer` (a hand-written merger would have needed a new type at every call
//! site). What ranks cannot express is llama.cpp's positional tie-break between *different*
//! merges of equal score. Real vocabularies have such ties only inside runs of one repeated
//! piece (Llama's `▁▁`…`▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁` all score -1e9), where llama.cpp grows the leftmost
//! run symbol one piece at a time; ranking a tie's longer left part first does the same.

use super::{unsupported, Parts};
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::HashMap;

pub(super) fn parts(ids: &HashMap<&str, u32>, scores: &[f32], space_prefix: bool) -> Result<Parts> {
    // llama.cpp falls back to a raw one-byte piece where a `<0xNN>` token is missing; the
    // `tokenizers` crate would emit the unknown token instead, so such vocabularies are refused.
    if let Some(b) = (0..=255u8).find(|b| !ids.contains_key(format!("<0x{b:02X}>").as_str())) {
        return Err(unsupported(format!(
            "a SentencePiece vocabulary without the byte token <0x{b:02X}>"
        )));
    }
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mut normalizer = vec![replace(" ", "▁")];
    let mut decoder = vec![
        replace("▁", " "),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizer.insert(0, json!({"type": "Prepend", "prepend": "▁"}));
        decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(Parts {
        model: json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": true, "ignore_merges": false, "merges": merges(ids, scores)}),
        normalizer: json!({"type": "Sequence", "normalizers": normalizer}),
        pre_tokenizer: Value::Null,
        decoder: json!({"type": "Sequence", "decoders": decoder}),
    })
}

/// Every split of a piece into two pieces, best joined score first; ties put the longer left
/// part first, then the lower id, so the order is total and the same on every run.
fn merges(ids: &HashMap<&str, u32>, scores: &[f32]) -> Vec<[String; 2]> {
    let score = |id: u32| scores.get(id as usize).copied().unwrap_or(0.0);
    let mut all: Vec<(f32, usize, u32, &str, &str)> = Vec::new();
    for (text, &id) in ids {
        for (k, _) in text.char_indices().skip(1) {
            let (a, b) = text.split_at(k);
            if ids.contains_key(a) && ids.contains_key(b) {
                all.push((score(id), k, id, a, b));
            }
        }
    }
    all.sort_by(|x, y| y.0.total_cmp(&x.0).then(y.1.cmp(&x.1)).then(x.2.cmp(&y.2)));
    all.into_iter()
        .map(|(_, _, _, a, b)| [a.to_string(), b.to_string()])
        .collect()
}

//! Tokenizers and forward passes on the real fixture models.

use adaptq_model::tokenizer::{decode, encode, encode_special};
use adaptq_testutil::compare::{cosine, max_abs_diff};

fn smollm_tokenizer() -> tokenizers::Tokenizer {
    adaptq_model::open_weights(&adaptq_testutil::smollm2_gguf())
        .unwrap()
        .tokenizer()
        .unwrap()
}

#[test]
fn gguf_tokenizer_known_ids_and_round_trip() {
    let tok = smollm_tokenizer();
    // Control tokens from the GGUF token types are single special tokens.
    assert_eq!(encode(&tok, "<|im_start|>").unwrap(), vec![1]);
    assert_eq!(encode(&tok, "<|im_end|>").unwrap(), vec![2]);
    // Byte-level BPE: a leading space is part of the word's token.
    let ids = encode(&tok, "Hello world").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["Hello", "Ġworld"]);
    // The smollm pre-tokenizer splits every digit.
    let ids = encode(&tok, "in 1813").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["in", "Ġ", "1", "8", "1", "3"]);
    // Round trip on real text, newlines and punctuation included.
    let text = std::fs::read_to_string(adaptq_testutil::corpus("emma.txt")).unwrap();
    let sample: String = text.chars().take(20000).collect();
    let ids = encode(&tok, &sample).unwrap();
    assert!(ids.len() > 3000 && ids.len() < 8000, "{} tokens", ids.len());
    assert_eq!(decode(&tok, &ids).unwrap(), sample);
}

#[test]
fn minilm_matches_independent_numpy_reference() {
    let m = adaptq_model::load(&adaptq_testutil::minilm()).unwrap();
    let bert = m.bert().unwrap();
    let refs: serde_json::Value =
        serde_json::from_str(include_str!("data/minilm_reference.json")).unwrap();
    for r in refs.as_array().unwrap() {
        let s = r["sentence"].as_str().unwrap();
        let want_ids: Vec<u32> = numbers(&r["ids"], |v| v.as_u64().unwrap() as u32);
        let ids = encode_special(&m.tokenizer, s).unwrap();
        assert_eq!(ids, want_ids, "tokenization of '{s}'");
        let want: Vec<f32> = numbers(&r["embedding"], |v| v.as_f64().unwrap() as f32);
        let got = bert.embed(&ids).unwrap();
        let cos = cosine(&got, &want);
        assert!(cos >= 0.9999, "'{s}': cosine {cos}");
        let max = max_abs_diff(&got, &want);
        assert!(max < 1e-3, "'{s}': max abs difference {max}");
    }
}

/// The items of a JSON array, each converted by `f`.
fn numbers<T>(v: &serde_json::Value, f: impl Fn(&serde_json::Value) -> T) -> Vec<T> {
    v.as_array().unwrap().iter().map(f).collect()
}

//! Tokenizers and forward passes on the real fixture models.

use adaptq_model::tokenizer::{decode, encode, encode_special};

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
        let want_ids: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = encode_special(&m.tokenizer, s).unwrap();
        assert_eq!(ids, want_ids, "tokenization of '{s}'");
        let want: Vec<f32> = r["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = bert.embed(&ids).unwrap();
        let cos = adaptq_eval_cosine(&got, &want);
        assert!(cos >= 0.9999, "'{s}': cosine {cos}");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max < 1e-3, "'{s}': max abs difference {max}");
    }
}

fn adaptq_eval_cosine(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    d / (na * nb)
}

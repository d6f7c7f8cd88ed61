//! Hand-made safetensors files and the `config.json` beside them, for the readers' tests.

use std::path::Path;

/// A safetensors file: the u64 header length, the JSON header, then the data section.
pub fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

/// A file holding one U8 tensor `name` of one byte.
pub fn one_byte(name: &str) -> Vec<u8> {
    let h = format!(r#"{{"{name}":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#);
    file(&h, &[0])
}

/// The `config.json` of a one-layer llama of hidden size 4.
pub const LLAMA_CONFIG: &[u8] = br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"num_attention_heads":2,"num_hidden_layers":1,"hidden_size":4,"intermediate_size":8,"vocab_size":3,"num_key_value_heads":1}"#;

/// The `config.json` of the smallest bert.
pub const BERT_CONFIG: &[u8] = br#"{"model_type":"bert","num_attention_heads":1,"num_hidden_layers":1,"hidden_size":1,"intermediate_size":1,"vocab_size":1}"#;

/// The float trio (F32 `a` [2], F16 `b` [1, 2], BF16 `c` [2]): its header and data.
pub fn float_trio() -> (&'static str, Vec<u8>) {
    let mut data = Vec::new();
    for v in [1.0f32, -2.0] {
        data.extend(v.to_le_bytes());
    }
    for v in [0.5f32, 3.0] {
        data.extend(half::f16::from_f32(v).to_le_bytes());
    }
    for v in [-1.5f32, 8.0] {
        data.extend(half::bf16::from_f32(v).to_le_bytes());
    }
    let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"c":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]}}"#;
    (h, data)
}

/// Writes `bytes` as `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

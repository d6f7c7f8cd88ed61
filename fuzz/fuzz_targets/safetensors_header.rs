//! A safetensors file from a stranger: the header parser, then the whole source (tensor
//! table admitted against a fixed `config.json`) and the decode of every tensor.
#![no_main]

use adaptq_source::blob::MemBlob;
use adaptq_source::safetensors::{header_of, SafetensorsSource};
use adaptq_source::TensorSource;
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A folder holding a valid llama `config.json`, written once per process.
fn config_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("adaptq-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("config.json"),
            br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"num_attention_heads":2,"num_hidden_layers":1,"hidden_size":4,"intermediate_size":8,"vocab_size":3,"num_key_value_heads":1}"#,
        )
        .unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = header_of(data, Path::new("fuzz.safetensors"));
    let blob = MemBlob {
        label: "fuzz.safetensors".into(),
        bytes: data.to_vec(),
    };
    if let Ok(src) = SafetensorsSource::from_blobs(config_dir().to_path_buf(), vec![Box::new(blob)])
    {
        for t in src.tensors() {
            if let Ok(v) = src.read_f32(&t.name) {
                assert_eq!(v.len(), t.numel(), "'{}' decodes to its shape", t.name);
            }
            let _ = src.raw_bytes(&t.name);
        }
    }
});

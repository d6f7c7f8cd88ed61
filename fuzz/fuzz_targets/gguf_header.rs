//! A GGUF file from a stranger: the header parser, the whole source (tensor table against the
//! file, model description) and the decode of every tensor it admits.
#![no_main]

use adaptq_source::blob::MemBlob;
use adaptq_source::gguf::{parse_header, GgufSource};
use adaptq_source::TensorSource;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data, Path::new("fuzz.gguf"));
    let blob = MemBlob {
        label: "fuzz.gguf".into(),
        bytes: data.to_vec(),
    };
    if let Ok(src) = GgufSource::from_blob(Box::new(blob), None) {
        for t in src.tensors() {
            if let Ok(v) = src.read_f32(&t.name) {
                assert_eq!(v.len(), t.numel(), "'{}' decodes to its shape", t.name);
            }
            let _ = src.raw_bytes(&t.name);
        }
    }
});

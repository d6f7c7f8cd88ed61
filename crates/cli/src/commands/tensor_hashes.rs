//! `adaptq tensor-hashes`: SHA-256 of each tensor's decoded f32 values, so an independent
//! reader (gguf-py, transformers) can prove it decodes the same numbers.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::path::Path;

fn digest(v: &[f32]) -> serde_json::Value {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    hex::encode(Sha256::digest(bytes)).into()
}

pub fn run(path: &Path, hf: bool) -> Result<()> {
    let mut out = serde_json::Map::new();
    if hf {
        let b = adaptq_bundle::Bundle::open(path)?;
        adaptq_export::hf_gptq::for_each_hf_tensor(&b, &mut |name, v| {
            out.insert(name.into(), digest(v));
        })?;
    } else if path.join(adaptq_bundle::MANIFEST).exists() {
        let b = adaptq_bundle::Bundle::open(path)?;
        for t in &b.manifest.tensors {
            out.insert(t.name.clone(), digest(&b.read_f32(&t.name)?));
        }
    } else {
        let src = adaptq_source::open(path)?;
        for t in src.tensors().iter().filter(|t| t.dtype.is_float()) {
            out.insert(t.name.clone(), digest(&src.read_f32(&t.name)?));
        }
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

//! `adaptq info`: what a model file or a bundle holds, as JSON.

use anyhow::Result;
use std::path::Path;

pub fn run(path: &Path, tensors: bool) -> Result<()> {
    if path.join(adaptq_bundle::MANIFEST).exists() {
        return bundle(path, tensors);
    }
    let opened =
        adaptq_remote::open(&path.to_string_lossy()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut v = adaptq_source::info::describe_source(opened.source.as_ref());
    if !tensors {
        v.as_object_mut().expect("an object").remove("tensors");
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn bundle(dir: &Path, tensors: bool) -> Result<()> {
    let b = adaptq_bundle::Bundle::open(dir)?;
    let m = &b.manifest;
    let meta: serde_json::Value = serde_json::from_slice(&b.read_file(adaptq_bundle::MODEL_META)?)?;
    let mut v = serde_json::json!({
        "bundle": dir.display().to_string(),
        "model_id": m.model_id,
        "generator": m.generator,
        "source": m.source,
        "quantization": m.quantization,
        "model": meta,
        "tensor_count": m.tensors.len(),
        "shard_count": m.shards.len(),
        "global_digest": m.global_digest,
    });
    if tensors {
        v["tensors"] = m
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "shape": t.shape, "role": t.role, "encoding": t.encoding.label(), "bytes": t.payload_len()}))
            .collect();
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

//! Glue between hostile-input tests and the no_std loader, shared by the loader's mutation
//! test and the libFuzzer targets (`fuzz/src/lib.rs` includes this file by path, so it uses
//! only `adaptq_loader` and `serde_json`).
//!
//! A manifest's two digests would stop every damaged manifest at the first check; [`rehash`]
//! recomputes them as the writer does, so what is tested is everything checked after them.

use adaptq_loader::codebook::StageRef;
use adaptq_loader::{manifest_digest, shard_list_digest, Loader};
use serde_json::Value;

/// Replaces the string value after `key` (`"name": "`) in place; `None` without the key.
pub fn set_string(text: &str, key: &str, value: &str) -> Option<String> {
    let start = text.find(key)? + key.len();
    let end = start + text[start..].find('"')?;
    Some(format!("{}{value}{}", &text[..start], &text[end..]))
}

/// Re-hashes manifest text as the bundle writer does: the global digest over whatever shard
/// list it holds, then its own `manifest_digest`. Text without those fields is returned as is.
pub fn rehash(text: &str) -> String {
    let mut t = text.to_string();
    let v: Option<Value> = serde_json::from_str(text).ok();
    let list: Option<Vec<(&str, u64, &str, &str)>> = v
        .as_ref()
        .and_then(|v| v.get("shards")?.as_array())
        .and_then(|sh| {
            sh.iter()
                .map(|s| {
                    Some((
                        s.get("file")?.as_str()?,
                        s.get("bytes")?.as_u64()?,
                        s.get("sha256")?.as_str()?,
                        s.get("blake3")?.as_str()?,
                    ))
                })
                .collect()
        });
    if let Some(list) = list {
        let g = shard_list_digest(list);
        t = set_string(&t, "\"global_digest\": \"", &g).unwrap_or(t);
    }
    redigest(&t)
}

/// Recomputes only `manifest_digest` (the global digest is left as it is, so its check runs).
pub fn redigest(text: &str) -> String {
    match manifest_digest(text) {
        Some(d) => set_string(text, "\"manifest_digest\": \"", &d).unwrap_or_else(|| text.into()),
        None => text.into(),
    }
}

/// Reads every tensor a loader offers, packed and as f32. Contract: an f32 tensor has as many
/// values as its shape.
pub fn exercise(l: &Loader) {
    for name in l.tensor_names() {
        let shape = l.tensor_packed(name).ok().map(|p| p.shape);
        if let Ok(v) = l.tensor_f32(name) {
            let numel = shape.and_then(|s| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)));
            if let Some(n) = numel {
                assert_eq!(
                    v.len(),
                    n,
                    "invariant: '{name}' decodes to {} values, not its shape's {n}",
                    v.len()
                );
            }
        }
    }
}

/// One codebook stage as owned (bits, centroids, packed codes).
pub type Stage = (u8, Vec<f32>, Vec<u8>);

/// The stages as `codebook::decode` takes them.
pub fn stage_refs(stages: &[Stage]) -> Vec<StageRef<'_>> {
    stages
        .iter()
        .map(|(bits, centroids, codes)| StageRef {
            bits: *bits,
            centroids,
            codes,
        })
        .collect()
}

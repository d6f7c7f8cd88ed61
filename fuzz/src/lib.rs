//! Glue shared by the fuzz targets, so each target stays a few lines over one public entry
//! point and is easy to follow when that entry point changes.
//!
//! The manifest's two digests would stop every fuzzed manifest at the first check, so the
//! manifest and feed targets re-hash what the fuzzer wrote ([`rehash`], [`feed_input`]): a
//! hostile bundle author can always make the hashes match, and what must hold is everything
//! checked after them.

use serde_json::Value;

/// The re-hashing and tensor-reading glue this crate shares with the loader's mutation test.
#[path = "../../crates/testutil/src/loading.rs"]
mod loading;
pub use loading::{exercise, rehash, stage_refs, Stage};

/// Lowercase hex of SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(b))
}

/// Lowercase hex of BLAKE3.
pub fn blake3_hex(b: &[u8]) -> String {
    hex(blake3::hash(b).as_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A whole bundle as the feed target receives it.
pub struct FeedInput<'a> {
    /// Manifest text, re-hashed.
    pub manifest: String,
    /// (file name, bytes) per shard entry, in manifest order.
    pub shards: Vec<(String, Vec<u8>)>,
    /// The bytes after the shards, which choose piece sizes.
    pub plan: &'a [u8],
}

/// A feed input is `manifest JSON`, a NUL byte, then the shards' bytes back to back (each as
/// long as its manifest entry says, cut short where the input ends), then piece sizes. The
/// shard entries are rewritten to the bytes actually there, hashes included, and the manifest
/// re-hashed.
pub fn feed_input(data: &[u8]) -> Option<FeedInput<'_>> {
    let nul = data.iter().position(|&b| b == 0)?;
    let mut v: Value = serde_json::from_slice(&data[..nul]).ok()?;
    let mut rest = &data[nul + 1..];
    let mut shards = Vec::new();
    for s in v.get_mut("shards")?.as_array_mut()? {
        let want = s.get("bytes").and_then(Value::as_u64).unwrap_or(0);
        let n = (want.min(adaptq_loader::MAX_SHARD_BYTES) as usize).min(rest.len());
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        let file = s
            .get("file")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(o) = s.as_object_mut() {
            o.insert("bytes".into(), Value::from(n as u64));
            o.insert("sha256".into(), Value::from(sha256_hex(bytes)));
            o.insert("blake3".into(), Value::from(blake3_hex(bytes)));
        }
        shards.push((file, bytes.to_vec()));
    }
    let text = serde_json::to_string_pretty(&v).ok()? + "\n";
    Some(FeedInput {
        manifest: rehash(&text),
        shards,
        plan: rest,
    })
}


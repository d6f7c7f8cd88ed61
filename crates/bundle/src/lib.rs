//! adaptq's artifact bundle: payload shards of at most 2 MiB, each hashed with SHA-256 and
//! BLAKE3, plus `manifest.json` (the index), `model.meta` and `verification.json`.
//!
//! Layout of a bundle folder:
//! ```text
//! manifest.json        index of tensors and shards, quantization config, digests
//! model.meta           family, architecture, tokenizer, vocab, context, license
//! verification.json    per-layer weight error, sizes, bits per weight, gates
//! LICENSE              the source's license text, when known
//! shard-00000.bin …    tensor payloads, concatenated in manifest order
//! ```
//! Nothing time- or path-dependent enters any of these files, so the same input and config
//! give byte-identical bundles.

pub mod manifest;
pub mod reader;
pub mod verify;
pub mod writer;

pub use manifest::{Encoding, FileDigest, Manifest, Part, Segment, ShardInfo, TensorEntry};
pub use reader::Bundle;
pub use verify::{verify_bundle, VerifyReport};
pub use writer::{BundleWriter, WriterOptions};

/// Default and maximum shard size: 2 MiB.
pub const MAX_SHARD_BYTES: u64 = 2 * 1024 * 1024;
pub const SCHEMA_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MODEL_META: &str = "model.meta";
pub const VERIFICATION: &str = "verification.json";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("output folder {0} already exists (use --force to replace it)")]
    Exists(std::path::PathBuf),
}

pub type Result<T> = std::result::Result<T, BundleError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// The bundle's global digest: SHA-256 over the ordered list of shard names and hashes
/// (shared with the wasm loader, which must compute it identically).
pub fn global_digest(shards: &[ShardInfo]) -> String {
    adaptq_loader::shard_list_digest(shards.iter().map(|s| {
        (
            s.file.as_str(),
            s.bytes,
            s.sha256.as_str(),
            s.blake3.as_str(),
        )
    }))
}

pub use adaptq_loader::manifest_digest;

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
//!
//! The format itself (manifest schema, digests, layout check, GGML table) is `adaptq_loader`'s;
//! this crate adds the file system: writing, reading, verifying and replacing bundles.

pub mod codec;
pub mod manifest;
pub mod output;
pub mod reader;
pub mod report;
pub mod stats;
pub mod verification;
pub mod verify;
pub mod writer;

pub use manifest::{Encoding, FileDigest, Manifest, Part, Segment, ShardInfo, TensorEntry};
pub use reader::Bundle;
pub use verification::{Gate, GateStatus, Verification};
pub use verify::{verify_bundle, VerifyReport};
pub use writer::{BundleWriter, WriterOptions};

/// Default and maximum shard size: 2 MiB.
pub const MAX_SHARD_BYTES: u64 = adaptq_loader::MAX_SHARD_BYTES;
pub const SCHEMA_VERSION: u32 = adaptq_loader::layout::SCHEMA_VERSION;
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
    /// The output path is taken and replacing it was not asked for.
    #[error("{0} already exists; it is replaced only when forced")]
    Exists(std::path::PathBuf),
    /// Replacing was asked for, but what is there is not something adaptq wrote.
    #[error("{path} was not written by adaptq ({why}); refusing to replace it: choose another output path or move it away")]
    NotOurs {
        path: std::path::PathBuf,
        why: String,
    },
}

pub type Result<T> = std::result::Result<T, BundleError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes [`read_regular`] reserves before it reads: larger files grow the buffer as they
/// are read, so no size the file system reports (a sparse 8 TiB file) is ever allocated up
/// front.
const READ_RESERVE: u64 = 4 << 20;

/// Opens `path` for reading if it is a regular file of at most `max` bytes, and returns it with
/// its size. Links are followed (a bundle in the Hugging Face cache or git-annex is links to
/// blobs), but what they lead to must be a regular file: the open is non-blocking, so a FIFO
/// cannot hang it, and the opened file itself is checked, so a FIFO, /dev/zero or a folder is
/// refused before a byte is read.
pub(crate) fn open_regular(
    path: &std::path::Path,
    max: u64,
) -> std::io::Result<(std::fs::File, u64)> {
    use std::io::{Error, ErrorKind};
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "not a regular file (a FIFO, device or folder)",
        ));
    }
    if meta.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("holds {} bytes, more than the {max} it may", meta.len()),
        ));
    }
    Ok((f, meta.len()))
}

/// Reads `path` whole if it is a regular file of at most `max` bytes (see [`open_regular`]).
/// No more than `max + 1` bytes are ever read, so a file that grows while it is read is
/// refused too, and at most [`READ_RESERVE`] bytes are reserved before reading.
pub(crate) fn read_regular(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let (f, len) = open_regular(path, max)?;
    let mut buf = Vec::with_capacity(len.min(READ_RESERVE) as usize);
    f.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past {max} bytes while it was read"),
        ));
    }
    Ok(buf)
}

/// Size and SHA-256 of `path` if it is a regular file of at most `max` bytes, hashed as it is
/// read (never held whole); reading stops past `max`, so a growing file is refused too.
pub(crate) fn sha256_regular(path: &std::path::Path, max: u64) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    use std::io::{Error, ErrorKind, Read};
    let (f, _) = open_regular(path, max)?;
    let mut f = f.take(max.saturating_add(1));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        n += k as u64;
    }
    if n > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past {max} bytes while it was read"),
        ));
    }
    Ok((n, hex::encode(h.finalize())))
}

pub use adaptq_loader::{blake3_hex, global_digest, manifest_digest, sha256_hex};

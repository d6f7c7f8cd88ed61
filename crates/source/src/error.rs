//! The source readers' errors: each names the file (and the tensor, key or field) it is about,
//! so a user sees what to fix without a backtrace.

use crate::sanitize;
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading a model. Each variant names the file (and the tensor,
/// when one is at fault) so the user knows what to fix. Every field is shown through
/// [`sanitize`]: names and strings in these messages come from the file, and printing them raw
/// would let a model drive the user's terminal.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: no such file or folder", shown(.path))]
    NotFound { path: PathBuf },
    #[error("{}: {}", shown(.path), sanitize(&.source.to_string()))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: corrupt or truncated model file: {}", shown(.path), sanitize(.why))]
    Corrupt { path: PathBuf, why: String },
    #[error("{}: unrecognised model: {}", shown(.path), sanitize(.why))]
    Unrecognized { path: PathBuf, why: String },
    #[error("{}: tensor '{}' has unsupported dtype {} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS)", shown(.path), sanitize(.tensor), sanitize(.dtype))]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: unsupported architecture '{}' (supported: llama, mistral, qwen2, qwen3, smollm, gemma2, gemma3, phi3, bert)", shown(.path), sanitize(.arch))]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{}: no tensor named '{}'", shown(.path), sanitize(.tensor))]
    NoSuchTensor { path: PathBuf, tensor: String },
    #[error("{}: {}", shown(.path), sanitize(.why))]
    Config { path: PathBuf, why: String },
    /// The GGUF header runs past the prefix fetched so far; the reader fetches more and retries,
    /// so this never reaches a user.
    #[error("{}: header continues past the bytes read so far", shown(.path))]
    HeaderShort { path: PathBuf },
    /// Fetching bytes failed (network, remote server): the message says what to do.
    #[error("{}: {}", shown(.path), sanitize(.why))]
    Fetch { path: PathBuf, why: String },
}

/// A path as shown in a message: a file name can hold control characters too.
fn shown(p: &Path) -> String {
    sanitize(&p.display().to_string()).into_owned()
}

impl SourceError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        SourceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, why: impl Into<String>) -> Self {
        SourceError::Corrupt {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }
}

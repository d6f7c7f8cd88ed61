use std::path::{Path, PathBuf};

/// Everything that can go wrong reading a model. Each variant names the file (and the tensor,
/// when one is at fault) so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: no such file or folder")]
    NotFound { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt or truncated model file: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: unrecognised model: {why}")]
    Unrecognized { path: PathBuf, why: String },
    #[error("{path}: tensor '{tensor}' has unsupported dtype {dtype} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("unsupported architecture '{arch}' (supported: llama, mistral, qwen2, smollm, bert)")]
    UnsupportedArch { arch: String },
    #[error("{path}: no tensor named '{tensor}'")]
    NoSuchTensor { path: PathBuf, tensor: String },
    #[error("{path}: {why}")]
    Config { path: PathBuf, why: String },
    /// The GGUF header runs past the prefix fetched so far; the reader fetches more and retries,
    /// so this never reaches a user.
    #[error("{path}: header continues past the bytes read so far")]
    HeaderShort { path: PathBuf },
    /// Fetching bytes failed (network, remote server): the message says what to do.
    #[error("{path}: {why}")]
    Fetch { path: PathBuf, why: String },
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

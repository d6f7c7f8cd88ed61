//! Exports: files other tools run. GGUF v3 for llama.cpp, Ollama and LM Studio.

pub mod gguf;
pub mod writer;

pub use gguf::{export_gguf, ExportOptions, ExportSummary, ExportedTensor};
pub use writer::{GgufWriter, TensorPlan};

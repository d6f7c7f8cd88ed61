//! Exports: files other tools run. GGUF v3 for llama.cpp, Ollama and LM Studio; Hugging Face
//! GPTQ checkpoints for transformers and vLLM.

pub mod gguf;
pub mod hf_gptq;
pub mod safetensors;
pub mod writer;

pub use gguf::{export_gguf, ExportOptions, ExportSummary, ExportedTensor};
pub use hf_gptq::{export_hf_gptq, HfGptqOptions, HfGptqSummary};
pub use writer::{GgufWriter, TensorPlan};

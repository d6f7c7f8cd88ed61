//! Exports: files other tools run. GGUF v3 for llama.cpp, Ollama and LM Studio; Hugging Face
//! GPTQ checkpoints for transformers and vLLM.

pub mod gguf;
pub mod hf_gptq;
pub mod safetensors;
pub mod writer;

pub use gguf::{export_gguf, is_adaptq_gguf, ExportOptions, ExportSummary, ExportedTensor};
pub use hf_gptq::{export_hf_gptq, HfGptqOptions, HfGptqSummary};
pub use writer::{GgufWriter, TensorPlan};

/// Refuses bundles whose weights carry input rotations: the rotations are applied online by
/// adaptq's forward pass, which GGUF and GPTQ runtimes do not do.
pub fn refuse_rotated(bundle: &adaptq_bundle::Bundle) -> anyhow::Result<()> {
    if let Some(seed) = bundle.manifest.quantization["rotate"]["seed"].as_u64() {
        anyhow::bail!(
            "{}: the weights are rotated (--rotate, seed {seed}) and need adaptq's online \
             rotation; other runtimes would compute a different function. Quantize without \
             --rotate to export",
            bundle.dir.display()
        );
    }
    Ok(())
}

/// The staged output of an export of `bundle` to `out`: a rotated bundle is refused, and so is
/// an `out` taken by something adaptq did not write, both before any work.
pub(crate) fn staged_for(
    bundle: &adaptq_bundle::Bundle,
    out: &std::path::Path,
    force: bool,
    kind: adaptq_bundle::output::Kind,
) -> anyhow::Result<adaptq_bundle::output::Staged> {
    refuse_rotated(bundle)?;
    Ok(adaptq_bundle::output::Staged::new(out, force, kind)?)
}

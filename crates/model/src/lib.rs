//! Forward passes on CPU: the Llama family (Llama, Mistral, Qwen2, SmolLM, and Gemma 3 as a
//! variant of its block) and BERT encoders.
//!
//! Models run from an unquantized source or from an adaptq bundle, on one of two sets of
//! kernels ([`Kernels`]). `Exact` dequantizes every weight to f32 once, at load time, and
//! multiplies f32 matrices with candle's gemm: this measures exactly the function the stored
//! codes define, which is what perplexity and KL divergence must judge, at the cost of f32
//! memory. `Packed` keeps weights stored as GGML blocks in their blocks and runs them on
//! [`blockdot`]'s kernels (the other GGML types on candle's quantized matmuls; activations
//! rounded to 8 bits, as llama.cpp does), adaptq's other integer grids on [`intgrid`]'s
//! kernel, NOVAQ codebooks on [`lookup`]'s and f16 weights on [`halfmat`]'s: the runtime for
//! generation and speed.

pub mod bert;
pub mod blockdot;
mod dense;
mod elementwise;
pub mod gemma;
pub mod generate;
pub mod halfmat;
pub mod intgrid;
pub mod llama;
pub mod lookup;
mod team;
pub mod tokenizer;
mod weights;

pub use llama::Kernels;
pub use weights::{borrowed_source, from_source, open_weights, Stored, Weights};

use adaptq_source::model::{Family, ModelDesc};
use anyhow::{bail, Result};
use std::path::Path;

/// A model ready to run: weights, description and tokenizer.
pub struct LoadedModel {
    pub desc: ModelDesc,
    pub tokenizer: tokenizers::Tokenizer,
    pub kind: ModelKind,
    /// Where the model came from (for messages).
    pub label: String,
}

// A process holds one or two models: boxing to even out the variants' sizes buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum ModelKind {
    Llama(llama::Llama),
    Bert(bert::Bert),
}

impl LoadedModel {
    pub fn llama(&self) -> Result<&llama::Llama> {
        match &self.kind {
            ModelKind::Llama(m) => Ok(m),
            ModelKind::Bert(_) => bail!("{} is a BERT encoder, not a decoder LLM", self.label),
        }
    }
    pub fn bert(&self) -> Result<&bert::Bert> {
        match &self.kind {
            ModelKind::Bert(m) => Ok(m),
            ModelKind::Llama(_) => bail!("{} is a decoder LLM, not a BERT encoder", self.label),
        }
    }
}

/// Loads a model file/folder or an adaptq bundle, with its tokenizer.
/// Refuses a layer count the weights do not back (a header may claim 2^32 layers): the last
/// layer's first tensor must be there. Checked before anything is sized from the count.
pub(crate) fn check_layer_count(
    w: &dyn Weights,
    n_layers: usize,
    first_tensor: impl Fn(usize) -> String,
) -> Result<()> {
    if n_layers == 0 {
        bail!("the model declares no layers");
    }
    let last = first_tensor(n_layers - 1);
    if !w.has(&last) {
        bail!("the model declares {n_layers} layers, but has no tensor '{last}'");
    }
    Ok(())
}

pub fn load(path: &Path) -> Result<LoadedModel> {
    load_with(path, Kernels::Exact)
}

/// Loads a model file/folder or an adaptq bundle to run on the given kernels (BERT encoders
/// always run dequantized).
pub fn load_with(path: &Path, kernels: Kernels) -> Result<LoadedModel> {
    load_weights_with(open_weights(path)?, path.display().to_string(), kernels)
}

/// Loads a model from weights already opened (e.g. a remote source); `label` names it in messages.
pub fn load_weights(w: Box<dyn Weights + '_>, label: String) -> Result<LoadedModel> {
    load_weights_with(w, label, Kernels::Exact)
}

fn load_weights_with(
    w: Box<dyn Weights + '_>,
    label: String,
    kernels: Kernels,
) -> Result<LoadedModel> {
    let desc = w.desc().clone();
    let tokenizer = w.tokenizer()?;
    let kind = match desc.family {
        Family::Llama => ModelKind::Llama(llama::Llama::load_with(&desc, w.as_ref(), kernels)?),
        Family::Bert => ModelKind::Bert(bert::Bert::load(&desc, w.as_ref())?),
    };
    Ok(LoadedModel {
        desc,
        tokenizer,
        kind,
        label,
    })
}

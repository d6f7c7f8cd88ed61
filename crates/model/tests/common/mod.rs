//! Shared by the model crate's tests: model weights held in memory, as any test builds them.

use adaptq_model::Weights;
use adaptq_source::model::{Family, ModelDesc, RopeStyle};
use std::collections::BTreeMap;

/// A description of a small `family` model of `[n_layers, hidden, n_heads, n_kv_heads,
/// ffn_dim, vocab_size, context_length]`: RoPE base 10000, halves RoPE, untied, no name,
/// licence or tokenizer. Tests override the rest with struct-update syntax.
pub fn desc(family: Family, architecture: &str, sizes: [usize; 7]) -> ModelDesc {
    let [n_layers, hidden, n_heads, n_kv_heads, ffn_dim, vocab_size, context_length] = sizes;
    ModelDesc {
        family,
        architecture: architecture.into(),
        name: None,
        license: None,
        n_layers,
        hidden,
        n_heads,
        n_kv_heads,
        ffn_dim,
        vocab_size,
        context_length,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        rope_style: RopeStyle::Halves,
        tied_embeddings: false,
        tokenizer_id: "none".into(),
        decoder: Default::default(),
    }
}

/// Tensors by name as (shape, f32 values), with their model description.
pub struct Mem {
    pub desc: ModelDesc,
    pub t: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights for Mem {
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }
    fn has(&self, name: &str) -> bool {
        self.t.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.t.get(name).map(|x| x.0.clone())
    }
    fn read(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        Ok(self
            .t
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no {name}"))?
            .1
            .clone())
    }
    fn tokenizer(&self) -> anyhow::Result<tokenizers::Tokenizer> {
        anyhow::bail!("no tokenizer in a synthetic model")
    }
}

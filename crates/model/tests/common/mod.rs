//! Shared by the model crate's tests: model weights held in memory, as any test builds them.

use adaptq_model::Weights;
use adaptq_source::model::ModelDesc;
use std::collections::BTreeMap;

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

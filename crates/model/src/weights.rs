//! One view over "where weights come from": a source model or an adaptq bundle.

use adaptq_bundle::manifest::Encoding;
use adaptq_bundle::Bundle;
use adaptq_quant::ggml::BlockType;
use adaptq_quant::novaq::CodebookTensor;
use adaptq_quant::QuantizedTensor;
use adaptq_source::gguf::GgmlType;
use adaptq_source::model::ModelDesc;
use adaptq_source::{SrcDType, TensorSource};
use anyhow::{anyhow, Context, Result};
use half::f16;
use std::path::Path;

/// A tensor in a form the packed runtime multiplies without widening it to f32.
pub enum Stored {
    Blocks(BlockType, Vec<u8>),
    Int(QuantizedTensor),
    Codebook(CodebookTensor),
    F16(Vec<f16>),
}

/// Little-endian f16 bytes as values.
fn f16s(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

pub trait Weights {
    fn desc(&self) -> &ModelDesc;
    fn has(&self, name: &str) -> bool;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor decoded (dequantized) to f32.
    fn read(&self, name: &str) -> Result<Vec<f32>>;
    /// The tensor as stored, for kernels that run on stored codes: GGML blocks (an integer
    /// grid that re-lays onto a block type exactly, [`adaptq_quant::ggml::from_int`], comes
    /// as its blocks), another integer grid, NOVAQ codebooks, or f16 values. `None` for
    /// anything else.
    fn stored(&self, _name: &str) -> Result<Option<Stored>> {
        Ok(None)
    }
    fn tokenizer(&self) -> Result<tokenizers::Tokenizer>;
    /// Seed of the input rotations the stored weights carry (bundles made with `--rotate`).
    fn rotation_seed(&self) -> Option<u64> {
        None
    }
    /// The `[rows, cols]` of a matrix tensor; an error (not a panic) when it is absent or not
    /// 2-D, since shapes come from files.
    fn matrix(&self, name: &str) -> Result<(usize, usize)> {
        match self.shape(name).as_deref() {
            Some(&[r, c]) => Ok((r, c)),
            Some(s) => anyhow::bail!("tensor '{name}' has shape {s:?}, expected a matrix"),
            None => anyhow::bail!("model lacks tensor '{name}'"),
        }
    }
}

/// An opened source, owned (`Box`) or borrowed (`&dyn TensorSource`).
struct SourceWeights<S>(S);

/// Either way of holding a source.
trait HoldsSource {
    fn get(&self) -> &dyn TensorSource;
}
impl HoldsSource for Box<dyn TensorSource> {
    fn get(&self) -> &dyn TensorSource {
        self.as_ref()
    }
}
impl HoldsSource for &dyn TensorSource {
    fn get(&self) -> &dyn TensorSource {
        *self
    }
}

impl<S: HoldsSource> Weights for SourceWeights<S> {
    fn desc(&self) -> &ModelDesc {
        self.0.get().desc()
    }
    fn has(&self, name: &str) -> bool {
        self.0.get().info(name).is_some()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get().info(name).map(|t| t.shape.clone())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.0.get().read_f32(name)?)
    }
    fn stored(&self, name: &str) -> Result<Option<Stored>> {
        let src = self.0.get();
        Ok(match src.info(name).map(|t| t.dtype) {
            Some(SrcDType::Ggml(GgmlType::Block(b))) => {
                Some(Stored::Blocks(b, src.raw_bytes(name)?.into_owned()))
            }
            Some(SrcDType::F16) => Some(Stored::F16(f16s(&src.raw_bytes(name)?))),
            _ => None,
        })
    }
    fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        if let Some(md) = self.0.get().gguf_metadata() {
            // A vocabulary type adaptq cannot rebuild falls back to a tokenizer.json beside it.
            return crate::tokenizer::from_gguf_or_companion(
                &crate::tokenizer::GgufVocab::from_metadata(md)?,
                self.0.get().companion_dir(),
            );
        }
        let dir = self
            .0
            .get()
            .companion_dir()
            .ok_or_else(|| anyhow!("no folder to look for tokenizer.json in"))?;
        crate::tokenizer::from_file(&dir.join("tokenizer.json"))
    }
}

struct BundleWeights {
    bundle: Bundle,
    desc: ModelDesc,
}

impl Weights for BundleWeights {
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }
    fn rotation_seed(&self) -> Option<u64> {
        self.bundle.manifest.quantization["rotate"]["seed"].as_u64()
    }
    fn has(&self, name: &str) -> bool {
        self.bundle.entry(name).is_some()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.bundle.entry(name).map(|t| t.dims())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.bundle.read_f32(name)?)
    }
    fn stored(&self, name: &str) -> Result<Option<Stored>> {
        let Some(t) = self.bundle.entry(name) else {
            return Ok(None);
        };
        Ok(match &t.encoding {
            Encoding::Ggml { ggml_type } => {
                Some(Stored::Blocks(*ggml_type, self.bundle.payload(t)?))
            }
            Encoding::Int { .. } => {
                let q = self.bundle.quantized(t)?;
                Some(match adaptq_quant::ggml::from_int(&q) {
                    Some((ty, bytes)) => Stored::Blocks(ty, bytes),
                    None => Stored::Int(q),
                })
            }
            Encoding::F16 => Some(Stored::F16(f16s(&self.bundle.payload(t)?))),
            Encoding::Codebook { .. } => Some(Stored::Codebook(self.bundle.codebook(t)?)),
            _ => None,
        })
    }
    fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        if let Ok(bytes) = self.bundle.read_file("tokenizer.json") {
            return crate::tokenizer::from_bytes(&bytes)
                .with_context(|| format!("{}: tokenizer.json", self.bundle.dir.display()));
        }
        let md = self
            .bundle
            .read_file("gguf-metadata.json")
            .with_context(|| {
                format!(
                    "{}: bundle has neither tokenizer.json nor gguf-metadata.json",
                    self.bundle.dir.display()
                )
            })?;
        let v: serde_json::Value = serde_json::from_slice(&md)?;
        crate::tokenizer::from_gguf(&crate::tokenizer::GgufVocab::from_metadata_json(&v)?)
    }
}

/// Opens a model file/folder or an adaptq bundle (a folder with `manifest.json`).
pub fn open_weights(path: &Path) -> Result<Box<dyn Weights>> {
    if path.join(adaptq_bundle::MANIFEST).is_file() {
        let bundle = Bundle::open(path)?;
        let meta: serde_json::Value =
            serde_json::from_slice(&bundle.read_file(adaptq_bundle::MODEL_META)?)
                .with_context(|| format!("{}: model.meta is not JSON", path.display()))?;
        let desc = ModelDesc::from_meta_json(
            &meta,
            bundle.manifest.tensors.len(),
            &path.join(adaptq_bundle::MODEL_META),
        )?;
        return Ok(Box::new(BundleWeights { bundle, desc }));
    }
    Ok(from_source(adaptq_source::open(path)?))
}

/// Weights read from an already opened source (a remote one, say).
pub fn from_source(src: Box<dyn TensorSource>) -> Box<dyn Weights> {
    Box::new(SourceWeights(src))
}

/// Weights read from a source the caller keeps (it quantizes from the same source after).
pub fn borrowed_source<'a>(src: &'a dyn TensorSource) -> Box<dyn Weights + 'a> {
    Box::new(SourceWeights(src))
}

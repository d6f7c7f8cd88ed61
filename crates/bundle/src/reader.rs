//! Reading tensors back out of a bundle (for eval, export and tests).

use crate::manifest::Manifest;
use crate::{io_err, BundleError, Encoding, Result, TensorEntry, MANIFEST};
use adaptq_quant::novaq::{CodebookTensor, Stage};
use adaptq_quant::QuantizedTensor;
use half::f16;
use std::path::{Path, PathBuf};

fn f16s(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Opens a bundle's manifest. Run [`crate::verify_bundle`] first to trust its contents.
    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            BundleError::Invalid(format!("{}: not a valid manifest: {e}", p.display()))
        })?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.manifest.tensors.iter().find(|t| t.name == name)
    }

    /// A side file's bytes (model.meta, verification.json, LICENSE).
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let p = self.dir.join(name);
        std::fs::read(&p).map_err(io_err(&p))
    }

    /// The payload of a tensor (its parts concatenated, losslessly coded parts decoded).
    pub fn payload(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        let stored = self.stored_payload(t)?;
        if t.parts.iter().all(|p| p.lossless.is_none()) {
            return Ok(stored);
        }
        let mut out = Vec::with_capacity(t.parts.iter().map(|p| p.raw_length() as usize).sum());
        let mut pos = 0usize;
        for p in &t.parts {
            let end = (pos + p.length as usize).min(stored.len());
            let bytes = &stored[pos..end];
            pos = end;
            match &p.lossless {
                None => out.extend_from_slice(bytes),
                Some(l) => out.extend(
                    adaptq_loader::rans::decode(bytes, l.raw_length as usize).ok_or_else(|| {
                        BundleError::Invalid(format!(
                            "tensor '{}': part '{}' does not decode ({} stream)",
                            t.name, p.name, l.scheme
                        ))
                    })?,
                ),
            }
        }
        Ok(out)
    }

    /// The bytes a tensor occupies in its shards, as stored.
    pub fn stored_payload(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut out = Vec::with_capacity(t.payload_len() as usize);
        for s in &t.segments {
            let sh = self.manifest.shards.get(s.shard).ok_or_else(|| {
                BundleError::Invalid(format!(
                    "tensor '{}' names missing shard #{}",
                    t.name, s.shard
                ))
            })?;
            let p = self.dir.join(&sh.file);
            let mut f = std::fs::File::open(&p).map_err(io_err(&p))?;
            f.seek(SeekFrom::Start(s.offset)).map_err(io_err(&p))?;
            let start = out.len();
            out.resize(start + s.length as usize, 0);
            f.read_exact(&mut out[start..]).map_err(io_err(&p))?;
        }
        Ok(out)
    }

    /// Splits a (decoded) payload into its named parts.
    pub fn parts<'t, 'p>(t: &'t TensorEntry, payload: &'p [u8]) -> Vec<(&'t str, &'p [u8])> {
        let mut out = Vec::new();
        let mut pos = 0usize;
        for p in &t.parts {
            let end = (pos + p.raw_length() as usize).min(payload.len());
            out.push((p.name.as_str(), &payload[pos..end]));
            pos = end;
        }
        out
    }

    /// The quantized form of an integer-grid tensor.
    pub fn quantized(&self, t: &TensorEntry) -> Result<QuantizedTensor> {
        let Encoding::Int {
            bits,
            group_size,
            grid,
        } = t.encoding
        else {
            return Err(BundleError::Invalid(format!(
                "tensor '{}' is not integer-quantized",
                t.name
            )));
        };
        let payload = self.payload(t)?;
        let parts = Self::parts(t, &payload);
        let get = |n: &str| {
            parts
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, b)| *b)
                .unwrap_or(&[])
        };
        let cols = *t.shape.last().unwrap_or(&1);
        Ok(QuantizedTensor {
            rows: t.numel() / cols.max(1),
            cols,
            bits,
            group_size,
            grid,
            codes: get("codes").to_vec(),
            scales: f16s(get("scales")),
            mins: f16s(get("mins")),
        })
    }

    /// The stored form of a NOVAQ tensor.
    pub fn codebook(&self, t: &TensorEntry) -> Result<CodebookTensor> {
        let Encoding::Codebook { dim, stage_bits } = &t.encoding else {
            return Err(BundleError::Invalid(format!(
                "tensor '{}' is not NOVAQ-coded",
                t.name
            )));
        };
        if *dim == 0
            || !(1..=4).contains(&stage_bits.len())
            || stage_bits.iter().any(|b| !(1..=16).contains(b))
        {
            return Err(BundleError::Invalid(format!(
                "tensor '{}': codebook layout dim {dim}, stage widths {stage_bits:?} is not valid",
                t.name
            )));
        }
        let payload = self.payload(t)?;
        let parts = Self::parts(t, &payload);
        let get = |n: &str| {
            parts
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, b)| *b)
                .ok_or_else(|| {
                    BundleError::Invalid(format!("tensor '{}' lacks its part '{n}'", t.name))
                })
        };
        let cols = *t.shape.last().unwrap_or(&1);
        let stages = stage_bits
            .iter()
            .enumerate()
            .map(|(s, &bits)| {
                Ok(Stage {
                    bits,
                    centroids: f16s(get(&format!("codebook{s}"))?),
                    codes: get(&format!("codes{s}"))?.to_vec(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CodebookTensor {
            rows: t.numel() / cols.max(1),
            cols,
            dim: *dim,
            stages,
            row_scale: f16s(get("row_scale")?),
            row_mean: f16s(get("row_mean")?),
            col_scale: f16s(get("col_scale")?),
        })
    }

    /// Decodes any float tensor to f32 (dequantizing integer grids).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .entry(name)
            .ok_or_else(|| BundleError::Invalid(format!("bundle has no tensor '{name}'")))?;
        match &t.encoding {
            Encoding::Int { .. } => Ok(self.quantized(t)?.dequantize()),
            Encoding::Ggml { ggml_type } => {
                adaptq_quant::ggml::dequantize(*ggml_type, &self.payload(t)?, t.numel())
                    .map_err(|e| BundleError::Invalid(format!("tensor '{name}': {e}")))
            }
            Encoding::Codebook { .. } => {
                let c = self.codebook(t)?;
                c.try_dequantize().ok_or_else(|| {
                    BundleError::Invalid(format!("tensor '{name}': codebook parts do not fit"))
                })
            }
            Encoding::F16 => Ok(self
                .payload(t)?
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Encoding::F32 => Ok(self
                .payload(t)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Encoding::Raw { dtype, .. } => Err(BundleError::Invalid(format!(
                "tensor '{name}' holds raw {dtype} data, not floats"
            ))),
        }
    }
}

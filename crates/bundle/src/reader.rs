//! Reading tensors back out of a bundle (for eval, export and tests).

use crate::manifest::Manifest;
use crate::{io_err, BundleError, Encoding, Result, TensorEntry, MANIFEST};
use adaptq_quant::novaq::{CodebookTensor, Stage};
use adaptq_quant::QuantizedTensor;
use half::f16;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn f16s(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The bytes of part `name` among `parts`.
fn part<'p>(parts: &[(&str, &'p [u8])], name: &str) -> Option<&'p [u8]> {
    parts.iter().find(|(k, _)| *k == name).map(|(_, b)| *b)
}

/// A bundle opened for reading. Opening runs the same manifest check as `verify` (digests and
/// layout); every shard and side file is checked against its recorded size and hashes when it
/// is read, so no bytes that `verify` would refuse are ever used.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Tensor name -> index in `manifest.tensors`, built once at open (names are unique: the
    /// layout check refuses duplicates), so a lookup is O(log n) however many tensors there are.
    index: BTreeMap<String, usize>,
    /// The shard read last, verified: consecutive tensors mostly share one.
    last_shard: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
}

impl Bundle {
    /// Opens a bundle: reads `manifest.json` (a regular file, bounded) and refuses it unless
    /// it passes [`adaptq_loader::check_manifest`].
    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let bytes = crate::read_regular(&p, adaptq_loader::layout::MAX_MANIFEST_BYTES as u64)
            .map_err(io_err(&p))?;
        let (manifest, index) = adaptq_loader::check_manifest(&bytes)
            .map_err(|e| BundleError::Invalid(format!("{}: {e}", p.display())))?
            .into_parts();
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            index,
            last_shard: Mutex::new(None),
        })
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        let i = *self.index.get(name)?;
        match self.manifest.tensors.get(i) {
            Some(t) if t.name == name => Some(t),
            // `manifest` is public: should a caller have reordered its tensor list, search it.
            _ => self.manifest.tensors.iter().find(|t| t.name == name),
        }
    }

    /// A side file's bytes (model.meta, verification.json, LICENSE): only a file the manifest
    /// lists, read as a regular file and checked against its recorded size and SHA-256.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let f = self
            .manifest
            .files
            .iter()
            .find(|f| f.file == name)
            .ok_or_else(|| {
                BundleError::Invalid(format!(
                    "{}: the bundle lists no file {name:?}",
                    self.dir.display()
                ))
            })?;
        let p = self.dir.join(&f.file);
        let data = crate::read_regular(&p, f.bytes).map_err(io_err(&p))?;
        if data.len() as u64 != f.bytes || crate::sha256_hex(&data) != f.sha256 {
            return Err(BundleError::Invalid(format!(
                "{}: does not match its recorded size and SHA-256 (run adaptq verify)",
                p.display()
            )));
        }
        Ok(data)
    }

    /// Shard `i`'s bytes, read whole and checked against its recorded size, SHA-256 and BLAKE3.
    fn shard(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        let cached = |c: &Option<(usize, Arc<Vec<u8>>)>| {
            c.as_ref().filter(|(j, _)| *j == i).map(|(_, d)| d.clone())
        };
        if let Some(d) = cached(&self.last_shard.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(d);
        }
        let sh = self
            .manifest
            .shards
            .get(i)
            .ok_or_else(|| BundleError::Invalid(format!("the bundle has no shard #{i}")))?;
        let p = self.dir.join(&sh.file);
        let data = crate::read_regular(&p, sh.bytes).map_err(io_err(&p))?;
        if data.len() as u64 != sh.bytes
            || crate::sha256_hex(&data) != sh.sha256
            || crate::blake3_hex(&data) != sh.blake3
        {
            return Err(BundleError::Invalid(format!(
                "{}: does not match its recorded size, SHA-256 and BLAKE3 (corrupt; run adaptq \
                 verify)",
                p.display()
            )));
        }
        let data = Arc::new(data);
        *self.last_shard.lock().unwrap_or_else(|e| e.into_inner()) = Some((i, data.clone()));
        Ok(data)
    }

    /// The payload of a tensor (its parts concatenated, losslessly coded parts decoded).
    pub fn payload(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        let stored = self.stored_payload(t)?;
        if t.parts.iter().all(|p| p.lossless.is_none()) {
            return Ok(stored);
        }
        let mut out = Vec::with_capacity(stored.len());
        let mut pos = 0usize;
        for p in &t.parts {
            let len = usize::try_from(p.length).unwrap_or(usize::MAX);
            let end = pos.saturating_add(len).min(stored.len());
            let bytes = &stored[pos..end];
            pos = end;
            match &p.lossless {
                None => out.extend_from_slice(bytes),
                Some(l) => out.extend(
                    adaptq_loader::rans::decode(
                        bytes,
                        usize::try_from(l.raw_length).unwrap_or(usize::MAX),
                    )
                    .ok_or_else(|| {
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

    /// The bytes a tensor occupies in its shards, as stored, from verified shards.
    pub fn stored_payload(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        // Never more than the segments can hold, whatever entry the caller passes.
        let most = (t.segments.len() as u64).saturating_mul(crate::MAX_SHARD_BYTES);
        let mut out = Vec::with_capacity(t.payload_len().min(most) as usize);
        for s in &t.segments {
            let data = self.shard(s.shard)?;
            let bytes = usize::try_from(s.offset)
                .ok()
                .zip(usize::try_from(s.length).ok())
                .and_then(|(o, l)| data.get(o..o.checked_add(l)?))
                .ok_or_else(|| {
                    BundleError::Invalid(format!(
                        "tensor '{}' points outside shard #{}",
                        t.name, s.shard
                    ))
                })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Splits a (decoded) payload into its named parts.
    pub fn parts<'t, 'p>(t: &'t TensorEntry, payload: &'p [u8]) -> Vec<(&'t str, &'p [u8])> {
        let mut out = Vec::new();
        let mut pos = 0usize;
        for p in &t.parts {
            let len = usize::try_from(p.raw_length()).unwrap_or(usize::MAX);
            let end = pos.saturating_add(len).min(payload.len());
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
        let get = |n: &str| part(&parts, n).unwrap_or(&[]);
        let cols = t.cols();
        Ok(QuantizedTensor {
            rows: t.numel() / cols.max(1),
            cols,
            bits,
            // 0 (and anything past the row) means one group per row, which the quantizers
            // record as `cols`.
            group_size: if group_size == 0 || group_size >= cols {
                cols
            } else {
                group_size
            },
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
        if !adaptq_loader::codebook::valid_layout(*dim, stage_bits) {
            return Err(BundleError::Invalid(format!(
                "tensor '{}': codebook layout dim {dim}, stage widths {stage_bits:?} is not valid",
                t.name
            )));
        }
        let payload = self.payload(t)?;
        let parts = Self::parts(t, &payload);
        let get = |n: &str| {
            part(&parts, n).ok_or_else(|| {
                BundleError::Invalid(format!("tensor '{}' lacks its part '{n}'", t.name))
            })
        };
        let cols = t.cols();
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

//! Streaming bundle writer. Everything goes into a staging folder next to the target and is
//! swapped into place ([`crate::output`]) only after the manifest is written, so an interrupted
//! run (crash, disk full) never leaves a half-written folder at the target path, let alone one
//! that `verify` accepts.

use crate::manifest::{
    shard_name, FileDigest, Generator, Manifest, Part, Segment, ShardInfo, SourceRef,
};
use crate::output::{Kind, Staged};
use crate::{
    io_err, BundleError, Encoding, Result, TensorEntry, MANIFEST, MAX_SHARD_BYTES, SCHEMA_VERSION,
};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub shard_max_bytes: u64,
    /// Replace an existing output folder.
    pub force: bool,
    /// Entropy-code code parts with rANS where that makes them smaller (decoded on load).
    pub lossless: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            shard_max_bytes: MAX_SHARD_BYTES,
            force: false,
            lossless: false,
        }
    }
}

pub struct BundleWriter {
    /// The staging folder; removed on drop unless the bundle was committed.
    staged: Staged,
    tmp: PathBuf,
    opts: WriterOptions,
    buf: Vec<u8>,
    shards: Vec<ShardInfo>,
    tensors: Vec<TensorEntry>,
    files: Vec<FileDigest>,
}

impl BundleWriter {
    pub fn create(target: &Path, opts: WriterOptions) -> Result<Self> {
        if opts.shard_max_bytes == 0 || opts.shard_max_bytes > MAX_SHARD_BYTES {
            return Err(BundleError::Invalid(format!(
                "shard size must be between 1 and {MAX_SHARD_BYTES} bytes, got {}",
                opts.shard_max_bytes
            )));
        }
        let staged = Staged::new(target, opts.force, Kind::Folder)?;
        Ok(BundleWriter {
            tmp: staged.path().to_path_buf(),
            staged,
            opts,
            buf: Vec::new(),
            shards: Vec::new(),
            tensors: Vec::new(),
            files: Vec::new(),
        })
    }

    /// Appends a tensor whose payload is `parts` concatenated. Checks the part lengths against
    /// what the encoding requires, so a writer bug cannot produce an inconsistent index.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        role: &str,
        method: &str,
        encoding: Encoding,
        parts: &[(&str, &[u8])],
    ) -> Result<()> {
        let shape = crate::manifest::shape_u64(shape);
        // Empty when the encoding's parameters are out of range or a size overflows, so no
        // parts match.
        let expected = adaptq_loader::expected_parts(&encoding, &shape).unwrap_or_default();
        let got: Vec<(&str, u64)> = parts.iter().map(|(n, b)| (*n, b.len() as u64)).collect();
        if expected != got {
            return Err(BundleError::Invalid(format!(
                "tensor '{name}': parts {got:?} do not match {} (expected {expected:?})",
                encoding.label()
            )));
        }
        // The lossless stage: code parts entropy-coded where that saves bytes.
        let mut coded: Vec<Option<Vec<u8>>> = parts
            .iter()
            .map(|(n, b)| {
                let (bits, count) = encoding
                    .code_symbols(n, &shape)
                    .filter(|_| self.opts.lossless)?;
                let count = usize::try_from(count).ok()?;
                adaptq_loader::rans::encode(b, bits, count).filter(|c| c.len() < b.len())
            })
            .collect();
        // ... but never so well that the tensor breaks a layout rule every reader checks: at
        // most MAX_VALUES_PER_BYTE values a stored byte (a nearly constant NOVAQ layer codes
        // below that). Coded parts are stored raw again, first to last, until the tensor fits;
        // tensors that fit coded are untouched, so their bundles stay byte-identical.
        let numel = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        let stored_len = |coded: &[Option<Vec<u8>>]| {
            parts
                .iter()
                .zip(coded)
                .map(|((_, b), c)| c.as_ref().map_or(b.len(), |c| c.len()) as u64)
                .fold(0u64, u64::saturating_add)
        };
        for i in 0..coded.len() {
            if adaptq_loader::layout::values_fit_stored(numel, stored_len(&coded)) {
                break;
            }
            coded[i] = None;
        }
        let stored: Vec<&[u8]> = parts
            .iter()
            .zip(&coded)
            .map(|((_, b), c)| c.as_deref().unwrap_or(b))
            .collect();
        let mut segments: Vec<Segment> = Vec::new();
        for bytes in &stored {
            let mut rest: &[u8] = bytes;
            while !rest.is_empty() {
                let room = (self.opts.shard_max_bytes as usize) - self.buf.len();
                let take = room.min(rest.len());
                let shard = self.shards.len();
                let offset = self.buf.len() as u64;
                match segments.last_mut() {
                    Some(s) if s.shard == shard && s.offset + s.length == offset => {
                        s.length += take as u64
                    }
                    _ => segments.push(Segment {
                        shard,
                        offset,
                        length: take as u64,
                    }),
                }
                self.buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.buf.len() as u64 == self.opts.shard_max_bytes {
                    self.flush_shard()?;
                }
            }
        }
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            shape,
            role: role.to_string(),
            method: method.to_string(),
            encoding,
            parts: parts
                .iter()
                .zip(&stored)
                .map(|((n, raw), b)| Part {
                    name: n.to_string(),
                    length: b.len() as u64,
                    lossless: (b.len() != raw.len()).then(|| crate::manifest::Lossless {
                        scheme: "rans".into(),
                        raw_length: raw.len() as u64,
                    }),
                })
                .collect(),
            segments,
        });
        Ok(())
    }

    fn flush_shard(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let file = shard_name(self.shards.len());
        write_file(&self.tmp.join(&file), &self.buf)?;
        self.shards.push(ShardInfo {
            file,
            bytes: self.buf.len() as u64,
            sha256: crate::sha256_hex(&self.buf),
            blake3: crate::blake3_hex(&self.buf),
        });
        self.buf.clear();
        Ok(())
    }

    /// Adds a side file (model.meta, verification.json, LICENSE); its digest enters the manifest.
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        if name == MANIFEST
            || name.starts_with("shard-")
            || !adaptq_loader::names::is_plain_relative(name, false)
        {
            return Err(BundleError::Invalid(format!(
                "reserved or invalid file name '{name}'"
            )));
        }
        if bytes.len() as u64 > adaptq_loader::layout::MAX_SIDE_FILE_BYTES {
            return Err(BundleError::Invalid(format!(
                "side file '{name}' holds {} bytes, over the {}-byte limit readers accept",
                bytes.len(),
                adaptq_loader::layout::MAX_SIDE_FILE_BYTES
            )));
        }
        write_file(&self.tmp.join(name), bytes)?;
        self.files.retain(|f| f.file != name);
        self.files.push(FileDigest {
            file: name.to_string(),
            bytes: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
        });
        Ok(())
    }

    /// Tensors written so far (for building verification reports before finishing).
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Writes the last shard and the manifest, then renames the folder into place.
    pub fn finish(
        mut self,
        model_id: &str,
        source: SourceRef,
        quantization: serde_json::Value,
    ) -> Result<Manifest> {
        self.flush_shard()?;
        self.files.sort_by(|a, b| a.file.cmp(&b.file));
        let mut m = Manifest {
            schema_version: SCHEMA_VERSION,
            model_id: model_id.to_string(),
            generator: Generator {
                name: "adaptq".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            source,
            quantization,
            shard_max_bytes: self.opts.shard_max_bytes,
            tensors: std::mem::take(&mut self.tensors),
            shards: std::mem::take(&mut self.shards),
            files: std::mem::take(&mut self.files),
            global_digest: String::new(),
            manifest_digest: "0".repeat(64),
        };
        m.global_digest = crate::global_digest(&m.shards);
        let text = serde_json::to_string_pretty(&m).expect("manifest serializes") + "\n";
        m.manifest_digest = crate::manifest_digest(&text).expect("digest field present");
        let text = serde_json::to_string_pretty(&m).expect("manifest serializes") + "\n";
        // Publish only what every reader accepts: a manifest failing the shared check is a
        // writer bug (or a caller's, such as a tensor name given twice), never a bundle.
        adaptq_loader::check_manifest(text.as_bytes()).map_err(|e| {
            BundleError::Invalid(format!(
                "the bundle's manifest fails the check every reader runs, so it is not \
                 written: {e}"
            ))
        })?;
        write_file(&self.tmp.join(MANIFEST), text.as_bytes())?;
        self.staged.commit(Kind::Folder)?;
        Ok(m)
    }
}

/// Writes and fsyncs a file, so a rename never publishes data still in flight.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

//! safetensors reader: one file, or a folder sharded by `model.safetensors.index.json`.
//!
//! The header is parsed with serde_json (the `safetensors` crate's own parser wants the whole
//! file as one slice and gives no ranged access across shards); each file is memory-mapped so
//! only the tensor being read is paged in.

use crate::blob::{Blob, MmapBlob};
use crate::model::ModelDesc;
use crate::{decode_plain, Result, SourceError, SrcDType, TensorInfo, TensorSource};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Largest header we accept; real headers are a few MiB at most.
const MAX_HEADER: u64 = 100 << 20;

struct Shard {
    path: PathBuf,
    blob: Box<dyn Blob>,
}

pub struct SafetensorsSource {
    root: PathBuf,
    shards: Vec<Shard>,
    infos: Vec<TensorInfo>,
    /// (shard index, absolute start, absolute end), parallel to `infos`.
    loc: Vec<(usize, u64, u64)>,
    desc: ModelDesc,
}

impl SafetensorsSource {
    /// `path` is a `.safetensors` file or a folder with `model.safetensors` or an index.
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, files) = if path.is_dir() {
            let idx = path.join("model.safetensors.index.json");
            if idx.exists() {
                (path.to_path_buf(), index_files(&idx)?)
            } else {
                (path.to_path_buf(), vec![path.join("model.safetensors")])
            }
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, vec![path.to_path_buf()])
        };
        let blobs = files
            .iter()
            .map(|f| MmapBlob::open(f).map(|b| Box::new(b) as Box<dyn Blob>))
            .collect::<Result<Vec<_>>>()?;
        Self::from_blobs(dir, blobs)
    }

    /// Reads safetensors shards from any byte containers; `dir` holds `config.json` and the
    /// tokenizer files.
    pub fn from_blobs(dir: PathBuf, blobs: Vec<Box<dyn Blob>>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut entries = Vec::new();
        for (si, blob) in blobs.into_iter().enumerate() {
            let f = blob.label().to_path_buf();
            for (info, s, e) in read_header(blob.as_ref())? {
                entries.push((si, s, info, e));
            }
            shards.push(Shard { path: f, blob });
        }
        // Stable order: by shard, then by position in the file.
        entries.sort_by_key(|(si, s, _, _)| (*si, *s));
        let mut infos = Vec::with_capacity(entries.len());
        let mut loc = Vec::with_capacity(entries.len());
        for (si, s, info, e) in entries {
            if infos.iter().any(|t: &TensorInfo| t.name == info.name) {
                return Err(SourceError::corrupt(
                    &shards[si].path,
                    format!("tensor '{}' appears twice", info.name),
                ));
            }
            infos.push(info);
            loc.push((si, s, e));
        }
        let config = dir.join("config.json");
        let desc = ModelDesc::from_hf_config(&config, &infos)?;
        for (si, shard) in shards.iter().enumerate() {
            let ranges: Vec<(u64, u64)> = loc
                .iter()
                .filter(|(s, _, _)| *s == si)
                .map(|&(_, a, b)| (a, b))
                .collect();
            shard.blob.plan(&ranges);
        }
        Ok(SafetensorsSource {
            root: dir,
            shards,
            infos,
            loc,
            desc,
        })
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.infos
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| SourceError::NoSuchTensor {
                path: self.root.clone(),
                tensor: name.into(),
            })
    }
}

fn index_files(idx: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read(idx).map_err(|e| SourceError::io(idx, e))?;
    let dir = idx.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for f in index_shard_names(&text, idx)? {
        let p = dir.join(&f);
        if !p.exists() {
            return Err(SourceError::NotFound { path: p });
        }
        out.push(p);
    }
    Ok(out)
}

/// The shard file names listed by a `model.safetensors.index.json`, sorted and checked to be
/// plain file names (an index must not point outside its folder).
pub fn index_shard_names(text: &[u8], idx: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| SourceError::corrupt(idx, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| SourceError::corrupt(idx, "no \"weight_map\" object"))?;
    let mut files: Vec<String> = map
        .values()
        .map(|f| {
            f.as_str()
                .map(str::to_string)
                .ok_or_else(|| SourceError::corrupt(idx, "weight_map values must be file names"))
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    for f in &files {
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(SourceError::corrupt(
                idx,
                format!("shard name '{f}' is not a plain file name"),
            ));
        }
    }
    Ok(files)
}

/// Reads the 8-byte length and the JSON header from a blob (two ranged reads).
fn read_header(blob: &dyn Blob) -> Result<Vec<(TensorInfo, u64, u64)>> {
    let path = blob.label();
    let total = blob.len();
    if total < 8 {
        return Err(SourceError::corrupt(
            path,
            "file is shorter than the 8-byte header length",
        ));
    }
    let n = u64::from_le_bytes(blob.read(0, 8)?.as_ref().try_into().unwrap());
    if n > MAX_HEADER || 8 + n > total {
        return Err(SourceError::corrupt(
            path,
            format!("header length {n} exceeds the file ({total} bytes)"),
        ));
    }
    let json = blob.read(8, 8 + n)?;
    parse_json(&json, 8 + n, total - 8 - n, path)
}

/// Parses a safetensors JSON header into (info, absolute start, absolute end).
fn parse_json(
    json: &[u8],
    data_start: u64,
    data_len: u64,
    path: &Path,
) -> Result<Vec<(TensorInfo, u64, u64)>> {
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| SourceError::corrupt(path, format!("header is not valid JSON: {e}")))?;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| SourceError::corrupt(path, format!("tensor '{name}': {why}"));
        let dt = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no dtype"))?;
        let (dtype, esize) = match dt {
            "F32" => (SrcDType::F32, 4),
            "F16" => (SrcDType::F16, 2),
            "BF16" => (SrcDType::BF16, 2),
            "I64" => (SrcDType::I64, 8),
            "I32" => (SrcDType::I32, 4),
            "U8" => (SrcDType::U8, 1),
            other => {
                return Err(SourceError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: other.into(),
                })
            }
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape must be non-negative integers"))?;
        let offs = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("data_offsets must be [start, end]"))?;
        let (s, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e && e <= data_len => (s, e),
            _ => return Err(bad(&format!("data_offsets {offs:?} lie outside the {data_len}-byte data section (truncated file?)"))),
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        if numel.checked_mul(esize) != Some((e - s) as usize) {
            return Err(bad(&format!(
                "shape {shape:?} of {dt} needs {} bytes but data_offsets give {}",
                numel.saturating_mul(esize),
                e - s
            )));
        }
        out.push((
            TensorInfo {
                name: name.clone(),
                shape,
                dtype,
                byte_len: (e - s) as usize,
            },
            data_start + s,
            data_start + e,
        ));
    }
    Ok(out)
}

impl TensorSource for SafetensorsSource {
    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.index(name)?;
        let (si, s, e) = self.loc[i];
        let info = &self.infos[i];
        if !info.dtype.is_float() {
            return Err(SourceError::UnsupportedDtype {
                path: self.shards[si].path.clone(),
                tensor: name.into(),
                dtype: format!("{} (not a float tensor)", info.dtype.name()),
            });
        }
        let mut out = Vec::with_capacity(info.numel());
        decode_plain(info.dtype, &self.shards[si].blob.read(s, e)?, &mut out);
        Ok(out)
    }
    fn raw_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let i = self.index(name)?;
        let (si, s, e) = self.loc[i];
        self.shards[si].blob.read(s, e)
    }
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }
    fn format(&self) -> &'static str {
        "safetensors"
    }
    fn companion_dir(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

/// Parses just the tensor table of a safetensors file held in memory (for tests and tools).
pub fn header_of(buf: &[u8], path: &Path) -> Result<Vec<TensorInfo>> {
    let blob = crate::blob::MemBlob {
        label: path.to_path_buf(),
        bytes: buf.to_vec(),
    };
    Ok(read_header(&blob)?.into_iter().map(|(i, _, _)| i).collect())
}

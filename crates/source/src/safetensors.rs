//! safetensors reader: one file, or a folder sharded by `model.safetensors.index.json`.
//!
//! The header is parsed with serde_json (the `safetensors` crate's own parser wants the whole
//! file as one slice and gives no ranged access across shards); each file is memory-mapped so
//! only the tensor being read is paged in.

use crate::blob::{read_small, Blob, MmapBlob};
use crate::model::ModelDesc;
use crate::{decode_plain, NameIndex, Result, SourceError, SrcDType, TensorInfo, TensorSource};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
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
    by_name: NameIndex,
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
            infos.push(info);
            loc.push((si, s, e));
        }
        let by_name = NameIndex::build(&infos).map_err(|(_, b)| {
            SourceError::corrupt(
                &shards[loc[b].0].path,
                format!("tensor '{}' appears twice", infos[b].name),
            )
        })?;
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
            by_name,
            loc,
            desc,
        })
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.by_name.get(&self.infos, name, &self.root)
    }
}

/// Largest `model.safetensors.index.json` read; real ones are well under 10 MiB.
const MAX_INDEX: u64 = 64 << 20;
/// Most dimensions a tensor may have.
const MAX_RANK: usize = 8;

fn index_files(idx: &Path) -> Result<Vec<PathBuf>> {
    let text = read_small(idx, MAX_INDEX)?;
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

/// A JSON object's entries in file order, equal keys kept: a `serde_json::Map` keeps only the
/// last of two equal keys, silently, and a header or index with one must be refused.
struct Ordered<T>(Vec<(String, T)>);

/// How an [`Ordered`] object reads the value under one key.
trait EntryValue: Sized {
    fn read<'de, A: MapAccess<'de>>(key: &str, m: &mut A) -> std::result::Result<Self, A::Error>;
}

impl EntryValue for String {
    fn read<'de, A: MapAccess<'de>>(_: &str, m: &mut A) -> std::result::Result<Self, A::Error> {
        m.next_value()
    }
}

/// A safetensors header entry: a tensor, or `None` for `__metadata__` (whatever it holds).
impl EntryValue for Option<RawEntry> {
    fn read<'de, A: MapAccess<'de>>(key: &str, m: &mut A) -> std::result::Result<Self, A::Error> {
        if key == "__metadata__" {
            m.next_value::<de::IgnoredAny>()?;
            Ok(None)
        } else {
            m.next_value().map(Some)
        }
    }
}

impl<'de, T: EntryValue> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: EntryValue> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v = T::read(&k, &mut m)?;
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// The shard file names listed by a `model.safetensors.index.json`, sorted and checked to be
/// plain file names: each is joined to the index's folder, so one like `../x` or `/etc/x`
/// would read outside it.
pub fn index_shard_names(text: &[u8], idx: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: Option<Ordered<String>>,
    }
    let index: Index = serde_json::from_slice(text)
        .map_err(|e| SourceError::corrupt(idx, format!("invalid index JSON: {e}")))?;
    let map = index
        .weight_map
        .ok_or_else(|| SourceError::corrupt(idx, "no \"weight_map\" object"))?
        .0;
    let mut tensors = std::collections::HashSet::new();
    if let Some((t, _)) = map.iter().find(|(t, _)| !tensors.insert(t.as_str())) {
        return Err(SourceError::corrupt(
            idx,
            format!("tensor '{t}' is listed twice in weight_map"),
        ));
    }
    let files: Vec<String> = map
        .into_iter()
        .map(|(_, f)| f)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(f) = files
        .iter()
        .find(|f| !adaptq_loader::names::is_plain_relative(f, false))
    {
        return Err(SourceError::corrupt(
            idx,
            format!("shard name '{f}' is not a plain file name inside the index's folder"),
        ));
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

/// One tensor's entry as written; every field optional so a missing one gets a message that
/// names the tensor. serde refuses a field given twice.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: Option<String>,
    #[serde(default, deserialize_with = "shape")]
    shape: Option<Vec<u64>>,
    data_offsets: Option<(u64, u64)>,
}

/// A shape of at most [`MAX_RANK`] dimensions, refused before a longer list is collected.
fn shape<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<u64>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Vec<u64>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_RANK} dimensions")
        }
        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut s: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut dims = Vec::new();
            while let Some(d) = s.next_element::<u64>()? {
                if dims.len() == MAX_RANK {
                    return Err(de::Error::invalid_length(MAX_RANK + 1, &self));
                }
                dims.push(d);
            }
            Ok(Some(dims))
        }
    }
    d.deserialize_seq(V)
}

/// Parses a safetensors JSON header into (info, absolute start, absolute end), in data order.
/// As the format requires, the tensors must tile the data section exactly: no key twice, no
/// overlap, no hole and nothing after the last tensor.
fn parse_json(
    json: &[u8],
    data_start: u64,
    data_len: u64,
    path: &Path,
) -> Result<Vec<(TensorInfo, u64, u64)>> {
    let Ordered::<Option<RawEntry>>(table) = serde_json::from_slice(json).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof => {
                SourceError::corrupt(path, format!("header is not valid JSON: {e}"))
            }
            _ => SourceError::corrupt(path, format!("bad header: {e}")),
        }
    })?;
    let mut keys: Vec<&str> = table.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(SourceError::corrupt(
            path,
            format!("key '{}' appears twice in the header", w[0]),
        ));
    }
    drop(keys);
    let mut out = Vec::with_capacity(table.len());
    for (name, v) in table {
        let Some(v) = v else { continue };
        let bad = |why: &str| SourceError::corrupt(path, format!("tensor '{name}': {why}"));
        let dt = v.dtype.as_deref().ok_or_else(|| bad("no dtype"))?;
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
        let dims = v.shape.as_deref().ok_or_else(|| bad("no shape"))?;
        let (s, e) = v
            .data_offsets
            .ok_or_else(|| bad("data_offsets must be [start, end]"))?;
        if s > e {
            return Err(bad(&format!("data_offsets [{s}, {e}] run backwards")));
        }
        if e > data_len {
            return Err(bad(&format!("data_offsets [{s}, {e}] lie outside the {data_len}-byte data section (truncated file?)")));
        }
        let numel = crate::checked_numel(dims).map_err(|why| bad(&why))?;
        let need = numel.checked_mul(esize);
        if need != Some(e - s) {
            return Err(bad(&format!(
                "shape {dims:?} of {dt} needs {} bytes but data_offsets give {}",
                need.map_or("too many".to_string(), |n| n.to_string()),
                e - s
            )));
        }
        let too_big = || bad("too large for this machine");
        let shape = dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| too_big()))
            .collect::<Result<_>>()?;
        let byte_len = usize::try_from(e - s).map_err(|_| too_big())?;
        out.push((
            TensorInfo {
                name,
                shape,
                dtype,
                byte_len,
            },
            s,
            e,
        ));
    }
    out.sort_by_key(|&(_, s, e)| (s, e));
    let mut at = 0u64;
    for (i, (info, s, e)) in out.iter().enumerate() {
        if *s > at {
            return Err(SourceError::corrupt(
                path,
                format!(
                    "bytes {at}..{s} of the data section, before tensor '{}', belong to no tensor",
                    info.name
                ),
            ));
        }
        if *s < at {
            return Err(SourceError::corrupt(
                path,
                format!(
                    "tensor '{}' overlaps tensor '{}' in the data section",
                    info.name,
                    out[i - 1].0.name
                ),
            ));
        }
        at = *e;
    }
    if at != data_len {
        return Err(SourceError::corrupt(
            path,
            format!(
                "the {data_len}-byte data section has {} bytes after the last tensor",
                data_len - at
            ),
        ));
    }
    Ok(out
        .into_iter()
        .map(|(i, s, e)| (i, data_start + s, data_start + e))
        .collect())
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
        let blob = &self.shards[si].blob;
        decode_plain(info.dtype, &blob.read(s, e)?, &mut out);
        blob.release(s, e);
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
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.find(&self.infos, name).map(|i| &self.infos[i])
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

//! GGUF v2/v3 reader.
//!
//! The header parser is written here rather than taken from candle because candle's reader
//! trusts the counts in the header (a corrupt file can ask for terabytes of allocation or
//! panic), and adaptq must answer bad input with an error that names the file. Block
//! dequantization is candle's: its GGML kernels are the well-tested part.

use crate::blob::{Blob, MmapBlob};
use crate::model::ModelDesc;
use crate::{Result, SourceError, SrcDType, TensorInfo, TensorSource};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// GGML tensor types that adaptq can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
    /// (elements per block, bytes per block), as in ggml.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
    fn candle(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as C;
        match self {
            Self::F32 => C::F32,
            Self::F16 => C::F16,
            Self::BF16 => C::BF16,
            Self::Q4_0 => C::Q4_0,
            Self::Q4_1 => C::Q4_1,
            Self::Q5_0 => C::Q5_0,
            Self::Q5_1 => C::Q5_1,
            Self::Q8_0 => C::Q8_0,
            Self::Q2K => C::Q2K,
            Self::Q3K => C::Q3K,
            Self::Q4K => C::Q4K,
            Self::Q5K => C::Q5K,
            Self::Q6K => C::Q6K,
        }
    }
}

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id and items.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Ordered key/value metadata, as stored in the file.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    /// String array (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            Value::Array(_, items) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }
    /// Integer array (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            Value::Array(_, items) => items
                .iter()
                .map(|v| match *v {
                    Value::I32(x) => Some(x as i64),
                    Value::I64(x) => Some(x),
                    Value::I8(x) => Some(x as i64),
                    Value::I16(x) => Some(x as i64),
                    _ => v.as_u64().map(|x| x as i64),
                })
                .collect(),
            _ => None,
        }
    }
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        match self.get(key)? {
            Value::Array(_, items) => items.iter().map(|v| v.as_f64().map(|x| x as f32)).collect(),
            _ => None,
        }
    }
}

/// Parsed GGUF header: version, metadata, tensor table and where tensor data starts.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    /// Tensor name, ggml dims (`ne`, innermost first), type, offset relative to the data section.
    pub tensors: Vec<(String, Vec<u64>, GgmlType, u64)>,
    pub alignment: u64,
    pub data_start: u64,
}

/// Bounds-checked little-endian cursor over the start of the file (`buf` may be a prefix of a
/// `total`-byte file when the header is fetched remotely).
struct Cursor<'a> {
    buf: &'a [u8],
    total: usize,
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None if self.pos.saturating_add(n) <= self.total => Err(SourceError::HeaderShort {
                path: self.path.to_path_buf(),
            }),
            None => Err(SourceError::corrupt(
                self.path,
                format!(
                    "header ends early while reading {what} at byte {} (file has {} bytes)",
                    self.pos, self.total
                ),
            )),
        }
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2, "u16")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    /// A count that must be satisfiable by the remaining bytes (each item ≥ `min_item` bytes).
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.total - self.pos) as u64;
        if n.saturating_mul(min_item.max(1) as u64) > left {
            return Err(SourceError::corrupt(
                self.path,
                format!("{what} count {n} cannot fit in the {left} bytes left"),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| SourceError::corrupt(self.path, format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string("metadata string")?),
            9 => {
                if depth > 2 {
                    return Err(SourceError::corrupt(self.path, "arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.count("array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(ety, depth + 1)?);
                }
                Value::Array(ety, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => {
                return Err(SourceError::corrupt(
                    self.path,
                    format!("unknown metadata value type {t} at byte {}", self.pos),
                ))
            }
        })
    }
}

/// Parses the header of a GGUF file held in `buf`.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<Header> {
    parse_prefix(buf, buf.len(), path)
}

/// Reads and parses the header from a blob, fetching a growing prefix: GGUF gives no header
/// length up front, and the tokenizer in the metadata makes headers of several MiB.
pub fn read_header(blob: &dyn Blob) -> Result<Header> {
    let total = blob.len();
    let mut want = total.min(4 << 20);
    loop {
        let prefix = blob.read(0, want)?;
        match parse_prefix(&prefix, total as usize, blob.label()) {
            Err(SourceError::HeaderShort { .. }) if want < total => {
                want = total.min(want * 4);
            }
            r => return r,
        }
    }
}

fn parse_prefix(buf: &[u8], total: usize, path: &Path) -> Result<Header> {
    let mut c = Cursor {
        buf,
        total,
        pos: 0,
        path,
    };
    if c.take(4, "magic")? != b"GGUF" {
        return Err(SourceError::corrupt(path, "missing GGUF magic bytes"));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(SourceError::corrupt(
            path,
            format!("GGUF version {version} is not supported (only v2 and v3)"),
        ));
    }
    let n_tensors = c.count("tensor", 24)?;
    let n_kv = c.count("metadata", 12)?;
    let mut entries = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32()?;
        let v = c.value(ty, 0)?;
        entries.push((key, v));
    }
    let metadata = Metadata { entries };
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let nd = c.u32()? as usize;
        if nd == 0 || nd > 4 {
            return Err(SourceError::corrupt(
                path,
                format!("tensor '{name}' has {nd} dimensions (GGUF allows 1 to 4)"),
            ));
        }
        let mut dims = Vec::with_capacity(nd);
        for _ in 0..nd {
            dims.push(c.u64()?);
        }
        let tid = c.u32()?;
        let offset = c.u64()?;
        let ty = GgmlType::from_id(tid).ok_or_else(|| SourceError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: format!("GGML type id {tid}"),
        })?;
        tensors.push((name, dims, ty, offset));
    }
    let alignment = metadata.get_u64("general.alignment").unwrap_or(32);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(SourceError::corrupt(
            path,
            format!("general.alignment {alignment} is not a power of two"),
        ));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// A memory-mapped GGUF file.
pub struct GgufSource {
    path: PathBuf,
    blob: Box<dyn Blob>,
    header: Header,
    infos: Vec<TensorInfo>,
    /// Absolute byte ranges of each tensor, parallel to `infos`.
    ranges: Vec<(u64, u64)>,
    desc: ModelDesc,
    dir: Option<PathBuf>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let blob = MmapBlob::open(path)?;
        Self::from_blob(Box::new(blob), path.parent().map(Path::to_path_buf))
    }

    /// Reads a GGUF from any byte container; `dir` holds companion files (LICENSE, README).
    pub fn from_blob(blob: Box<dyn Blob>, dir: Option<PathBuf>) -> Result<Self> {
        let path = blob.label().to_path_buf();
        let path = path.as_path();
        let header = read_header(blob.as_ref())?;
        let file_len = blob.len();
        let mut infos = Vec::with_capacity(header.tensors.len());
        let mut ranges = Vec::with_capacity(header.tensors.len());
        for (name, dims, ty, off) in &header.tensors {
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    SourceError::corrupt(path, format!("tensor '{name}' shape overflows"))
                })?;
            let (bs, ts) = ty.block();
            if dims[0] % bs as u64 != 0 {
                return Err(SourceError::corrupt(
                    path,
                    format!(
                        "tensor '{name}' row of {} is not a multiple of {}'s block of {bs}",
                        dims[0],
                        ty.name()
                    ),
                ));
            }
            let bytes = numel / bs as u64 * ts as u64;
            let start = header.data_start.checked_add(*off);
            let end = start.and_then(|s| s.checked_add(bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => ranges.push((s, e)),
                _ => {
                    return Err(SourceError::corrupt(
                        path,
                        format!(
                            "tensor '{name}' data (offset {off}, {bytes} bytes) lies past the end of the {file_len}-byte file"
                        ),
                    ))
                }
            }
            infos.push(TensorInfo {
                name: name.clone(),
                shape: dims.iter().rev().map(|&d| d as usize).collect(),
                dtype: match *ty {
                    GgmlType::F32 => SrcDType::F32,
                    GgmlType::F16 => SrcDType::F16,
                    GgmlType::BF16 => SrcDType::BF16,
                    t => SrcDType::Ggml(t),
                },
                byte_len: bytes as usize,
            });
        }
        let desc = ModelDesc::from_gguf(&header.metadata, &infos, path)?;
        blob.plan(&ranges);
        Ok(GgufSource {
            path: path.to_path_buf(),
            blob,
            header,
            infos,
            ranges,
            desc,
            dir,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.infos
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| SourceError::NoSuchTensor {
                path: self.path.clone(),
                tensor: name.into(),
            })
    }
}

/// Dequantizes GGML-typed bytes to f32 with candle's block kernels.
pub fn dequantize(
    ty: GgmlType,
    bytes: &[u8],
    numel: usize,
) -> std::result::Result<Vec<f32>, String> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut out = Vec::with_capacity(numel);
            let d = match ty {
                GgmlType::F32 => SrcDType::F32,
                GgmlType::F16 => SrcDType::F16,
                _ => SrcDType::BF16,
            };
            crate::decode_plain(d, bytes, &mut out);
            Ok(out)
        }
        _ => {
            let dev = candle_core::Device::Cpu;
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                ty.candle(),
                bytes,
                vec![numel],
                &dev,
            )
            .map_err(|e| e.to_string())?;
            q.dequantize(&dev)
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        }
    }
}

impl TensorSource for GgufSource {
    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.index(name)?;
        let (s, e) = self.ranges[i];
        let info = &self.infos[i];
        let ty = self.header.tensors[i].2;
        dequantize(ty, &self.blob.read(s, e)?, info.numel())
            .map_err(|why| SourceError::corrupt(&self.path, format!("tensor '{name}': {why}")))
    }
    fn raw_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let i = self.index(name)?;
        let (s, e) = self.ranges[i];
        self.blob.read(s, e)
    }
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }
    fn format(&self) -> &'static str {
        "gguf"
    }
    fn gguf_metadata(&self) -> Option<&Metadata> {
        Some(&self.header.metadata)
    }
    fn companion_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

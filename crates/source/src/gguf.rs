//! GGUF v2/v3 reader.
//!
//! The header parser is written here rather than taken from candle because candle's reader
//! trusts the counts in the header (a corrupt file can ask for terabytes of allocation or
//! panic), and adaptq must answer bad input with an error that names the file. Block
//! dequantization is candle's: its GGML kernels are the well-tested part. Type ids, names and
//! block sizes come from the format crate's table ([`adaptq_loader::ggml`]).

use crate::blob::{Blob, MmapBlob};
use crate::model::ModelDesc;
use crate::{NameIndex, Result, SourceError, SrcDType, TensorInfo, TensorSource};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use adaptq_loader::ggml::BlockType;
/// GGML tensor types that adaptq can read: the format crate's table.
pub use adaptq_loader::ggml::GgmlType;

/// candle's name for a block type (its kernels dequantize the blocks); `None` for the types
/// candle lacks (IQ4_NL, IQ4_XS), which adaptq's own decoder reads.
pub fn candle_dtype(ty: BlockType) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as C;
    Some(match ty {
        BlockType::Q4_0 => C::Q4_0,
        BlockType::Q4_1 => C::Q4_1,
        BlockType::Q5_0 => C::Q5_0,
        BlockType::Q5_1 => C::Q5_1,
        BlockType::Q8_0 => C::Q8_0,
        BlockType::Q2K => C::Q2K,
        BlockType::Q3K => C::Q3K,
        BlockType::Q4K => C::Q4K,
        BlockType::Q5K => C::Q5K,
        BlockType::Q6K => C::Q6K,
        BlockType::IQ4NL | BlockType::IQ4XS => return None,
    })
}

/// How a tensor of GGML type `ty` is described to the pipeline.
fn src_dtype(ty: GgmlType) -> SrcDType {
    match ty {
        GgmlType::F32 => SrcDType::F32,
        GgmlType::F16 => SrcDType::F16,
        GgmlType::BF16 => SrcDType::BF16,
        t => SrcDType::Ggml(t),
    }
}

/// Largest GGUF header (metadata and tensor table) read. Real ones, tokenizer included, are a
/// few tens of MiB; a remote file's claimed length must not make the reader fetch or allocate
/// more than this.
pub const MAX_HEADER: u64 = 256 << 20;
/// Most tensors and metadata entries a header may declare (real models have a few thousand).
const MAX_COUNT: u64 = 1 << 20;
/// Largest `general.alignment` accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Deepest nesting of metadata arrays.
const MAX_DEPTH: u32 = 2;
/// Fewest header bytes one metadata entry takes: key length, value type, a one-byte value.
const MIN_KV: usize = 8 + 4 + 1;
/// Fewest header bytes one tensor info takes: name length, rank, one dimension, type, offset.
const MIN_TENSOR: usize = 8 + 4 + 8 + 4 + 8;

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
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A GGUF metadata array, held as a vector of its element type. One [`Value`] per item would
/// cost 32 bytes for every 1-byte item in the file, so a modest header could take gigabytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Strings),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// Fixed-size array element types: (variant, GGUF type id, Rust type).
macro_rules! for_fixed {
    ($m:ident) => {
        $m!(U8, 0, u8);
        $m!(I8, 1, i8);
        $m!(U16, 2, u16);
        $m!(I16, 3, i16);
        $m!(U32, 4, u32);
        $m!(I32, 5, i32);
        $m!(F32, 6, f32);
        $m!(Bool, 7, bool);
        $m!(U64, 10, u64);
        $m!(I64, 11, i64);
        $m!(F64, 12, f64);
    };
}

impl Array {
    /// The GGUF type id of the elements (8 = string, 9 = array, …).
    pub fn element_type(&self) -> u32 {
        macro_rules! arm {
            ($v:ident, $id:expr, $t:ident) => {
                if let Array::$v(_) = self {
                    return $id;
                }
            };
        }
        for_fixed!(arm);
        match self {
            Array::String(_) => 8,
            _ => 9,
        }
    }

    pub fn len(&self) -> usize {
        macro_rules! arm {
            ($v:ident, $id:expr, $t:ident) => {
                if let Array::$v(a) = self {
                    return a.len();
                }
            };
        }
        for_fixed!(arm);
        match self {
            Array::String(a) => a.len(),
            Array::Array(a) => a.len(),
            _ => unreachable!("every fixed-size variant is handled above"),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i` as a [`Value`].
    pub fn get(&self, i: usize) -> Option<Value> {
        macro_rules! arm {
            ($v:ident, $id:expr, $t:ident) => {
                if let Array::$v(a) = self {
                    return a.get(i).map(|&x| Value::$v(x));
                }
            };
        }
        for_fixed!(arm);
        match self {
            Array::String(a) => a.get(i).map(|s| Value::String(s.to_string())),
            Array::Array(a) => a.get(i).cloned().map(Value::Array),
            _ => unreachable!("every fixed-size variant is handled above"),
        }
    }

    /// The items as [`Value`]s, one at a time.
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }

    /// An array of element type `ety` from items that must all be of that type; `None` if one is
    /// not (or `ety` is no GGUF type).
    pub fn from_values(ety: u32, items: impl IntoIterator<Item = Value>) -> Option<Self> {
        let items = items.into_iter();
        macro_rules! arm {
            ($v:ident, $id:expr, $t:ident) => {
                if ety == $id {
                    return items
                        .map(|x| match x {
                            Value::$v(x) => Some(x),
                            _ => None,
                        })
                        .collect::<Option<Vec<$t>>>()
                        .map(Array::$v);
                }
            };
        }
        for_fixed!(arm);
        match ety {
            8 => {
                let mut out = Strings::default();
                for x in items {
                    match x {
                        Value::String(s) => out.push(&s),
                        _ => return None,
                    }
                }
                Some(Array::String(out))
            }
            9 => items
                .map(|x| match x {
                    Value::Array(a) => Some(a),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(Array::Array),
            _ => None,
        }
    }

    /// The items as i64 if this is an integer array (and every item fits).
    fn to_i64s(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Array::U8(v) => all(v, |x| Some(x.into())),
            Array::I8(v) => all(v, |x| Some(x.into())),
            Array::U16(v) => all(v, |x| Some(x.into())),
            Array::I16(v) => all(v, |x| Some(x.into())),
            Array::U32(v) => all(v, |x| Some(x.into())),
            Array::I32(v) => all(v, |x| Some(x.into())),
            Array::U64(v) => all(v, |x| i64::try_from(x).ok()),
            Array::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The items as f32 if this is a numeric array.
    fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            other => other
                .to_i64s()
                .map(|v| v.into_iter().map(|x| x as f32).collect()),
        }
    }
}

/// A list of strings in one buffer plus an end offset per item: 8 bytes per item beyond the
/// text, which is no more than the file spends on each item's length. Boxed (and absent while
/// empty) so that [`Array`], and with it [`Value`], stays at 32 bytes.
#[derive(Clone, Default)]
pub struct Strings(Option<Box<StringsBuf>>);

#[derive(Clone, Default)]
struct StringsBuf {
    text: String,
    ends: Vec<usize>,
}

impl Strings {
    fn with_capacity(n: usize) -> Self {
        Strings((n > 0).then(|| {
            Box::new(StringsBuf {
                text: String::new(),
                ends: Vec::with_capacity(n),
            })
        }))
    }
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.ends.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn push(&mut self, s: &str) {
        let b = self.0.get_or_insert_with(Box::default);
        b.text.push_str(s);
        b.ends.push(b.text.len());
    }
    pub fn get(&self, i: usize) -> Option<&str> {
        let b = self.0.as_ref()?;
        let end = *b.ends.get(i)?;
        let start = if i == 0 { 0 } else { b.ends[i - 1] };
        Some(&b.text[start..end])
    }
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index below len"))
    }
}

impl PartialEq for Strings {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for Strings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Strings {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut out = Strings::default();
        for s in iter {
            out.push(s.as_ref());
        }
        out
    }
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
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
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
        match self.get(key)?.as_array()? {
            Array::String(s) => Some(s.iter().collect()),
            _ => None,
        }
    }
    /// Integer array (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        self.get(key)?.as_array()?.to_i64s()
    }
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key)?.as_array()?.to_f32s()
    }
}

/// Parsed GGUF header: version, metadata, tensor table and where tensor data starts. A header
/// from [`parse_header`] or [`read_header`] has been checked: unique tensor names, shapes whose
/// byte sizes do not overflow, aligned offsets, and data ranges inside the file that do not
/// overlap.
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
    /// How far the header may reach: the file's length, capped at [`MAX_HEADER`].
    limit: usize,
    total: u64,
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.limit && end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            Some(end) if end <= self.limit => Err(SourceError::HeaderShort {
                path: self.path.to_path_buf(),
            }),
            _ if (self.pos as u64).saturating_add(n as u64) > self.total => {
                Err(SourceError::corrupt(
                    self.path,
                    format!(
                        "header ends early while reading {what} at byte {} (file has {} bytes)",
                        self.pos, self.total
                    ),
                ))
            }
            _ => Err(SourceError::corrupt(
                self.path,
                format!("header runs past {MAX_HEADER} bytes while reading {what}, more than any real model's"),
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
    /// A count of items of at least `min_item` bytes each. It is refused unless that many fit in
    /// what the header may span, and the header is fetched further unless they fit in the bytes
    /// already held, so any allocation sized from it is bounded by bytes that back it.
    fn count(&mut self, what: &str, min_item: usize, max: u64) -> Result<usize> {
        let n = self.u64()?;
        let need = n.saturating_mul(min_item.max(1) as u64);
        let left = self.limit.saturating_sub(self.pos) as u64;
        if n > max {
            return Err(SourceError::corrupt(
                self.path,
                format!("{what} count {n} is over the limit of {max}"),
            ));
        }
        if need > left {
            return Err(SourceError::corrupt(
                self.path,
                format!("{what} count {n} cannot fit in the {left} header bytes left"),
            ));
        }
        if need > (self.buf.len().min(self.limit) - self.pos) as u64 {
            return Err(SourceError::HeaderShort {
                path: self.path.to_path_buf(),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<&'a str> {
        let n = self.count(what, 1, u64::MAX)?;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
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
            8 => Value::String(self.string("metadata string")?.to_string()),
            9 => Value::Array(self.array(depth)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.unknown_type(t)),
        })
    }
    fn unknown_type(&self, t: u32) -> SourceError {
        SourceError::corrupt(
            self.path,
            format!("unknown metadata value type {t} at byte {}", self.pos),
        )
    }
    /// An array, decoded straight into a vector of its element type.
    fn array(&mut self, depth: u32) -> Result<Array> {
        if depth >= MAX_DEPTH {
            return Err(SourceError::corrupt(self.path, "arrays nested too deeply"));
        }
        let ety = self.u32()?;
        let min_item = match ety {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            t => return Err(self.unknown_type(t)),
        };
        let n = self.count("array", min_item, u64::MAX)?;
        macro_rules! fixed {
            (@decode bool, $c:expr) => {
                $c[0] != 0
            };
            (@decode $t:ident, $c:expr) => {
                $t::from_le_bytes($c.try_into().unwrap())
            };
            ($v:ident, $id:expr, $t:ident) => {
                if ety == $id {
                    let b = self.take(n * min_item, "array")?;
                    return Ok(Array::$v(
                        b.chunks_exact(min_item)
                            .map(|c| fixed!(@decode $t, c))
                            .collect(),
                    ));
                }
            };
        }
        for_fixed!(fixed);
        if ety == 8 {
            let mut s = Strings::with_capacity(n);
            for _ in 0..n {
                s.push(self.string("array string")?);
            }
            return Ok(Array::String(s));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.array(depth + 1)?);
        }
        Ok(Array::Array(items))
    }
}

/// Parses the header of a GGUF file held in `buf`.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<Header> {
    parse_prefix(buf, buf.len() as u64, path).map(|(h, _)| h)
}

/// Reads and parses the header from a blob, fetching a growing prefix: GGUF gives no header
/// length up front, and the tokenizer in the metadata makes headers of several MiB.
pub fn read_header(blob: &dyn Blob) -> Result<Header> {
    read_checked(blob).map(|(h, _)| h)
}

/// The header and each tensor's absolute byte range.
fn read_checked(blob: &dyn Blob) -> Result<(Header, Vec<(u64, u64)>)> {
    let total = blob.len();
    let limit = total.min(MAX_HEADER);
    let mut want = limit.min(4 << 20);
    loop {
        let prefix = blob.read(0, want)?;
        match parse_prefix(&prefix, total, blob.label()) {
            Err(SourceError::HeaderShort { .. }) if want < limit => {
                want = limit.min(want.saturating_mul(4));
            }
            r => return r,
        }
    }
}

fn parse_prefix(buf: &[u8], total: u64, path: &Path) -> Result<(Header, Vec<(u64, u64)>)> {
    let mut c = Cursor {
        buf,
        limit: total.min(MAX_HEADER) as usize,
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
    let n_tensors = c.count("tensor", MIN_TENSOR, MAX_COUNT)?;
    let n_kv = c.count("metadata", MIN_KV, MAX_COUNT)?;
    let mut entries: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32()?;
        let v = c.value(ty, 0)?;
        entries.push((key.to_string(), v));
    }
    if let Some(key) = duplicate(entries.len(), |i| &entries[i].0) {
        return Err(SourceError::corrupt(
            path,
            format!("metadata key '{key}' appears twice"),
        ));
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
            tensor: name.to_string(),
            dtype: format!("GGML type id {tid}"),
        })?;
        tensors.push((name.to_string(), dims, ty, offset));
    }
    if let Some(name) = duplicate(tensors.len(), |i| &tensors[i].0) {
        return Err(SourceError::corrupt(
            path,
            format!("tensor '{name}' appears twice"),
        ));
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            Some(a) => {
                return Err(SourceError::corrupt(
                    path,
                    format!("general.alignment {a} is not a power of two up to {MAX_ALIGNMENT}"),
                ))
            }
            None => {
                return Err(SourceError::corrupt(
                    path,
                    "general.alignment is not an unsigned integer",
                ))
            }
        },
    };
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let header = Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    };
    let ranges = tensor_ranges(&header, total, path)?;
    Ok((header, ranges))
}

/// A name that two of the `n` items share, found by sorting 4-byte positions rather than
/// hashing copies of the names, which would take more memory than the header's own bytes.
fn duplicate<'a>(n: usize, name: impl Fn(usize) -> &'a str) -> Option<&'a str> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_unstable_by(|&a, &b| name(a as usize).cmp(name(b as usize)));
    order
        .windows(2)
        .map(|w| (name(w[0] as usize), name(w[1] as usize)))
        .find(|(a, b)| a == b)
        .map(|(a, _)| a)
}

/// Bytes a tensor of `dims` (ggml order) and `ty` occupies, or why it cannot be stored.
fn tensor_bytes(dims: &[u64], ty: GgmlType) -> std::result::Result<u64, String> {
    let numel = crate::checked_numel(dims)?;
    let (bs, ts) = ty.block();
    if !dims[0].is_multiple_of(bs as u64) {
        return Err(format!(
            "row of {} is not a multiple of {}'s block of {bs}",
            dims[0],
            ty.name()
        ));
    }
    (numel / bs as u64)
        .checked_mul(ts as u64)
        .ok_or_else(|| format!("shape {dims:?} of {} overflows its byte size", ty.name()))
}

/// Each tensor's absolute byte range, checked to start on the file's alignment (so block data
/// is aligned in memory), to lie inside the file and not to overlap another tensor's.
fn tensor_ranges(h: &Header, total: u64, path: &Path) -> Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::with_capacity(h.tensors.len());
    for (name, dims, ty, off) in &h.tensors {
        let bad = |why: String| SourceError::corrupt(path, format!("tensor '{name}': {why}"));
        let bytes = tensor_bytes(dims, *ty).map_err(bad)?;
        if !off.is_multiple_of(h.alignment) {
            return Err(bad(format!(
                "data offset {off} is not a multiple of the file's alignment {}",
                h.alignment
            )));
        }
        let start = h.data_start.checked_add(*off);
        match start.and_then(|s| Some((s, s.checked_add(bytes)?))) {
            Some((s, e)) if e <= total => ranges.push((s, e)),
            _ => {
                return Err(SourceError::corrupt(
                    path,
                    format!(
                        "tensor '{name}' data (offset {off}, {bytes} bytes) lies past the end of the {total}-byte file"
                    ),
                ))
            }
        }
    }
    let mut order: Vec<usize> = (0..ranges.len())
        .filter(|&i| ranges[i].0 < ranges[i].1)
        .collect();
    order.sort_by_key(|&i| ranges[i]);
    if let Some(w) = order.windows(2).find(|w| ranges[w[1]].0 < ranges[w[0]].1) {
        return Err(SourceError::corrupt(
            path,
            format!(
                "tensors '{}' and '{}' overlap in the file",
                h.tensors[w[0]].0, h.tensors[w[1]].0
            ),
        ));
    }
    Ok(ranges)
}

/// The stem `blk.N.ffn_{gate,up,down}_exps` of a stacked expert tensor's GGUF name.
pub fn expert_stem(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".weight")?;
    let kind = stem.strip_prefix("blk.")?.split_once('.')?.1;
    matches!(kind, "ffn_gate_exps" | "ffn_up_exps" | "ffn_down_exps").then_some(stem)
}

/// Expert `j`'s matrix of a stacked tensor (`stem` from [`expert_stem`]). GGUF files stack a
/// block's experts in one 3-D tensor; adaptq reads each expert as a matrix of its own, so
/// every quantizer, bundle entry and kernel treats an expert as a linear layer like any other
/// (and calibration gives each expert its own statistics). The GGUF export stacks them again.
pub fn expert_name(stem: &str, j: usize) -> String {
    format!("{stem}.{j}.weight")
}

/// A memory-mapped GGUF file. Stacked expert tensors are listed one matrix per expert
/// ([`expert_name`]).
pub struct GgufSource {
    path: PathBuf,
    blob: Box<dyn Blob>,
    header: Header,
    infos: Vec<TensorInfo>,
    by_name: NameIndex,
    /// Absolute byte ranges of each tensor, parallel to `infos`.
    ranges: Vec<(u64, u64)>,
    /// Element type of each tensor, parallel to `infos`.
    types: Vec<GgmlType>,
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
        let (header, file_ranges) = read_checked(blob.as_ref())?;
        // Stacks are cut into the experts the metadata declares, so a header cannot multiply
        // its entries beyond that count (itself bounded).
        let declared = header
            .metadata
            .get_str("general.architecture")
            .and_then(|a| header.metadata.get_u64(&format!("{a}.expert_count")))
            .filter(|&n| n as usize <= crate::model::MAX_EXPERTS);
        let mut infos = Vec::with_capacity(header.tensors.len());
        let (mut ranges, mut types) = (Vec::new(), Vec::new());
        for ((name, dims, ty, _), &(s, e)) in header.tensors.iter().zip(&file_ranges) {
            let too_big = || SourceError::corrupt(path, format!("tensor '{name}' is too large"));
            let shape: Vec<usize> = dims
                .iter()
                .rev()
                .map(|&d| usize::try_from(d).map_err(|_| too_big()))
                .collect::<Result<_>>()?;
            let byte_len = usize::try_from(e - s).map_err(|_| too_big())?;
            if let (Some(stem), &[n, rows, cols]) = (expert_stem(name), shape.as_slice()) {
                if declared != Some(n as u64) {
                    return Err(SourceError::corrupt(
                        path,
                        format!(
                            "tensor '{name}' stacks {n} experts, the metadata declares {}",
                            declared.map_or("none (or too many)".into(), |d| d.to_string())
                        ),
                    ));
                }
                // Each expert's matrix is whole rows, so whole blocks: a slice of the bytes.
                if rows == 0 || cols == 0 || cols % ty.block().0 != 0 || byte_len % n != 0 {
                    return Err(SourceError::corrupt(
                        path,
                        format!(
                            "tensor '{name}': [{rows}, {cols}] {} matrices do not split into \
                             {n} experts",
                            ty.name()
                        ),
                    ));
                }
                let per = (byte_len / n) as u64;
                for j in 0..n {
                    infos.push(TensorInfo {
                        name: expert_name(stem, j),
                        shape: vec![rows, cols],
                        dtype: src_dtype(*ty),
                        byte_len: byte_len / n,
                    });
                    ranges.push((s + j as u64 * per, s + (j as u64 + 1) * per));
                    types.push(*ty);
                }
                continue;
            }
            infos.push(TensorInfo {
                name: name.clone(),
                shape,
                dtype: src_dtype(*ty),
                byte_len,
            });
            ranges.push((s, e));
            types.push(*ty);
        }
        let by_name = NameIndex::build(&infos).map_err(|(_, b)| {
            SourceError::corrupt(path, format!("tensor '{}' appears twice", infos[b].name))
        })?;
        let desc = ModelDesc::from_gguf(&header.metadata, &infos, path)?;
        blob.plan(&ranges);
        Ok(GgufSource {
            path: path.to_path_buf(),
            blob,
            header,
            infos,
            by_name,
            ranges,
            types,
            desc,
            dir,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.by_name.get(&self.infos, name, &self.path)
    }
}

/// Dequantizes `numel` GGML-typed values from `bytes` to f32 (candle's block kernels). The
/// length is checked first, and bytes not aligned for the block type are copied to an aligned
/// buffer: candle casts the byte pointer to a block pointer without checking either.
pub fn dequantize(
    ty: GgmlType,
    bytes: &[u8],
    numel: usize,
) -> std::result::Result<Vec<f32>, String> {
    let (bs, ts) = ty.block();
    let want = numel
        .is_multiple_of(bs)
        .then(|| (numel / bs).checked_mul(ts))
        .flatten();
    if want != Some(bytes.len()) {
        return Err(format!(
            "{} bytes cannot hold {numel} {} values",
            bytes.len(),
            ty.name()
        ));
    }
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut out = Vec::with_capacity(numel);
            crate::decode_plain(src_dtype(ty), bytes, &mut out);
            Ok(out)
        }
        GgmlType::Block(b) => {
            let Some(cty) = candle_dtype(b) else {
                return adaptq_quant::ggml::dequantize(b, bytes, numel).map_err(|e| e.to_string());
            };
            // Every candle block type has an alignment of at most 8 (f16 and f32 fields).
            let copy: Vec<u64>;
            let bytes = if bytes.as_ptr().align_offset(8) == 0 {
                bytes
            } else {
                let mut words = vec![0u64; bytes.len().div_ceil(8)];
                bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()]
                    .copy_from_slice(bytes);
                copy = words;
                &bytemuck::cast_slice::<u64, u8>(&copy)[..bytes.len()]
            };
            let dev = candle_core::Device::Cpu;
            let q =
                candle_core::quantized::ggml_file::qtensor_from_ggml(cty, bytes, vec![numel], &dev)
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
        let ty = self.types[i];
        let out = dequantize(ty, &self.blob.read(s, e)?, info.numel())
            .map_err(|why| SourceError::corrupt(&self.path, format!("tensor '{name}': {why}")));
        self.blob.release(s, e);
        out
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
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.find(&self.infos, name).map(|i| &self.infos[i])
    }
}

//! Streaming tensor sources for adaptq.
//!
//! A [`TensorSource`] lists a model's tensors and hands out one tensor at a time as f32, so the
//! quantizer never holds the whole model in memory. Files are memory-mapped: reading a tensor
//! touches only its own pages. Two formats are understood: safetensors (single file or a sharded
//! folder with `model.safetensors.index.json`) and GGUF v2/v3.

pub mod blob;
mod error;
pub mod gguf;
mod hf_config;
pub mod info;
pub mod model;
pub mod safetensors;

pub use blob::Blob;
pub use error::SourceError;
pub use model::{ModelDesc, TensorRole};

use std::borrow::Cow;
use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, SourceError>;

/// Element type of a tensor as stored in the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcDType {
    F32,
    F16,
    BF16,
    /// A GGML block type (Q4_0, Q4_1, …, Q6_K), by its GGML type id.
    Ggml(gguf::GgmlType),
    /// Non-float tensors (e.g. BERT's `position_ids`): carried through untouched.
    I64,
    I32,
    U8,
}

impl SrcDType {
    pub fn name(&self) -> String {
        match self {
            SrcDType::F32 => "F32".into(),
            SrcDType::F16 => "F16".into(),
            SrcDType::BF16 => "BF16".into(),
            SrcDType::Ggml(t) => t.name().into(),
            SrcDType::I64 => "I64".into(),
            SrcDType::I32 => "I32".into(),
            SrcDType::U8 => "U8".into(),
        }
    }

    /// True for element types that decode to real numbers we may quantize.
    pub fn is_float(&self) -> bool {
        !matches!(self, SrcDType::I64 | SrcDType::I32 | SrcDType::U8)
    }
}

/// One tensor of a source, described without reading its data.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape, outermost dimension first (GGUF's reversed `ne` order is undone).
    pub shape: Vec<usize>,
    pub dtype: SrcDType,
    /// Bytes this tensor occupies in the source file.
    pub byte_len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A model file (or folder) that can be read tensor by tensor.
pub trait TensorSource: Send + Sync {
    /// Tensors in the file's own order (stable, so bundles are deterministic).
    fn tensors(&self) -> &[TensorInfo];
    /// Decodes one tensor to f32 (dequantizing GGML blocks). Errors name the tensor.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The stored bytes of a tensor, undecoded.
    fn raw_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>>;
    /// Architecture and hyper-parameters.
    fn desc(&self) -> &ModelDesc;
    /// Format label: "gguf" or "safetensors".
    fn format(&self) -> &'static str;
    /// GGUF metadata (empty for safetensors): the tokenizer lives here for GGUF models.
    fn gguf_metadata(&self) -> Option<&gguf::Metadata> {
        None
    }
    /// Folder holding companion files (tokenizer.json, LICENSE, config.json), if any.
    fn companion_dir(&self) -> Option<&Path>;

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors().iter().find(|t| t.name == name)
    }
}

/// Opens a local model: a `.gguf` file, a `.safetensors` file, or a folder holding either.
pub fn open(path: &Path) -> Result<Box<dyn TensorSource>> {
    if !path.exists() {
        return Err(SourceError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        let st = path.join("model.safetensors");
        let idx = path.join("model.safetensors.index.json");
        if st.exists() || idx.exists() {
            return Ok(Box::new(safetensors::SafetensorsSource::open(path)?));
        }
        let ggufs = list_with_ext(path, "gguf")?;
        return match ggufs.as_slice() {
            [one] => Ok(Box::new(gguf::GgufSource::open(one)?)),
            [] => Err(SourceError::Unrecognized {
                path: path.to_path_buf(),
                why: "folder has no model.safetensors, model.safetensors.index.json or .gguf file"
                    .into(),
            }),
            _ => Err(SourceError::Unrecognized {
                path: path.to_path_buf(),
                why: "folder holds several .gguf files; name the one to use".into(),
            }),
        };
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = blob::open_regular(path)?;
        let n = f.read(&mut magic).map_err(|e| SourceError::io(path, e))?;
        if n < 4 {
            return Err(SourceError::corrupt(
                path,
                "file is shorter than any model header",
            ));
        }
    }
    if &magic == b"GGUF" {
        Ok(Box::new(gguf::GgufSource::open(path)?))
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        Ok(Box::new(safetensors::SafetensorsSource::open(path)?))
    } else if path.extension().is_some_and(|e| e == "gguf") {
        Err(SourceError::corrupt(path, "missing GGUF magic bytes"))
    } else {
        Err(SourceError::Unrecognized {
            path: path.to_path_buf(),
            why: "not a GGUF file (no magic) and not named *.safetensors".into(),
        })
    }
}

fn list_with_ext(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| SourceError::io(dir, e))? {
        let p = e.map_err(|e| SourceError::io(dir, e))?.path();
        if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// `s` with control characters (ESC, CR, NUL, …) and bidirectional-override marks escaped as
/// `\u{..}`. Names and strings read from a model are shown to users in errors and listings;
/// printed raw they could drive the terminal or make text read differently than it is.
pub fn sanitize(s: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Largest dimension a tensor without elements may have. A tensor's bytes bound the dimensions
/// of any non-empty tensor, but not those of an empty one (`[2^60, 0]` is zero bytes), and code
/// downstream sizes per-row buffers from the shape.
pub(crate) const MAX_EMPTY_DIM: u64 = 1 << 16;

/// The element count of `dims`, refused if it overflows or if an empty tensor has a dimension
/// over [`MAX_EMPTY_DIM`]; the message says which.
pub(crate) fn checked_numel(dims: &[u64]) -> std::result::Result<u64, String> {
    let n = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {dims:?} overflows"))?;
    if n == 0 && dims.iter().any(|&d| d > MAX_EMPTY_DIM) {
        return Err(format!(
            "shape {dims:?} holds no elements but has a dimension over {MAX_EMPTY_DIM}"
        ));
    }
    Ok(n)
}

/// Tensor positions sorted by name: lookups by name take O(log n) rather than a scan, so a file
/// with a million tensors cannot make reading each of them quadratic.
pub(crate) struct NameIndex(Vec<usize>);

impl NameIndex {
    /// Fails with the positions of two tensors that share a name.
    pub(crate) fn build(infos: &[TensorInfo]) -> std::result::Result<Self, (usize, usize)> {
        let mut order: Vec<usize> = (0..infos.len()).collect();
        order.sort_by(|&a, &b| infos[a].name.cmp(&infos[b].name).then(a.cmp(&b)));
        if let Some(w) = order
            .windows(2)
            .find(|w| infos[w[0]].name == infos[w[1]].name)
        {
            return Err((w[0], w[1]));
        }
        Ok(NameIndex(order))
    }

    pub(crate) fn find(&self, infos: &[TensorInfo], name: &str) -> Option<usize> {
        self.0
            .binary_search_by(|&i| infos[i].name.as_str().cmp(name))
            .ok()
            .map(|k| self.0[k])
    }

    /// [`NameIndex::find`], or the error a source gives for a tensor it lacks (`path` names
    /// the source).
    pub(crate) fn get(&self, infos: &[TensorInfo], name: &str, path: &Path) -> Result<usize> {
        self.find(infos, name)
            .ok_or_else(|| SourceError::NoSuchTensor {
                path: path.to_path_buf(),
                tensor: name.into(),
            })
    }
}

/// Decodes little-endian f16/bf16/f32 bytes to f32.
pub(crate) fn decode_plain(dtype: SrcDType, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        SrcDType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        SrcDType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        SrcDType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        _ => unreachable!("decode_plain called on {dtype:?}"),
    }
}

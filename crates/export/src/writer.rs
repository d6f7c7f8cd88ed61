//! A streaming GGUF v3 writer.
//!
//! Written here because candle's writer produces v2, needs every tensor in memory at once and
//! does not keep the order it was given. This one takes the list of tensors (name, shape, type,
//! byte length) up front, writes the header with every offset, then accepts each tensor's bytes
//! in order, so only one tensor is ever held.

use adaptq_source::gguf::Value;
use anyhow::{bail, Result};
use std::io::Write;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor as it will appear in the file.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    /// Row-major shape (outermost first), as adaptq and safetensors write it; the file stores
    /// ggml's reverse order (`ne[0]` = row length).
    pub shape: Vec<usize>,
    /// ggml type id (0 = F32, 1 = F16, 2 = Q4_0, …).
    pub ggml_type: u32,
    pub bytes: u64,
}

pub struct GgufWriter<W: Write> {
    w: W,
    plan: Vec<TensorPlan>,
    offsets: Vec<u64>,
    next: usize,
    /// Bytes written since the start of the data section.
    pos: u64,
    alignment: u64,
}

fn put_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(..) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value<W: Write>(w: &mut W, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => put_str(w, s)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Array(a) => {
            w.write_all(&a.element_type().to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            for it in a.iter() {
                put_value(w, &it)?;
            }
        }
    }
    Ok(())
}

fn pad_len(pos: u64, align: u64) -> u64 {
    (align - pos % align) % align
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header: metadata in the given order, then every tensor's info.
    /// `general.alignment` in `metadata` sets the data alignment (default 32).
    pub fn new(mut w: W, metadata: &[(String, Value)], plan: Vec<TensorPlan>) -> Result<Self> {
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            bail!("general.alignment must be a power of two, got {alignment}");
        }
        let mut head = Vec::new();
        head.extend_from_slice(GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k)?;
            head.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut head, v)?;
        }
        let mut offsets = Vec::with_capacity(plan.len());
        let mut off = 0u64;
        for t in &plan {
            if t.shape.is_empty() || t.shape.len() > 4 {
                bail!(
                    "tensor '{}': GGUF holds 1 to 4 dimensions, not {}",
                    t.name,
                    t.shape.len()
                );
            }
            put_str(&mut head, &t.name)?;
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.to_le_bytes());
            head.extend_from_slice(&off.to_le_bytes());
            offsets.push(off);
            off += t.bytes + pad_len(t.bytes, alignment);
        }
        let pad = pad_len(head.len() as u64, alignment) as usize;
        head.resize(head.len() + pad, 0);
        w.write_all(&head)?;
        Ok(GgufWriter {
            w,
            plan,
            offsets,
            next: 0,
            pos: 0,
            alignment,
        })
    }

    /// Writes the next tensor's bytes; names and sizes must follow the plan.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.plan.get(self.next) else {
            bail!(
                "tensor '{name}' is not in the GGUF plan (all {} written)",
                self.plan.len()
            );
        };
        if t.name != name {
            bail!(
                "GGUF tensors out of order: expected '{}', got '{name}'",
                t.name
            );
        }
        if t.bytes != bytes.len() as u64 {
            bail!(
                "tensor '{name}': planned {} bytes, got {}",
                t.bytes,
                bytes.len()
            );
        }
        debug_assert_eq!(self.pos, self.offsets[self.next]);
        self.w.write_all(bytes)?;
        let pad = pad_len(bytes.len() as u64, self.alignment);
        self.w.write_all(&vec![0u8; pad as usize])?;
        self.pos += bytes.len() as u64 + pad;
        self.next += 1;
        Ok(())
    }

    /// Checks every planned tensor was written and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        if self.next != self.plan.len() {
            bail!(
                "GGUF incomplete: {} of {} tensors written (next: '{}')",
                self.next,
                self.plan.len(),
                self.plan[self.next].name
            );
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptq_source::gguf::{parse_header, Array};
    use std::path::Path;

    #[test]
    fn header_round_trips_through_our_reader() {
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("x.u32".to_string(), Value::U32(7)),
            ("x.f32".to_string(), Value::F32(1.5)),
            ("x.bool".to_string(), Value::Bool(true)),
            (
                "x.arr".to_string(),
                Value::Array(Array::String(["a", "bc"].into_iter().collect())),
            ),
            ("x.i64".to_string(), Value::I64(-3)),
        ];
        let plan = vec![
            TensorPlan {
                name: "a".into(),
                shape: vec![2, 3],
                ggml_type: 0,
                bytes: 24,
            },
            TensorPlan {
                name: "b".into(),
                shape: vec![1, 32],
                ggml_type: 2,
                bytes: 18,
            },
        ];
        let mut w = GgufWriter::new(Vec::new(), &md, plan).unwrap();
        w.write_tensor("a", &[1u8; 24]).unwrap();
        w.write_tensor("b", &[2u8; 18]).unwrap();
        let buf = w.finish().unwrap();
        let h = parse_header(&buf, Path::new("mem.gguf")).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata.entries, md);
        assert_eq!(h.tensors[0].0, "a");
        assert_eq!(h.tensors[0].1, vec![3, 2]);
        assert_eq!(h.tensors[1].3 % 32, 0);
        let s = (h.data_start + h.tensors[1].3) as usize;
        assert_eq!(&buf[s..s + 18], &[2u8; 18]);
        assert_eq!(h.data_start % 32, 0);
    }

    #[test]
    fn out_of_plan_writes_are_refused() {
        let plan = vec![TensorPlan {
            name: "a".into(),
            shape: vec![4],
            ggml_type: 0,
            bytes: 16,
        }];
        let mut w = GgufWriter::new(Vec::new(), &[], plan.clone()).unwrap();
        assert!(w.write_tensor("b", &[0; 16]).is_err());
        assert!(w.write_tensor("a", &[0; 12]).is_err());
        let w = GgufWriter::new(Vec::new(), &[], plan).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("incomplete"));
    }
}

//! Hand-made GGUF files for the readers' tests: [`Writer`] writes the format field by field
//! and records where its integer fields are (so mutations can aim at counts, lengths, types
//! and offsets); [`Builder`] keeps the metadata and tensor table apart and fills in their
//! counts, for crafted files that differ in one entry.

/// The hyper-parameters of the hand-made one-layer llama (hidden size 8, 2 heads).
pub const LLAMA_HPARAMS: [(&str, u32); 5] = [
    ("block_count", 1),
    ("embedding_length", 8),
    ("attention.head_count", 2),
    ("feed_forward_length", 16),
    ("context_length", 64),
];

/// Metadata value type ids.
pub const U32: u32 = 4;
pub const STRING: u32 = 8;
pub const ARRAY: u32 = 9;

/// A little-endian writer that records (offset, width) of every integer field it writes.
#[derive(Default, Clone)]
pub struct Writer {
    pub b: Vec<u8>,
    pub fields: Vec<(usize, usize)>,
}

impl Writer {
    /// The magic, then `version` and the tensor and key-value counts.
    pub fn header(version: u32, tensors: u64, kvs: u64) -> Self {
        let mut g = Writer::default();
        g.b.extend(b"GGUF");
        g.u32(version).u64(tensors).u64(kvs);
        g
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.fields.push((self.b.len(), 4));
        self.b.extend(v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.fields.push((self.b.len(), 8));
        self.b.extend(v.to_le_bytes());
        self
    }
    /// Bytes that are not an integer field.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.b.extend(v);
        self
    }
    /// A GGUF string: u64 length, then the bytes.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    pub fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(U32).u32(v)
    }
    pub fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(STRING).str(v)
    }
    /// `general.architecture` = `arch`, then each `<arch>.<key>` = value (u32).
    pub fn kv_model(&mut self, arch: &str, hparams: &[(&str, u32)]) -> &mut Self {
        self.kv_str("general.architecture", arch);
        for &(k, v) in hparams {
            self.kv_u32(&format!("{arch}.{k}"), v);
        }
        self
    }
    /// An array of `n` items of type `ty`, each written by `item`.
    pub fn kv_arr(&mut self, k: &str, ty: u32, n: u64, item: impl Fn(&mut Self, u64)) -> &mut Self {
        self.str(k).u32(ARRAY).u32(ty).u64(n);
        for i in 0..n {
            item(self, i);
        }
        self
    }
    /// A tensor-table entry: name, dimensions (innermost first), type id, data offset.
    pub fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, off: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(off)
    }
    /// Zero padding up to a multiple of `a`.
    pub fn align(&mut self, a: usize) -> &mut Self {
        while !self.b.len().is_multiple_of(a) {
            self.b.push(0);
        }
        self
    }
}

/// The header and tensor table of the hand-made llama, padded to its data: one F32 norm
/// `blk.0.attn_norm.weight` [8] at offset 0 and one Q8_0 matrix `blk.0.attn_q.weight`
/// [2 x 32] at 32; the caller appends their 32 + 2 x 34 bytes.
pub fn tiny_llama() -> Writer {
    let mut g = Writer::header(3, 2, 7);
    g.kv_model("llama", &LLAMA_HPARAMS)
        .kv_str("general.name", "tiny");
    g.tensor("blk.0.attn_norm.weight", &[8], 0, 0)
        .tensor("blk.0.attn_q.weight", &[32, 2], 8, 32)
        .align(32);
    g
}

/// A GGUF v3 built from its metadata and tensor table, whose counts it fills in.
#[derive(Clone)]
pub struct Builder {
    kv: Writer,
    n_kv: u64,
    infos: Writer,
    n_tensors: u64,
    align: usize,
    data: Vec<u8>,
}

impl Builder {
    pub fn empty() -> Self {
        Builder {
            kv: Writer::default(),
            n_kv: 0,
            infos: Writer::default(),
            n_tensors: 0,
            align: 32,
            data: Vec::new(),
        }
    }
    /// The metadata a llama model needs to open ([`LLAMA_HPARAMS`]).
    pub fn llama() -> Self {
        let mut g = Self::empty().kv_str("general.architecture", "llama");
        for (k, v) in LLAMA_HPARAMS {
            g = g.kv_u32(&format!("llama.{k}"), v);
        }
        g
    }
    /// A metadata entry of type `ty` whose value is `value`, as bytes.
    pub fn kv_raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        self.kv.str(key).u32(ty).raw(value);
        self.n_kv += 1;
        self
    }
    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key, U32, &v.to_le_bytes())
    }
    pub fn kv_str(self, key: &str, v: &str) -> Self {
        let mut b = Writer::default();
        b.str(v);
        self.kv_raw(key, STRING, &b.b)
    }
    /// `general.alignment` = `a`, which the data section then follows.
    pub fn alignment(mut self, a: u32) -> Self {
        self.align = a as usize;
        self.kv_u32("general.alignment", a)
    }
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        self.infos.tensor(name, dims, ty, offset);
        self.n_tensors += 1;
        self
    }
    pub fn data(mut self, d: &[u8]) -> Self {
        self.data.extend(d);
        self
    }
    pub fn build(&self) -> Vec<u8> {
        let mut h = Writer::header(3, self.n_tensors, self.n_kv);
        h.raw(&self.kv.b).raw(&self.infos.b).align(self.align);
        h.b.extend(&self.data);
        h.b
    }
}

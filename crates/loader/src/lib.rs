//! Loads an adaptq bundle where there is no file system: a WebAssembly canister receives
//! `manifest.json` and then the ≤ 2 MiB shards as messages, in any order and in pieces.
//!
//! `no_std` + `alloc`, no I/O. [`Loader::new`] checks the manifest against its own digest, the
//! global digest against its shard list and its layout with [`check_manifest`], the check the
//! host reader and `verify` run too; [`Loader::feed`] appends bytes to a shard and, once
//! the shard is whole, checks its SHA-256 and BLAKE3 (a bad shard is dropped and reported, so it
//! can be sent again); tensors are handed out only when every shard they touch is verified,
//! dequantized to f32 ([`Loader::tensor_f32`]) or as their stored parts ([`Loader::tensor_packed`]).
//!
//! This crate is the bundle format's one definition, which the host-side crates re-use: the
//! manifest schema ([`manifest`]) and its checks ([`layout`]), the GGML type table ([`ggml`]),
//! digests, the bit-packing of codes ([`pack`]), codebook ([`codebook`]) and rANS ([`rans`])
//! decoding.

#![no_std]

extern crate alloc;

pub mod codebook;
pub mod ggml;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod pack;
pub mod rans;

pub use ggml::{BlockType, GgmlType};
pub use layout::{check_layout, check_manifest, expected_parts, manifest_problems, Layout};
pub use manifest::{Encoding, Grid, Manifest, TensorEntry};

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use layout::groups_per_row;
use manifest::ShardInfo;
use sha2::Digest;

/// The largest shard a bundle may hold.
pub const MAX_SHARD_BYTES: u64 = 2 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// manifest.json is not a bundle manifest, or contradicts itself.
    Manifest(String),
    /// A shard's bytes do not match its recorded size or hashes.
    Shard(String),
    /// A tensor was asked for before all its shards were verified.
    Missing(String),
    /// The tensor is not known, or cannot be given in the form asked.
    Tensor(String),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::Manifest(s) => write!(f, "manifest: {s}"),
            LoadError::Shard(s) => write!(f, "shard: {s}"),
            LoadError::Missing(s) => write!(f, "missing: {s}"),
            LoadError::Tensor(s) => write!(f, "tensor: {s}"),
        }
    }
}

pub type Result<T> = core::result::Result<T, LoadError>;

/// A tensor as stored: its encoding and named parts (codes, scales, mins, blocks or data).
#[derive(Debug, Clone)]
pub struct PackedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    pub parts: Vec<(String, Vec<u8>)>,
}

/// What [`Loader::feed`] did with a piece of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// Stored; the shard still lacks this many bytes.
    Partial(u64),
    /// The shard is complete and its hashes match.
    Verified,
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// SHA-256 of `data` as 64 lower-case hex digits, as the manifest records it.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha2::Sha256::digest(data))
}

/// BLAKE3 of `data` as 64 lower-case hex digits, as the manifest records it.
pub fn blake3_hex(data: &[u8]) -> String {
    hex(blake3::hash(data).as_bytes())
}

/// The bundle's global digest: SHA-256 over the ordered shard list, one line per shard of
/// (file name, size, SHA-256, BLAKE3). The bundle writer and `verify` use this same function.
pub fn shard_list_digest<'a>(
    shards: impl IntoIterator<Item = (&'a str, u64, &'a str, &'a str)>,
) -> String {
    let mut h = sha2::Sha256::new();
    for (file, bytes, sha, b3) in shards {
        h.update(format!("{file} {bytes} {sha} {b3}\n").as_bytes());
    }
    hex(&h.finalize())
}

/// [`shard_list_digest`] over a manifest's shard list: what its `global_digest` must be.
pub fn global_digest(shards: &[ShardInfo]) -> String {
    shard_list_digest(shards.iter().map(|s| {
        (
            s.file.as_str(),
            s.bytes,
            s.sha256.as_str(),
            s.blake3.as_str(),
        )
    }))
}

/// SHA-256 of the manifest text with its own `manifest_digest` value blanked to zeros, so any
/// edit of the manifest, whitespace included, is detected.
pub fn manifest_digest(text: &str) -> Option<String> {
    let key = "\"manifest_digest\": \"";
    let start = text.find(key)? + key.len();
    let end = start + text[start..].find('"')?;
    let mut blanked = String::with_capacity(text.len());
    blanked.push_str(&text[..start]);
    blanked.push_str(&"0".repeat(64));
    blanked.push_str(&text[end..]);
    Some(sha256_hex(blanked.as_bytes()))
}

pub struct Loader {
    layout: Layout,
    /// Bytes received per shard; `verified[i]` once its hashes matched.
    data: Vec<Vec<u8>>,
    verified: Vec<bool>,
}

impl Loader {
    /// Parses and checks `manifest.json` with [`check_manifest`]: its own digest, the global
    /// digest over the shard list, and the layout every reader checks.
    pub fn new(manifest_json: &[u8]) -> Result<Self> {
        let layout = check_manifest(manifest_json)?;
        let n = layout.manifest().shards.len();
        Ok(Loader {
            layout,
            data: vec![Vec::new(); n],
            verified: vec![false; n],
        })
    }

    fn shards(&self) -> &[ShardInfo] {
        &self.layout.manifest().shards
    }

    /// Shard `name`'s index. The layout check has tied every shard's name to its place
    /// (`shard-{i:05}.bin`), so this is a parse, not a search.
    fn shard_index(&self, name: &str) -> Result<usize> {
        name.strip_prefix("shard-")
            .and_then(|r| r.strip_suffix(".bin"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| self.shards().get(i).is_some_and(|s| s.file == name))
            .ok_or_else(|| LoadError::Shard(format!("'{name}' is not a shard of this bundle")))
    }

    /// Appends the next piece of shard `name` (pieces of one shard arrive in order; shards in
    /// any order). When the shard is complete its SHA-256 and BLAKE3 are checked; on mismatch
    /// its bytes are dropped so it can be sent again.
    pub fn feed(&mut self, name: &str, piece: &[u8]) -> Result<Fed> {
        let i = self.shard_index(name)?;
        if self.verified[i] {
            return Err(LoadError::Shard(format!(
                "{name} was already received and verified"
            )));
        }
        let want = self.shards()[i].bytes;
        let have = self.data[i].len() as u64;
        if (piece.len() as u64).saturating_add(have) > want {
            self.data[i].clear();
            return Err(LoadError::Shard(format!(
                "{name} is longer than its recorded {want} bytes"
            )));
        }
        self.data[i].extend_from_slice(piece);
        let have = self.data[i].len() as u64;
        if have < want {
            return Ok(Fed::Partial(want - have));
        }
        let s = &self.shards()[i];
        let sha = sha256_hex(&self.data[i]);
        let b3 = blake3_hex(&self.data[i]);
        if sha != s.sha256 || b3 != s.blake3 {
            self.data[i] = Vec::new();
            return Err(LoadError::Shard(format!(
                "{name} does not match its recorded SHA-256/BLAKE3 (corrupt)"
            )));
        }
        self.verified[i] = true;
        Ok(Fed::Verified)
    }

    /// Shards not yet received and verified, by file name.
    pub fn missing(&self) -> Vec<&str> {
        self.shards()
            .iter()
            .zip(&self.verified)
            .filter(|(_, v)| !**v)
            .map(|(s, _)| s.file.as_str())
            .collect()
    }

    pub fn is_complete(&self) -> bool {
        self.verified.iter().all(|v| *v)
    }

    /// Tensor names in bundle order.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.layout
            .manifest()
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.layout
            .tensor_index(name)
            .and_then(|i| self.layout.manifest().tensors.get(i))
            .ok_or_else(|| LoadError::Tensor(format!("no tensor '{name}'")))
    }

    /// A tensor's parts (losslessly coded ones decoded), once every shard it lies in is verified.
    /// Refused with [`LoadError::Tensor`] when its shape or decoded parts do not fit this
    /// platform's address space (the manifest's sizes are checked in `u64`).
    pub fn tensor_packed(&self, name: &str) -> Result<PackedTensor> {
        let t = self.entry(name)?;
        let too_big =
            || LoadError::Tensor(format!("'{name}' is too large to decode on this platform"));
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| too_big()))
            .collect::<Result<Vec<usize>>>()?;
        let raw_lens = t
            .parts
            .iter()
            .map(|p| fits_alloc(p.raw_length(), 1).ok_or_else(too_big))
            .collect::<Result<Vec<usize>>>()?;
        // The stored bytes are all in memory already (the segments tile the shards), so their
        // sum fits; the decoded ones may not, and are asked for fallibly.
        let mut payload = Vec::new();
        for s in &t.segments {
            if !self.verified[s.shard] {
                return Err(LoadError::Missing(format!(
                    "tensor '{name}' needs {}, not yet verified",
                    self.shards()[s.shard].file
                )));
            }
            let d = &self.data[s.shard];
            payload.extend_from_slice(&d[s.offset as usize..(s.offset + s.length) as usize]);
        }
        let mut parts = Vec::with_capacity(t.parts.len());
        let mut pos = 0usize;
        for (p, &raw_len) in t.parts.iter().zip(&raw_lens) {
            let end = pos + p.length as usize;
            let bytes = &payload[pos..end];
            let raw = match &p.lossless {
                None => bytes.to_vec(),
                Some(_) => {
                    // Reserve first, so a decoded size the platform cannot hold is refused
                    // rather than aborting inside the decoder.
                    let mut probe: Vec<u8> = Vec::new();
                    probe.try_reserve_exact(raw_len).map_err(|_| too_big())?;
                    drop(probe);
                    rans::decode(bytes, raw_len).ok_or_else(|| {
                        LoadError::Tensor(format!("'{name}': part '{}' does not decode", p.name))
                    })?
                }
            };
            parts.push((p.name.clone(), raw));
            pos = end;
        }
        Ok(PackedTensor {
            name: t.name.clone(),
            shape,
            encoding: t.encoding.clone(),
            parts,
        })
    }

    /// A tensor dequantized to f32 (integer grids, f16, f32). GGML blocks are given packed only.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let p = self.tensor_packed(name)?;
        let part = |n: &str| {
            p.parts
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, b)| b.as_slice())
                .unwrap_or(&[])
        };
        let f16s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        // The f32 output is what is sized from the shape: it must fit one allocation.
        let numel = || {
            p.shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                .and_then(|n| fits_alloc(n, 4))
                .ok_or_else(|| {
                    LoadError::Tensor(format!(
                        "'{name}': {:?} f32 values do not fit this platform's address space",
                        p.shape
                    ))
                })
        };
        let reserve = |n: usize| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| {
                LoadError::Tensor(format!("'{name}': no memory for {n} f32 values"))
            })?;
            Ok(v)
        };
        match &p.encoding {
            Encoding::F16 => {
                let mut out = reserve(numel()?)?;
                out.extend(
                    part("data")
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                );
                Ok(out)
            }
            Encoding::F32 => {
                let mut out = reserve(numel()?)?;
                out.extend(
                    part("data")
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                Ok(out)
            }
            Encoding::Int {
                bits,
                group_size,
                grid,
            } => {
                let cols = *p.shape.last().unwrap_or(&1);
                let gs = if *group_size == 0 || *group_size >= cols {
                    cols
                } else {
                    *group_size
                };
                let gpr = groups_per_row(cols, gs);
                let numel = numel()?;
                let mut out = reserve(numel)?;
                let codes = pack::unpack(part("codes"), *bits, numel);
                let scales = f16s(part("scales"));
                let mins = f16s(part("mins"));
                let half = (1u32 << (bits - 1)) as f32;
                for (i, &c) in codes.iter().enumerate() {
                    let g = (i / cols) * gpr + (i % cols) / gs;
                    out.push(match grid {
                        Grid::Symmetric => scales[g] * (c as f32 - half),
                        Grid::Asymmetric => scales[g] * c as f32 + mins[g],
                    });
                }
                Ok(out)
            }
            Encoding::Codebook { dim, stage_bits } => {
                let cols = *p.shape.last().unwrap_or(&1);
                let bad = || LoadError::Tensor(format!("'{name}': codebook parts do not fit"));
                if !codebook::valid_layout(*dim, stage_bits) {
                    return Err(bad());
                }
                let books: Vec<Vec<f32>> = (0..stage_bits.len())
                    .map(|s| f16s(part(&format!("codebook{s}"))))
                    .collect();
                let stages: Vec<codebook::StageRef> = stage_bits
                    .iter()
                    .enumerate()
                    .map(|(s, &bits)| codebook::StageRef {
                        bits,
                        centroids: &books[s],
                        codes: part(&format!("codes{s}")),
                    })
                    .collect();
                codebook::decode(
                    numel()? / cols.max(1),
                    cols,
                    *dim,
                    &stages,
                    &f16s(part("row_scale")),
                    &f16s(part("row_mean")),
                    &f16s(part("col_scale")),
                )
                .ok_or_else(bad)
            }
            Encoding::Ggml { ggml_type } => Err(LoadError::Tensor(format!(
                "'{name}' holds GGML {ggml_type} blocks; take them with tensor_packed"
            ))),
            Encoding::Raw { dtype, .. } => Err(LoadError::Tensor(format!(
                "'{name}' holds raw {dtype} data; take it with tensor_packed"
            ))),
        }
    }
}

/// `n` items of `size` bytes as a `usize` count, when their bytes fit one allocation
/// (at most `isize::MAX`) on this platform.
fn fits_alloc(n: u64, size: u64) -> Option<usize> {
    let bytes = n.checked_mul(size)?;
    (bytes <= isize::MAX as u64).then_some(())?;
    usize::try_from(n).ok()
}

impl core::fmt::Debug for Loader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Loader")
            .field("tensors", &self.layout.manifest().tensors.len())
            .field("shards", &self.shards().len())
            .field("verified", &self.verified.iter().filter(|v| **v).count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::fits_alloc;

    #[test]
    fn allocation_bounds_are_asked_at_decode_time() {
        assert_eq!(fits_alloc(10, 4), Some(10));
        assert_eq!(fits_alloc(u64::MAX, 1), None);
        assert_eq!(fits_alloc(u64::MAX / 2, 4), None);
        assert_eq!(
            fits_alloc(isize::MAX as u64 / 4, 4),
            Some(isize::MAX as usize / 4)
        );
        assert_eq!(fits_alloc(isize::MAX as u64 / 4 + 1, 4), None);
        // Qwen2-7B's embedding as f32: fits a 64-bit address space, not a 32-bit one.
        let qwen = 152064u64 * 3584;
        assert_eq!(fits_alloc(qwen, 4).is_some(), usize::BITS == 64);
    }
}

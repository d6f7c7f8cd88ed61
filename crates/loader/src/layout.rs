//! The one check of a bundle manifest that every reader runs: this crate's [`crate::Loader`],
//! the host reader (`adaptq_bundle::Bundle::open`) and `adaptq verify`. Sharing it means no
//! reader uses a manifest that `verify` refuses, and `verify` refuses every manifest some
//! reader could not decode.
//!
//! All arithmetic on manifest numbers is checked, and every size a reader allocates from the
//! manifest is bounded by stored bytes that back it: segments tile the ≤ 2 MiB shards exactly,
//! a losslessly coded part expands at most [`rans::MAX_EXPANSION`] times, and a tensor holds at
//! most [`MAX_VALUES_PER_BYTE`] values per stored byte; side files hold at most
//! [`MAX_SIDE_FILE_BYTES`]. File names are accepted only as plain names inside the bundle folder.
//!
//! The arithmetic is done in `u64` on every platform, so a 32-bit loader (wasm32) accepts
//! exactly the manifests a 64-bit `verify` accepts; whether a tensor fits the address space is
//! asked only when it is decoded ([`crate::Loader::tensor_f32`], [`crate::Loader::tensor_packed`]).

use crate::manifest::{Encoding, Grid, Manifest, TensorEntry};
use crate::{codebook, names, rans, LoadError, Result, MAX_SHARD_BYTES};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// The manifest schema this crate reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Longest `manifest.json` accepted (a 400B-parameter bundle's index is some tens of MiB).
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Most values a tensor may hold per byte it stores (1/32 bit per value). Every encoding
/// adaptq writes stays far below it; it caps what a reader allocates to decode a tensor.
pub const MAX_VALUES_PER_BYTE: usize = 256;
/// Most values one tensor may hold: 2^40 (a trillion), far above any real tensor (Qwen2-7B's
/// embedding holds 2^29), and small enough that every part size derived from it (≤ 4 bytes a
/// value, ≤ 2^16 centroids) stays far from `u64` overflow. Platform-independent on purpose:
/// the address space of the reader is not the manifest's business.
pub const MAX_NUMEL: u64 = 1 << 40;
/// Largest side file (model.meta, verification.json, LICENSE) a manifest may list. They are
/// small text files (a LICENSE is some KiB, verification.json some MiB for a 400B model), and
/// readers hold one whole in memory, so the manifest may not make them read without bound:
/// a sparse 8 TiB LICENSE must be refused from its recorded size, never read.
pub const MAX_SIDE_FILE_BYTES: u64 = 256 << 20;
/// Problems collected before the rest are only counted.
const MAX_PROBLEMS: usize = 100;

/// A manifest that passed [`check_layout`]: every tensor holds at most [`MAX_NUMEL`] values,
/// every segment lies inside its shard and every part has the length its shape and encoding
/// need. Tensor names are unique, so [`Layout::tensor_index`] finds each in O(log n).
#[derive(Debug, Clone)]
pub struct Layout {
    manifest: Manifest,
    /// Tensor name -> index in `manifest.tensors`, built once.
    index: BTreeMap<String, usize>,
}

impl Layout {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The index of tensor `name` in the manifest's tensor list.
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The manifest and its tensor index (name -> place in `manifest.tensors`).
    pub fn into_parts(self) -> (Manifest, BTreeMap<String, usize>) {
        (self.manifest, self.index)
    }
}

/// Values of a tensor of `shape`; `None` when the product overflows or exceeds [`MAX_NUMEL`]
/// (the same answer on every platform).
pub fn numel(shape: &[u64]) -> Option<u64> {
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    (n <= MAX_NUMEL).then_some(n)
}

pub(crate) fn groups_per_row(cols: usize, gs: usize) -> usize {
    if gs == 0 || gs >= cols {
        1
    } else {
        cols.div_ceil(gs)
    }
}

fn groups_per_row_u64(cols: u64, gs: usize) -> u64 {
    let gs = gs as u64;
    if gs == 0 || gs >= cols {
        1
    } else {
        cols.div_ceil(gs)
    }
}

/// (part name, bytes) in stored order.
pub type PartSizes = Vec<(&'static str, u64)>;

/// Why `enc` cannot describe a tensor whose rows are `cols` values long, if it cannot.
fn encoding_problem(enc: &Encoding, cols: u64) -> Option<String> {
    match enc {
        Encoding::Int { bits, .. } => {
            if !(2..=8).contains(bits) {
                return Some(format!("{bits}-bit codes (adaptq stores 2..=8)"));
            }
        }
        Encoding::Ggml { ggml_type } => {
            let bl = ggml_type.block_len() as u64;
            if cols == 0 || !cols.is_multiple_of(bl) {
                return Some(format!(
                    "rows of {cols} values do not fit {ggml_type} blocks of {bl}"
                ));
            }
        }
        Encoding::Codebook { dim, stage_bits } => {
            if !codebook::valid_layout(*dim, stage_bits) {
                return Some(format!(
                    "codebook dim {dim} with stage widths {stage_bits:?} (dim ≥ 1, 1..=4 stages \
                     of 1..=16 bits)"
                ));
            }
        }
        Encoding::F16 | Encoding::F32 | Encoding::Raw { .. } => {}
    }
    None
}

/// (part, decoded bytes) a tensor of `shape` must have in `enc`, in stored order; `None` when
/// the encoding's parameters are out of range, the shape holds more than [`MAX_NUMEL`] values
/// or a size overflows. Computed in `u64`, the same on every platform.
pub fn expected_parts(enc: &Encoding, shape: &[u64]) -> Option<PartSizes> {
    let numel = numel(shape)?;
    let cols = *shape.last().unwrap_or(&1);
    let rows = numel.checked_div(cols).unwrap_or(0);
    if encoding_problem(enc, cols).is_some() {
        return None;
    }
    Some(match enc {
        Encoding::Int {
            bits,
            group_size,
            grid,
        } => {
            let groups = rows.checked_mul(groups_per_row_u64(cols, *group_size))?;
            let mut v = vec![
                ("codes", numel.checked_mul(*bits as u64)?.div_ceil(8)),
                ("scales", groups.checked_mul(2)?),
            ];
            if *grid == Grid::Asymmetric {
                v.push(("mins", groups.checked_mul(2)?));
            }
            v
        }
        Encoding::Ggml { ggml_type } => vec![("blocks", ggml_type.bytes_for_u64(numel)?)],
        Encoding::Codebook { dim, stage_bits } => codebook::parts(rows, cols, *dim, stage_bits)?,
        Encoding::F16 => vec![("data", numel.checked_mul(2)?)],
        Encoding::F32 => vec![("data", numel.checked_mul(4)?)],
        Encoding::Raw { byte_len, .. } => vec![("data", *byte_len as u64)],
    })
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Problems found so far; past [`MAX_PROBLEMS`] they are only counted.
#[derive(Default)]
struct Problems {
    list: Vec<LoadError>,
    more: usize,
}

impl Problems {
    fn push(&mut self, msg: String) {
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(LoadError::Manifest(msg));
        } else {
            self.more += 1;
        }
    }

    fn into_vec(mut self) -> Vec<LoadError> {
        if self.more > 0 {
            self.list.push(LoadError::Manifest(format!(
                "and {} more problems",
                self.more
            )));
        }
        self.list
    }
}

fn parse(manifest_json: &[u8]) -> Result<(&str, Manifest)> {
    if manifest_json.len() > MAX_MANIFEST_BYTES {
        return Err(LoadError::Manifest(format!(
            "{} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
            manifest_json.len()
        )));
    }
    let text =
        core::str::from_utf8(manifest_json).map_err(|_| LoadError::Manifest("not UTF-8".into()))?;
    let m = serde_json::from_str(text)
        .map_err(|e| LoadError::Manifest(format!("not a bundle manifest: {e}")))?;
    Ok((text, m))
}

fn digest_problems(text: &str, m: &Manifest, p: &mut Problems) {
    match crate::manifest_digest(text) {
        Some(d) if d == m.manifest_digest => {}
        Some(d) => p.push(format!(
            "manifest.json was edited: its digest is {d}, recorded {}",
            m.manifest_digest
        )),
        None => p.push("manifest.json has no manifest_digest".into()),
    }
    let g = crate::global_digest(&m.shards);
    if g != m.global_digest {
        p.push(format!(
            "global digest {} does not match the shard list ({g}): shards reordered or edited",
            m.global_digest
        ));
    }
}

fn layout_problems(m: &Manifest, p: &mut Problems) {
    if m.schema_version != SCHEMA_VERSION {
        p.push(format!(
            "schema version {} (this adaptq reads {SCHEMA_VERSION})",
            m.schema_version
        ));
    }
    if !(1..=MAX_SHARD_BYTES).contains(&m.shard_max_bytes) {
        p.push(format!(
            "shard_max_bytes {} is outside 1..={MAX_SHARD_BYTES}",
            m.shard_max_bytes
        ));
    }
    for (i, s) in m.shards.iter().enumerate() {
        let want = format!("shard-{i:05}.bin");
        if s.file != want || !names::is_plain_relative(&s.file, false) {
            p.push(format!(
                "shard #{i} is named {:?}, expected '{want}'",
                s.file
            ));
        }
        if s.bytes > m.shard_max_bytes.min(MAX_SHARD_BYTES) {
            p.push(format!(
                "shard #{i} records {} bytes, over the {}-byte shard limit",
                s.bytes, m.shard_max_bytes
            ));
        }
        if !is_hex64(&s.sha256) || !is_hex64(&s.blake3) {
            p.push(format!("shard #{i}: its digests are not 64 hex digits"));
        }
    }
    let mut seen = BTreeSet::new();
    for f in &m.files {
        if !names::is_plain_relative(&f.file, false)
            || f.file == "manifest.json"
            || f.file.starts_with("shard-")
        {
            p.push(format!(
                "side file {:?} is not a plain file name inside the bundle (or is reserved)",
                f.file
            ));
        }
        if !seen.insert(f.file.as_str()) {
            p.push(format!("side file {:?} is listed twice", f.file));
        }
        if f.bytes > MAX_SIDE_FILE_BYTES {
            p.push(format!(
                "side file {:?} records {} bytes, over the {MAX_SIDE_FILE_BYTES}-byte limit",
                f.file, f.bytes
            ));
        }
        if !is_hex64(&f.sha256) {
            p.push(format!(
                "side file {:?}: its SHA-256 is not 64 hex digits",
                f.file
            ));
        }
    }
    if !is_hex64(&m.global_digest) || !is_hex64(&m.manifest_digest) {
        p.push("global_digest or manifest_digest is not 64 hex digits".into());
    }

    // (offset, length, tensor) of every segment that lies inside its shard, per shard.
    let mut per_shard: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); m.shards.len()];
    let mut names = BTreeSet::new();
    for (ti, t) in m.tensors.iter().enumerate() {
        if !names.insert(t.name.as_str()) {
            p.push(format!("tensor '{}' is listed twice", t.name));
        }
        tensor_problems(t, p);
        let mut seg_total = Some(0u64);
        for s in &t.segments {
            seg_total = seg_total.and_then(|a| a.checked_add(s.length));
            let Some(sh) = m.shards.get(s.shard) else {
                p.push(format!(
                    "tensor '{}': segment names shard #{}, which does not exist",
                    t.name, s.shard
                ));
                continue;
            };
            if s.length == 0 {
                p.push(format!("tensor '{}': empty segment in {}", t.name, sh.file));
            } else if s
                .offset
                .checked_add(s.length)
                .is_some_and(|e| e <= sh.bytes)
            {
                per_shard[s.shard].push((s.offset, s.length, ti));
            } else {
                p.push(format!(
                    "tensor '{}': segment {}+{} points outside {} ({} bytes)",
                    t.name, s.offset, s.length, sh.file, sh.bytes
                ));
            }
        }
        let part_total = t
            .parts
            .iter()
            .try_fold(0u64, |a, x| a.checked_add(x.length));
        match (part_total, seg_total) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => p.push(format!(
                "tensor '{}': segments cover {b} bytes, parts need {a}",
                t.name
            )),
            _ => p.push(format!(
                "tensor '{}': part or segment lengths overflow",
                t.name
            )),
        }
    }
    // Segments tile every shard exactly: no byte unclaimed or claimed twice, so the tensors
    // together never store more than the shards hold.
    for (si, segs) in per_shard.iter_mut().enumerate() {
        segs.sort_unstable();
        let mut pos = 0u64;
        for &(off, len, ti) in segs.iter() {
            if off != pos {
                p.push(format!(
                    "{}: bytes {}..{} are {} (index coverage broken near tensor '{}')",
                    m.shards[si].file,
                    pos.min(off),
                    pos.max(off),
                    if off > pos {
                        "claimed by no tensor"
                    } else {
                        "claimed twice"
                    },
                    m.tensors[ti].name
                ));
            }
            // In bounds: offset + length was checked against the shard's size above.
            pos = pos.max(off + len);
        }
        if pos != m.shards[si].bytes {
            p.push(format!(
                "{}: bytes {pos}..{} are claimed by no tensor",
                m.shards[si].file, m.shards[si].bytes
            ));
        }
    }
}

/// A tensor's shape, encoding and parts against each other.
fn tensor_problems(t: &TensorEntry, p: &mut Problems) {
    let Some(n) = numel(&t.shape) else {
        p.push(format!(
            "tensor '{}': shape {:?} holds too many values",
            t.name, t.shape
        ));
        return;
    };
    let cols = *t.shape.last().unwrap_or(&1);
    if let Some(why) = encoding_problem(&t.encoding, cols) {
        p.push(format!("tensor '{}': {why}", t.name));
        return;
    }
    let Some(expected) = expected_parts(&t.encoding, &t.shape) else {
        p.push(format!(
            "tensor '{}': part sizes of shape {:?} overflow",
            t.name, t.shape
        ));
        return;
    };
    let got: Vec<(&str, u64)> = t
        .parts
        .iter()
        .map(|x| (x.name.as_str(), x.raw_length()))
        .collect();
    let fits = got.len() == expected.len()
        && got
            .iter()
            .zip(&expected)
            .all(|(g, e)| g.0 == e.0 && g.1 == e.1);
    if !fits {
        p.push(format!(
            "tensor '{}': parts {got:?} do not fit shape {:?} in {:?} (expected {expected:?})",
            t.name, t.shape, t.encoding
        ));
    }
    for x in &t.parts {
        let Some(l) = &x.lossless else { continue };
        if l.scheme != "rans" || t.encoding.code_bits(&x.name).is_none() {
            p.push(format!(
                "tensor '{}': part '{}' claims lossless scheme '{}', which adaptq does not write \
                 there",
                t.name, x.name, l.scheme
            ));
        }
        let bound = x.length.saturating_mul(rans::MAX_EXPANSION as u64);
        if l.raw_length > bound {
            p.push(format!(
                "tensor '{}': part '{}' claims {} decoded bytes from {} stored (at most {}x)",
                t.name,
                x.name,
                l.raw_length,
                x.length,
                rans::MAX_EXPANSION
            ));
        }
    }
    let stored = t.parts.iter().fold(0u64, |a, x| a.saturating_add(x.length));
    if !values_fit_stored(n, stored) {
        p.push(format!(
            "tensor '{}': {n} values from {stored} stored bytes (at most {MAX_VALUES_PER_BYTE} \
             per byte)",
            t.name
        ));
    }
}

/// Whether `numel` values may come from `stored` bytes (at most [`MAX_VALUES_PER_BYTE`] a
/// byte); the writer asks this before it entropy-codes a tensor's parts.
pub fn values_fit_stored(numel: u64, stored: u64) -> bool {
    numel <= stored.saturating_mul(MAX_VALUES_PER_BYTE as u64)
}

fn first(p: Problems, m: Manifest) -> Result<Layout> {
    match p.into_vec().into_iter().next() {
        Some(e) => Err(e),
        None => {
            // Names are unique here (duplicates are a problem above).
            let index = m
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect();
            Ok(Layout { manifest: m, index })
        }
    }
}

/// Checks the structure of `manifest.json`: size, schema, shard and side-file names, shard
/// sizes, and every tensor's shape, encoding, parts and segments, with checked arithmetic.
/// It does not check the digests (see [`check_manifest`]), so a fuzzer reaches every rule.
/// Errors are [`LoadError::Manifest`], the first problem found.
pub fn check_layout(manifest_json: &[u8]) -> Result<Layout> {
    let (_, m) = parse(manifest_json)?;
    let mut p = Problems::default();
    layout_problems(&m, &mut p);
    first(p, m)
}

/// [`check_layout`] after checking the manifest's own digest and the global digest over its
/// shard list: what a reader runs before using a bundle. Errors are [`LoadError::Manifest`].
pub fn check_manifest(manifest_json: &[u8]) -> Result<Layout> {
    let (text, m) = parse(manifest_json)?;
    let mut p = Problems::default();
    digest_problems(text, &m, &mut p);
    layout_problems(&m, &mut p);
    first(p, m)
}

/// Every problem [`check_manifest`] finds (the first is the one it returns); empty when the
/// manifest passes. `verify` reports them all.
pub fn manifest_problems(manifest_json: &[u8]) -> Vec<LoadError> {
    match parse(manifest_json) {
        Err(e) => vec![e],
        Ok((text, m)) => {
            let mut p = Problems::default();
            digest_problems(text, &m, &mut p);
            layout_problems(&m, &mut p);
            p.into_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_platform_independent() {
        // Qwen2-7B's embedding: 545M values, 2.2 GB as f32, past a 32-bit isize; the layout
        // check accepts it on every platform, and only decoding it asks for the room.
        let shape = [152064u64, 3584];
        assert_eq!(numel(&shape), Some(152064 * 3584));
        assert_eq!(
            expected_parts(&Encoding::F32, &shape),
            Some(vec![("data", 152064 * 3584 * 4)])
        );
        let int = Encoding::Int {
            bits: 4,
            group_size: 128,
            grid: Grid::Asymmetric,
        };
        assert_eq!(
            expected_parts(&int, &shape),
            Some(vec![
                ("codes", 152064 * 3584 / 2),
                ("scales", 152064 * 28 * 2),
                ("mins", 152064 * 28 * 2)
            ])
        );
        let cb = Encoding::Codebook {
            dim: 8,
            stage_bits: alloc::vec![12, 4],
        };
        let parts = expected_parts(&cb, &shape).unwrap();
        assert_eq!(parts[3], ("codebook0", 4096 * 8 * 2));
        assert_eq!(parts[4], ("codes0", 152064 * 448 * 12 / 8));
        // Past MAX_NUMEL, or overflowing u64: refused everywhere.
        assert_eq!(numel(&[1 << 21, 1 << 20]), None);
        assert_eq!(numel(&[1 << 20, 1 << 20]), Some(MAX_NUMEL));
        assert_eq!(numel(&[u64::MAX, 2]), None);
        assert_eq!(expected_parts(&Encoding::F16, &[1 << 41]), None);
    }

    #[test]
    fn stored_bytes_bound_the_values() {
        assert!(values_fit_stored(256, 1));
        assert!(!values_fit_stored(257, 1));
        assert!(values_fit_stored(0, 0));
        assert!(values_fit_stored(MAX_NUMEL, u64::MAX));
    }
}

//! Small bundles written by the real [`BundleWriter`] for the bundle and loader tests, and the
//! records and shards of a bundle on disk as those tests read them.
//!
//! [`writer`] and [`finish`] wrap the writer's options and source record; the `add_*`
//! functions add the tensors several fixtures share; [`rehash`] edits a manifest on disk so
//! that no digest can catch the edit.

use adaptq_bundle::manifest::SourceRef;
use adaptq_bundle::{BundleWriter, Encoding, WriterOptions, MANIFEST};
use adaptq_loader::Loader;
use adaptq_quant::Grid;
use serde_json::Value;
use std::path::Path;

/// 3000 bytes of a fixed pattern, the stand-in contents of the fixtures' parts.
pub fn pattern() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// A writer at `dir` (not forced) with shards of at most `shard_max_bytes`.
pub fn writer(dir: &Path, shard_max_bytes: u64, lossless: bool) -> BundleWriter {
    BundleWriter::create(
        dir,
        WriterOptions {
            shard_max_bytes,
            force: false,
            lossless,
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The record of a GGUF source at `locator` holding `tensor_count` tensors.
pub fn source(locator: &str, tensor_count: usize) -> SourceRef {
    SourceRef {
        locator: locator.into(),
        format: "gguf".into(),
        tensor_count,
    }
}

/// Finishes `w` as the model `model_id`, read from [`source`]`(locator, tensor_count)`, with
/// `quantization` as the manifest's record.
pub fn finish(
    w: BundleWriter,
    model_id: &str,
    locator: &str,
    tensor_count: usize,
    quantization: Value,
) {
    w.finish(model_id, source(locator, tensor_count), quantization)
        .unwrap_or_else(|e| panic!("{model_id}: {e}"));
}

/// The integer-grid encoding of `bits` bits in groups of `group_size`.
pub fn int(bits: u8, group_size: usize, grid: Grid) -> Encoding {
    Encoding::Int {
        bits,
        group_size,
        grid,
    }
}

/// Adds a round-to-nearest linear tensor.
pub fn add_linear(
    w: &mut BundleWriter,
    name: &str,
    shape: &[usize],
    enc: Encoding,
    parts: &[(&str, &[u8])],
) {
    let method = if matches!(enc, Encoding::Codebook { .. }) {
        "novaq"
    } else {
        "rtn"
    };
    w.add_tensor(name, shape, "linear", method, enc, parts)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Adds an integer-grid linear tensor from its packed codes, f16 scales and f16 mins (kept
/// only on an asymmetric grid, which is the only one that stores them).
pub fn add_int(
    w: &mut BundleWriter,
    name: &str,
    shape: &[usize],
    enc: Encoding,
    bytes: [&[u8]; 3],
) {
    let [codes, scales, mins] = bytes;
    let mut parts: Vec<(&str, &[u8])> = vec![("codes", codes), ("scales", scales)];
    if matches!(
        enc,
        Encoding::Int {
            grid: Grid::Asymmetric,
            ..
        }
    ) {
        parts.push(("mins", mins));
    }
    add_linear(w, name, shape, enc, &parts);
}

/// Adds the 4-bit, groups-of-32 symmetric `blk.0.attn_q.weight` [10, 64] of `data`: codes
/// 320 bytes, scales 10 x 2 x 2 = 40 bytes.
pub fn add_q4(w: &mut BundleWriter, data: &[u8]) {
    let parts: [(&str, &[u8]); 2] = [("codes", &data[..320]), ("scales", &data[320..360])];
    add_linear(
        w,
        "blk.0.attn_q.weight",
        &[10, 64],
        int(4, 32, Grid::Symmetric),
        &parts,
    );
}

/// Adds an unquantized tensor: f16 as an embedding, anything else as a norm.
pub fn add_plain(w: &mut BundleWriter, name: &str, shape: &[usize], enc: Encoding, data: &[u8]) {
    let role = if matches!(enc, Encoding::F16) {
        "embedding"
    } else {
        "norm"
    };
    w.add_tensor(name, shape, role, "none", enc, &[("data", data)])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Adds `token_embd.weight` [20, 64] in f16 from the first 2560 bytes of `data`.
pub fn add_embedding(w: &mut BundleWriter, data: &[u8]) {
    add_plain(
        w,
        "token_embd.weight",
        &[20, 64],
        Encoding::F16,
        &data[..2560],
    );
}

/// A JSON file, parsed.
pub fn read_json(p: &Path) -> Value {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A bundle's `manifest.json`.
pub fn manifest(dir: &Path) -> Value {
    read_json(&dir.join(MANIFEST))
}

/// A bundle's `verification.json`.
pub fn verification(dir: &Path) -> Value {
    read_json(&dir.join("verification.json"))
}

/// (file, bytes) of every shard, in manifest order.
pub fn shards(dir: &Path) -> Vec<(String, Vec<u8>)> {
    manifest(dir)["shards"]
        .as_array()
        .expect("a shard list")
        .iter()
        .map(|s| {
            let f = s["file"].as_str().unwrap().to_string();
            let b = std::fs::read(dir.join(&f)).unwrap();
            (f, b)
        })
        .collect()
}

/// A loader over the bundle at `dir` that has been fed every shard whole (as sent; their
/// hashes must hold).
pub fn loaded(dir: &Path) -> Loader {
    let mut l = Loader::new(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    for (f, b) in shards(dir) {
        l.feed(&f, &b).unwrap();
    }
    l
}

/// Applies `edit` to the manifest at `dir` and re-hashes it as the writer would (global
/// digest over the shard list, then `manifest_digest`), so no digest check can catch the edit.
pub fn rehash(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v = manifest(dir);
    edit(&mut v);
    let text = serde_json::to_string_pretty(&v).unwrap() + "\n";
    std::fs::write(dir.join(MANIFEST), crate::loading::rehash(&text)).unwrap();
}

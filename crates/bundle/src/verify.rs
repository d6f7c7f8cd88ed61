//! `adaptq verify`: recomputes every hash and checks that the index is complete and consistent.
//!
//! The manifest's digests and layout are checked by [`adaptq_loader::manifest_problems`], the
//! check every reader runs when it opens a bundle, so `verify` and the readers refuse the same
//! manifests. Files are read only when they are regular files (links to regular files are
//! followed), and never beyond their limit; side files are hashed as a stream.

use crate::manifest::{shard_name, Manifest};
use crate::{read_regular, sha256_regular, Bundle, MANIFEST, MAX_SHARD_BYTES};
use std::collections::BTreeSet;
use std::path::Path;

/// Outcome of verifying a bundle: every problem found, not just the first.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub problems: Vec<String>,
    pub shards_checked: usize,
    pub bytes_checked: u64,
    pub tensors_checked: usize,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies a bundle folder. `on_shard(bytes)` is called after each shard (progress).
pub fn verify_bundle(dir: &Path, mut on_shard: impl FnMut(u64)) -> VerifyReport {
    let mut r = VerifyReport::default();
    let mpath = dir.join(MANIFEST);
    let text = match read_regular(&mpath, adaptq_loader::layout::MAX_MANIFEST_BYTES as u64) {
        Ok(t) => t,
        Err(e) => {
            r.problems
                .push(format!("{}: cannot read manifest: {e}", mpath.display()));
            return r;
        }
    };
    r.problems.extend(
        adaptq_loader::manifest_problems(&text)
            .into_iter()
            .map(|e| e.to_string()),
    );
    let m: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            if r.problems.is_empty() {
                r.problems
                    .push(format!("manifest.json is not a valid manifest: {e}"));
            }
            return r;
        }
    };

    // Shards: presence, recorded size, both hashes. A misnamed shard (already reported) is
    // never opened: its name could point anywhere.
    for (i, s) in m.shards.iter().enumerate() {
        if s.file != shard_name(i) {
            continue;
        }
        let data = match read_regular(&dir.join(&s.file), MAX_SHARD_BYTES) {
            Ok(d) => d,
            Err(e) => {
                r.problems
                    .push(format!("shard {} is missing or unreadable: {e}", s.file));
                continue;
            }
        };
        let n = data.len() as u64;
        if n != s.bytes {
            r.problems.push(format!(
                "shard {} has {n} bytes, manifest says {} (truncated or extended)",
                s.file, s.bytes
            ));
        }
        let sha = crate::sha256_hex(&data);
        if sha != s.sha256 {
            r.problems.push(format!(
                "shard {} SHA-256 mismatch: file {sha}, manifest {}",
                s.file, s.sha256
            ));
        }
        let b3 = crate::blake3_hex(&data);
        if b3 != s.blake3 {
            r.problems.push(format!(
                "shard {} BLAKE3 mismatch: file {b3}, manifest {}",
                s.file, s.blake3
            ));
        }
        r.shards_checked += 1;
        r.bytes_checked += n;
        on_shard(n);
    }

    // Side files, only under plain names and within the size limit (others were reported by
    // the layout check), hashed as they are read: whatever the manifest claims, no side file
    // is held in memory, nor read past its recorded size.
    for f in &m.files {
        if !adaptq_loader::names::is_plain_relative(&f.file, false)
            || f.bytes > adaptq_loader::layout::MAX_SIDE_FILE_BYTES
        {
            continue;
        }
        match sha256_regular(&dir.join(&f.file), f.bytes) {
            Ok((n, sha)) => {
                if n != f.bytes || sha != f.sha256 {
                    r.problems.push(format!(
                        "{} does not match its recorded SHA-256/size",
                        f.file
                    ));
                }
            }
            Err(e) => r
                .problems
                .push(format!("{} is missing or unreadable: {e}", f.file)),
        }
    }

    // Nothing in the folder that the manifest does not list.
    let mut known: BTreeSet<String> = m.shards.iter().map(|s| s.file.clone()).collect();
    known.extend(m.files.iter().map(|f| f.file.clone()));
    known.insert(MANIFEST.to_string());
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut extra: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !known.contains(n))
            .collect();
        extra.sort();
        for n in extra {
            r.problems.push(format!(
                "unexpected file '{n}' in the bundle (not in the manifest)"
            ));
        }
    }
    r.tensors_checked = m.tensors.len();

    // Losslessly coded parts must decode as a reader will decode them; the layout check has
    // bounded what they may decode to.
    if r.ok()
        && m.tensors
            .iter()
            .any(|t| t.parts.iter().any(|p| p.lossless.is_some()))
    {
        match Bundle::open(dir) {
            Ok(b) => {
                for t in &b.manifest.tensors {
                    if t.parts.iter().any(|p| p.lossless.is_some()) {
                        if let Err(e) = b.payload(t) {
                            r.problems.push(e.to_string());
                        }
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    r
}

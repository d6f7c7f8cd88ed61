//! `adaptq verify`: recomputes every hash and checks that the index is complete and consistent.

use crate::manifest::Manifest;
use crate::{global_digest, manifest_digest, MANIFEST, SCHEMA_VERSION};
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
    let text = match std::fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) => {
            r.problems
                .push(format!("{}: cannot read manifest: {e}", mpath.display()));
            return r;
        }
    };
    let m: Manifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            r.problems
                .push(format!("manifest.json is not a valid manifest: {e}"));
            return r;
        }
    };
    if m.schema_version != SCHEMA_VERSION {
        r.problems.push(format!(
            "manifest schema_version {} is not supported (this adaptq reads {SCHEMA_VERSION})",
            m.schema_version
        ));
    }
    match manifest_digest(&text) {
        Some(d) if d == m.manifest_digest => {}
        Some(d) => r.problems.push(format!(
            "manifest.json was edited: its digest is {d}, recorded {}",
            m.manifest_digest
        )),
        None => r
            .problems
            .push("manifest.json has no manifest_digest".into()),
    }

    // Shards: presence, size limit, recorded size, both hashes.
    for (i, s) in m.shards.iter().enumerate() {
        if s.file != crate::manifest::shard_name(i) {
            r.problems.push(format!(
                "shard #{i} is named '{}', expected '{}'",
                s.file,
                crate::manifest::shard_name(i)
            ));
            continue;
        }
        let p = dir.join(&s.file);
        let data = match std::fs::read(&p) {
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
        if n > m.shard_max_bytes {
            r.problems.push(format!(
                "shard {} has {n} bytes, over the {}-byte shard limit",
                s.file, m.shard_max_bytes
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
    if m.shard_max_bytes > crate::MAX_SHARD_BYTES {
        r.problems.push(format!(
            "shard_max_bytes {} exceeds the 2 MiB limit",
            m.shard_max_bytes
        ));
    }

    // Side files.
    for f in &m.files {
        match std::fs::read(dir.join(&f.file)) {
            Ok(d) => {
                if d.len() as u64 != f.bytes || crate::sha256_hex(&d) != f.sha256 {
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

    // Index coverage: every tensor's parts match its encoding and its segments; the segments of
    // all tensors tile every shard exactly, with no gap or overlap.
    let mut per_shard: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); m.shards.len()];
    let mut names = BTreeSet::new();
    for (ti, t) in m.tensors.iter().enumerate() {
        if !names.insert(t.name.as_str()) {
            r.problems
                .push(format!("tensor '{}' is listed twice", t.name));
        }
        let expected = t.encoding.expected_parts(&t.shape);
        let got: Vec<(&str, usize)> = t
            .parts
            .iter()
            .map(|p| (p.name.as_str(), p.raw_length() as usize))
            .collect();
        for p in &t.parts {
            if let Some(l) = &p.lossless {
                if l.scheme != "rans" || t.encoding.code_symbols(&p.name, &t.shape).is_none() {
                    r.problems.push(format!(
                        "tensor '{}': part '{}' claims lossless scheme '{}', which adaptq does not write there",
                        t.name, p.name, l.scheme
                    ));
                }
            }
        }
        if expected != got {
            r.problems.push(format!(
                "tensor '{}': parts {got:?} do not fit shape {:?} in {} (expected {expected:?})",
                t.name,
                t.shape,
                t.encoding.label()
            ));
        }
        let seg_total: u64 = t.segments.iter().map(|s| s.length).sum();
        if seg_total != t.payload_len() {
            r.problems.push(format!(
                "tensor '{}': segments cover {seg_total} bytes, parts need {}",
                t.name,
                t.payload_len()
            ));
        }
        for s in &t.segments {
            match m.shards.get(s.shard) {
                Some(sh) if s.offset + s.length <= sh.bytes => {
                    per_shard[s.shard].push((s.offset, s.length, ti))
                }
                Some(sh) => r.problems.push(format!(
                    "tensor '{}': segment {}+{} runs past the end of {} ({} bytes)",
                    t.name, s.offset, s.length, sh.file, sh.bytes
                )),
                None => r.problems.push(format!(
                    "tensor '{}': segment names shard #{} which does not exist",
                    t.name, s.shard
                )),
            }
        }
        r.tensors_checked += 1;
    }
    for (si, segs) in per_shard.iter_mut().enumerate() {
        segs.sort();
        let mut pos = 0u64;
        for &(off, len, ti) in segs.iter() {
            if off != pos {
                r.problems.push(format!(
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
            pos = pos.max(off + len);
        }
        if pos != m.shards[si].bytes {
            r.problems.push(format!(
                "{}: bytes {pos}..{} are claimed by no tensor",
                m.shards[si].file, m.shards[si].bytes
            ));
        }
    }

    let g = global_digest(&m.shards);
    if g != m.global_digest {
        r.problems.push(format!(
            "global digest mismatch: computed {g}, manifest {}",
            m.global_digest
        ));
    }
    r
}

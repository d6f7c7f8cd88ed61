//! `adaptq verify`: every shard hash, size, index entry and the global digest of a bundle.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::ExitCode;

pub fn run(dir: &Path, json: bool) -> Result<ExitCode> {
    if !dir.join(adaptq_bundle::MANIFEST).exists() {
        bail!("{}: not a bundle (no manifest.json)", dir.display());
    }
    let total = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        })
        .count();
    let pb = crate::progress::bar(total as u64, "verify", "shards");
    let start = std::time::Instant::now();
    let mut bytes = 0u64;
    let rep = adaptq_bundle::verify_bundle(dir, |n| {
        bytes += n;
        pb.inc(1);
        pb.set_message(format!(
            "{:.1} MB/s",
            bytes as f64 / 1e6 / start.elapsed().as_secs_f64().max(1e-9)
        ));
    });
    pb.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": rep.ok(), "problems": rep.problems, "shards_checked": rep.shards_checked,
                "bytes_checked": rep.bytes_checked, "tensors_checked": rep.tensors_checked})
        );
    } else if rep.ok() {
        println!(
            "OK: {} shards ({} bytes) and {} tensors verified",
            rep.shards_checked, rep.bytes_checked, rep.tensors_checked
        );
    } else {
        for p in &rep.problems {
            eprintln!("FAIL: {p}");
        }
        eprintln!(
            "{} problem(s) found in {}",
            rep.problems.len(),
            dir.display()
        );
    }
    Ok(if rep.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

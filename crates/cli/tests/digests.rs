//! Bundles do not change when the code is reorganised: each case of `data/digest-cases.txt` is
//! quantized and its global digest (or, for a GGUF file, its SHA-256) compared with
//! `data/digests.txt`, recorded from the commit before the refactor. After a change that is
//! meant to alter bundle bytes, re-record with `ADAPTQ_RECORD_DIGESTS=1` and say why in the
//! commit. Calibrated cases take minutes each; they run with `ADAPTQ_DIGESTS=all`.

use adaptq_testutil::cli::{run, text};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `(name, arguments)` of the cases to run (tier `ci`, or every one with
/// `ADAPTQ_DIGESTS=all`), fixtures substituted.
fn cases() -> Vec<(String, Vec<String>)> {
    let all = std::env::var("ADAPTQ_DIGESTS").is_ok_and(|v| v == "all");
    let smollm2 = adaptq_testutil::smollm2_gguf();
    let minilm = adaptq_testutil::minilm();
    let emma = adaptq_testutil::corpus("emma.txt");
    let list = std::fs::read_to_string(data("digest-cases.txt")).unwrap();
    list.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.splitn(3, '|');
            let (name, tier, args) = (f.next()?, f.next()?.trim(), f.next()?);
            if tier != "ci" && !all {
                return None;
            }
            let args = args
                .split_whitespace()
                .map(|a| match a {
                    "{smollm2}" => smollm2.to_string_lossy().into_owned(),
                    "{minilm}" => minilm.to_string_lossy().into_owned(),
                    "{emma}" => emma.to_string_lossy().into_owned(),
                    a => a.to_string(),
                })
                .collect();
            Some((name.trim().to_string(), args))
        })
        .collect()
}

/// Quantizes one case into `dir` and returns its digest.
fn digest(dir: &Path, name: &str, args: &[String]) -> String {
    let gguf = args
        .windows(2)
        .any(|w| w[0] == "--format" && w[1] == "gguf");
    let out = dir.join(if gguf {
        format!("{name}.gguf")
    } else {
        name.to_string()
    });
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--out", out.to_str().unwrap()]);
    // ADAPTQ_BIN: check another build of adaptq (one copied aside while the tree changes).
    let bin = std::env::var("ADAPTQ_BIN").unwrap_or_else(|_| BIN.to_string());
    let o = run(&bin, &a);
    // 3: written, but a gate failed (small calibration sets fail some gates on purpose).
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "case {name}: {}",
        text(&o)
    );
    if gguf {
        hex::encode(Sha256::digest(std::fs::read(&out).unwrap()))
    } else {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        m["global_digest"].as_str().unwrap().to_string()
    }
}

#[test]
fn bundles_match_the_recorded_digests() {
    let t = tempfile::tempdir().unwrap();
    let got: BTreeMap<String, String> = cases()
        .into_iter()
        .map(|(name, args)| {
            let d = digest(t.path(), &name, &args);
            (name, d)
        })
        .collect();
    let path = data("digests.txt");
    if std::env::var_os("ADAPTQ_RECORD_DIGESTS").is_some() {
        assert!(
            std::env::var("ADAPTQ_DIGESTS").is_ok_and(|v| v == "all"),
            "record every case: ADAPTQ_DIGESTS=all"
        );
        let body: String = got.iter().map(|(n, d)| format!("{n} {d}\n")).collect();
        std::fs::write(&path, body).unwrap();
        return;
    }
    let want: BTreeMap<String, String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| got.contains_key(*n))
        .map(|(n, d)| (n.to_string(), d.to_string()))
        .collect();
    let differ: Vec<String> = got
        .iter()
        .filter(|(n, d)| want.get(*n) != Some(d))
        .map(|(n, d)| format!("{n}: {d}, recorded {:?}", want.get(n)))
        .collect();
    assert!(differ.is_empty(), "bundles changed:\n{}", differ.join("\n"));
    assert_eq!(got.len(), want.len(), "a case has no recorded digest");
}

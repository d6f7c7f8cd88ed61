//! verify must fail, naming the problem, for every kind of damage to a bundle.

use adaptq_bundle::{verify_bundle, BundleWriter, Encoding, WriterOptions};
use adaptq_quant::Grid;
use adaptq_testutil::bundle::{self as fixture, add_embedding, add_plain, add_q4, pattern};
use std::path::Path;

/// Writes a small bundle with shards of 1 KiB so tensors span several shards: a 4-bit g32
/// symmetric 10x64 tensor, an f16 embedding and an f32 norm.
fn write_bundle(dir: &Path) {
    let mut w = fixture::writer(dir, 1024, false);
    let data = pattern();
    add_q4(&mut w, &data);
    add_embedding(&mut w, &data);
    add_plain(
        &mut w,
        "blk.0.attn_norm.weight",
        &[64],
        Encoding::F32,
        &data[..256],
    );
    w.add_file("model.meta", b"{\"family\": \"llama\"}\n")
        .unwrap();
    let rtn = serde_json::json!({"method": "rtn", "seed": 0});
    fixture::finish(w, "test-model", "file:test.gguf", 3, rtn);
}

fn fresh() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("bundle");
    write_bundle(&d);
    let r = verify_bundle(&d, |_| {});
    assert!(r.ok(), "fresh bundle must verify: {:?}", r.problems);
    (t, d)
}

/// Changes the bytes of `d/name` in place.
fn edit(d: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let p = d.join(name);
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    std::fs::write(&p, b).unwrap();
}

/// Replaces the text of `d/name` by `f` of it.
fn edit_text(d: &Path, name: &str, f: impl FnOnce(String) -> String) {
    let p = d.join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, f(text)).unwrap();
}

/// verify's problems with a fresh bundle after `damage`, asserting that it refused it.
fn damaged(damage: impl FnOnce(&Path)) -> String {
    let (_t, d) = fresh();
    damage(&d);
    problems(&d)
}

fn problems(d: &Path) -> String {
    let r = verify_bundle(d, |_| {});
    assert!(!r.ok(), "damaged bundle verified");
    r.problems.join("\n")
}

#[test]
fn clean_bundle_verifies_and_spans_shards() {
    let (_t, d) = fresh();
    let r = verify_bundle(&d, |_| {});
    assert_eq!(r.tensors_checked, 3);
    // 360 + 2560 + 256 = 3176 bytes in 1 KiB shards -> 4 shards, last one partial.
    assert_eq!(r.shards_checked, 4);
    assert_eq!(r.bytes_checked, 3176);
    for i in 0..3 {
        assert_eq!(
            std::fs::metadata(d.join(format!("shard-0000{i}.bin")))
                .unwrap()
                .len(),
            1024
        );
    }
}

/// Each damage to a clean bundle, and what verification must say of it.
#[test]
fn every_damage_is_found_and_named() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &[&str]); 8] = [
        (
            "flipped byte",
            |d| edit(d, "shard-00001.bin", |b| b[100] ^= 0x01),
            &["shard-00001.bin SHA-256 mismatch", "BLAKE3 mismatch"],
        ),
        (
            "truncated shard",
            |d| edit(d, "shard-00002.bin", |b| b.truncate(b.len() - 10)),
            &["shard-00002.bin has 1014 bytes, manifest says 1024"],
        ),
        (
            "missing shard",
            |d| std::fs::remove_file(d.join("shard-00000.bin")).unwrap(),
            &["shard shard-00000.bin is missing"],
        ),
        (
            "extra shard",
            |d| std::fs::write(d.join("shard-00004.bin"), b"extra").unwrap(),
            &["unexpected file 'shard-00004.bin'"],
        ),
        (
            "edited manifest",
            |d| {
                edit_text(d, "manifest.json", |t| {
                    t.replace("test-model", "other-model")
                })
            },
            &["manifest.json was edited"],
        ),
        (
            "edited shape",
            |d| {
                edit_text(d, "manifest.json", |t| {
                    t.replacen("\"shape\": [\n        20,", "\"shape\": [\n        21,", 1)
                })
            },
            &["do not fit shape [21, 64]"],
        ),
        (
            "edited side file",
            |d| std::fs::write(d.join("model.meta"), b"{\"family\": \"bert\"}\n").unwrap(),
            &["model.meta does not match"],
        ),
        (
            "reordered shards",
            |d| {
                let a = std::fs::read(d.join("shard-00000.bin")).unwrap();
                let b = std::fs::read(d.join("shard-00001.bin")).unwrap();
                std::fs::write(d.join("shard-00000.bin"), b).unwrap();
                std::fs::write(d.join("shard-00001.bin"), a).unwrap();
            },
            &["shard-00000.bin SHA-256 mismatch"],
        ),
    ];
    for (what, damage, says) in cases {
        let msg = damaged(damage);
        for s in says {
            assert!(msg.contains(s), "{what}: no '{s}' in {msg}");
        }
    }
}

#[test]
fn existing_output_is_refused_unless_forced() {
    let (_t, d) = fresh();
    let err = BundleWriter::create(&d, WriterOptions::default())
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("already exists"), "{err}");
    let before = std::fs::read(d.join("manifest.json")).unwrap();
    // Forced: the old bundle stays in place until the new one is complete.
    let w = BundleWriter::create(
        &d,
        WriterOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    drop(w);
    assert_eq!(std::fs::read(d.join("manifest.json")).unwrap(), before);
    assert!(verify_bundle(&d, |_| {}).ok());
}

#[test]
fn abandoned_write_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    {
        let mut w = fixture::writer(&d, 16, false);
        add_plain(&mut w, "x", &[100], Encoding::F32, &[0u8; 400]);
        // Dropped without finish(), as on an I/O error (disk full) or a panic mid-way.
    }
    assert!(!d.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        0,
        "temp folder must be removed"
    );
}

#[test]
fn wrong_part_lengths_are_rejected_at_write_time() {
    let t = tempfile::tempdir().unwrap();
    let mut w = BundleWriter::create(&t.path().join("b"), WriterOptions::default()).unwrap();
    let enc = fixture::int(3, 64, Grid::Asymmetric);
    let parts: [(&str, &[u8]); 2] = [("codes", &[0u8; 96]), ("scales", &[0u8; 8])];
    let err = w
        .add_tensor("x", &[4, 64], "linear", "rtn", enc, &parts)
        .unwrap_err();
    assert!(
        err.to_string().contains("do not match int3-g64-asym"),
        "{err}"
    );
}

#[test]
fn same_input_gives_identical_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    write_bundle(&a);
    write_bundle(&b);
    assert_eq!(adaptq_testutil::files::assert_same(&a, &b).len(), 6);
}

#[test]
fn shard_limit_over_2mib_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let err = BundleWriter::create(
        &t.path().join("b"),
        WriterOptions {
            shard_max_bytes: 3 << 20,
            force: false,
            lossless: false,
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("shard size"), "{err}");
}

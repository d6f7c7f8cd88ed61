//! Hostile bundles: manifests edited and re-hashed (so only the layout check can catch them),
//! shards whose bytes were re-hashed after damage, and folders holding FIFOs, symlinks to
//! /dev/zero and names that point outside. `verify`, the host reader and the wasm loader must
//! each refuse them, without hanging, panicking or allocating more than the bytes justify.

use adaptq_bundle::{blake3_hex, sha256_hex, verify_bundle, Bundle, BundleWriter, Encoding};
use adaptq_bundle::{WriterOptions, MANIFEST};
use adaptq_loader::Loader;
use adaptq_quant::Grid;
use adaptq_testutil::bundle::{self as fixture, add_embedding, add_linear, add_plain, add_q4};
use adaptq_testutil::bundle::{manifest, rehash};
use adaptq_testutil::files::within;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Refuses (aborts on) any single allocation above 1 GiB, so a reader that sizes a buffer
/// from a hostile header fails this test instead of quietly over-committing memory.
#[global_allocator]
static ALLOC: adaptq_testutil::mutate::Capped<{ 1 << 30 }> = adaptq_testutil::mutate::Capped;

/// Mostly-middle codes (so the lossless stage codes them), LSB-first at `bits`.
fn skewed_codes(n: usize, bits: u8) -> Vec<u8> {
    let codes: Vec<u8> = adaptq_testutil::rand::skewed(n, bits, 7)
        .into_iter()
        .map(|c| c as u8)
        .collect();
    adaptq_loader::pack::pack(&codes, bits)
}

/// A bundle at `<tmp>/p/q` (so `../../x` is `<tmp>/x`) over 1 KiB shards: an 8-bit tensor
/// whose codes are rANS-coded and start shard 0, a 4-bit grid, a NOVAQ codebook, f16 and f32,
/// plus model.meta and LICENSE.
fn fresh() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("p").join("q");
    let mut w = fixture::writer(&d, 1024, true);
    let data = fixture::pattern();
    let codes = skewed_codes(2048, 8);
    let parts: [(&str, &[u8]); 2] = [("codes", &codes), ("scales", &data[..64])];
    let int8 = fixture::int(8, 64, Grid::Symmetric);
    add_linear(&mut w, "blk.0.ffn_up.weight", &[32, 64], int8, &parts);
    add_q4(&mut w, &data);
    // 8 x 16 in vectors of 4, one 4-bit stage: 16 centroids x 4 values.
    let book = Encoding::Codebook {
        dim: 4,
        stage_bits: vec![4],
    };
    let parts: [(&str, &[u8]); 5] = [
        ("row_scale", &data[..16]),
        ("row_mean", &data[16..32]),
        ("col_scale", &data[32..64]),
        ("codebook0", &data[64..192]),
        ("codes0", &data[192..208]),
    ];
    add_linear(&mut w, "blk.0.attn_v.weight", &[8, 16], book, &parts);
    add_embedding(&mut w, &data);
    let norm = &data[..256];
    add_plain(&mut w, "output_norm.weight", &[64], Encoding::F32, norm);
    w.add_file("model.meta", b"{\"family\": \"llama\"}\n")
        .unwrap();
    w.add_file("LICENSE", b"Apache-2.0\n").unwrap();
    let rtn = serde_json::json!({"method": "rtn", "seed": 0});
    fixture::finish(w, "hostile", "file:test.gguf", 5, rtn);
    let r = verify_bundle(&d, |_| {});
    assert!(r.ok(), "fresh bundle must verify: {:?}", r.problems);
    let m = manifest(&d);
    assert!(
        m["tensors"][0]["parts"][0]["lossless"].is_object(),
        "the 8-bit codes are rANS-coded"
    );
    assert_eq!(m["tensors"][0]["segments"][0]["offset"], 0);
    (t, d)
}

/// Replaces shard `i`'s bytes and records their size and hashes, re-hashing the manifest.
fn rewrite_shard(d: &Path, i: usize, bytes: &[u8]) {
    let file = format!("shard-{i:05}.bin");
    std::fs::write(d.join(&file), bytes).unwrap();
    rehash(d, |v| {
        let s = &mut v["shards"][i];
        s["bytes"] = Value::from(bytes.len() as u64);
        s["sha256"] = Value::from(sha256_hex(bytes));
        s["blake3"] = Value::from(blake3_hex(bytes));
    });
}

/// verify's problems, asserting it refused the bundle.
fn refused_by_verify(d: &Path) -> String {
    let d = d.to_path_buf();
    let r = within("verify", 10, move || verify_bundle(&d, |_| {}));
    assert!(!r.ok(), "verify accepted a hostile bundle");
    r.problems.join("\n")
}

/// verify's problems with a fresh bundle whose manifest `edit` changed and re-hashed, after
/// asserting that the host reader and the loader refuse it, saying `why`.
fn edit_refused(why: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (_t, d) = fresh();
    rehash(&d, edit);
    let msg = refused_by_verify(&d);
    refused_on_open(&d, why);
    msg
}

/// Asserts the host reader and the loader both refuse the manifest itself.
fn refused_on_open(d: &Path, why: &str) {
    let err = Bundle::open(d).err().expect("host reader opened it");
    assert!(err.to_string().contains(why), "reader: {err}");
    let text = std::fs::read(d.join(MANIFEST)).unwrap();
    let err = Loader::new(&text).expect_err("loader accepted it");
    assert!(err.to_string().contains(why), "loader: {err}");
    assert!(adaptq_loader::check_layout(&text).is_err());
}

/// Feeds the loader every shard (as sent; their hashes must hold) and reads `tensor`.
fn loader_reads(d: &Path, tensor: &str) -> adaptq_loader::Result<Vec<f32>> {
    fixture::loaded(d).tensor_f32(tensor)
}

/// A tensor stored (partly) in shard `i`.
fn tensor_in_shard(d: &Path, i: u64) -> String {
    let m = manifest(d);
    m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| {
            t["segments"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["shard"] == i)
        })
        .map(|t| t["name"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn the_layout_check_ignores_digests_and_check_manifest_does_not() {
    let (_t, d) = fresh();
    let text = std::fs::read_to_string(d.join(MANIFEST)).unwrap();
    let layout = adaptq_loader::check_layout(text.as_bytes()).unwrap();
    assert_eq!(layout.manifest().tensors.len(), 5);
    let edited = text.replace("\"hostile\"", "\"other\"");
    assert!(adaptq_loader::check_layout(edited.as_bytes()).is_ok());
    let err = adaptq_loader::check_manifest(edited.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("was edited"), "{err}");
    assert!(Bundle::open(&d).is_ok());
}

#[test]
fn segment_whose_end_wraps_u64_is_refused() {
    let msg = edit_refused("points outside", |v| {
        v["tensors"][1]["segments"][0]["offset"] = Value::from(u64::MAX - 7);
    });
    assert!(msg.contains("points outside"), "{msg}");
}

#[test]
fn segment_of_2_62_bytes_is_refused() {
    let msg = edit_refused("token_embd.weight", |v| {
        let t = &mut v["tensors"][3];
        let old = t["segments"][0]["length"].as_u64().unwrap();
        let part = t["parts"][0]["length"].as_u64().unwrap();
        t["segments"][0]["length"] = Value::from(1u64 << 62);
        // The parts claim the same total, so only the shard bounds can catch it.
        t["parts"][0]["length"] = Value::from(part - old + (1u64 << 62));
    });
    assert!(msg.contains("points outside"), "{msg}");
}

#[test]
fn lossless_part_claiming_2_61_decoded_bytes_is_refused() {
    let msg = edit_refused("blk.0.ffn_up.weight", |v| {
        v["tensors"][0]["parts"][0]["lossless"]["raw_length"] = Value::from(1u64 << 61);
    });
    assert!(msg.contains("do not fit shape [32, 64]"), "{msg}");
    assert!(msg.contains("2305843009213693952 decoded bytes"), "{msg}");
}

#[test]
fn rans_header_claiming_2_61_symbols_is_refused() {
    let (_t, d) = fresh();
    // The stream starts shard 0: width (u8) then the symbol count (u64 LE). 2^61 + 2048
    // eight-bit symbols wrap an unchecked `n * 8` back to the recorded 2048 bytes.
    let mut s = std::fs::read(d.join("shard-00000.bin")).unwrap();
    assert_eq!(s[0], 8);
    assert_eq!(u64::from_le_bytes(s[1..9].try_into().unwrap()), 2048);
    s[1..9].copy_from_slice(&((1u64 << 61) + 2048).to_le_bytes());
    rewrite_shard(&d, 0, &s);
    let msg = refused_by_verify(&d);
    assert!(msg.contains("part 'codes' does not decode"), "{msg}");
    let b = Bundle::open(&d).unwrap();
    let err = b.read_f32("blk.0.ffn_up.weight").unwrap_err();
    assert!(err.to_string().contains("does not decode"), "{err}");
    let err = loader_reads(&d, "blk.0.ffn_up.weight").unwrap_err();
    assert!(err.to_string().contains("does not decode"), "{err}");
}

#[test]
fn shard_names_outside_the_bundle_are_refused() {
    for name in ["../../outside/x.bin", "/etc/hostname"] {
        let (t, d) = fresh();
        // A copy of the real shard where the name points, so only the name check stops it.
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::copy(d.join("shard-00000.bin"), t.path().join("outside/x.bin")).unwrap();
        rehash(&d, |v| v["shards"][0]["file"] = Value::from(name));
        let msg = refused_by_verify(&d);
        assert!(
            msg.contains(&format!("shard #0 is named \"{name}\"")),
            "{msg}"
        );
        assert!(
            !msg.contains("SHA-256 mismatch"),
            "the named file was read: {msg}"
        );
        refused_on_open(&d, "shard #0 is named");
    }
}

#[test]
fn code_widths_out_of_range_are_refused() {
    let msg = edit_refused("255-bit codes", |v| {
        v["tensors"][1]["encoding"]["bits"] = Value::from(255)
    });
    assert!(msg.contains("255-bit codes"), "{msg}");

    let msg = edit_refused("stage widths [200]", |v| {
        v["tensors"][2]["encoding"]["stage_bits"] = serde_json::json!([200]);
    });
    assert!(msg.contains("stage widths [200]"), "{msg}");
}

#[test]
fn shapes_too_large_for_their_bytes_are_refused() {
    let (_t, d) = fresh();
    // 2^32 x 2^32 overflows every product of the shape.
    rehash(&d, |v| {
        v["tensors"][4]["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32]);
    });
    let msg = refused_by_verify(&d);
    assert!(msg.contains("holds too many values"), "{msg}");
    refused_on_open(&d, "holds too many values");
}

#[test]
fn side_file_names_outside_the_bundle_are_refused() {
    let (t, d) = fresh();
    let secret = b"the key\n";
    std::fs::write(t.path().join("secret.txt"), secret).unwrap();
    let b = Bundle::open(&d).unwrap();
    assert!(b.read_file("../../secret.txt").is_err());
    assert!(b.read_file("LICENSE").is_ok());
    rehash(&d, |v| {
        v["files"].as_array_mut().unwrap().push(serde_json::json!({
            "file": "../../secret.txt",
            "bytes": secret.len(),
            "sha256": sha256_hex(secret),
        }));
    });
    let msg = refused_by_verify(&d);
    assert!(
        msg.contains("side file \"../../secret.txt\" is not a plain file name"),
        "{msg}"
    );
    refused_on_open(&d, "../../secret.txt");
}

/// What a read failed with, if it failed.
#[cfg(unix)]
fn err_of<T>(r: adaptq_bundle::Result<T>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// Replaces shard 1 and the side file `side` of a fresh bundle by what `make` puts at a path;
/// verify must refuse both, saying `verify_says` after each name, and the host reader must
/// refuse a tensor of that shard and the side file as not regular files, without blocking.
#[cfg(unix)]
fn special_files_are_refused(side: &'static str, verify_says: &str, make: impl Fn(&Path)) {
    let (_t, d) = fresh();
    let victim = tensor_in_shard(&d, 1);
    for f in ["shard-00001.bin", side] {
        std::fs::remove_file(d.join(f)).unwrap();
        make(&d.join(f));
    }
    let msg = refused_by_verify(&d);
    for name in ["shard shard-00001.bin", side] {
        let want = format!("{name} is missing or unreadable{verify_says}");
        assert!(msg.contains(&want), "{msg}");
    }
    let dd = d.clone();
    let (data, file) = within("reader", 10, move || {
        let b = Bundle::open(&dd).unwrap();
        (err_of(b.read_f32(&victim)), err_of(b.read_file(side)))
    });
    assert!(data.unwrap_err().contains("not a regular file"));
    assert!(file.unwrap_err().contains("not a regular file"));
}

#[cfg(unix)]
#[test]
fn fifos_are_refused_without_blocking() {
    special_files_are_refused(
        "model.meta",
        ": not a regular file",
        adaptq_testutil::files::mkfifo,
    );
}

#[cfg(unix)]
#[test]
fn symlinks_to_dev_zero_are_refused_without_reading_them() {
    special_files_are_refused("LICENSE", "", |p| {
        std::os::unix::fs::symlink("/dev/zero", p).unwrap()
    });
}

#[test]
fn readers_refuse_shard_bytes_that_verify_refuses() {
    let (_t, d) = fresh();
    let victim = tensor_in_shard(&d, 2);
    let p = d.join("shard-00002.bin");
    let mut s = std::fs::read(&p).unwrap();
    s[10] ^= 0x40;
    std::fs::write(&p, &s).unwrap();
    let msg = refused_by_verify(&d);
    assert!(msg.contains("shard-00002.bin SHA-256 mismatch"), "{msg}");
    let b = Bundle::open(&d).unwrap();
    let err = b.read_f32(&victim).unwrap_err();
    assert!(
        err.to_string().contains("does not match its recorded"),
        "{err}"
    );
    assert!(b.read_f32(&tensor_in_shard(&d, 0)).is_ok());
    // A side file edited after writing is refused by the reader too.
    std::fs::write(d.join("model.meta"), b"{\"family\": \"bert\"}\n").unwrap();
    assert!(b.read_file("model.meta").is_err());
}

/// A sparse file of `len` bytes at `p` (no disk used), or `None` where the file system
/// cannot hold one that large.
fn sparse(p: &Path, len: u64) -> Option<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p)
        .unwrap();
    f.set_len(len).ok()
}

#[test]
fn a_huge_side_file_is_refused_from_its_size_without_reading_it() {
    // 8 TiB where the file system allows it; any size above the allocator's 1 GiB cap shows
    // that nothing is reserved from the file's size.
    let (_t, d) = fresh();
    let lic = d.join("LICENSE");
    let len = [8u64 << 40, 4 << 30]
        .into_iter()
        .find(|&l| sparse(&lic, l).is_some())
        .expect("a sparse file");

    // The manifest still records 11 bytes: the file is refused from its size, never read.
    let msg = refused_by_verify(&d);
    assert!(
        msg.contains(&format!(
            "LICENSE is missing or unreadable: holds {len} bytes"
        )),
        "{msg}"
    );
    let b = Bundle::open(&d).unwrap();
    let err = b.read_file("LICENSE").unwrap_err().to_string();
    assert!(err.contains(&format!("holds {len} bytes")), "{err}");

    // The manifest edited to record it, digest left stale: verify reports both and reads
    // nothing.
    let text = std::fs::read_to_string(d.join(MANIFEST)).unwrap();
    let edited = text.replacen("\"bytes\": 11,", &format!("\"bytes\": {len},"), 1);
    assert_ne!(edited, text);
    std::fs::write(d.join(MANIFEST), &edited).unwrap();
    let msg = refused_by_verify(&d);
    assert!(msg.contains("was edited"), "{msg}");
    assert!(msg.contains("over the 268435456-byte limit"), "{msg}");

    // And re-hashed, so only the size limit can catch it: every reader refuses the manifest.
    rehash(&d, |v| {
        for f in v["files"].as_array_mut().unwrap() {
            if f["file"] == "LICENSE" {
                f["bytes"] = Value::from(len);
            }
        }
    });
    let msg = refused_by_verify(&d);
    assert!(
        msg.contains(&format!(
            "side file \"LICENSE\" records {len} bytes, over the 268435456-byte limit"
        )),
        "{msg}"
    );
    refused_on_open(&d, "over the 268435456-byte limit");
}

#[test]
fn side_files_are_hashed_and_read_within_their_recorded_size() {
    let (_t, d) = fresh();
    // One byte more than recorded: refused by size, by verify and by the reader.
    std::fs::write(d.join("LICENSE"), b"Apache-2.0\n\n").unwrap();
    let msg = refused_by_verify(&d);
    assert!(
        msg.contains("LICENSE is missing or unreadable: holds 12 bytes"),
        "{msg}"
    );
    assert!(Bundle::open(&d).unwrap().read_file("LICENSE").is_err());
    // Same size, other bytes: refused by hash.
    std::fs::write(d.join("LICENSE"), b"Apache-3.0\n").unwrap();
    let msg = refused_by_verify(&d);
    assert!(
        msg.contains("LICENSE does not match its recorded SHA-256"),
        "{msg}"
    );
    std::fs::write(d.join("LICENSE"), b"Apache-2.0\n").unwrap();
    assert!(verify_bundle(&d, |_| {}).ok());
}

#[cfg(unix)]
#[test]
fn a_bundle_of_symlinks_to_regular_files_verifies_and_reads() {
    // As huggingface-cli or git-annex leave it: every file a link into a blob store.
    let (t, d) = fresh();
    // As bits: the test data holds NaNs.
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let want: Vec<(String, Vec<u32>)> = {
        let b = Bundle::open(&d).unwrap();
        b.manifest
            .tensors
            .iter()
            .map(|x| (x.name.clone(), bits(b.read_f32(&x.name).unwrap())))
            .collect()
    };
    let blobs = t.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 6, "{names:?}");
    for (i, n) in names.iter().enumerate() {
        let blob = blobs.join(format!("blob-{i}"));
        std::fs::rename(d.join(n), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, d.join(n)).unwrap();
    }
    let r = verify_bundle(&d, |_| {});
    assert!(r.ok(), "{:?}", r.problems);
    let b = Bundle::open(&d).unwrap();
    for (name, v) in &want {
        assert_eq!(&bits(b.read_f32(name).unwrap()), v, "{name}");
    }
    assert_eq!(b.read_file("LICENSE").unwrap(), b"Apache-2.0\n");
    assert_eq!(
        bits(loader_reads(&d, "token_embd.weight").unwrap()),
        want.iter().find(|w| w.0 == "token_embd.weight").unwrap().1
    );
}

/// A nearly constant NOVAQ layer: 4096 x 4096 in vectors of 32, one 1-bit stage whose codes
/// are 1 only every 20th vector.
fn nearly_constant_codebook() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let codes: Vec<u16> = (0..4096 * 128).map(|i| (i % 20 == 0) as u16).collect();
    let codes = adaptq_loader::codebook::pack(&codes, 1);
    let scales = vec![0x3cu8; 8192];
    let book = vec![0u8; 2 * 32 * 2];
    (codes, scales, book)
}

#[test]
fn the_writer_stores_codes_raw_when_coding_them_breaks_the_layout_rules() {
    let (codes, scales, book_bytes) = nearly_constant_codebook();
    // Coded, the tensor would hold more values per stored byte than any reader accepts.
    let coded = adaptq_loader::rans::encode(&codes, 1, codes.len() * 8).unwrap();
    assert!(coded.len() < codes.len() / 2);
    let numel = 4096u64 * 4096;
    assert!(!adaptq_loader::layout::values_fit_stored(
        numel,
        (coded.len() + 3 * scales.len() + book_bytes.len()) as u64
    ));
    assert!(adaptq_loader::layout::values_fit_stored(
        numel,
        (codes.len() + 3 * scales.len() + book_bytes.len()) as u64
    ));

    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = fixture::writer(&d, WriterOptions::default().shard_max_bytes, true);
    let book = Encoding::Codebook {
        dim: 32,
        stage_bits: vec![1],
    };
    let parts: [(&str, &[u8]); 5] = [
        ("row_scale", &scales),
        ("row_mean", &scales),
        ("col_scale", &scales),
        ("codebook0", &book_bytes),
        ("codes0", &codes),
    ];
    add_linear(&mut w, "blk.0.ffn_up.weight", &[4096, 4096], book, &parts);
    fixture::finish(w, "constant", "file:test.gguf", 1, serde_json::json!({}));
    let r = verify_bundle(&d, |_| {});
    assert!(r.ok(), "{:?}", r.problems);
    let m = manifest(&d);
    let part = &m["tensors"][0]["parts"][4];
    assert_eq!(part["name"], "codes0");
    assert!(part.get("lossless").is_none(), "{part}");
    assert!(Loader::new(&std::fs::read(d.join(MANIFEST)).unwrap()).is_ok());
}

#[test]
fn the_writer_publishes_no_manifest_that_readers_refuse() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = BundleWriter::create(&d, WriterOptions::default()).unwrap();
    for _ in 0..2 {
        add_plain(
            &mut w,
            "output_norm.weight",
            &[4],
            Encoding::F32,
            &[0u8; 16],
        );
    }
    let err = w
        .finish(
            "twice",
            fixture::source("file:test.gguf", 2),
            serde_json::json!({}),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("is listed twice"), "{err}");
    assert!(!d.exists(), "a refused bundle was published");
}

#[test]
fn side_file_names_the_readers_refuse_are_refused_by_the_writer() {
    let t = tempfile::tempdir().unwrap();
    let mut w = BundleWriter::create(&t.path().join("b"), WriterOptions::default()).unwrap();
    for bad in [
        "", ".", "..", "a\\b", "C:x", "x\ny", "sub/x", MANIFEST, "shard-x",
    ] {
        assert!(w.add_file(bad, b"x").is_err(), "{bad:?} accepted");
    }
    assert!(w.add_file("LICENSE", b"x").is_ok());
}

#[test]
fn tensor_lookup_does_not_grow_with_the_tensor_count() {
    // 100k zero-byte tensors: a linear search per lookup makes reading them all take ~5e9
    // name comparisons; an index makes it 100k look-ups.
    const N: usize = 100_000;
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = BundleWriter::create(&d, WriterOptions::default()).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("t.{i:06}")).collect();
    for n in &names {
        w.add_tensor(n, &[0], "other", "none", Encoding::F32, &[("data", &[])])
            .unwrap();
    }
    fixture::finish(w, "many", "file:test.gguf", N, serde_json::json!({}));
    let text = std::fs::read(d.join(MANIFEST)).unwrap();
    let (b, l) = within("open", 10, move || {
        (Bundle::open(&d).unwrap(), Loader::new(&text).unwrap())
    });
    // A hang guard, not a speed target: indexed, these take milliseconds; searched linearly,
    // minutes.
    within("100k look-ups", 10, move || {
        for n in names.iter().rev() {
            assert_eq!(&b.entry(n).unwrap().name, n);
            assert!(l.tensor_f32(n).unwrap().is_empty());
        }
        assert!(b.entry("t.x").is_none());
        assert!(l.tensor_f32("t.x").is_err());
    });
}

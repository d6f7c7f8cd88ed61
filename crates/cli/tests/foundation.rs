//! End-to-end CLI checks of the foundation slice on the real fixture models.

use adaptq_testutil::cli::{self, named, ok, read_json, refused, s, text, verification, RTN4};
use adaptq_testutil::files;
use std::path::{Path, PathBuf};
use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

fn gguf() -> PathBuf {
    adaptq_testutil::smollm2_gguf()
}

fn adaptq(args: &[&str]) -> Output {
    cli::run(BIN, args)
}

fn quantize(out: &Path, extra: &[&str]) -> Output {
    cli::quantize(BIN, &gguf(), out, extra)
}

#[test]
fn rtn4_bundle_is_verified_deterministic_and_sized_as_computed() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let o = ok(quantize(&a, RTN4));
    let o2 = ok(quantize(&b, RTN4));

    // Shards all <= 2 MiB; verify passes.
    let names = files::names(&a);
    let shards: Vec<&String> = names.iter().filter(|n| n.starts_with("shard-")).collect();
    assert!(shards.len() > 10);
    let mut shard_bytes = 0u64;
    for s in &shards {
        let n = std::fs::metadata(a.join(s)).unwrap().len();
        assert!(n <= 2 * 1024 * 1024, "{s} has {n} bytes");
        shard_bytes += n;
    }
    let v = ok(adaptq(&["verify", s(&a)]));
    assert!(text(&v).contains("OK:"));

    // Second run: same digest, byte-identical files.
    assert_eq!(names, files::assert_same(&a, &b));
    let digest = |o: &Output| {
        text(o)
            .lines()
            .find(|l| l.contains("global digest"))
            .unwrap()
            .to_string()
    };
    assert_eq!(digest(&o), digest(&o2));

    // Bits per weight by hand. Per block: q,o 576x576; k,v 192x576; gate,up 1536x576; down
    // 576x1536. 4-bit codes plus one f16 scale per group of 128 (576 = 4x128 + 64 -> 5 groups;
    // 1536 = 12 groups). Embedding 49152x576 in f16; 61 norms of 576 in f32.
    let lin = |rows: u64, cols: u64| rows * cols / 2 + rows * cols.div_ceil(128) * 2;
    let block = 2 * lin(576, 576) + 2 * lin(192, 576) + 2 * lin(1536, 576) + lin(576, 1536);
    let expect_bytes = 30 * block + 49152 * 576 * 2 + 61 * 576 * 4;
    assert_eq!(shard_bytes, expect_bytes);
    let params = 134_515_008u64;
    let j = cli::json(&ok(adaptq(&["stats", s(&a), "--json"])));
    assert_eq!(j["shard_bytes"].as_u64().unwrap(), expect_bytes);
    assert_eq!(j["params"].as_u64().unwrap(), params);
    let bpw = j["bits_per_weight"].as_f64().unwrap();
    assert!(
        (bpw - expect_bytes as f64 * 8.0 / params as f64).abs() < 1e-9,
        "{bpw}"
    );
    let qbpw = j["bits_per_quantized_weight"].as_f64().unwrap();
    assert!(
        (qbpw - 30.0 * block as f64 * 8.0 / (params - 49152 * 576 - 61 * 576) as f64).abs() < 1e-9
    );
    assert!(j["error_summary"]["cosine_min"].as_f64().unwrap() > 0.98);

    // Damage to a real bundle is caught by the CLI with a non-zero exit.
    let p = a.join("shard-00007.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[12345] ^= 0x80;
    std::fs::write(&p, bytes).unwrap();
    let v = adaptq(&["verify", s(&a)]);
    assert_eq!(v.status.code(), Some(2));
    assert!(
        text(&v).contains("shard-00007.bin SHA-256 mismatch"),
        "{}",
        text(&v)
    );
}

#[test]
fn existing_output_is_refused_and_force_replaces_only_a_bundle() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"user data").unwrap();
    let o = quantize(&out, &["--bits", "8"]);
    refused(&o, "already exists");
    assert!(text(&o).contains("--force"), "{}", text(&o));
    // --force replaces only what adaptq wrote: a folder of the user's survives it.
    let o = quantize(&out, &["--bits", "8", "--force"]);
    refused(&o, "not written by adaptq");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"user data");
    let bundle = t.path().join("bundle");
    ok(quantize(&bundle, &["--bits", "8"]));
    ok(quantize(&bundle, &["--bits", "4", "--force"]));
    ok(adaptq(&["verify", s(&bundle)]));
    files::assert_none_hidden(t.path());
}

#[test]
fn bad_inputs_give_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    let bad = t.path().join("broken.gguf");
    let head = std::fs::read(gguf()).unwrap()[..4096].to_vec();
    std::fs::write(&bad, head).unwrap();
    for (src, what) in [
        (
            Path::new("/no/such/model.gguf"),
            "/no/such/model.gguf: no such file",
        ),
        (&bad, "broken.gguf: corrupt or truncated"),
    ] {
        let o = cli::quantize(BIN, src, &out, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(what), "{}", text(&o));
    }
    assert!(!out.exists());

    refused(&quantize(&out, &["--bits", "9"]), "between 2 and 8");
    assert!(!out.exists());
    refused(&adaptq(&["verify", s(t.path())]), "not a bundle");
}

#[test]
fn gate_fails_when_budget_is_impossible() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("g");
    let o = quantize(
        &out,
        &["--bits", "2", "--group-size", "0", "--max-bpw", "2.5"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let s = text(&o);
    assert!(
        s.contains("size_budget") && s.contains("FAIL") && s.contains("OVERALL_STATUS FAIL"),
        "{s}"
    );
    let v = verification(&out);
    assert_eq!(v["OVERALL_STATUS"], "FAIL");
    assert_eq!(named(&v, "gates", "size_budget")["status"], "FAIL");
    // Per-channel 2-bit RTN destroys some layers; the weight-cosine gate catches that too.
    assert_eq!(named(&v, "gates", "weight_cosine")["status"], "FAIL");
}

#[test]
fn minilm_safetensors_quantizes_and_verifies() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let src = adaptq_testutil::minilm();
    ok(cli::quantize(
        BIN,
        &src,
        &out,
        &["--bits", "8", "--group-size", "64"],
    ));
    ok(adaptq(&["verify", s(&out)]));
    let meta = read_json(&out.join("model.meta"));
    assert_eq!(meta["family"], "bert");
    assert_eq!(meta["license"], "apache-2.0");
    for f in ["tokenizer.json", "config.json"] {
        assert!(out.join(f).exists(), "{f} must travel with the bundle");
    }
    let info = adaptq(&["info", s(&out)]);
    assert!(
        text(&info).contains("\"locator\": \"file:minilm\""),
        "{}",
        text(&info)
    );
}

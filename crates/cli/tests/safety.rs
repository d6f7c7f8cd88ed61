//! What adaptq may replace at `--out`, and what killed runs leave behind (issue 18, items 2, 10
//! and 13's broken pipe), end to end on the real SmolLM2 GGUF.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use adaptq_testutil::cli::{self, args, ok, refused, s, text};
use adaptq_testutil::files::assert_none_hidden;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

fn gguf() -> PathBuf {
    adaptq_testutil::smollm2_gguf()
}

fn adaptq(args: &[&str]) -> Output {
    cli::run(BIN, args)
}

/// eval on one short window: enough to load the whole model.
const ONE_WINDOW: &[&str] = &["--ctx", "64", "--chunks", "1"];

const RTN8: &[&str] = &["--method", "rtn", "--bits", "8", "--group-size", "64"];

fn quantize(src: &Path, out: &Path, extra: &[&str]) -> Output {
    cli::quantize(BIN, src, out, &[RTN8, extra].concat())
}

#[test]
fn hf_gptq_export_never_deletes_a_folder_it_did_not_write() {
    let t = tempfile::tempdir().unwrap();
    let bundle = t.path().join("b");
    let rtn4_g64 = "--method rtn --bits 4 --group-size 64 --sym";
    ok(cli::quantize(BIN, &gguf(), &bundle, &args(rtn4_g64)));
    let user = t.path().join("photos");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("holiday.jpg"), b"irreplaceable").unwrap();
    let export = |out: &Path, force: bool| {
        let mut a = vec!["export", s(&bundle), "--to", "hf-gptq", "--out", s(out)];
        if force {
            a.push("--force");
        }
        adaptq(&a)
    };
    for force in [false, true] {
        let o = export(&user, force);
        assert!(!o.status.success(), "export over a user folder succeeded");
        assert_eq!(
            std::fs::read(user.join("holiday.jpg")).unwrap(),
            b"irreplaceable"
        );
    }
    // Its own export is replaced with --force, and only with it.
    let out = t.path().join("gptq");
    ok(export(&out, false));
    assert!(!export(&out, false).status.success());
    ok(export(&out, true));
    assert!(out.join("config.json").exists());
    assert_none_hidden(t.path());
}

#[test]
fn forced_quantize_keeps_the_source_model_folder_and_foreign_gguf() {
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let src = models.join("model.gguf");
    std::fs::copy(gguf(), &src).unwrap();
    let before = std::fs::metadata(&src).unwrap().len();
    refused(
        &quantize(&src, &models, &["--force"]),
        "not written by adaptq",
    );
    assert_eq!(std::fs::metadata(&src).unwrap().len(), before);
    // A GGUF adaptq did not write is refused as a --format gguf target, before any work.
    let o = quantize(&src, &src, &["--format", "gguf", "--force"]);
    refused(&o, "not written by adaptq");
    assert_eq!(std::fs::metadata(&src).unwrap().len(), before);
    // Its own GGUF is replaced.
    let mine = t.path().join("mine.gguf");
    ok(quantize(&src, &mine, &["--format", "gguf"]));
    ok(quantize(&src, &mine, &["--format", "gguf", "--force"]));
    assert_none_hidden(t.path());
}

#[test]
fn killed_runs_leave_the_old_bundle_and_nothing_that_blocks_the_next() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("b");
    ok(quantize(&gguf(), &out, &[]));
    // SIGKILL while the replacement is being written: the old bundle stays whole.
    let mut child = Command::new(BIN)
        .args(["quantize", s(&gguf()), "--out", s(&out), "--force"])
        .args(RTN8)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = t.path().join(format!(".b.partial-{}", child.id()));
    let start = Instant::now();
    while !staging.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    ok(adaptq(&["verify", s(&out)]));
    // What killed runs leave (a staging folder, the old bundle moved aside by a swap cut short)
    // belongs to dead processes: the next forced run clears it and succeeds.
    for stale in [".b.partial-4294967295", ".b.partial-4294967294-old"] {
        let d = t.path().join(stale);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("manifest.json"), b"{}").unwrap();
    }
    ok(quantize(&gguf(), &out, &["--force"]));
    ok(adaptq(&["verify", s(&out)]));
    assert_none_hidden(t.path());
}

#[test]
fn closed_stdout_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(BIN)
        .args(["info", s(&gguf())])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
}

/// The SmolLM2 GGUF with the u32 value of `key` overwritten.
fn gguf_with_u32(key: &str, value: u32, out: &Path) {
    let mut b = std::fs::read(gguf()).unwrap();
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .expect("key in the header");
    let v = at + key.len() + 4;
    assert_eq!(&b[at + key.len()..v], &4u32.to_le_bytes(), "{key} is a u32");
    b[v..v + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(out, b).unwrap();
}

#[test]
fn a_layer_count_the_file_does_not_back_is_an_error_not_an_abort() {
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("bad.gguf");
    gguf_with_u32("llama.block_count", u32::MAX, &bad);
    let corpus = t.path().join("t.txt");
    std::fs::write(
        &corpus,
        "It is a truth universally acknowledged. ".repeat(40),
    )
    .unwrap();
    for args in [
        [&["eval", s(&bad), "--text", s(&corpus)], ONE_WINDOW].concat(),
        vec![
            "quantize",
            s(&bad),
            "--out",
            s(&t.path().join("q")),
            "--method",
            "gptq",
            "--calib",
            s(&corpus),
        ],
    ] {
        let o = adaptq(&args);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("4294967295 layers"), "{}", text(&o));
    }
}

#[test]
fn a_rehashed_bundle_with_a_flat_embedding_is_refused_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (b, rtn8_f16) = (t.path().join("b"), "--method rtn --bits 8 --embeddings f16");
    ok(cli::quantize(BIN, &gguf(), &b, &args(rtn8_f16)));
    adaptq_testutil::bundle::rehash(&b, |m| {
        let emb = m["tensors"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|t| t["name"] == "token_embd.weight")
            .unwrap();
        let numel: u64 = emb["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        emb["shape"] = serde_json::json!([numel]);
    });
    let corpus = t.path().join("t.txt");
    std::fs::write(&corpus, "A short text to score. ".repeat(40)).unwrap();
    let o = adaptq(&[&["eval", s(&b), "--text", s(&corpus)], ONE_WINDOW].concat());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("token_embd.weight"), "{}", text(&o));
}

#[test]
fn escape_codes_from_a_file_never_reach_the_terminal() {
    let t = tempfile::tempdir().unwrap();
    let mut b = std::fs::read(gguf()).unwrap();
    let key = b"general.architecture";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // type 8 (string), length 5, "llama" -> "ESC[31m"
    assert_eq!(&b[at + 12..at + 17], b"llama");
    b[at + 12..at + 17].copy_from_slice(b"\x1b[31m");
    let bad = t.path().join("evil.gguf");
    std::fs::write(&bad, b).unwrap();
    for args in [
        vec!["info", s(&bad)],
        vec!["quantize", s(&bad), "--out", s(&t.path().join("q"))],
    ] {
        let o = adaptq(&args);
        let all = text(&o);
        assert!(!o.status.success(), "{all}");
        assert!(!all.contains('\u{1b}'), "raw escape code printed: {all:?}");
        assert!(
            all.contains("evil.gguf"),
            "error does not name the file: {all}"
        );
    }
}

//! Running the `adaptq` binary from a CLI test, and reading what it wrote: the binary's path is
//! only known to the test crate (`env!("CARGO_BIN_EXE_adaptq")`), so it is passed in.
//!
//! [`run`] captures a run; [`ok`] and [`refused`] assert how it ended; [`json`] parses its
//! standard output; [`manifest`] and [`verification`] read a bundle's records.

pub use crate::bundle::{manifest, read_json, verification};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `bin` with `args`, capturing its output.
pub fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
}

/// Standard output then standard error, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `o`, after asserting that the run succeeded (the failure shows its output).
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// Asserts that the run failed and that its output says `what`.
pub fn refused(o: &Output, what: &str) {
    assert!(!o.status.success(), "succeeded: {}", text(o));
    assert!(text(o).contains(what), "no '{what}' in: {}", text(o));
}

/// Asserts that the run failed and that its standard error says `what`.
pub fn refused_saying(o: &Output, what: &str) {
    assert!(!o.status.success(), "succeeded: {}", text(o));
    assert!(
        stderr(o).contains(what),
        "no '{what}' on stderr: {}",
        text(o)
    );
}

/// Standard output parsed as one JSON value (a `--json` run).
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON value ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// The items of the array `v[key]` (`tensors`, `gates`, ...).
pub fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array '{key}' in {v}"))
}

/// The item of `v[key]` whose `name` is `name` (a gate, a tensor).
pub fn named<'a>(v: &'a Value, key: &str, name: &str) -> &'a Value {
    items(v, key)
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no '{name}' in '{key}'"))
}

/// Round-to-nearest, 4 bits, symmetric groups of 128: the reference bundle of the CLI tests.
pub const RTN4: &[&str] = &[
    "--method",
    "rtn",
    "--bits",
    "4",
    "--group-size",
    "128",
    "--sym",
];

/// `adaptq quantize SRC --out OUT EXTRA...`.
pub fn quantize(bin: &str, src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["quantize", s(src), "--out", s(out)];
    a.extend_from_slice(extra);
    run(bin, &a)
}

/// Arguments written as one line: `args("--bits 4 --sym")` (no argument holds a space).
pub fn args(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// `--calib TEXT --calib-samples SAMPLES --seq-len SEQ_LEN`.
pub fn calib<'a>(text: &'a Path, samples: &'a str, seq_len: &'a str) -> Vec<&'a str> {
    vec![
        "--calib",
        s(text),
        "--calib-samples",
        samples,
        "--seq-len",
        seq_len,
    ]
}

/// Builds `<dir>/a` and `<dir>/b` with `build`, asserts they are byte-identical and that
/// `a` verifies; returns `a`.
pub fn built_twice(bin: &str, dir: &Path, build: impl Fn(&Path)) -> std::path::PathBuf {
    let (a, b) = (dir.join("a"), dir.join("b"));
    build(&a);
    build(&b);
    crate::files::assert_same(&a, &b);
    ok(run(bin, &["verify", s(&a)]));
    a
}

/// A path as an argument (the fixtures' and temporary paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

//! Running the `adaptq` binary from a CLI test: the binary's path is only known to the test
//! crate (`env!("CARGO_BIN_EXE_adaptq")`), so it is passed in.

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

//! Locations of the real-model fixtures and text corpora, shared by every crate's tests.
//!
//! Fixtures are fetched by `scripts/fetch-fixtures.sh` into `.cache/fixtures/` (override with
//! `ADAPTQ_FIXTURES`); the Austen corpora sit beside the repository in `../shared/corpora/austen`
//! (override with `ADAPTQ_CORPORA`). A missing fixture fails the test with the command to run,
//! rather than skipping it silently.
//!
//! The test kit beside them: [`cli`] runs the binary and reads what it wrote; [`files`] looks
//! at folders and special files; [`compare`] compares float vectors; [`rand`] makes seeded data; [`gguf`], [`safetensors`] and
//! [`bundle`] build small inputs byte by byte or with the real writer; [`loading`] is the glue
//! of the loader's hostile-input tests and fuzz targets; [`mutate`] is the seeded mutation
//! engine of the readers' mutation tests; [`hub_server`] is a local model hub; [`llamacpp`] runs
//! llama.cpp's tools as the reference.

pub mod bundle;
pub mod cli;
pub mod compare;
pub mod files;
pub mod gguf;
pub mod hub_server;
pub mod llamacpp;
pub mod loading;
pub mod mutate;
pub mod rand;
pub mod safetensors;
pub mod tiny;

use std::path::{Path, PathBuf};

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The message of an error a test expects; a success fails the test.
pub fn err_text<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("succeeded where an error was expected"),
        Err(e) => e.to_string(),
    }
}

pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("ADAPTQ_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/fixtures"));
    assert!(
        p.join("smollm2").exists(),
        "fixtures missing at {}: run scripts/fetch-fixtures.sh",
        p.display()
    );
    p
}

/// The SmolLM2-135M GGUF (Q4_1; dequantized to f32 it is the reference model).
pub fn smollm2_gguf() -> PathBuf {
    fixtures().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The MiniLM (BERT) safetensors folder.
pub fn minilm() -> PathBuf {
    fixtures().join("minilm")
}

/// A text of the shared Austen corpus (`emma.txt` calibrates, `prideprejudice.txt` evaluates).
pub fn corpus(name: &str) -> PathBuf {
    let p = std::env::var_os("ADAPTQ_CORPORA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/corpora/austen"))
        .join(name);
    assert!(
        p.exists(),
        "corpus text {} missing (expected ../shared/corpora/austen)",
        p.display()
    );
    p
}

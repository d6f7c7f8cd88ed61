//! Every decoder architecture adaptq runs, against llama.cpp on files neither wrote: seeded
//! random-weight F32 GGUFs from `scripts/reference/random_gguf.py` (gguf-py, SmolLM2's
//! vocabulary, a few layers with each architecture's features switched on) are evaluated by
//! `adaptq eval` and by `llama-perplexity` on the same text (ctx 128, 4 windows, second half
//! scored). The perplexities must agree within 0.1 %.
//!
//! So that agreement means something, each architecture also names a variant with one
//! feature changed (softcap, window, q/k norm, RoPE factors, biases): adaptq's perplexity on
//! it must be more than 0.3 % away from llama.cpp's on the real file, so an adaptq that
//! ignored the feature would fail. The reference runs with f32 keys/values and no flash
//! attention; llama.cpp's defaults (f16) moved these figures by at most 0.008 % when measured.

use adaptq_testutil::cli::{json, ok, run, s};
use adaptq_testutil::llamacpp;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");
const CTX: &str = "128";
const CHUNKS: &str = "4";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes `arch`'s random model (seed 1) with the `--set` switches given.
fn write_model(arch: &str, out: &Path, sets: &[&str]) {
    let mut cmd = Command::new("bash");
    cmd.current_dir(repo()).args([
        "-c",
        r#"source scripts/python-env.sh && exec "$venv/bin/python" scripts/reference/random_gguf.py "$@""#,
        "random_gguf",
        arch,
        s(out),
        "--seed",
        "1",
    ]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let o = cmd.output().expect("running random_gguf.py");
    assert!(
        o.status.success(),
        "random_gguf.py {arch}: {}",
        adaptq_testutil::cli::text(&o)
    );
}

fn ours(model: &Path, text: &Path) -> f64 {
    let o = ok(run(
        BIN,
        &[
            "eval",
            s(model),
            "--text",
            s(text),
            "--ctx",
            CTX,
            "--score",
            "second-half",
            "--chunks",
            CHUNKS,
            "--json",
        ],
    ));
    json(&o)["ppl"].as_f64().expect("ppl")
}

fn theirs(bin: &Path, model: &Path, text: &Path) -> f64 {
    llamacpp::final_ppl(&llamacpp::run(
        bin,
        "llama-perplexity",
        &[
            "-m",
            s(model),
            "-f",
            s(text),
            "-c",
            CTX,
            "--chunks",
            CHUNKS,
            "-t",
            "2",
            "-fa",
            "off",
            "-ctk",
            "f32",
            "-ctv",
            "f32",
        ],
    ))
}

/// Architecture, and the variant whose feature adaptq must not ignore. Mistral's feature is its
/// 4:1 grouped-query layout, which the comparison itself covers: llama.cpp runs Mistral files
/// (arch `llama`) without a sliding window, so there is no switch to flip.
const CASES: &[(&str, &[&str])] = &[
    ("llama3", &["rope_freqs=ones"]),
    ("mistral", &[]),
    ("qwen2", &["qkv_bias=0"]),
    ("qwen3", &["qk_norm=ones"]),
    ("gemma2", &["attn_softcap=1e6"]),
    ("gemma3", &["window=1000000"]),
    ("phi3", &["short_ones=1"]),
];

#[test]
fn perplexity_matches_llama_cpp_on_random_models_of_each_architecture() {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for (arch, variant) in CASES {
        let (model, changed) = (
            dir.path().join(format!("{arch}.gguf")),
            dir.path().join(format!("{arch}-variant.gguf")),
        );
        write_model(arch, &model, &[]);
        let (a, t) = (ours(&model, &text), theirs(&bin, &model, &text));
        let rel = a / t - 1.0;
        let mut line = format!(
            "{arch}: adaptq {a:.4}, llama.cpp {t:.4} ({:+.4} %)",
            100.0 * rel
        );
        let mut moved = f64::INFINITY;
        if !variant.is_empty() {
            write_model(arch, &changed, variant);
            let v = ours(&changed, &text);
            moved = v / t - 1.0;
            line += &format!(
                "; adaptq with {variant:?}: {v:.4} ({:+.3} %)",
                100.0 * moved
            );
            std::fs::remove_file(&changed).unwrap();
        }
        std::fs::remove_file(&model).unwrap();
        if rel.abs() >= 1e-3 || moved.abs() <= 3e-3 {
            wrong.push(*arch);
        }
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{wrong:?}:\n{}", report.join("\n"));
}

//! Every decoder architecture adaptq runs, against llama.cpp on files neither wrote: seeded
//! random-weight F32 GGUFs from `scripts/reference/random_gguf.py` (gguf-py, SmolLM2's
//! vocabulary, a few layers with each architecture's features switched on) are evaluated by
//! `adaptq eval` and by `llama-perplexity` on the same text (ctx 128, 4 windows, second half
//! scored). The perplexities must agree within 0.1 %, on the exact path and on the packed
//! runtime's attention.
//!
//! So that agreement means something, each architecture also names a variant with one
//! feature changed (softcap, window, q/k norm, RoPE factors, biases): adaptq's perplexity on
//! it must be more than 0.3 % away from llama.cpp's on the real file, so an adaptq that
//! ignored the feature would fail. The reference runs with f32 keys/values and no flash
//! attention; llama.cpp's defaults (f16) moved these figures by at most 0.008 % when measured.

use adaptq_testutil::cli::{args, ok, quantize, run, s};
use adaptq_testutil::llamacpp;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");
/// Context and windows of the comparison.
const RUN: (&str, &str) = ("128", "4");

fn ours(model: &Path, text: &Path, run: (&str, &str)) -> f64 {
    llamacpp::adaptq_ppl(BIN, model, text, run, "--exact")
}

fn ours_on(model: &Path, text: &Path, run: (&str, &str), kernels: &str) -> f64 {
    llamacpp::adaptq_ppl(BIN, model, text, run, kernels)
}

fn theirs(bin: &Path, model: &Path, text: &Path, run: (&str, &str)) -> f64 {
    llamacpp::peer_ppl(bin, model, text, run)
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
        llamacpp::random_gguf(&bin, arch, &model, &[], None);
        let (a, t) = (ours(&model, &text, RUN), theirs(&bin, &model, &text, RUN));
        // The packed runtime's own attention (these F32 files have no blocks to pack).
        let p = ours_on(&model, &text, RUN, "--packed");
        let rel = a / t - 1.0;
        let mut line = format!(
            "{arch}: adaptq {a:.4}, packed {p:.4}, llama.cpp {t:.4} ({:+.4} %)",
            100.0 * rel
        );
        if (p / t - 1.0).abs() >= 1e-3 {
            wrong.push(*arch);
        }
        let mut moved = f64::INFINITY;
        if !variant.is_empty() {
            llamacpp::random_gguf(&bin, arch, &changed, variant, None);
            let v = ours(&changed, &text, RUN);
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

/// Past Phi-3's trained context (512 in the random file) llama.cpp takes the long RoPE
/// factors: adaptq must too, so there the short factors make no difference at all.
#[test]
fn phi3_takes_its_long_rope_factors_past_the_trained_context() {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let (model, changed) = (dir.path().join("phi3.gguf"), dir.path().join("short.gguf"));
    llamacpp::random_gguf(&bin, "phi3", &model, &[], None);
    llamacpp::random_gguf(&bin, "phi3", &changed, &["short_ones=1"], None);
    let long = ("1024", "1");
    let (a, t, v) = (
        ours(&model, &text, long),
        theirs(&bin, &model, &text, long),
        ours(&changed, &text, long),
    );
    assert!((a / t - 1.0).abs() < 1e-3, "adaptq {a}, llama.cpp {t}");
    assert_eq!(a, v, "the short factors changed a 1024-token window");
}

/// What follows the reading on every architecture: GPTQ with AWQ scales (calibrated on
/// emma.txt, onto a 4-bit grid that is Q4_0, IQ4_NL or IQ4_XS) writes a bundle that verifies;
/// its GGUF export scores in adaptq exactly as the bundle does (the same codes), and loads in
/// llama-perplexity. llama.cpp multiplies 4-bit blocks with 8-bit activations, which moves a
/// random model's perplexity by up to 0.8 % (Gemma 3 on IQ4_NL, measured on llama-quantize's
/// own file), so llama.cpp's score on the export must lie within 0.5 %, or within twice the
/// gap the two evaluators show on llama-quantize's `--pure` file of the same type. APQ, NOVAQ
/// and rotated RTN complete on the two most unusual layouts (Phi-3's fused projections,
/// Gemma 2's capped sliding layers).
#[test]
fn quantizers_and_gguf_export_run_on_each_architecture() {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let emma = adaptq_testutil::corpus("emma.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let calib = adaptq_testutil::cli::calib(&emma, "2", "64");
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for (arch, _) in CASES {
        let model = dir.path().join(format!("{arch}.gguf"));
        llamacpp::random_gguf(&bin, arch, &model, &[], None);
        let (b, e) = (
            dir.path().join(format!("{arch}-gptq")),
            dir.path().join(format!("{arch}-gptq.gguf")),
        );
        // Files go onto IQ4_NL's non-linear grid, IQ4_XS's super-blocks (mistral's rows are
        // 256 and 512 wide), or a 4-bit grid that is Q4_0.
        let (grid, peer) = match *arch {
            "qwen3" | "gemma3" | "phi3" => ("--ggml-type iq4_nl", "IQ4_NL"),
            "mistral" => ("--ggml-type iq4_xs", "IQ4_XS"),
            _ => ("--bits 4 --group-size 32 --sym", "Q4_0"),
        };
        let line = format!("--method gptq --awq {grid} --min-cosine 0");
        let gptq = [args(&line), calib.clone()].concat();
        ok(quantize(BIN, &model, &b, &gptq));
        ok(run(BIN, &["export", s(&b), "--to", "gguf", "--out", s(&e)]));
        let (a, x, t) = (
            ours(&b, &text, RUN),
            ours(&e, &text, RUN),
            theirs(&bin, &e, &text, RUN),
        );
        let pure = dir.path().join(format!("{arch}-{peer}.gguf"));
        llamacpp::run(
            &bin,
            "llama-quantize",
            &["--pure", s(&model), s(&pure), peer],
        );
        let gap = ours(&pure, &text, RUN) / theirs(&bin, &pure, &text, RUN) - 1.0;
        let rel = a / t - 1.0;
        report.push(format!(
            "{arch} ({grid}): GPTQ+AWQ bundle {a:.4}, its GGUF in adaptq {x:.4}, in llama.cpp \
             {t:.4} ({:+.3} %); llama-quantize's {peer} file: adaptq/llama.cpp {:+.3} %",
            100.0 * rel,
            100.0 * gap
        ));
        if a != x || rel.abs() >= 5e-3f64.max(2.0 * gap.abs()) {
            wrong.push(*arch);
        }
        std::fs::remove_file(&pure).unwrap();
        if matches!(*arch, "phi3" | "gemma2") {
            for (name, line) in [
                (
                    "apq",
                    "--method apq --bits 3-4 --target-bpw 3.6 --sym --heldout-windows 1 \
                     --max-ppl-delta 1000 --max-rounds 1 --min-cosine 0",
                ),
                (
                    "novaq",
                    "--method novaq --target-bits 2.5 --level1-centroids 16 \
                     --level2-centroids 16 --max-iterations 2 --refine-iterations 1 \
                     --rotate --min-cosine 0",
                ),
                ("rtn-rotated", "--bits 3 --rotate --min-cosine 0"),
            ] {
                let out = dir.path().join(format!("{arch}-{name}"));
                let o = quantize(BIN, &model, &out, &[args(line), calib.clone()].concat());
                // Exit 3 is a gate's verdict on a written bundle (a random model's greedy
                // continuations loop, which the gold-prompt gate reports); anything else is not.
                assert!(
                    matches!(o.status.code(), Some(0 | 3)),
                    "{arch} {name}: {}",
                    adaptq_testutil::cli::text(&o)
                );
                ok(run(BIN, &["verify", s(&out)]));
                let p = ours(&out, &text, RUN);
                report.push(format!("{arch}: {name} bundle {p:.4}"));
            }
        }
        std::fs::remove_file(&model).unwrap();
    }
    eprintln!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{wrong:?}:\n{}", report.join("\n"));
}

/// `--target-bpw` with GGUF output picks a GGML type per tensor under the budget, every tensor
/// counted as llama.cpp counts a file, and llama.cpp runs the mixed file as adaptq does.
#[test]
fn gguf_type_mix_keeps_its_budget_and_runs_in_llama_cpp() {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let emma = adaptq_testutil::corpus("emma.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mistral.gguf");
    llamacpp::random_gguf(&bin, "mistral", &model, &[], None);
    let calib = adaptq_testutil::cli::calib(&emma, "2", "64");
    let target = 4.0;
    let line = format!("--method gptq --format gguf --target-bpw {target} --min-cosine 0");
    let file = dir.path().join("mix.gguf");
    let o = ok(quantize(
        BIN,
        &model,
        &file,
        &[args(&line), calib.clone()].concat(),
    ));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // "... (GGUF v3, B bytes, X bits/weight over P parameters): T ×n, ..."
    let line = out
        .lines()
        .find(|l| l.contains("GGUF v3"))
        .unwrap_or_else(|| panic!("no GGUF line in:\n{out}"));
    let bpw: f64 = line
        .split(" bits/weight")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no bits/weight in {line}"));
    let planned: f64 = out
        .lines()
        .find_map(|l| l.split("(planned ").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no planned figure in:\n{out}"));
    assert!(
        bpw <= target,
        "file is {bpw} bits per weight, budget {target}"
    );
    assert!(
        bpw > target - 0.25,
        "budget left unspent: {bpw} of {target}"
    );
    assert!(
        (bpw - planned).abs() < 1e-3,
        "planned {planned}, file {bpw}"
    );
    let types: Vec<&str> = line
        .rsplit("): ")
        .next()
        .unwrap()
        .split(", ")
        .filter(|t| !t.starts_with("F32"))
        .collect();
    assert!(types.len() >= 2, "one type is no mix: {line}");
    let (a, t) = (ours(&file, &text, RUN), theirs(&bin, &file, &text, RUN));
    eprintln!("mix {line}\n  adaptq {a:.4}, llama.cpp {t:.4}");
    assert!((a / t - 1.0).abs() < 1e-3, "adaptq {a} vs llama.cpp {t}");
}

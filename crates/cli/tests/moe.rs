//! Mixtures of experts against llama.cpp on files neither wrote: seeded random-weight F32
//! GGUFs from `scripts/reference/random_gguf.py` with 8 experts, top-2 (Mixtral's `llama`
//! layout with experts, Qwen2-MoE with its gated shared expert, Qwen3-MoE, OLMoE), evaluated
//! by `adaptq eval` (exact and packed kernels) and by `llama-perplexity` on the same text.

use adaptq_testutil::llamacpp;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");
/// Context and windows of the comparison.
const RUN: (&str, &str) = ("128", "4");

/// Architecture, and a variant whose change adaptq must not ignore: how many experts a token
/// takes, the shared expert, OLMoE's whole-projection q/k norms. Renormalised (Mixtral,
/// Qwen3-MoE) against raw (Qwen2-MoE, OLMoE) top-k weights is covered by the comparison
/// itself.
const CASES: &[(&str, &str)] = &[
    ("mixtral", "n_expert_used=1"),
    ("qwen2moe", "shexp=0"),
    ("qwen3moe", "n_expert_used=1"),
    ("olmoe", "qk_norm=ones"),
];

#[test]
fn mixture_of_experts_perplexity_matches_llama_cpp() {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let (mut report, mut wrong) = (Vec::new(), Vec::new());
    for (arch, variant) in CASES {
        let (model, changed) = (
            dir.path().join(format!("{arch}.gguf")),
            dir.path().join(format!("{arch}-variant.gguf")),
        );
        llamacpp::random_gguf(&bin, arch, &model, &[], None);
        llamacpp::random_gguf(&bin, arch, &changed, &[variant], None);
        let t = llamacpp::peer_ppl(&bin, &model, &text, RUN);
        let ours = |m: &Path, k| llamacpp::adaptq_ppl(BIN, m, &text, RUN, k);
        let (a, p, v) = (
            ours(&model, "--exact"),
            ours(&model, "--packed"),
            ours(&changed, "--exact"),
        );
        let rel = |x: f64| x / t - 1.0;
        report.push(format!(
            "{arch}: llama.cpp {t:.4}, adaptq {a:.4} ({:+.4} %), packed {p:.4} ({:+.4} %); \
             with {variant}: {v:.4} ({:+.3} %)",
            100.0 * rel(a),
            100.0 * rel(p),
            100.0 * rel(v)
        ));
        if rel(a).abs() >= 1e-3 || rel(p).abs() >= 1e-3 || rel(v).abs() <= 3e-3 {
            wrong.push(*arch);
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{wrong:?}:\n{}", report.join("\n"));
}

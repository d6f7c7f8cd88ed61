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

/// GPTQ at 4 bits on Mixtral- and Qwen2-MoE-style files (calibrated on emma.txt): every
/// expert is quantized, each expert's routed calibration tokens are recorded, the expert whose
/// router row reads the always-positive prior channel with weight -20 (so no token can pick
/// it) gets 0 tokens in every block and the all-token fallback; the KL divergence from the
/// float model is lower than RTN's at the same size; the GGUF export (experts stacked again)
/// scores in llama-perplexity within 0.5 % of adaptq on the bundle.
#[test]
fn gptq_calibrates_every_expert_and_exports_to_llama_cpp() {
    use adaptq_testutil::cli::{args, calib, json, ok, quantize, run, s};
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let emma = adaptq_testutil::corpus("emma.txt");
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let calib = calib(&emma, "16", "128");
    let mut report = Vec::new();
    for arch in ["mixtral", "qwen2moe"] {
        let model = dir.path().join(format!("{arch}.gguf"));
        llamacpp::random_gguf(&bin, arch, &model, &[], None);
        let (g, r) = (dir.path().join("gptq"), dir.path().join("rtn"));
        let grid = "--bits 4 --group-size 32 --sym --min-cosine 0";
        let line = format!("--method gptq {grid}");
        ok(quantize(
            BIN,
            &model,
            &g,
            &[args(&line), calib.clone()].concat(),
        ));
        ok(quantize(BIN, &model, &r, &args(grid)));

        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(g.join("manifest.json")).unwrap()).unwrap();
        let experts: Vec<&serde_json::Value> = manifest["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"].as_str().unwrap().contains("_exps."))
            .collect();
        let (layers, n) = (4, 8);
        assert_eq!(experts.len(), layers * n * 3, "{arch}: expert matrices");
        for t in &experts {
            assert_eq!(t["encoding"]["bits"], 4, "{arch}: {t}");
            assert_eq!(t["method"], "gptq", "{arch}: {t}");
        }
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(g.join("verification.json")).unwrap()).unwrap();
        let records = v["experts"]
            .as_array()
            .expect("experts in verification.json");
        assert_eq!(records.len(), layers * n, "{arch}: one record per expert");
        let tokens = |b: usize, j: usize| &records[b * n + j];
        for b in 0..layers {
            let dead = tokens(b, n - 1);
            assert_eq!(dead["tokens"], 0, "{arch}: {dead}");
            assert_eq!(dead["rule"], "routed+all-tokens", "{arch}: {dead}");
            let routed: u64 = (0..n)
                .map(|j| tokens(b, j)["tokens"].as_u64().unwrap())
                .sum();
            // 16 windows of 128 tokens, two experts each.
            assert_eq!(routed, 16 * 128 * 2, "{arch}: block {b}");
        }
        assert!(
            records.iter().any(|r| r["rule"] == "routed"),
            "{arch}: no expert had enough tokens of its own"
        );

        let kld = |m: &Path| {
            let o = ok(run(
                BIN,
                &[
                    "eval",
                    s(m),
                    "--base",
                    s(&model),
                    "--text",
                    s(&text),
                    "--ctx",
                    "128",
                    "--chunks",
                    "8",
                    "--json",
                ],
            ));
            json(&o)["kld_mean"].as_f64().unwrap()
        };
        let (kg, kr) = (kld(&g), kld(&r));
        let e = dir.path().join(format!("{arch}.q4.gguf"));
        ok(run(BIN, &["export", s(&g), "--to", "gguf", "--out", s(&e)]));
        let (a, t) = (
            llamacpp::adaptq_ppl(BIN, &g, &text, RUN, "--exact"),
            llamacpp::peer_ppl(&bin, &e, &text, RUN),
        );
        report.push(format!(
            "{arch}: KLD GPTQ {kg:.5}, RTN {kr:.5}; bundle PPL {a:.4}, its GGUF in llama.cpp \
             {t:.4} ({:+.3} %)",
            100.0 * (t / a - 1.0)
        ));
        assert!(kg < kr, "{}", report.join("\n"));
        assert!((t / a - 1.0).abs() < 5e-3, "{}", report.join("\n"));
        for p in [&g, &r] {
            std::fs::remove_dir_all(p).unwrap();
        }
    }
    eprintln!("{}", report.join("\n"));
}

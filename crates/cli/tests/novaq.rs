//! NOVAQ and residual rotation end to end on the real model: the layout and refinement
//! recorded per layer, rotated bundles that verify and load with their rotation, and rotation
//! alone leaving perplexity unchanged. That the same seed gives the same bytes is checked on
//! the tiny model (adaptq-pipeline's plan tests), where it costs seconds, not minutes.

use adaptq_testutil::cli::{
    self, args, items, json, manifest, ok, refused_saying, s, verification,
};
use std::path::Path;
use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

fn adaptq(args: &[&str]) -> Output {
    cli::run(BIN, args)
}

fn eval(model: &Path, extra: &[&str]) -> serde_json::Value {
    let text = adaptq_testutil::corpus("prideprejudice.txt");
    let mut a = vec!["eval", s(model), "--text", s(&text)];
    a.extend(args("--ctx 256 --chunks 2 --json"));
    a.extend_from_slice(extra);
    json(&ok(adaptq(&a)))
}

#[test]
fn rotation_alone_keeps_perplexity() {
    let g = adaptq_testutil::smollm2_gguf();
    let plain = eval(&g, &[])["ppl"].as_f64().unwrap();
    let rotated = eval(&g, &["--rotate", "5"])["ppl"].as_f64().unwrap();
    let rel = (rotated / plain - 1.0).abs();
    assert!(rel < 1e-3, "rotated PPL {rotated} vs {plain}");
}

#[test]
fn novaq_rotated_is_recorded_and_loads() {
    let g = adaptq_testutil::smollm2_gguf();
    let emma = adaptq_testutil::corpus("emma.txt");
    let t = tempfile::tempdir().unwrap();
    // Small codebooks and few iterations keep this test quick; the bench runs the real presets.
    let a = t.path().join("a");
    let novaq = [
        args("--method novaq --target-bits 2.5 --level1-centroids 16 --level2-centroids 16"),
        args("--max-iterations 4 --refine-iterations 3 --rotate"),
        cli::calib(&emma, "2", "64"),
        args("--seed 11 --min-cosine 0.5"),
    ]
    .concat();
    ok(cli::quantize(BIN, &g, &a, &novaq));
    ok(adaptq(&["verify", s(&a)]));

    let m = manifest(&a);
    let q = &m["quantization"];
    assert_eq!(q["method"], "novaq");
    assert_eq!(q["novaq"]["target_bits"], 2.5);
    assert_eq!(q["novaq"]["seed"], 11);
    assert_eq!(q["rotate"]["seed"], 11);
    let coded: Vec<&serde_json::Value> = items(&m, "tensors")
        .iter()
        .filter(|t| t["encoding"]["scheme"] == "codebook")
        .collect();
    assert_eq!(coded.len(), 210);

    let v = verification(&a);
    let layers = v["novaq"].as_array().unwrap();
    assert_eq!(layers.len(), 210);
    let mut lowered = 0;
    for l in layers {
        let bpw = l["bits_per_weight"].as_f64().unwrap();
        assert!(bpw <= 2.5 && bpw > 1.5, "{l}");
        let (b, a) = (
            l["error_before_refine"].as_f64().unwrap(),
            l["error_after_refine"].as_f64().unwrap(),
        );
        assert!(a <= b, "refinement may only be kept when it helps: {l}");
        lowered += (a < b) as usize;
    }
    assert!(
        lowered >= 180,
        "refinement helped on only {lowered} of 210 layers"
    );
    let tot = &v["totals"];
    assert!(tot["bits_per_quantized_weight"].as_f64().unwrap() <= 2.5);

    // The bundle loads with its rotation and predicts like a model, not noise.
    let e = eval(&a, &["--base", s(&g)]);
    let (ppl, top1) = (
        e["ppl"].as_f64().unwrap(),
        e["top1_agreement"].as_f64().unwrap(),
    );
    assert!(ppl.is_finite() && ppl < 400.0, "PPL {ppl}");
    assert!(top1 > 0.3, "top-1 agreement {top1}");

    // GGUF cannot carry the online rotation.
    let x = t.path().join("x.gguf");
    let o = adaptq(&[
        "export",
        s(&a),
        "--to",
        "gguf",
        "--out",
        s(&x),
        "--type",
        "q8_0",
    ]);
    refused_saying(&o, "rotated");
}

#[test]
fn novaq_settings_are_checked() {
    let g = adaptq_testutil::smollm2_gguf();
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o");
    for (args, what) in [
        (&["--preset", "balanced"][..], "--method novaq"),
        (
            &["--method", "novaq", "--target-bits", "0.2"],
            "target-bits",
        ),
        (&["--method", "rtn", "--rotate"], "--calib"),
    ] {
        refused_saying(&cli::quantize(BIN, &g, &o, args), what);
    }
}

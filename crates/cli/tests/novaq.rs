//! NOVAQ and residual rotation end to end on the real model: byte-identical bundles from the
//! same seed, the layout and refinement recorded per layer, rotated bundles that load with
//! their rotation, and rotation alone leaving perplexity unchanged.

use std::path::Path;
use std::process::{Command, Output};

fn corpus(name: &str) -> String {
    adaptq_testutil::corpus(name).to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_adaptq"))
        .args(args)
        .output()
        .expect("runs adaptq")
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "adaptq {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn eval(model: &str, extra: &[&str]) -> serde_json::Value {
    let text = corpus("prideprejudice.txt");
    let mut a = vec![
        "eval", model, "--text", &text, "--ctx", "256", "--chunks", "2", "--json",
    ];
    a.extend_from_slice(extra);
    serde_json::from_slice(&ok(&a).stdout).unwrap()
}

#[test]
fn rotation_alone_keeps_perplexity() {
    let g = adaptq_testutil::smollm2_gguf();
    let g = g.to_str().unwrap();
    let plain = eval(g, &[])["ppl"].as_f64().unwrap();
    let rotated = eval(g, &["--rotate", "5"])["ppl"].as_f64().unwrap();
    let rel = (rotated / plain - 1.0).abs();
    assert!(rel < 1e-3, "rotated PPL {rotated} vs {plain}");
}

#[test]
fn novaq_rotated_is_deterministic_recorded_and_loads() {
    let g = adaptq_testutil::smollm2_gguf();
    let g = g.to_str().unwrap();
    let emma = corpus("emma.txt");
    let t = tempfile::tempdir().unwrap();
    let out = |n: &str| t.path().join(n).to_string_lossy().into_owned();
    // Small codebooks and few iterations keep this test quick; the bench runs the real presets.
    let novaq = |dir: &str| {
        ok(&[
            "quantize",
            g,
            "--out",
            dir,
            "--method",
            "novaq",
            "--target-bits",
            "2.5",
            "--level1-centroids",
            "16",
            "--level2-centroids",
            "16",
            "--max-iterations",
            "4",
            "--refine-iterations",
            "3",
            "--rotate",
            "--calib",
            &emma,
            "--calib-samples",
            "2",
            "--seq-len",
            "64",
            "--seed",
            "11",
            "--min-cosine",
            "0.5",
        ])
    };
    let (a, b) = (out("a"), out("b"));
    novaq(&a);
    novaq(&b);
    let mut names: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    names.sort();
    for n in &names {
        assert_eq!(
            std::fs::read(Path::new(&a).join(n)).unwrap(),
            std::fs::read(Path::new(&b).join(n)).unwrap(),
            "{n} differs between identical runs"
        );
    }
    ok(&["verify", &a]);

    let m = json(&Path::new(&a).join("manifest.json"));
    let q = &m["quantization"];
    assert_eq!(q["method"], "novaq");
    assert_eq!(q["novaq"]["target_bits"], 2.5);
    assert_eq!(q["novaq"]["seed"], 11);
    assert_eq!(q["rotate"]["seed"], 11);
    let coded: Vec<&serde_json::Value> = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["encoding"]["scheme"] == "codebook")
        .collect();
    assert_eq!(coded.len(), 210);

    let v = json(&Path::new(&a).join("verification.json"));
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
    let e = eval(&a, &["--base", g]);
    let (ppl, top1) = (
        e["ppl"].as_f64().unwrap(),
        e["top1_agreement"].as_f64().unwrap(),
    );
    assert!(ppl.is_finite() && ppl < 400.0, "PPL {ppl}");
    assert!(top1 > 0.3, "top-1 agreement {top1}");

    // GGUF cannot carry the online rotation.
    let o = run(&[
        "export",
        &a,
        "--to",
        "gguf",
        "--out",
        &out("x.gguf"),
        "--type",
        "q8_0",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("rotated"));
}

#[test]
fn novaq_settings_are_checked() {
    let g = adaptq_testutil::smollm2_gguf();
    let g = g.to_str().unwrap();
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o").to_string_lossy().into_owned();
    let r = run(&["quantize", g, "--out", &o, "--preset", "balanced"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--method novaq"));
    let r = run(&[
        "quantize",
        g,
        "--out",
        &o,
        "--method",
        "novaq",
        "--target-bits",
        "0.2",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("target-bits"));
    let r = run(&["quantize", g, "--out", &o, "--method", "rtn", "--rotate"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--calib"));
}

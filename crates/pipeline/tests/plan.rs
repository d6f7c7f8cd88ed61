//! Every method's path through `Plan`, on the tiny in-memory Llama: each run writes a bundle
//! that verifies, with the tensors the method should have produced, in seconds. Refusals of
//! impossible combinations come from `Plan::new`, before any work.

use adaptq_pipeline::{Choice, Method, Plan, PlanError, QuantizeOptions};
use adaptq_testutil::tiny::{TinyLlama, Work};
use serde_json::{json, Value};
use std::path::Path;

/// Test options over the shared folder of outputs and calibration text.
trait Options {
    fn options(&self, name: &str, method: Method, changes: Value) -> QuantizeOptions;
}

impl Options for Work {
    /// Options for a small calibrated run of `method` into `name`, with `changes` (option
    /// keys, as in a config file) laid over them.
    fn options(&self, name: &str, method: Method, changes: Value) -> QuantizeOptions {
        let base = json!({
            "src": "tiny", "out": self.out(name), "method": method.name(), "group_size": 32,
            "calib": self.calib(), "calib_samples": 2, "seq_len": 32, "heldout_windows": 1,
            "gold_tokens": 2, "max_rounds": 1, "max_iterations": 3, "refine_iterations": 1,
            "min_cosine": 0.0,
        });
        QuantizeOptions::merged(&base, &changes).unwrap()
    }
}

/// Runs `options` on the tiny model; returns the manifest's encodings and methods by tensor.
fn run(options: QuantizeOptions) -> (adaptq_pipeline::Outcome, Vec<(String, String, String)>) {
    let plan = Plan::new(options).unwrap();
    let model = TinyLlama::new(7);
    let outcome = plan.run_on(&model, "file:tiny", &mut ()).unwrap();
    let tensors = outcome
        .summary
        .manifest
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.encoding.label(), t.method.clone()))
        .collect();
    (outcome, tensors)
}

fn verifies(dir: &Path) {
    let rep = adaptq_bundle::verify_bundle(dir, |_| {});
    assert!(rep.ok(), "{:?}", rep.problems);
}

/// Encoding label and method of the first block's q projection.
fn q_proj(tensors: &[(String, String, String)]) -> (&str, &str) {
    let t = tensors
        .iter()
        .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
        .expect("q_proj stored");
    (t.1.as_str(), t.2.as_str())
}

#[test]
fn rtn_ternary_and_uncalibrated_novaq_round_each_tensor_alone() {
    let w = Work::new();
    let cases = [
        (Method::Rtn, "int4-g32-asym", "rtn"),
        (Method::Ternary, "int2-g32-sym", "ternary"),
        (Method::Novaq, "novaq", "novaq"),
    ];
    for (m, enc, method) in cases {
        let (out, t) = run(w.options(m.name(), m, json!({"calib": null})));
        verifies(&out.out);
        let (e, me) = q_proj(&t);
        assert!(e.starts_with(enc) && me == method, "{m:?}: {e} {me}");
        assert!(out.summary.verification.calibration.is_none());
        // Norms and the embedding stay float.
        assert!(t.iter().any(|x| x.0 == "model.norm.weight" && x.1 == "f32"));
        assert!(t
            .iter()
            .any(|x| x.0 == "model.embed_tokens.weight" && x.1 == "f16"));
    }
}

#[test]
fn calibrated_methods_record_their_calibration() {
    let w = Work::new();
    let cases = [
        (Method::Gptq, false, "gptq"),
        (Method::Awq, false, "awq+rtn"),
        (Method::Gptq, true, "awq+gptq"),
        (Method::Novaq, false, "novaq"),
    ];
    for (i, (m, awq, method)) in cases.into_iter().enumerate() {
        let (out, t) = run(w.options(&format!("c{i}"), m, json!({ "awq": awq })));
        verifies(&out.out);
        assert_eq!(q_proj(&t).1, method);
        let cal = out.summary.verification.calibration.as_ref().unwrap();
        assert_eq!((cal.config.samples, cal.config.seq_len), (2, 32));
        assert_eq!(cal.config.file, "calib.txt");
    }
}

#[test]
fn apq_mixes_widths_and_quantizes_the_embedding() {
    let w = Work::new();
    let changes = json!({"bits": "2-4", "target_bpw": 3.5, "sym": true});
    let (out, t) = run(w.options("apq", Method::Apq, changes));
    verifies(&out.out);
    let emb = t
        .iter()
        .find(|x| x.0 == "model.embed_tokens.weight")
        .unwrap();
    assert!(emb.1.starts_with("int"), "{emb:?}");
    let gates: Vec<&str> = out
        .summary
        .verification
        .gates
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    assert!(gates.contains(&"heldout_ppl_delta"), "{gates:?}");

    // Rotated: profiled, calibrated and stored as W·R (far from W, unlike the plain run's
    // codes), the rotation recorded for the loader. The table pinned at 4 bits (the untied
    // head calibrated at that width too).
    let changes = json!({"bits": "2-4", "target_bpw": 3.5, "rotate": true, "embed_bits": 4});
    let plain = out.out.clone();
    let (out, t) = run(w.options("apq-rot", Method::Apq, changes));
    verifies(&out.out);
    assert!(out.summary.manifest.quantization["rotate"]["seed"].is_u64());
    assert_eq!(q_proj(&t).1, "gptq");
    let name = "model.layers.0.self_attn.q_proj.weight";
    let source = adaptq_source::TensorSource::read_f32(&TinyLlama::new(7), name).unwrap();
    let cosine = |dir: &Path| {
        let q = adaptq_bundle::Bundle::open(dir)
            .unwrap()
            .read_f32(name)
            .unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        dot(&q, &source) / (dot(&q, &q) * dot(&source, &source)).sqrt()
    };
    assert!(cosine(&plain) > 0.9, "{}", cosine(&plain));
    assert!(cosine(&out.out) < 0.5, "{}", cosine(&out.out));
    for (name, method) in [
        ("model.embed_tokens.weight", "rtn"),
        ("lm_head.weight", "gptq"),
    ] {
        let x = t.iter().find(|x| x.0 == name).unwrap();
        assert!(x.1.starts_with("int4-") && x.2 == method, "{x:?}");
    }
}

/// `embed_bits` gives the table and the separate head their own width, on the direct path and
/// through calibration. The tiny model is untied: its table is rounded to nearest either way,
/// its head calibrated by GPTQ on the head's inputs when the method calibrates.
#[test]
fn the_embedding_takes_its_own_width() {
    let w = Work::new();
    for (m, head) in [(Method::Rtn, "rtn"), (Method::Gptq, "gptq")] {
        let mut changes = json!({"embeddings": "quant", "embed_bits": 6, "bits": 3});
        if m == Method::Rtn {
            changes["calib"] = Value::Null;
        }
        let (out, t) = run(w.options(&format!("emb-{}", m.name()), m, changes));
        verifies(&out.out);
        for (name, method) in [
            ("model.embed_tokens.weight", "rtn"),
            ("lm_head.weight", head),
        ] {
            let x = t.iter().find(|x| x.0 == name).unwrap();
            assert!(x.1.starts_with("int6-g32") && x.2 == method, "{m:?}: {x:?}");
        }
        assert!(q_proj(&t).0.starts_with("int3-g32"), "{:?}", q_proj(&t));
        assert_eq!(out.summary.manifest.quantization["embed_bits"], 6);
    }
}

#[test]
fn rotation_ggml_gguf_and_rans_take_their_paths() {
    let w = Work::new();
    let (out, t) = run(w.options("rot", Method::Rtn, json!({"rotate": true})));
    verifies(&out.out);
    assert_eq!(q_proj(&t).1, "rtn");
    assert!(out.summary.manifest.quantization["rotate"]["seed"].is_u64());

    // 64-wide rows do not fit Q4_K's 256 blocks: llama.cpp's fallback, Q5_0.
    let (out, t) = run(w.options("ggml", Method::Gptq, json!({"ggml_type": "q4_k"})));
    verifies(&out.out);
    assert_eq!(q_proj(&t), ("ggml-Q5_0", "gptq"));

    let changes = json!({"format": "gguf", "calib": null});
    let (out, _) = run(w.options("m.gguf", Method::Rtn, changes));
    assert!(out.gguf.is_some() && out.out.is_file());
    assert!(adaptq_export::is_adaptq_gguf(&out.out));

    let changes = json!({"lossless": "rans", "calib": null, "bits": 3});
    let (out, _) = run(w.options("rans", Method::Rtn, changes));
    verifies(&out.out);
    assert!(out.summary.verification.totals.lossless_ratio.is_some());
}

/// The entropy-coded grid: 6-bit codes on a step of half each row's RMS are stored (by rANS)
/// in far fewer bits than their width, rounded more finely than a fitted 3-bit grid of about
/// that size, and the step is recorded. The table takes its own, coarser step.
#[test]
fn an_entropy_coded_step_stores_codes_below_their_width() {
    let w = Work::new();
    let base = json!({"sym": true, "group_size": 0, "lossless": "rans", "rotate": true});
    let mut step = base.clone();
    step["bits"] = json!(6);
    step["entropy_step"] = json!(0.5);
    step["embeddings"] = json!("quant");
    step["embed_step"] = json!(1.0);
    let (out, t) = run(w.options("step", Method::Gptq, step));
    verifies(&out.out);
    assert_eq!(q_proj(&t), ("int6-g64-sym", "gptq"));
    assert_eq!(out.summary.manifest.quantization["entropy_step"], 0.5);
    assert_eq!(out.summary.manifest.quantization["embed_step"], 1.0);
    let bits = |name: &str| {
        let v = &out.summary.verification.tensors;
        v.iter().find(|t| t.name == name).unwrap().bits_per_weight
    };
    let (table, q) = (
        bits("model.embed_tokens.weight"),
        bits("model.layers.0.self_attn.q_proj.weight"),
    );
    assert!(table < q - 0.5, "table {table} bits, q_proj {q}");
    let mut fitted = base;
    fitted["bits"] = json!(3);
    fitted["group_size"] = json!(32);
    let (three, _) = run(w.options("three", Method::Gptq, fitted));
    let (a, b) = (&out.summary.verification, &three.summary.verification);
    let bpw = a.totals.bits_per_quantized_weight;
    assert!(bpw < 4.0, "6-bit codes stored in {bpw} bits per weight");
    let worst = |v: &adaptq_bundle::verification::Verification| {
        v.tensors
            .iter()
            .filter(|t| t.name.ends_with("proj.weight"))
            .filter_map(|t| t.error.as_ref().map(|e| e.rel_mse))
            .fold(0f64, f64::max)
    };
    assert!(
        worst(a) < worst(b),
        "step {} vs 3-bit {}",
        worst(a),
        worst(b)
    );
}

/// NOVAQ with its bits spread: `target_bits` is the linear layers' average; each layer's own
/// target is recorded, its layout fits that target, and the layers together fit the average.
#[test]
fn novaq_spreads_its_bits_within_the_average() {
    let w = Work::new();
    let spread = json!({"target_bits": 3.0, "spread_bits": true, "rotate": true});
    let (out, _) = run(w.options("spread", Method::Novaq, spread));
    verifies(&out.out);
    let q = &out.summary.manifest.quantization;
    assert_eq!(q["novaq"]["spread"], true);
    let targets = q["novaq"]["targets"].as_object().expect("targets recorded");
    assert_eq!(targets.len(), 14, "{targets:?}");
    let v = &out.summary.verification;
    let (mut bits, mut params) = (0.0, 0.0);
    for t in v.tensors.iter().filter(|t| targets.contains_key(&t.name)) {
        let target = targets[&t.name].as_f64().unwrap();
        assert!(adaptq_pipeline::spread::CANDIDATES.contains(&target));
        assert!(
            t.bits_per_weight <= target,
            "{} {}",
            t.name,
            t.bits_per_weight
        );
        bits += t.bits_per_weight * t.params as f64;
        params += t.params as f64;
    }
    assert!(bits / params <= 3.0, "{}", bits / params);
    assert!(
        bits / params > 2.5,
        "the average is spent: {}",
        bits / params
    );
}

/// Every calibrated method, rotated NOVAQ, APQ and a refined entropy-coded step included, is
/// byte-for-byte repeatable: the same options give the same global digest (the CLI tests on
/// the real model build once).
#[test]
fn the_same_options_give_the_same_bundle() {
    let w = Work::new();
    let cases = [
        (Method::Gptq, json!({"awq": true})),
        (Method::Novaq, json!({"rotate": true, "seed": 11})),
        (
            Method::Apq,
            json!({"bits": "2-4", "target_bpw": 3.5, "sym": true}),
        ),
        (
            Method::Apq,
            json!({"bits": "2-4", "target_bpw": 3.5, "rotate": true}),
        ),
        (
            Method::Gptq,
            json!({"bits": 6, "sym": true, "entropy_step": 0.5, "lossless": "rans",
                   "refine": "blockwise", "refine_epochs": 1, "calib_samples": 8}),
        ),
    ];
    for (i, (m, changes)) in cases.into_iter().enumerate() {
        let digest = |name: String| {
            run(w.options(&name, m, changes.clone()))
                .0
                .summary
                .manifest
                .global_digest
        };
        assert_eq!(digest(format!("a{i}")), digest(format!("b{i}")), "{m:?}");
    }
}

#[test]
fn impossible_combinations_are_refused_before_any_work() {
    let w = Work::new();
    let cases = [
        (
            Method::Ternary,
            json!({"rotate": true}),
            "rotation works with",
        ),
        (Method::Gptq, json!({"rotate": true, "awq": true}), "AWQ"),
        (
            Method::Rtn,
            json!({"rotate": true, "calib": null}),
            "calibration text",
        ),
        (
            Method::Rtn,
            json!({"rotate": true, "format": "gguf"}),
            "llama.cpp",
        ),
        (Method::Gptq, json!({"bits": "3-4"}), "is a range"),
        (Method::Gptq, json!({"embed_bits": 6}), "embeddings quant"),
        (
            Method::Gptq,
            json!({"embed_bits": 9, "embeddings": "quant"}),
            "between 2 and 8",
        ),
        (
            Method::Apq,
            json!({"embed_bits": 6, "bits": "2-4"}),
            "one of its widths",
        ),
        (Method::Rtn, json!({"target_bits": 2.0}), "NOVAQ settings"),
        (Method::Rtn, json!({"spread_bits": true}), "NOVAQ settings"),
        (
            Method::Novaq,
            json!({"spread_bits": true, "blocks": "0..1"}),
            "block ranges",
        ),
        (
            Method::Novaq,
            json!({"spread_bits": true, "calib": null}),
            "calibration text",
        ),
        (Method::Apq, json!({"ggml_type": "q4_0"}), "GGML types"),
        (
            Method::Gptq,
            json!({"ggml_type": "q4_0", "refit": true}),
            "refit",
        ),
        (Method::Novaq, json!({"format": "gguf"}), "codebooks"),
        (
            Method::Rtn,
            json!({"ggml_type": "q9_9"}),
            "unknown GGML type",
        ),
        (Method::Rtn, json!({"src": null}), "no model"),
        (
            Method::Gptq,
            json!({"target_bpw": 4.0}),
            "no budget to spend",
        ),
        (
            Method::Ternary,
            json!({"target_bpw": 4.0, "format": "gguf"}),
            "rtn, gptq or awq",
        ),
        (
            Method::Rtn,
            json!({"target_bpw": 4.0, "format": "gguf", "calib": null}),
            "measured sensitivity",
        ),
        (
            Method::Apq,
            json!({"blocks": "0..1"}),
            "re-runs the whole model",
        ),
        (
            Method::Rtn,
            json!({"resume": true, "calib": null}),
            "does not calibrate here",
        ),
        (
            Method::Gptq,
            json!({"inputs_from": "p0"}),
            "give blocks too",
        ),
        (
            Method::Gptq,
            json!({"entropy_step": 0.3}),
            "set lossless to rans",
        ),
        (Method::Gptq, json!({"embed_step": 0.3}), "set entropy_step"),
        (
            Method::Apq,
            json!({"entropy_step": 0.3, "lossless": "rans", "bits": "2-4"}),
            "fixed code widths",
        ),
        (
            Method::Gptq,
            json!({"entropy_step": 0.3, "lossless": "rans", "range_search": true}),
            "choose one",
        ),
        (
            Method::Novaq,
            json!({"entropy_step": 0.3, "lossless": "rans"}),
            "does not round onto it",
        ),
        (Method::Gptq, json!({"blocks": "2..1"}), "is empty"),
        (
            Method::Rtn,
            json!({"refine": "both", "refine_samples": 1}),
            "at least 2",
        ),
        (
            Method::Rtn,
            json!({"refine": "both", "refine_samples": 100000}),
            "at most 1024",
        ),
        (
            Method::Rtn,
            json!({"refine": "e2e", "refine_e2e_lr": -0.1}),
            "positive number",
        ),
        (Method::Gptq, json!({"blocks": "1"}), "write A..B"),
        (
            Method::Gptq,
            json!({"blocks": "0..1", "target_bpw": 4.0, "format": "gguf"}),
            "whole model",
        ),
    ];
    for (method, changes, what) in cases {
        let o = w.options("x", method, changes);
        let e = format!("{:#}", Plan::new(o).err().expect("refused"));
        assert!(e.contains(what), "'{what}' not in: {e}");
    }
    let e = Plan::new(w.options("x", Method::Gptq, json!({"calib": null})))
        .err()
        .unwrap();
    assert!(
        matches!(e.downcast_ref(), Some(PlanError::NeedsCalibration("gptq"))),
        "{e}"
    );
}

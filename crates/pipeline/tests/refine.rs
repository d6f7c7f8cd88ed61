//! Teacher-guided refinement on the tiny in-memory Llama: it lowers the held-out loss it is
//! judged by (a broken gradient would leave every phase at epoch 0 and fail), moves only
//! scales, mins and norms (codes stay, and so do every tensor's size and the bits per weight),
//! and the same seed writes the same bundle.

use adaptq_pipeline::{Plan, QuantizeOptions};
use adaptq_quant::LayerCodes;
use adaptq_testutil::tiny::{text, TinyLlama, Work};
use serde_json::{json, Value};

/// Test options over the shared folder of outputs and calibration text.
trait Options {
    fn options(&self, name: &str, changes: Value) -> QuantizeOptions;
}

impl Options for Work {
    fn options(&self, name: &str, changes: Value) -> QuantizeOptions {
        let base = json!({
            "src": "tiny", "out": self.out(name), "method": "rtn", "bits": 3,
            "group_size": 32, "embeddings": "quant", "calib": self.calib(),
            "calib_samples": 8, "seq_len": 32, "min_cosine": 0.0,
        });
        QuantizeOptions::merged(&base, &changes).unwrap()
    }
}

fn run(o: QuantizeOptions) -> adaptq_pipeline::Outcome {
    Plan::new(o)
        .unwrap()
        .run_on(&TinyLlama::new(7), "file:tiny", &mut ())
        .unwrap()
}

fn refine_section(out: &adaptq_pipeline::Outcome) -> Value {
    out.summary.verification.extra["refine"].clone()
}

#[test]
fn refinement_lowers_the_heldout_loss_and_repeats_byte_for_byte() {
    let w = Work::new();
    let r = json!({"refine": "both", "refine_epochs": 3, "refine_lr": 0.003});
    let plain = run(w.options("plain", json!({})));
    let a = run(w.options("a", r.clone()));
    let b = run(w.options("b", r));
    assert_eq!(
        a.summary.manifest.global_digest, b.summary.manifest.global_digest,
        "same seed, same bundle"
    );
    assert_ne!(
        a.summary.manifest.global_digest,
        plain.summary.manifest.global_digest
    );
    let rep = refine_section(&a);
    assert_eq!(
        (
            rep["train_windows"].as_u64(),
            rep["heldout_windows"].as_u64()
        ),
        (Some(7), Some(1))
    );
    // Its own window count (more windows than calibration's) and end-to-end step: another
    // step leaves the block-wise phase as it was and moves the end-to-end one.
    let more = |lr: f64| json!({"refine": "both", "refine_epochs": 1, "refine_samples": 16, "refine_e2e_lr": lr});
    let m = run(w.options("more", more(0.0005)));
    let mrep = refine_section(&m);
    let other = refine_section(&run(w.options("other", more(0.005))));
    assert_eq!(mrep["blockwise"], other["blockwise"]);
    assert_ne!(mrep["e2e"]["train_kl"], other["e2e"]["train_kl"]);
    assert_eq!(
        (
            mrep["train_windows"].as_u64(),
            mrep["heldout_windows"].as_u64()
        ),
        (Some(14), Some(2))
    );
    assert_eq!(
        (mrep["lr"].as_f64(), mrep["e2e_lr"].as_f64()),
        (Some(0.001), Some(0.0005))
    );
    assert_eq!(
        m.summary.manifest.quantization["options"]["refine_samples"],
        16
    );
    let e2e = &rep["e2e"];
    let held: Vec<f64> = e2e["heldout_kl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let kept = e2e["kept_epoch"].as_u64().unwrap() as usize;
    assert!(
        kept >= 1,
        "end to end never improved the held-out KL: {held:?}"
    );
    assert!(held[kept] < 0.9 * held[0], "held-out KL {held:?}");
    assert_eq!(e2e["embedding_trained"], true);
    let blocks = rep["blockwise"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    for blk in blocks {
        let h = blk["heldout_loss"].as_array().unwrap();
        let k = blk["kept_epoch"].as_u64().unwrap() as usize;
        assert!(k >= 1, "block never improved: {blk}");
        assert!(h[k].as_f64().unwrap() < h[0].as_f64().unwrap());
    }
    // Same sizes: only continuous parameters moved.
    let (pa, pp) = (&a.summary.manifest.tensors, &plain.summary.manifest.tensors);
    assert_eq!(pa.len(), pp.len());
    for (x, y) in pa.iter().zip(pp) {
        assert_eq!((&x.name, x.payload_len()), (&y.name, y.payload_len()));
    }
    assert_eq!(
        a.summary.verification.totals.bits_per_weight,
        plain.summary.verification.totals.bits_per_weight
    );
}

#[test]
fn codes_stay_and_scales_move() {
    use adaptq_pipeline::refine::{run as refine, RefineSettings, TOP_K};
    let model = TinyLlama::new(7);
    let cfg = adaptq_pipeline::QuantizeConfig {
        bits: 3,
        group_size: 24,
        embeddings: adaptq_pipeline::EmbeddingMode::Quant,
        ..Default::default()
    };
    let bytes: Vec<u32> = text(2, 4 * 40).bytes().map(u32::from).collect();
    let windows: Vec<Vec<u32>> = bytes.chunks(40).map(|c| c.to_vec()).collect();
    let settings = RefineSettings {
        mode: adaptq_pipeline::RefineMode::E2e,
        epochs: 2,
        lr: 0.01,
        e2e_lr: None,
        cosine_weight: 0.1,
        seed: 0,
        top_k: TOP_K,
    };
    let mut cal = adaptq_pipeline::calibrate::Calibration::default();
    let rep = refine(
        &model,
        &cfg,
        &mut cal,
        &windows,
        &settings,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(rep["e2e"]["kept_epoch"].as_u64() > Some(0), "{rep}");
    let mut moved = 0;
    for (name, c) in &cal.layers {
        let LayerCodes::Int(q) = &c.q else {
            panic!("{name}: rtn gives integer grids")
        };
        let info = adaptq_source::TensorSource::tensors(&model)
            .iter()
            .find(|i| &i.name == name)
            .unwrap();
        let x = adaptq_source::TensorSource::read_f32(&model, name).unwrap();
        let rtn = adaptq_quant::quantize_rtn(
            &x,
            q.rows,
            q.cols,
            &adaptq_quant::RtnConfig {
                bits: 3,
                group_size: 24,
                grid: q.grid,
            },
        )
        .unwrap();
        assert_eq!(q.codes, rtn.codes, "{name}: codes must not change");
        moved += usize::from(q.scales != rtn.scales);
        assert_eq!(info.shape.len(), 2);
    }
    assert!(
        moved >= cal.layers.len() - 1,
        "{moved} of {} layers",
        cal.layers.len()
    );
    assert!(cal.overrides.keys().any(|n| n == "model.norm.weight"));
}

/// GGML blocks and NOVAQ codebooks train too: the end-to-end phase improves the held-out KL on
/// what the bundle stores, and the GGML blocks' re-encoding cost is recorded.
#[test]
fn ggml_blocks_and_codebooks_refine() {
    let w = Work::new();
    let cases = [
        (
            "q4_0",
            json!({"ggml_type": "q4_0", "ggml_embedding_type": "q8_0"}),
        ),
        (
            "novaq",
            // NOVAQ's alternating rounds leave codebooks near the layer-wise optimum: a
            // smaller step than the grids' finds the end-to-end gain.
            json!({"method": "novaq", "embeddings": "f16", "target_bits": 3.0,
                   "max_iterations": 3, "refine_iterations": 1, "refine_lr": 0.003}),
        ),
    ];
    for (name, changes) in cases {
        let mut c = changes.clone();
        c["refine"] = json!("e2e");
        c["refine_epochs"] = json!(3);
        if c.get("refine_lr").is_none() {
            c["refine_lr"] = json!(0.01);
        }
        let out = run(w.options(name, c));
        let rep = refine_section(&out);
        let e2e = &rep["e2e"];
        assert_eq!(e2e["written"], true, "{name}: {rep}");
        let held = e2e["heldout_kl"][0].as_f64().unwrap();
        assert!(
            e2e["heldout_kl_stored"].as_f64().unwrap() < held,
            "{name}: {rep}"
        );
        match name {
            "q4_0" => {
                let g = &rep["ggml_reencode"];
                assert!(g["layers"].as_u64() > Some(0), "{rep}");
                // Q4_0/Q8_0 scales are f16 already: only f16 rounding.
                assert!(g["max_rel_error"].as_f64().unwrap() < 1e-5, "{rep}");
            }
            _ => assert!(rep.get("ggml_reencode").is_none()),
        }
    }
}

/// A rotated model refines too: its online rotations run as dense products while it trains
/// (the same function as the fast transform), and the bundle improves on the held-out KL.
#[test]
fn rotated_models_refine() {
    use adaptq_model::llama::Llama;
    let model = TinyLlama::new(7);
    let w = adaptq_model::borrowed_source(&model);
    let mut m = Llama::load(w.desc(), w.as_ref()).unwrap();
    m.rotate(5).unwrap();
    let tokens: Vec<u32> = text(3, 30).bytes().map(u32::from).collect();
    let fast = m.forward(&tokens, None, None).unwrap();
    m.set_differentiable(true).unwrap();
    let dense = m.forward(&tokens, None, None).unwrap();
    let diff = (fast - dense).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    let work = Work::new();
    let c = json!({"method": "gptq", "rotate": true, "seed": 5, "refine": "both",
                   "refine_epochs": 3, "refine_lr": 0.002});
    let rep = refine_section(&run(work.options("rot", c)));
    assert_eq!(rep["e2e"]["written"], true, "{rep}");
}

/// `adaptq report` draws the curves: the end-to-end table per epoch, each block's before and
/// after, and the SVG line and bars.
#[test]
fn the_report_draws_the_loss_curves() {
    let w = Work::new();
    let o = w.options(
        "rep",
        json!({"refine": "both", "refine_epochs": 2, "refine_lr": 0.01}),
    );
    let out = run(o);
    let r = adaptq_bundle::report::build(&out.out).unwrap();
    let held = r["refine"]["e2e"]["heldout_kl"].as_array().unwrap().len();
    assert!(held >= 2, "{}", r["refine"]);
    let md = adaptq_bundle::report::markdown(&r);
    assert!(md.contains("## Teacher-guided refinement"), "{md}");
    let first = format!(
        "| 0 | - | {:.5} |",
        r["refine"]["e2e"]["heldout_kl"][0].as_f64().unwrap()
    );
    assert!(md.contains(&first), "{md}");
    assert_eq!(
        md.matches("\n| 1 | 0.").count(),
        2,
        "an e2e epoch row and block 1's row: {md}"
    );
    let html = adaptq_bundle::report::html(&r);
    assert!(html.contains("<polyline") && html.contains("held-out loss after / before"));
    let plain = adaptq_bundle::report::build(&run(w.options("p", json!({}))).out).unwrap();
    assert!(plain.get("refine").is_none());
    assert!(!adaptq_bundle::report::html(&plain).contains("<polyline"));
}

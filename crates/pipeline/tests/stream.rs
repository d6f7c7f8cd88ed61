//! Calibration streamed block by block from the file gives exactly what it gives on a model held
//! whole: the same codes, errors, folded norms and AWQ search for every kind of rounding. So
//! does a run split into two block ranges whose parts go through their checkpoint files (the
//! second starting from the activations the first saved), and, with float inputs, two
//! independent ranges against one float-input run, and a run whose activations are spilled to
//! a scratch file.

use adaptq_model::llama::Llama;
use adaptq_pipeline::calibrate::{
    calib_info, calibrate_job, calibrate_llama, Blocks, CalibSpec, Calibration, Job, Rounding,
};
use adaptq_pipeline::checkpoint::{Checkpoint, JobPlan};
use adaptq_pipeline::GptqSettings;
use adaptq_quant::ggml::{BlockType, GgmlSpec};
use adaptq_quant::Grid;
use adaptq_testutil::tiny::TinyLlama;

fn spec(rounding: Rounding) -> CalibSpec {
    CalibSpec {
        bits: 4,
        group_size: 32,
        grid: Grid::Asymmetric,
        rounding,
        awq: false,
        widths: Default::default(),
        embed_bits: None,
        keep_hessians: false,
        refit: false,
        ggml: None,
        rotate: None,
        range_search: false,
        entropy_step: None,
        embed_step: None,
        ggml_types: Default::default(),
        mix: None,
        novaq_spread: false,
        novaq_targets: Default::default(),
    }
}

fn gptq() -> Rounding {
    Rounding::Gptq(GptqSettings {
        act_order: true,
        ..GptqSettings::default()
    })
}

fn windows() -> Vec<Vec<u32>> {
    (0..3u32)
        .map(|k| (0..24).map(|i| (i * 37 + k * 11) % 256).collect())
        .collect()
}

/// Calibrates the tiny model with its blocks held, then streamed; both results.
fn both(spec: &CalibSpec) -> (Calibration, Calibration) {
    let model = TinyLlama::new(3);
    let w = adaptq_model::borrowed_source(&model);
    let desc = w.desc().clone();
    let windows = windows();
    let mut held = Llama::load(&desc, w.as_ref()).unwrap();
    let a = calibrate_llama(&mut held, Blocks::Held, &windows, spec, &mut |_, _| {}).unwrap();
    let mut shell = Llama::load_shell(&desc, w.as_ref()).unwrap();
    assert!(shell.blocks.is_empty(), "a shell holds no block");
    let stream = Blocks::Stream(w.as_ref());
    let b = calibrate_llama(&mut shell, stream, &windows, spec, &mut |_, _| {}).unwrap();
    assert!(shell.blocks.is_empty(), "streamed blocks are not kept");
    (a, b)
}

/// One streamed pass whose activations are all spilled to a scratch file.
fn spilled(spec: &CalibSpec) -> Calibration {
    let model = TinyLlama::new(3);
    let w = adaptq_model::borrowed_source(&model);
    let mut shell = Llama::load_shell(w.desc(), w.as_ref()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let spill = adaptq_pipeline::acts::Spill {
        dir: d.path().to_path_buf(),
        limit: 0,
    };
    let job = Job {
        spill: Some(&spill),
        ..Job::whole(w.desc().n_layers)
    };
    let stream = Blocks::Stream(w.as_ref());
    let cal = calibrate_job(&mut shell, stream, &windows(), spec, job, &mut |_, _| {}).unwrap();
    assert_eq!(
        cal.acts.map(|a| a.1),
        Some(true),
        "the activations were spilled"
    );
    cal
}

/// One streamed pass over all blocks with float inputs.
fn whole_fp(spec: &CalibSpec) -> Calibration {
    let model = TinyLlama::new(3);
    let w = adaptq_model::borrowed_source(&model);
    let mut shell = Llama::load_shell(w.desc(), w.as_ref()).unwrap();
    let job = Job {
        fp_inputs: true,
        ..Job::whole(w.desc().n_layers)
    };
    let stream = Blocks::Stream(w.as_ref());
    calibrate_job(&mut shell, stream, &windows(), spec, job, &mut |_, _| {}).unwrap()
}

/// The run as two range jobs, 0..1 and 1..n, each into its part folder, then joined from the
/// parts' files as `adaptq merge` joins them. With quantized inputs the second range starts
/// from the activations the first saved; with float inputs it runs the float block 0 itself.
/// The second range spills its activations to a scratch file.
fn split(spec: &CalibSpec, fp: bool) -> Calibration {
    let model = TinyLlama::new(3);
    let w = adaptq_model::borrowed_source(&model);
    let n = w.desc().n_layers;
    assert!(n >= 2);
    let windows = windows();
    let info = calib_info(std::path::Path::new("t.txt"), 24, 0, 100, &windows);
    let d = tempfile::tempdir().unwrap();
    let plan = |name: &str, range: std::ops::Range<usize>, from: Option<&str>| JobPlan {
        dir: d.path().join(name),
        range: Some(range),
        resume: false,
        force: false,
        fp_inputs: fp,
        inputs_from: from.map(|f| d.path().join(f)),
        options: Default::default(),
        recorded: serde_json::json!({"test": true}),
        locator: "file:tiny".into(),
    };
    // The second range spills every activation: those it reads from the first part's file too.
    let spill = adaptq_pipeline::acts::Spill {
        dir: d.path().to_path_buf(),
        limit: 0,
    };
    for (name, range, from) in [("p0", 0..1, None), ("p1", 1..n, (!fp).then_some("p0"))] {
        let spill = (name == "p1").then_some(&spill);
        let mut begin = plan(name, range, from)
            .begin(&model, &info, n, spill)
            .unwrap();
        if let (Some(xs), false) = (&begin.xs, fp) {
            assert!(
                xs.is_spilled(),
                "saved activations read into the scratch file"
            );
        }
        let mut shell = Llama::load_shell(w.desc(), w.as_ref()).unwrap();
        let job = Job {
            from: begin.from,
            end: begin.end,
            xs: begin.xs.take(),
            done: std::mem::take(&mut begin.done),
            fp_inputs: fp,
            save: Some(&mut begin.checkpoint),
            spill,
        };
        let stream = Blocks::Stream(w.as_ref());
        calibrate_job(&mut shell, stream, &windows, spec, job, &mut |_, _| {}).unwrap();
    }
    let parts = [d.path().join("p1"), d.path().join("p0")];
    let mut cal = Calibration::default();
    for p in adaptq_pipeline::checkpoint::open_parts(&parts).unwrap() {
        assert!(p.state.complete());
        cal.absorb(p.calibration().unwrap());
    }
    assert!(Checkpoint::open(&parts[0]).is_ok(), "parts stay");
    // The parts' codes stay in their block files; read them back to compare them.
    assert!(cal.layers.is_empty() && !cal.saved.is_empty());
    let files: std::collections::BTreeSet<_> =
        cal.saved.values().map(|(f, _)| f.path.clone()).collect();
    for (name, (file, summary)) in std::mem::take(&mut cal.saved) {
        let c = file.read().unwrap().layers.remove(&name).unwrap();
        assert_eq!(
            c.output_rel_error.to_bits(),
            summary.output_rel_error.to_bits()
        );
        cal.layers.insert(name, c);
    }
    assert!(files.len() >= 2, "one file per block");
    cal
}

fn assert_same(spec: CalibSpec, what: &str) {
    let (a, b) = both(&spec);
    assert!(!a.layers.is_empty());
    compare(&a, &b, what);
    compare(&a, &spilled(&spec), &format!("{what}, activations spilled"));
    compare(&a, &split(&spec, false), &format!("{what}, two ranges"));
    let fp = whole_fp(&spec);
    compare(
        &fp,
        &split(&spec, true),
        &format!("{what}, two float-input ranges"),
    );
}

fn compare(a: &Calibration, b: &Calibration, what: &str) {
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>(),
        "{what}: layers"
    );
    for (name, x) in &a.layers {
        let y = &b.layers[name];
        assert!(x.q == y.q, "{what}: codes of {name} differ");
        assert_eq!(x.method, y.method, "{what}: {name}");
        assert_eq!(
            x.output_rel_error.to_bits(),
            y.output_rel_error.to_bits(),
            "{what}: error of {name}"
        );
        assert_eq!(
            x.rtn_output_rel_error.to_bits(),
            y.rtn_output_rel_error.to_bits(),
            "{what}: RTN error of {name}"
        );
        assert_eq!(x.col_scale, y.col_scale, "{what}: column scales of {name}");
        assert_eq!(x.row_scale, y.row_scale, "{what}: row scales of {name}");
        assert_eq!(x.reference_weight, y.reference_weight, "{what}: {name}");
        assert_eq!(x.novaq, y.novaq, "{what}: NOVAQ report of {name}");
    }
    assert_eq!(a.overrides, b.overrides, "{what}: folded norms");
    let alphas = |c: &Calibration| c.awq.iter().map(|g| g.alpha).collect::<Vec<_>>();
    assert_eq!(alphas(a), alphas(b), "{what}: AWQ search");
}

#[test]
fn gptq_streamed_equals_held() {
    assert_same(spec(gptq()), "gptq");
}

#[test]
fn awq_and_rotation_streamed_equal_held() {
    assert_same(
        CalibSpec {
            awq: true,
            ..spec(gptq())
        },
        "awq+gptq",
    );
    assert_same(
        CalibSpec {
            rotate: Some(5),
            ..spec(gptq())
        },
        "rotated gptq",
    );
}

#[test]
fn ggml_head_and_quantized_embedding_streamed_equal_held() {
    // The untied head is read from the file at the end of a streamed run.
    let ggml = CalibSpec {
        ggml: Some(GgmlSpec {
            linear: BlockType::Q4_0,
            embedding: Some(BlockType::Q8_0),
        }),
        ..spec(gptq())
    };
    let (a, _) = both(&ggml);
    assert!(
        a.layers.contains_key("lm_head.weight"),
        "the head is calibrated"
    );
    assert_same(ggml, "ggml types");
    let mut widths = std::collections::BTreeMap::new();
    widths.insert("model.embed_tokens.weight".to_string(), 6);
    assert_same(
        CalibSpec {
            widths,
            ..spec(gptq())
        },
        "quantized embedding",
    );
}

#[test]
fn novaq_streamed_equals_held() {
    let cfg = adaptq_quant::novaq::NovaqConfig {
        target_bits: 3.0,
        max_iterations: 3,
        refine_iterations: 1,
        ..Default::default()
    };
    assert_same(spec(Rounding::Novaq(cfg)), "novaq");
}

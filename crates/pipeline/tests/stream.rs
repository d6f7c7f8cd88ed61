//! Calibration streamed block by block from the file gives exactly what it gives on a model held
//! whole: the same codes, errors, folded norms and AWQ search for every kind of rounding.

use adaptq_model::llama::Llama;
use adaptq_pipeline::calibrate::{calibrate_llama, Blocks, CalibSpec, Calibration, Rounding};
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
        keep_hessians: false,
        refit: false,
        ggml: None,
        rotate: None,
        range_search: false,
        ggml_types: Default::default(),
        mix: None,
    }
}

fn gptq() -> Rounding {
    Rounding::Gptq(GptqSettings {
        act_order: true,
        ..GptqSettings::default()
    })
}

/// Calibrates the tiny model with its blocks held, then streamed; both results.
fn both(spec: &CalibSpec) -> (Calibration, Calibration) {
    let model = TinyLlama::new(3);
    let w = adaptq_model::borrowed_source(&model);
    let desc = w.desc().clone();
    let windows: Vec<Vec<u32>> = (0..3u32)
        .map(|k| (0..24).map(|i| (i * 37 + k * 11) % 256).collect())
        .collect();
    let mut held = Llama::load(&desc, w.as_ref()).unwrap();
    let a = calibrate_llama(&mut held, Blocks::Held, &windows, spec, &mut |_, _| {}).unwrap();
    let mut shell = Llama::load_shell(&desc, w.as_ref()).unwrap();
    assert!(shell.blocks.is_empty(), "a shell holds no block");
    let stream = Blocks::Stream(w.as_ref());
    let b = calibrate_llama(&mut shell, stream, &windows, spec, &mut |_, _| {}).unwrap();
    assert!(shell.blocks.is_empty(), "streamed blocks are not kept");
    (a, b)
}

fn assert_same(spec: CalibSpec, what: &str) {
    let (a, b) = both(&spec);
    assert!(!a.layers.is_empty());
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
        assert_eq!(x.col_scale, y.col_scale, "{what}: column scales of {name}");
        assert_eq!(x.row_scale, y.row_scale, "{what}: row scales of {name}");
        assert_eq!(x.reference_weight, y.reference_weight, "{what}: {name}");
    }
    assert_eq!(a.overrides, b.overrides, "{what}: folded norms");
    let alphas = |c: &Calibration| c.awq.iter().map(|g| g.alpha).collect::<Vec<_>>();
    assert_eq!(alphas(&a), alphas(&b), "{what}: AWQ search");
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

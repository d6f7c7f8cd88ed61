//! GGUF export: what adaptq writes, adaptq (candle's GGML kernels) reads back with the bundle's
//! exact values, with the source's tokenizer metadata intact.

use adaptq_source::gguf::GgufSource;
use adaptq_source::TensorSource;
use adaptq_testutil::cli::{self, args, items, json, ok, refused_saying, s, verification};
use adaptq_testutil::smollm2_gguf;
use std::path::Path;
use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

/// `adaptq quantize MODEL --out BUNDLE EXTRA...`, which must succeed.
fn quantize(model: &Path, bundle: &Path, extra: &[&str]) {
    ok(cli::quantize(BIN, model, bundle, extra));
}

/// `adaptq export BUNDLE --to gguf --out GGUF EXTRA...`.
fn export(bundle: &Path, gguf: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["export", s(bundle), "--to", "gguf", "--out", s(gguf)];
    a.extend_from_slice(extra);
    cli::run(BIN, &a)
}

/// Every tensor of `gguf` decodes to exactly the bundle's values.
fn same_values(bundle: &Path, gguf: &Path) -> Vec<String> {
    let b = adaptq_bundle::Bundle::open(bundle).unwrap();
    let g = GgufSource::open(gguf).unwrap();
    let mut types = Vec::new();
    assert_eq!(g.tensors().len(), b.manifest.tensors.len());
    for (t, info) in b.manifest.tensors.iter().zip(g.tensors()) {
        assert_eq!(t.name, info.name, "tensor order kept");
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        assert_eq!(t.shape, shape, "{}", t.name);
        let want = b.read_f32(&t.name).unwrap();
        let got = g.read_f32(&t.name).unwrap();
        let same = want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "tensor '{}' ({:?}) differs", t.name, info.dtype);
        types.push(format!("{:?}", info.dtype));
    }
    types
}

/// Every type on a random-weight Llama-layout GGUF (gguf-py, SmolLM2's vocabulary) whose
/// rows are 320 wide (not a multiple of 256, as SmolLM2's 576 are not) and whose down
/// projections read 512: k-quants land on the down projections, the other rows take the
/// fallbacks, which covers the 32-blocks types too.
#[test]
fn gguf_export_holds_the_bundles_exact_values_for_every_type() {
    let bin = adaptq_testutil::llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model.gguf");
    let sets = [
        "n_embd=320",
        "n_head=10",
        "n_head_kv=2",
        "head_dim=32",
        "n_ff=512",
    ];
    adaptq_testutil::llamacpp::random_gguf(&bin, "mistral", &m, &sets, None);
    let linears = 2 * 7;
    let src = GgufSource::open(&m).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for ty in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1"] {
        let b = dir.path().join(format!("b-{ty}"));
        let g = dir.path().join(format!("{ty}.gguf"));
        quantize(&m, &b, &["--ggml-type", ty]);
        let o = ok(export(&b, &g, &[]));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("every tensor holds exactly"), "{text}");
        seen.extend(same_values(&b, &g));
        // The tokenizer and architecture metadata survive unchanged.
        let out = GgufSource::open(&g).unwrap();
        let (a, z) = (src.header().metadata.clone(), out.header().metadata.clone());
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.model",
            "general.architecture",
            "llama.rope.freq_base",
        ] {
            assert_eq!(a.get(key), z.get(key), "{key}");
        }
        assert_eq!(out.header().version, 3);
    }
    for t in [
        "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q5_0", "Q5_1", "Q8_0", "Q4_1", "IQ4NL",
    ] {
        assert!(
            seen.iter().any(|s| s.contains(t)),
            "{t} not exercised: {seen:?}"
        );
    }

    // An adaptq integer grid that *is* a GGML grid converts losslessly (groups of 128 repeat
    // their scale in each 32-value block; rows of 320 end in a short group of 64); others
    // are re-rounded and listed.
    let b = dir.path().join("int4");
    quantize(&m, &b, &args("--bits 4 --group-size 128"));
    let g = dir.path().join("int4.gguf");
    ok(export(&b, &g, &[]));
    same_values(&b, &g);
    let b = dir.path().join("int3");
    quantize(&m, &b, &["--bits", "3"]);
    let g = dir.path().join("int3.gguf");
    let v = json(&ok(export(&b, &g, &["--json"])));
    let rer: Vec<&serde_json::Value> = items(&v, "tensors")
        .iter()
        .filter(|t| t["exact"] == false)
        .collect();
    assert_eq!(rer.len(), linears, "every linear layer re-rounded");
    assert!(rer[0]["note"].as_str().unwrap().contains("no GGML twin"));
}

#[test]
fn a_bundle_that_fails_verification_is_not_exported() {
    let m = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("b");
    quantize(&m, &b, &["--ggml-type", "q4_0"]);
    let shard = b.join("shard-00003.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let g = dir.path().join("x.gguf");
    refused_saying(&export(&b, &g, &[]), "does not verify");
    assert!(!g.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
}

#[test]
fn gptq_writes_onto_ggml_grids_and_beats_their_rounding() {
    let (m, dir) = (smollm2_gguf(), tempfile::tempdir().unwrap());
    let emma = adaptq_testutil::corpus("emma.txt");
    let b = dir.path().join("b");
    let gptq = [
        args("--method gptq --ggml-type q4_k"),
        cli::calib(&emma, "2", "64"),
    ]
    .concat();
    quantize(&m, &b, &gptq);
    let v = verification(&b);
    let lin: Vec<&serde_json::Value> = items(&v, "tensors")
        .iter()
        .filter(|t| t["role"] == "linear")
        .collect();
    assert_eq!(lin.len(), 210);
    let mut better = 0;
    for t in &lin {
        let enc = t["encoding"].as_str().unwrap();
        let down = t["name"].as_str().unwrap().contains("ffn_down");
        assert_eq!(enc, if down { "ggml-Q4_K" } else { "ggml-Q5_0" }, "{t}");
        let (g, r) = (
            t["output_rel_error"].as_f64().unwrap(),
            t["rtn_output_rel_error"].as_f64().unwrap(),
        );
        better += (g < r) as usize;
    }
    // GPTQ lowers the calibration output error against the type's own round-to-nearest.
    assert!(
        better >= 200,
        "GPTQ beat RTN on only {better} of 210 layers"
    );
    let g = dir.path().join("g.gguf");
    ok(export(&b, &g, &[]));
    same_values(&b, &g);
}

//! Reader tests: hand-made valid and corrupt files, and both real fixture models.

use adaptq_source::model::{role_of, Family, RopeStyle};
use adaptq_source::{open, SourceError, SrcDType, TensorRole, TensorSource};
use std::path::Path;

use adaptq_testutil::safetensors::{file as tiny_safetensors, write, BERT_CONFIG, LLAMA_CONFIG};

/// A tiny llama GGUF: one F32 norm [8] and one Q8_0 matrix [2 rows x 32 cols].
fn tiny_gguf() -> Vec<u8> {
    let mut h = adaptq_testutil::gguf::tiny_llama().b;
    for i in 0..8 {
        h.extend((i as f32 * 0.5).to_le_bytes());
    }
    // Two Q8_0 blocks: d (f16) then 32 int8.
    for row in 0..2 {
        h.extend(half::f16::from_f32(0.25 * (row + 1) as f32).to_le_bytes());
        for j in 0..32i32 {
            h.push((j - 16) as i8 as u8);
        }
    }
    h
}

#[test]
fn handmade_gguf_reads_and_dequantizes() {
    let t = tempfile::tempdir().unwrap();
    let p = write(t.path(), "tiny.gguf", &tiny_gguf());
    let src = open(&p).unwrap();
    assert_eq!(src.format(), "gguf");
    let d = src.desc();
    assert_eq!(
        (d.n_layers, d.hidden, d.n_heads, d.n_kv_heads),
        (1, 8, 2, 2)
    );
    assert_eq!(d.rope_style, RopeStyle::AdjacentPairs);
    let norm = src.read_f32("blk.0.attn_norm.weight").unwrap();
    assert_eq!(norm, (0..8).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
    let q = src.info("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.shape, vec![2, 32]);
    assert_eq!(role_of(q), TensorRole::Linear);
    let w = src.read_f32("blk.0.attn_q.weight").unwrap();
    assert_eq!(w[0], 0.25 * -16.0);
    assert_eq!(w[31], 0.25 * 15.0);
    assert_eq!(w[32 + 17], 0.5 * 1.0);
}

fn open_err(bytes: &[u8], name: &str) -> String {
    let t = tempfile::tempdir().unwrap();
    let p = write(t.path(), name, bytes);
    match open(&p) {
        Ok(_) => panic!("corrupt {name} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_gguf_inputs_give_named_errors() {
    let good = tiny_gguf();
    // Truncated inside the metadata.
    let e = open_err(&good[..good.len() / 2], "t.gguf");
    assert!(
        e.contains("t.gguf") && e.contains("header ends early"),
        "{e}"
    );
    // Truncated tensor data.
    let e = open_err(&good[..good.len() - 5], "t.gguf");
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("past the end"),
        "{e}"
    );
    // Bad magic.
    let mut b = good.clone();
    b[0] = b'X';
    let e = open_err(&b, "t.gguf");
    assert!(e.contains("missing GGUF magic"), "{e}");
    // Unsupported version.
    let mut b = good.clone();
    b[4] = 9;
    let e = open_err(&b, "t.gguf");
    assert!(e.contains("version 9"), "{e}");
    // Absurd tensor count must not allocate; it must be rejected.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = open_err(&b, "t.gguf");
    assert!(e.contains("tensor count"), "{e}");
    // Unknown tensor type id (Q8_1 = 9 is not readable, 99 is not a type).
    let mut b = good.clone();
    let pos = b.windows(4).rposition(|w| w == 8u32.to_le_bytes()).unwrap();
    b[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = open_err(&b, "t.gguf");
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("unsupported dtype"),
        "{e}"
    );
    // Shorter than a header.
    let e = open_err(b"GG", "t.gguf");
    assert!(e.contains("shorter"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let b = tiny_gguf();
    let pat = b"llama";
    let pos = b.windows(5).position(|w| w == pat).unwrap();
    let mut c = b.clone();
    c[pos..pos + 5].copy_from_slice(b"gpt_x");
    let e = open_err(&c, "a.gguf");
    assert!(e.contains("unsupported architecture 'gpt_x'"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = open(Path::new("/nonexistent/model.gguf")).err().unwrap();
    assert!(matches!(e, SourceError::NotFound { .. }));
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

// ---------- safetensors ----------

fn st_dir(header: &str, data: &[u8]) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "model.safetensors",
        &tiny_safetensors(header, data),
    );
    write(t.path(), "config.json", LLAMA_CONFIG);
    t
}

#[test]
fn handmade_safetensors_f32_f16_bf16() {
    let (h, data) = adaptq_testutil::safetensors::float_trio();
    let t = st_dir(h, &data);
    let src = open(t.path()).unwrap();
    assert_eq!(src.read_f32("a").unwrap(), vec![1.0, -2.0]);
    assert_eq!(src.read_f32("b").unwrap(), vec![0.5, 3.0]);
    assert_eq!(src.read_f32("c").unwrap(), vec![-1.5, 8.0]);
    assert_eq!(src.desc().n_kv_heads, 1);
    assert_eq!(src.desc().rope_style, RopeStyle::Halves);
}

#[test]
fn sharded_safetensors_with_index() {
    let t = tempfile::tempdir().unwrap();
    let h1 = r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let h2 = r#"{"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    write(
        t.path(),
        "model-00001-of-00002.safetensors",
        &tiny_safetensors(h1, &7f32.to_le_bytes()),
    );
    write(
        t.path(),
        "model-00002-of-00002.safetensors",
        &tiny_safetensors(h2, &9f32.to_le_bytes()),
    );
    write(
        t.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"y":"model-00002-of-00002.safetensors","x":"model-00001-of-00002.safetensors"}}"#,
    );
    write(t.path(), "config.json", BERT_CONFIG);
    let src = open(t.path()).unwrap();
    let names: Vec<_> = src.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["x", "y"]);
    assert_eq!(src.read_f32("y").unwrap(), vec![9.0]);
    assert_eq!(src.desc().family, Family::Bert);
}

#[test]
fn corrupt_safetensors_give_named_errors() {
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3, 4, 5], "shorter than the 8-byte"),
        ((1u64 << 40).to_le_bytes().to_vec(), "exceeds the file"),
        (tiny_safetensors("{not json", &[]), "not valid JSON"),
        (
            tiny_safetensors(ok, &[0; 4]),
            "outside the 4-byte data section",
        ),
        (
            tiny_safetensors(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "needs 12 bytes",
        ),
        (
            tiny_safetensors(
                r#"{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#,
                &[0; 1],
            ),
            "unsupported dtype F8_E4M3",
        ),
    ];
    for (bytes, want) in cases {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), "m.safetensors", &bytes);
        write(t.path(), "config.json", BERT_CONFIG);
        let e = open(&p)
            .err()
            .unwrap_or_else(|| panic!("accepted: {want}"))
            .to_string();
        assert!(
            e.contains(want) && e.contains("m.safetensors"),
            "want '{want}', got: {e}"
        );
    }
}

#[test]
fn safetensors_without_config_explains() {
    let t = tempfile::tempdir().unwrap();
    let p = write(
        t.path(),
        "m.safetensors",
        &tiny_safetensors(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
    );
    let e = open(&p).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("architecture"),
        "{e}"
    );
}

// ---------- real fixtures ----------

/// Opens a real fixture model, asserting its family and its (layers, hidden, heads, feed-forward,
/// vocabulary) sizes; with the count of its linear tensors.
fn fixture(p: &Path, family: Family, sizes: [usize; 5]) -> (Box<dyn TensorSource>, usize) {
    let src = open(p).unwrap();
    let d = src.desc();
    assert_eq!(d.family, family);
    assert_eq!(
        [d.n_layers, d.hidden, d.n_heads, d.ffn_dim, d.vocab_size],
        sizes
    );
    let linear = src
        .tensors()
        .iter()
        .filter(|t| role_of(t) == TensorRole::Linear)
        .count();
    (src, linear)
}

#[test]
fn smollm2_gguf_fixture() {
    let sizes = [30, 576, 9, 1536, 49152];
    let (src, linear) = fixture(&adaptq_testutil::smollm2_gguf(), Family::Llama, sizes);
    let d = src.desc();
    assert_eq!(d.n_kv_heads, 3);
    assert!(d.tied_embeddings);
    assert_eq!(src.tensors().len(), 272);
    let params: usize = src.tensors().iter().map(|t| t.numel()).sum();
    assert_eq!(params, 134_515_008); // the anchors' figure
    assert_eq!(linear, 30 * 7);
    // Independent Q4_1 decode of the first block of a Q4_1 tensor.
    let name = "blk.0.attn_q.weight";
    let info = src.info(name).unwrap();
    assert_eq!(
        info.dtype,
        SrcDType::Ggml(adaptq_source::gguf::GgmlType::Q4_1)
    );
    assert_eq!(info.shape, vec![576, 576]);
    let raw = src.raw_bytes(name).unwrap();
    let dd = half::f16::from_le_bytes([raw[0], raw[1]]).to_f32();
    let m = half::f16::from_le_bytes([raw[2], raw[3]]).to_f32();
    let mut expect = [0f32; 32];
    for j in 0..16 {
        expect[j] = dd * (raw[4 + j] & 0xF) as f32 + m;
        expect[j + 16] = dd * (raw[4 + j] >> 4) as f32 + m;
    }
    let w = src.read_f32(name).unwrap();
    assert_eq!(w.len(), 576 * 576);
    assert_eq!(&w[..32], &expect);
    let md = src.gguf_metadata().unwrap();
    assert_eq!(
        md.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
}

#[test]
fn minilm_safetensors_fixture() {
    let sizes = [6, 384, 12, 1536, 30522];
    let (src, linear) = fixture(&adaptq_testutil::minilm(), Family::Bert, sizes);
    let d = src.desc();
    assert_eq!(d.license.as_deref(), Some("apache-2.0"));
    assert_eq!(src.tensors().len(), 104);
    let pos = src.info("embeddings.position_ids").unwrap();
    assert_eq!(pos.dtype, SrcDType::I64);
    assert_eq!(role_of(pos), TensorRole::Other);
    let q = src
        .info("encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert_eq!(q.shape, vec![384, 384]);
    assert_eq!(role_of(q), TensorRole::Linear);
    let w = src
        .read_f32("encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert!(w.iter().all(|v| v.is_finite()) && w.iter().any(|&v| v != 0.0));
    assert_eq!(linear, 6 * 6 + 1); // q, k, v, attn out, intermediate, output per layer + pooler
}

/// Every GGML block type adaptq reads: our block table agrees with candle's, and bytes written
/// by candle's quantizer decode through our reader path to what candle itself decodes.
#[test]
fn every_ggml_block_type_decodes() {
    use adaptq_source::gguf::{dequantize, GgmlType};
    use candle_core::quantized::{GgmlDType as C, QTensor};
    let n = 1024;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let t = candle_core::Tensor::from_vec(x.clone(), (4, 256), &candle_core::Device::Cpu).unwrap();
    let types = [
        (GgmlType::F32, C::F32),
        (GgmlType::F16, C::F16),
        (GgmlType::BF16, C::BF16),
        (GgmlType::Q4_0, C::Q4_0),
        (GgmlType::Q4_1, C::Q4_1),
        (GgmlType::Q5_0, C::Q5_0),
        (GgmlType::Q5_1, C::Q5_1),
        (GgmlType::Q8_0, C::Q8_0),
        (GgmlType::Q2K, C::Q2K),
        (GgmlType::Q3K, C::Q3K),
        (GgmlType::Q4K, C::Q4K),
        (GgmlType::Q5K, C::Q5K),
        (GgmlType::Q6K, C::Q6K),
    ];
    for (ours, theirs) in types {
        assert_eq!(
            ours.block(),
            (theirs.block_size(), theirs.type_size()),
            "{}",
            ours.name()
        );
        let q = QTensor::quantize(&t, theirs).unwrap();
        let bytes = q.data().unwrap();
        assert_eq!(
            bytes.len(),
            n / ours.block().0 * ours.block().1,
            "{}",
            ours.name()
        );
        let want = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = dequantize(ours, &bytes, n).unwrap();
        assert_eq!(got, want, "{}", ours.name());
        // And the values are a sane approximation of the input (coarsest: Q2_K).
        let err: f32 = got.iter().zip(&x).map(|(a, b)| (a - b).abs()).sum::<f32>() / n as f32;
        assert!(err < 0.2, "{}: mean abs error {err}", ours.name());
    }
}

//! Seeded mutation test of the readers of untrusted model files: the GGUF header and tensor
//! table, the safetensors header and the sharded index. Thousands of damaged variants of valid
//! inputs must each give `Ok` or `Err`: never a panic, never an allocation above 2 GiB.
//!
//! Deterministic (SplitMix64 from fixed seeds), so every failure names a seed that reproduces
//! it; `ADAPTQ_MUTATION_CASE=<reader>:<seed>` reruns one case uncaught, with its backtrace. The
//! libFuzzer targets in `fuzz/` search the same entry points open-endedly; this keeps the
//! guarantee in the normal suite.

use adaptq_source::blob::MemBlob;
use adaptq_source::gguf::{parse_header, GgufSource};
use adaptq_source::safetensors::{header_of, index_shard_names, SafetensorsSource};
use adaptq_source::TensorSource;
use adaptq_testutil::gguf::Writer as Gguf;
use adaptq_testutil::mutate::{
    finish, fuzz_seed_writer, json_mutate, mutate_bytes, run, Capped, Rng,
};
use adaptq_testutil::safetensors::{file as st_file, float_trio, LLAMA_CONFIG};
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: Capped = Capped;

/// Appends `n` bytes of tensor data: plausible f16 scales (so dequantized values are finite)
/// over random quants.
fn put_data(g: &mut Gguf, n: usize, seed: u64) -> &mut Gguf {
    let mut r = Rng(seed);
    g.raw(
        &(0..n)
            .map(|i| if i % 2 == 1 { 0x3c } else { r.next() as u8 })
            .collect::<Vec<u8>>(),
    )
}

/// The hand-made llama of `readers.rs`: one F32 norm [8] and one Q8_0 matrix [2 x 32].
fn gguf_tiny() -> Gguf {
    let mut g = adaptq_testutil::gguf::tiny_llama();
    put_data(&mut g, 32 + 2 * 34, 1);
    g
}

/// Every metadata value type (nested arrays, a tokenizer), 64-byte alignment, GGUF v2, and
/// tensors of F16, BF16, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K.
fn gguf_rich() -> Gguf {
    let mut g = Gguf::header(2, 7, 20);
    g.kv_model(
        "qwen2",
        &[
            ("block_count", 1),
            ("embedding_length", 32),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
            ("feed_forward_length", 64),
            ("context_length", 128),
        ],
    )
    .kv_u32("general.alignment", 64);
    g.str("qwen2.rope.freq_base").u32(6).u32(1e6f32.to_bits());
    g.str("qwen2.attention.layer_norm_rms_epsilon")
        .u32(12)
        .u64(1e-6f64.to_bits());
    g.str("general.file_type").u32(10).u64(2);
    g.str("general.quantized_by").u32(11).u64(-7i64 as u64);
    g.str("general.flag").u32(7);
    g.raw(&[1]);
    g.str("general.small").u32(0).raw(&[200]);
    g.str("general.u16").u32(2).raw(&7u16.to_le_bytes());
    g.kv_str("tokenizer.ggml.model", "gpt2")
        .kv_arr("tokenizer.ggml.tokens", 8, 6, |g, i| {
            g.str(["<s>", "</s>", "a", "b", "ab", "é"][i as usize]);
        });
    g.kv_arr("tokenizer.ggml.scores", 6, 6, |g, i| {
        g.u32((i as f32 * -0.5).to_bits());
    });
    g.kv_arr("tokenizer.ggml.token_type", 5, 6, |g, i| {
        g.u32(i as u32 % 3);
    });
    // An array of arrays of u8.
    g.kv_arr("general.nested", 9, 2, |g, i| {
        g.u32(0)
            .u64(i + 1)
            .raw(&(0..=i).map(|x| x as u8).collect::<Vec<u8>>());
    });
    let mut off = 0u64;
    let mut data = Vec::new();
    for (name, ne, ty, bytes) in [
        ("token_embd.weight", vec![32u64, 6], 1u32, 32 * 6 * 2),
        ("blk.0.attn_norm.weight", vec![32], 30, 64),
        ("blk.0.attn_q.weight", vec![32, 4], 2, 4 * 18),
        ("blk.0.attn_k.weight", vec![32, 2, 1], 3, 2 * 20),
        ("blk.0.attn_v.weight", vec![32, 1, 1, 2], 6, 2 * 22),
        ("blk.0.ffn_up.weight", vec![256, 1], 12, 144),
        ("output.weight", vec![256], 14, 210),
    ] {
        g.tensor(name, &ne, ty, off);
        data.push(bytes);
        off += (bytes as u64).div_ceil(64) * 64;
    }
    g.align(64);
    for (i, n) in data.into_iter().enumerate() {
        put_data(&mut g, n, i as u64).align(64);
    }
    g
}

/// A bert GGUF with a single f32 tensor.
fn gguf_bert() -> Gguf {
    let mut g = Gguf::header(3, 1, 6);
    g.kv_model(
        "bert",
        &[
            ("context_length", 512),
            ("block_count", 1),
            ("embedding_length", 8),
            ("attention.head_count", 1),
            ("feed_forward_length", 8),
        ],
    );
    g.tensor("blk.0.attn_output_norm.weight", &[8], 0, 0)
        .align(32);
    put_data(&mut g, 32, 7);
    g
}

/// Decodes every tensor an accepted source admits, raw and as f32; contract: an f32 tensor
/// has as many values as its shape. Always `true` (the source was accepted).
fn read_every(src: &dyn TensorSource) -> bool {
    for t in src.tensors() {
        if let Ok(v) = src.read_f32(&t.name) {
            assert_eq!(
                v.len(),
                t.numel(),
                "invariant: '{}' decodes to its shape",
                t.name
            );
        }
        let _ = src.raw_bytes(&t.name);
    }
    true
}

/// Every public way in: the header parser, the full source (tensor table checked against the
/// file, model description), and the decode of each tensor it admits.
fn check_gguf(bytes: &[u8]) -> bool {
    let _ = parse_header(bytes, Path::new("m.gguf"));
    let blob = MemBlob {
        label: PathBuf::from("m.gguf"),
        bytes: bytes.to_vec(),
    };
    let Ok(src) = GgufSource::from_blob(Box::new(blob), None) else {
        return false;
    };
    read_every(&src)
}

#[test]
fn gguf_reader_survives_mutated_files() {
    let seeds = [gguf_tiny(), gguf_rich(), gguf_bert()];
    for (i, g) in seeds.iter().enumerate() {
        let blob = MemBlob {
            label: "seed.gguf".into(),
            bytes: g.b.clone(),
        };
        if let Err(e) = GgufSource::from_blob(Box::new(blob), None) {
            panic!("seed {i} must be valid: {e}");
        }
        check_gguf(&g.b);
    }
    let r = run(
        "gguf",
        "gguf_reader_survives_mutated_files",
        20000,
        0x6767_7566,
        |rng, log| {
            let g = rng.pick(&seeds);
            let mut b = g.b.clone();
            mutate_bytes(&mut b, &g.fields, rng, log);
            b
        },
        |b| check_gguf(b),
    );
    finish(&[r]);
}

/// (header, data) pairs: the float trio of `readers.rs`, and integer, empty and 3-d tensors.
fn st_seeds() -> Vec<(String, Vec<u8>)> {
    let (a, data) = float_trio();
    let b = r#"{"ids":{"dtype":"I64","shape":[1,3],"data_offsets":[0,24]},"mask":{"dtype":"I32","shape":[2],"data_offsets":[24,32]},"u":{"dtype":"U8","shape":[4],"data_offsets":[32,36]},"none":{"dtype":"F32","shape":[0,5],"data_offsets":[36,36]},"w":{"dtype":"F32","shape":[1,2,2],"data_offsets":[36,52]},"__metadata__":{}}"#;
    let bdata: Vec<u8> = (0..52u8).map(|i| i.wrapping_mul(37)).collect();
    vec![(a.into(), data), (b.into(), bdata)]
}

/// The in-memory header parser, then the full source (which also reads `config.json` and
/// admits the tensors), then each tensor's decode.
fn check_st(dir: &Path, files: &[Vec<u8>]) -> bool {
    let _ = header_of(&files[0], Path::new("m.safetensors"));
    let blobs = files
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Box::new(MemBlob {
                label: PathBuf::from(format!("m{i}.safetensors")),
                bytes: b.clone(),
            }) as Box<dyn adaptq_source::Blob>
        })
        .collect();
    let Ok(src) = SafetensorsSource::from_blobs(dir.to_path_buf(), blobs) else {
        return false;
    };
    read_every(&src)
}

#[test]
fn safetensors_header_survives_mutated_files() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("config.json"), LLAMA_CONFIG).unwrap();
    let seeds = st_seeds();
    for (h, d) in &seeds {
        let blob = MemBlob {
            label: "seed.safetensors".into(),
            bytes: st_file(h, d),
        };
        if let Err(e) = SafetensorsSource::from_blobs(t.path().to_path_buf(), vec![Box::new(blob)])
        {
            panic!("seed must be valid: {e}");
        }
    }
    let second = st_file(&seeds[1].0, &seeds[1].1);
    let r = run(
        "safetensors",
        "safetensors_header_survives_mutated_files",
        10000,
        0x5afe_7e45,
        |rng, log| {
            let (h, d) = rng.pick(&seeds);
            let mut files = vec![match rng.below(4) {
                // The JSON header, with the length prefix kept consistent.
                0 | 1 => {
                    let mut h = h.clone().into_bytes();
                    json_mutate(&mut h, rng, log);
                    let mut b = (h.len() as u64).to_le_bytes().to_vec();
                    b.extend(h);
                    b.extend(d);
                    b
                }
                // The whole file, the length prefix included.
                2 => {
                    let mut b = st_file(h, d);
                    mutate_bytes(&mut b, &[(0, 8)], rng, log);
                    b
                }
                _ => {
                    let mut h = h.clone().into_bytes();
                    json_mutate(&mut h, rng, log);
                    let mut b = st_file(std::str::from_utf8(&h).unwrap_or("{}"), d);
                    mutate_bytes(&mut b, &[(0, 8)], rng, log);
                    b
                }
            }];
            if rng.below(4) == 0 {
                log.push_str("+shard ");
                files.push(second.clone());
            }
            files
        },
        |files| check_st(t.path(), files),
    );
    finish(&[r]);
}

fn index_seeds() -> Vec<String> {
    let many: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#""model.layers.{i}.weight": "model-0000{}-of-00003.safetensors""#,
                i % 3 + 1
            )
        })
        .collect();
    vec![
        r#"{"metadata":{"total_size":8},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#.into(),
        format!(r#"{{"metadata": {{"total_size": 1234}}, "weight_map": {{{}}}}}"#, many.join(", ")),
    ]
}

/// The index reader, and its contract: every name it returns is a plain file name that stays
/// inside the model's folder.
fn check_index(text: &[u8]) -> bool {
    let Ok(names) = index_shard_names(text, Path::new("model.safetensors.index.json")) else {
        return false;
    };
    for n in &names {
        assert!(
            adaptq_loader::names::is_plain_relative(n, false),
            "invariant: index shard name {n:?} is not a plain file name"
        );
    }
    true
}

#[test]
fn safetensors_index_survives_mutated_files() {
    let seeds = index_seeds();
    for s in &seeds {
        assert!(index_shard_names(s.as_bytes(), Path::new("i")).is_ok());
    }
    let r = run(
        "index",
        "safetensors_index_survives_mutated_files",
        8000,
        0x1de4_0000,
        |rng, log| {
            let mut t = rng.pick(&seeds).clone().into_bytes();
            json_mutate(&mut t, rng, log);
            t
        },
        |t| check_index(t),
    );
    finish(&[r]);
}

/// Writes the valid inputs above as seed corpora of the fuzz targets, into the folder named by
/// `ADAPTQ_FUZZ_SEEDS` (`scripts/fuzz.sh` runs this), so seeds and tests start from the same
/// files and none need committing.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let put = fuzz_seed_writer();
    for (name, g) in [
        ("tiny", gguf_tiny()),
        ("rich", gguf_rich()),
        ("bert", gguf_bert()),
    ] {
        put("gguf_header", &format!("{name}.gguf"), &g.b);
    }
    for (i, (h, d)) in st_seeds().iter().enumerate() {
        put(
            "safetensors_header",
            &format!("seed{i}.safetensors"),
            &st_file(h, d),
        );
    }
    for (i, t) in index_seeds().iter().enumerate() {
        put("safetensors_index", &format!("seed{i}.json"), t.as_bytes());
    }
}

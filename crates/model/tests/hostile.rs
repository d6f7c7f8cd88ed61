//! Hostile inputs to the model crate: a description whose head count does not divide the hidden
//! size, and a `tokenizer.json` that is not a regular file. Each must be an error, never a
//! panic, a hang or an out-of-memory abort.

use adaptq_model::bert::Bert;
mod common;

use adaptq_source::model::{Family, ModelDesc};
use common::Mem;
use std::collections::BTreeMap;

/// A complete one-layer BERT of hidden size 4, so that loading gets past every tensor and only
/// the head count can be at fault.
fn tiny_bert(n_heads: usize) -> Mem {
    let (h, f, v, p) = (4, 8, 10, 6);
    let desc = ModelDesc {
        norm_eps: 1e-12,
        tokenizer_id: "tokenizer.json".into(),
        ..common::desc(Family::Bert, "BertModel", [1, h, n_heads, n_heads, f, v, p])
    };
    let mut t = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        t.insert(name, (shape, vec![0.01; n]));
    };
    put("embeddings.word_embeddings.weight".into(), vec![v, h]);
    put("embeddings.position_embeddings.weight".into(), vec![p, h]);
    put("embeddings.token_type_embeddings.weight".into(), vec![2, h]);
    for s in ["weight", "bias"] {
        put(format!("embeddings.LayerNorm.{s}"), vec![h]);
    }
    let l = "encoder.layer.0";
    for (name, rows, cols) in [
        ("attention.self.query", h, h),
        ("attention.self.key", h, h),
        ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", f, h),
        ("output.dense", h, f),
    ] {
        put(format!("{l}.{name}.weight"), vec![rows, cols]);
        put(format!("{l}.{name}.bias"), vec![rows]);
    }
    for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
        for s in ["weight", "bias"] {
            put(format!("{l}.{n}.{s}"), vec![h]);
        }
    }
    Mem { desc, t }
}

#[test]
fn bert_refuses_heads_that_do_not_split_the_hidden_size() {
    let ok = tiny_bert(2);
    let m = Bert::load(&ok.desc, &ok).unwrap();
    assert_eq!(m.embed(&[1, 2, 3]).unwrap().len(), 4);
    for nh in [0, 3] {
        let w = tiny_bert(nh);
        let e = Bert::load(&w.desc, &w).err().unwrap().to_string();
        assert!(e.contains("do not fit together"), "{nh} heads: {e}");
    }
}

/// Reads `path` as a tokenizer on a thread, so that a regression to a blocking read fails the
/// test instead of hanging it.
fn tokenizer_within(path: std::path::PathBuf) -> String {
    adaptq_testutil::files::within("reading tokenizer.json", 20, move || {
        adaptq_model::tokenizer::from_file(&path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .expect_err("a tokenizer.json that is not a regular file was read")
}

#[cfg(unix)]
#[test]
fn tokenizer_json_that_is_not_a_regular_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (zero, fifo) = (t.path().join("zero"), t.path().join("fifo"));
    adaptq_testutil::files::zero_and_fifo(
        &zero.join("tokenizer.json"),
        &fifo.join("tokenizer.json"),
    );
    for dir in [zero, fifo] {
        let e = tokenizer_within(dir.join("tokenizer.json"));
        assert!(e.contains("not a regular file"), "{e}");
    }
}

#[test]
fn oversized_tokenizer_json_is_refused_before_reading() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("tokenizer.json");
    let f = std::fs::File::create(&p).unwrap();
    // Sparse: no disk is used, but the length is past the limit.
    f.set_len(adaptq_model::tokenizer::TOKENIZER_MAX + 1)
        .unwrap();
    let e = tokenizer_within(p);
    assert!(e.contains("larger than"), "{e}");
}

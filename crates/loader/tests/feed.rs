//! The loader, natively: shards fed out of order and in pieces give exactly the tensors the
//! host-side reader gives; a corrupt shard, an edited or reordered manifest and a missing
//! shard are refused.

use adaptq_bundle::{Bundle, Encoding};
use adaptq_loader::{Fed, LoadError, Loader};
use adaptq_quant::{quantize_rtn, Grid, RtnConfig};
use adaptq_testutil::bundle::{self as fixture, add_linear, add_plain, shards};
use adaptq_testutil::loading::redigest;
use half::f16;
use std::path::{Path, PathBuf};

/// Seeded weights in [-0.5, 0.5).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    adaptq_testutil::rand::uniform(n, seed, 1.0)
}

fn f16s(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A bundle with 3-bit asymmetric, 4-bit symmetric, f16 and f32 tensors over 1 KiB shards.
fn bundle() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = fixture::writer(&d, 1024, false);
    for (name, bits, grid, rows, cols) in [
        ("blk.0.attn_q.weight", 4u8, Grid::Symmetric, 12, 96),
        ("blk.0.ffn_down.weight", 3, Grid::Asymmetric, 10, 100),
    ] {
        let x = weights(rows * cols, bits as u64);
        let cfg = RtnConfig {
            bits,
            group_size: 32,
            grid,
        };
        let q = quantize_rtn(&x, rows, cols, &cfg).unwrap();
        let (s, m) = (f16s(&q.scales), f16s(&q.mins));
        let enc = fixture::int(bits, 32, grid);
        fixture::add_int(&mut w, name, &[rows, cols], enc, [&q.codes, &s, &m]);
    }
    let e: Vec<u8> = weights(20 * 32, 9)
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    add_plain(&mut w, "token_embd.weight", &[20, 32], Encoding::F16, &e);
    let n: Vec<u8> = weights(32, 5)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    add_plain(&mut w, "output_norm.weight", &[32], Encoding::F32, &n);
    fixture::finish(w, "t", "file:t.gguf", 4, serde_json::json!({"seed": 0}));
    (t, d)
}

#[test]
fn shards_out_of_order_in_pieces_give_the_bundles_exact_tensors() {
    let (_t, d) = bundle();
    let manifest = std::fs::read(d.join("manifest.json")).unwrap();
    let mut l = Loader::new(&manifest).unwrap();
    let mut sh = shards(&d);
    assert!(sh.len() >= 3, "several shards");
    sh.reverse();
    sh.swap(0, 2);
    for (name, bytes) in &sh {
        let pieces: Vec<&[u8]> = bytes.chunks(300).collect();
        for (k, p) in pieces.iter().enumerate() {
            let r = l.feed(name, p).unwrap();
            if k + 1 == pieces.len() {
                assert_eq!(r, Fed::Verified);
            } else {
                assert!(matches!(r, Fed::Partial(_)));
            }
        }
    }
    assert!(l.is_complete());
    let b = Bundle::open(&d).unwrap();
    for name in l.tensor_names() {
        let a = l.tensor_f32(name).unwrap();
        let e = b.read_f32(name).unwrap();
        assert_eq!(a.len(), e.len());
        assert!(
            a.iter().zip(&e).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
        assert!(!l.tensor_packed(name).unwrap().parts.is_empty());
    }
}

#[test]
fn a_bad_shard_is_rejected_and_can_be_sent_again() {
    let (_t, d) = bundle();
    let mut l = Loader::new(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    let sh = shards(&d);
    let (name, good) = &sh[1];
    let mut bad = good.clone();
    bad[17] ^= 0x40;
    match l.feed(name, &bad) {
        Err(LoadError::Shard(m)) => assert!(m.contains("SHA-256"), "{m}"),
        r => panic!("corrupt shard accepted: {r:?}"),
    }
    assert!(l.missing().contains(&name.as_str()));
    assert!(matches!(
        l.feed(name, &[good.clone(), vec![0]].concat()),
        Err(LoadError::Shard(_))
    ));
    assert_eq!(l.feed(name, good).unwrap(), Fed::Verified);
    assert!(l.feed("shard-99999.bin", b"x").is_err());
}

#[test]
fn a_missing_shard_withholds_the_tensors_that_need_it() {
    let (_t, d) = bundle();
    let mut l = Loader::new(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    let sh = shards(&d);
    for (name, bytes) in sh.iter().skip(1) {
        l.feed(name, bytes).unwrap();
    }
    assert!(!l.is_complete());
    assert_eq!(l.missing(), vec![sh[0].0.as_str()]);
    match l.tensor_f32("blk.0.attn_q.weight") {
        Err(LoadError::Missing(m)) => assert!(m.contains("shard-00000.bin"), "{m}"),
        r => panic!("tensor given without its shard: {r:?}"),
    }
}

#[test]
fn edited_or_reordered_manifests_are_refused() {
    let (_t, d) = bundle();
    let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    // Any edit breaks the manifest digest.
    let edited = text.replacen("\"t\"", "\"u\"", 1);
    assert!(
        matches!(Loader::new(edited.as_bytes()), Err(LoadError::Manifest(m)) if m.contains("edited"))
    );
    // Shard entries swapped (digest recomputed): the global digest no longer matches.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shards = v["shards"].as_array_mut().unwrap();
    shards.swap(0, 1);
    let swapped = redigest(&serde_json::to_string_pretty(&v).unwrap());
    match Loader::new(swapped.as_bytes()) {
        Err(LoadError::Manifest(m)) => assert!(m.contains("global digest"), "{m}"),
        r => panic!("reordered shard list accepted: {r:?}"),
    }
    // The untouched manifest loads.
    assert!(Loader::new(text.as_bytes()).is_ok());
}

/// Ternary (skewed 2-bit codes) and NOVAQ tensors, with or without the lossless stage.
fn coded_bundle(dir: &Path, lossless: bool) {
    let mut w = fixture::writer(dir, 4096, lossless);
    // Bell-shaped weights: most ternary codes are 0, most NOVAQ vectors near the centre.
    let bell: Vec<f32> = weights(64 * 96, 3)
        .chunks(3)
        .flat_map(|c| {
            let v = (c[0] + c.get(1).unwrap_or(&0.0) + c.get(2).unwrap_or(&0.0)) / 3.0;
            [v, v * 0.5, -v]
        })
        .collect();
    let q = adaptq_quant::ternary::quantize_ternary(&bell, 64, 96, 32).unwrap();
    let s = f16s(&q.scales);
    let parts: [(&str, &[u8]); 2] = [("codes", &q.codes), ("scales", &s)];
    let int2 = fixture::int(2, 32, Grid::Symmetric);
    w.add_tensor(
        "blk.0.attn_k.weight",
        &[64, 96],
        "linear",
        "ternary",
        int2,
        &parts,
    )
    .unwrap();
    let cfg = adaptq_quant::novaq::NovaqConfig {
        target_bits: 3.0,
        level1_centroids: 64,
        level2_centroids: 16,
        max_subspace_dim: 4,
        ..Default::default()
    };
    let (t, _) = adaptq_quant::novaq::quantize_novaq(&bell, 64, 96, None, &cfg).unwrap();
    let mut parts: Vec<(&str, Vec<u8>)> = vec![
        ("row_scale", f16s(&t.row_scale)),
        ("row_mean", f16s(&t.row_mean)),
        ("col_scale", f16s(&t.col_scale)),
    ];
    for (i, st) in t.stages.iter().enumerate() {
        parts.push((["codebook0", "codebook1"][i], f16s(&st.centroids)));
        parts.push((["codes0", "codes1"][i], st.codes.clone()));
    }
    let refs: Vec<(&str, &[u8])> = parts.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let enc = Encoding::Codebook {
        dim: t.dim,
        stage_bits: t.stages.iter().map(|s| s.bits).collect(),
    };
    add_linear(&mut w, "blk.0.attn_v.weight", &[64, 96], enc, &refs);
    fixture::finish(w, "t", "file:t.gguf", 2, serde_json::json!({"seed": 0}));
}

#[test]
fn losslessly_coded_codes_decode_to_the_same_tensors_in_both_readers() {
    let t = tempfile::tempdir().unwrap();
    let (plain, coded) = (t.path().join("plain"), t.path().join("coded"));
    coded_bundle(&plain, false);
    coded_bundle(&coded, true);
    let bp = Bundle::open(&plain).unwrap();
    let bc = Bundle::open(&coded).unwrap();
    let rep = adaptq_bundle::verify_bundle(&coded, |_| {});
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    let k = bc.entry("blk.0.attn_k.weight").unwrap();
    let codes = k.parts.iter().find(|p| p.name == "codes").unwrap();
    assert!(codes.lossless.is_some(), "skewed ternary codes are coded");
    assert!(codes.length < codes.raw_length() * 9 / 10, "{codes:?}");
    let l = fixture::loaded(&coded);
    for name in ["blk.0.attn_k.weight", "blk.0.attn_v.weight"] {
        let want = bp.read_f32(name).unwrap();
        assert_eq!(bc.read_f32(name).unwrap(), want, "{name}: bundle reader");
        assert_eq!(l.tensor_f32(name).unwrap(), want, "{name}: loader");
    }
}

//! Forward-pass properties on a tiny random Llama: both RoPE conventions compute the same
//! function once Q/K rows are permuted as llama.cpp's converter does; the KV cache gives the
//! same logits as a full pass; the calibration hook sees every linear input.

use adaptq_model::llama::{KvCache, Llama};
mod common;

use adaptq_source::model::{Family, ModelDesc, RopeStyle};
use common::Mem;
use std::collections::BTreeMap;

fn desc(style: RopeStyle) -> ModelDesc {
    ModelDesc {
        rope_style: style,
        tied_embeddings: true,
        ..common::desc(Family::Llama, "llama", [2, 32, 4, 2, 48, 50, 64])
    }
}

/// `n` seeded values uniform in `[-scale / 2, scale / 2)`, from the next seed after `seed`.
fn rand(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    *seed += 1;
    adaptq_testutil::rand::uniform(n, *seed, scale)
}

/// HF-named weights (halves RoPE).
fn hf_weights() -> Mem {
    let d = desc(RopeStyle::Halves);
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut t = BTreeMap::new();
    let (h, kv, f, v) = (32, 16, 48, 50);
    t.insert(
        "model.embed_tokens.weight".into(),
        (vec![v, h], rand(v * h, &mut s, 1.0)),
    );
    t.insert(
        "model.norm.weight".into(),
        (
            vec![h],
            rand(h, &mut s, 0.2).iter().map(|x| 1.0 + x).collect(),
        ),
    );
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (n, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            t.insert(
                format!("{p}.{n}.weight"),
                (vec![rows, cols], rand(rows * cols, &mut s, 0.6)),
            );
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{n}.weight"),
                (
                    vec![h],
                    rand(h, &mut s, 0.2).iter().map(|x| 1.0 + x).collect(),
                ),
            );
        }
    }
    Mem { desc: d, t }
}

/// llama.cpp's converter permutation of Q/K rows: per head, HF row `j*(hd/2) + i` becomes
/// GGUF row `2*i + j`.
fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for hh in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = hh * hd + j * (hd / 2) + i;
                let dst = hh * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The same model under GGUF names with permuted Q/K (adjacent-pair RoPE).
fn gguf_weights(hf: &Mem) -> Mem {
    let mut t = BTreeMap::new();
    for (name, (shape, data)) in &hf.t {
        let g = adaptq_export::gguf::gguf_name(name).unwrap_or_else(|| panic!("{name}"));
        let heads = if g.contains(".attn_q.") {
            Some(4)
        } else if g.contains(".attn_k.") {
            Some(2)
        } else {
            None
        };
        let data = match heads {
            Some(h) => permute(data, shape[0], shape[1], h),
            None => data.clone(),
        };
        t.insert(g, (shape.clone(), data));
    }
    Mem {
        desc: desc(RopeStyle::AdjacentPairs),
        t,
    }
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    adaptq_testutil::compare::max_abs_diff(&a, &b)
}

const TOKENS: [u32; 12] = [3, 17, 42, 8, 8, 0, 49, 23, 11, 5, 30, 2];

#[test]
fn rope_conventions_agree_after_permutation() {
    let hf = hf_weights();
    let gg = gguf_weights(&hf);
    let a = Llama::load(&hf.desc, &hf)
        .unwrap()
        .forward(&TOKENS, None, None)
        .unwrap();
    let b = Llama::load(&gg.desc, &gg)
        .unwrap()
        .forward(&TOKENS, None, None)
        .unwrap();
    assert_eq!(a.dims(), &[12, 50]);
    let d = max_diff(&a, &b);
    assert!(d < 1e-4, "max logit difference {d}");
    // Without the permutation the adjacent-pair model computes something else.
    let mut wrong = gguf_weights(&hf);
    wrong.t.insert(
        "blk.0.attn_q.weight".into(),
        hf.t["model.layers.0.self_attn.q_proj.weight"].clone(),
    );
    let c = Llama::load(&wrong.desc, &wrong)
        .unwrap()
        .forward(&TOKENS, None, None)
        .unwrap();
    assert!(max_diff(&a, &c) > 1e-2);
}

#[test]
fn kv_cache_matches_full_pass() {
    let hf = hf_weights();
    let m = Llama::load(&hf.desc, &hf).unwrap();
    let full = m.forward(&TOKENS, None, None).unwrap();
    let mut cache = KvCache::default();
    let first = m.forward(&TOKENS[..7], Some(&mut cache), None).unwrap();
    assert!(max_diff(&first, &full.narrow(0, 0, 7).unwrap()) < 1e-4);
    for (i, &t) in TOKENS.iter().enumerate().skip(7) {
        let step = m.forward(&[t], Some(&mut cache), None).unwrap();
        let d = max_diff(&step, &full.narrow(0, i, 1).unwrap());
        assert!(d < 1e-4, "position {i}: {d}");
    }
    assert_eq!(cache.len(), TOKENS.len());
}

/// The packed runtime's attention (one task per query and head over the cached keys, query
/// blocks for prompts) computes the exact path's function, with and without the cache.
#[test]
fn packed_runtime_attention_matches_the_exact_pass() {
    use adaptq_model::Kernels;
    let hf = hf_weights();
    let exact = Llama::load(&hf.desc, &hf)
        .unwrap()
        .forward(&TOKENS, None, None)
        .unwrap();
    let m = Llama::load_with(&hf.desc, &hf, Kernels::Packed).unwrap();
    let full = m.forward(&TOKENS, None, None).unwrap();
    assert!(max_diff(&full, &exact) < 1e-4);
    let mut cache = KvCache::default();
    m.forward(&TOKENS[..5], Some(&mut cache), None).unwrap();
    for (i, &t) in TOKENS.iter().enumerate().skip(5) {
        let step = m.forward(&[t], Some(&mut cache), None).unwrap();
        let d = max_diff(&step, &exact.narrow(0, i, 1).unwrap());
        assert!(d < 1e-4, "position {i}: {d}");
    }
    // Prompts long enough for the batched path (query blocks, gemm products), the second one
    // after cached positions, then single steps.
    let long: Vec<u32> = (0..90u32).map(|i| (i * 7 + 3) % 50).collect();
    let mut e = Llama::load(&hf.desc, &hf).unwrap();
    e.set_context(128);
    let exact = e.forward(&long, None, None).unwrap();
    let mut m = m;
    m.set_context(128);
    let mut cache = KvCache::default();
    let mut at = 0;
    for n in [40, 35, 1, 1] {
        let part = m
            .forward(&long[at..at + n], Some(&mut cache), None)
            .unwrap();
        let d = max_diff(&part, &exact.narrow(0, at, n).unwrap());
        assert!(d < 1e-4, "positions {at}..{}: {d}", at + n);
        at += n;
    }
    let last = m
        .forward_last(&long, Some(&mut KvCache::default()))
        .unwrap();
    assert!(max_diff(&last, &exact.narrow(0, 89, 1).unwrap()) < 1e-4);
}

#[test]
fn causal_mask_hides_the_future() {
    let hf = hf_weights();
    let m = Llama::load(&hf.desc, &hf).unwrap();
    let a = m.forward(&TOKENS, None, None).unwrap();
    let mut other = TOKENS;
    other[11] = 44;
    let b = m.forward(&other, None, None).unwrap();
    assert!(max_diff(&a.narrow(0, 0, 11).unwrap(), &b.narrow(0, 0, 11).unwrap()) < 1e-6);
    assert!(max_diff(&a.narrow(0, 11, 1).unwrap(), &b.narrow(0, 11, 1).unwrap()) > 1e-3);
}

#[test]
fn hook_sees_every_linear_input() {
    let hf = hf_weights();
    let m = Llama::load(&hf.desc, &hf).unwrap();
    let mut seen: Vec<(String, Vec<usize>)> = Vec::new();
    let mut hook = |name: &str, x: &candle_core::Tensor| -> anyhow::Result<()> {
        seen.push((name.to_string(), x.dims().to_vec()));
        Ok(())
    };
    m.forward(&TOKENS, None, Some(&mut hook)).unwrap();
    assert_eq!(seen.len(), 2 * 7);
    assert_eq!(
        seen[0],
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            vec![12, 32]
        )
    );
    let down = seen
        .iter()
        .find(|s| s.0 == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(down.1, vec![12, 48]);
}

#[test]
fn input_rotation_keeps_the_function() {
    let hf = hf_weights();
    let plain = Llama::load(&hf.desc, &hf).unwrap();
    let mut rot = Llama::load(&hf.desc, &hf).unwrap();
    let before: Vec<Vec<f32>> = rot.blocks[0]
        .linears_mut()
        .iter()
        .map(|l| l.weight_rows().unwrap().0)
        .collect();
    rot.rotate(7).unwrap();
    // Every linear layer's weight is rotated, the MLP's 48 = 16·3 wide input included.
    for (l, b) in rot.blocks[0].linears_mut().iter().zip(&before) {
        let a = l.weight_rows().unwrap().0;
        let moved = a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert!(moved > a.len() / 2, "{} is rotated", l.name);
    }
    let (a, b) = (
        plain.forward(&TOKENS, None, None).unwrap(),
        rot.forward(&TOKENS, None, None).unwrap(),
    );
    let d = max_diff(&a, &b);
    assert!(d < 1e-4, "max logit difference {d}");
    // The KV-cached path goes through the same online rotations.
    let mut cache = KvCache::default();
    rot.forward(&TOKENS[..6], Some(&mut cache), None).unwrap();
    let step = rot.forward(&TOKENS[6..7], Some(&mut cache), None).unwrap();
    assert!(max_diff(&step, &a.narrow(0, 6, 1).unwrap()) < 1e-4);
    assert!(rot.rotate(7).is_err(), "rotating twice is refused");
    assert_eq!(rot.rotation_seed(), Some(7));
}

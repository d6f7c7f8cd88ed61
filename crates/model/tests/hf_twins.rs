//! Each decoder architecture read from its Hugging Face layout (safetensors + `config.json`)
//! against its GGUF twin. `scripts/reference/random_gguf.py --hf-twin` writes both from the
//! same seeded random weights, the checkpoint undoing what llama.cpp's converter does (Llama's
//! Q/K row permutation, Gemma's `1 + w` norms, RoPE factors as tensors vs `rope_scaling`), so
//! the two must give the same logits: within 1e-4 of the largest logit, over 80 tokens that
//! run past Gemma's 32-token window, and for Phi-3 with its long factors too. The packed
//! runtime gives the exact kernels' logits on each GGUF file.
//!
//! So that agreement depends on reading each `config.json` setting, a control per
//! architecture edits one (RoPE scaling, soft cap, layer types, q/k norms) in a copy of the
//! checkpoint: its logits must then differ by more than 100 times that tolerance.

use adaptq_model::llama::{KvCache, Llama};
use adaptq_model::{open_weights, Kernels};
use adaptq_testutil::compare::max_abs_diff;
use adaptq_testutil::llamacpp;
use std::path::Path;

/// Architectures, the random model's switches, and a `config.json` key whose edit must show.
const TWINS: &[(&str, &[&str], (&str, &str))] = &[
    ("llama3", &[], ("rope_scaling", "null")),
    (
        "mistral",
        &["sliding_window=4096"],
        ("rope_theta", "10000.0"),
    ),
    ("qwen2", &[], ("rms_norm_eps", "0.5")),
    ("qwen3", &[], ("model_type", "\"qwen2\"")),
    ("gemma2", &[], ("attn_logit_softcapping", "null")),
    ("gemma3", &[], ("sliding_window", "null")),
    ("phi3", &[], ("rope_scaling", "null")),
    ("mixtral", &[], ("num_experts_per_tok", "1")),
    ("qwen2moe", &[], ("norm_topk_prob", "true")),
    ("qwen3moe", &[], ("norm_topk_prob", "false")),
    ("olmoe", &[], ("norm_topk_prob", "true")),
];
const TOLERANCE: f32 = 1e-4;

/// Logits `[T · vocab]` of the model at `path` on `tokens`, run at context `n_ctx`.
fn logits(path: &Path, tokens: &[u32], n_ctx: usize) -> Vec<f32> {
    logits_on(path, tokens, n_ctx, Kernels::Exact)
}

fn logits_on(path: &Path, tokens: &[u32], n_ctx: usize, kernels: Kernels) -> Vec<f32> {
    let w = open_weights(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut m = Llama::load_with(w.desc(), w.as_ref(), kernels)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    m.set_context(n_ctx);
    let l = m.forward(tokens, None, None).expect("forward pass");
    l.flatten_all().unwrap().to_vec1().unwrap()
}

/// Logits of the packed runtime run on `tokens` in cached parts of the lengths given.
fn packed_in_parts(path: &Path, tokens: &[u32], parts: &[usize]) -> Vec<f32> {
    let w = open_weights(path).unwrap();
    let mut m = Llama::load_with(w.desc(), w.as_ref(), Kernels::Packed).unwrap();
    m.set_context(128);
    let mut cache = KvCache::default();
    let mut at = 0;
    let mut out = Vec::new();
    for &n in parts {
        let l = m
            .forward(&tokens[at..at + n], Some(&mut cache), None)
            .unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        at += n;
    }
    out
}

fn scale(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn safetensors_twins_give_the_gguf_logits() {
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..80u32).map(|i| (i * 7919 + 13) % 49152).collect();
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for &(arch, sets, (key, edit)) in TWINS {
        let gguf = dir.path().join(format!("{arch}.gguf"));
        let hf = dir.path().join(arch);
        llamacpp::random_gguf(&bin, arch, &gguf, sets, Some(&hf));
        // Phi-3 past its trained 512 tokens takes the long factors, both ways.
        let contexts: &[usize] = if arch == "phi3" { &[128, 1024] } else { &[128] };
        for &n_ctx in contexts {
            let g = logits(&gguf, &tokens, n_ctx);
            let h = logits(&hf, &tokens, n_ctx);
            let d = max_abs_diff(&g, &h) / scale(&g);
            report.push(format!(
                "{arch} ctx {n_ctx}: max |Δ| / max |logit| = {d:.2e}"
            ));
            if d.is_nan() || d > TOLERANCE {
                wrong.push(format!("{arch} ctx {n_ctx}"));
            }
        }
        // The packed runtime's prompt path (batched products, attention in query blocks,
        // its own softmax and SwiGLU) on the same unquantized file computes the same logits.
        let g = logits(&gguf, &tokens, 128);
        let d = max_abs_diff(&g, &logits_on(&gguf, &tokens, 128, Kernels::Packed)) / scale(&g);
        report.push(format!("{arch} packed: {d:.2e}"));
        if d.is_nan() || d > TOLERANCE {
            wrong.push(format!("{arch} packed"));
        }
        // In two cached parts of 40: the second prompt's query blocks start past Gemma's
        // 32-token window.
        let d = max_abs_diff(&g, &packed_in_parts(&gguf, &tokens, &[40, 40])) / scale(&g);
        report.push(format!("{arch} packed, cached parts: {d:.2e}"));
        if d.is_nan() || d > TOLERANCE {
            wrong.push(format!("{arch} packed, cached parts"));
        }
        let edited = dir.path().join(format!("{arch}-edited"));
        std::fs::create_dir(&edited).unwrap();
        std::fs::copy(
            hf.join("model.safetensors"),
            edited.join("model.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
        cfg[key] = serde_json::from_str(edit).unwrap();
        std::fs::write(edited.join("config.json"), cfg.to_string()).unwrap();
        let g = logits(&gguf, &tokens, 128);
        let d = max_abs_diff(&g, &logits(&edited, &tokens, 128)) / scale(&g);
        report.push(format!("{arch} with {key} = {edit}: {d:.2e}"));
        if d.is_nan() || d <= 100.0 * TOLERANCE {
            wrong.push(format!("{arch}: editing {key} changed nothing"));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(wrong.is_empty(), "{wrong:?}\n{}", report.join("\n"));
    awq_folds_store_what_each_layout_means(
        &dir.path().join("gemma2.gguf"),
        &dir.path().join("gemma2"),
    );
}

/// AWQ divides a norm by its scales and stores the result under the norm's name: a Gemma
/// checkpoint must get `(1 + w) / s − 1`, the GGUF file `(1 + w) / s`.
fn awq_folds_store_what_each_layout_means(gguf: &Path, hf: &Path) {
    let load = |p: &Path| {
        let w = open_weights(p).unwrap();
        Llama::load(w.desc(), w.as_ref()).unwrap()
    };
    let (mut g, mut h) = (load(gguf), load(hf));
    let s: Vec<f32> = (0..g.desc.hidden)
        .map(|i| 0.5 + (i % 7) as f32 / 4.0)
        .collect();
    let ga = g.blocks[0].div_attn_norm(&s).unwrap();
    let ha = h.blocks[0].div_attn_norm(&s).unwrap();
    let gf = g.blocks[1].div_ffn_norm(&s).unwrap();
    let hf_ = h.blocks[1].div_ffn_norm(&s).unwrap();
    for (a, b) in ga.iter().zip(&ha).chain(gf.iter().zip(&hf_)) {
        assert!(
            (a - (b + 1.0)).abs() <= 1e-6 * a.abs().max(1.0),
            "{a} vs {b} + 1"
        );
    }
}

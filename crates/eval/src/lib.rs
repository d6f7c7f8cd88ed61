//! Measuring what quantization cost: perplexity with its standard error, and — against a base
//! model on the same tokens — mean and 99th-percentile KL divergence and top-1 agreement.

pub mod embeddings;
pub mod score;
pub mod speed;

pub use score::{log_softmax, Scorer};

use adaptq_model::llama::Llama;
use anyhow::{bail, Result};
use serde::Serialize;

/// Which positions of a window are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreMode {
    /// Every next-token prediction in the window (`ctx - 1` per window).
    All,
    /// llama.cpp's `llama-perplexity`: only the second half (positions `ctx/2 .. ctx-1`).
    SecondHalf,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub tokens_scored: u64,
    pub windows: usize,
    pub ctx: usize,
    pub score: ScoreMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_ppl_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_ppl_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kld_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kld_p99: Option<f64>,
    /// Fraction (0–1) of scored positions where both models' most likely token agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// Scores `tokens` in consecutive non-overlapping windows of `ctx` tokens (at most `chunks`),
/// with an optional base model judged on exactly the same positions. `progress(windows done,
/// total, tokens processed)` runs after each window.
pub fn evaluate(
    model: &Llama,
    base: Option<&Llama>,
    tokens: &[u32],
    ctx: usize,
    mode: ScoreMode,
    chunks: Option<usize>,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<EvalReport> {
    if ctx < 2 {
        bail!("a window must hold at least 2 tokens, got {ctx}");
    }
    // llama-perplexity on a model that asks for a BOS token (Gemma) tokenizes the text after
    // one and puts it first in every window; scores only compare with the same windows.
    let bos = model.desc.decoder.bos;
    let with_bos: Vec<u32>;
    let tokens = match bos {
        Some(b) if tokens.first() != Some(&b) => {
            with_bos = std::iter::once(b).chain(tokens.iter().copied()).collect();
            &with_bos[..]
        }
        _ => tokens,
    };
    let mut n = tokens.len() / ctx;
    if let Some(c) = chunks {
        n = n.min(c);
    }
    if n == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        );
    }
    if let Some(b) = base {
        if b.vocab_size() != model.vocab_size() {
            bail!(
                "base vocabulary {} differs from the model's {}",
                b.vocab_size(),
                model.vocab_size()
            );
        }
    }
    let first = match mode {
        ScoreMode::All => 0,
        ScoreMode::SecondHalf => ctx / 2,
    };
    let mut s = Scorer::default();
    for w in 0..n {
        let mut win = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = bos {
            win[0] = b;
        }
        let targets = &win[first + 1..];
        // The last token predicts nothing scored, so the window runs on ctx - 1 tokens.
        let logits = model.forward_from(&win[..ctx - 1], first)?;
        let rows = logits.to_vec2::<f32>()?;
        match base {
            Some(b) => {
                let bl = b.forward_from(&win[..ctx - 1], first)?;
                s.add_pair(&rows, &bl.to_vec2::<f32>()?, targets);
            }
            None => s.add(&rows, targets),
        }
        progress(w + 1, n, (w + 1) * ctx);
    }
    let (ppl, se) = s.ppl();
    let mut r = EvalReport {
        ppl,
        ppl_stderr: se,
        tokens_scored: s.count(),
        windows: n,
        ctx,
        score: mode,
        base_ppl: None,
        base_ppl_stderr: None,
        delta_ppl_pct: None,
        kld_mean: None,
        kld_p99: None,
        top1_agreement: None,
    };
    if base.is_some() {
        let (bp, bse) = s.base_ppl();
        r.base_ppl = Some(bp);
        r.base_ppl_stderr = Some(bse);
        r.delta_ppl_pct = Some((ppl / bp - 1.0) * 100.0);
        r.kld_mean = Some(s.kld_mean());
        r.kld_p99 = Some(s.kld_quantile(0.99));
        r.top1_agreement = Some(s.top1_agreement());
    }
    Ok(r)
}

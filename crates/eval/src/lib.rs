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
    /// Against the base model, when one was given (its keys sit beside the others in JSON).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub vs_base: Option<VsBase>,
}

/// The model judged against a base model on the same positions.
#[derive(Debug, Clone, Serialize)]
pub struct VsBase {
    pub base_ppl: f64,
    pub base_ppl_stderr: f64,
    pub delta_ppl_pct: f64,
    pub kld_mean: f64,
    pub kld_p99: f64,
    /// Fraction (0–1) of scored positions where both models' most likely token agree.
    pub top1_agreement: f64,
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
    let vs_base = base.map(|_| {
        let (base_ppl, base_ppl_stderr) = s.base_ppl();
        VsBase {
            base_ppl,
            base_ppl_stderr,
            delta_ppl_pct: (ppl / base_ppl - 1.0) * 100.0,
            kld_mean: s.kld_mean(),
            kld_p99: s.kld_quantile(0.99),
            top1_agreement: s.top1_agreement(),
        }
    });
    let r = EvalReport {
        ppl,
        ppl_stderr: se,
        tokens_scored: s.count(),
        windows: n,
        ctx,
        score: mode,
        vs_base,
    };
    Ok(r)
}

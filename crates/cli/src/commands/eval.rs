//! `adaptq eval`: perplexity of a decoder on a text (llama-perplexity's protocol with
//! `--score second-half`), KL divergence against `--base`; for encoders, embedding cosine.

use crate::args::{EvalArgs, ScoreArg};
use adaptq_eval::ScoreMode;
use anyhow::{bail, Context, Result};
use std::path::Path;

pub fn run(a: &EvalArgs) -> Result<()> {
    let body = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let kernels = match a.packed {
        true => adaptq_model::Kernels::Packed,
        false => adaptq_model::Kernels::Exact,
    };
    let mut m = adaptq_model::load_with(&a.model, kernels)?;
    if let adaptq_model::ModelKind::Bert(bert) = &m.kind {
        if a.rotate.is_some() {
            bail!("--rotate applies to decoder (Llama-family) models");
        }
        return embeddings(&m, bert, &body, a.chunks, a.base.as_deref(), a.json);
    }
    if let adaptq_model::ModelKind::Llama(l) = &mut m.kind {
        l.set_context(a.ctx);
        if let Some(seed) = a.rotate {
            l.rotate(seed)?;
        }
    }
    let lm = m.llama()?;
    let mut b = a.base.as_deref().map(adaptq_model::load).transpose()?;
    if let Some(adaptq_model::ModelKind::Llama(l)) = b.as_mut().map(|b| &mut b.kind) {
        l.set_context(a.ctx);
    }
    let bl = b.as_ref().map(|b| b.llama()).transpose()?;
    let tokens = adaptq_model::tokenizer::encode(&m.tokenizer, &body)?;
    if let Some(b) = &b {
        if adaptq_model::tokenizer::encode(&b.tokenizer, &body)? != tokens {
            bail!("the base model tokenizes the text differently; KL divergence needs the same tokens");
        }
    }
    let mode = match a.score {
        ScoreArg::All => ScoreMode::All,
        ScoreArg::SecondHalf => ScoreMode::SecondHalf,
    };
    let total = (tokens.len() / a.ctx).min(a.chunks.unwrap_or(usize::MAX));
    let pb = crate::progress::bar(total as u64, "eval", "windows");
    let start = std::time::Instant::now();
    let models = if bl.is_some() { 2.0 } else { 1.0 };
    let r = adaptq_eval::evaluate(
        lm,
        bl,
        &tokens,
        a.ctx,
        mode,
        a.chunks,
        &mut |done, _, toks| {
            pb.set_position(done as u64);
            pb.set_message(format!(
                "{:.0} tokens/s",
                models * toks as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
        },
    )?;
    pb.finish_and_clear();
    let kernels = kernels.name();
    if a.json {
        let mut j = serde_json::to_value(&r)?;
        j["kernels"] = kernels.into();
        println!("{j}");
        return Ok(());
    }
    println!(
        "{}: {} windows of {} tokens, {} tokens scored ({})",
        a.text.display(),
        r.windows,
        a.ctx,
        r.tokens_scored,
        match mode {
            ScoreMode::All => "every token",
            ScoreMode::SecondHalf => "second half of each window, as llama-perplexity",
        }
    );
    println!("kernels: {kernels}");
    println!("PPL = {:.4} +/- {:.4}", r.ppl, r.ppl_stderr);
    if let Some(b) = &r.vs_base {
        println!(
            "base PPL = {:.4} +/- {:.4}   ΔPPL = {:+.2}%",
            b.base_ppl, b.base_ppl_stderr, b.delta_ppl_pct
        );
        println!(
            "KLD mean = {:.6}   KLD p99 = {:.6}   top-1 agreement = {:.2}%",
            b.kld_mean,
            b.kld_p99,
            100.0 * b.top1_agreement
        );
    }
    eprintln!("[{:.1} s]", start.elapsed().as_secs_f64());
    Ok(())
}

/// Encoders: cosine similarity of sentence embeddings against the base model.
fn embeddings(
    m: &adaptq_model::LoadedModel,
    bert: &adaptq_model::bert::Bert,
    body: &str,
    chunks: Option<usize>,
    base: Option<&Path>,
    json: bool,
) -> Result<()> {
    let Some(base) = base else {
        bail!("{} is an encoder: evaluate it against a reference with --base (embedding cosine similarity)", m.label);
    };
    let b = adaptq_model::load(base)?;
    let sents = adaptq_eval::embeddings::sentences(body, chunks.unwrap_or(200));
    let ids = sents
        .iter()
        .map(|s| adaptq_model::tokenizer::encode_special(&m.tokenizer, s))
        .collect::<Result<Vec<_>>>()?;
    let pb = crate::progress::bar(ids.len() as u64, "eval", "sentences");
    let r = adaptq_eval::embeddings::compare_embeddings(bert, b.bert()?, &ids, &mut |i| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} sentences: embedding cosine vs base mean {:.6}, min {:.6}, 1st percentile {:.6}",
            r.sentences, r.cosine_mean, r.cosine_min, r.cosine_p01
        );
    }
    Ok(())
}

//! Encoder models: how close a quantized model's sentence embeddings stay to the reference's.

use adaptq_model::bert::Bert;
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingReport {
    pub sentences: usize,
    pub cosine_mean: f64,
    pub cosine_min: f64,
    pub cosine_p01: f64,
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    d / (na.sqrt() * nb.sqrt()).max(1e-300)
}

/// Splits text into sentences at `.`, `!` or `?` followed by whitespace; collapses whitespace.
pub fn sentences(text: &str, limit: usize) -> Vec<String> {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = flat.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| *n == ' ') {
            // Fragments under three words ("Mr.") stay attached to what follows.
            let s = cur.trim();
            if s.split(' ').count() >= 3 {
                out.push(s.to_string());
                if out.len() == limit {
                    return out;
                }
                cur.clear();
            }
        }
    }
    out
}

/// Embeds each tokenized sentence with both models and compares them.
pub fn compare_embeddings(
    model: &Bert,
    base: &Bert,
    ids: &[Vec<u32>],
    progress: &mut dyn FnMut(usize),
) -> Result<EmbeddingReport> {
    if ids.is_empty() {
        bail!("no sentences to embed");
    }
    let mut cos = Vec::with_capacity(ids.len());
    for (i, s) in ids.iter().enumerate() {
        let s = &s[..s.len().min(512)];
        cos.push(cosine(&model.embed(s)?, &base.embed(s)?));
        progress(i + 1);
    }
    let mut sorted = cos.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(EmbeddingReport {
        sentences: cos.len(),
        cosine_mean: cos.iter().sum::<f64>() / cos.len() as f64,
        cosine_min: sorted[0],
        cosine_p01: sorted[((0.01 * sorted.len() as f64) as usize).min(sorted.len() - 1)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn splits_sentences() {
        let s = sentences(
            "It is a truth. Mr.\nBennet said so!  Short. Is it not so?",
            10,
        );
        assert_eq!(
            s,
            vec![
                "It is a truth.",
                "Mr. Bennet said so!",
                "Short. Is it not so?"
            ]
        );
        assert_eq!(sentences("One two three. Four five six.", 1).len(), 1);
    }
    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
    }
}

//! Text generation with a KV cache: greedy by default, seeded temperature sampling otherwise.

use crate::tokenizer::{decode, encode};
use crate::LoadedModel;
use adaptq_quant::rng::Rng;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct Options {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// Tokens that end a reply in the vocabularies adaptq reads: ChatML and GPT-2 (`<|im_end|>`,
/// `<|endoftext|>`), SentencePiece (`</s>`), Gemma (`<eos>`, `<end_of_turn>`), Llama 3
/// (`<|eot_id|>`, `<|end_of_text|>`) and Phi-3 (`<|end|>`). A name counts only where the
/// vocabulary marks it special: in some vocabularies `</s>` is an ordinary piece of text.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
];

pub struct Output {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    pub tokens_per_s: f64,
}

fn pick(row: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = row
        .iter()
        .map(|&x| ((x as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut r = rng.uniform() * total;
    for (i, &x) in w.iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

/// Generates up to `max_tokens` after `prompt`; `on_text` receives text as it is produced.
pub fn generate(
    m: &LoadedModel,
    prompt: &str,
    opts: &Options,
    on_text: &mut dyn FnMut(&str),
) -> Result<Output> {
    let lm = m.llama()?;
    let mut ids = encode(&m.tokenizer, prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    // A model whose GGUF asks for BOS (Gemma) is only in distribution after it, as in llama.cpp.
    if let Some(b) = m.desc.decoder.bos.filter(|&b| ids.first() != Some(&b)) {
        ids.insert(0, b);
    }
    let added = m.tokenizer.get_added_tokens_decoder();
    let eos: Vec<u32> = END_TOKENS
        .iter()
        .filter_map(|t| m.tokenizer.token_to_id(t))
        .filter(|id| added.get(id).is_some_and(|t| t.special))
        .collect();
    let mut rng = Rng(opts.seed);
    let mut cache = crate::llama::KvCache::default();
    let start = std::time::Instant::now();
    let mut logits = lm.forward_last(&ids, Some(&mut cache))?;
    let mut out = Vec::new();
    let mut text = String::new();
    let mut stopped = false;
    for _ in 0..opts.max_tokens {
        let t = logits.dims()[0];
        let row = logits.get(t - 1)?.to_vec1::<f32>()?;
        let next = pick(&row, opts.temperature, &mut rng);
        if eos.contains(&next) {
            stopped = true;
            break;
        }
        out.push(next);
        let full = decode(&m.tokenizer, &out)?;
        // Emit only complete characters: a token can end inside a multi-byte character.
        if !full.ends_with('\u{FFFD}') && full.len() >= text.len() {
            on_text(&full[text.len()..]);
            text = full;
        }
        logits = lm.forward_last(&[next], Some(&mut cache))?;
    }
    let text = decode(&m.tokenizer, &out)?;
    Ok(Output {
        prompt_tokens: ids.len(),
        tokens_per_s: out.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
        tokens: out,
        text,
        stopped_on_eos: stopped,
    })
}

/// True when the tail of `tokens` repeats one n-gram (n = 1..=8) at least three times in a row:
/// the degenerate loop badly quantized models fall into.
pub fn has_repetition_loop(tokens: &[u32]) -> bool {
    (1..=8).any(|n| {
        tokens.len() >= 3 * n && {
            let t = &tokens[tokens.len() - 3 * n..];
            t[..n] == t[n..2 * n] && t[n..2 * n] == t[2 * n..]
        }
    }) && tokens.len() >= 6
}

/// One gold prompt: the reference model's greedy continuation against the candidate's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpotCheck {
    pub prompt: String,
    pub reference: String,
    pub candidate: String,
    /// Fraction of the reference's tokens the candidate reproduces at the same position.
    pub token_agreement: f64,
    /// Tokens before the first divergence.
    pub matching_prefix: usize,
    pub reference_loops: bool,
    pub candidate_loops: bool,
    /// FAIL when the candidate produced nothing or loops where the reference does not.
    pub status: &'static str,
}

/// Greedy spot checks: same prompts through both models.
pub fn spot_check(
    candidate: &LoadedModel,
    reference: &LoadedModel,
    prompts: &[String],
    max_tokens: usize,
) -> Result<Vec<SpotCheck>> {
    let opts = Options {
        max_tokens,
        temperature: 0.0,
        seed: 0,
    };
    let mut out = Vec::new();
    for p in prompts {
        let r = generate(reference, p, &opts, &mut |_| {})?;
        let c = generate(candidate, p, &opts, &mut |_| {})?;
        out.push(judge(p, r, c));
    }
    Ok(out)
}

/// Compares a candidate's greedy continuation of `prompt` with the reference's.
pub fn judge(prompt: &str, r: Output, c: Output) -> SpotCheck {
    let pairs = || r.tokens.iter().zip(&c.tokens);
    let same = pairs().filter(|(a, b)| a == b).count();
    let prefix = pairs().take_while(|(a, b)| a == b).count();
    let (rl, cl) = (
        has_repetition_loop(&r.tokens),
        has_repetition_loop(&c.tokens),
    );
    let fail = (c.tokens.is_empty() && !r.tokens.is_empty()) || (cl && !rl);
    SpotCheck {
        prompt: prompt.to_string(),
        token_agreement: same as f64 / r.tokens.len().max(1) as f64,
        matching_prefix: prefix,
        reference: r.text,
        candidate: c.text,
        reference_loops: rl,
        candidate_loops: cl,
        status: if fail { "FAIL" } else { "PASS" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn judge_fails_a_candidate_that_loops_or_falls_silent() {
        let out = |tokens: Vec<u32>| Output {
            prompt_tokens: 3,
            tokens_per_s: 0.0,
            text: String::new(),
            stopped_on_eos: false,
            tokens,
        };
        let r = || out(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let ok = judge("p", r(), out(vec![1, 2, 3, 9, 5, 6, 7, 8]));
        assert_eq!(ok.status, "PASS");
        assert_eq!(ok.matching_prefix, 3);
        assert!((ok.token_agreement - 7.0 / 8.0).abs() < 1e-12);
        assert_eq!(
            judge("p", r(), out(vec![1, 2, 5, 5, 5, 5, 5, 5])).status,
            "FAIL"
        );
        assert_eq!(judge("p", r(), out(vec![])).status, "FAIL");
    }

    #[test]
    fn detects_loops() {
        assert!(has_repetition_loop(&[5, 1, 2, 1, 2, 1, 2]));
        assert!(has_repetition_loop(&[9, 9, 9, 9, 9, 9]));
        assert!(!has_repetition_loop(&[1, 2, 3, 4, 5, 6, 7]));
        assert!(!has_repetition_loop(&[1, 2, 1, 2]));
    }
    #[test]
    fn greedy_pick_and_seeded_sampling() {
        let row = [0.1f32, 3.0, -1.0, 2.9];
        let mut r = Rng(1);
        assert_eq!(pick(&row, 0.0, &mut r), 1);
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..50).map(|_| pick(&row, 1.0, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(
            draw(7).contains(&3),
            "sampling must reach the second-best token"
        );
    }

    /// Sampling draws are SplitMix64's top 53 bits over 2^53: pinned, so seeded outputs stay.
    #[test]
    fn the_sampling_stream_is_pinned() {
        let mut r = Rng(7);
        for want in [3511274219185729u64, 151215513962380, 8113330931062309] {
            assert_eq!(r.uniform(), want as f64 / (1u64 << 53) as f64);
        }
    }
}

//! Text generation with a KV cache: greedy by default, seeded temperature sampling otherwise.

use crate::tokenizer::{decode, encode};
use crate::LoadedModel;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct Options {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

pub struct Output {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
    pub tokens_per_s: f64,
}

/// SplitMix64: a tiny seeded generator, enough for reproducible sampling.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
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
    let mut r = rng.next_f64() * total;
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
    let ids = encode(&m.tokenizer, prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let eos = m
        .tokenizer
        .token_to_id("<|im_end|>")
        .into_iter()
        .chain(m.tokenizer.token_to_id("<|endoftext|>"));
    let eos: Vec<u32> = eos.collect();
    let mut rng = Rng(opts.seed);
    let mut cache = crate::llama::KvCache::default();
    let start = std::time::Instant::now();
    let mut logits = lm.forward(&ids, Some(&mut cache), None)?;
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
        logits = lm.forward(&[next], Some(&mut cache), None)?;
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

//! Throughput of the forward pass: prompt processing (one batched pass over `pp` tokens, logits
//! of the last one, as llama-bench's `pp` test computes them) and
//! generation (`tg` single-token steps with the KV cache, from an empty cache, as
//! llama-bench's `tg` test runs them).

use adaptq_model::llama::{KvCache, Llama};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    pub pp_tokens: usize,
    pub pp_tokens_per_s: f64,
    pub tg_tokens: usize,
    pub tg_tokens_per_s: f64,
}

/// Best of `reps` runs of each phase (the least disturbed by other work on the machine).
pub fn measure(m: &Llama, pp: usize, tg: usize, reps: usize) -> Result<Speed> {
    let v = m.vocab_size() as u32;
    if pp == 0 || tg == 0 {
        anyhow::bail!("measure at least one prompt token and one generated token");
    }
    let prompt: Vec<u32> = (0..pp as u32).map(|i| (i * 7919 + 13) % v).collect();
    let (mut best_pp, mut best_tg) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        m.forward_last(&prompt, Some(&mut KvCache::default()))?;
        best_pp = best_pp.min(t.elapsed().as_secs_f64());
        let mut cache = KvCache::default();
        let t = Instant::now();
        let mut next = prompt[0];
        for _ in 0..tg {
            let l = m.forward_last(&[next], Some(&mut cache))?;
            next = l.get(0)?.argmax(0)?.to_scalar::<u32>()?;
        }
        best_tg = best_tg.min(t.elapsed().as_secs_f64());
    }
    Ok(Speed {
        pp_tokens: pp,
        pp_tokens_per_s: pp as f64 / best_pp,
        tg_tokens: tg,
        tg_tokens_per_s: tg as f64 / best_tg,
    })
}

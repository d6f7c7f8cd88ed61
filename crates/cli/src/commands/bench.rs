//! `adaptq bench`: forward-pass throughput of models side by side, relative to the first.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `(pp, tg, reps)`: prompt tokens, generated tokens, repetitions (the best is kept).
pub fn run(
    models: &[PathBuf],
    (pp, tg, reps): (usize, usize, usize),
    kernels: adaptq_model::Kernels,
    json: bool,
) -> Result<()> {
    if models.is_empty() {
        bail!("name at least one model or bundle to benchmark");
    }
    let threads = rayon::current_num_threads();
    let label = kernels.name();
    if !json {
        println!("threads: {threads}");
        println!("kernels: {label}");
        println!("| model | pp{pp} tok/s | tg{tg} tok/s | pp vs first | tg vs first |");
        println!("|---|---|---|---|---|");
    }
    let mut first: Option<adaptq_eval::speed::Speed> = None;
    let mut rows = Vec::new();
    for p in models {
        let m = adaptq_model::load_with(p, kernels)?;
        let s = adaptq_eval::speed::measure(m.llama()?, pp, tg, reps)?;
        let f = first.get_or_insert_with(|| s.clone());
        if json {
            rows.push(serde_json::json!({"model": p.display().to_string(), "speed": s}));
            continue;
        }
        println!(
            "| {} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
            p.display(),
            s.pp_tokens_per_s,
            s.tg_tokens_per_s,
            s.pp_tokens_per_s / f.pp_tokens_per_s,
            s.tg_tokens_per_s / f.tg_tokens_per_s
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"threads": threads, "kernels": label, "models": rows})
        );
    }
    Ok(())
}

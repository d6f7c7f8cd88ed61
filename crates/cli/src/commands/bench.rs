//! `adaptq bench`: forward-pass throughput of models side by side, relative to the first.

use anyhow::{bail, Result};
use std::path::PathBuf;

pub fn run(
    models: &[PathBuf],
    pp: usize,
    tg: usize,
    reps: usize,
    kernels: adaptq_model::Kernels,
) -> Result<()> {
    if models.is_empty() {
        bail!("name at least one model or bundle to benchmark");
    }
    println!(
        "threads: {}, kernels: {}",
        rayon::current_num_threads(),
        match kernels {
            adaptq_model::Kernels::Exact => "exact (f32)",
            adaptq_model::Kernels::Packed => "packed",
        }
    );
    println!("| model | pp{pp} tok/s | tg{tg} tok/s | pp vs first | tg vs first |");
    println!("|---|---|---|---|---|");
    let mut first: Option<adaptq_eval::speed::Speed> = None;
    for p in models {
        let m = adaptq_model::load_with(p, kernels)?;
        let s = adaptq_eval::speed::measure(m.llama()?, pp, tg, reps)?;
        let f = first.get_or_insert_with(|| s.clone());
        println!(
            "| {} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
            p.display(),
            s.pp_tokens_per_s,
            s.tg_tokens_per_s,
            s.pp_tokens_per_s / f.pp_tokens_per_s,
            s.tg_tokens_per_s / f.tg_tokens_per_s
        );
    }
    Ok(())
}

//! `adaptq spot-check`: greedy continuations of gold prompts, candidate against reference.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::ExitCode;

pub fn run(
    model: &Path,
    base: &Path,
    prompts: &Path,
    max_tokens: usize,
    json: bool,
    kernels: adaptq_model::Kernels,
) -> Result<ExitCode> {
    let list = adaptq_pipeline::plan::read_prompts(Some(prompts))?;
    if list.is_empty() {
        bail!("{} holds no prompts (one per line)", prompts.display());
    }
    let cand = adaptq_model::load_with(model, kernels)?;
    // Both on the same kernels, so a model checked against itself agrees fully.
    let refm = adaptq_model::load_with(base, kernels)?;
    let checks = adaptq_model::generate::spot_check(&cand, &refm, &list, max_tokens)?;
    let fails = checks.iter().filter(|c| c.status == "FAIL").count();
    let mean = checks.iter().map(|c| c.token_agreement).sum::<f64>() / checks.len() as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({"checks": checks, "mean_token_agreement": mean, "failures": fails})
        );
    } else {
        for c in &checks {
            println!(
                "[{}] {:.0}% agree  {}",
                c.status,
                100.0 * c.token_agreement,
                c.prompt
            );
            println!("    reference: {}", c.reference.replace('\n', " "));
            println!("    candidate: {}", c.candidate.replace('\n', " "));
        }
        println!(
            "mean token agreement {:.1}%, {fails} failure(s)",
            100.0 * mean
        );
    }
    Ok(if fails == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

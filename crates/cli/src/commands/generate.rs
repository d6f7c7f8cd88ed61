//! `adaptq generate`: continue a prompt, streaming the text as it is produced.

use anyhow::Result;
use std::io::Write;
use std::path::Path;

pub fn run(
    model: &Path,
    prompt: &str,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
    kernels: adaptq_model::Kernels,
) -> Result<()> {
    let m = adaptq_model::load_with(model, kernels)?;
    let opts = adaptq_model::generate::Options {
        max_tokens,
        temperature,
        seed,
    };
    let out = adaptq_model::generate::generate(&m, prompt, &opts, &mut |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated, {:.1} tokens/s{}]",
        out.prompt_tokens,
        out.tokens.len(),
        out.tokens_per_s,
        if out.stopped_on_eos {
            ", stopped at end-of-sequence"
        } else {
            ""
        }
    );
    Ok(())
}

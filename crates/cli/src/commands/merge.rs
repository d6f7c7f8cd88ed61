//! `adaptq merge`: the parts of a block-range run joined into one bundle.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn run(parts: &[PathBuf], out: &Path, force: bool) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let outcome = {
        let mut bars = crate::progress::Bars::new(false);
        adaptq_pipeline::Plan::merge(parts, out, force, &mut bars)?
    };
    crate::commands::quantize::print_outcome(&outcome, start);
    Ok(if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

//! `adaptq report`: where a bundle lost quality, as Markdown, HTML or JSON.

use crate::args::ReportFormat;
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(dir: &Path, format: ReportFormat, out: Option<&Path>) -> Result<()> {
    let r = adaptq_bundle::report::build(dir)?;
    let text = match format {
        ReportFormat::Json => serde_json::to_string_pretty(&r)? + "\n",
        ReportFormat::Md => adaptq_bundle::report::markdown(&r),
        ReportFormat::Html => adaptq_bundle::report::html(&r),
    };
    match out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

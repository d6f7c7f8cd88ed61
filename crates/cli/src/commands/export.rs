//! `adaptq export`: a verified bundle written as a GGUF file or a Hugging Face GPTQ folder.

use crate::args::{ExportArgs, ExportTo};
use adaptq_export::ExportSummary;
use anyhow::{bail, Result};
use std::path::Path;
use std::process::ExitCode;

pub fn run(a: &ExportArgs) -> Result<ExitCode> {
    match a.to {
        ExportTo::Gguf => {
            let ty =
                a.ty.as_deref()
                    .map(adaptq_pipeline::plan::ggml_type)
                    .transpose()?;
            let mut bars = crate::progress::Bars::new(false);
            let s = adaptq_pipeline::plan::export_gguf(&a.dir, &a.out, ty, a.force, &mut bars)?;
            drop(bars);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_gguf(&a.out, &s);
            }
        }
        ExportTo::HfGptq => {
            if a.ty.is_some() {
                bail!("--type applies to --to gguf");
            }
            adaptq_bundle::output::check_replaceable(
                &a.out,
                a.force,
                adaptq_bundle::output::Kind::Folder,
            )?;
            let b = adaptq_pipeline::plan::verified_bundle(&a.dir)?;
            let pb = crate::progress::bar(b.manifest.tensors.len() as u64, "export", "tensors");
            let s = adaptq_export::export_hf_gptq(
                &b,
                &a.out,
                &adaptq_export::HfGptqOptions {
                    max_shard_bytes: a.max_shard_size,
                    force: a.force,
                },
                &mut |d, _| pb.set_position(d as u64),
            )?;
            pb.finish_and_clear();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "wrote {} (Hugging Face GPTQ, {}-bit group {}, {} tensor bytes): {}",
                    a.out.display(),
                    s.bits,
                    s.group_size,
                    s.tensor_bytes,
                    s.files.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a GGUF export wrote: types used, size, and any tensor that is not the bundle's value.
pub fn print_gguf(out: &Path, s: &ExportSummary) {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for t in &s.tensors {
        match counts.iter_mut().find(|(n, _)| *n == t.ggml_type) {
            Some(c) => c.1 += 1,
            None => counts.push((t.ggml_type.clone(), 1)),
        }
    }
    let types: Vec<String> = counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
    println!(
        "wrote {} (GGUF v3, {} bytes, {:.3} bits/weight over {} parameters): {}",
        out.display(),
        s.file_bytes,
        s.bits_per_weight,
        s.params,
        types.join(", ")
    );
    let rer: Vec<_> = s.tensors.iter().filter(|t| !t.exact).collect();
    if rer.is_empty() {
        println!("  every tensor holds exactly the bundle's values");
        return;
    }
    println!(
        "  {} tensor(s) re-rounded (not the bundle's exact values):",
        rer.len()
    );
    for t in rer.iter().take(8) {
        println!("    {}: {}", t.name, t.note.as_deref().unwrap_or(""));
    }
    if rer.len() > 8 {
        println!("    … and {} more (--json lists all)", rer.len() - 8);
    }
}

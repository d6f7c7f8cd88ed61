//! `adaptq quantize`: flags (over an optional YAML config) into `QuantizeOptions`, then the
//! library's `Plan` does the rest.

use crate::args::QuantizeArgs;
use adaptq_pipeline::{Choice, Method, Plan, QuantizeOptions};
use anyhow::{bail, Result};
use std::process::ExitCode;

/// The effective options: the defaults, then the config file, then the flags given.
pub fn options(args: &QuantizeArgs) -> Result<QuantizeOptions> {
    let file = match &args.config {
        Some(p) => QuantizeOptions::yaml_map(p)?,
        None => serde_json::Value::Null,
    };
    let o = QuantizeOptions::merged(&file, &args.given.clone().into())?;
    // Other methods leave GPTQ's defaults unused (a printed config names them for every
    // method), but a flag the user types must not be dropped silently.
    let gptq = o.method.runs_gptq();
    let readers = [
        ("hessian_shrink", gptq),
        ("act_order", gptq),
        // NOVAQ damps the Hessian behind its weighted distances too.
        ("damp", gptq || o.method == Method::Novaq),
    ];
    for (key, read) in readers {
        if args.given.contains_key(key) && !read {
            bail!(
                "{key} is a GPTQ setting, and method {} does not run GPTQ: use method gptq or \
                 apq, or leave {key} out",
                o.method.name()
            );
        }
    }
    Ok(o)
}

/// The GGUF type mix in a few lines; every tensor's type and errors are in verification.json.
fn print_mix(mix: &serde_json::Value) {
    let num = |k: &str| mix[k].as_f64().unwrap_or(f64::NAN);
    let like = match mix["like"].as_str() {
        Some(n) => format!(", the size of llama-quantize's {n} for this model"),
        None => String::new(),
    };
    println!(
        "  GGUF type mix for {:.3} bits/weight{like} (planned {:.3}, every tensor counted):",
        num("target_bpw"),
        num("planned_bpw")
    );
    let rows = mix["histogram"].as_array().cloned().unwrap_or_default();
    let all: f64 = rows.iter().filter_map(|r| r["params"].as_f64()).sum();
    for r in &rows {
        println!(
            "    {:<7} {:>4} tensors  {:>5.1}% of the mixed weights",
            r["type"].as_str().unwrap_or("?"),
            r["tensors"],
            100.0 * r["params"].as_f64().unwrap_or(0.0) / all.max(1.0)
        );
    }
    println!("    (per tensor: type, predicted and measured error in verification.json, gguf_mix)");
}

pub fn run(args: &QuantizeArgs) -> Result<ExitCode> {
    let options = options(args)?;
    if args.print_config {
        print!("{}", options.to_yaml()?);
        return Ok(ExitCode::SUCCESS);
    }
    let plan = Plan::new(options)?;
    let start = std::time::Instant::now();
    if plan.is_part() {
        let mut bars = crate::progress::Bars::new(adaptq_remote::is_remote(plan.source()));
        let part = plan.run_part(&mut bars)?;
        drop(bars);
        let s = &part.state;
        println!(
            "wrote part {} (blocks {}..{} of {}) in {:.1}s",
            part.dir.display(),
            s.start,
            s.end,
            s.blocks,
            start.elapsed().as_secs_f64()
        );
        println!("  join the parts with: adaptq merge PART... --out BUNDLE");
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = {
        let mut bars = crate::progress::Bars::new(adaptq_remote::is_remote(plan.source()));
        plan.run(&mut bars).map_err(|e| {
            // The quantizers speak of budgets; here the user learns which flags set them.
            let no_layout = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<adaptq_quant::QuantError>(),
                    Some(adaptq_quant::QuantError::NoLayout { .. })
                )
            });
            if no_layout {
                e.context("raise --target-bits or --max-subspace-dim")
            } else {
                e
            }
        })?
    };
    print_outcome(&outcome, start);
    Ok(if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// What a written bundle holds and whether its gates passed.
pub fn print_outcome(outcome: &adaptq_pipeline::Outcome, start: std::time::Instant) {
    let s = &outcome.summary;
    let t = &s.verification.totals;
    println!(
        "wrote {} ({} tensors, {} shards) in {:.1}s",
        outcome.out.display(),
        s.manifest.tensors.len(),
        s.manifest.shards.len(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "  {:.3} bits/weight overall, {:.3} on quantized tensors; {:.2}x smaller than f16",
        t.bits_per_weight, t.bits_per_quantized_weight, t.compression_vs_f16
    );
    if let Some(r) = t.lossless_ratio {
        println!("  lossless stage (rANS on codes): quantized payload {r:.3}x smaller than packed");
    }
    if let Some(mix) = s.verification.extra.get("gguf_mix") {
        print_mix(mix);
    }
    for g in &s.verification.gates {
        println!("  gate {:<22} {}  {}", g.name, g.status, g.detail);
    }
    println!("  OVERALL_STATUS {}", s.verification.overall_status);
    println!("  global digest {}", s.manifest.global_digest);
    if let Some(g) = &outcome.gguf {
        crate::commands::export::print_gguf(&outcome.out, g);
    }
}

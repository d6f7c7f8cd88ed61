//! One file per command; each parses nothing itself (flags arrive typed from `args`) and
//! calls the library, then prints what it did.

pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod merge;
pub mod quantize;
pub mod report;
pub mod spot_check;
pub mod stats;
pub mod tensor_hashes;
pub mod verify;

use crate::args::Cmd;
use anyhow::Result;
use std::process::ExitCode;

/// Runs the parsed command.
pub fn run(cmd: &Cmd) -> Result<ExitCode> {
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cmd {
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::Merge { parts, out, force } => merge::run(parts, out, *force),
        Cmd::Export(a) => export::run(a),
        Cmd::TensorHashes { path, hf } => done(tensor_hashes::run(path, *hf)),
        Cmd::Report { dir, format, out } => done(report::run(dir, *format, out.as_deref())),
        Cmd::Verify { dir, json } => verify::run(dir, *json),
        Cmd::Info { path, tensors } => done(info::run(path, *tensors)),
        Cmd::Eval(a) => done(eval::run(a)),
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            seed,
            kernels,
        } => done(generate::run(
            model,
            prompt,
            *max_tokens,
            *temperature,
            *seed,
            kernels.kernels(),
        )),
        Cmd::SpotCheck {
            model,
            base,
            prompts,
            max_tokens,
            json,
            kernels,
        } => spot_check::run(model, base, prompts, *max_tokens, *json, kernels.kernels()),
        Cmd::Bench {
            models,
            pp,
            tg,
            reps,
            kernels,
            json,
        } => done(bench::run(
            models,
            (*pp, *tg, *reps),
            kernels.kernels(),
            *json,
        )),
        Cmd::Stats { dir, json } => done(stats::run(dir, *json)),
    }
}

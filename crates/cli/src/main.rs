//! The `adaptq` command line: flags are parsed ([`args`]), then each command ([`commands`])
//! calls the library. Errors are printed once, here, with the flag that fixes them where
//! there is one.

mod args;
mod commands;
mod progress;

use clap::Parser;
use std::process::ExitCode;

/// Worker threads from `--threads`, else `ADAPTQ_NUM_THREADS` (default: every core), for rayon
/// (which faer's parallel kernels run on) and for candle, which reads `RAYON_NUM_THREADS`.
fn set_threads(flag: Option<u16>) -> anyhow::Result<()> {
    let n = match (flag, std::env::var("ADAPTQ_NUM_THREADS")) {
        (Some(n), _) => n as usize,
        (None, Ok(v)) => v.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            anyhow::anyhow!("ADAPTQ_NUM_THREADS={v}: expected a positive whole number")
        })?,
        (None, Err(_)) => return Ok(()),
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()?;
    Ok(())
}

/// The message for a failed run: the error chain, with a hint naming the flag where a
/// library error has one, control characters escaped (errors quote names and strings from
/// files and servers, which must not drive the terminal).
fn message(e: &anyhow::Error) -> String {
    let mut msg = format!("{e:#}");
    for cause in e.chain() {
        if let Some(adaptq_bundle::BundleError::Exists(p)) = cause.downcast_ref() {
            msg = format!(
                "{} already exists (use --force to replace it, if adaptq wrote it)",
                p.display()
            );
        }
        use adaptq_pipeline::PlanError as P;
        match cause.downcast_ref() {
            Some(P::NeedsCalibration(m)) => {
                msg = format!("--method {m} needs calibration text: --calib FILE (e.g. ../shared/corpora/austen/emma.txt)");
            }
            Some(P::RotationNeedsCalibration) => {
                msg = "--rotate needs --calib: rotated layers are quantized through the calibrated pipeline".into();
            }
            Some(P::NovaqOnly) => {
                msg = "--preset and --target-bits are NOVAQ settings; add --method novaq".into();
            }
            None => {}
        }
    }
    let lines: Vec<_> = msg.split('\n').map(adaptq_source::sanitize).collect();
    lines.join("\n")
}

/// Forward passes allocate and free the same few megabyte-sized buffers (activations of a
/// prompt, per layer) hundreds of times. glibc hands such blocks back to the kernel on free
/// (mmap'd, or trimmed off the heap's top), so every pass faulted its pages in again: a tenth
/// of an f32 prompt's time went to page faults. Blocks up to 16 MiB now come from the heap and
/// up to 64 MiB of freed space stays there. Runtime commands only: quantize's peak memory is
/// an acceptance figure, and keeping freed blocks could raise it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    // `adaptq info … | head` must end quietly like any Unix tool, not panic in println!.
    // Rust ignores SIGPIPE by default; restoring the default is safe for the hub client
    // because std's sockets send with MSG_NOSIGNAL on Linux, so they still see EPIPE errors.
    #[cfg(target_os = "linux")]
    // SAFETY: called once at start-up before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = args::Cli::parse();
    if matches!(
        cli.cmd,
        args::Cmd::Eval(_)
            | args::Cmd::Generate { .. }
            | args::Cmd::SpotCheck { .. }
            | args::Cmd::Bench { .. }
    ) {
        keep_freed_memory();
    }
    match set_threads(cli.threads).and_then(|()| commands::run(&cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::from(1)
        }
    }
}

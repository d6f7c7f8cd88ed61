//! llama.cpp's own tools as the reference: built once per machine by the shared
//! `../shared/tools/llamacpp.sh` (about 12 minutes the first time, cached outside the
//! repository), run here, and their printed figures read back.

use crate::cli::text;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder of llama.cpp's tools, built on first use by the shared script.
pub fn bin_dir() -> PathBuf {
    let script = crate::repo_root().join("../shared/tools/llamacpp.sh");
    let o = Command::new("bash")
        .arg(&script)
        .current_dir(crate::repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(o.status.success(), "{}: {}", script.display(), text(&o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Runs one of llama.cpp's tools (`llama-perplexity`, `llama-tokenize`, …) from `bin` and
/// returns its stdout followed by its stderr; a failure fails the test with that output.
///
/// Weight repacking is off (`LLAMA_ARG_REPACK=0`): on CPUs with AMX (Sapphire Rapids) the
/// native build repacks weights for its AMX kernels, which crash with SIGSEGV in
/// `ggml_backend_amx_mul_mat` on this project's virtual machines; the plain CPU kernels compute
/// the same products on every machine.
pub fn run(bin: &Path, tool: &str, args: &[&str]) -> String {
    let o = Command::new(bin.join(tool))
        .env("LLAMA_ARG_REPACK", "0")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(o.status.success(), "{tool}: {}", text(&o));
    text(&o)
}

/// `[2, 7719, …]` as `llama-tokenize --ids` prints it.
pub fn parse_ids(out: &str) -> Vec<u32> {
    let list = out
        .lines()
        .find(|l| l.starts_with('['))
        .unwrap_or_else(|| panic!("no id list in llama-tokenize output: {out}"));
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|x| x.trim().parse().expect("token id"))
        .collect()
}

/// The figure of `Final estimate: PPL = 23.4601 +/- 0.65522`.
pub fn final_ppl(out: &str) -> f64 {
    let rest = out
        .split("Final estimate: PPL = ")
        .nth(1)
        .unwrap_or_else(|| panic!("no final estimate in llama-perplexity output: {out}"));
    rest.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("PPL value")
}

/// `adaptq eval`'s perplexity (binary `adaptq`) on `kernels` (`--exact` or `--packed`), at
/// context `ctx` over `chunks` windows, the second half of each scored as llama-perplexity
/// scores it.
pub fn adaptq_ppl(
    adaptq: &str,
    model: &Path,
    text: &Path,
    (ctx, chunks): (&str, &str),
    kernels: &str,
) -> f64 {
    use crate::cli::{json, ok, run, s};
    let o = ok(run(
        adaptq,
        &[
            "eval",
            s(model),
            "--text",
            s(text),
            "--ctx",
            ctx,
            "--score",
            "second-half",
            "--chunks",
            chunks,
            "--json",
            kernels,
        ],
    ));
    json(&o)["ppl"].as_f64().expect("ppl")
}

/// llama-perplexity's figure on the same windows as [`adaptq_ppl`], with f32 keys and values
/// and no flash attention (llama.cpp's f16 defaults moved random models' figures by at most
/// 0.008 % when measured), 2 threads.
pub fn peer_ppl(bin: &Path, model: &Path, text: &Path, (ctx, chunks): (&str, &str)) -> f64 {
    use crate::cli::s;
    final_ppl(&run(
        bin,
        "llama-perplexity",
        &[
            "-m",
            s(model),
            "-f",
            s(text),
            "-c",
            ctx,
            "--chunks",
            chunks,
            "-t",
            "2",
            "-fa",
            "off",
            "-ctk",
            "f32",
            "-ctv",
            "f32",
        ],
    ))
}

/// Writes an all-F32 copy of the GGUF `src` into `out` with the gguf-py beside the tools in
/// `bin` (llama.cpp's own dequantizers, `scripts/reference/dequantize_gguf.py`).
pub fn f32_gguf(bin: &Path, src: &Path, out: &Path) {
    let o = Command::new("bash")
        .current_dir(crate::repo_root())
        .env("PYTHONPATH", bin.join("../gguf-py"))
        .args([
            "-c",
            r#"source scripts/python-env.sh && exec "$venv/bin/python" scripts/reference/dequantize_gguf.py "$@""#,
            "dequantize_gguf",
        ])
        .arg(src)
        .arg(out)
        .output()
        .expect("running dequantize_gguf.py");
    assert!(o.status.success(), "dequantize_gguf.py: {}", text(&o));
}

/// Writes `arch`'s seeded random-weight GGUF (seed 1) with `scripts/reference/random_gguf.py`,
/// with the `--set` switches given, and its Hugging Face twin into `hf_twin` when asked; the
/// gguf-py is the one of the llama.cpp build in `bin` (see [`bin_dir`]).
pub fn random_gguf(bin: &Path, arch: &str, out: &Path, sets: &[&str], hf_twin: Option<&Path>) {
    let mut cmd = Command::new("bash");
    cmd.current_dir(crate::repo_root())
        .env("LLAMACPP_GGUF_PY", bin.join("../gguf-py"))
        .args([
            "-c",
            r#"source scripts/python-env.sh && exec "$venv/bin/python" scripts/reference/random_gguf.py "$@""#,
            "random_gguf",
            arch,
        ])
        .arg(out)
        .args(["--seed", "1"]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    if let Some(dir) = hf_twin {
        cmd.arg("--hf-twin").arg(dir);
    }
    let o = cmd.output().expect("running random_gguf.py");
    assert!(o.status.success(), "random_gguf.py {arch}: {}", text(&o));
}

/// `(tensor data bytes, parameters)` of each GGUF file as llama.cpp's own Python reader
/// (gguf-py, beside the tools in `bin`) counts them: it reads every type llama.cpp writes.
/// One interpreter for all the files (starting one costs about 2 s).
pub fn gguf_sizes(bin: &Path, files: &[&Path]) -> Vec<(u64, u64)> {
    let o = Command::new("bash")
        .current_dir(crate::repo_root())
        .env("LLAMACPP_GGUF_PY", bin.join("../gguf-py"))
        .args([
            "-c",
            r#"source scripts/python-env.sh && PYTHONPATH="$LLAMACPP_GGUF_PY" exec "$venv/bin/python" -c '
import sys
from gguf import GGUFReader
for f in sys.argv[1:]:
    r = GGUFReader(f)
    print(sum(int(t.n_bytes) for t in r.tensors), sum(int(t.n_elements) for t in r.tensors))
' "$@""#,
            "gguf_sizes",
        ])
        .args(files)
        .output()
        .expect("running gguf-py");
    assert!(o.status.success(), "gguf-py: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let sizes: Vec<(u64, u64)> = out
        .lines()
        .map(|l| {
            let mut it = l
                .split_whitespace()
                .map(|v| v.parse::<u64>().expect("a count"));
            (it.next().expect("bytes"), it.next().expect("parameters"))
        })
        .collect();
    assert_eq!(sizes.len(), files.len(), "gguf-py printed: {out}");
    sizes
}

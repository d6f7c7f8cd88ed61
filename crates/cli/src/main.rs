//! The `adaptq` command line: a thin layer over `adaptq-pipeline`.

use adaptq_pipeline::{quantize_model, EmbeddingMode, Method, QuantizeConfig};
use adaptq_quant::Grid;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "adaptq",
    version,
    about = "Post-training quantization of LLMs into verified, deterministic bundles",
    long_about = "adaptq reads a model (GGUF or safetensors, local or from hf://, https:// or ollama://), \
quantizes it (RTN, GPTQ, AWQ, APQ mixed widths, ternary; or onto llama.cpp's block types), and writes a \
bundle of <=2 MiB shards with SHA-256/BLAKE3 hashes, manifest.json, model.meta and verification.json \
(measured errors and PASS/FAIL gates). The same input and config always give byte-identical bundles. \
`export` turns a bundle into a GGUF file or a Hugging Face GPTQ checkpoint."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// Round-to-nearest, per group.
    Rtn,
    /// GPTQ: Hessian-aware rounding from calibration text (--calib).
    Gptq,
    /// AWQ: activation-aware channel scales folded into the norms, then round-to-nearest.
    Awq,
    /// APQ: per-layer widths from measured sensitivity under --target-bpw (embeddings and
    /// head included), GPTQ at those widths, then promotion of the worst layers until the
    /// held-out perplexity gate (--max-ppl-delta) passes or the budget runs out.
    Apq,
    /// Ternary: codes in {-1, 0, +1} times a per-group scale mean|w| (BitNet b1.58's rule,
    /// applied after training), stored at 2 bits plus the f16 scale. A model not trained
    /// ternary loses most of its quality; measure it with `eval --base`.
    Ternary,
    /// NOVAQ: rows normalized (mean, scale; column scales for outlier inputs), cut into
    /// vectors coded by two residual k-means codebooks sized per layer to --target-bits
    /// (every overhead counted). With --calib: distances weighted by the inputs' Hessian,
    /// codes chosen with GPTQ-style error feedback, codebooks and row scales refined against
    /// each layer's output on the calibration text. Without: plain weighted k-means.
    Novaq,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LosslessArg {
    None,
    Rans,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    /// About 1.5 bits per weight on the linear layers.
    Balanced,
    /// About 2.5 bits per weight.
    HighQuality,
    /// About 1.0 bit per weight (quality drops sharply; measure it).
    Aggressive,
}

impl PresetArg {
    fn name(self) -> &'static str {
        match self {
            PresetArg::Balanced => "balanced",
            PresetArg::HighQuality => "high-quality",
            PresetArg::Aggressive => "aggressive",
        }
    }
    fn target_bits(self) -> f64 {
        match self {
            PresetArg::Balanced => 1.5,
            PresetArg::HighQuality => 2.5,
            PresetArg::Aggressive => 1.0,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ScoreArg {
    All,
    SecondHalf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Json,
    Md,
    Html,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmbedArg {
    F16,
    F32,
    Quant,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum FormatArg {
    /// adaptq's verified bundle folder.
    Bundle,
    /// One GGUF v3 file for llama.cpp / Ollama / LM Studio.
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportTo {
    /// GGUF v3 file (llama.cpp, Ollama, LM Studio).
    Gguf,
    /// Hugging Face GPTQ checkpoint folder (transformers, vLLM): qweight/qzeros/scales/g_idx,
    /// config.json with quantization_config, tokenizer files. Needs a symmetric 2/4/8-bit bundle.
    HfGptq,
}

fn parse_ggml(s: &str) -> Result<adaptq_quant::ggml::BlockType> {
    adaptq_quant::ggml::BlockType::parse(s).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown GGML type '{s}'; choose one of {}",
            adaptq_quant::ggml::ALL.map(|t| t.name()).join(", ")
        )
    })
}

// Parsed once per run: the size of the biggest variant (quantize's many flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Quantize a model into a verified bundle folder (or, with --format gguf, one GGUF file).
    Quantize {
        /// Model: a local .gguf/.safetensors file or folder, hf://org/name[@revision][/file],
        /// an http(s):// link to a .gguf/.safetensors file, or ollama://name[:tag].
        /// Remote weights are streamed with range requests, fetched ahead while quantizing.
        /// Environment: HF_TOKEN (or HUGGINGFACE_TOKEN, HUGGING_FACE_HUB_TOKEN), HF_ENDPOINT,
        /// ADAPTQ_CACHE_DIR (keep downloads, hub cache layout), ADAPTQ_OFFLINE=1 / HF_HUB_OFFLINE=1
        /// (cache only), OLLAMA_MODELS (Ollama store, default ~/.ollama/models).
        src: String,
        /// Output bundle folder (must not exist unless --force).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "rtn")]
        method: MethodArg,
        /// Bits per code, 2 to 8; for --method apq a range of allowed widths, e.g. 3-4 or 2-8.
        #[arg(long, default_value = "4")]
        bits: String,
        /// APQ: overall bits per weight to aim for, every tensor counted (default: the middle
        /// of the --bits range plus the scale overhead).
        #[arg(long)]
        target_bpw: Option<f64>,
        /// Search and fold AWQ scales before GPTQ/APQ rounding (always on for --method awq).
        #[arg(long)]
        awq: bool,
        /// Progressive pass for calibrated methods: after rounding, re-fit each group's scale
        /// (and min) to the layer's output error on the calibration inputs, codes fixed; kept
        /// only where it lowers the error. The reduction is recorded per layer.
        #[arg(long)]
        refit: bool,
        /// APQ gate: held-out perplexity may rise at most this many percent.
        #[arg(long, default_value_t = 2.0)]
        max_ppl_delta: f64,
        /// APQ: layers promoted to the next width per round, and the most rounds.
        #[arg(long, default_value_t = 4)]
        promote_per_round: usize,
        #[arg(long, default_value_t = 6)]
        max_rounds: usize,
        /// APQ: held-out windows (from the last tenth of --calib) for the perplexity gate.
        #[arg(long, default_value_t = 4)]
        heldout_windows: usize,
        /// APQ gold-prompt gate: one prompt per line (default: the built-in prompts/gold.txt);
        /// the quantized model's greedy continuation must not loop or fall silent where the
        /// unquantized model does not.
        #[arg(long)]
        gold_prompts: Option<PathBuf>,
        /// APQ gold-prompt gate: greedy tokens generated per prompt.
        #[arg(long, default_value_t = 16)]
        gold_tokens: usize,
        /// Columns per scale group (32, 64, 128, ...); 0 = one group per output channel.
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        /// Symmetric grid (no per-group offset); asymmetric (scale + min) otherwise.
        #[arg(long)]
        sym: bool,
        /// How to store embedding tables and a separate output head.
        #[arg(long, value_enum, default_value = "f16")]
        embeddings: EmbedArg,
        /// Seed for every random choice; recorded in the manifest.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest shard in bytes (at most 2 MiB).
        #[arg(long, default_value_t = adaptq_bundle::MAX_SHARD_BYTES)]
        shard_size: u64,
        /// Gate: lowest acceptable weight cosine similarity of any quantized tensor.
        #[arg(long, default_value_t = 0.9)]
        min_cosine: f64,
        /// Gate: largest acceptable overall bits per weight.
        #[arg(long)]
        max_bpw: Option<f64>,
        /// Model id recorded in the manifest (default: the source's own name).
        #[arg(long)]
        model_id: Option<String>,
        /// Calibration text for calibrated methods (convention: emma.txt; never the eval text).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration windows sampled from --calib.
        #[arg(long, default_value_t = 32)]
        calib_samples: usize,
        /// Tokens per calibration window.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// GPTQ Hessian dampening, as a fraction of the mean diagonal.
        #[arg(long, default_value_t = 0.05)]
        damp: f64,
        /// GPTQ: quantize columns by decreasing activation energy (static groups).
        #[arg(long)]
        act_order: bool,
        /// Replace --out if it exists and adaptq wrote it (a bundle, or a GGUF it exported);
        /// any other file or folder there is refused, never deleted.
        #[arg(long)]
        force: bool,
        /// Output format: a bundle folder, or a GGUF file (--out names the .gguf; the
        /// calibrated values are written onto the GGML type's exact grid).
        #[arg(long, value_enum, default_value = "bundle")]
        format: FormatArg,
        /// Store linear layers as this llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
        /// Q4_K, Q5_K, Q6_K) instead of adaptq's own groups; rows that do not fit a k-quant
        /// (576 is not a multiple of 256) fall back as llama.cpp does (Q4_K→Q5_0, Q5_K→Q5_1,
        /// Q6_K→Q8_0, Q2_K/Q3_K→Q4_0). Default with --format gguf: the type nearest --bits.
        #[arg(long)]
        ggml_type: Option<String>,
        /// With GGML types: the embedding / output table's type, or f16 to keep it as float.
        #[arg(long, default_value = "q8_0")]
        ggml_embedding_type: String,
        /// Rotate every linear layer's input by seeded Hadamard rotations (--seed) before
        /// quantizing (rtn, gptq, novaq): weights are stored as W·R and adaptq's forward pass
        /// rotates the inputs online, so the network computes the same function while outlier
        /// columns are spread over every row. Any width works (576 = 64·9, 1536 = 512·3).
        /// Needs --calib (layers are calibrated in the rotated space). Such bundles cannot be
        /// exported to GGUF / GPTQ (those runtimes do not rotate online).
        #[arg(long)]
        rotate: bool,
        /// Lossless stage: entropy-code the packed codes with rANS (decoded on load; parts
        /// that would not shrink stay as they are). The gain is reported per tensor and overall.
        #[arg(long, value_enum, default_value = "none")]
        lossless: LosslessArg,
        /// NOVAQ: a named setting (sets --target-bits unless that is given).
        #[arg(long, value_enum)]
        preset: Option<PresetArg>,
        /// NOVAQ: bits per weight of each linear layer, codebooks, scales and means included
        /// (default 2.5, or the preset's).
        #[arg(long)]
        target_bits: Option<f64>,
        /// NOVAQ: most centroids of the first codebook (a power of two).
        #[arg(long, default_value_t = 256)]
        level1_centroids: usize,
        /// NOVAQ: most centroids of the residual codebook (a power of two; 0 = one stage).
        #[arg(long, default_value_t = 256)]
        level2_centroids: usize,
        /// NOVAQ: smallest and largest subspace (vector) dimension the planner may choose.
        #[arg(long, default_value_t = 2)]
        min_subspace_dim: usize,
        #[arg(long, default_value_t = 16)]
        max_subspace_dim: usize,
        /// NOVAQ: k-means iterations at most per codebook.
        #[arg(long, default_value_t = 25)]
        max_iterations: usize,
        /// NOVAQ: stop k-means when the objective improves by less than this fraction.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// NOVAQ: conjugate-gradient iterations of teacher-guided refinement (0 = off).
        #[arg(long, default_value_t = 12)]
        refine_iterations: usize,
    },
    /// Write a bundle as files another runtime loads: GGUF v3 (llama.cpp, Ollama, LM Studio) or a
    /// Hugging Face GPTQ checkpoint (transformers, vLLM).
    Export {
        /// The bundle folder (verified before export).
        dir: PathBuf,
        #[arg(long, value_enum)]
        to: ExportTo,
        /// The file (GGUF) or folder (hf-gptq) to write; built under a temporary name first.
        #[arg(long)]
        out: PathBuf,
        /// hf-gptq: largest safetensors shard in bytes (more than one adds an index).
        #[arg(long, default_value_t = 4 << 30)]
        max_shard_size: u64,
        /// Re-round every quantized tensor onto this GGML type (default: keep each tensor's
        /// own; integer grids that are a GGML grid convert losslessly, others are re-rounded
        /// onto the nearest type and listed).
        #[arg(long = "type")]
        ty: Option<String>,
        /// Print the per-tensor summary as JSON.
        #[arg(long)]
        json: bool,
        /// Replace an existing --out, only if adaptq wrote it (a GGUF it exported, or a
        /// folder it created); anything else is refused.
        #[arg(long)]
        force: bool,
    },
    /// SHA-256 of every tensor's values as this tool decodes them (f32, little-endian), one
    /// JSON object; lets an independent reader prove it decodes a file identically.
    TensorHashes {
        /// A .gguf/.safetensors file or a bundle folder.
        path: PathBuf,
        /// For a bundle: name and order tensors as its Hugging Face GPTQ export does.
        #[arg(long)]
        hf: bool,
    },
    /// Where a bundle lost quality: per-layer widths and errors, error histogram, gates, sizes.
    Report {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "md")]
        format: ReportFormat,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a bundle: every shard hash, sizes, index coverage, global digest. Exit 0 only if all hold.
    Verify {
        dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Describe a model file or a bundle.
    Info {
        path: PathBuf,
        /// Also list every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Perplexity of a model or bundle on a text; with --base, KL divergence against another.
    Eval {
        /// Model file/folder or adaptq bundle.
        model: PathBuf,
        /// Plain-text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// all: every next-token prediction; second-half: llama.cpp's llama-perplexity protocol.
        #[arg(long, value_enum, default_value = "all")]
        score: ScoreArg,
        /// Score at most this many windows.
        #[arg(long)]
        chunks: Option<usize>,
        /// Reference model (e.g. the unquantized source) for KLD, top-1 agreement and ΔPPL.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Print one JSON object on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
        /// Rotate every linear layer's input (seeded Hadamard rotations, weights W·R) before
        /// scoring: checks that rotation alone leaves the model's function unchanged.
        #[arg(long, value_name = "SEED")]
        rotate: Option<u64>,
    },
    /// Continue a prompt with a model or bundle (greedy unless --temperature > 0).
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy; otherwise sample from softmax(logits / T).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Gold-prompt spot checks: greedy continuations of a candidate vs a reference model.
    SpotCheck {
        /// Candidate (e.g. a quantized bundle).
        model: PathBuf,
        /// Reference model (e.g. the unquantized source).
        #[arg(long)]
        base: PathBuf,
        /// One prompt per line.
        #[arg(long, default_value = "prompts/gold.txt")]
        prompts: PathBuf,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        #[arg(long)]
        json: bool,
    },
    /// Forward-pass throughput (prompt processing and generation) of one or more models, as a
    /// table with each model's speed relative to the first.
    Bench {
        models: Vec<PathBuf>,
        /// Prompt tokens processed in one batch.
        #[arg(long, default_value_t = 512)]
        pp: usize,
        /// Tokens generated one at a time after the prompt.
        #[arg(long, default_value_t = 64)]
        tg: usize,
        /// Repetitions; the best is reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Sizes, bits per weight, compression vs f16 and per-layer error of a bundle.
    Stats {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} tensors  {{per_sec}}  {{msg}}  [{{elapsed_precise}}]"
        ))
        .expect("valid template"),
    );
    pb
}

/// What a calibrated method hands to the bundle writer: codes and folded norms, sampling
/// info, verification sections and measured gates.
type Calibrated = (
    adaptq_pipeline::calibrate::Calibration,
    adaptq_pipeline::calibrate::CalibInfo,
    serde_json::Map<String, serde_json::Value>,
    Vec<adaptq_pipeline::quantize::Gate>,
);

fn method_name(m: MethodArg) -> &'static str {
    match m {
        MethodArg::Rtn => "rtn",
        MethodArg::Ternary => "ternary",
        MethodArg::Gptq => "gptq",
        MethodArg::Awq => "awq",
        MethodArg::Apq => "apq",
        MethodArg::Novaq => "novaq",
    }
}

/// `4` → (4, 4); `3-4` → (3, 4). Widths are 2 to 8.
fn parse_bits(s: &str) -> Result<(u8, u8)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let p = |x: &str| -> Result<u8> {
        let v: u8 = x.trim().parse().with_context(|| {
            format!("--bits '{s}': expected a width like 4 or a range like 3-4")
        })?;
        if !(2..=8).contains(&v) {
            bail!("--bits '{s}': widths must be between 2 and 8");
        }
        Ok(v)
    };
    let (lo, hi) = (p(a)?, p(b)?);
    if lo > hi {
        bail!("--bits '{s}': the range must run low-high");
    }
    Ok((lo, hi))
}

/// Opens a model from a local path or a remote locator, naming it in any error.
fn open_model(loc: &str) -> Result<adaptq_remote::Opened> {
    adaptq_remote::open(loc).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Gold prompts, one per line (blank lines skipped); the built-in set when no file is given.
fn read_prompts(file: Option<&Path>) -> Result<Vec<String>> {
    let text = match file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading gold prompts {}", p.display()))?,
        None => include_str!("../../../prompts/gold.txt").to_string(),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The GGML type nearest `--bits` (with llama.cpp's sym/min layouts).
fn nearest_ggml(bits: u8, sym: bool) -> adaptq_quant::ggml::BlockType {
    use adaptq_quant::ggml::BlockType as B;
    match (bits, sym) {
        (0..=2, _) => B::Q2K,
        (3, _) => B::Q3K,
        (4, true) => B::Q4_0,
        (4, false) => B::Q4_1,
        (5, true) => B::Q5_0,
        (5, false) => B::Q5_1,
        (6, _) => B::Q6K,
        _ => B::Q8_0,
    }
}

/// Opens a bundle after checking every hash; exports never start from a bundle that fails.
fn verified_bundle(dir: &Path) -> Result<adaptq_bundle::Bundle> {
    if !dir.join(adaptq_bundle::MANIFEST).exists() {
        bail!("{}: not a bundle (no manifest.json)", dir.display());
    }
    let rep = adaptq_bundle::verify_bundle(dir, |_| {});
    if !rep.ok() {
        for p in &rep.problems {
            eprintln!("FAIL: {p}");
        }
        bail!("{} does not verify; refusing to export it", dir.display());
    }
    Ok(adaptq_bundle::Bundle::open(dir)?)
}

/// Verifies `dir`, writes it as GGUF at `out` and prints what was written.
/// What a forced run may replace at a GGUF output path: a GGUF adaptq wrote.
fn gguf_kind() -> adaptq_bundle::output::Kind<'static> {
    adaptq_bundle::output::Kind::File {
        is_ours: &adaptq_export::is_adaptq_gguf,
    }
}

/// Says which flag replaces an existing output, for the one error that needs it.
fn force_hint(e: adaptq_bundle::BundleError) -> anyhow::Error {
    match e {
        adaptq_bundle::BundleError::Exists(p) => anyhow::anyhow!(
            "{} already exists (use --force to replace it, if adaptq wrote it)",
            p.display()
        ),
        e => e.into(),
    }
}

fn export_bundle_gguf(
    dir: &Path,
    out: &Path,
    ty: Option<adaptq_quant::ggml::BlockType>,
    json: bool,
    force: bool,
) -> Result<()> {
    adaptq_bundle::output::check_replaceable(out, force, gguf_kind()).map_err(force_hint)?;
    let b = verified_bundle(dir)?;
    let pb = bar(b.manifest.tensors.len() as u64, "export");
    let s = adaptq_export::export_gguf(
        &b,
        out,
        &adaptq_export::ExportOptions {
            force_type: ty,
            force,
        },
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
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
    let rer: Vec<&adaptq_export::ExportedTensor> = s.tensors.iter().filter(|t| !t.exact).collect();
    if rer.is_empty() {
        println!("  every tensor holds exactly the bundle's values");
    } else {
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
    Ok(())
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
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            // Errors quote names and strings from files and servers: escape control characters
            // so they cannot drive the terminal (line breaks of the message itself are kept).
            let msg = format!("{e:#}");
            let lines: Vec<_> = msg.split('\n').map(adaptq_source::sanitize).collect();
            eprintln!("error: {}", lines.join("\n"));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Quantize {
            src,
            out,
            method,
            bits,
            group_size,
            sym,
            embeddings,
            seed,
            shard_size,
            min_cosine,
            max_bpw,
            model_id,
            calib,
            calib_samples,
            seq_len,
            damp,
            act_order,
            force,
            target_bpw,
            awq,
            refit,
            max_ppl_delta,
            promote_per_round,
            max_rounds,
            heldout_windows,
            gold_prompts,
            gold_tokens,
            format,
            ggml_type,
            ggml_embedding_type,
            preset,
            target_bits,
            level1_centroids,
            level2_centroids,
            min_subspace_dim,
            max_subspace_dim,
            max_iterations,
            tolerance,
            refine_iterations,
            rotate,
            lossless,
        } => {
            if rotate {
                if matches!(method, MethodArg::Apq | MethodArg::Ternary) {
                    bail!(
                        "--rotate works with --method rtn, gptq or novaq, not {}",
                        method_name(method)
                    );
                }
                if ggml_type.is_some() || format == FormatArg::Gguf {
                    bail!("--rotate needs an online rotation llama.cpp does not run; quantize to a bundle");
                }
                if calib.is_none() {
                    bail!("--rotate needs --calib: rotated layers are quantized through the calibrated pipeline");
                }
                if awq || matches!(method, MethodArg::Awq) {
                    bail!("--rotate cannot be combined with AWQ: AWQ folds its scales into the norms and up's rows, before the online rotations");
                }
            }
            let novaq = matches!(method, MethodArg::Novaq).then(|| {
                adaptq_pipeline::quantize::NovaqSettings {
                    preset: preset.map(|p| p.name().to_string()),
                    config: adaptq_quant::novaq::NovaqConfig {
                        target_bits: target_bits
                            .or(preset.map(|p| p.target_bits()))
                            .unwrap_or(2.5),
                        level1_centroids,
                        level2_centroids,
                        min_subspace_dim,
                        max_subspace_dim,
                        max_iterations,
                        tolerance,
                        seed,
                        refine_iterations,
                        damp,
                        ..Default::default()
                    },
                }
            });
            if novaq.is_none() && (preset.is_some() || target_bits.is_some()) {
                bail!("--preset and --target-bits are NOVAQ settings; add --method novaq");
            }
            let (lo, hi) = parse_bits(&bits)?;
            let ggml = match (&ggml_type, format) {
                (Some(t), _) => Some(parse_ggml(t)?),
                (None, FormatArg::Gguf) => Some(nearest_ggml(hi, sym)),
                (None, FormatArg::Bundle) => None,
            };
            let ggml = match ggml {
                Some(linear) => {
                    if matches!(method, MethodArg::Apq) {
                        bail!("--method apq mixes adaptq widths; GGML types are not supported with it yet (quantize APQ to a bundle, then `adaptq export --to gguf`)");
                    }
                    if refit {
                        bail!(
                            "--refit re-fits adaptq group scales; it does not apply to GGML types"
                        );
                    }
                    let embedding = match ggml_embedding_type.to_ascii_lowercase().as_str() {
                        "f16" | "f32" => None,
                        t => Some(parse_ggml(t)?),
                    };
                    Some(adaptq_quant::ggml::GgmlSpec { linear, embedding })
                }
                None => None,
            };
            // GGUF: quantize into a bundle in a scratch folder beside the file, export it, then
            // drop the scratch folder. What is at --out is checked before any work.
            let gguf_out = (format == FormatArg::Gguf).then(|| out.clone());
            let force_gguf = force;
            let (out, force, _scratch) = match &gguf_out {
                Some(g) => {
                    adaptq_bundle::output::check_replaceable(g, force, gguf_kind())
                        .map_err(force_hint)?;
                    let scratch = adaptq_bundle::output::Staged::scratch(g)?;
                    (scratch.path().join("bundle"), false, Some(scratch))
                }
                None => {
                    adaptq_bundle::output::check_replaceable(
                        &out,
                        force,
                        adaptq_bundle::output::Kind::Folder,
                    )
                    .map_err(force_hint)?;
                    (out, force, None)
                }
            };
            if lo != hi && !matches!(method, MethodArg::Apq) {
                bail!("--bits {bits} is a range; only --method apq mixes widths");
            }
            let bits = hi;
            let opened = open_model(&src)?;
            let source = &opened.source;
            let grid = if sym {
                Grid::Symmetric
            } else {
                Grid::Asymmetric
            };
            let need_calib = || -> Result<&PathBuf> {
                calib.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--method {} needs calibration text: --calib FILE (e.g. ../shared/corpora/austen/emma.txt)",
                        method_name(method)
                    )
                })
            };
            let calib_bar = |len: u64, what: &str| {
                let pb = ProgressBar::new(len);
                pb.set_style(
                    ProgressStyle::with_template(&format!(
                        "{what} {{bar:40}} {{pos}}/{{len}} blocks  [{{elapsed_precise}}<{{eta_precise}}]"
                    ))
                    .expect("valid template"),
                );
                pb
            };
            let mut embeddings = embeddings;
            let calibrated: Option<Calibrated> = match method {
                MethodArg::Rtn | MethodArg::Ternary if !rotate => None,
                MethodArg::Ternary => unreachable!("refused above"),
                MethodArg::Novaq if calib.is_none() => None,
                MethodArg::Novaq | MethodArg::Gptq | MethodArg::Awq | MethodArg::Rtn => {
                    let calib = need_calib()?;
                    let spec = match &novaq {
                        Some(n) => {
                            if ggml.is_some() {
                                bail!("NOVAQ codebooks are not GGML blocks; quantize to a bundle (export with --type re-rounds them)");
                            }
                            // The per-layer comparison in verification.json: round-to-nearest
                            // at the integer width below the budget, group 64 asymmetric.
                            adaptq_pipeline::calibrate::CalibSpec {
                                bits: (n.config.target_bits.floor() as u8).clamp(2, 8),
                                group_size: 64,
                                grid: Grid::Asymmetric,
                                rounding: adaptq_pipeline::calibrate::Rounding::Novaq(n.config),
                                awq: false,
                                widths: Default::default(),
                                keep_hessians: false,
                                refit: false,
                                ggml: None,
                                rotate: rotate.then_some(seed),
                            }
                        }
                        None => adaptq_pipeline::calibrate::CalibSpec {
                            bits,
                            group_size,
                            grid,
                            rounding: if matches!(method, MethodArg::Gptq) {
                                adaptq_pipeline::calibrate::Rounding::Gptq { damp, act_order }
                            } else {
                                adaptq_pipeline::calibrate::Rounding::Rtn
                            },
                            awq: awq || matches!(method, MethodArg::Awq),
                            widths: Default::default(),
                            keep_hessians: false,
                            refit,
                            ggml,
                            rotate: rotate.then_some(seed),
                        },
                    };
                    let pb = calib_bar(source.desc().n_layers as u64, method_name(method));
                    let (cal, info) = adaptq_pipeline::calibrate::run(
                        open_model(&src)?.source,
                        calib,
                        calib_samples,
                        seq_len,
                        seed,
                        &spec,
                        &mut |d, _| pb.set_position(d as u64),
                    )?;
                    pb.finish_and_clear();
                    let mut extra = serde_json::Map::new();
                    if !cal.awq.is_empty() {
                        extra.insert("awq".into(), serde_json::to_value(&cal.awq)?);
                    }
                    if novaq.is_some() {
                        let layers: Vec<serde_json::Value> = cal
                            .layers
                            .iter()
                            .filter_map(|(name, c)| {
                                let mut v = serde_json::to_value(c.novaq.as_ref()?).ok()?;
                                v["name"] = name.clone().into();
                                Some(v)
                            })
                            .collect();
                        extra.insert("novaq".into(), layers.into());
                    }
                    Some((cal, info, extra, Vec::new()))
                }
                MethodArg::Apq => {
                    let calib = need_calib()?;
                    let widths: Vec<u8> = adaptq_pipeline::apq::CANDIDATES
                        .iter()
                        .copied()
                        .filter(|b| (lo..=hi).contains(b))
                        .collect();
                    let overhead = if group_size == 0 {
                        0.0
                    } else {
                        (if sym { 16.0 } else { 32.0 }) / group_size as f64
                    };
                    let s = adaptq_pipeline::apq::ApqSettings {
                        target_bpw: target_bpw.unwrap_or((lo as f64 + hi as f64) / 2.0 + overhead),
                        widths,
                        group_size,
                        grid,
                        awq,
                        refit,
                        damp,
                        act_order,
                        max_ppl_delta,
                        max_bpw,
                        promote_per_round,
                        max_rounds,
                        heldout_windows,
                        gold_prompts: read_prompts(gold_prompts.as_deref())?,
                        gold_tokens,
                    };
                    let pb = calib_bar(source.desc().n_layers as u64 + 1, "apq");
                    let out = adaptq_pipeline::apq::run(
                        open_model(&src)?.source,
                        calib,
                        calib_samples,
                        seq_len,
                        seed,
                        &s,
                        &mut |stage, d, t| {
                            pb.set_length(t as u64);
                            pb.set_position(d as u64);
                            pb.set_message(stage.to_string());
                        },
                    )?;
                    pb.finish_and_clear();
                    // Embeddings are part of the mix: they take the width APQ chose.
                    embeddings = EmbedArg::Quant;
                    Some((out.cal, out.info, out.extra, out.gates))
                }
            };
            let cfg = QuantizeConfig {
                method: match method {
                    MethodArg::Rtn => Method::Rtn,
                    MethodArg::Ternary => Method::Ternary,
                    MethodArg::Gptq => Method::Gptq,
                    MethodArg::Awq => Method::Awq,
                    MethodArg::Apq => Method::Apq,
                    MethodArg::Novaq => Method::Novaq,
                },
                gptq: matches!(method, MethodArg::Gptq | MethodArg::Apq)
                    .then_some(adaptq_pipeline::GptqSettings { damp, act_order }),
                calibration: calibrated.as_ref().map(|(_, info, ..)| info.config.clone()),
                // Ternary codes live on the 2-bit symmetric grid; record what is stored. NOVAQ
                // has no grid: these fields name the RTN it is compared with per layer.
                bits: match (method, &novaq) {
                    (MethodArg::Ternary, _) => 2,
                    (_, Some(n)) => (n.config.target_bits.floor() as u8).clamp(2, 8),
                    _ => bits,
                },
                group_size: if novaq.is_some() { 64 } else { group_size },
                grid: if (sym && novaq.is_none()) || matches!(method, MethodArg::Ternary) {
                    Grid::Symmetric
                } else {
                    Grid::Asymmetric
                },
                embeddings: match embeddings {
                    EmbedArg::F16 => EmbeddingMode::F16,
                    EmbedArg::F32 => EmbeddingMode::F32,
                    EmbedArg::Quant => EmbeddingMode::Quant,
                },
                seed,
                shard_max_bytes: shard_size,
                min_cosine,
                max_bpw,
                ggml,
                novaq,
                rotate: rotate.then_some(adaptq_pipeline::quantize::RotateSettings {
                    kind: "hadamard".into(),
                    seed,
                }),
                lossless: (lossless == LosslessArg::Rans).then(|| "rans".to_string()),
            };
            let multi = indicatif::MultiProgress::new();
            let dl = adaptq_remote::is_remote(&src).then(|| {
                let d = multi.add(ProgressBar::no_length());
                d.set_style(
                    ProgressStyle::with_template("download {bytes} {binary_bytes_per_sec}")
                        .expect("valid template"),
                );
                d
            });
            let pb = multi.add(bar(source.tensors().len() as u64, "quantize"));
            let start = std::time::Instant::now();
            let summary = quantize_model(
                source.as_ref(),
                &adaptq_pipeline::Target {
                    locator: &opened.locator,
                    model_id: model_id.as_deref(),
                    out: &out,
                    force,
                },
                &cfg,
                calibrated
                    .as_ref()
                    .map(|(cal, info, extra, gates)| adaptq_pipeline::Precomputed {
                        layers: &cal.layers,
                        info,
                        overrides: &cal.overrides,
                        extra: extra.clone(),
                        gates: gates.clone(),
                    }),
                &mut |done, _total, bytes| {
                    pb.set_position(done as u64);
                    if let Some(d) = &dl {
                        d.set_position(adaptq_remote::bytes_downloaded());
                    }
                    let s = start.elapsed().as_secs_f64().max(1e-9);
                    pb.set_message(format!("{:.1} MB/s", bytes as f64 / 1e6 / s));
                },
            )?;
            pb.finish_and_clear();
            if let Some(d) = dl {
                d.finish_and_clear();
            }
            let t = &summary.verification.totals;
            println!(
                "wrote {} ({} tensors, {} shards) in {:.1}s",
                out.display(),
                summary.manifest.tensors.len(),
                summary.manifest.shards.len(),
                start.elapsed().as_secs_f64()
            );
            println!(
                "  {:.3} bits/weight overall, {:.3} on quantized tensors; {:.2}x smaller than f16",
                t.bits_per_weight, t.bits_per_quantized_weight, t.compression_vs_f16
            );
            if let Some(r) = t.lossless_ratio {
                println!(
                    "  lossless stage (rANS on codes): quantized payload {r:.3}x smaller than packed"
                );
            }
            for g in &summary.verification.gates {
                println!("  gate {:<22} {}  {}", g.name, g.status, g.detail);
            }
            println!("  OVERALL_STATUS {}", summary.verification.overall_status);
            println!("  global digest {}", summary.manifest.global_digest);
            if let Some(g) = &gguf_out {
                export_bundle_gguf(&out, g, None, false, force_gguf)?;
            }
            Ok(if summary.verification.overall_status == "PASS" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Verify { dir, json } => {
            if !dir.join(adaptq_bundle::MANIFEST).exists() {
                bail!("{}: not a bundle (no manifest.json)", dir.display());
            }
            let total = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("shard-"))
                })
                .count();
            let pb = ProgressBar::new(total as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "verify {bar:40} {pos}/{len} shards  {msg}  [{elapsed_precise}]",
                )
                .expect("valid template"),
            );
            let start = std::time::Instant::now();
            let mut bytes = 0u64;
            let rep = adaptq_bundle::verify_bundle(&dir, |n| {
                bytes += n;
                pb.inc(1);
                pb.set_message(format!(
                    "{:.1} MB/s",
                    bytes as f64 / 1e6 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            });
            pb.finish_and_clear();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": rep.ok(), "problems": rep.problems, "shards_checked": rep.shards_checked,
                        "bytes_checked": rep.bytes_checked, "tensors_checked": rep.tensors_checked})
                );
            } else if rep.ok() {
                println!(
                    "OK: {} shards ({} bytes) and {} tensors verified",
                    rep.shards_checked, rep.bytes_checked, rep.tensors_checked
                );
            } else {
                for p in &rep.problems {
                    eprintln!("FAIL: {p}");
                }
                eprintln!(
                    "{} problem(s) found in {}",
                    rep.problems.len(),
                    dir.display()
                );
            }
            Ok(if rep.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Export {
            dir,
            to,
            out,
            ty,
            json,
            max_shard_size,
            force,
        } => {
            match to {
                ExportTo::Gguf => {
                    let ty = ty.as_deref().map(parse_ggml).transpose()?;
                    export_bundle_gguf(&dir, &out, ty, json, force)?;
                }
                ExportTo::HfGptq => {
                    if ty.is_some() {
                        bail!("--type applies to --to gguf");
                    }
                    adaptq_bundle::output::check_replaceable(
                        &out,
                        force,
                        adaptq_bundle::output::Kind::Folder,
                    )
                    .map_err(force_hint)?;
                    let b = verified_bundle(&dir)?;
                    let pb = bar(b.manifest.tensors.len() as u64, "export");
                    let s = adaptq_export::export_hf_gptq(
                        &b,
                        &out,
                        &adaptq_export::HfGptqOptions {
                            max_shard_bytes: max_shard_size,
                            force,
                        },
                        &mut |d, _| pb.set_position(d as u64),
                    )?;
                    pb.finish_and_clear();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        println!(
                            "wrote {} (Hugging Face GPTQ, {}-bit group {}, {} tensor bytes): {}",
                            out.display(),
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
        Cmd::TensorHashes { path, hf } => {
            use sha2::{Digest, Sha256};
            let mut out = serde_json::Map::new();
            if hf {
                let b = adaptq_bundle::Bundle::open(&path)?;
                adaptq_export::hf_gptq::for_each_hf_tensor(&b, &mut |name, v| {
                    out.insert(name.into(), hex::encode(Sha256::digest(bytes_of(v))).into());
                })?;
            } else if path.join(adaptq_bundle::MANIFEST).exists() {
                let b = adaptq_bundle::Bundle::open(&path)?;
                for t in &b.manifest.tensors {
                    let v = b.read_f32(&t.name)?;
                    let h = Sha256::digest(bytes_of(&v));
                    out.insert(t.name.clone(), hex::encode(h).into());
                }
            } else {
                let src = adaptq_source::open(&path)?;
                for t in src.tensors() {
                    if !t.dtype.is_float() {
                        continue;
                    }
                    let v = src.read_f32(&t.name)?;
                    let h = Sha256::digest(bytes_of(&v));
                    out.insert(t.name.clone(), hex::encode(h).into());
                }
            }
            println!("{}", serde_json::Value::Object(out));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { dir, format, out } => {
            let r = adaptq_pipeline::report::build(&dir)?;
            let text = match format {
                ReportFormat::Json => serde_json::to_string_pretty(&r)? + "\n",
                ReportFormat::Md => adaptq_pipeline::report::markdown(&r),
                ReportFormat::Html => adaptq_pipeline::report::html(&r),
            };
            match out {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { path, tensors } => {
            if path.join(adaptq_bundle::MANIFEST).exists() {
                info_bundle(&path, tensors)?;
            } else {
                let opened = open_model(&path.to_string_lossy())?;
                let mut v = adaptq_pipeline::info::describe_source(opened.source.as_ref());
                if !tensors {
                    v.as_object_mut().unwrap().remove("tensors");
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Eval {
            model,
            text,
            ctx,
            score,
            chunks,
            base,
            json,
            rotate,
        } => {
            eval(
                &model,
                &text,
                ctx,
                score,
                chunks,
                base.as_deref(),
                json,
                rotate,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            seed,
        } => {
            let m = adaptq_model::load(&model)?;
            let opts = adaptq_model::generate::Options {
                max_tokens,
                temperature,
                seed,
            };
            let out = adaptq_model::generate::generate(&m, &prompt, &opts, &mut |piece| {
                use std::io::Write;
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
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SpotCheck {
            model,
            base,
            prompts,
            max_tokens,
            json,
        } => {
            let list: Vec<String> = std::fs::read_to_string(&prompts)
                .with_context(|| format!("reading prompts file {}", prompts.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if list.is_empty() {
                bail!("{} holds no prompts (one per line)", prompts.display());
            }
            let cand = adaptq_model::load(&model)?;
            let refm = adaptq_model::load(&base)?;
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
        Cmd::Bench {
            models,
            pp,
            tg,
            reps,
        } => {
            if models.is_empty() {
                bail!("name at least one model or bundle to benchmark");
            }
            println!("threads: {}", rayon::current_num_threads());
            println!("| model | pp{pp} tok/s | tg{tg} tok/s | pp vs first | tg vs first |");
            println!("|---|---|---|---|---|");
            let mut first: Option<adaptq_eval::speed::Speed> = None;
            for p in &models {
                let m = adaptq_model::load(p)?;
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
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stats { dir, json } => {
            let s = adaptq_pipeline::stats::bundle_stats(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("model            {}", s.model_id);
                println!("tensors          {} in {} shards", s.tensors, s.shards);
                println!(
                    "shard bytes      {} ({:.2} MiB); bundle on disk {} bytes",
                    s.shard_bytes,
                    s.shard_bytes as f64 / 1048576.0,
                    s.bundle_bytes
                );
                println!(
                    "parameters       {} ({} quantized)",
                    s.params, s.quantized_params
                );
                println!(
                    "bits/weight      {:.4} overall, {:.4} on quantized tensors",
                    s.bits_per_weight, s.bits_per_quantized_weight
                );
                println!(
                    "vs f16           {} bytes -> {:.2}x smaller",
                    s.f16_bytes, s.compression_vs_f16
                );
                println!("by encoding:");
                for e in &s.by_encoding {
                    println!(
                        "  {:<18} {:>4} tensors {:>12} params {:>12} bytes",
                        e.encoding, e.tensors, e.params, e.bytes
                    );
                }
                if let Some(es) = &s.error_summary {
                    println!(
                        "weight error     {} layers: rel MSE mean {:.3e}, max {:.3e} ({}); cosine min {:.5}, mean {:.5}",
                        es.layers, es.rel_mse_mean, es.rel_mse_max, es.rel_mse_max_tensor, es.cosine_min, es.cosine_mean
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn eval(
    model: &Path,
    text: &Path,
    ctx: usize,
    score: ScoreArg,
    chunks: Option<usize>,
    base: Option<&Path>,
    json: bool,
    rotate: Option<u64>,
) -> Result<()> {
    let body =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut m = adaptq_model::load(model)?;
    if let adaptq_model::ModelKind::Bert(bert) = &m.kind {
        if rotate.is_some() {
            bail!("--rotate applies to decoder (Llama-family) models");
        }
        return eval_embeddings(&m, bert, &body, chunks, base, json);
    }
    if let (Some(seed), adaptq_model::ModelKind::Llama(l)) = (rotate, &mut m.kind) {
        l.rotate(seed)?;
    }
    let lm = m.llama()?;
    let b = base.map(adaptq_model::load).transpose()?;
    let bl = b.as_ref().map(|b| b.llama()).transpose()?;
    let tokens = adaptq_model::tokenizer::encode(&m.tokenizer, &body)?;
    if let Some(b) = &b {
        let bt = adaptq_model::tokenizer::encode(&b.tokenizer, &body)?;
        if bt != tokens {
            bail!("the base model tokenizes the text differently; KL divergence needs the same tokens");
        }
    }
    let mode = match score {
        ScoreArg::All => adaptq_eval::ScoreMode::All,
        ScoreArg::SecondHalf => adaptq_eval::ScoreMode::SecondHalf,
    };
    let total = (tokens.len() / ctx).min(chunks.unwrap_or(usize::MAX));
    let pb =
        ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "eval {bar:40} {pos}/{len} windows  {msg}  [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let start = std::time::Instant::now();
    let models = if bl.is_some() { 2.0 } else { 1.0 };
    let r = adaptq_eval::evaluate(lm, bl, &tokens, ctx, mode, chunks, &mut |done, _, toks| {
        pb.set_position(done as u64);
        pb.set_message(format!(
            "{:.0} tokens/s",
            models * toks as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
    })?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{}: {} windows of {} tokens, {} tokens scored ({})",
        text.display(),
        r.windows,
        ctx,
        r.tokens_scored,
        match mode {
            adaptq_eval::ScoreMode::All => "every token",
            adaptq_eval::ScoreMode::SecondHalf => "second half of each window, as llama-perplexity",
        }
    );
    println!("PPL = {:.4} +/- {:.4}", r.ppl, r.ppl_stderr);
    if let (Some(bp), Some(bse)) = (r.base_ppl, r.base_ppl_stderr) {
        println!(
            "base PPL = {bp:.4} +/- {bse:.4}   ΔPPL = {:+.2}%",
            r.delta_ppl_pct.unwrap_or(f64::NAN)
        );
        println!(
            "KLD mean = {:.6}   KLD p99 = {:.6}   top-1 agreement = {:.2}%",
            r.kld_mean.unwrap_or(f64::NAN),
            r.kld_p99.unwrap_or(f64::NAN),
            100.0 * r.top1_agreement.unwrap_or(f64::NAN)
        );
    }
    eprintln!("[{:.1} s]", start.elapsed().as_secs_f64());
    Ok(())
}

/// Encoders: cosine similarity of sentence embeddings against the base model.
fn eval_embeddings(
    m: &adaptq_model::LoadedModel,
    bert: &adaptq_model::bert::Bert,
    body: &str,
    chunks: Option<usize>,
    base: Option<&Path>,
    json: bool,
) -> Result<()> {
    let Some(base) = base else {
        bail!("{} is an encoder: evaluate it against a reference with --base (embedding cosine similarity)", m.label);
    };
    let b = adaptq_model::load(base)?;
    let bb = b.bert()?;
    let sents = adaptq_eval::embeddings::sentences(body, chunks.unwrap_or(200));
    let ids = sents
        .iter()
        .map(|s| adaptq_model::tokenizer::encode_special(&m.tokenizer, s))
        .collect::<Result<Vec<_>>>()?;
    let pb = ProgressBar::with_draw_target(
        Some(ids.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let r = adaptq_eval::embeddings::compare_embeddings(bert, bb, &ids, &mut |i| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} sentences: embedding cosine vs base mean {:.6}, min {:.6}, 1st percentile {:.6}",
            r.sentences, r.cosine_mean, r.cosine_min, r.cosine_p01
        );
    }
    Ok(())
}

fn info_bundle(dir: &Path, tensors: bool) -> Result<()> {
    let b = adaptq_bundle::Bundle::open(dir)?;
    let m = &b.manifest;
    let meta: serde_json::Value = serde_json::from_slice(&b.read_file(adaptq_bundle::MODEL_META)?)?;
    let mut v = serde_json::json!({
        "bundle": dir.display().to_string(),
        "model_id": m.model_id,
        "generator": m.generator,
        "source": m.source,
        "quantization": m.quantization,
        "model": meta,
        "tensor_count": m.tensors.len(),
        "shard_count": m.shards.len(),
        "global_digest": m.global_digest,
    });
    if tensors {
        v["tensors"] = m
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "shape": t.shape, "role": t.role, "encoding": t.encoding.label(), "bytes": t.payload_len()}))
            .collect();
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

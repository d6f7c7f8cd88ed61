//! The command line's flags (clap definitions), parsed before anything runs. Quantize's many
//! flags live in [`quantize`], one table mapping onto `adaptq_pipeline::QuantizeOptions`.

pub mod quantize;
mod quantize_flags;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub use quantize::QuantizeArgs;

#[derive(Parser)]
#[command(
    name = "adaptq",
    version,
    about = "Post-training quantization of LLMs into verified, deterministic bundles",
    long_about = "adaptq reads a model (GGUF or safetensors, local or from hf://, https:// or ollama://), \
quantizes it (RTN, GPTQ, AWQ, APQ mixed widths, ternary, NOVAQ codebooks; or onto llama.cpp's block types), and writes a \
bundle of <=2 MiB shards with SHA-256/BLAKE3 hashes, manifest.json, model.meta and verification.json \
(measured errors and PASS/FAIL gates). The same input and config always give byte-identical bundles. \
`export` turns a bundle into a GGUF file or a Hugging Face GPTQ checkpoint.\n\n\
Environment: ADAPTQ_NUM_THREADS (worker threads, as --threads; default: every core), ADAPTQ_CACHE_DIR (keep \
downloads), ADAPTQ_OFFLINE=1, HF_TOKEN, HF_ENDPOINT, OLLAMA_MODELS, ADAPTQ_HTTP_TIMEOUT (see the README's table)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// Worker threads for every parallel step (rayon, the linear algebra, candle's matmuls);
    /// overrides ADAPTQ_NUM_THREADS. Default: every core.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScoreArg {
    /// Every next-token prediction.
    All,
    /// The second half of each window, as llama.cpp's llama-perplexity scores.
    SecondHalf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Json,
    Md,
    Html,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportTo {
    /// GGUF v3 file (llama.cpp, Ollama, LM Studio).
    Gguf,
    /// Hugging Face GPTQ checkpoint folder (transformers, vLLM): qweight/qzeros/scales/g_idx,
    /// config.json with quantization_config, tokenizer files. Needs a symmetric 2/4/8-bit bundle.
    HfGptq,
}

// Parsed once per run: the size of the biggest variant (quantize's many flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Cmd {
    /// Quantize a model into a verified bundle folder (or, with --format gguf, one GGUF file).
    Quantize(QuantizeArgs),
    /// Join the parts of one run (`quantize --blocks A..B` jobs) into the bundle (or GGUF, as
    /// the run's settings say) that one uninterrupted run writes, verified.
    Merge {
        /// Part folders, in any order; together they must cover every block once.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// The bundle folder (or .gguf file) to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists and adaptq wrote it.
        #[arg(long)]
        force: bool,
    },
    /// Write a bundle as files another runtime loads: GGUF v3 (llama.cpp, Ollama, LM Studio) or a
    /// Hugging Face GPTQ checkpoint (transformers, vLLM).
    Export(ExportArgs),
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
    Eval(EvalArgs),
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
        #[command(flatten)]
        kernels: RunKernels,
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
        #[command(flatten)]
        kernels: RunKernels,
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
        #[command(flatten)]
        kernels: RunKernels,
        /// Print one JSON object (threads, kernels, one entry per model) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Sizes, bits per weight, compression vs f16 and per-layer error of a bundle.
    Stats {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The bundle folder (verified before export).
    pub dir: PathBuf,
    #[arg(long, value_enum)]
    pub to: ExportTo,
    /// The file (GGUF) or folder (hf-gptq) to write; built under a temporary name first.
    #[arg(long)]
    pub out: PathBuf,
    /// hf-gptq: largest safetensors shard in bytes (more than one adds an index).
    #[arg(long, default_value_t = 4 << 30)]
    pub max_shard_size: u64,
    /// Re-round every quantized tensor onto this GGML type (default: keep each tensor's
    /// own; integer grids that are a GGML grid convert losslessly, others are re-rounded
    /// onto the nearest type and listed).
    #[arg(long = "type")]
    pub ty: Option<String>,
    /// Print the per-tensor summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing --out, only if adaptq wrote it (a GGUF it exported, or a
    /// folder it created); anything else is refused.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model file/folder or adaptq bundle.
    pub model: PathBuf,
    /// Plain-text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    #[arg(long, value_enum, default_value = "all")]
    pub score: ScoreArg,
    /// Score at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Reference model (e.g. the unquantized source) for KLD, top-1 agreement and ΔPPL.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Print one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Rotate every linear layer's input (seeded Hadamard rotations, weights W·R) before
    /// scoring: checks that rotation alone leaves the model's function unchanged.
    #[arg(long, value_name = "SEED")]
    pub rotate: Option<u64>,
    /// Score the weights dequantized to f32 (the default): quality figures then judge the
    /// function the stored codes define, without the packed kernels' 8-bit rounding of
    /// activations. The --base model always runs this way.
    #[arg(long, conflicts_with = "packed")]
    pub exact: bool,
    /// Score on the packed kernels `generate` and `bench` run: GGML-block weights (and integer
    /// grids that re-lay onto one) multiplied from their blocks with activations rounded to 8
    /// bits per row, as llama-perplexity computes.
    #[arg(long)]
    pub packed: bool,
}

/// Kernels of `generate`, `bench` and `spot-check`: packed unless --exact.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct RunKernels {
    /// Dequantize every weight to f32 at load and multiply in f32: the exact function the
    /// stored codes define (what `eval` scores), at f32 memory and speed. Default: weights
    /// stored as GGML blocks, or integer grids that re-lay onto one exactly (4/5-bit, 8-bit
    /// symmetric, groups of a multiple of 32), run from their blocks with activations rounded
    /// to 8 bits per row, as llama.cpp runs them.
    #[arg(long)]
    pub exact: bool,
}

impl RunKernels {
    pub fn kernels(self) -> adaptq_model::Kernels {
        match self.exact {
            true => adaptq_model::Kernels::Exact,
            false => adaptq_model::Kernels::Packed,
        }
    }
}

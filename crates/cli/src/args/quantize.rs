//! `adaptq quantize`'s flags. Each is a field of `adaptq_pipeline::QuantizeOptions` under the
//! same name (`--group-size` is `group_size`), so `--config FILE.yaml` takes the same keys;
//! the defaults shown are the library's.

use adaptq_pipeline::{
    Bits, Choice, EmbeddingMode, Lossless, Method, OutputFormat, Preset, QuantizeOptions,
};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

use super::choice;

fn d() -> QuantizeOptions {
    QuantizeOptions::default()
}

#[derive(Args, Serialize)]
pub struct QuantizeArgs {
    /// Model: a local .gguf/.safetensors file or folder, hf://org/name[@revision][/file],
    /// an http(s):// link to a .gguf/.safetensors file, or ollama://name[:tag].
    /// Remote weights are streamed with range requests, fetched ahead while quantizing.
    /// Environment: HF_TOKEN (or HUGGINGFACE_TOKEN, HUGGING_FACE_HUB_TOKEN), HF_ENDPOINT,
    /// ADAPTQ_CACHE_DIR (keep downloads, hub cache layout), ADAPTQ_OFFLINE=1 / HF_HUB_OFFLINE=1
    /// (cache only), OLLAMA_MODELS (Ollama store, default ~/.ollama/models).
    pub src: Option<String>,
    /// Settings from a YAML file whose keys are these flags' long names with `_` for `-`
    /// (`group_size: 64`); flags given here override it. Unknown keys are refused.
    #[arg(long, value_name = "FILE.yaml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective settings as YAML (a config file that repeats this run) and stop.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Output bundle folder (must not exist unless --force).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_parser = choice::<Method>(), default_value = d().method.name())]
    pub method: Method,
    /// Bits per code, 2 to 8; for --method apq a range of allowed widths, e.g. 3-4 or 2-8.
    #[arg(long, default_value_t = d().bits)]
    pub bits: Bits,
    /// APQ: overall bits per weight to aim for, every tensor counted (default: the middle
    /// of the --bits range plus the scale overhead).
    #[arg(long)]
    pub target_bpw: Option<f64>,
    /// Search and fold AWQ scales before GPTQ/APQ rounding (always on for --method awq).
    #[arg(long)]
    pub awq: bool,
    /// Progressive pass for calibrated methods: after rounding, re-fit each group's scale
    /// (and min) to the layer's output error on the calibration inputs, codes fixed; kept
    /// only where it lowers the error. The reduction is recorded per layer.
    #[arg(long)]
    pub refit: bool,
    /// APQ gate: held-out perplexity may rise at most this many percent.
    #[arg(long, default_value_t = d().max_ppl_delta)]
    pub max_ppl_delta: f64,
    /// APQ: layers promoted to the next width per round, and the most rounds.
    #[arg(long, default_value_t = d().promote_per_round)]
    pub promote_per_round: usize,
    #[arg(long, default_value_t = d().max_rounds)]
    pub max_rounds: usize,
    /// APQ: held-out windows (from the last tenth of --calib) for the perplexity gate.
    #[arg(long, default_value_t = d().heldout_windows)]
    pub heldout_windows: usize,
    /// APQ gold-prompt gate: one prompt per line (default: the built-in prompts/gold.txt);
    /// the quantized model's greedy continuation must not loop or fall silent where the
    /// unquantized model does not.
    #[arg(long)]
    pub gold_prompts: Option<PathBuf>,
    /// APQ gold-prompt gate: greedy tokens generated per prompt.
    #[arg(long, default_value_t = d().gold_tokens)]
    pub gold_tokens: usize,
    /// Columns per scale group (32, 64, 128, ...); 0 = one group per output channel.
    #[arg(long, default_value_t = d().group_size)]
    pub group_size: usize,
    /// Symmetric grid (no per-group offset); asymmetric (scale + min) otherwise.
    #[arg(long)]
    pub sym: bool,
    /// How to store embedding tables and a separate output head.
    #[arg(long, value_parser = choice::<EmbeddingMode>(), default_value = d().embeddings.name())]
    pub embeddings: EmbeddingMode,
    /// Seed for every random choice; recorded in the manifest.
    #[arg(long, default_value_t = d().seed)]
    pub seed: u64,
    /// Largest shard in bytes (at most 2 MiB).
    #[arg(long, default_value_t = d().shard_size)]
    pub shard_size: u64,
    /// Gate: lowest acceptable weight cosine similarity of any quantized tensor.
    #[arg(long, default_value_t = d().min_cosine)]
    pub min_cosine: f64,
    /// Gate: largest acceptable overall bits per weight.
    #[arg(long)]
    pub max_bpw: Option<f64>,
    /// Model id recorded in the manifest (default: the source's own name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Calibration text for calibrated methods (convention: emma.txt; never the eval text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration windows sampled from --calib.
    #[arg(long, default_value_t = d().calib_samples)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = d().seq_len)]
    pub seq_len: usize,
    /// GPTQ Hessian dampening, as a fraction of the mean diagonal.
    #[arg(long, default_value_t = d().damp)]
    pub damp: f64,
    /// GPTQ: quantize columns by decreasing activation energy (static groups).
    #[arg(long)]
    pub act_order: bool,
    /// Replace --out if it exists and adaptq wrote it (a bundle, or a GGUF it exported);
    /// any other file or folder there is refused, never deleted.
    #[arg(long)]
    pub force: bool,
    /// Output format (with gguf, --out names the .gguf; the calibrated values are written
    /// onto the GGML type's exact grid).
    #[arg(long, value_parser = choice::<OutputFormat>(), default_value = d().format.name())]
    pub format: OutputFormat,
    /// Store linear layers as this llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
    /// Q4_K, Q5_K, Q6_K) instead of adaptq's own groups; rows that do not fit a k-quant
    /// (576 is not a multiple of 256) fall back as llama.cpp does (Q4_K→Q5_0, Q5_K→Q5_1,
    /// Q6_K→Q8_0, Q2_K/Q3_K→Q4_0). Default with --format gguf: the type nearest --bits.
    #[arg(long)]
    pub ggml_type: Option<String>,
    /// With GGML types: the embedding / output table's type, or f16 to keep it as float.
    #[arg(long, default_value_t = d().ggml_embedding_type)]
    pub ggml_embedding_type: String,
    /// Rotate every linear layer's input by seeded Hadamard rotations (--seed) before
    /// quantizing (rtn, gptq, novaq): weights are stored as W·R and adaptq's forward pass
    /// rotates the inputs online, so the network computes the same function while outlier
    /// columns are spread over every row. Any width works (576 = 64·9, 1536 = 512·3).
    /// Needs --calib (layers are calibrated in the rotated space). Such bundles cannot be
    /// exported to GGUF / GPTQ (those runtimes do not rotate online).
    #[arg(long)]
    pub rotate: bool,
    /// Lossless stage on the packed codes (decoded on load); the gain is reported per
    /// tensor and overall.
    #[arg(long, value_parser = choice::<Lossless>(), default_value = d().lossless.name())]
    pub lossless: Lossless,
    /// NOVAQ: a named setting (sets --target-bits unless that is given).
    #[arg(long, value_parser = choice::<Preset>())]
    pub preset: Option<Preset>,
    /// NOVAQ: bits per weight of each linear layer, codebooks, scales and means included
    /// (default 2.5, or the preset's).
    #[arg(long)]
    pub target_bits: Option<f64>,
    /// NOVAQ: most centroids of the first codebook (a power of two).
    #[arg(long, default_value_t = d().level1_centroids)]
    pub level1_centroids: usize,
    /// NOVAQ: most centroids of the residual codebook (a power of two; 0 = one stage).
    #[arg(long, default_value_t = d().level2_centroids)]
    pub level2_centroids: usize,
    /// NOVAQ: smallest and largest subspace (vector) dimension the planner may choose.
    #[arg(long, default_value_t = d().min_subspace_dim)]
    pub min_subspace_dim: usize,
    #[arg(long, default_value_t = d().max_subspace_dim)]
    pub max_subspace_dim: usize,
    /// NOVAQ: k-means iterations at most per codebook.
    #[arg(long, default_value_t = d().max_iterations)]
    pub max_iterations: usize,
    /// NOVAQ: stop k-means when the objective improves by less than this fraction.
    #[arg(long, default_value_t = d().tolerance)]
    pub tolerance: f64,
    /// NOVAQ: conjugate-gradient iterations of teacher-guided refinement (0 = off).
    #[arg(long, default_value_t = d().refine_iterations)]
    pub refine_iterations: usize,
}

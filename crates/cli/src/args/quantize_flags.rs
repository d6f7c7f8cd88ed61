//! The table of `adaptq quantize`'s flags: each row is a `QuantizeOptions` key, how its value is
//! read, and its help, under a `--help` heading.

use adaptq_pipeline::{Choice, EmbeddingMode, Lossless, Method, OutputFormat, Preset};
use clap::builder::PossibleValue;

/// How a flag's value is read.
#[derive(Clone, Copy)]
pub enum Kind {
    /// Present or not.
    Switch,
    /// A whole number.
    Count,
    /// A decimal number.
    Number,
    /// Free text (a name, a width or range of widths).
    Text,
    /// A file or folder.
    Path,
    /// One of a library setting's named values, each explained in `--help`.
    Choice(fn() -> Vec<PossibleValue>),
}

use Kind::*;

fn names<T: Choice>() -> Vec<PossibleValue> {
    T::ALL
        .iter()
        .map(|v| PossibleValue::new(v.name()).help(v.help()))
        .collect()
}

/// A group of flags under one `--help` heading: (option key, kind, help).
pub type Section = (&'static str, &'static [(&'static str, Kind, &'static str)]);

pub const SECTIONS: &[Section] = &[
    (
        "Method",
        &[
            (
                "out",
                Path,
                "Output bundle folder (must not exist unless --force).",
            ),
            (
                "method",
                Choice(names::<Method>),
                "How the weights are quantized.",
            ),
            (
                "bits",
                Text,
                "Bits per code, 2 to 8; for --method apq a range of allowed widths, e.g. 3-4 \
                 or 2-8.",
            ),
            (
                "group_size",
                Count,
                "Columns per scale group (32, 64, 128, ...); 0 = one group per output channel.",
            ),
            (
                "sym",
                Switch,
                "Symmetric grid (no per-group offset); asymmetric (scale + min) otherwise.",
            ),
            (
                "range_search",
                Switch,
                "Fit each group's (or GGML block's) range by a clipping search that minimises \
                 the rounding error, weighted by the input Hessian's diagonal when calibrating, \
                 instead of mapping its min and max to the end codes. Pays most at 2-3 bits.",
            ),
            (
                "embeddings",
                Choice(names::<EmbeddingMode>),
                "How to store embedding tables and a separate output head.",
            ),
            (
                "seed",
                Count,
                "Seed for every random choice; recorded in the manifest.",
            ),
            (
                "model_id",
                Text,
                "Model id recorded in the manifest (default: the source's own name).",
            ),
            (
                "force",
                Switch,
                "Replace --out if it exists and adaptq wrote it (a bundle, or a GGUF it \
                 exported); any other file or folder there is refused, never deleted.",
            ),
        ],
    ),
    (
        "Calibration",
        &[
            (
                "calib",
                Path,
                "Calibration text for calibrated methods (convention: emma.txt; never the eval \
                 text).",
            ),
            (
                "calib_samples",
                Count,
                "Calibration windows sampled from --calib.",
            ),
            ("seq_len", Count, "Tokens per calibration window."),
            (
                "damp",
                Number,
                "GPTQ Hessian dampening, as a fraction of the mean diagonal.",
            ),
            (
                "act_order",
                Switch,
                "GPTQ: quantize columns by decreasing activation energy (static groups).",
            ),
            (
                "awq",
                Switch,
                "Search and fold AWQ scales before GPTQ/APQ rounding (always on for --method \
                 awq).",
            ),
            (
                "refit",
                Switch,
                "Progressive pass for calibrated methods: after rounding, re-fit each group's \
                 scale (and min) to the layer's output error on the calibration inputs, codes \
                 fixed; kept only where it lowers the error. The reduction is recorded per \
                 layer.",
            ),
            (
                "rotate",
                Switch,
                "Rotate every linear layer's input by seeded Hadamard rotations (--seed) before \
                 quantizing (rtn, gptq, novaq): weights are stored as W·R and adaptq's forward \
                 pass rotates the inputs online, so the network computes the same function \
                 while outlier columns are spread over every row. Any width works (576 = 64·9, \
                 1536 = 512·3). Needs --calib (layers are calibrated in the rotated space). Such \
                 bundles cannot be exported to GGUF / GPTQ (those runtimes do not rotate \
                 online).",
            ),
        ],
    ),
    (
        "APQ (mixed widths)",
        &[
            (
                "target_bpw",
                Number,
                "Overall bits per weight to aim for, every tensor counted. For --method apq its \
                 budget (default: the middle of the --bits range plus the scale overhead). With \
                 --format gguf or --ggml-type (methods rtn, gptq, awq; needs --calib) a GGUF \
                 type mix: one GGML type per tensor, embedding and head included, chosen by \
                 measured sensitivity so the file, counted as llama.cpp counts it, stays \
                 within the budget; the plan is printed and recorded (verification.json, \
                 gguf_mix).",
            ),
            (
                "max_ppl_delta",
                Number,
                "Gate: held-out perplexity may rise at most this many percent.",
            ),
            (
                "promote_per_round",
                Count,
                "Layers promoted to the next width per round.",
            ),
            ("max_rounds", Count, "Most promotion rounds."),
            (
                "heldout_windows",
                Count,
                "Held-out windows (from the last tenth of --calib) for the perplexity gate.",
            ),
            (
                "gold_prompts",
                Path,
                "Gold-prompt gate: one prompt per line (default: the built-in prompts/gold.txt); \
                 the quantized model's greedy continuation must not loop or fall silent where \
                 the unquantized model does not.",
            ),
            (
                "gold_tokens",
                Count,
                "Gold-prompt gate: greedy tokens generated per prompt.",
            ),
        ],
    ),
    (
        "NOVAQ (codebooks)",
        &[
            (
                "preset",
                Choice(names::<Preset>),
                "A named setting (sets --target-bits unless that is given).",
            ),
            (
                "target_bits",
                Number,
                "Bits per weight of each linear layer, codebooks, scales and means included \
                 (default 2.5, or the preset's).",
            ),
            (
                "level1_centroids",
                Count,
                "Most centroids of the first codebook (a power of two).",
            ),
            (
                "level2_centroids",
                Count,
                "Most centroids of the residual codebook (a power of two; 0 = one stage).",
            ),
            (
                "min_subspace_dim",
                Count,
                "Smallest subspace (vector) dimension the planner may choose.",
            ),
            (
                "max_subspace_dim",
                Count,
                "Largest subspace (vector) dimension the planner may choose.",
            ),
            (
                "max_iterations",
                Count,
                "k-means iterations at most per codebook.",
            ),
            (
                "tolerance",
                Number,
                "Stop k-means when the objective improves by less than this fraction.",
            ),
            (
                "refine_iterations",
                Count,
                "Conjugate-gradient iterations of teacher-guided refinement (0 = off).",
            ),
        ],
    ),
    (
        "Output",
        &[
            (
                "format",
                Choice(names::<OutputFormat>),
                "Output format (with gguf, --out names the .gguf; the calibrated values are \
                 written onto the GGML type's exact grid).",
            ),
            (
                "ggml_type",
                Text,
                "Store linear layers as this llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, \
                 Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) instead of adaptq's own groups; rows that do not fit a \
                 k-quant (576 is not a multiple of 256) fall back as llama.cpp does \
                 (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0), Q2_K/Q3_K to IQ4_NL (llama.cpp: Q4_0), IQ4_XS to IQ4_NL. \
                 Default with --format gguf: the type nearest --bits.",
            ),
            (
                "like",
                Text,
                "A GGUF type mix (as --target-bpw) aimed at the size of llama-quantize's file of \
                 this type name for this model, computed from llama.cpp's type rules: Q2_K, \
                 Q3_K_S, Q3_K_M, Q4_0, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, IQ3_XXS, IQ2_XS. \
                 Needs --format gguf (or --ggml-type) and --calib.",
            ),
            (
                "ggml_embedding_type",
                Text,
                "With GGML types: the embedding / output table's type, or f16 to keep it as \
                 float.",
            ),
            (
                "lossless",
                Choice(names::<Lossless>),
                "Lossless stage on the packed codes (decoded on load); the gain is reported per \
                 tensor and overall.",
            ),
            (
                "shard_size",
                Count,
                "Largest shard in bytes (at most 2 MiB).",
            ),
        ],
    ),
    (
        "Gates",
        &[
            (
                "min_cosine",
                Number,
                "Lowest acceptable weight cosine similarity of any quantized tensor.",
            ),
            (
                "max_bpw",
                Number,
                "Largest acceptable overall bits per weight.",
            ),
        ],
    ),
];

pub const SRC_HELP: &str = "Model: a local .gguf/.safetensors file or folder, \
hf://org/name[@revision][/file], an http(s):// link to a .gguf/.safetensors file, or \
ollama://name[:tag]. Remote weights are streamed with range requests, fetched ahead while \
quantizing. Environment: HF_TOKEN (or HUGGINGFACE_TOKEN, HUGGING_FACE_HUB_TOKEN), HF_ENDPOINT, \
ADAPTQ_CACHE_DIR (keep downloads, hub cache layout), ADAPTQ_OFFLINE=1 / HF_HUB_OFFLINE=1 (cache \
only), OLLAMA_MODELS (Ollama store, default ~/.ollama/models).";

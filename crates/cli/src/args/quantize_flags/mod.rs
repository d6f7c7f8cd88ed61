//! The table of `adaptq quantize`'s flags: each row is a `QuantizeOptions` key, how its value is
//! read, and its help, under a `--help` heading. One file per group of headings keeps each short.

use adaptq_pipeline::{CalibInputs, Choice, EmbeddingMode, Method};
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

mod mixes;
mod output;
mod refine;

pub const SECTIONS: &[Section] = &[
    METHOD,
    CALIBRATION,
    JOBS,
    refine::REFINE,
    mixes::APQ,
    mixes::NOVAQ,
    output::OUTPUT,
    output::GATES,
];

pub const METHOD: Section = (
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
            "entropy_step",
            Number,
            "Entropy-coded grid: each group's step is X times its RMS instead of its range \
             fitted to the codes; --bits only bounds the codes (6 is ample), and --lossless \
             rans (required) stores each at about its entropy, ~2.05 - log2 X bits on \
             rotated weights. At the same size it rounds far more finely than a fitted grid; \
             with --group-size 0 one scale per row. Not with apq or GGML types.",
        ),
        (
            "embed_step",
            Number,
            "With --entropy-step and --embeddings quant: the embedding table's and a \
             separate head's step (default: --entropy-step).",
        ),
        (
            "embeddings",
            Choice(names::<EmbeddingMode>),
            "How to store embedding tables and a separate output head.",
        ),
        (
            "embed_bits",
            Count,
            "With --embeddings quant: bits per code of the embedding table and a separate \
             head, 2 to 8 (default: --bits). The head decides every logit: with --method \
             gptq it (a tied table too) is calibrated on the head's inputs; otherwise, and \
             for a separate table, rounded to nearest. With --method apq it pins the table \
             and head to that width (one of APQ's) and the budget left goes to the linear \
             layers.",
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
);

pub const CALIBRATION: Section = (
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
            "hessian_shrink",
            Number,
            "GPTQ: shrink the Hessian's off-diagonal terms toward zero by this fraction, 0 to \
             1. 0 is GPTQ; 1 keeps only the diagonal, i.e. rounding weighted by each input's \
             importance as llama.cpp's imatrix does. Between them, GPTQ relies less on the \
             input correlations of the calibration text, which another text need not share.",
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
             quantizing (rtn, gptq, apq, novaq): weights are stored as W·R and adaptq's forward \
             pass rotates the inputs online, so the network computes the same function \
             while outlier columns are spread over every row. Any width works (576 = 64·9, \
             1536 = 512·3). Needs --calib (layers are calibrated in the rotated space). Such \
             bundles cannot be exported to GGUF / GPTQ (those runtimes do not rotate \
             online).",
        ),
    ],
);

pub const JOBS: Section = (
    "Jobs: resume and block ranges",
    &[
        (
            "calib_inputs",
            Choice(names::<CalibInputs>),
            "What each block is calibrated on. Recorded in the manifest (it changes the codes).",
        ),
        (
            "resume",
            Switch,
            "Continue an interrupted calibrated run. A run saves each block's codes and the \
             next block's inputs in OUT.checkpoint/ (a range job: in its part folder) as it \
             goes, and removes it once the bundle is written; --resume picks up after the last \
             saved block and writes the bundle an uninterrupted run writes, byte for byte. \
             Without a checkpoint it starts from the beginning.",
        ),
        (
            "blocks",
            Text,
            "Calibrate only blocks A..B (half-open: 0..15 is blocks 0 to 14) and write the \
             part folder --out, to be joined by `adaptq merge PART... --out BUNDLE`. Ranges \
             can run on other machines: see examples/slurm-array.sh and \
             examples/k8s-indexed-job.yaml.",
        ),
        (
            "no_checkpoint",
            Switch,
            "Save no checkpoint (for a small model, or a disk without room: with --rotate \
             each block's file holds its rotated weights in f32). Nothing can be resumed.",
        ),
        (
            "scratch",
            Path,
            "Folder for calibration activations that do not fit in memory (default: the \
             output's folder). They go to an unnamed file there, read back one window at a \
             time, gone when the run ends. Bundles are the same either way.",
        ),
        (
            "scratch_limit",
            Count,
            "MiB of one set of calibration activations (every window at one block) held in \
             memory before they are spilled to --scratch (default: a quarter of the memory \
             available at the start). A block holds its inputs and outputs at once.",
        ),
        (
            "inputs_from",
            Path,
            "With --blocks A..B and calib_inputs quantized: the part that ends at block A, \
             whose saved activations are this range's inputs.",
        ),
    ],
);

pub const SRC_HELP: &str = "Model: a local .gguf/.safetensors file or folder, \
hf://org/name[@revision][/file], an http(s):// link to a .gguf/.safetensors file, or \
ollama://name[:tag]. Remote weights are streamed with range requests, fetched ahead while \
quantizing. Environment: HF_TOKEN (or HUGGINGFACE_TOKEN, HUGGING_FACE_HUB_TOKEN), HF_ENDPOINT, \
ADAPTQ_CACHE_DIR (keep downloads, hub cache layout), ADAPTQ_OFFLINE=1 / HF_HUB_OFFLINE=1 (cache \
only), OLLAMA_MODELS (Ollama store, default ~/.ollama/models).";

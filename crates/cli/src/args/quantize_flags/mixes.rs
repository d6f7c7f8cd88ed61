//! Flags of the mixed-width (APQ) and codebook (NOVAQ) methods.

use super::{names, Kind::*, Section};
use adaptq_pipeline::Preset;

pub const APQ: Section = (
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
);

pub const NOVAQ: Section = (
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
            "spread_bits",
            Switch,
            "Make --target-bits the linear layers' average (weighted by size) and give each \
             layer its own target by measured sensitivity: round-to-nearest's output error at \
             2-4 bits on the calibration inputs, read at the code bits of each layout, decides \
             where a bit removes most error. Each layer's target is recorded in the manifest \
             (novaq.targets).",
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
);

//! Flags of the output files and of the gates a bundle must pass.

use super::{names, Kind::*, Section};
use adaptq_pipeline::{Lossless, OutputFormat};

pub const OUTPUT: Section = (
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
            "Store linear layers as this llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
             Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) instead of adaptq's own groups; rows that do not \
             fit a k-quant (576 is not a multiple of 256) fall back as llama.cpp does \
             (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0), Q2_K/Q3_K and IQ4_XS to IQ4_NL (llama.cpp: Q4_0 \
             for Q2_K/Q3_K). Default with --format gguf: the type nearest --bits.",
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
            "mix_types",
            Text,
            "The GGML types a type mix (--target-bpw / --like) may choose from, comma-separated, \
             e.g. Q4_0,Q5_0,IQ4_NL,Q4_K (default: all it knows). Leave out a type the source \
             is already stored in to measure the mix on other grids.",
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
);

pub const GATES: Section = (
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
);

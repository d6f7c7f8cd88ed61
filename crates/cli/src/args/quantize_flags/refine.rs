//! Flags of teacher-guided refinement.

use super::{names, Kind::*, Section};
use adaptq_pipeline::RefineMode;

pub const REFINE: Section = (
    "Teacher-guided refinement",
    &[
        (
            "refine",
            Choice(names::<RefineMode>),
            "After rounding, train the quantized model's continuous parameters against the \
             unquantized model on windows of the --calib text, codes fixed (the bits per weight do \
             not change): group scales and mins (rtn, gptq, awq, apq), NOVAQ codebooks and \
             row/column scales and means, GGML blocks' sub-block scales and mins (written back \
             onto the type's fields; the error that costs is recorded), and the norms. The \
             last eighth of the windows is held out: each phase keeps its best held-out epoch \
             and stops at the first epoch that raises it. Needs --calib; not with --blocks. Teacher and student are held in f32. The loss per epoch is \
             in verification.json (refine) and `adaptq report`.",
        ),
        (
            "refine_epochs",
            Count,
            "Passes over the training windows per phase (each block, then the whole model).",
        ),
        (
            "refine_lr",
            Number,
            "Adam step size at the start of each phase, decayed to zero over its epochs on a half cosine; relative: each scale moves as s*(1+d), each norm weight likewise.",
        ),
        (
            "refine_e2e_lr",
            Number,
            "The end-to-end phase's starting step (default: --refine-lr). Every layer moves \
             the KL at once there, so a block's step can overshoot.",
        ),
        (
            "kd_cosine_weight",
            Number,
            "Weight of the cosine distance between student and teacher outputs (block \
             outputs block-wise, the last hidden states end to end) added to the loss.",
        ),
        (
            "refine_samples",
            Count,
            "Windows of the --calib text to refine on (default: --calib-samples), sampled \
             with the same seed and --seq-len. Calibration's Hessians settle on a few \
             windows; training against the teacher on so few fits them.",
        ),
    ],
);

//! adaptq's stages wired together. A quantize run is [`QuantizeOptions`] (from flags or a YAML
//! file) validated into a [`Plan`], whose [`Plan::run`] opens the source, calibrates when the
//! method needs it ([`calibrate`], [`apq`]), writes the bundle ([`quantize`]) and exports a GGUF
//! when asked. The command line is a thin layer over these.

pub mod acts;
pub mod apq;
pub mod calibrate;
pub mod checkpoint;
pub mod experts;
pub mod like;
pub mod mix;
pub mod options;
pub mod plan;
pub mod quantize;
pub mod refine;
pub mod spread;

pub use options::{
    Bits, CalibInputs, Choice, EmbeddingMode, Lossless, Method, OutputFormat, Preset,
    QuantizeOptions, RefineMode,
};
pub use plan::{Outcome, PartOutcome, Plan, PlanError, Progress};
pub use quantize::{
    quantize_model, GptqSettings, Precomputed, QuantizeConfig, QuantizeSummary, Target,
};

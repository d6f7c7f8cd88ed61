//! adaptq's stages wired together. The CLI is a thin layer over these functions, and a program
//! can call them directly: [`quantize::quantize_model`], [`stats::bundle_stats`],
//! [`info::describe_source`].

pub mod apq;
pub mod calibrate;
pub mod info;
pub mod quantize;
pub mod report;
pub mod stats;

pub use quantize::{
    quantize_model, EmbeddingMode, GptqSettings, Method, Precomputed, Progress, QuantizeConfig,
    QuantizeSummary, Target,
};

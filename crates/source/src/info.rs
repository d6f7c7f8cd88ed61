//! `info` on a source model: architecture and tensor table.

use crate::model::role_of;
use crate::TensorSource;

/// A JSON description of a source model.
pub fn describe_source(src: &dyn TensorSource) -> serde_json::Value {
    let d = src.desc();
    let tensors: Vec<serde_json::Value> = src
        .tensors()
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "shape": t.shape, "dtype": t.dtype.name(),
                "role": role_of(t).name(), "bytes": t.byte_len,
            })
        })
        .collect();
    let params: usize = src
        .tensors()
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.numel())
        .sum();
    serde_json::json!({
        "format": src.format(),
        "model": d.to_meta_json(),
        "params": params,
        "tensor_count": tensors.len(),
        "tensors": tensors,
    })
}

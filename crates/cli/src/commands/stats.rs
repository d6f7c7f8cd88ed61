//! `adaptq stats`: sizes, bits per weight, compression and per-layer error of a bundle.

use anyhow::Result;
use std::path::Path;

pub fn run(dir: &Path, json: bool) -> Result<()> {
    let s = adaptq_bundle::stats::bundle_stats(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("model            {}", s.model_id);
    println!("tensors          {} in {} shards", s.tensors, s.shards);
    println!(
        "shard bytes      {} ({:.2} MiB); bundle on disk {} bytes",
        s.shard_bytes,
        s.shard_bytes as f64 / 1048576.0,
        s.bundle_bytes
    );
    println!(
        "parameters       {} ({} quantized)",
        s.params, s.quantized_params
    );
    println!(
        "bits/weight      {:.4} overall, {:.4} on quantized tensors",
        s.bits_per_weight, s.bits_per_quantized_weight
    );
    println!(
        "vs f16           {} bytes -> {:.2}x smaller",
        s.f16_bytes, s.compression_vs_f16
    );
    println!("by encoding:");
    for e in &s.by_encoding {
        println!(
            "  {:<18} {:>4} tensors {:>12} params {:>12} bytes",
            e.encoding, e.tensors, e.params, e.bytes
        );
    }
    if let Some(es) = &s.error_summary {
        println!(
            "weight error     {} layers: rel MSE mean {:.3e}, max {:.3e} ({}); cosine min {:.5}, mean {:.5}",
            es.layers, es.rel_mse_mean, es.rel_mse_max, es.rel_mse_max_tensor, es.cosine_min, es.cosine_mean
        );
    }
    Ok(())
}

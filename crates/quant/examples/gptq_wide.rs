//! Time and memory of GPTQ on one wide layer (Llama 3 8B's ffn_down by default: 4096 rows of
//! 14336 inputs), from a seeded random Hessian: `cargo run --release -p adaptq-quant --example
//! gptq_wide -- ROWS COLS TOKENS`. Run under `/usr/bin/time -v` for the peak RSS.
use adaptq_quant::gptq::{quantize_gptq, GptqConfig, Hessian, Sweep};
use adaptq_quant::Grid;
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("ROWS COLS TOKENS"))
        .collect();
    let (rows, cols, tokens) = (
        *a.first().unwrap_or(&4096),
        *a.get(1).unwrap_or(&14336),
        *a.get(2).unwrap_or(&2048),
    );
    let mut seed = 7u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let t = Instant::now();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|i| rnd() * if i % cols % 97 == 0 { 8.0 } else { 1.0 })
        .collect();
    let mut h = Hessian::new(cols);
    h.add_inputs(&x);
    drop(x);
    let w: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
    eprintln!("statistics: {:.1} s", t.elapsed().as_secs_f64());
    let cfg = GptqConfig {
        bits: 4,
        group_size: 128,
        grid: Grid::Symmetric,
        sweep: Sweep {
            damp: 0.01,
            act_order: false,
            range_search: false,
            hessian_shrink: 0.0,
            step: None,
        },
    };
    let t = Instant::now();
    let q = quantize_gptq(&w, rows, cols, &h, &cfg).expect("GPTQ");
    eprintln!("GPTQ {rows}x{cols}: {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let e = adaptq_quant::gptq::output_rel_error(&w, &q.dequantize(), cols, &h);
    eprintln!("error {e:.6e}: {:.1} s", t.elapsed().as_secs_f64());
}

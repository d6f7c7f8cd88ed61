//! Throughput of the block kernels on one token's product: `BlockMatrix::gemv` on a
//! 16384 × 1536 matrix of random blocks per type, best of 5 passes of 40 products, in GB/s of
//! stored weights. `cargo run --release -p adaptq-model --example gemv_speed [THREADS]`
//! (default 2). Kernel figures in the README come from alternating runs of this example built
//! on the commits compared.
use adaptq_model::blockdot::{round_act, BlockMatrix};
use adaptq_quant::ggml::BlockType;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("THREADS must be a number"))
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the thread pool starts once");
    let mut state = 7u64;
    let (rows, cols) = (16384usize, 1536usize);
    let types = [
        BlockType::Q4_0,
        BlockType::Q5_0,
        BlockType::Q8_0,
        BlockType::Q4K,
        BlockType::Q6K,
    ];
    for ty in types {
        let n = ty.bytes_for(rows * cols);
        let data: Vec<u8> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let m = BlockMatrix::new(ty, data, rows, cols).expect("whole blocks");
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let xr = round_act(&x);
        let mut out = vec![0f32; rows];
        for _ in 0..3 {
            m.gemv(&xr, &mut out);
        }
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..40 {
                m.gemv(&xr, &mut out);
            }
            best = best.min(t.elapsed().as_secs_f64() / 40.0);
        }
        print!("{} {:.1} GB/s  ", ty.name(), n as f64 / best / 1e9);
    }
    println!();
}

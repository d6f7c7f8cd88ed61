//! Seeded test data: every generator here is SplitMix64 ([`Rng`]) from a fixed seed, so a
//! test's inputs are the same on every run and platform, and no test file carries its own
//! generator.

pub use adaptq_quant::rng::Rng;

/// `n` values uniform in `[-scale / 2, scale / 2)`.
pub fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
        .collect()
}

/// `n` values in `[-1, 1)` on a grid of 1/1000 (so f16 holds them closely).
pub fn grid_values(n: usize, r: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (r.below(2000) as f32 - 1000.0) / 1000.0)
        .collect()
}

/// `n` little-endian f16 values in `[-1, 1)`: plausible scales, centroids or embeddings.
pub fn f16_bytes(n: usize, seed: u64) -> Vec<u8> {
    grid_values(n, &mut Rng(seed))
        .into_iter()
        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// `n` codes of `bits` bits, three in four of them the middle of the range: skewed, so the
/// bundle's lossless stage codes them.
pub fn skewed(n: usize, bits: u8, seed: u64) -> Vec<u16> {
    let mut r = Rng(seed);
    let k = 1u64 << bits;
    (0..n)
        .map(|_| {
            let v = if r.below(4) == 0 { r.next() % k } else { k / 2 };
            v as u16
        })
        .collect()
}

/// `n` random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.next() as u8).collect()
}

//! A codebook (NOVAQ) tensor from a stranger. Input: rows, cols, dim, stage count, one width
//! per stage (all raw bytes, so 0, 17 or 255 bits happen), a byte of "one short / one long"
//! flags, then a pool the slices are filled from. The slices get the sizes `decode` expects
//! unless a flag says otherwise, so the fuzzer reaches the decoding loop. Contract: what
//! decodes has rows x cols values.
#![no_main]

use adaptq_fuzz::{stage_refs, Stage};
use adaptq_loader::codebook::{decode, vectors_per_row};
use libfuzzer_sys::fuzz_target;

/// `n` values from the pool, cycled; 0xff bytes are NaN.
fn fill(pool: &[u8], at: &mut usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let b = pool.get(*at % pool.len().max(1)).copied().unwrap_or(0);
            *at += 1;
            if b == 0xff {
                f32::NAN
            } else {
                (b as f32 - 128.0) / 64.0
            }
        })
        .collect()
}

/// `n` plus the perturbation flagged by bit `i` and `i + 1` of `flags`: -1, +1 or none.
fn tweak(n: usize, flags: u16, i: u32) -> usize {
    match (flags >> i) & 3 {
        1 => n.saturating_sub(1),
        2 => n + 1,
        _ => n,
    }
}

/// Largest slice the target builds (64 Ki values), so one input stays well inside the time
/// and memory limits; longer ones are left empty, which `decode` must refuse.
const CAP: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (rows, cols, dim) = (data[0] as usize, data[1] as usize, data[2] as usize);
    let ns = (data[3] % 6) as usize;
    let Some(bits) = data.get(4..4 + ns) else {
        return;
    };
    let Some(flags) = data.get(4 + ns..6 + ns) else {
        return;
    };
    let flags = u16::from_le_bytes([flags[0], flags[1]]);
    let pool = &data[6 + ns..];
    let mut at = 0;
    let nv = vectors_per_row(cols, dim.max(1));
    let books: Vec<Stage> = bits
        .iter()
        .enumerate()
        .map(|(s, &b)| {
            let k = 1usize << b.min(16);
            let c = tweak(k * dim, flags, 6 + 2 * s as u32);
            let codes_len = (rows * nv * b as usize).div_ceil(8);
            let c = if c > CAP { 0 } else { c };
            let codes: Vec<u8> = (0..codes_len.min(CAP))
                .map(|i| pool.get(i % pool.len().max(1)).copied().unwrap_or(0))
                .collect();
            (b, fill(pool, &mut at, c), codes)
        })
        .collect();
    let stages = stage_refs(&books);
    let row_scale = fill(pool, &mut at, tweak(rows, flags, 0));
    let row_mean = fill(pool, &mut at, tweak(rows, flags, 2));
    let col_scale = fill(pool, &mut at, tweak(cols, flags, 4));
    if let Some(v) = decode(rows, cols, dim, &stages, &row_scale, &row_mean, &col_scale) {
        assert_eq!(v.len(), rows * cols);
    }
});

//! The bundle's lossless stage: a static order-0 rANS coder over the symbols of a packed code
//! stream (each `symbol_bits` wide, as the quantizer packed them), so the skewed distribution
//! of codes — ternary zeros, the middle levels of a 4-bit grid, popular centroids — costs its
//! entropy instead of its width.
//!
//! Stream layout: `symbol_bits` (u8), symbol count (u64 LE), one LEB128 frequency per symbol of
//! the alphabet (summing to 2^16), then the rANS bytes (initial state first, u32 LE).
//! Byte-wise renormalization with a 32-bit state as in Fabian Giesen's `rans_byte`.
//! Hand-written: it must run in the `no_std` loader, and decoding it is a few dozen lines.

use crate::codebook;
use alloc::vec;
use alloc::vec::Vec;

const SCALE_BITS: u32 = 16;
const M: u32 = 1 << SCALE_BITS;
const L: u32 = 1 << 23;
/// Widest symbols coded: the frequency table must fit the 2^16 scale with room to spare.
pub const MAX_SYMBOL_BITS: u8 = 12;
/// Most packed bytes a stream may decode to per stream byte. rANS can code a near-constant
/// stream in almost no bytes, so without a cap a few stored bytes could make a reader allocate
/// without bound; [`encode`] refuses denser streams (the part is then stored raw).
pub const MAX_EXPANSION: usize = 64;

/// The most packed bytes a stream of `stream_len` bytes may decode to.
pub fn max_raw_len(stream_len: usize) -> usize {
    stream_len.saturating_mul(MAX_EXPANSION)
}

fn put_var(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_var(b: &[u8], pos: &mut usize) -> Option<u32> {
    let mut v = 0u32;
    for shift in (0..35).step_by(7) {
        let x = *b.get(*pos)?;
        *pos += 1;
        v |= ((x & 0x7f) as u32).checked_shl(shift)?;
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Frequencies scaled to sum to exactly 2^16, every present symbol at least 1.
fn normalize(counts: &[u64], n: u64) -> Vec<u32> {
    let mut f: Vec<u32> = counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0
            } else {
                ((c as u128 * M as u128 / n as u128) as u32).max(1)
            }
        })
        .collect();
    let mut sum: i64 = f.iter().map(|&v| v as i64).sum();
    // Settle the rounding on the largest entries, which feel it least.
    while sum != M as i64 {
        let i = (0..f.len())
            .filter(|&i| sum < M as i64 || f[i] > 1)
            .max_by_key(|&i| (f[i], core::cmp::Reverse(i)))
            .expect("some symbol can absorb the difference");
        if sum < M as i64 {
            let add = (M as i64 - sum) as u32;
            f[i] += add;
            sum += add as i64;
        } else {
            let sub = ((sum - M as i64) as u32).min(f[i] - 1);
            f[i] -= sub;
            sum -= sub as i64;
        }
    }
    f
}

/// Codes the first `n` symbols of `packed` (LSB-first, `symbol_bits` wide). `None` when the
/// width is out of range, the stream does not re-pack to exactly `packed` (nonzero padding),
/// so coding is always lossless, or the code would expand more than [`MAX_EXPANSION`] times.
pub fn encode(packed: &[u8], symbol_bits: u8, n: usize) -> Option<Vec<u8>> {
    if !(1..=MAX_SYMBOL_BITS).contains(&symbol_bits) {
        return None;
    }
    let syms = codebook::unpack(packed, symbol_bits, n)?;
    if codebook::pack(&syms, symbol_bits) != packed {
        return None;
    }
    let k = 1usize << symbol_bits;
    let mut counts = vec![0u64; k];
    for &s in &syms {
        counts[s as usize] += 1;
    }
    let mut out = vec![symbol_bits];
    out.extend_from_slice(&(n as u64).to_le_bytes());
    if n == 0 {
        return Some(out);
    }
    let f = normalize(&counts, n as u64);
    for &v in &f {
        put_var(&mut out, v);
    }
    let mut cum = vec![0u32; k];
    for i in 1..k {
        cum[i] = cum[i - 1] + f[i - 1];
    }
    let mut rev: Vec<u8> = Vec::with_capacity(n * symbol_bits as usize / 8 + 8);
    let mut x: u32 = L;
    for &s in syms.iter().rev() {
        let (fs, cs) = (f[s as usize], cum[s as usize]);
        let x_max = ((L >> SCALE_BITS) << 8) * fs;
        while x >= x_max {
            rev.push(x as u8);
            x >>= 8;
        }
        x = ((x / fs) << SCALE_BITS) + (x % fs) + cs;
    }
    for b in x.to_be_bytes() {
        rev.push(b);
    }
    rev.reverse();
    out.extend(rev);
    (packed.len() <= max_raw_len(out.len())).then_some(out)
}

/// Decodes a stream from [`encode`] back to the packed bytes, which must be `raw_len` long
/// (the part's recorded length); `None` when the stream is malformed, its symbol count does
/// not pack to exactly `raw_len` bytes, or `raw_len` exceeds [`max_raw_len`] of the stream.
/// Nothing is allocated from the header's count before it has been tied to `raw_len`.
pub fn decode(stream: &[u8], raw_len: usize) -> Option<Vec<u8>> {
    if raw_len > max_raw_len(stream.len()) {
        return None;
    }
    let symbol_bits = *stream.first()?;
    if !(1..=MAX_SYMBOL_BITS).contains(&symbol_bits) {
        return None;
    }
    let n = usize::try_from(u64::from_le_bytes(stream.get(1..9)?.try_into().ok()?)).ok()?;
    if codebook::checked_packed_len(n, symbol_bits)? != raw_len {
        return None;
    }
    if n == 0 {
        return Some(Vec::new());
    }
    let k = 1usize << symbol_bits;
    let mut pos = 9;
    let mut f = vec![0u32; k];
    for v in f.iter_mut() {
        *v = get_var(stream, &mut pos)?;
    }
    if f.iter().map(|&v| v as u64).sum::<u64>() != M as u64 {
        return None;
    }
    let mut cum = vec![0u32; k];
    let mut slot = vec![0u16; M as usize];
    let mut c = 0u32;
    for (s, &fs) in f.iter().enumerate() {
        cum[s] = c;
        for e in &mut slot[c as usize..(c + fs) as usize] {
            *e = s as u16;
        }
        c += fs;
    }
    let mut x = u32::from_le_bytes(stream.get(pos..pos.checked_add(4)?)?.try_into().ok()?);
    pos += 4;
    let mut syms = Vec::with_capacity(n);
    for _ in 0..n {
        let sl = x & (M - 1);
        let s = slot[sl as usize];
        x = f[s as usize] * (x >> SCALE_BITS) + sl - cum[s as usize];
        while x < L {
            x = (x << 8) | *stream.get(pos)? as u32;
            pos += 1;
        }
        syms.push(s);
    }
    Some(codebook::pack(&syms, symbol_bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn round_trips_and_compresses_skewed_codes() {
        let mut s = 3u64;
        for bits in 1..=MAX_SYMBOL_BITS {
            for n in [0usize, 1, 2, 7, 1000, 20000] {
                // Skewed: most symbols near the middle of the alphabet.
                let k = 1u64 << bits;
                let syms: Vec<u16> = (0..n)
                    .map(|_| {
                        let a = lcg(&mut s) % k;
                        let b = lcg(&mut s) % k;
                        ((a + b) / 2) as u16
                    })
                    .collect();
                let packed = codebook::pack(&syms, bits);
                let enc = encode(&packed, bits, n).unwrap();
                assert_eq!(
                    decode(&enc, packed.len()).unwrap(),
                    packed,
                    "bits {bits} n {n}"
                );
                if n == 20000 && (2..=8).contains(&bits) {
                    assert!(
                        enc.len() < packed.len(),
                        "bits {bits}: {} vs {}",
                        enc.len(),
                        packed.len()
                    );
                }
            }
        }
    }

    #[test]
    fn ternary_like_codes_shrink_towards_their_entropy() {
        // Codes 1, 2, 3 of a 2-bit grid with p = 0.3, 0.4, 0.3: entropy 1.571 bits.
        let mut s = 9u64;
        let syms: Vec<u16> = (0..100_000)
            .map(|_| match lcg(&mut s) % 10 {
                0..=2 => 1,
                3..=6 => 2,
                _ => 3,
            })
            .collect();
        let packed = codebook::pack(&syms, 2);
        let enc = encode(&packed, 2, syms.len()).unwrap();
        let bits = enc.len() as f64 * 8.0 / syms.len() as f64;
        assert!(bits < 1.60 && bits > 1.55, "{bits} bits per code");
        assert_eq!(decode(&enc, packed.len()).unwrap(), packed);
    }

    #[test]
    fn refuses_what_it_cannot_code_exactly() {
        assert!(
            encode(&[0xff], 2, 3).is_none(),
            "nonzero padding would be lost"
        );
        assert!(encode(&[0; 4], 13, 2).is_none());
        assert!(decode(&[2, 5, 0, 0, 0, 0, 0, 0, 0], 2).is_none());
        let enc = encode(&codebook::pack(&[1, 2, 3, 1], 2), 2, 4).unwrap();
        assert!(decode(&enc, 2).is_none(), "wrong recorded length");
        assert!(decode(&enc[..12], 1).is_none(), "truncated table");
    }

    #[test]
    fn counts_that_wrap_or_outgrow_the_stream_are_refused() {
        let packed = codebook::pack(&[1, 2, 3, 1, 0, 2, 2, 1], 2);
        let enc = encode(&packed, 2, 8).unwrap();
        // 2^63 + 8 two-bit symbols: the product wraps to the real length unless checked.
        let mut wrapped = enc.clone();
        wrapped[1..9].copy_from_slice(&((1u64 << 63) + 8).to_le_bytes());
        assert!(decode(&wrapped, packed.len()).is_none());
        // 2^61 eight-bit symbols pack to 2^61 bytes: far more than the stream can back.
        let mut huge = encode(&[7u8; 4], 8, 4).unwrap();
        huge[1..9].copy_from_slice(&(1u64 << 61).to_le_bytes());
        assert!(decode(&huge, 1 << 61).is_none());
        assert!(decode(&huge, 0).is_none());
        assert!(decode(&enc, max_raw_len(enc.len()) + 1).is_none());
    }

    #[test]
    fn streams_denser_than_the_cap_are_not_written() {
        let zeros = vec![0u8; 64 * 1024];
        assert!(encode(&zeros, 8, zeros.len()).is_none());
        let few = vec![0u8; 256];
        let enc = encode(&few, 8, few.len()).unwrap();
        assert_eq!(decode(&enc, few.len()).unwrap(), few);
    }
}

//! Bit-packing of b-bit codes (2–8) into a contiguous LSB-first bit stream.
//!
//! A plain bit stream (rather than per-width layouts) keeps packing exact and uniform for every
//! width, including 3, 5, 6 and 7 bits that do not divide a byte.

use alloc::vec;
use alloc::vec::Vec;

/// Bytes needed to hold `n` codes of `bits` bits; `None` when that does not fit a `usize`.
pub fn checked_packed_len(n: usize, bits: u8) -> Option<usize> {
    Some(n.checked_mul(bits as usize)?.div_ceil(8))
}

/// Bytes needed to hold `n` codes of `bits` bits. Saturates at `usize::MAX` on overflow, so an
/// untrusted count whose product wraps never matches the length of a real buffer.
pub fn packed_len(n: usize, bits: u8) -> usize {
    checked_packed_len(n, bits).unwrap_or(usize::MAX)
}

/// Packs codes (each `< 2^bits`) LSB-first. Higher bits of a code are ignored.
pub fn pack(codes: &[u8], bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bits must be 1..=8");
    if bits == 8 {
        return codes.to_vec();
    }
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    let mask = (1u16 << bits) - 1;
    let mut bitpos = 0usize;
    for &c in codes {
        let v = (c as u16) & mask;
        let byte = bitpos / 8;
        let shift = bitpos % 8;
        let w = v << shift;
        out[byte] |= w as u8;
        if shift + bits as usize > 8 {
            out[byte + 1] |= (w >> 8) as u8;
        }
        bitpos += bits as usize;
    }
    out
}

/// Unpacks `n` codes of `bits` bits. `bytes` must hold at least `packed_len(n, bits)` bytes.
pub fn unpack(bytes: &[u8], bits: u8, n: usize) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bits must be 1..=8");
    assert!(
        bytes.len() >= packed_len(n, bits),
        "packed buffer too short"
    );
    if bits == 8 {
        return bytes[..n].to_vec();
    }
    let mask = (1u16 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    let mut bitpos = 0usize;
    for _ in 0..n {
        let byte = bitpos / 8;
        let shift = bitpos % 8;
        let mut w = bytes[byte] as u16;
        if shift + bits as usize > 8 {
            w |= (bytes[byte + 1] as u16) << 8;
        }
        out.push(((w >> shift) & mask) as u8);
        bitpos += bits as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_width() {
        for bits in 1..=8u8 {
            let max = 1u16 << bits;
            for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000] {
                let codes: Vec<u8> = (0..n).map(|i| ((i * 37 + 11) as u16 % max) as u8).collect();
                let p = pack(&codes, bits);
                assert_eq!(p.len(), packed_len(n, bits));
                assert_eq!(unpack(&p, bits, n), codes, "bits={bits} n={n}");
            }
        }
    }

    #[test]
    fn overflowing_counts_do_not_wrap() {
        assert_eq!(checked_packed_len(1 << 61, 8), None);
        assert_eq!(packed_len(1 << 61, 8), usize::MAX);
        assert_eq!(packed_len((1 << 63) + 4, 2), usize::MAX);
        assert_eq!(checked_packed_len(9, 3), Some(4));
    }

    #[test]
    fn layout_is_lsb_first() {
        // Two 4-bit codes share a byte, first in the low nibble.
        assert_eq!(pack(&[0x3, 0xA], 4), vec![0xA3]);
        // 3-bit codes straddle bytes: 0b101, 0b011, 0b111 -> bits 101 011 111 (LSB first).
        assert_eq!(pack(&[5, 3, 7], 3), vec![0b11_011_101, 0b1]);
    }

    #[test]
    fn all_max_codes_fill_the_stream() {
        for bits in 2..=8u8 {
            let max = ((1u16 << bits) - 1) as u8;
            let p = pack(&[max; 16], bits);
            assert!(p.iter().all(|&b| b == 0xFF), "bits={bits}");
        }
    }
}

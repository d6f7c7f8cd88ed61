//! A rANS stream from a stranger, decoded with the raw length a manifest that agrees with its
//! header would record (count x width in bits / 8, both as a wrapping and as a saturating
//! product, so a huge count is not stopped by a mismatched length). Contract: what decodes has
//! exactly that length.
#![no_main]

use adaptq_loader::rans;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (Some(&bits), Some(n)) = (data.first(), data.get(1..9)) else {
        let _ = rans::decode(data, 0);
        return;
    };
    let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
    let bits = bits as usize;
    for raw in [
        n.wrapping_mul(bits).div_ceil(8),
        n.saturating_mul(bits).div_ceil(8),
    ] {
        if let Some(v) = rans::decode(data, raw) {
            assert_eq!(v.len(), raw);
        }
    }
});

//! A bundle manifest from a stranger: `Loader::new` as sent, and re-hashed so the layout
//! check behind the digests sees the fuzzer's values; then every tensor (no shard is fed, so
//! this reaches the "missing" paths).
#![no_main]

use adaptq_loader::Loader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Loader::new(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(l) = Loader::new(adaptq_fuzz::rehash(text).as_bytes()) {
            adaptq_fuzz::exercise(&l);
        }
    }
});

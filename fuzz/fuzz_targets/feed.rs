//! A whole bundle from a stranger (see `adaptq_fuzz::feed_input` for the input layout): its
//! shards are fed in fuzzer-chosen pieces around hostile calls, then every tensor is decoded.
//! Contract: a shard whose bytes match its entry is verified.
#![no_main]

use adaptq_loader::{Fed, Loader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(adaptq_fuzz::FeedInput {
        manifest,
        shards,
        plan,
    }) = adaptq_fuzz::feed_input(data)
    else {
        return;
    };
    let Ok(mut l) = Loader::new(manifest.as_bytes()) else {
        return;
    };
    let mut sizes = plan.iter().cycle().map(|&b| 1 + b as usize * 37);
    let _ = l.feed("shard-99999.bin", b"x");
    for (name, bytes) in &shards {
        let mut rest: &[u8] = bytes;
        loop {
            let n = sizes.next().unwrap_or(usize::MAX).min(rest.len());
            let r = l.feed(name, &rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                assert_eq!(r, Ok(Fed::Verified), "intact {name}");
                break;
            }
        }
        let _ = l.feed(name, b"again");
    }
    adaptq_fuzz::exercise(&l);
});

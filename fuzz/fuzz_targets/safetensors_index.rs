//! A `model.safetensors.index.json` from a stranger. Contract: every shard name it yields is
//! a plain file name, so joining it to the model folder stays inside that folder.
#![no_main]

use adaptq_loader::names::is_plain_relative;
use adaptq_source::safetensors::index_shard_names;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(names) = index_shard_names(data, Path::new("model.safetensors.index.json")) {
        for n in &names {
            assert!(is_plain_relative(n, false), "index yields {n:?}");
        }
    }
});

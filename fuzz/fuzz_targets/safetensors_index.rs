//! `model.safetensors.index.json`: the text through the loader's shard index parse.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use troupe_engine::shard_index::parse_index;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_index(&text, Path::new("model.safetensors.index.json"));
});

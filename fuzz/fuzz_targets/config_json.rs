//! `config.json`: the bytes through `ModelConfig::from_json_bytes` (parse and validate).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use troupe_engine::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let _ = ModelConfig::from_json_bytes(data, Path::new("config.json"));
});

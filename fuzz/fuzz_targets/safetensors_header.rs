//! A safetensors file: the bytes through the loader's header parse and length checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use troupe_engine::safetensors_header::parse_header;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data, Path::new("model.safetensors"));
});

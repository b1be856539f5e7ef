//! `tokenizer.json`: the bytes through `Tokenizer::from_json_bytes`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use troupe_engine::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let _ = Tokenizer::from_json_bytes(data);
});

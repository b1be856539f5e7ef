//! The fuzz targets of `fuzz/` as bounded randomized tests: every parser of outside input
//! (`config.json`, a safetensors header, `model.safetensors.index.json`, `tokenizer.json`) fed
//! arbitrary bytes and mutations of a valid input. None may panic or hang; each bad input is a
//! typed error of the parser's kind, each accepted one holds the parser's invariants.
//!
//! `PROPTEST_CASES=100000 cargo test --release -p troupe-engine --test fuzz_parsers` runs longer.

mod mutate;

use std::collections::HashMap;
use std::path::{Component, Path};
use std::time::{Duration, Instant};

use mutate::{apply, apply_json, byte_ops, json_ops, ByteOp, JsonOp};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use troupe_engine::loader::Checkpoint;
use troupe_engine::safetensors_header::parse_header;
use troupe_engine::shard_index::parse_index;
use troupe_engine::tokenizer::byte_level_tokenizer_json;
use troupe_engine::{EngineError, ModelConfig, Tokenizer};

/// Longest a single parse may take, in a debug build on a slow runner.
const SLOW: Duration = Duration::from_secs(5);

/// `cases` cases, or `PROPTEST_CASES` when set; no regression files written.
fn cases(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `parse` on `input`, failing the case if it is slow, or if its error is not one `kind`
/// accepts; `ok` checks what an accepted input parsed to.
fn check<T>(
    what: &str,
    input: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, EngineError>,
    kind: fn(&EngineError) -> bool,
    ok: impl FnOnce(T) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let result = parse(input);
    let took = start.elapsed();
    prop_assert!(took < SLOW, "{what}: {took:?} on {} bytes", input.len());
    match result {
        Ok(t) => ok(t),
        Err(e) => {
            prop_assert!(kind(&e), "{what}: unexpected error kind {e:?}");
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

// ---- config.json ----

/// A transformers 4 `config.json` as Qwen3-0.6B ships it.
const QWEN3_CONFIG: &str = r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,
"attention_dropout":0.0,"bos_token_id":151643,"eos_token_id":151645,"head_dim":128,
"hidden_act":"silu","hidden_size":1024,"initializer_range":0.02,"intermediate_size":3072,
"max_position_embeddings":40960,"max_window_layers":28,"model_type":"qwen3",
"num_attention_heads":16,"num_hidden_layers":28,"num_key_value_heads":8,"rms_norm_eps":1e-06,
"rope_scaling":null,"rope_theta":1000000,"sliding_window":null,"tie_word_embeddings":true,
"torch_dtype":"bfloat16","transformers_version":"4.51.0","use_cache":true,
"use_sliding_window":false,"vocab_size":151936}"#;

/// A transformers 4 Llama 3.2 config: no head_dim, a `rope_scaling` object, a list of eos ids.
const LLAMA_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":128000,
"eos_token_id":[128001,128008,128009],"hidden_size":2048,"intermediate_size":8192,
"max_position_embeddings":131072,"model_type":"llama","num_attention_heads":32,
"num_hidden_layers":16,"num_key_value_heads":8,"rms_norm_eps":1e-05,"rope_scaling":{"factor":32.0,
"high_freq_factor":4.0,"low_freq_factor":1.0,"original_max_position_embeddings":8192,
"rope_type":"llama3"},"rope_theta":500000.0,"tie_word_embeddings":true,"torch_dtype":"bfloat16",
"vocab_size":128256}"#;

/// Valid configs: the two above, and the presets as transformers 5 writes them.
fn valid_configs() -> Vec<Value> {
    let mut out: Vec<Value> = [QWEN3_CONFIG, LLAMA_CONFIG]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    for p in troupe_engine::config::PRESETS {
        out.push(ModelConfig::preset(p).unwrap().to_hf_json());
    }
    out
}

fn check_config(input: &[u8]) -> Result<(), TestCaseError> {
    check(
        "config.json",
        input,
        |b| ModelConfig::from_json_bytes(b, Path::new("config.json")),
        |e| {
            matches!(
                e,
                EngineError::InvalidJson { .. }
                    | EngineError::InvalidConfig(_)
                    | EngineError::UnknownArchitecture { .. }
            )
        },
        |c| {
            prop_assert!(c.validate().is_ok());
            prop_assert!(c.checked_num_parameters().is_some(), "{c:?}");
            Ok(())
        },
    )
}

fn config_case() -> impl Strategy<Value = (usize, Vec<JsonOp>, Vec<ByteOp>, bool)> {
    (0..5usize, json_ops(), byte_ops(), any::<bool>())
}

// ---- safetensors header ----

/// A small valid safetensors file: three tensors in f32, bf16 and f16, with metadata.
fn valid_safetensors() -> Vec<u8> {
    let f32s: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let halves = [0x3cu8; 12];
    let tensors = [
        (
            "model.embed_tokens.weight",
            TensorView::new(Dtype::F32, vec![4, 2], &f32s).unwrap(),
        ),
        (
            "model.norm.weight",
            TensorView::new(Dtype::BF16, vec![2], &halves[..4]).unwrap(),
        ),
        (
            "lm_head.weight",
            TensorView::new(Dtype::F16, vec![2, 2], &halves[4..]).unwrap(),
        ),
    ];
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors, Some(meta)).unwrap()
}

/// A safetensors file split into its header's JSON and its data.
fn split_safetensors(file: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&file[8..8 + n]).unwrap(),
        &file[8 + n..],
    )
}

/// A safetensors file of `header` and `data`, its length prefix right.
fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    [&(header.len() as u64).to_le_bytes()[..], header, data].concat()
}

/// One entry of a generated tensor table.
#[derive(Debug, Clone)]
struct TableEntry {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    offsets: (u64, u64),
}

/// Sizes at the edges: small ones that make consistent tables, and ones whose products overflow.
fn table_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..9u64,
        1 => prop::sample::select(vec![1 << 31, 1 << 32, (1 << 61) - 1, 1 << 62, u64::MAX]),
    ]
}

/// Up to five tensors, their offsets either running on from the previous one's end (the
/// `bool`) or arbitrary.
fn tensor_table() -> impl Strategy<Value = Vec<TableEntry>> {
    let dtypes = vec![
        "F32", "BF16", "F16", "F64", "U8", "BOOL", "F8_E4M3", "F4", "X",
    ];
    let entry = (
        "[a-z.]{1,8}",
        prop::sample::select(dtypes),
        prop::collection::vec(table_size(), 0..4),
        any::<bool>(),
        (table_size(), table_size()),
    );
    prop::collection::vec(entry, 0..5).prop_map(|entries| {
        let mut start = 0u64;
        entries
            .into_iter()
            .map(|(name, dtype, shape, chained, offsets)| {
                let bytes = match dtype {
                    "F64" => 8u64,
                    "F32" => 4,
                    "BF16" | "F16" => 2,
                    _ => 1,
                };
                let len = shape.iter().try_fold(bytes, |a, &d| a.checked_mul(d));
                let offsets = match (chained, len.and_then(|l| start.checked_add(l))) {
                    (true, Some(end)) => (start, end),
                    _ => offsets,
                };
                start = offsets.1;
                TableEntry {
                    name,
                    dtype,
                    shape,
                    offsets,
                }
            })
            .collect()
    })
}

fn check_header(input: &[u8]) -> Result<(), TestCaseError> {
    check(
        "safetensors header",
        input,
        |b| parse_header(b, Path::new("model.safetensors")),
        |e| matches!(e, EngineError::CorruptCheckpoint { .. }),
        |h| {
            prop_assert!(h.data_start >= 8 && h.data_start <= input.len());
            for (name, info) in h.meta.tensors() {
                let (begin, end) = info.data_offsets;
                prop_assert!(begin <= end && end <= input.len() - h.data_start, "{name}");
            }
            Ok(())
        },
    )
}

// ---- model.safetensors.index.json ----

const VALID_INDEX: &str = r#"{"metadata":{"total_size":3210},"weight_map":{
"lm_head.weight":"model-00002-of-00002.safetensors",
"model.embed_tokens.weight":"model-00001-of-00002.safetensors",
"model.layers.0.mlp.up_proj.weight":"model-00001-of-00002.safetensors",
"model.norm.weight":"model-00002-of-00002.safetensors"}}"#;

fn check_index(input: &[u8]) -> Result<(), TestCaseError> {
    check(
        "index",
        input,
        |b| parse_index(&String::from_utf8_lossy(b), Path::new("index.json")),
        |e| matches!(e, EngineError::InvalidJson { .. }),
        |ix| {
            prop_assert!(!ix.files.is_empty());
            prop_assert!(ix.location.values().all(|&i| i < ix.files.len()));
            for f in &ix.files {
                let mut parts = Path::new(f).components();
                prop_assert!(parts.all(|c| matches!(c, Component::Normal(_))), "{f:?}");
                prop_assert!(!f.is_empty());
            }
            Ok(())
        },
    )
}

// ---- tokenizer.json ----

fn check_tokenizer(input: &[u8]) -> Result<(), TestCaseError> {
    check(
        "tokenizer.json",
        input,
        Tokenizer::from_json_bytes,
        |e| matches!(e, EngineError::Tokenizer { .. }),
        |_| Ok(()),
    )
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn config_json_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_config(&bytes)?;
    }

    #[test]
    fn config_json_mutated((seed, json, bytes, raw) in config_case()) {
        let v = apply_json(&valid_configs()[seed], &json);
        check_config(v.to_string().as_bytes())?;
        if raw {
            check_config(&apply(v.to_string().as_bytes(), &bytes))?;
        }
    }

    #[test]
    fn safetensors_header_arbitrary_bytes(
        header in "[{}\\[\\]\":,0-9a-zA-Z_ ]{0,96}",
        data in prop::collection::vec(any::<u8>(), 0..64),
        raw in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        check_header(&raw)?;
        check_header(&join_safetensors(header.as_bytes(), &data))?;
    }

    #[test]
    fn safetensors_header_mutated(
        json in json_ops(),
        bytes in byte_ops(),
        file_ops in byte_ops(),
        fix_len in any::<bool>(),
    ) {
        let file = valid_safetensors();
        let (header, data) = split_safetensors(&file);
        let header = apply_json(&header, &json).to_string();
        check_header(&join_safetensors(header.as_bytes(), data))?;
        let header = apply(header.as_bytes(), &bytes);
        let out = if fix_len {
            join_safetensors(&header, data)
        } else {
            [&file[..8], &header[..], data].concat()
        };
        check_header(&out)?;
        check_header(&apply(&file, &file_ops))?;
    }

    #[test]
    fn safetensors_header_generated(
        tensors in tensor_table(),
        data in prop::option::of(0..4096usize),
    ) {
        // The data the table describes (when small), or an arbitrary length.
        let end = tensors.iter().map(|t| t.offsets.1).max().unwrap_or(0);
        let data = data.unwrap_or(if end <= 1 << 16 { end as usize } else { 0 });
        let table: serde_json::Map<String, Value> = tensors
            .into_iter()
            .map(|t| {
                let info = json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": t.offsets });
                (t.name, info)
            })
            .collect();
        let header = Value::Object(table).to_string();
        check_header(&join_safetensors(header.as_bytes(), &vec![0; data]))?;
    }

    #[test]
    fn safetensors_index_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_index(&bytes)?;
    }

    #[test]
    fn safetensors_index_mutated(json in json_ops(), bytes in byte_ops()) {
        let v = apply_json(&serde_json::from_str(VALID_INDEX).unwrap(), &json);
        check_index(v.to_string().as_bytes())?;
        check_index(&apply(VALID_INDEX.as_bytes(), &bytes))?;
    }
}

proptest! {
    // A tokenizer parse is the slowest of the four: fewer cases.
    #![proptest_config(cases(300))]

    #[test]
    fn tokenizer_json_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_tokenizer(&bytes)?;
    }

    #[test]
    fn tokenizer_json_mutated(json in json_ops(), bytes in byte_ops()) {
        let valid = byte_level_tokenizer_json();
        let v = apply_json(&serde_json::from_str(&valid).unwrap(), &json);
        check_tokenizer(v.to_string().as_bytes())?;
        check_tokenizer(&apply(valid.as_bytes(), &bytes))?;
    }
}

// ---- the whole checkpoint opening path, and regressions ----

proptest! {
    #![proptest_config(cases(100))]

    /// `Checkpoint::open` over a mutated index beside two real shards: the index's invariants are
    /// what keep the loader from indexing past its files.
    #[test]
    fn checkpoint_open_with_mutated_index(json in json_ops()) {
        let dir = tempfile::tempdir().unwrap();
        let shard = valid_safetensors();
        for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            std::fs::write(dir.path().join(f), &shard).unwrap();
        }
        let v = apply_json(&serde_json::from_str(VALID_INDEX).unwrap(), &json);
        std::fs::write(dir.path().join("model.safetensors.index.json"), v.to_string()).unwrap();
        if let Ok(mut ck) = Checkpoint::open(dir.path()) {
            for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
                let _ = ck.stored_dtype(name);
            }
        }
    }
}

#[test]
fn valid_inputs_parse() {
    for v in valid_configs() {
        ModelConfig::from_json_bytes(v.to_string().as_bytes(), Path::new("config.json")).unwrap();
    }
    let file = valid_safetensors();
    let h = parse_header(&file, Path::new("model.safetensors")).unwrap();
    assert_eq!(h.meta.tensors().len(), 3);
    let ix = parse_index(VALID_INDEX, Path::new("index.json")).unwrap();
    assert_eq!((ix.files.len(), ix.location.len()), (2, 4));
    Tokenizer::from_json_bytes(byte_level_tokenizer_json().as_bytes()).unwrap();
}

/// Tensors whose data would end near `u64::MAX`: the safetensors crate adds that end to the
/// header's length unchecked (a panic where overflow is checked); the loader refuses it first.
#[test]
fn safetensors_offsets_near_u64_max_are_refused() {
    let k = (1u64 << 61) - 2;
    let table: serde_json::Map<String, Value> = (0..8u64)
        .map(|i| {
            let info = json!({ "dtype": "U8", "shape": [k], "data_offsets": [i * k, (i + 1) * k] });
            (format!("t{i}"), info)
        })
        .collect();
    let file = join_safetensors(Value::Object(table).to_string().as_bytes(), &[0; 16]);
    match parse_header(&file, Path::new("model.safetensors")) {
        Err(EngineError::CorruptCheckpoint { reason, .. }) => {
            assert!(reason.contains("the file holds 16"), "{reason}")
        }
        other => panic!("expected a corrupt checkpoint, got {other:?}"),
    }
}

/// An index whose `weight_map` is empty used to leave the loader with no file to map and index
/// its empty list of files; now it is refused.
#[test]
fn empty_or_escaping_weight_maps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    for (map, needle) in [
        (json!({}), "lists no tensor"),
        (
            json!({ "a": "../model.safetensors" }),
            "not a file in the model",
        ),
        (json!({ "a": "/etc/passwd" }), "not a file in the model"),
        (json!({ "a": "" }), "not a file in the model"),
    ] {
        std::fs::write(&index, json!({ "weight_map": map }).to_string()).unwrap();
        match Checkpoint::open(dir.path()) {
            Err(EngineError::InvalidJson { reason, .. }) => {
                assert!(reason.contains(needle), "{reason}")
            }
            Err(e) => panic!("{map}: wrong error {e:?}"),
            Ok(_) => panic!("{map}: accepted"),
        }
    }
}

/// Sizes whose products overflow, and numerics that make no model, are typed config errors.
#[test]
fn absurd_configs_are_refused() {
    let base: Value = serde_json::from_str(QWEN3_CONFIG).unwrap();
    let cases: &[(&str, Value, &str)] = &[
        ("vocab_size", json!(u64::MAX), "overflow"),
        ("num_hidden_layers", json!(1u64 << 62), "overflow"),
        ("intermediate_size", json!(1u64 << 60), "overflow"),
        ("head_dim", json!(1u64 << 62), "overflow"),
        ("num_attention_heads", json!(0), "must be positive"),
        ("num_key_value_heads", json!(3), "multiple"),
        ("head_dim", json!(7), "even"),
        ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
        ("rope_theta", json!(-1.0), "rope_theta"),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
    ];
    for (key, value, needle) in cases {
        let mut v = base.clone();
        v[key] = value.clone();
        match ModelConfig::from_json(&v, Path::new("config.json")) {
            Err(EngineError::InvalidConfig(m)) => assert!(m.contains(needle), "{key}: {m}"),
            other => panic!("{key} = {value}: {other:?}"),
        }
    }
    // Without head_dim, hidden_size must split evenly over the heads.
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("head_dim");
    v["hidden_size"] = json!(1000);
    v["num_attention_heads"] = json!(16);
    match ModelConfig::from_json(&v, Path::new("config.json")) {
        Err(EngineError::InvalidConfig(m)) => assert!(m.contains("1000"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Ids past u32 and wrongly typed fields are refused, not truncated or defaulted.
    for (key, value) in [
        ("eos_token_id", json!(1u64 << 32)),
        ("head_dim", json!(-128)),
        ("num_key_value_heads", json!("8")),
        ("tie_word_embeddings", json!(1)),
        ("rope_scaling", json!("linear")),
    ] {
        let mut v = base.clone();
        v[key] = value;
        match ModelConfig::from_json(&v, Path::new("config.json")) {
            Err(EngineError::InvalidJson { reason, .. }) => {
                assert!(reason.contains(key) || key == "rope_scaling", "{reason}")
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    // Llama 3 scaling divides by high_freq_factor - low_freq_factor.
    let mut v: Value = serde_json::from_str(LLAMA_CONFIG).unwrap();
    v["rope_scaling"]["high_freq_factor"] = json!(1.0);
    match ModelConfig::from_json(&v, Path::new("config.json")) {
        Err(EngineError::InvalidConfig(m)) => assert!(m.contains("low_freq_factor"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A syntax error inside `decoder`: the tokenizers crate's own parser panics on it
/// (`expect("Helper")`); `Tokenizer` reports it as a tokenizer error.
#[test]
fn tokenizer_syntax_error_in_decoder_is_an_error() {
    let valid = byte_level_tokenizer_json();
    let at = valid.find("\"decoder\":{").expect("a decoder") + "\"decoder\":{".len();
    let colon = at + valid[at..].find(':').unwrap();
    let broken = format!("{}{}", &valid[..colon], &valid[colon + 1..]);
    match Tokenizer::from_json(&broken) {
        Err(EngineError::Tokenizer { reason, .. }) => assert!(reason.contains(':'), "{reason}"),
        Err(e) => panic!("wrong error {e:?}"),
        Ok(_) => panic!("accepted"),
    }
}

//! Bad inputs give typed errors, never panics, and a failed call leaves the engine usable.

mod common;

use std::path::Path;

use common::*;
use safetensors::Dtype;
use troupe_engine::engine::StepItem;
use troupe_engine::{
    generate, load_model, load_verifier, DeviceKind, Engine, EngineError, GenerateOptions,
    ModelConfig, ModelSource, Result, SamplingParams, Verifier, WeightDtype, WindowSpec,
};

/// The error of a call that must fail.
#[track_caller]
fn err<T>(r: Result<T>) -> EngineError {
    match r {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e,
    }
}

fn load(dir: &Path) -> Result<troupe_engine::Model<B>> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    load_model::<B>(dir, &config, WeightDtype::F32, &Default::default())
}

fn engine() -> (Checkpoint, Engine<B>) {
    let ck = Checkpoint::write(&qwen3_config(), 61, Format::F32);
    let e = Engine::new(ck.load());
    (ck, e)
}

#[test]
fn missing_files() {
    let dir = tempfile::tempdir().unwrap();
    match err(ModelConfig::from_file(&dir.path().join("config.json"))) {
        EngineError::MissingFile { path } => assert!(path.ends_with("config.json"), "{path:?}"),
        e => panic!("wrong error {e:?}"),
    }
    match err(load_verifier(
        &ModelSource::Dir(dir.path()),
        DeviceKind::Cpu,
        None,
    )) {
        EngineError::MissingFile { path } => assert!(path.ends_with("config.json"), "{path:?}"),
        e => panic!("wrong error {e:?}"),
    }
    write_config(dir.path(), &qwen3_config());
    match err(load(dir.path())) {
        EngineError::MissingFile { path } => {
            assert!(path.ends_with("model.safetensors"), "{path:?}")
        }
        e => panic!("wrong error {e:?}"),
    }
}

#[test]
fn corrupt_safetensors() {
    let ck = Checkpoint::write(&qwen3_config(), 62, Format::F32);
    let file = ck.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated data", bytes[..bytes.len() / 2].to_vec()),
        ("truncated header", bytes[..20].to_vec()),
        ("empty", vec![]),
        ("garbage", garbage),
        (
            "header length past the end",
            [u64::MAX.to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
        ),
    ];
    for (what, data) in cases {
        std::fs::write(&file, &data).unwrap();
        match err(load(ck.path())) {
            EngineError::CorruptCheckpoint { path, .. } => assert_eq!(path, file, "{what}"),
            e => panic!("{what}: wrong error {e:?}"),
        }
    }

    // A corrupt second shard is named as such.
    let ck = Checkpoint::write(&qwen3_config(), 63, Format::F32_SHARDED);
    let shard = ck.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 7]).unwrap();
    match err(load(ck.path())) {
        EngineError::CorruptCheckpoint { path, .. } => assert_eq!(path, shard),
        e => panic!("wrong error {e:?}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    for (config, name) in [
        (qwen3_config(), "model.layers.1.mlp.up_proj.weight"),
        (qwen3_config(), "model.layers.0.self_attn.k_norm.weight"),
        (qwen3_config(), "model.norm.weight"),
        (llama_config(), "lm_head.weight"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut w = random_weights(&config, 64);
        assert!(
            w.tensors.remove(name).is_some(),
            "{name} is not in the checkpoint"
        );
        write_model_dir(dir.path(), &w, Format::F32);
        match err(load(dir.path())) {
            EngineError::MissingTensor { tensor, .. } => assert_eq!(tensor, name),
            e => panic!("{name}: wrong error {e:?}"),
        }
    }

    // A sharded index that maps a tensor to a shard that does not hold it.
    let ck = Checkpoint::write(&qwen3_config(), 65, Format::F32_SHARDED);
    let index_path = ck.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let name = "model.layers.0.mlp.gate_proj.weight";
    let other = match map[name].as_str().unwrap() {
        "model-00001-of-00002.safetensors" => "model-00002-of-00002.safetensors",
        _ => "model-00001-of-00002.safetensors",
    };
    map.insert(name.into(), other.into());
    std::fs::write(&index_path, index.to_string()).unwrap();
    match err(load(ck.path())) {
        EngineError::MissingTensor { tensor, .. } => assert_eq!(tensor, name),
        e => panic!("wrong error {e:?}"),
    }
}

#[test]
fn mis_shaped_and_mistyped_tensors() {
    let c = qwen3_config();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let dir = tempfile::tempdir().unwrap();
    let mut w = random_weights(&c, 66);
    // Stored transposed: [in, out] instead of [out, in].
    w.tensors.get_mut(name).unwrap().shape = vec![c.hidden_size, c.num_kv_heads * c.head_dim];
    write_model_dir(dir.path(), &w, Format::F32);
    match err(load(dir.path())) {
        EngineError::ShapeMismatch {
            tensor,
            found,
            expected,
            ..
        } => {
            assert_eq!(tensor, name);
            assert_eq!(found, vec![64, 32]);
            assert_eq!(expected, vec![32, 64]);
        }
        e => panic!("wrong error {e:?}"),
    }

    // A config that does not fit the checkpoint is a shape mismatch too.
    let ck = Checkpoint::write(&c, 67, Format::F32);
    let wider = ModelConfig {
        intermediate_size: 128,
        ..c.clone()
    };
    match err(load_model::<B>(
        ck.path(),
        &wider,
        WeightDtype::F32,
        &Default::default(),
    )) {
        EngineError::ShapeMismatch { tensor, .. } => assert!(tensor.contains("mlp"), "{tensor}"),
        e => panic!("wrong error {e:?}"),
    }

    // f64 weights are not read.
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&c, 68);
    write_model_dir(dir.path(), &w, Format::F32);
    let raw: Vec<(String, RawTensor)> = w
        .tensors
        .iter()
        .map(|(n, t)| {
            let mut r = RawTensor::encode(t, StoreDtype::F32);
            if n == "model.norm.weight" {
                r.dtype = Dtype::F64;
                r.bytes = t
                    .data
                    .iter()
                    .flat_map(|x| (*x as f64).to_le_bytes())
                    .collect();
            }
            (n.clone(), r)
        })
        .collect();
    safetensors::serialize_to_file(
        raw.iter().map(|(n, r)| (n.as_str(), r)),
        None,
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    match err(load(dir.path())) {
        EngineError::UnsupportedDtype { tensor, dtype, .. } => {
            assert_eq!(tensor, "model.norm.weight");
            assert!(dtype.contains("F64"), "{dtype}");
        }
        e => panic!("wrong error {e:?}"),
    }
}

#[test]
fn bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut v = qwen3_config().to_hf_json();
    v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    v["model_type"] = "mistral".into();
    std::fs::write(&path, v.to_string()).unwrap();
    match err(ModelConfig::from_file(&path)) {
        EngineError::UnknownArchitecture { found, .. } => assert_eq!(found, "MistralForCausalLM"),
        e => panic!("wrong error {e:?}"),
    }
    std::fs::write(&path, "{ not json").unwrap();
    assert!(matches!(
        err(ModelConfig::from_file(&path)),
        EngineError::InvalidJson { .. }
    ));
    let mut v = qwen3_config().to_hf_json();
    v.as_object_mut().unwrap().remove("vocab_size");
    std::fs::write(&path, v.to_string()).unwrap();
    match err(ModelConfig::from_file(&path)) {
        EngineError::InvalidJson { reason, .. } => {
            assert!(reason.contains("vocab_size"), "{reason}")
        }
        e => panic!("wrong error {e:?}"),
    }
    let mut v = qwen3_config().to_hf_json();
    v["num_key_value_heads"] = 3.into();
    std::fs::write(&path, v.to_string()).unwrap();
    assert!(matches!(
        err(ModelConfig::from_file(&path)),
        EngineError::InvalidConfig(_)
    ));
    let mut v = qwen3_config().to_hf_json();
    v["rope_parameters"]["rope_type"] = "yarn".into();
    std::fs::write(&path, v.to_string()).unwrap();
    assert!(matches!(
        err(ModelConfig::from_file(&path)),
        EngineError::InvalidJson { .. }
    ));

    match err(ModelConfig::preset("qwen9-700b")) {
        EngineError::UnknownPreset(name, known) => {
            assert_eq!(name, "qwen9-700b");
            assert!(known.contains("qwen3-0.6b"), "{known}");
        }
        e => panic!("wrong error {e:?}"),
    }
    assert!(ModelConfig::preset("tiny").is_ok());
    assert!(matches!(
        err("tpu".parse::<DeviceKind>()),
        EngineError::UnknownDevice(_)
    ));
    assert!(matches!(
        err(WindowSpec::new(4, 0)),
        EngineError::InvalidWindow(_)
    ));
}

#[test]
fn sharded_index_naming_a_missing_shard() {
    let ck = Checkpoint::write(&qwen3_config(), 69, Format::F32_SHARDED);
    let shard = ck.path().join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    match err(load(ck.path())) {
        EngineError::MissingFile { path } => assert_eq!(path, shard),
        e => panic!("wrong error {e:?}"),
    }
    // An index without a weight_map.
    std::fs::write(
        ck.path().join("model.safetensors.index.json"),
        "{\"metadata\": {}}",
    )
    .unwrap();
    assert!(matches!(
        err(load(ck.path())),
        EngineError::InvalidJson { .. }
    ));
}

#[test]
fn bad_steps_leave_the_engine_usable() {
    let (_ck, mut e) = engine();
    let spec = WindowSpec::new(2, 8).unwrap();
    e.open(1, spec, 0).unwrap();
    assert!(matches!(
        err(e.open(1, spec, 0)),
        EngineError::DuplicateSequence(1)
    ));
    let tokens = random_tokens(70, 5, 256);
    let greedy = SamplingParams::greedy();

    // Unknown sequence, alone or beside a valid one.
    assert!(matches!(
        err(e.verify(&[greedy_work(99, vec![1])])),
        EngineError::UnknownSequence(99)
    ));
    assert!(matches!(
        err(e.verify(&[greedy_work(1, tokens.clone()), greedy_work(99, vec![1])])),
        EngineError::UnknownSequence(99)
    ));
    assert!(matches!(
        err(e.step(&[StepItem {
            seq: 98,
            tokens: vec![1],
            logit_rows: 1
        }])),
        EngineError::UnknownSequence(98)
    ));
    assert!(matches!(
        err(e.resolve(97, 0)),
        EngineError::UnknownSequence(97)
    ));
    assert!(matches!(err(e.close(96)), EngineError::UnknownSequence(96)));

    // Tokens outside the vocabulary: fed, drafted, or in a step.
    match err(e.verify(&[greedy_work(1, vec![3, 256])])) {
        EngineError::TokenOutOfRange { token, vocab } => assert_eq!((token, vocab), (256, 256)),
        e => panic!("wrong error {e:?}"),
    }
    let w = work(1, vec![3], vec![1000], None, true, greedy);
    assert!(matches!(
        err(e.verify(&[w])),
        EngineError::TokenOutOfRange { token: 1000, .. }
    ));
    assert!(matches!(
        err(e.step(&[StepItem {
            seq: 1,
            tokens: vec![u32::MAX],
            logit_rows: 1
        }])),
        EngineError::TokenOutOfRange { .. }
    ));

    // Malformed steps.
    assert!(matches!(err(e.step(&[])), EngineError::InvalidStep(_)));
    assert!(matches!(
        err(e.verify(&[greedy_work(1, vec![])])),
        EngineError::InvalidStep(_)
    ));
    assert!(matches!(
        err(e.step(&[StepItem {
            seq: 1,
            tokens: vec![1],
            logit_rows: 2
        }])),
        EngineError::InvalidStep(_)
    ));
    assert!(matches!(
        err(e.verify(&[greedy_work(1, vec![1]), greedy_work(1, vec![2])])),
        EngineError::InvalidStep(_)
    ));
    let w = work(
        1,
        vec![1],
        vec![2, 3],
        Some(vec![vec![0.125; 256]]),
        true,
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        },
    );
    assert!(matches!(err(e.verify(&[w])), EngineError::InvalidStep(_)));
    let w = work(1, vec![1], vec![2], None, false, greedy);
    assert!(matches!(err(e.verify(&[w])), EngineError::InvalidStep(_)));

    // Nothing above touched the window; the sequence computes what a fresh one does.
    assert_eq!(e.window_fill(1), Some((0, 0)));
    assert_eq!(e.window(1).unwrap().scratch_len(), 0);
    let got = step_all(&mut e, 1, &tokens);
    let mut fresh = Engine::new(e.model().clone());
    fresh.open(1, spec, 0).unwrap();
    assert_rows_close("after errors", &got, &step_all(&mut fresh, 1, &tokens), 0.0);
    assert!(
        matches!(err(e.resolve(1, 1)), EngineError::InvalidStep(_)),
        "resolving past the scratch"
    );

    // A batched commit with a keep per item, or a keep past an item's tokens, writes nothing.
    e.open(2, spec, 0).unwrap();
    let items: Vec<StepItem> = [1, 2]
        .map(|seq| StepItem {
            seq,
            tokens: vec![4, 5],
            logit_rows: 1,
        })
        .to_vec();
    let out = e.step(&items).unwrap();
    for keeps in [&[2][..], &[2, 3], &[1, 2, 2]] {
        assert!(matches!(
            err(e.resolve_step(&out.kv, &items, keeps)),
            EngineError::InvalidStep(_)
        ));
    }
    assert_eq!(e.window_fill(2), Some((0, 0)));
    assert_eq!(e.window(2).unwrap().scratch_len(), 2);
    e.resolve_step(&out.kv, &items, &[2, 1]).unwrap();
    assert_eq!(e.window_fill(1), Some((tokens.len() as u64 + 2, 7)));
    assert_eq!(e.window_fill(2), Some((1, 1)));
}

#[test]
fn generate_rejects_bad_requests() {
    let (_ck, mut e) = engine();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        draft_len: 0,
        ..Default::default()
    };
    assert!(matches!(
        err(generate(&mut e, None, &[], &opts)),
        EngineError::InvalidStep(_)
    ));
    assert!(matches!(
        err(generate(&mut e, None, &[1, 2, 300], &opts)),
        EngineError::TokenOutOfRange { token: 300, .. }
    ));
    for (t, p) in [(f32::NAN, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, 1.5)] {
        let bad = GenerateOptions {
            params: SamplingParams {
                temperature: t,
                top_p: p,
            },
            ..opts.clone()
        };
        assert!(
            matches!(
                err(generate(&mut e, None, &[1], &bad)),
                EngineError::InvalidStep(_)
            ),
            "t {t}, top_p {p}"
        );
    }
    // The failed calls closed their sequence: the verifier still generates.
    let g = generate(&mut e, None, &[1, 2, 3], &opts).unwrap();
    assert_eq!(g.tokens.len(), 4);
}

/// A window wider than the first RoPE table (1,024 rows) decodes without panicking: the table
/// covers every rank of the window, not only its fill. One wider than the model's positions is
/// refused when it opens, with both numbers, and the engine stays usable.
#[test]
fn windows_up_to_the_models_positions_and_no_further() {
    let (_ck, mut e) = engine();
    let spec = WindowSpec::new(4, 1400).unwrap();
    e.open(1, spec, 0).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 3,
        draft_len: 0,
        window: spec,
        ..Default::default()
    };
    let g = generate(&mut e, None, &[1, 2, 3], &opts).unwrap();
    assert_eq!(g.tokens.len(), 3);

    let too_wide = WindowSpec::new(4, 4093).unwrap();
    match err(e.open(2, too_wide, 0)) {
        EngineError::WindowPastPositions {
            capacity,
            positions,
        } => assert_eq!((capacity, positions), (4097, 4096)),
        other => panic!("wrong error {other:?}"),
    }
    e.open(2, WindowSpec::new(4, 4092).unwrap(), 0).unwrap();
}

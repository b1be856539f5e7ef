//! Loading Hugging Face checkpoints: every variant's logits match the independent reference forward.

mod common;

use common::reference::{inv_freq, Reference};
use common::*;
use troupe_engine::{
    generate, load_verifier, DeviceKind, Engine, GenerateOptions, LinearWeight, ModelConfig,
    ModelSource, RopeScaling, Verifier, WeightDtype, WindowSpec,
};

/// f32 end to end: only summation order differs from the reference.
const TOL: f32 = 1e-3;

/// Loads the checkpoint, runs one step over `tokens` in a window big enough to hold everything, and
/// returns every row's logits.
fn engine_logits(ck: &Checkpoint, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut engine = Engine::new(ck.load());
    engine.open(1, WindowSpec::new(4, 256).unwrap(), 0).unwrap();
    step_all(&mut engine, 1, tokens)
}

fn check(ck: &Checkpoint, seed: u64, n: usize) -> Vec<Vec<f32>> {
    let parsed = ModelConfig::from_file(&ck.config_path()).unwrap();
    assert_eq!(parsed, ck.weights.config, "config.json round trip");
    let tokens = random_tokens(seed, n, parsed.vocab_size);
    let got = engine_logits(ck, &tokens);
    let want = Reference::new(&ck.weights).forward(&tokens);
    assert_rows_close("engine vs reference", &got, &want, TOL);
    got
}

#[test]
fn qwen3_f32_single_file_matches_reference() {
    let ck = Checkpoint::write(&qwen3_config(), 11, Format::F32);
    let tokens = random_tokens(1, 24, 256);
    let got = check(&ck, 1, 24);

    // The check can fail: a reference that ignored Qwen3's q/k norms (weights reset to 1) is far off.
    let mut plain = ck.weights.clone();
    for (name, t) in plain.tensors.iter_mut() {
        if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
            t.data.iter_mut().for_each(|x| *x = 1.0);
        }
    }
    let off = max_rows_diff(&got, &Reference::new(&plain).forward(&tokens));
    assert!(
        off > 10.0 * TOL,
        "q/k norms barely matter ({off}); the test would not notice them"
    );
}

#[test]
fn qwen3_bf16_checkpoint_matches_reference_on_rounded_weights() {
    let ck = Checkpoint::write(&qwen3_config(), 12, Format::BF16);
    assert_eq!(ck.weights.config.torch_dtype, "bfloat16");
    let got = check(&ck, 2, 20);
    // Against the unrounded weights the difference is much larger: the loader really read bf16.
    let unrounded = random_weights(&qwen3_config(), 12);
    let tokens = random_tokens(2, 20, 256);
    let off = max_rows_diff(&got, &Reference::new(&unrounded).forward(&tokens));
    assert!(off > TOL, "bf16 rounding invisible ({off})");
}

#[test]
fn f16_checkpoint_matches_reference_on_rounded_weights() {
    let ck = Checkpoint::write(&llama_config(), 15, Format::F16);
    assert_eq!(ck.weights.config.torch_dtype, "float16");
    check(&ck, 5, 12);
}

#[test]
fn bf16_sharded_checkpoint_matches_reference() {
    let ck = Checkpoint::write(
        &qwen3_config(),
        16,
        Format {
            dtype: StoreDtype::Bf16,
            sharded: true,
        },
    );
    check(&ck, 6, 9);
}

#[test]
fn sharded_checkpoint_matches_reference() {
    let ck = Checkpoint::write(&qwen3_config(), 13, Format::F32_SHARDED);
    assert!(ck.path().join("model.safetensors.index.json").exists());
    assert!(!ck.path().join("model.safetensors").exists());
    check(&ck, 3, 17);
}

#[test]
fn llama3_rope_scaling_untied_head_matches_reference() {
    let config = llama_config();
    let ck = Checkpoint::write(&config, 14, Format::F32);
    assert!(ck.weights.tensors.contains_key("lm_head.weight"));
    assert!(!ck.weights.tensors.keys().any(|n| n.contains("q_norm")));
    let n = 48;
    let got = check(&ck, 4, n);
    let tokens = random_tokens(4, n, 256);

    // The check can fail: plain RoPE frequencies, or a tied head, give clearly different logits.
    let mut unscaled = Reference::new(&ck.weights);
    unscaled.inv_freq = inv_freq(&ModelConfig {
        rope_scaling: RopeScaling::None,
        ..config.clone()
    });
    let off = max_rows_diff(&got, &unscaled.forward(&tokens));
    assert!(off > 10.0 * TOL, "llama3 scaling barely matters ({off})");
    let mut tied = ck.weights.clone();
    tied.tensors.remove("lm_head.weight");
    let off = max_rows_diff(&got, &Reference::new(&tied).forward(&tokens));
    assert!(off > 10.0 * TOL, "untied head barely matters ({off})");
}

/// `attention_bias: true` gives q, k, v and o projections a bias in transformers' Llama and Qwen3.
#[test]
fn attention_bias_checkpoints_match_reference() {
    for (config, seed) in [(llama_config(), 19), (qwen3_config(), 20)] {
        let config = ModelConfig {
            attention_bias: true,
            ..config
        };
        let ck = Checkpoint::write(&config, seed, Format::F32);
        assert!(ck
            .weights
            .tensors
            .contains_key("model.layers.1.self_attn.o_proj.bias"));
        check(&ck, 9, 12);
    }
}

#[test]
fn engine_inverse_frequencies_match_the_hf_formula() {
    for config in [qwen3_config(), llama_config()] {
        let want = inv_freq(&config);
        let got = troupe_engine::rope::inv_freq(&config);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs(),
                "{:?}: inv_freq[{i}] {g} vs {w}",
                config.architecture
            );
        }
    }
    // All three llama3 bands occur in the test config, so the formula is exercised everywhere.
    let c = llama_config();
    let plain = inv_freq(&ModelConfig {
        rope_scaling: RopeScaling::None,
        ..c.clone()
    });
    let scaled = inv_freq(&c);
    let unchanged = plain.iter().zip(&scaled).filter(|(p, s)| p == s).count();
    let divided = plain
        .iter()
        .zip(&scaled)
        .filter(|(p, s)| ((*p / 8.0) - *s).abs() < 1e-15)
        .count();
    assert!(
        unchanged > 0 && divided > 0 && unchanged + divided < plain.len(),
        "{plain:?} -> {scaled:?}"
    );
}

#[test]
fn config_accepts_top_level_rope_theta() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    // transformers 4 style: rope_theta at the top, no rope_parameters.
    let mut v = qwen3_config().to_hf_json();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), 123_456.0.into());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let c = ModelConfig::from_file(&path).unwrap();
    assert_eq!(c.rope_theta, 123_456.0);
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert_eq!(
        c,
        ModelConfig {
            rope_theta: 123_456.0,
            ..qwen3_config()
        }
    );

    // transformers 4 Llama 3.1: top-level rope_theta plus a `rope_scaling` object.
    let mut v = llama_config().to_hf_json();
    let obj = v.as_object_mut().unwrap();
    let mut rope = obj.remove("rope_parameters").unwrap();
    rope.as_object_mut().unwrap().remove("rope_theta");
    obj.insert("rope_scaling".into(), rope);
    obj.insert("rope_theta".into(), llama_config().rope_theta.into());
    obj.remove("dtype");
    obj.insert("torch_dtype".into(), "float32".into());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(ModelConfig::from_file(&path).unwrap(), llama_config());
}

/// Loads `ck` keeping its matrices in `dtype`'s width.
fn load_as(ck: &Checkpoint, dtype: WeightDtype) -> troupe_engine::Model<B> {
    let config = ModelConfig::from_file(&ck.config_path()).unwrap();
    troupe_engine::load_model::<B>(ck.path(), &config, dtype, &Default::default()).unwrap()
}

/// `--weights int8` keeps every projection and the head (a tied model's: the embedding's blocks)
/// in int8 blocks, the embedding and norms as stored; its logits and greedy tokens equal those of
/// an f32 model of the dequantized values (the kernels widen and scale in registers, the f32
/// model's matrices are those values in f32).
#[test]
fn int8_weights_match_the_f32_run_of_their_dequantized_values() {
    use burn::tensor::DType;
    let cases = [
        Checkpoint::write(&qwen3_config(), 23, Format::BF16),
        Checkpoint::write(&llama_config(), 24, Format::F32),
    ];
    for ck in cases {
        let what = format!("int8 from {}", ck.weights.config.torch_dtype);
        let model = load_as(&ck, WeightDtype::Int8);
        for l in &model.layers {
            for lin in l.projections() {
                assert_eq!(lin.weight.dtype(), DType::I8, "{what}: projection");
            }
            assert_eq!(l.input_norm.dtype(), DType::F32, "{what}: norm");
        }
        assert!(
            matches!(model.lm_head, Some(LinearWeight::Int8(_))),
            "{what}: head"
        );
        assert_ne!(model.embed.dtype(), DType::I8, "{what}: embedding");

        let mut wide = model.clone();
        for lin in wide.layers.iter_mut().flat_map(|l| l.projections_mut()) {
            lin.weight = LinearWeight::Float(lin.weight.to_float());
        }
        wide.lm_head = wide
            .lm_head
            .take()
            .map(|h| LinearWeight::Float(h.to_float()));

        let tokens = random_tokens(7, 16, 256);
        let logits = |m: troupe_engine::Model<B>| {
            let mut engine = Engine::new(m);
            engine.open(1, WindowSpec::new(4, 256).unwrap(), 0).unwrap();
            step_all(&mut engine, 1, &tokens)
        };
        assert_rows_close(&what, &logits(model.clone()), &logits(wide.clone()), TOL);
        let prompt = random_tokens(9, 5, 256);
        assert_eq!(
            greedy(model, &prompt, 12),
            greedy(wide, &prompt, 12),
            "{what}: greedy tokens"
        );
    }
}

/// Greedy tokens of `model` after `prompt`.
fn greedy(model: troupe_engine::Model<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        draft_len: 0,
        ..Default::default()
    };
    generate(&mut Engine::new(model), None, prompt, &opts)
        .unwrap()
        .tokens
}

/// On the CPU a bf16 or f16 checkpoint keeps its matrices in their width (`AsStored`, the
/// default), and an f32 one is narrowed at load when asked; the kernels widen them in registers
/// and run everything else in f32. Logits match the f32 reference on the same rounded weights
/// as closely as an f32 load does, and greedy tokens equal the f32 load's of those weights.
#[test]
fn narrow_weights_stay_narrow_and_match_the_f32_run_of_their_values() {
    use burn::tensor::DType;
    let cases = [
        (
            Checkpoint::write(&qwen3_config(), 17, Format::BF16),
            WeightDtype::AsStored,
            DType::BF16,
        ),
        (
            Checkpoint::write(&llama_config(), 19, Format::F16),
            WeightDtype::AsStored,
            DType::F16,
        ),
        (
            Checkpoint::write(&qwen3_config(), 20, Format::F32),
            WeightDtype::Bf16,
            DType::BF16,
        ),
        (
            Checkpoint::write(&llama_config(), 21, Format::F32),
            WeightDtype::F16,
            DType::F16,
        ),
    ];
    for (ck, dtype, kept) in cases {
        let what = format!("{dtype:?} from {}", ck.weights.config.torch_dtype);
        let model = load_as(&ck, dtype);
        assert_eq!(model.embed.dtype(), kept, "{what}: embedding");
        assert_eq!(
            model.layers[0].down_proj.weight.dtype(),
            kept,
            "{what}: projection"
        );
        assert_eq!(
            model.layers[0].input_norm.dtype(),
            DType::F32,
            "{what}: norm"
        );
        assert_eq!(model.dtype, DType::F32, "{what}: activations");

        let mut rounded = match kept {
            DType::BF16 => ck.weights.rounded_bf16(),
            _ => ck.weights.rounded_f16(),
        };
        // Norms and biases stay as stored: narrowing at load touches the matrices only.
        for (name, t) in rounded.tensors.iter_mut() {
            if name.ends_with("norm.weight") || name.ends_with(".bias") {
                t.data = ck.weights.get(name).to_vec();
            }
        }
        let tokens = random_tokens(7, 16, 256);
        let mut engine = Engine::new(model);
        engine.open(1, WindowSpec::new(4, 256).unwrap(), 0).unwrap();
        let got = step_all(&mut engine, 1, &tokens);
        assert_rows_close(&what, &got, &Reference::new(&rounded).forward(&tokens), TOL);

        // The f32 run of the same values: the checkpoint as stored when it is narrow, else the
        // rounded weights written in f32.
        let wide = if dtype == WeightDtype::AsStored {
            load_as(&ck, WeightDtype::F32)
        } else {
            let dir = tempfile::tempdir().unwrap();
            write_model_dir(dir.path(), &rounded, Format::F32);
            let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
            troupe_engine::load_model::<B>(
                dir.path(),
                &config,
                WeightDtype::F32,
                &Default::default(),
            )
            .unwrap()
        };
        let prompt = random_tokens(9, 5, 256);
        let narrow_tokens = greedy(load_as(&ck, dtype), &prompt, 12);
        assert_eq!(
            narrow_tokens,
            greedy(wide, &prompt, 12),
            "{what}: greedy tokens"
        );
    }
}

/// Asking for a width the loader does not know is a typed error, not a panic.
#[test]
fn unknown_weight_width_is_refused() {
    let err = "int4".parse::<WeightDtype>().unwrap_err();
    assert!(
        matches!(err, troupe_engine::EngineError::InvalidConfig(_)),
        "{err}"
    );
    assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
}

/// The backend-free entry point loads the same model: `generate` through `load_verifier` gives the
/// tokens of the directly loaded engine.
#[test]
fn load_verifier_from_a_directory() {
    let ck = Checkpoint::write(&llama_config(), 18, Format::F32_SHARDED);
    let mut boxed = load_verifier(&ModelSource::Dir(ck.path()), DeviceKind::Cpu, None).unwrap();
    assert_eq!(boxed.vocab_size(), 256);
    let opts = GenerateOptions {
        max_new_tokens: 8,
        draft_len: 0,
        ..Default::default()
    };
    let prompt = random_tokens(8, 6, 256);
    let a = generate(boxed.as_mut(), None, &prompt, &opts)
        .unwrap()
        .tokens;
    let b = generate(&mut Engine::new(ck.load()), None, &prompt, &opts)
        .unwrap()
        .tokens;
    assert_eq!(a, b);
    let want: Vec<u32> = {
        let mut seq = prompt.clone();
        for _ in 0..8 {
            let next = argmax(Reference::new(&ck.weights).forward(&seq).last().unwrap());
            seq.push(next);
        }
        seq[prompt.len()..].to_vec()
    };
    assert_eq!(a, want, "greedy tokens vs the reference");
}

/// Random weights of a preset's shape load behind the same interface and decode.
#[test]
fn random_tiny_preset_generates() {
    let config = ModelConfig::preset("tiny").unwrap();
    let mut v = load_verifier(&ModelSource::Random(config, 3), DeviceKind::Cpu, None).unwrap();
    assert_eq!(v.vocab_size(), 256);
    let spec = WindowSpec::new(4, 60).unwrap();
    assert_eq!(v.kv_bytes(spec), 2 * 2 * 2 * 16 * 64 * 4);
    let opts = GenerateOptions {
        max_new_tokens: 5,
        draft_len: 0,
        window: spec,
        ..Default::default()
    };
    let g = generate(v.as_mut(), None, &[1, 2, 3], &opts).unwrap();
    assert_eq!(g.tokens.len(), 5);
    assert!(g.tokens.iter().all(|&t| t < 256));
    assert_eq!(g.stats.kv_bytes_per_session, v.kv_bytes(spec));
}

/// The greedy head (each row's argmax without the logits) picks what the full logits' argmax
/// picks, for a tied and an untied head in every width the CPU keeps weights in, on the dot
/// kernel's row counts and the packed one's.
#[test]
fn the_greedy_head_picks_the_logits_argmax() {
    let cases = [
        Checkpoint::write(&qwen3_config(), 31, Format::F32),
        Checkpoint::write(&llama_config(), 32, Format::BF16),
    ];
    for ck in &cases {
        for dtype in [WeightDtype::AsStored, WeightDtype::Bf16, WeightDtype::Int8] {
            let model = load_as(ck, dtype);
            let hidden = model.config.hidden_size;
            for m in [1, 7, 40, 70] {
                let data: Vec<f32> = random_tokens(m as u64, m * hidden, 2000)
                    .into_iter()
                    .map(|t| t as f32 / 500.0 - 2.0)
                    .collect();
                let h = burn::tensor::Tensor::<B, 2>::from_data(
                    burn::tensor::TensorData::new(data, [m, hidden]),
                    &model.device,
                );
                let fused = model
                    .head_argmax(h.clone())
                    .expect("the CPU has a greedy head");
                let full = troupe_engine::engine::argmax_rows(model.logits(h)).unwrap();
                assert_eq!(
                    fused, full,
                    "{} as {dtype:?}, {m} rows",
                    ck.weights.config.torch_dtype
                );
            }
        }
    }
}

//! Shared helpers for the engine's integration tests: tiny random checkpoints written in Hugging Face
//! layout, an independent plain-Rust reference forward (`reference`), and small comparison utilities.
#![allow(dead_code)]

pub mod reference;
pub mod scripted;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, View};
use troupe_engine::device::CpuBackend;
use troupe_engine::engine::{logits_to_host, StepItem};
use troupe_engine::{Architecture, Engine, Model, ModelConfig, RopeScaling, SeqId, WeightDtype};

/// The backend every test runs on.
pub type B = CpuBackend;

/// One host tensor in Hugging Face layout (`[out, in]` for projections), row-major f32 values.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All tensors of a checkpoint by their Hugging Face names, plus the config they belong to.
#[derive(Debug, Clone)]
pub struct Weights {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Weights {
    /// The values of tensor `name`; panics (test bug) if absent.
    pub fn get(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference needs tensor {name}"))
            .data
    }

    pub fn get_opt(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|t| t.data.as_slice())
    }

    /// The same weights rounded to bf16 and back, as a bf16 checkpoint stores them.
    pub fn rounded_bf16(&self) -> Weights {
        let mut out = self.clone();
        for t in out.tensors.values_mut() {
            t.data
                .iter_mut()
                .for_each(|x| *x = bf16::from_f32(*x).to_f32());
        }
        out
    }

    /// The same weights rounded to f16 and back.
    pub fn rounded_f16(&self) -> Weights {
        let mut out = self.clone();
        for t in out.tensors.values_mut() {
            t.data
                .iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        out
    }
}

/// Storage dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    Bf16,
    F16,
}

/// How a checkpoint is written.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub dtype: StoreDtype,
    /// Two shards plus `model.safetensors.index.json` instead of one `model.safetensors`.
    pub sharded: bool,
}

impl Format {
    pub const F32: Format = Format {
        dtype: StoreDtype::F32,
        sharded: false,
    };
    pub const BF16: Format = Format {
        dtype: StoreDtype::Bf16,
        sharded: false,
    };
    pub const F16: Format = Format {
        dtype: StoreDtype::F16,
        sharded: false,
    };
    pub const F32_SHARDED: Format = Format {
        dtype: StoreDtype::F32,
        sharded: true,
    };
}

/// A tiny Qwen3 (q/k norms, tied head).
pub fn qwen3_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen3,
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: 4096,
        bos_token_id: None,
        eos_token_id: None,
        torch_dtype: "float32".into(),
    }
}

/// A tiny Llama 3.1-style model: llama3 rope scaling whose three bands all occur at head_dim 16
/// (wavelengths 6.3, 20, 63 are high-frequency, 199 is in the smoothed band, 628.. are divided by the
/// factor), and an untied head.
pub fn llama_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        rms_norm_eps: 1e-5,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256.0,
        },
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        ..qwen3_config()
    }
}

/// A Qwen3 with a smaller shape but the same vocabulary, used as a draft model.
pub fn small_qwen3_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        ..qwen3_config()
    }
}

fn uniform(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = std * 3f32.sqrt();
    (0..n).map(|_| rng.random_range(-a..a)).collect()
}

/// Random weights of `config`'s shape, in Hugging Face names and layout. Projections have standard
/// deviation 1/sqrt(fan_in) so activations stay O(1); the embedding is large enough that logits are
/// far from uniform; norm weights are around 1 but not 1, so every norm matters.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        tensors.insert(name, HostTensor { shape, data });
    };
    let embed_std = 2.0 / (h as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        uniform(&mut rng, c.vocab_size * h, embed_std),
    );
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let lin = |rng: &mut StdRng, name: &str, out: usize, inp: usize| {
            (
                format!("{p}.{name}.weight"),
                vec![out, inp],
                uniform(rng, out * inp, 1.0 / (inp as f32).sqrt()),
            )
        };
        let norm = |rng: &mut StdRng, n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| 1.0 + rng.random_range(-0.3f32..0.3))
                .collect()
        };
        let items = vec![
            (
                format!("{p}.input_layernorm.weight"),
                vec![h],
                norm(&mut rng, h),
            ),
            lin(&mut rng, "self_attn.q_proj", qd, h),
            lin(&mut rng, "self_attn.k_proj", kvd, h),
            lin(&mut rng, "self_attn.v_proj", kvd, h),
            lin(&mut rng, "self_attn.o_proj", h, qd),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                norm(&mut rng, h),
            ),
            lin(&mut rng, "mlp.gate_proj", i, h),
            lin(&mut rng, "mlp.up_proj", i, h),
            lin(&mut rng, "mlp.down_proj", h, i),
        ];
        for (n, s, d) in items {
            put(n, s, d);
        }
        if c.attention_bias {
            // transformers gives q, k, v *and* o a bias when `attention_bias` is set.
            for (proj, out) in [
                ("q_proj", qd),
                ("k_proj", kvd),
                ("v_proj", kvd),
                ("o_proj", h),
            ] {
                let b = uniform(&mut rng, out, 0.5);
                put(format!("{p}.self_attn.{proj}.bias"), vec![out], b);
            }
        }
        if c.architecture == Architecture::Qwen3 {
            let qn = norm(&mut rng, hd);
            let kn = norm(&mut rng, hd);
            put(format!("{p}.self_attn.q_norm.weight"), vec![hd], qn);
            put(format!("{p}.self_attn.k_norm.weight"), vec![hd], kn);
        }
    }
    let fnorm = (0..h)
        .map(|_| 1.0 + rng.random_range(-0.3f32..0.3))
        .collect();
    put("model.norm.weight".into(), vec![h], fnorm);
    if !c.tie_word_embeddings {
        put(
            "lm_head.weight".into(),
            vec![c.vocab_size, h],
            uniform(&mut rng, c.vocab_size * h, embed_std),
        );
    }
    Weights {
        config: config.clone(),
        tensors,
    }
}

/// A tensor ready for safetensors serialization.
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    pub fn encode(t: &HostTensor, dtype: StoreDtype) -> RawTensor {
        let (dtype, bytes) = match dtype {
            StoreDtype::F32 => (
                Dtype::F32,
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            StoreDtype::Bf16 => (
                Dtype::BF16,
                t.data
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
            StoreDtype::F16 => (
                Dtype::F16,
                t.data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
        };
        RawTensor {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` to one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>, dtype: StoreDtype) {
    let raw: BTreeMap<&String, RawTensor> = tensors
        .iter()
        .map(|(n, t)| (n, RawTensor::encode(t, dtype)))
        .collect();
    safetensors::serialize_to_file(raw.iter().map(|(n, t)| (n.as_str(), t)), None, path)
        .expect("write safetensors");
}

/// Writes `config.json` (transformers-5 style) for `config`.
pub fn write_config(dir: &Path, config: &ModelConfig) {
    let json = serde_json::to_string_pretty(&config.to_hf_json()).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
}

/// Writes a whole model directory: config, weights (single or two shards with an index) and the
/// byte-level `tokenizer.json`. Returns the weights as stored (rounded when bf16).
pub fn write_model_dir(dir: &Path, weights: &Weights, format: Format) -> Weights {
    let mut config = weights.config.clone();
    config.torch_dtype = match format.dtype {
        StoreDtype::F32 => "float32".into(),
        StoreDtype::Bf16 => "bfloat16".into(),
        StoreDtype::F16 => "float16".into(),
    };
    write_config(dir, &config);
    std::fs::write(
        dir.join("tokenizer.json"),
        troupe_engine::tokenizer::byte_level_tokenizer_json(),
    )
    .unwrap();
    if format.sharded {
        // Alternate tensors between the shards so that every layer spans both files.
        let names = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        let mut shards = [BTreeMap::new(), BTreeMap::new()];
        let mut weight_map = serde_json::Map::new();
        for (k, (name, t)) in weights.tensors.iter().enumerate() {
            shards[k % 2].insert(name.clone(), t.clone());
            weight_map.insert(name.clone(), names[k % 2].into());
        }
        for (file, shard) in names.iter().zip(&shards) {
            write_safetensors(&dir.join(file), shard, format.dtype);
        }
        let index =
            serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        write_safetensors(
            &dir.join("model.safetensors"),
            &weights.tensors,
            format.dtype,
        );
    }
    let mut stored = match format.dtype {
        StoreDtype::F32 => weights.clone(),
        StoreDtype::Bf16 => weights.rounded_bf16(),
        StoreDtype::F16 => weights.rounded_f16(),
    };
    stored.config = config;
    stored
}

/// A checkpoint written to a temporary directory, with its host weights.
pub struct Checkpoint {
    pub dir: tempfile::TempDir,
    pub weights: Weights,
}

impl Checkpoint {
    /// Random weights for `config` from `seed`, written in `format`.
    pub fn write(config: &ModelConfig, seed: u64, format: Format) -> Checkpoint {
        let dir = tempfile::tempdir().unwrap();
        let weights = write_model_dir(dir.path(), &random_weights(config, seed), format);
        Checkpoint { dir, weights }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.json")
    }

    /// Parses the written `config.json` and loads the model in f32 on the CPU.
    pub fn load(&self) -> Model<B> {
        let config = ModelConfig::from_file(&self.config_path()).expect("config parses");
        troupe_engine::load_model::<B>(self.path(), &config, WeightDtype::F32, &Default::default())
            .expect("model loads")
    }
}

/// Runs one step of `tokens` for `seq` asking for every row, commits all tokens, returns the rows.
pub fn step_all(engine: &mut Engine<B>, seq: SeqId, tokens: &[u32]) -> Vec<Vec<f32>> {
    step_rows(engine, seq, tokens, tokens.len())
}

/// Runs one step asking for the last `rows` logits rows, commits all tokens.
pub fn step_rows(engine: &mut Engine<B>, seq: SeqId, tokens: &[u32], rows: usize) -> Vec<Vec<f32>> {
    let out = engine
        .step(&[StepItem {
            seq,
            tokens: tokens.to_vec(),
            logit_rows: rows,
        }])
        .expect("step");
    engine.resolve(seq, tokens.len()).expect("resolve");
    logits_to_host(out.logits.expect("asked for logits")).expect("logits to host")
}

/// Largest absolute difference between two equally long rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "row lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts that two sets of rows agree within `tol` (max abs), naming the first bad row.
#[track_caller]
pub fn assert_rows_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: row counts differ");
    eprintln!(
        "{what}: max abs diff {} over {} rows",
        max_rows_diff(got, want),
        got.len()
    );
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= tol, "{what}: row {r} differs by {d} (tolerance {tol})");
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{what}: row {r} has non-finite logits"
        );
    }
}

/// Largest difference over all rows.
pub fn max_rows_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// `n` pseudo-random tokens below `vocab`.
pub fn random_tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Index of the largest value, first on ties.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A verify work item (the one place tests build `VerifyWork`).
pub fn work(
    seq: SeqId,
    fed: Vec<u32>,
    draft: Vec<u32>,
    draft_probs: Option<Vec<Vec<f32>>>,
    sample: bool,
    params: troupe_engine::SamplingParams,
) -> troupe_engine::VerifyWork {
    troupe_engine::VerifyWork {
        seq,
        fed,
        draft,
        draft_probs,
        sample,
        params,
        stop: Vec::new(),
    }
}

/// Greedy verify work without drafts.
pub fn greedy_work(seq: SeqId, fed: Vec<u32>) -> troupe_engine::VerifyWork {
    work(
        seq,
        fed,
        vec![],
        None,
        true,
        troupe_engine::SamplingParams::greedy(),
    )
}

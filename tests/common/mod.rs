//! Shared by the runtime's integration tests: a tiny real model in Hugging Face layout, and helpers
//! to run a prompt alone as the reference for what the runtime must produce.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use troupe::engine::device::CpuBackend;
use troupe::engine::tokenizer::byte_level_tokenizer_json;
use troupe::engine::{
    generate, load_model_drafter, load_verifier, random_model, save_pretrained, DeviceKind,
    Drafter, EngineError, GenerateOptions, ModelConfig, ModelSource, NgramDrafter, Verifier,
    WindowSpec,
};

/// A tiny Qwen3-shaped model with random weights, saved in HF layout under a temp dir.
pub fn tiny_model(seed: u64, layers: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ModelConfig::preset("tiny").expect("preset");
    config.num_layers = layers;
    let device = Default::default();
    let model = random_model::<CpuBackend>(&config, burn::tensor::DType::F32, seed, &device);
    save_pretrained(
        &model,
        dir.path(),
        false,
        Some(&byte_level_tokenizer_json()),
    )
    .expect("save");
    dir
}

/// A factory that loads the verifier from `dir` (again after each failure).
pub fn verifier_factory(
    dir: &Path,
) -> impl Fn() -> Result<Box<dyn Verifier>, EngineError> + Send + Sync + 'static {
    let dir: PathBuf = dir.into();
    move || load_verifier(&ModelSource::Dir(&dir), DeviceKind::Cpu, None)
}

/// A factory of prompt-lookup drafters.
pub fn ngram_factory() -> impl Fn() -> Result<NgramDrafter, EngineError> + Send + Sync + 'static {
    || Ok(NgramDrafter::default())
}

/// A factory of draft models loaded from `dir`. Given the verifier's own weights, its greedy
/// drafts are nearly always accepted, so speculation surely happens.
pub fn model_drafter_factory(
    dir: &Path,
) -> impl Fn() -> Result<Box<dyn Drafter>, EngineError> + Send + Sync + 'static {
    let dir: PathBuf = dir.into();
    move || load_model_drafter(&ModelSource::Dir(&dir), DeviceKind::Cpu, None)
}

/// Plain greedy decoding of `prompt` alone: the reference every runtime output must equal.
pub fn run_alone(
    dir: &Path,
    prompt: &[u32],
    max_new_tokens: usize,
    window: WindowSpec,
) -> Vec<u32> {
    let mut v = load_verifier(&ModelSource::Dir(dir), DeviceKind::Cpu, None).expect("load");
    let opts = GenerateOptions {
        max_new_tokens,
        draft_len: 0,
        window,
        ..Default::default()
    };
    generate(v.as_mut(), None, prompt, &opts)
        .expect("generate")
        .tokens
}

/// Prompts of varied lengths that repeat themselves, so prompt lookup has something to find.
pub fn repetitive_prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let period = 3 + i % 7;
            let len = 12 + (i * 5) % 29;
            (0..len)
                .map(|j| (32 + (i * 13 + j % period * 7) % 90) as u32)
                .collect()
        })
        .collect()
}

//! The engine on wgpu (in CI through Mesa's lavapipe): a batched run through the CubeCL kernels
//! (projections, pooled sink-window attention) computes the logits the reference ops compute.
#![cfg(feature = "wgpu")]

mod common;

use common::*;
use troupe_engine::device::WgpuBackend;
use troupe_engine::engine::{logits_to_host, StepItem};
use troupe_engine::{load_model, Engine, ModelConfig, Verifier, WeightDtype, WindowSpec};

/// f32 kernels and Burn's ops differ only in the order of their sums.
const TOL: f32 = 1e-3;

/// Logits of every row of a scripted run: three sessions whose prompts overflow a window of
/// 2 sinks + 6, then decode steps, a verify step of which only the first token is kept (the
/// rest rolls back), and more decode steps, all batched.
fn scripted_run(engine: &mut Engine<WgpuBackend>, vocab: usize) -> Vec<Vec<f32>> {
    let spec = WindowSpec::new(2, 6).unwrap();
    let prompts: Vec<Vec<u32>> = [3usize, 11, 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| random_tokens(40 + i as u64, n, vocab))
        .collect();
    for s in 0..prompts.len() as u64 {
        engine.open(s, spec, 0).unwrap();
    }
    let mut rows = Vec::new();
    let mut step = |engine: &mut Engine<WgpuBackend>, tokens: Vec<Vec<u32>>, keep: usize| {
        let items: Vec<StepItem> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| StepItem {
                seq: s as u64,
                tokens: t.clone(),
                logit_rows: t.len(),
            })
            .collect();
        let out = engine.step(&items).unwrap();
        rows.extend(logits_to_host(out.logits.unwrap()).unwrap());
        for (s, t) in tokens.iter().enumerate() {
            engine.resolve(s as u64, keep.min(t.len())).unwrap();
        }
    };
    step(engine, prompts, usize::MAX);
    for round in 0..7u64 {
        let n = if round == 3 { 3 } else { 1 };
        let keep = if round == 3 { 1 } else { n };
        let tokens = (0..3)
            .map(|s| random_tokens(90 + 7 * round + s, n, vocab))
            .collect();
        step(engine, tokens, keep);
    }
    rows
}

#[test]
fn kernels_compute_the_reference_logits() {
    let config: ModelConfig = qwen3_config();
    let ck = Checkpoint::write(&config, 5, Format::F32);
    let device = Default::default();
    let model = load_model::<WgpuBackend>(ck.path(), &config, WeightDtype::F32, &device).unwrap();

    troupe_kernels::set_enabled(true);
    let kernels = scripted_run(&mut Engine::new(model.clone()), config.vocab_size);
    troupe_kernels::set_enabled(false);
    let reference = scripted_run(&mut Engine::new(model), config.vocab_size);
    troupe_kernels::set_enabled(true);

    assert_eq!(kernels.len(), 34 + 3 * 6 + 3 * 3);
    assert_rows_close("kernels vs reference", &kernels, &reference, TOL);
}

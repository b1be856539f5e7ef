//! The engine on wgpu (in CI through Mesa's lavapipe): a batched run through the CubeCL kernels
//! (projections, pooled sink-window attention) computes the logits the reference ops compute.
#![cfg(feature = "wgpu")]

mod common;

use common::scripted::scripted_run;
use common::*;
use troupe_engine::device::WgpuBackend;
use troupe_engine::{load_model, Engine, ModelConfig, WeightDtype};

/// f32 kernels and Burn's ops differ only in the order of their sums.
const TOL: f32 = 1e-3;

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
    // The CPU engine, itself held to the host reference forward by the window tests.
    let cpu = scripted_run(&mut Engine::new(ck.load()), config.vocab_size);

    // Prompts, two rounds of four, three prompts and three decodes, decodes, a verify of three
    // rows each, two more rounds of decodes.
    assert_eq!(kernels.len(), 43 + 2 * 4 + (22 + 3) + 6 + 6 * 3 + 2 * 6);
    assert_rows_close("kernels vs reference", &kernels, &reference, TOL);
    assert_rows_close("kernels vs the CPU engine", &kernels, &cpu, TOL);
}

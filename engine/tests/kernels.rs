//! The engine on the CPU: a batched run through Flex's kernels (the weight-streaming projections,
//! pooled sink-window attention on the pool in place) computes the logits the reference ops
//! compute. Its own test binary, because it flips the process-wide kernel switch.

mod common;

use common::scripted::scripted_run;
use common::*;
use troupe_engine::Engine;

/// f32 kernels and Burn's ops differ only in the order of their sums.
const TOL: f32 = 1e-4;

#[test]
fn kernels_compute_the_reference_logits() {
    let config = qwen3_config();
    let ck = Checkpoint::write(&config, 5, Format::F32);
    troupe_kernels::set_enabled(true);
    let kernels = scripted_run(&mut Engine::new(ck.load()), config.vocab_size);
    troupe_kernels::set_enabled(false);
    let reference = scripted_run(&mut Engine::new(ck.load()), config.vocab_size);
    troupe_kernels::set_enabled(true);
    assert_eq!(kernels.len(), 43 + 2 * 4 + (22 + 3) + 6 + 6 * 3 + 2 * 6);
    let diff = max_rows_diff(&kernels, &reference);
    assert!(
        diff > 0.0,
        "the two paths ran different code, so their sums differ somewhere"
    );
    assert_rows_close("kernels vs reference", &kernels, &reference, TOL);
}

//! The CubeCL kernels on wgpu (in CI through Mesa's lavapipe, Vulkan on the CPU) against their
//! references, on the fused backend the engine uses and on the plain cube backend beneath it.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use burn::backend::Wgpu;
use burn::tensor::DType;

/// The cube backend without fusion.
type Plain = CubeBackend<WgpuRuntime, f32, i32, u32>;

#[test]
fn linear_matches_reference() {
    common::linear_matches_reference::<Wgpu>(&Default::default(), DType::F32, 1e-5);
    common::linear_matches_reference::<Plain>(&Default::default(), DType::F32, 1e-5);
}

#[test]
fn swiglu_matches_reference() {
    common::swiglu_matches_reference::<Wgpu>(&Default::default(), DType::F32, 1e-5);
    common::swiglu_matches_reference::<Plain>(&Default::default(), DType::F32, 1e-5);
}

#[test]
fn greedy_accept_matches_host() {
    common::greedy_accept_matches_host::<Wgpu>(&Default::default());
    common::greedy_accept_matches_host::<Plain>(&Default::default());
}

#[test]
fn pooled_attention_matches_host() {
    common::pooled_attention_matches_host::<Wgpu>(&Default::default(), 1e-5);
    common::pooled_attention_matches_host::<Plain>(&Default::default(), 1e-5);
}

#[test]
fn sampled_accept_matches_host() {
    common::sampled::sampled_accept_matches_host::<Wgpu>(&Default::default());
}

#[test]
fn draft_outside_the_nucleus_is_rejected() {
    common::sampled::draft_outside_the_nucleus_is_rejected::<Wgpu>(&Default::default());
    common::sampled::draft_outside_the_nucleus_is_rejected::<Plain>(&Default::default());
}

//! The CPU kernels (Flex) against their references.
#![cfg(feature = "cpu")]

mod common;

use burn::backend::Flex;
use burn::tensor::DType;

#[test]
fn linear_matches_reference() {
    common::linear_matches_reference::<Flex>(&Default::default(), DType::F32, 1e-5);
}

#[test]
fn swiglu_matches_reference() {
    common::swiglu_matches_reference::<Flex>(&Default::default(), DType::F32, 1e-5);
}

#[test]
fn bf16_weights_fall_back_to_the_reference() {
    common::linear_matches_reference::<Flex>(&Default::default(), DType::BF16, 1e-2);
}

#[test]
fn int8_weights_match_the_reference_on_their_dequantized_values() {
    common::int8_matches_reference::<Flex>(&Default::default(), 1e-5);
}

#[test]
fn greedy_accept_matches_host() {
    common::greedy_accept_matches_host::<Flex>(&Default::default());
}

#[test]
fn pooled_attention_matches_host() {
    common::pooled_attention_matches_host::<Flex>(&Default::default(), 1e-5);
}

#[test]
fn sampled_accept_matches_host() {
    common::sampled::sampled_accept_matches_host::<Flex>(&Default::default());
}

#[test]
fn draft_outside_the_nucleus_is_rejected() {
    common::sampled::draft_outside_the_nucleus_is_rejected::<Flex>(&Default::default());
}

//! Training: the causal forward that training uses agrees with the windowed serving path, and a few
//! AdamW steps on a tiny corpus lower the loss.

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use troupe_engine::engine::logits_to_host;
use troupe_engine::train::{
    bits_per_byte, inner_model, train_step, trainable, AdamW, Corpus, TrainConfig,
};
use troupe_engine::{random_model, Engine, ModelConfig, StepItem, Verifier, WindowSpec};

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

#[test]
fn the_causal_forward_matches_the_windowed_step() {
    let device = Default::default();
    let model = random_model::<Flex>(&tiny(), burn::tensor::DType::F32, 3, &device);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 251) as u32).collect();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let causal = model.forward_causal(Tensor::from_data(TensorData::new(ids, [1, 20]), &device));
    let causal = causal
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap();
    let mut engine = Engine::new(model);
    engine.open(1, WindowSpec::new(4, 64).unwrap(), 0).unwrap();
    let step = engine
        .step(&[StepItem {
            seq: 1,
            tokens,
            logit_rows: 20,
        }])
        .unwrap();
    let rows = logits_to_host(step.logits.unwrap()).unwrap();
    let flat: Vec<f32> = rows.concat();
    let max = causal
        .iter()
        .zip(&flat)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max < 1e-3, "causal and windowed logits differ by {max}");
}

#[test]
fn a_few_adamw_steps_lower_the_loss_and_survive_the_round_trip() {
    let device = Default::default();
    let text = "fn main() { println!(\"hello, troupe\"); }\n".repeat(200);
    let corpus = Corpus::split(text.into_bytes(), 0.1);
    let cfg = TrainConfig {
        seq_len: 32,
        batch: 4,
        steps: 40,
        lr: 1e-2,
        warmup: 5,
        ..Default::default()
    };
    let model = random_model::<Autodiff<Flex>>(&tiny(), burn::tensor::DType::F32, 1, &device);
    let mut model = trainable::<Autodiff<Flex>>(&inner_model(&model), &device);
    let before = bits_per_byte(&inner_model(&model), &corpus.val, &cfg, 2).unwrap();
    let mut opt = AdamW::new(&model);
    let mut rng = StdRng::seed_from_u64(0);
    for _ in 0..cfg.steps {
        model = train_step(&model, &mut opt, &corpus, &cfg, &mut rng)
            .unwrap()
            .0;
    }
    let inner = inner_model(&model);
    let after = bits_per_byte(&inner, &corpus.val, &cfg, 2).unwrap();
    assert!(
        after < before * 0.6,
        "validation {before:.3} -> {after:.3} bits/byte"
    );
    assert_eq!(opt.t, cfg.steps);
    // Back to trainable and out again: the same weights.
    let again = bits_per_byte(
        &inner_model(&trainable::<Autodiff<Flex>>(&inner, &device)),
        &corpus.val,
        &cfg,
        2,
    )
    .unwrap();
    assert!((again - after).abs() < 1e-6);
}

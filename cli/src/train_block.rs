//! `troupe train --preset block-drafter`: the verifier continues corpus prompts greedily and
//! reports the states of the layers the drafter taps; the drafter is trained on them, validated
//! on held-out prompts by the acceptance a greedy verifier would give it, and saved in the
//! Hugging Face layout.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::{Autodiff, Flex};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use troupe::engine::block::train::{
    corpus_prompts, default_taps, generate_samples, validate, BlockTrainConfig, BlockTrainer,
    Samples, Validation,
};
use troupe::engine::block::{drafter_from_verifier, save_block_drafter};
use troupe::engine::{load_model, Corpus, Engine, ModelConfig, Tokenizer, WeightDtype};

use crate::train::TrainArgs;

type Train = Autodiff<Flex>;

/// What the run did, saved beside the drafter as `training.json`.
#[derive(Debug, Serialize)]
struct Report {
    config: BlockTrainConfig,
    generate_seconds: f64,
    train_seconds: f64,
    /// (step, smoothed training loss, validation).
    history: Vec<(usize, f64, Validation)>,
}

fn bar(len: usize, template: &str) -> Result<ProgressBar> {
    let b = ProgressBar::new(len as u64);
    b.set_style(ProgressStyle::with_template(template)?);
    Ok(b)
}

fn say(bar: &ProgressBar, line: String) {
    // A hidden bar prints nothing, so without a terminal the line goes to stderr.
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn describe(v: &Validation) -> String {
    let parts: Vec<String> = v
        .by_draft_len
        .iter()
        .map(|(k, mean, at_least)| {
            let first: Vec<String> = at_least.iter().take(4).map(|p| format!("{p:.2}")).collect();
            format!("k={k}: {mean:.2} ({})", first.join(" "))
        })
        .collect();
    format!("accepted per block {}", parts.join("; "))
}

/// Runs `troupe train --preset block-drafter`.
pub fn run(a: TrainArgs) -> Result<()> {
    let device = Default::default();
    let config = ModelConfig::from_file(&a.verifier.join("config.json"))
        .with_context(|| format!("reading the verifier in {}", a.verifier.display()))?;
    let verifier = load_model::<Flex>(&a.verifier, &config, WeightDtype::F32, &device)?;
    let tokenizer_path = a.verifier.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let tokenizer_json = std::fs::read_to_string(&tokenizer_path)?;
    let cfg = BlockTrainConfig {
        layers: a.layers,
        taps: default_taps(config.num_layers),
        block_size: a.block_size,
        sequences: a.sequences,
        steps: a.steps.unwrap_or(1200),
        batch: a.batch.unwrap_or(8),
        lr: a.lr.unwrap_or(2e-3),
        seed: a.seed,
        ..Default::default()
    };
    let corpus = Corpus::from_file(&a.corpus, 0.05)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let train_ids = tokenizer.encode(&text(&corpus.train))?;
    let val_ids = tokenizer.encode(&text(&corpus.val))?;
    let newline = tokenizer.encode("\n")?.first().copied();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let prompts = corpus_prompts(&train_ids, newline, cfg.sequences, cfg.prompt_len, &mut rng)?;
    let val_prompts = corpus_prompts(
        &val_ids,
        newline,
        cfg.val_sequences,
        cfg.prompt_len,
        &mut rng,
    )?;

    eprintln!(
        "generating {} + {} sequences of {} + {} tokens with {} (taps {:?})",
        prompts.len(),
        val_prompts.len(),
        cfg.prompt_len,
        cfg.gen_len,
        a.verifier.display(),
        cfg.taps
    );
    let started = Instant::now();
    let mut engine = Engine::new(verifier.clone());
    let gen_bar = bar(
        prompts.len() + val_prompts.len(),
        "{bar:40} {pos}/{len} sequences [{elapsed} < {eta}]",
    )?;
    let mut generate = |prompts: &[Vec<u32>], offset: usize| -> Result<Samples> {
        Ok(generate_samples(
            &mut engine,
            &cfg.taps,
            prompts,
            cfg.gen_len,
            64,
            |done| gen_bar.set_position((offset + done) as u64),
        )?)
    };
    let data = generate(&prompts, 0)?;
    let val = generate(&val_prompts, prompts.len())?;
    gen_bar.finish_and_clear();
    let generate_seconds = started.elapsed().as_secs_f64();
    eprintln!("generated in {generate_seconds:.0} s");

    let initial = drafter_from_verifier(&verifier, cfg.taps.clone(), cfg.layers, cfg.block_size)?;
    let mut trainer = BlockTrainer::<Train>::new(&initial, cfg.clone());
    let mut report = Report {
        config: cfg.clone(),
        generate_seconds,
        train_seconds: 0.0,
        history: Vec::new(),
    };
    let before = validate(&initial, &val, 8, 8)?;
    eprintln!("before training: {}", describe(&before));
    report.history.push((0, f64::NAN, before));

    let train_bar = bar(cfg.steps, "{bar:40} {pos}/{len} [{elapsed} < {eta}] {msg}")?;
    let started = Instant::now();
    let mut ema: Option<f64> = None;
    while trainer.steps() < cfg.steps {
        let loss = trainer.step(&data, &mut rng)?;
        let e = ema.map_or(loss, |e| 0.95 * e + 0.05 * loss);
        ema = Some(e);
        train_bar.set_message(format!("loss {e:.3}"));
        train_bar.inc(1);
        let step = trainer.steps();
        if train_bar.is_hidden() && step.is_multiple_of(20) {
            eprintln!(
                "step {step:>5}: loss {e:.3}, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if step.is_multiple_of(a.every.max(1)) || step == cfg.steps {
            let inner = trainer.inner();
            let v = validate(&inner, &val, 8, 8)?;
            say(
                &train_bar,
                format!("step {step:>5}: loss {e:.3}; {}", describe(&v)),
            );
            report.history.push((step, e, v));
            report.train_seconds = started.elapsed().as_secs_f64();
            save_block_drafter(&inner, &a.out, Some(&tokenizer_json))?;
            std::fs::write(
                a.out.join("training.json"),
                serde_json::to_string_pretty(&report)?,
            )?;
        }
    }
    train_bar.finish();
    eprintln!(
        "done: {} steps in {:.0} s (data {:.0} s); drafter in {}",
        cfg.steps,
        report.train_seconds,
        report.generate_seconds,
        a.out.display()
    );
    Ok(())
}

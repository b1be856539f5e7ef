//! `troupe train`: trains the project's byte-level demo models on the shipped corpus, with a
//! progress bar, periodic validation, and checkpoints that resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use troupe::engine::tokenizer::byte_level_tokenizer_json;
use troupe::engine::train::{
    bits_per_byte, inner_model, train_step, trainable, AdamW, Corpus, TrainConfig,
};
use troupe::engine::{
    load_model, random_model, save_pretrained, Architecture, ModelConfig, RopeScaling, WeightDtype,
};

type Train = Autodiff<Flex>;

/// Arguments of `troupe train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Which demo model: `verifier` (about 2.3 M parameters), `drafter` (about 0.1 M), or
    /// `block-drafter` (a block drafter for the verifier in `--verifier`, trained on its own
    /// greedy continuations).
    #[arg(long, default_value = "verifier")]
    pub(crate) preset: String,
    /// The verifier a block drafter is trained for.
    #[arg(long, default_value = "models/verifier")]
    pub(crate) verifier: PathBuf,
    /// A block drafter's decoder layers.
    #[arg(long, default_value_t = 2)]
    pub(crate) layers: usize,
    /// A block drafter's block size: the anchor and up to one less drafts.
    #[arg(long, default_value_t = 17)]
    pub(crate) block_size: usize,
    /// Sequences the verifier generates to train a block drafter on.
    #[arg(long, default_value_t = 768)]
    pub(crate) sequences: usize,
    /// Text corpus; its last 5% is held out for validation.
    #[arg(long, default_value = "corpus/rust-docs.txt")]
    pub(crate) corpus: PathBuf,
    /// Where the model is written (Hugging Face layout).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Where optimizer state for resuming is kept.
    #[arg(long, default_value = "target/train-state")]
    state_dir: PathBuf,
    /// Total optimizer steps [default: 1400; a block drafter 1200].
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Sequences per step [default: 16; a block drafter 8].
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Bytes per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate [default: 3e-3; a block drafter 2e-3].
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Validate and checkpoint every this many steps.
    #[arg(long, default_value_t = 100)]
    pub(crate) every: usize,
    /// Continue from the checkpoint in --out and --state-dir.
    #[arg(long)]
    resume: bool,
    /// Seed of initialisation and batches.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

/// What a run has done, saved beside the optimizer state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    seconds: f64,
    history: Vec<(usize, f64, f64)>,
}

/// The shape of a demo model.
pub fn demo_config(preset: &str) -> Result<ModelConfig> {
    let base = |hidden, inter, layers, heads, kv, head_dim| ModelConfig {
        architecture: Architecture::Qwen3,
        vocab_size: 256,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: 4096,
        bos_token_id: None,
        eos_token_id: None,
        torch_dtype: "bfloat16".into(),
    };
    match preset {
        "verifier" => Ok(base(192, 768, 4, 4, 2, 48)),
        "drafter" => Ok(base(64, 192, 2, 2, 1, 32)),
        other => anyhow::bail!("unknown preset {other:?}; use verifier, drafter or block-drafter"),
    }
}

fn save_state(dir: &Path, opt: &AdamW<Train>, st: &TrainerState) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let [m, v] = opt.moments();
    let flat = |ts: &[Tensor<Flex, 2>]| -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        ts.iter()
            .map(|t| {
                let dims = t.dims().to_vec();
                let data = t
                    .to_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                Ok((dims, data))
            })
            .collect()
    };
    let blob = serde_json::json!({ "t": opt.t, "m": flat(m)?, "v": flat(v)? });
    std::fs::write(dir.join("optimizer.json"), serde_json::to_vec(&blob)?)?;
    std::fs::write(
        dir.join("trainer_state.json"),
        serde_json::to_string_pretty(st)?,
    )?;
    Ok(())
}

fn load_state(dir: &Path, opt: &mut AdamW<Train>) -> Result<TrainerState> {
    let st: TrainerState = serde_json::from_slice(
        &std::fs::read(dir.join("trainer_state.json")).context("no trainer state to resume")?,
    )?;
    let blob: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("optimizer.json"))?)?;
    let device = Default::default();
    let read = |key: &str| -> Result<Vec<Tensor<Flex, 2>>> {
        let list: Vec<(Vec<usize>, Vec<f32>)> = serde_json::from_value(blob[key].clone())?;
        Ok(list
            .into_iter()
            .map(|(d, v)| Tensor::from_data(TensorData::new(v, [d[0], d[1]]), &device))
            .collect())
    };
    let t = blob["t"].as_u64().unwrap_or(0) as usize;
    opt.restore(read("m")?, read("v")?, t)?;
    Ok(st)
}

/// Runs `troupe train`.
pub fn run(a: TrainArgs) -> Result<()> {
    if a.preset == "block-drafter" {
        return crate::train_block::run(a);
    }
    let config = demo_config(&a.preset)?;
    let steps = a.steps.unwrap_or(1400);
    let corpus = Corpus::from_file(&a.corpus, 0.05)?;
    let cfg = TrainConfig {
        seq_len: a.seq_len,
        batch: a.batch.unwrap_or(16),
        steps,
        lr: a.lr.unwrap_or(3e-3),
        seed: a.seed,
        ..Default::default()
    };
    let device = Default::default();
    let state_dir = a.state_dir.join(&a.preset);
    let (mut model, mut opt, mut st) = if a.resume {
        let inner = load_model::<Flex>(&a.out, &config, WeightDtype::F32, &device)?;
        let model = trainable::<Train>(&inner, &device);
        let mut opt = AdamW::new(&model);
        let st = load_state(&state_dir, &mut opt)?;
        (model, opt, st)
    } else {
        let model = random_model::<Train>(&config, burn::tensor::DType::F32, a.seed, &device);
        let model = trainable::<Train>(&inner_model(&model), &device);
        let opt = AdamW::new(&model);
        (model, opt, TrainerState::default())
    };
    eprintln!(
        "training {} ({} parameters) on {} bytes, validating on {}",
        a.preset,
        config.num_parameters(),
        corpus.train.len(),
        corpus.val.len()
    );
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} [{elapsed} < {eta}] {msg}",
    )?);
    bar.set_position(st.step as u64);
    let mut rng = StdRng::seed_from_u64(a.seed ^ st.step as u64);
    let start = Instant::now();
    let seconds_before = st.seconds;
    let mut ema = None;
    while st.step < steps {
        let (next, loss) = train_step(&model, &mut opt, &corpus, &cfg, &mut rng)?;
        model = next;
        st.step += 1;
        let e = ema.map_or(loss, |e: f64| 0.95 * e + 0.05 * loss);
        ema = Some(e);
        bar.set_message(format!(
            "loss {:.3} ({:.2} bits/byte)",
            e,
            e / std::f64::consts::LN_2
        ));
        bar.inc(1);
        if bar.is_hidden() && st.step % 10 == 0 {
            eprintln!(
                "step {:>5}: loss {:.3} bits/byte, {:.1} s",
                st.step,
                e / std::f64::consts::LN_2,
                start.elapsed().as_secs_f64()
            );
        }
        if st.step % a.every == 0 || st.step == steps {
            let inner = inner_model(&model);
            let bpb = bits_per_byte(&inner, &corpus.val, &cfg, cfg.eval_batches)?;
            st.seconds = seconds_before + start.elapsed().as_secs_f64();
            st.history.push((st.step, e / std::f64::consts::LN_2, bpb));
            let line = format!(
                "step {:>5}: train {:.3} bits/byte, validation {:.3} bits/byte",
                st.step,
                e / std::f64::consts::LN_2,
                bpb
            );
            // A hidden bar prints nothing, so without a terminal the line goes to stderr.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
            save_pretrained(&inner, &a.out, true, Some(&byte_level_tokenizer_json()))?;
            save_state(&state_dir, &opt, &st)?;
        }
    }
    bar.finish();
    let last = st.history.last().map(|h| h.2).unwrap_or(f64::NAN);
    eprintln!(
        "done: {} steps in {:.0} s, validation {:.3} bits/byte; model in {}",
        st.step,
        st.seconds,
        last,
        a.out.display()
    );
    Ok(())
}

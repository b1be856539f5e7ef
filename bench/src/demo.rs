//! What the cases on the shipped demo models share: the models and their factories, prompts cut
//! from the corpus's held-out tail, and one session decoding a list of prompts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::Result;
use troupe::actors::{DrafterFactory, VerifierFactory};
use troupe::engine::Corpus;
use troupe::engine::{
    load_block_drafter, load_model_drafter, load_verifier, DeviceKind, Drafter, ModelConfig,
    ModelSource, NgramDrafter, Tokenizer, WeightDtype,
};
use troupe::{FaultPlan, GenerateParams, Runtime, RuntimeBuilder, SchedulerConfig, SessionConfig};

/// Fraction of the corpus held out from training (as `troupe train` does).
pub const HELD_OUT: f64 = 0.05;

/// The shipped demo models and the corpus they were trained on.
#[derive(Debug, Clone)]
pub struct DemoModels {
    /// Verifier directory (Hugging Face layout).
    pub verifier: PathBuf,
    /// Draft model directory.
    pub drafter: PathBuf,
    /// Block drafter directory.
    pub block_drafter: PathBuf,
    /// The training corpus; prompts come from its held-out tail.
    pub corpus: PathBuf,
    /// The width the verifier's weights are kept in; `None`: the checkpoint's own.
    pub weights: Option<WeightDtype>,
}

impl Default for DemoModels {
    fn default() -> Self {
        Self {
            verifier: "models/verifier".into(),
            drafter: "models/drafter".into(),
            block_drafter: "models/block-drafter".into(),
            corpus: "corpus/rust-docs.txt".into(),
            weights: None,
        }
    }
}

/// A drafter a case can run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrafterKind {
    /// Prompt-lookup n-grams.
    Ngram,
    /// The shipped draft model.
    Model,
    /// The shipped block drafter.
    Block,
}

impl DrafterKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            DrafterKind::Ngram => "ngram",
            DrafterKind::Model => "model",
            DrafterKind::Block => "block",
        }
    }
}

impl DemoModels {
    /// Loads the verifier from its directory on `device`, again after each failure.
    pub fn verifier_factory(&self, device: DeviceKind) -> Result<VerifierFactory> {
        let (dir, weights) = (self.verifier.clone(), self.weights);
        check_dir(&dir)?;
        Ok(Arc::new(move || {
            load_verifier(&ModelSource::Dir(&dir), device, weights)
        }))
    }

    /// A factory of `kind` drafters on `device`.
    pub fn drafter_factory(&self, kind: DrafterKind, device: DeviceKind) -> Result<DrafterFactory> {
        Ok(match kind {
            DrafterKind::Ngram => {
                Arc::new(|| Ok(Box::new(NgramDrafter::default()) as Box<dyn Drafter>))
            }
            DrafterKind::Model => {
                let dir = self.drafter.clone();
                check_dir(&dir)?;
                Arc::new(move || load_model_drafter(&ModelSource::Dir(&dir), device, None))
            }
            DrafterKind::Block => {
                let dir = self.block_drafter.clone();
                check_dir(&dir)?;
                Arc::new(move || load_block_drafter(&dir, device))
            }
        })
    }

    /// `n` prompts of `len` tokens from the corpus's held-out tail, each starting at a line,
    /// spread evenly over it.
    pub fn held_out_prompts(&self, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
        let corpus = Corpus::from_file(&self.corpus, HELD_OUT)?;
        let text = String::from_utf8_lossy(&corpus.val).into_owned();
        // A verifier without a tokenizer (random weights of a real shape) reads the corpus
        // through the demo models' byte-level one, whose ids every real vocabulary holds.
        let own = self.verifier.join("tokenizer.json");
        let path = if own.exists() {
            own
        } else {
            DemoModels::default().verifier.join("tokenizer.json")
        };
        let tok = Tokenizer::from_file(&path)?;
        let ids = tok.encode(&text)?;
        let vocab = ModelConfig::from_file(&self.verifier.join("config.json"))?.vocab_size;
        crate::error::ensure!(
            ids.iter().all(|&t| (t as usize) < vocab),
            "{} gives token ids past the vocabulary of {} ({vocab})",
            path.display(),
            self.verifier.display()
        );
        let newline = tok.encode("\n")?;
        crate::error::ensure!(
            ids.len() > len * 2,
            "the held-out corpus has {} tokens, too few for {len}-token prompts",
            ids.len()
        );
        let span = ids.len() - len;
        Ok((0..n)
            .map(|i| {
                let mut at = span * i / n.max(1);
                // Start after the next line break, where one is near.
                if let Some(p) = ids[at..span]
                    .iter()
                    .take(200)
                    .position(|t| newline.contains(t))
                {
                    at += p + 1;
                }
                ids[at..at + len].to_vec()
            })
            .collect())
    }
}

fn check_dir(dir: &Path) -> Result<()> {
    crate::error::ensure!(
        dir.join("config.json").exists(),
        "no model in {} (the demo models ship in models/; `troupe train` makes them)",
        dir.display()
    );
    Ok(())
}

/// One session's decoding of a list of prompts, one fresh session per prompt, one after another.
#[derive(Debug, Clone, Default)]
pub struct StreamRun {
    /// Tokens of each prompt's turn.
    pub outputs: Vec<Vec<u32>>,
    /// Generated tokens.
    pub tokens: usize,
    /// Seconds from the first `generate` to the last token, session spawns excluded.
    pub seconds: f64,
    /// Drafted tokens verified.
    pub drafted: usize,
    /// Of which accepted.
    pub accepted: usize,
    /// Verify steps the turns took part in.
    pub steps: usize,
}

impl StreamRun {
    /// Generated tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    /// Drafted tokens accepted per verify step.
    pub fn accepted_per_step(&self) -> f64 {
        self.accepted as f64 / self.steps.max(1) as f64
    }
}

/// Decodes each prompt in a fresh session of `rt`, one turn at a time.
pub async fn stream(
    rt: &Runtime,
    prompts: &[Vec<u32>],
    params: GenerateParams,
) -> Result<StreamRun> {
    let mut run = StreamRun::default();
    for (i, p) in prompts.iter().enumerate() {
        let s = rt
            .spawn_session(SessionConfig::default().with_seed(i as u64))
            .await?;
        let start = Instant::now();
        let (ids, stats) = s.generate(p.clone(), params.clone())?.collect().await?;
        run.seconds += start.elapsed().as_secs_f64();
        run.tokens += ids.len();
        run.drafted += stats.drafted;
        run.accepted += stats.accepted;
        run.steps += stats.steps;
        run.outputs.push(ids);
        s.close().await?;
    }
    Ok(run)
}

/// One measured configuration: what serves, how it schedules, what is injected.
pub struct Setup {
    /// The drafter, if any.
    pub drafter: Option<DrafterKind>,
    /// The scheduler's policy.
    pub config: SchedulerConfig,
    /// Injected faults and round trips.
    pub faults: FaultPlan,
}

impl Setup {
    /// Plain decoding: no drafter, nothing injected.
    pub fn plain() -> Self {
        Self {
            drafter: None,
            config: SchedulerConfig::default().with_max_draft_len(0),
            faults: FaultPlan::default(),
        }
    }
}

impl DemoModels {
    /// Starts a runtime as `setup` says, decodes `prompts` after one warm-up turn (model loads,
    /// first shapes), and shuts it down.
    pub async fn decode(
        &self,
        device: DeviceKind,
        setup: Setup,
        prompts: &[Vec<u32>],
        params: GenerateParams,
    ) -> Result<StreamRun> {
        let verifier = self.verifier_factory(device)?;
        let mut b = RuntimeBuilder::new(move || verifier())
            .scheduler(setup.config)
            .faults(setup.faults);
        if let Some(kind) = setup.drafter {
            let drafter = self.drafter_factory(kind, device)?;
            b = b.drafter(move || drafter());
        }
        let rt = b.build().await?;
        stream(&rt, &prompts[..1], params.clone()).await?;
        let run = stream(&rt, prompts, params).await;
        rt.shutdown().await?;
        run
    }
}

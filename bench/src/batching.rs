//! The `batching` case: the whole runtime serving a small random model (saved in Hugging Face layout
//! and loaded as a user's model would be). Aggregate throughput, per-token latency and the mean
//! number of sequences per verify step, against the number of concurrent sessions, with and
//! without speculative decoding.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{BenchError, Result};
use futures::future::join_all;
use serde::Serialize;
use serde_json::json;
use troupe::actors::{DrafterFactory, VerifierFactory};
use troupe::engine::{
    load_model_drafter, load_verifier, DeviceKind, ModelConfig, ModelSource, NgramDrafter,
};
use troupe::SchedulerStats;
use troupe::{GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig, WindowSpec};

use crate::plot::{lines, Axes, Series};
use crate::step::bench_model;
use crate::{finish, fmt, markdown, mean, progress, Case, Env};

/// What the `batching` case measures.
#[derive(Debug, Clone)]
pub struct BatchingPlan {
    /// Shape of the served model (random weights).
    pub model: ModelConfig,
    /// Concurrent sessions of each measurement.
    pub sessions: Vec<usize>,
    /// Tokens each session generates in its one turn.
    pub new_tokens: usize,
    /// Tokens of each session's prompt (a repetitive one, so prompt lookup finds drafts).
    pub prompt_len: usize,
    /// Modes to measure: `false` plain, `true` speculative (with the n-gram drafter, or the one
    /// `--drafter` names).
    pub speculative: Vec<bool>,
}

impl BatchingPlan {
    /// The full sweep, or the quick one.
    pub fn new(quick: bool) -> Self {
        Self {
            model: bench_model(),
            sessions: vec![1, 2, 4, 8, 16, 32, 64],
            new_tokens: if quick { 32 } else { 128 },
            prompt_len: 48,
            speculative: vec![false, true],
        }
    }

    /// The sweep for a real shape (`--model`, `--preset`): a 4-token prompt and 16 new tokens
    /// at 1, 8 (and 64) sessions, as llama.cpp's `llama-batched-bench -npp 4 -ntg 16` measures.
    pub fn for_model(quick: bool, model: ModelConfig) -> Self {
        Self {
            model,
            sessions: if quick { vec![1, 8] } else { vec![1, 8, 64] },
            new_tokens: 16,
            prompt_len: 4,
            speculative: vec![false, true],
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BatchRow {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Whether a drafter proposed tokens.
    pub speculative: bool,
    /// Generated tokens of all sessions per second of wall time.
    pub tokens_per_s: f64,
    /// Mean over sessions of turn latency divided by the tokens the turn generated.
    pub mean_token_latency_ms: f64,
    /// Sequences per verify step: the scheduler's `total_step_seqs / steps`.
    pub mean_step_sequences: f64,
    /// Verify steps the measurement took.
    pub steps: u64,
    /// Drafted tokens verified.
    pub drafted: u64,
    /// Of which accepted.
    pub accepted: u64,
}

/// A repetitive prompt, different for each session.
fn prompt(i: usize, len: usize) -> Vec<u32> {
    let period = 3 + i % 7;
    (0..len)
        .map(|j| (32 + (i * 13 + j % period * 7) % 90) as u32)
        .collect()
}

/// Saves the model in Hugging Face layout under `dir` and loads it from there on each (re)start.
#[cfg(feature = "cpu")]
fn verifier_factory(
    model: &ModelConfig,
    device: DeviceKind,
    dir: &Path,
) -> Result<VerifierFactory> {
    use troupe::engine::device::CpuBackend;
    use troupe::engine::tokenizer::byte_level_tokenizer_json;
    let m = troupe::engine::random_model::<CpuBackend>(
        model,
        burn::tensor::DType::F32,
        1,
        &Default::default(),
    );
    troupe::engine::save_pretrained(&m, dir, false, Some(&byte_level_tokenizer_json()))?;
    let dir = dir.to_path_buf();
    Ok(Arc::new(move || {
        load_verifier(&ModelSource::Dir(&dir), device, None)
    }))
}

/// Without the CPU backend there is nothing to save with: random weights on the device.
#[cfg(not(feature = "cpu"))]
fn verifier_factory(
    model: &ModelConfig,
    device: DeviceKind,
    _dir: &Path,
) -> Result<VerifierFactory> {
    let model = model.clone();
    Ok(Arc::new(move || {
        load_verifier(&ModelSource::Random(model.clone(), 1), device, None)
    }))
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &BatchingPlan, env: &Env) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir().map_err(BenchError::TempDir)?;
    let factory = match env.model.dir()? {
        Some(model) => {
            let (device, weights) = (env.device, env.weights);
            let f: VerifierFactory =
                Arc::new(move || load_verifier(&ModelSource::Dir(&model), device, weights));
            f
        }
        None => verifier_factory(&plan.model, env.device, dir.path())?,
    };
    let plan = &BatchingPlan {
        model: env.model.config(&plan.model)?,
        ..plan.clone()
    };
    let turns: usize = plan.sessions.iter().sum::<usize>() * plan.speculative.len();
    let bar = progress(turns as u64, "batching");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    // `--drafter DIR` speculates with that drafter instead of prompt lookup.
    let drafter: Option<(DrafterFactory, String)> = match &env.drafter {
        Some(dir) => {
            let (dir, device) = (dir.clone(), env.device);
            let name = load_model_drafter(&ModelSource::Dir(&dir), device, None)?
                .name()
                .to_owned();
            let f: DrafterFactory =
                Arc::new(move || load_model_drafter(&ModelSource::Dir(&dir), device, None));
            Some((f, name))
        }
        None => None,
    };
    let drafter_name = drafter
        .as_ref()
        .map_or("ngram".to_owned(), |(_, n)| n.clone());
    let rows = rt.block_on(measure(plan, factory, drafter.map(|(f, _)| f), &bar))?;
    bar.finish_and_clear();

    let report = json!({
        "case": "batching",
        "drafter": drafter_name,
        "new_tokens": plan.new_tokens,
        "prompt_len": plan.prompt_len,
        "rows": rows,
    });
    let series: Vec<Series> = plan
        .speculative
        .iter()
        .map(|&spec| {
            let pts = rows.iter().filter(|r| r.speculative == spec);
            let name = if spec {
                format!("speculative ({drafter_name})")
            } else {
                "plain".to_owned()
            };
            (
                name,
                pts.map(|r| (r.sessions as f64, r.tokens_per_s)).collect(),
            )
        })
        .collect();
    let axes = Axes {
        title: "runtime throughput",
        x: "concurrent sessions",
        y: "tokens/s",
        log_x: true,
    };
    lines(&env.out_file(Case::Batching, "svg")?, &axes, &series)?;
    finish(
        env,
        Case::Batching,
        report,
        &table(plan, &rows, &drafter_name),
    )
}

async fn measure(
    plan: &BatchingPlan,
    factory: VerifierFactory,
    drafter: Option<DrafterFactory>,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<BatchRow>> {
    let most = plan.sessions.iter().copied().max().unwrap_or(1);
    let window = WindowSpec::default();
    let c = &plan.model;
    // f32 bytes: an upper bound on any device.
    let drafter_bytes = match &drafter {
        Some(f) => f()?.kv_bytes(window),
        None => 0,
    };
    let per_session = (2 * c.num_layers * c.num_kv_heads * c.head_dim * window.capacity() * 4)
        as u64
        + drafter_bytes;
    let params = GenerateParams::greedy(plan.new_tokens);
    let mut rows = Vec::new();
    for &spec in &plan.speculative {
        let factory = factory.clone();
        let mut builder = RuntimeBuilder::new(move || factory())
            .max_sessions(most + 1)
            .kv_budget_bytes(per_session * (most as u64 + 1))
            .default_window(window)
            .scheduler(SchedulerConfig::default().with_max_step_seqs(most.max(256)));
        match (&drafter, spec) {
            (Some(f), true) => {
                let f = f.clone();
                builder = builder.drafter(move || f());
            }
            (None, true) => builder = builder.drafter(|| Ok(NgramDrafter::default())),
            _ => {}
        }
        let rt = builder.build().await?;
        // Warm the model and the actors up before the first measurement.
        let s = rt.spawn_session(SessionConfig::default()).await?;
        s.generate(prompt(0, plan.prompt_len), params.clone())?
            .collect()
            .await?;
        s.close().await?;
        for &n in &plan.sessions {
            let spawned = join_all(
                (0..n).map(|i| rt.spawn_session(SessionConfig::default().with_seed(i as u64))),
            )
            .await;
            let sessions = spawned.into_iter().collect::<Result<Vec<_>, _>>()?;
            let before = rt.stats().await?;
            let start = Instant::now();
            let params = &params;
            let turns = sessions.iter().enumerate().map(|(i, s)| async move {
                let t = Instant::now();
                let (ids, _) = s
                    .generate(prompt(i, plan.prompt_len), params.clone())?
                    .collect()
                    .await?;
                bar.inc(1);
                Ok::<_, BenchError>(t.elapsed().as_secs_f64() * 1e3 / ids.len().max(1) as f64)
            });
            let per_token = join_all(turns)
                .await
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
            let wall = start.elapsed().as_secs_f64();
            let after = rt.stats().await?;
            for s in &sessions {
                s.close().await?;
            }
            rows.push(row(
                n,
                spec,
                plan.new_tokens,
                wall,
                &per_token,
                &before,
                &after,
            ));
        }
        rt.shutdown().await?;
    }
    Ok(rows)
}

fn row(
    n: usize,
    spec: bool,
    new_tokens: usize,
    wall: f64,
    per_token: &[f64],
    before: &SchedulerStats,
    after: &SchedulerStats,
) -> BatchRow {
    let steps = after.steps - before.steps;
    BatchRow {
        sessions: n,
        speculative: spec,
        tokens_per_s: (n * new_tokens) as f64 / wall.max(1e-9),
        mean_token_latency_ms: mean(per_token),
        mean_step_sequences: (after.total_step_seqs - before.total_step_seqs) as f64
            / steps.max(1) as f64,
        steps,
        drafted: after.drafted - before.drafted,
        accepted: after.accepted - before.accepted,
    }
}

fn table(plan: &BatchingPlan, rows: &[BatchRow], drafter: &str) -> String {
    let find = |n: usize, spec: bool| {
        rows.iter()
            .find(|r| r.sessions == n && r.speculative == spec)
    };
    let body: Vec<Vec<String>> = plan
        .sessions
        .iter()
        .map(|&n| {
            let mut r = vec![n.to_string()];
            for spec in [false, true] {
                match find(n, spec) {
                    Some(x) => r.extend([
                        fmt(x.tokens_per_s),
                        format!("{:.2}", x.mean_token_latency_ms),
                        format!("{:.1}", x.mean_step_sequences),
                        x.steps.to_string(),
                    ]),
                    None => r.extend(["-".into(), "-".into(), "-".into(), "-".into()]),
                }
            }
            let acc = find(n, true).filter(|x| x.drafted > 0);
            r.push(acc.map_or("-".into(), |x| {
                format!("{:.2}", x.accepted as f64 / x.drafted as f64)
            }));
            r
        })
        .collect();
    let headers = [
        "sessions",
        "plain tok/s",
        "plain ms/tok",
        "plain seqs/step",
        "plain steps",
        "spec tok/s",
        "spec ms/tok",
        "spec seqs/step",
        "spec steps",
        "spec acceptance",
    ];
    format!(
        "Runtime, one turn of {} new tokens per session from a {}-token prompt (spec = the {drafter} \
         drafter; ms/tok = turn latency / tokens, mean over sessions):\n\n{}",
        plan.new_tokens,
        plan.prompt_len,
        markdown(&headers, &body)
    )
}

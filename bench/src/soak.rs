//! The `soak` case: N clients on the shipped verifier for M minutes, each opening a session,
//! taking a few turns (some cancelled midway by dropping their stream), closing it and opening
//! another; a twentieth more clients than the session cap, so some are refused admission and try
//! again. Every sample (each minute) records resident memory, live tokio tasks, open sessions and
//! KV bytes reserved; errors are counted by kind. At the end the clients stop, and the tasks and
//! the reserved bytes must be back where they started.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use troupe::{
    Event, GenerateParams, Runtime, RuntimeBuilder, RuntimeError, SchedulerConfig, SessionConfig,
    WindowSpec,
};

use crate::demo::DemoModels;
use crate::error::{BenchError, Result};
use crate::models::rss_bytes;
use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, Case, Env};

/// What the `soak` case runs.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// The served model and the prompts.
    pub models: DemoModels,
    /// How long the clients run.
    pub duration: Duration,
    /// The session cap; clients are a twentieth more.
    pub sessions: usize,
    /// Time between samples.
    pub sample_every: Duration,
    /// Tokens per turn.
    pub new_tokens: usize,
    /// Each session's window.
    pub window: WindowSpec,
}

impl SoakPlan {
    /// 30 minutes at 1,000 sessions, or (quick) one minute at 64, sampled every minute (every 10 s
    /// when quick).
    pub fn new(quick: bool) -> Result<Self> {
        let (minutes, sessions) = if quick { (1.0, 64) } else { (30.0, 1000) };
        Self::with(minutes, sessions)
    }

    /// `minutes` at `sessions`, sampled every minute (every tenth of the run when it is short).
    pub fn with(minutes: f64, sessions: usize) -> Result<Self> {
        if !(minutes > 0.0 && minutes.is_finite()) || sessions == 0 {
            return Err(BenchError::Invalid(format!(
                "a soak needs time and sessions: {minutes} minutes, {sessions} sessions"
            )));
        }
        let duration = Duration::from_secs_f64(minutes * 60.0);
        Ok(Self {
            models: DemoModels::default(),
            duration,
            sessions,
            sample_every: Duration::from_secs(60).min(duration / 10),
            new_tokens: 12,
            window: WindowSpec::new(4, 124).map_err(|e| BenchError::Invalid(e.to_string()))?,
        })
    }
}

/// One sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakSample {
    /// Seconds since the clients started.
    pub at_s: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Live tokio tasks.
    pub tasks: usize,
    /// Open sessions.
    pub sessions: usize,
    /// KV bytes reserved by open sessions.
    pub kv_reserved_bytes: u64,
    /// Turns finished so far.
    pub turns: u64,
}

/// What the clients counted.
#[derive(Default)]
struct Counts {
    turns: AtomicU64,
    cancelled_asked: AtomicU64,
    sessions_opened: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counts {
    fn error(&self, e: &RuntimeError) {
        let kind = format!("{e:?}");
        let kind = kind.split(['(', ' ', '{']).next().unwrap_or("?").to_owned();
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
}

/// Error kinds a soak expects: refusals past the cap and the turns it cancelled itself.
const EXPECTED: &[&str] = &["AdmissionRefused", "Cancelled"];

/// Runs the case; returns the report it wrote.
pub fn run(plan: &SoakPlan, env: &Env) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let report = rt.block_on(soak(plan, env))?;
    let samples: Vec<SoakSample> = serde_json::from_value(report["samples"].clone())
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let series: Vec<Series> = vec![(
        "RSS MB".into(),
        samples
            .iter()
            .map(|s| (s.at_s / 60.0, s.rss_bytes as f64 / 1e6))
            .collect(),
    )];
    let axes = Axes {
        title: "resident memory over a soak",
        x: "minutes",
        y: "MB",
        log_x: false,
    };
    lines(&env.out_file(Case::Soak, "svg")?, &axes, &series)?;
    let table = table(plan, &report, &samples);
    finish(env, Case::Soak, report, &table)
}

async fn sample(rt: &Runtime, start: Instant, counts: &Counts) -> Result<SoakSample> {
    let budget = rt.budget().await?;
    Ok(SoakSample {
        at_s: start.elapsed().as_secs_f64(),
        rss_bytes: rss_bytes(),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        sessions: budget.sessions,
        kv_reserved_bytes: budget.used_bytes,
        turns: counts.turns.load(Ordering::Relaxed),
    })
}

async fn soak(plan: &SoakPlan, env: &Env) -> Result<serde_json::Value> {
    let factory = plan.models.verifier_factory(env.device)?;
    let prompts = Arc::new(plan.models.held_out_prompts(64, 24)?);
    let window_bytes = {
        let probe = factory()?;
        probe.kv_bytes(plan.window)
    };
    let rt = RuntimeBuilder::new(move || factory())
        .default_window(plan.window)
        .max_sessions(plan.sessions)
        .kv_budget_bytes(window_bytes * plan.sessions as u64)
        .scheduler(SchedulerConfig::default().with_max_draft_len(0))
        .build()
        .await?;
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let baseline = sample(&rt, start, &counts).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = plan.sessions + plan.sessions.div_ceil(20);
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (rt, counts, stop, prompts) =
                (rt.clone(), counts.clone(), stop.clone(), prompts.clone());
            let tokens = plan.new_tokens;
            tokio::spawn(async move { client(i, rt, counts, stop, prompts, tokens).await })
        })
        .collect();
    let mut samples = vec![baseline.clone()];
    let deadline = start + plan.duration;
    while Instant::now() < deadline {
        let next = (Instant::now() + plan.sample_every).min(deadline);
        tokio::time::sleep_until(next.into()).await;
        let s = sample(&rt, start, &counts).await?;
        eprintln!(
            "soak {:>6.0} s: RSS {:.1} MB, {} tasks, {} sessions, {} KV bytes, {} turns",
            s.at_s,
            s.rss_bytes as f64 / 1e6,
            s.tasks,
            s.sessions,
            s.kv_reserved_bytes,
            s.turns
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Release);
    for h in handles {
        h.await
            .map_err(|e| BenchError::Task(format!("a soak client: {e}")))?;
    }
    // Let the closes and stream ends settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = sample(&rt, start, &counts).await?;
    let stats = rt.stats().await?;
    rt.shutdown().await?;

    let errors = counts
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let unexpected: u64 = errors
        .iter()
        .filter(|(k, _)| !EXPECTED.contains(&k.as_str()))
        .map(|(_, n)| n)
        .sum();
    // Drift from the first sample a minute (or a tenth of the run) in, to the last one.
    let settled = samples.get(1).unwrap_or(&baseline).rss_bytes as f64;
    let last = samples.last().unwrap_or(&baseline).rss_bytes as f64;
    let drift = (last - settled) / settled.max(1.0);
    Ok(json!({
        "case": "soak",
        "minutes": plan.duration.as_secs_f64() / 60.0,
        "sessions": plan.sessions,
        "clients": clients,
        "new_tokens": plan.new_tokens,
        "window": plan.window.capacity(),
        "samples": samples,
        "baseline": baseline,
        "end": end,
        "rss_drift": drift,
        "turns": counts.turns.load(Ordering::Relaxed),
        "sessions_opened": counts.sessions_opened.load(Ordering::Relaxed),
        "cancels_asked": counts.cancelled_asked.load(Ordering::Relaxed),
        "errors": errors,
        "unexpected_errors": unexpected,
        "tasks_back_to_baseline": end.tasks <= baseline.tasks,
        "kv_back_to_baseline": end.kv_reserved_bytes == baseline.kv_reserved_bytes
            && end.sessions == baseline.sessions,
        "steps": stats.steps,
        "verifier_restarts": stats.verifier_restarts,
    }))
}

/// One client: open, a few turns (a fifth of them cancelled after their first tokens), close;
/// again until told to stop. A refusal waits a moment and tries again.
async fn client(
    i: usize,
    rt: Runtime,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    prompts: Arc<Vec<Vec<u32>>>,
    tokens: usize,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
    while !stop.load(Ordering::Acquire) {
        let session = match rt.spawn_session(SessionConfig::default()).await {
            Ok(s) => s,
            Err(e) => {
                counts.error(&e);
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
                continue;
            }
        };
        counts.sessions_opened.fetch_add(1, Ordering::Relaxed);
        let turns = rng.random_range(1..=4);
        for t in 0..turns {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let prompt = if t == 0 {
                prompts[rng.random_range(0..prompts.len())].clone()
            } else {
                vec![prompts[i % prompts.len()][t % 8]]
            };
            let mut stream = match session.generate(prompt, GenerateParams::greedy(tokens)) {
                Ok(s) => s,
                Err(e) => {
                    counts.error(&e);
                    break;
                }
            };
            let cancel = rng.random_bool(0.2);
            while let Some(ev) = stream.next().await {
                match ev {
                    Event::Tokens { .. } if cancel => {
                        counts.cancelled_asked.fetch_add(1, Ordering::Relaxed);
                        break; // dropping the stream cancels the turn
                    }
                    Event::Done(_) => {
                        counts.turns.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Error(e) => counts.error(&e),
                    _ => {}
                }
            }
        }
        if let Err(e) = session.close().await {
            counts.error(&e);
        }
    }
}

fn table(plan: &SoakPlan, report: &serde_json::Value, samples: &[SoakSample]) -> String {
    let body: Vec<Vec<String>> = samples
        .iter()
        .map(|s| {
            vec![
                fmt(s.at_s / 60.0),
                fmt(s.rss_bytes as f64 / 1e6),
                s.tasks.to_string(),
                s.sessions.to_string(),
                s.kv_reserved_bytes.to_string(),
                s.turns.to_string(),
            ]
        })
        .collect();
    let headers = [
        "minute",
        "RSS MB",
        "tokio tasks",
        "open sessions",
        "KV bytes reserved",
        "turns done",
    ];
    format!(
        "Soak: {} sessions ({} clients), {:.1} minutes on the shipped verifier, {} tokens a turn. \
         RSS drift after the first sample: {:+.2}%. Errors by kind: {}. Unexpected errors: {}. \
         At the end: tasks back to baseline: {}, KV bytes and sessions back to baseline: {}.\n\n{}",
        plan.sessions,
        report["clients"],
        plan.duration.as_secs_f64() / 60.0,
        plan.new_tokens,
        report["rss_drift"].as_f64().unwrap_or(0.0) * 100.0,
        report["errors"],
        report["unexpected_errors"],
        report["tasks_back_to_baseline"],
        report["kv_back_to_baseline"],
        markdown(&headers, &body)
    )
}

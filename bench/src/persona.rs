//! The `persona-stress` case, after the persona substrate's stress test: N personas ×
//! M messages against the scripted model with a 50 ms injected model delay, on the tokio
//! multi-thread runtime. Each persona is a session that sends its messages one after another; all
//! personas run at once. A turn's overhead is its latency beyond 50 ms × the steps it took part in.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use futures::future::join_all;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use troupe::actors::events::quantile;
use troupe::actors::scripted::{ScriptedModel, DEFAULT_SLOT_BYTES};
use troupe::engine::tokenizer::byte_level_tokenizer_json;
use troupe::{
    ActorKind, Event, FaultPlan, GenerateParams, Persona, RuntimeBuilder, SchedulerConfig,
    SessionConfig, Tokenizer, WindowSpec,
};

use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, mean, progress, Case, Env};

/// The seed's measurements: (personas, messages, mean turn ms, max turn ms).
const SEED: &[(usize, usize, f64, f64)] = &[
    (2, 10, 51.6, 53.0),
    (4, 10, 51.6, 53.0),
    (8, 5, 51.5, 61.0),
    (12, 5, 51.7, 61.0),
];

/// What the `persona-stress` case measures.
#[derive(Debug, Clone)]
pub struct PersonaPlan {
    /// (personas, messages per persona) of each measurement.
    pub sizes: Vec<(usize, usize)>,
    /// Tokens generated per message (plain decoding: one verify step each).
    pub new_tokens: usize,
    /// Injected delay of every verify step.
    pub delay: Duration,
}

impl PersonaPlan {
    /// The full sweep (up to 1024 personas), or the quick one (up to 64).
    pub fn new(quick: bool) -> Self {
        let mut sizes = vec![(2, 10), (4, 10), (8, 5), (12, 5), (64, 5)];
        if !quick {
            sizes.extend([(256, 5), (1024, 5)]);
        }
        Self {
            sizes,
            new_tokens: 8,
            delay: Duration::from_millis(50),
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct PersonaRow {
    /// Concurrent personas (sessions).
    pub personas: usize,
    /// Messages (turns) per persona.
    pub messages: usize,
    /// Time to spawn the sessions.
    pub materialize_ms: f64,
    /// From the first message to the last reply.
    pub serve_wall_ms: f64,
    /// Turn latency seen by the caller, from `generate` to the last token.
    pub mean_turn_ms: f64,
    /// 99th percentile turn latency.
    pub p99_turn_ms: f64,
    /// Longest turn.
    pub max_turn_ms: f64,
    /// Mean of (turn latency − delay × the turn's verify steps).
    pub overhead_mean_ms: f64,
    /// 99th percentile of the same.
    pub overhead_p99_ms: f64,
    /// Mean of (first token latency − delay): mostly the wait for a step already in flight when
    /// the turn arrived, which the turn cannot join.
    pub first_token_wait_mean_ms: f64,
    /// Mean of (overhead − that wait): the runtime's own work over the turn's steps.
    pub overhead_after_first_token_mean_ms: f64,
    /// Verify steps per turn, on average.
    pub mean_steps_per_turn: f64,
    /// Mean of turn latency / the turn's steps: comparable to the seed's one model call per turn.
    pub mean_ms_per_step: f64,
    /// Most sequences in one verify step.
    pub max_step_sequences: usize,
    /// The runtime's own time per session per step: the same sessions, one message each, with no
    /// model delay; wall time per step ÷ sessions, in microseconds.
    pub runtime_us_per_session_step: f64,
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &PersonaPlan, env: &Env) -> Result<serde_json::Value> {
    let turns: usize = plan.sizes.iter().map(|(n, m)| n * (m + 1)).sum();
    let bar = progress(turns as u64, "persona-stress");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let mut rows = Vec::new();
    for &(n, m) in &plan.sizes {
        let mut row = rt.block_on(measure(plan, plan.delay, n, m, &bar))?;
        let idle = rt.block_on(measure(plan, Duration::ZERO, n, 1, &bar))?;
        row.runtime_us_per_session_step =
            idle.serve_wall_ms * 1e3 / (idle.steps as f64 * n as f64).max(1.0);
        rows.push(row.row);
    }
    bar.finish_and_clear();
    let report = json!({
        "case": "persona-stress",
        "delay_ms": plan.delay.as_millis() as u64,
        "new_tokens": plan.new_tokens,
        "worker_threads": super::cores(),
        "rows": rows,
    });
    let pts = |f: fn(&PersonaRow) -> f64| rows.iter().map(|r| (r.personas as f64, f(r))).collect();
    let series: Vec<Series> = vec![
        ("mean overhead".into(), pts(|r| r.overhead_mean_ms)),
        ("p99 overhead".into(), pts(|r| r.overhead_p99_ms)),
    ];
    let axes = Axes {
        title: "runtime overhead per turn beyond the injected model time",
        x: "personas",
        y: "ms per turn",
        log_x: true,
    };
    lines(&env.out_file(Case::PersonaStress, "svg")?, &axes, &series)?;
    finish(env, Case::PersonaStress, report, &table(plan, &rows))
}

/// One turn as its caller saw it.
#[derive(Debug, Clone, Copy)]
struct Turn {
    /// From `generate` to the last token.
    ms: f64,
    /// From `generate` to the first token.
    first_ms: f64,
    /// Verify steps the turn took part in.
    steps: usize,
    /// The verifier's time on those steps, injected delay included.
    model_ms: f64,
}

/// A measurement, with the steps the runtime ran for it.
struct Measured {
    row: PersonaRow,
    steps: u64,
}

impl std::ops::Deref for Measured {
    type Target = PersonaRow;
    fn deref(&self) -> &PersonaRow {
        &self.row
    }
}

impl std::ops::DerefMut for Measured {
    fn deref_mut(&mut self) -> &mut PersonaRow {
        &mut self.row
    }
}

async fn measure(
    plan: &PersonaPlan,
    delay: Duration,
    n: usize,
    m: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Measured> {
    let window = WindowSpec::default();
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO)))
        .tokenizer(Tokenizer::from_json(&byte_level_tokenizer_json())?)
        .faults(FaultPlan::default().delay(ActorKind::Verifier, "step", delay))
        // One step holds every session; every prompt is prefilled in one chunk.
        .scheduler(
            SchedulerConfig::default()
                .with_max_step_tokens(1 << 20)
                .with_max_step_seqs(n.max(1))
                .with_prefill_chunk(4096)
                .with_max_draft_len(0),
        )
        .max_sessions(n)
        .kv_budget_bytes(n as u64 * DEFAULT_SLOT_BYTES * window.capacity() as u64)
        .default_window(window)
        .build()
        .await?;

    let start = Instant::now();
    let spawned = join_all((0..n).map(|i| {
        let persona = Persona::new(
            format!("persona-{i}"),
            format!("You are persona {i}, one voice in a room of {n}."),
        );
        rt.spawn_session(SessionConfig::persona(persona).with_seed(i as u64))
    }))
    .await;
    let sessions = spawned.into_iter().collect::<Result<Vec<_>, _>>()?;
    let materialize_ms = start.elapsed().as_secs_f64() * 1e3;

    let turns: Arc<Mutex<Vec<Turn>>> = Arc::default();
    let params = GenerateParams::greedy(plan.new_tokens);
    let start = Instant::now();
    let loops = sessions.iter().enumerate().map(|(i, s)| {
        let (s, turns, bar) = (s.clone(), turns.clone(), bar.clone());
        let params = params.clone();
        tokio::spawn(async move {
            for j in 0..m {
                let t = Instant::now();
                let message = format!("message {j} to persona {i}: what do you say?");
                let mut events = s.generate(message, params.clone())?;
                let mut first_ms = None;
                let (steps, model_ms) = loop {
                    match events.next().await {
                        Some(Event::Tokens { .. }) => {
                            first_ms.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
                        }
                        Some(Event::Done(stats)) => break (stats.steps, stats.model_ms),
                        Some(Event::Error(e)) => return Err(e.into()),
                        Some(_) => {}
                        None => {
                            return Err(BenchError::Task(format!(
                                "persona {i}: the turn's stream ended early"
                            )))
                        }
                    }
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let first_ms = first_ms.unwrap_or(ms);
                let turn = Turn {
                    ms,
                    first_ms,
                    steps,
                    model_ms,
                };
                turns.lock().expect("not poisoned").push(turn);
                bar.inc(1);
            }
            Ok::<_, BenchError>(())
        })
    });
    for r in join_all(loops).await {
        r.map_err(|e| BenchError::Task(format!("a persona task: {e}")))??;
    }
    let serve_wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let stats = rt.stats().await?;
    rt.shutdown().await?;

    let turns = turns.lock().expect("not poisoned").clone();
    let lat: Vec<f64> = turns.iter().map(|t| t.ms).collect();
    let over: Vec<f64> = turns.iter().map(|t| t.ms - t.model_ms).collect();
    // The first token comes from the turn's first step: its model time is the turn's mean.
    let wait: Vec<f64> = turns
        .iter()
        .map(|t| t.first_ms - t.model_ms / t.steps.max(1) as f64)
        .collect();
    let rest: Vec<f64> = over.iter().zip(&wait).map(|(o, w)| o - w).collect();
    let per_step: Vec<f64> = turns.iter().map(|t| t.ms / t.steps.max(1) as f64).collect();
    let steps: Vec<f64> = turns.iter().map(|t| t.steps as f64).collect();
    let _ = plan;
    Ok(Measured {
        steps: stats.steps,
        row: PersonaRow {
            personas: n,
            messages: m,
            materialize_ms,
            serve_wall_ms,
            mean_turn_ms: mean(&lat),
            p99_turn_ms: quantile(&lat, 0.99),
            max_turn_ms: quantile(&lat, 1.0),
            overhead_mean_ms: mean(&over),
            overhead_p99_ms: quantile(&over, 0.99),
            first_token_wait_mean_ms: mean(&wait),
            overhead_after_first_token_mean_ms: mean(&rest),
            mean_steps_per_turn: mean(&steps),
            mean_ms_per_step: mean(&per_step),
            max_step_sequences: stats.max_step_seqs,
            runtime_us_per_session_step: 0.0,
        },
    })
}

fn table(plan: &PersonaPlan, rows: &[PersonaRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let seed = SEED
                .iter()
                .find(|s| s.0 == r.personas && s.1 == r.messages)
                .map_or("-".into(), |s| format!("{} / {}", s.2, s.3));
            vec![
                format!("{} × {}", r.personas, r.messages),
                fmt(r.materialize_ms),
                fmt(r.serve_wall_ms),
                fmt(r.mean_turn_ms),
                fmt(r.p99_turn_ms),
                fmt(r.max_turn_ms),
                format!("{:.1}", r.mean_steps_per_turn),
                fmt(r.mean_ms_per_step),
                fmt(r.overhead_mean_ms),
                fmt(r.overhead_p99_ms),
                fmt(r.first_token_wait_mean_ms),
                fmt(r.overhead_after_first_token_mean_ms),
                r.max_step_sequences.to_string(),
                format!("{:.2}", r.runtime_us_per_session_step),
                seed,
            ]
        })
        .collect();
    let headers = [
        "N × M",
        "materialize ms",
        "serve wall ms",
        "mean turn ms",
        "p99 turn ms",
        "max turn ms",
        "steps/turn",
        "turn ms/step",
        "overhead mean ms",
        "overhead p99 ms",
        "of which first-token wait",
        "of which after first token",
        "max seqs/step",
        "runtime µs / session / step (no delay)",
        "seed mean / max turn ms",
    ];
    format!(
        "Persona stress, scripted model, {d:.0} ms injected per verify step, {} tokens per message \
         (one verify step per token). Overhead = turn latency − the verifier's measured time on the turn's steps; it \
         splits into the wait before the first token (a step already in flight when the turn \
         arrives cannot take it) and the rest. A seed turn was one 50 ms model call: compare its \
         figures with \"turn ms/step\". The seed's substrate overhead was 1.5–3 ms per turn.\n\n{}",
        plan.new_tokens,
        markdown(&headers, &body),
        d = plan.delay.as_secs_f64() * 1e3,
    )
}

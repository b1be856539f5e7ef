//! The `agent-capacity` case, after the seed report's connection-capacity ramp: N concurrent clients, each
//! a task of its own holding a session of its own, create their session and run one turn on the
//! shipped demo verifier, all at once. Light clients send a short prompt, heavy ones about 1,000
//! tokens. The node KV budget is fixed, so past it admission refuses with a typed error: an error
//! is a client that was refused or whose turn failed.

use std::time::Instant;

use crate::error::{BenchError, Result};
use futures::future::join_all;
use serde::Serialize;
use serde_json::json;
use troupe::actors::events::quantile;
use troupe::{GenerateParams, Runtime, RuntimeBuilder, SchedulerConfig, SessionConfig, WindowSpec};

use crate::demo::DemoModels;
use crate::models::rss_bytes;
use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, progress, Case, Env};

/// The seed report on a Mac M4 (serialized gRPC server, Qwen-class verifier): heavy-context clients and
/// their create latency in ms.
const SEED_HEAVY_CREATE_MS: &[(usize, f64)] =
    &[(1, 3000.0), (4, 12000.0), (8, 25000.0), (16, 45000.0)];

/// What the `agent-capacity` case measures.
#[derive(Debug, Clone)]
pub struct CapacityPlan {
    /// The served models and the corpus prompts come from.
    pub models: DemoModels,
    /// Concurrent light clients of each measurement.
    pub light: Vec<usize>,
    /// Concurrent heavy clients of each measurement.
    pub heavy: Vec<usize>,
    /// Prompt tokens of a light client.
    pub light_prompt: usize,
    /// Prompt tokens of a heavy client.
    pub heavy_prompt: usize,
    /// Tokens each turn generates.
    pub new_tokens: usize,
    /// KV window of a light session.
    pub light_window: WindowSpec,
    /// KV window of a heavy session (it holds the whole prompt).
    pub heavy_window: WindowSpec,
    /// The node's KV budget: admission refuses sessions past it.
    pub kv_budget_bytes: u64,
}

impl CapacityPlan {
    /// The full ramp (to 10,000 light and 256 heavy clients), or the quick one.
    pub fn new(quick: bool) -> Result<Self> {
        let (light, heavy) = if quick {
            (vec![1, 16, 256], vec![1, 4, 16])
        } else {
            (
                vec![1, 16, 256, 1024, 4096, 10_000],
                vec![1, 4, 8, 16, 64, 256],
            )
        };
        Ok(Self {
            models: DemoModels::default(),
            light,
            heavy,
            light_prompt: 16,
            heavy_prompt: 1000,
            new_tokens: 8,
            light_window: WindowSpec::new(4, 124)?,
            heavy_window: WindowSpec::new(4, 1020)?,
            kv_budget_bytes: 4 << 30,
        })
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityRow {
    /// Concurrent clients, each with its own session.
    pub sessions: usize,
    /// "light" or "heavy".
    pub mode: String,
    /// Clients refused at admission or whose turn failed.
    pub errors: usize,
    /// Median time to create a session, from the client's call to the handle.
    pub create_ms_p50: f64,
    /// 99th percentile of the same.
    pub create_ms_p99: f64,
    /// Median time of a turn, from `generate` to its last token (queueing included).
    pub generate_ms_p50: f64,
    /// 99th percentile of the same.
    pub generate_ms_p99: f64,
    /// Resident memory of the process once every turn has finished. Memory freed by earlier rows
    /// mostly stays mapped, so in practice this is the run's high-water mark so far.
    pub rss_bytes: u64,
    /// KV bytes one session's window holds, fixed at creation.
    pub kv_bytes_per_session: u64,
    /// `sessions × kv_bytes_per_session`: the KV these clients may ever hold.
    pub node_kv_bound_bytes: u64,
    /// Wall time of the whole measurement.
    pub wall_ms: f64,
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &CapacityPlan, env: &Env) -> Result<serde_json::Value> {
    let clients: usize = plan.light.iter().chain(&plan.heavy).sum();
    let bar = progress(clients as u64, "agent-capacity");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let mut rows = rt.block_on(measure(plan, env, Mode::Light, &bar))?;
    rows.extend(rt.block_on(measure(plan, env, Mode::Heavy, &bar))?);
    bar.finish_and_clear();

    let zero = |mode: &str| {
        rows.iter()
            .filter(|r| r.mode == mode && r.errors == 0)
            .map(|r| r.sessions)
            .max()
            .unwrap_or(0)
    };
    let report = json!({
        "case": "agent-capacity",
        "new_tokens": plan.new_tokens,
        "prompt_tokens": {"light": plan.light_prompt, "heavy": plan.heavy_prompt},
        "kv_budget_bytes": plan.kv_budget_bytes,
        "rows": rows,
        "max_sessions_zero_errors": {"light": zero("light"), "heavy": zero("heavy")},
        "seed": {
            "light_max_sessions_zero_errors": 256,
            "heavy_max_sessions_clean": 8,
            "kv_bytes_per_session": 7_800_000,
            "heavy_create_ms": SEED_HEAVY_CREATE_MS,
        },
    });
    let mut series: Vec<Series> = Vec::new();
    for mode in ["light", "heavy"] {
        let pts = rows.iter().filter(|r| r.mode == mode && r.errors == 0);
        series.push((
            format!("{mode}: turn p50"),
            pts.clone()
                .map(|r| (r.sessions as f64, r.generate_ms_p50))
                .collect(),
        ));
        series.push((
            format!("{mode}: create p50"),
            pts.map(|r| (r.sessions as f64, r.create_ms_p50)).collect(),
        ));
    }
    series.push((
        "seed heavy: create".into(),
        SEED_HEAVY_CREATE_MS
            .iter()
            .map(|&(n, ms)| (n as f64, ms))
            .collect(),
    ));
    let axes = Axes {
        title: "agent capacity: latency against concurrent clients",
        x: "concurrent clients (sessions)",
        y: "ms",
        log_x: true,
    };
    lines(&env.out_file(Case::AgentCapacity, "svg")?, &axes, &series)?;
    let table = table(plan, &rows, zero("light"), zero("heavy"));
    finish(env, Case::AgentCapacity, report, &table)
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Light,
    Heavy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Light => "light",
            Mode::Heavy => "heavy",
        }
    }
}

async fn measure(
    plan: &CapacityPlan,
    env: &Env,
    mode: Mode,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<CapacityRow>> {
    let (ramp, window, prompt_len) = match mode {
        Mode::Light => (&plan.light, plan.light_window, plan.light_prompt),
        Mode::Heavy => (&plan.heavy, plan.heavy_window, plan.heavy_prompt),
    };
    let Some(&most) = ramp.iter().max() else {
        return Ok(Vec::new());
    };
    let factory = plan.models.verifier_factory(env.device)?;
    let rt = RuntimeBuilder::new(move || factory())
        .default_window(window)
        .max_sessions(most)
        .kv_budget_bytes(plan.kv_budget_bytes)
        .scheduler(SchedulerConfig::default().with_max_draft_len(0))
        .build()
        .await?;
    let prompts = plan.models.held_out_prompts(64, prompt_len)?;
    let params = GenerateParams::greedy(plan.new_tokens);
    // Warm the model up on both shapes a turn has (prefill, decode).
    let s = rt.spawn_session(SessionConfig::default()).await?;
    s.generate(prompts[0].clone(), params.clone())?
        .collect()
        .await?;
    s.close().await?;

    let mut rows = Vec::new();
    for &n in ramp {
        let start = Instant::now();
        let clients = (0..n).map(|i| {
            let rt = rt.clone();
            let prompt = prompts[i % prompts.len()].clone();
            let params = params.clone();
            tokio::spawn(async move {
                let r = client(&rt, i, prompt, params).await;
                r.map_err(|e| e.to_string())
            })
        });
        let mut create = Vec::new();
        let mut generate = Vec::new();
        let mut sessions = Vec::new();
        let mut errors = 0;
        for r in join_all(clients).await {
            bar.inc(1);
            match r {
                Ok(Ok((c, g, s))) => {
                    create.push(c);
                    generate.push(g);
                    sessions.push(s);
                }
                _ => errors += 1,
            }
        }
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        let rss = rss_bytes();
        join_all(sessions.iter().map(|s| s.close())).await;
        let per_session = rt.kv_bytes_per_session(window);
        rows.push(CapacityRow {
            sessions: n,
            mode: mode.name().into(),
            errors,
            create_ms_p50: quantile(&create, 0.5),
            create_ms_p99: quantile(&create, 0.99),
            generate_ms_p50: quantile(&generate, 0.5),
            generate_ms_p99: quantile(&generate, 0.99),
            rss_bytes: rss,
            kv_bytes_per_session: per_session,
            node_kv_bound_bytes: per_session * n as u64,
            wall_ms,
        });
    }
    rt.shutdown().await?;
    Ok(rows)
}

/// One client: creates its session, then runs one turn. Returns the two latencies in ms and the
/// session, which stays open until every client of the measurement is done.
async fn client(
    rt: &Runtime,
    i: usize,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<(f64, f64, troupe::SessionHandle)> {
    let t = Instant::now();
    let s = rt
        .spawn_session(SessionConfig::default().with_seed(i as u64))
        .await?;
    let create = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    s.generate(prompt, params)?.collect().await?;
    Ok((create, t.elapsed().as_secs_f64() * 1e3, s))
}

fn mb(bytes: u64) -> String {
    fmt(bytes as f64 / 1e6)
}

fn table(plan: &CapacityPlan, rows: &[CapacityRow], light: usize, heavy: usize) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.mode.clone(),
                r.sessions.to_string(),
                r.errors.to_string(),
                format!("{:.2}", r.create_ms_p50),
                format!("{:.2}", r.create_ms_p99),
                fmt(r.generate_ms_p50),
                fmt(r.generate_ms_p99),
                mb(r.rss_bytes),
                format!("{:.3}", r.kv_bytes_per_session as f64 / 1e6),
                mb(r.node_kv_bound_bytes),
            ]
        })
        .collect();
    let headers = [
        "mode",
        "clients",
        "errors",
        "create p50 ms",
        "create p99 ms",
        "turn p50 ms",
        "turn p99 ms",
        "RSS MB (high-water)",
        "KV/session MB",
        "node KV bound MB",
    ];
    format!(
        "Concurrent clients, each with its own session and one turn of {} tokens (light: {}-token \
         prompt, heavy: {}-token prompt), node KV budget {} MB:\n\n{}\n\
         Most clients with zero errors: light {light}, heavy {heavy}. The seed report (serialized server, \
         Mac M4): light 256 with zero errors at 7.80 MB KV per session; heavy stopped near 8, \
         create latency 3 / 12 / 25 / 45 s at 1 / 4 / 8 / 16 clients.\n",
        plan.new_tokens,
        plan.light_prompt,
        plan.heavy_prompt,
        plan.kv_budget_bytes / 1_000_000,
        markdown(&headers, &body)
    )
}

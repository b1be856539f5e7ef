//! The `agent-capacity` case, after the seed report's connection-capacity ramp: N concurrent clients, each
//! a task of its own holding a session of its own, create their session and run one turn on the
//! shipped demo verifier, all at once. Light clients send a short prompt, heavy ones about 1,000
//! tokens. The node KV budget is fixed, so past it admission refuses with a typed error: an error
//! is a client that was refused or whose turn failed.
//!
//! The clients call the runtime in this process (`--over inproc`), or reach it over a real wire
//! (`--over http`, `--over grpc`): a `troupe serve` child process on loopback, each client with a
//! connection of its own ([`crate::capacity_agents`]), so that each side holds N sockets. Then
//! the server's memory is its process's, read from `/proc`; [`crate::capacity_over`] names its
//! command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use troupe::actors::events::quantile;
use troupe::{RuntimeBuilder, SchedulerConfig, WindowSpec};

use crate::capacity_agents::{Agent, Target};
use crate::capacity_over::check_open_files;
pub use crate::capacity_over::{CapacityFlags, Over};
use crate::demo::DemoModels;
use crate::error::{BenchError, Result};
use crate::models::{peak_rss_bytes, rss_bytes};
use crate::plot::{lines, Axes, Series};
use crate::server_process::ServerProcess;
use crate::{finish, fmt, markdown, progress, Case, Env};

/// The seed report on a Mac M4 (serialized gRPC server, Qwen-class verifier): heavy-context clients and
/// their create latency in ms.
const SEED_HEAVY_CREATE_MS: &[(usize, f64)] =
    &[(1, 3000.0), (4, 12000.0), (8, 25000.0), (16, 45000.0)];

/// Sessions closed at once after a measurement (closing is not measured).
const CLOSING_AT_ONCE: usize = 256;

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
    /// How the clients reach the runtime.
    pub over: Over,
    /// The `troupe` binary whose `serve` the clients reach over a wire; `None`: this executable.
    pub serve_program: Option<PathBuf>,
    /// How long a client's session, and then its turn, may each take before it is an error.
    pub timeout: Duration,
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
            over: Over::InProcess,
            serve_program: None,
            timeout: Duration::from_secs(600),
        })
    }

    /// The plan with the command line's changes.
    pub fn with_flags(mut self, flags: &CapacityFlags) -> Self {
        self.over = flags.over;
        if let Some(light) = &flags.light {
            self.light = light.clone();
        }
        if let Some(heavy) = &flags.heavy {
            self.heavy = heavy.clone();
        }
        self
    }

    /// The most clients of any measurement.
    pub(crate) fn most(&self) -> usize {
        self.light
            .iter()
            .chain(&self.heavy)
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityRow {
    /// Concurrent clients, each with its own session.
    pub sessions: usize,
    /// "light" or "heavy".
    pub mode: String,
    /// How the clients reached the runtime: "inproc", "http" or "grpc".
    pub over: String,
    /// Clients refused at admission or whose turn failed.
    pub errors: usize,
    /// The errors by kind: "refused" (admission: in process, a 429, or RESOURCE_EXHAUSTED),
    /// "http STATUS", "grpc CODE", "connect (KIND)", "io (KIND)", "timeout", "turn error",
    /// "short turn", "runtime error".
    pub error_kinds: BTreeMap<String, usize>,
    /// The first message of each kind of error.
    pub error_examples: BTreeMap<String, String>,
    /// Connections tried again after they were refused or reset (a client that ran out of
    /// retries is an error of kind "connect").
    pub connect_retries: usize,
    /// Median time to create a session, from the client's call to the handle.
    pub create_ms_p50: f64,
    /// 99th percentile of the same.
    pub create_ms_p99: f64,
    /// Median time to a turn's first tokens, from asking for the turn.
    pub first_token_ms_p50: f64,
    /// 99th percentile of the same.
    pub first_token_ms_p99: f64,
    /// Median time of a turn, from `generate` to its last token (queueing included).
    pub generate_ms_p50: f64,
    /// 99th percentile of the same.
    pub generate_ms_p99: f64,
    /// Resident memory of this process (the clients, and in process the runtime) once every
    /// turn has finished. Memory freed by earlier rows mostly stays mapped, so in practice this is
    /// the run's high-water mark so far.
    pub rss_bytes: u64,
    /// Resident memory of the serving process then: `troupe serve`'s over a wire, this one's in
    /// process.
    pub server_rss_bytes: u64,
    /// The serving process's high-water mark of resident memory so far (`VmHWM`).
    pub server_peak_rss_bytes: u64,
    /// KV bytes one session's window holds, fixed at creation.
    pub kv_bytes_per_session: u64,
    /// `sessions × kv_bytes_per_session`: the KV these clients may ever hold.
    pub node_kv_bound_bytes: u64,
    /// Wall time of the whole measurement.
    pub wall_ms: f64,
}

/// Runs the case; returns the report it wrote (`agent-capacity.json`, or over a wire
/// `agent-capacity-http.json` and `agent-capacity-grpc.json`).
pub fn run(plan: &CapacityPlan, env: &Env) -> Result<serde_json::Value> {
    let env = &match plan.over {
        Over::InProcess => env.clone(),
        over => env.clone().with_suffix(Some(over.name().into())),
    };
    let server = match plan.over {
        Over::InProcess => None,
        over => {
            check_open_files(plan.most(), over)?;
            Some(ServerProcess::start(&plan.server_command(env))?)
        }
    };
    let clients: usize = plan.light.iter().chain(&plan.heavy).sum();
    let bar = progress(clients as u64, "agent-capacity");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let mut rows = rt.block_on(measure(plan, env, server.as_ref(), Mode::Light, &bar))?;
    rows.extend(rt.block_on(measure(plan, env, server.as_ref(), Mode::Heavy, &bar))?);
    bar.finish_and_clear();
    drop(server);

    let zero = |mode: &str| {
        rows.iter()
            .filter(|r| r.mode == mode && r.errors == 0)
            .map(|r| r.sessions)
            .max()
            .unwrap_or(0)
    };
    let report = json!({
        "case": "agent-capacity",
        "over": plan.over.name(),
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

/// Where a measurement's clients go: the server's HTTP or gRPC address, or (with no server) a
/// runtime built here for the mode, whose default window is the mode's.
async fn target(
    plan: &CapacityPlan,
    env: &Env,
    server: Option<&ServerProcess>,
    window: WindowSpec,
    most: usize,
) -> Result<Target> {
    Ok(match (server, plan.over) {
        (Some(s), Over::Grpc) => Target::Grpc(
            s.grpc
                .ok_or_else(|| BenchError::Task("the server serves no gRPC".into()))?,
        ),
        (Some(s), _) => Target::Http(s.http),
        (None, _) => {
            let factory = plan.models.verifier_factory(env.device)?;
            let rt = RuntimeBuilder::new(move || factory())
                .default_window(window)
                .max_sessions(most)
                .kv_budget_bytes(plan.kv_budget_bytes)
                .scheduler(SchedulerConfig::default().with_max_draft_len(0))
                .build()
                .await?;
            Target::Local(rt)
        }
    })
}

async fn measure(
    plan: &CapacityPlan,
    env: &Env,
    server: Option<&ServerProcess>,
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
    let target = target(plan, env, server, window, most).await?;
    let prompts = plan.models.held_out_prompts(64, prompt_len)?;
    let agent = |index: usize| Agent {
        index,
        prompt: prompts[index % prompts.len()].clone(),
        window,
        new_tokens: plan.new_tokens,
        timeout: plan.timeout,
    };
    // Warm the model up on both shapes a turn has (prefill, decode), and read what a session's
    // window reserves.
    let warm = target.client(&agent(0)).await;
    if let Err(f) = &warm.result {
        return Err(BenchError::Task(format!(
            "the warm-up client failed ({}): {}",
            f.kind, f.message
        )));
    }
    let mut session = warm.session.expect("a client that succeeded has a session");
    let per_session = session.kv_bytes().await?;
    session.close().await?;

    let mut rows = Vec::new();
    for &n in ramp {
        let start = Instant::now();
        let clients = (0..n).map(|i| {
            let (target, a, bar) = (target.clone(), agent(i), bar.clone());
            tokio::spawn(async move {
                let out = target.client(&a).await;
                bar.inc(1);
                out
            })
        });
        let outcomes = join_all(clients).await;
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        let rss = rss_bytes();
        let (server_rss, server_peak) = match server {
            Some(s) => s.memory(),
            None => (rss, peak_rss_bytes()),
        };
        let (mut create, mut first, mut turn) = (Vec::new(), Vec::new(), Vec::new());
        let (mut kinds, mut examples) = (BTreeMap::new(), BTreeMap::new());
        let (mut retries, mut sessions) = (0, Vec::new());
        for out in outcomes {
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    *kinds.entry("panic".to_string()).or_insert(0) += 1;
                    examples.entry("panic".to_string()).or_insert(e.to_string());
                    continue;
                }
            };
            retries += out.retries;
            sessions.extend(out.session);
            match out.result {
                Ok(l) => {
                    create.push(l.create_ms);
                    first.push(l.first_token_ms);
                    turn.push(l.turn_ms);
                }
                Err(f) => {
                    *kinds.entry(f.kind.clone()).or_insert(0) += 1;
                    examples.entry(f.kind).or_insert(f.message);
                }
            }
        }
        // Every session is closed before the next measurement, a few at a time.
        let closed: Vec<Result<()>> = futures::stream::iter(sessions)
            .map(|s| s.close())
            .buffer_unordered(CLOSING_AT_ONCE)
            .collect()
            .await;
        closed.into_iter().collect::<Result<Vec<()>>>()?;
        rows.push(CapacityRow {
            sessions: n,
            mode: mode.name().into(),
            over: plan.over.name().into(),
            errors: kinds.values().sum(),
            error_kinds: kinds,
            error_examples: examples,
            connect_retries: retries,
            create_ms_p50: quantile(&create, 0.5),
            create_ms_p99: quantile(&create, 0.99),
            first_token_ms_p50: quantile(&first, 0.5),
            first_token_ms_p99: quantile(&first, 0.99),
            generate_ms_p50: quantile(&turn, 0.5),
            generate_ms_p99: quantile(&turn, 0.99),
            rss_bytes: rss,
            server_rss_bytes: server_rss,
            server_peak_rss_bytes: server_peak,
            kv_bytes_per_session: per_session,
            node_kv_bound_bytes: per_session * n as u64,
            wall_ms,
        });
    }
    if let Target::Local(rt) = target {
        rt.shutdown().await?;
    }
    Ok(rows)
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
                r.connect_retries.to_string(),
                format!("{:.2}", r.create_ms_p50),
                format!("{:.2}", r.create_ms_p99),
                fmt(r.first_token_ms_p50),
                fmt(r.generate_ms_p50),
                fmt(r.generate_ms_p99),
                mb(r.server_rss_bytes),
                mb(r.server_peak_rss_bytes),
                format!("{:.3}", r.kv_bytes_per_session as f64 / 1e6),
                mb(r.node_kv_bound_bytes),
            ]
        })
        .collect();
    let headers = [
        "mode",
        "clients",
        "errors",
        "retries",
        "create p50 ms",
        "create p99 ms",
        "first token p50 ms",
        "turn p50 ms",
        "turn p99 ms",
        "server RSS MB",
        "server peak MB",
        "KV/session MB",
        "node KV bound MB",
    ];
    let mut errors = String::new();
    for r in rows.iter().filter(|r| r.errors > 0) {
        let kinds: Vec<String> = r
            .error_kinds
            .iter()
            .map(|(k, n)| format!("{n} {k} ({})", r.error_examples[k]))
            .collect();
        errors += &format!(
            "Errors of {} {}: {}.\n",
            r.sessions,
            r.mode,
            kinds.join("; ")
        );
    }
    format!(
        "Concurrent clients {}, each with its own session and one turn of {} tokens (light: {}-token \
         prompt, heavy: {}-token prompt), node KV budget {} MB:\n\n{}\n{errors}\
         Most clients with zero errors: light {light}, heavy {heavy}. The seed report (serialized server, \
         Mac M4): light 256 with zero errors at 7.80 MB KV per session; heavy stopped near 8, \
         create latency 3 / 12 / 25 / 45 s at 1 / 4 / 8 / 16 clients.\n",
        plan.over.describe(),
        plan.new_tokens,
        plan.light_prompt,
        plan.heavy_prompt,
        plan.kv_budget_bytes / 1_000_000,
        markdown(&headers, &body)
    )
}

//! The `serve` case: what the HTTP front costs. N concurrent clients each run R completions of
//! the same prompts on the shipped verifier, once through `troupe serve`'s front over loopback
//! (streamed `POST /v1/completions`, a connection each), once in process (`generate` on a session
//! of its own, as the front does); both over one runtime. Requests per second and time to the
//! first token, side by side.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use troupe::actors::events::quantile;
use troupe::{Event, GenerateParams, Runtime, RuntimeBuilder, SessionConfig, Tokenizer};
use troupe_server::{client, AppState, ServerConfig};

use crate::demo::DemoModels;
use crate::error::{BenchError, Result};
use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, Case, Env};

/// What the `serve` case runs.
#[derive(Debug, Clone)]
pub struct ServePlan {
    /// The served model and the prompts.
    pub models: DemoModels,
    /// Concurrent clients of each measurement.
    pub streams: Vec<usize>,
    /// Requests each client makes, one after another.
    pub requests: usize,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens each request generates.
    pub new_tokens: usize,
}

impl ServePlan {
    /// 1, 16 and 256 clients of 4 requests, or (quick) 1 and 8 of 2.
    pub fn new(quick: bool) -> Self {
        let (streams, requests) = if quick {
            (vec![1, 8], 2)
        } else {
            (vec![1, 16, 256], 4)
        };
        Self {
            models: DemoModels::default(),
            streams,
            requests,
            prompt_len: 32,
            new_tokens: 16,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ServeRow {
    /// Concurrent clients.
    pub streams: usize,
    /// `http` or `in-process`.
    pub mode: &'static str,
    /// Requests finished per second.
    pub requests_per_s: f64,
    /// Tokens generated per second.
    pub tokens_per_s: f64,
    /// Median time to the first token, ms.
    pub ttft_p50_ms: f64,
    /// 99th percentile of the same.
    pub ttft_p99_ms: f64,
    /// Median request latency, ms.
    pub latency_p50_ms: f64,
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &ServePlan, env: &Env) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let rows = rt.block_on(measure(plan, env))?;
    let report = json!({
        "case": "serve",
        "requests_per_stream": plan.requests,
        "prompt_len": plan.prompt_len,
        "new_tokens": plan.new_tokens,
        "rows": rows,
    });
    let series: Vec<Series> = ["http", "in-process"]
        .iter()
        .map(|m| {
            let pts = rows
                .iter()
                .filter(|r| r.mode == *m)
                .map(|r| (r.streams as f64, r.ttft_p50_ms))
                .collect();
            (format!("{m} TTFT p50"), pts)
        })
        .collect();
    let axes = Axes {
        title: "time to first token, over HTTP and in process",
        x: "concurrent streams",
        y: "ms",
        log_x: true,
    };
    lines(&env.out_file(Case::Serve, "svg")?, &axes, &series)?;
    finish(env, Case::Serve, report, &table(plan, &rows))
}

/// One request as its client saw it: time to the first token, to the last, tokens.
type Timing = (f64, f64, usize);

async fn measure(plan: &ServePlan, env: &Env) -> Result<Vec<ServeRow>> {
    let factory = plan.models.verifier_factory(env.device)?;
    let tokenizer = Tokenizer::from_file(&plan.models.verifier.join("tokenizer.json"))?;
    let most = plan.streams.iter().copied().max().unwrap_or(1);
    let runtime = RuntimeBuilder::new(move || factory())
        .tokenizer(tokenizer)
        .max_sessions(most * 2)
        .build()
        .await?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        what: "binding",
        path: "127.0.0.1:0".into(),
        source,
    })?;
    let addr = listener.local_addr().map_err(BenchError::AsyncRuntime)?;
    let config = ServerConfig {
        max_queued_turns: most * 2,
        ..ServerConfig::default()
    };
    let server = troupe_server::server(AppState::new(runtime.clone(), config), listener)
        .map_err(BenchError::AsyncRuntime)?;
    let handle = server.handle();
    tokio::spawn(server);
    let prompts = Arc::new(plan.models.held_out_prompts(64, plan.prompt_len)?);
    // Warm the model up on both shapes a request has.
    one_in_process(&runtime, prompts[0].clone(), plan.new_tokens).await?;

    let mut rows = Vec::new();
    for &n in &plan.streams {
        for mode in ["http", "in-process"] {
            let start = Instant::now();
            let clients = (0..n).map(|i| {
                let (runtime, prompts) = (runtime.clone(), prompts.clone());
                let (requests, tokens) = (plan.requests, plan.new_tokens);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for r in 0..requests {
                        let prompt = prompts[(i * requests + r) % prompts.len()].clone();
                        out.push(match mode {
                            "http" => one_over_http(addr, &prompt, tokens).await?,
                            _ => one_in_process(&runtime, prompt, tokens).await?,
                        });
                    }
                    Ok::<_, BenchError>(out)
                })
            });
            let mut timings: Vec<Timing> = Vec::new();
            for c in join_all(clients).await {
                timings.extend(c.map_err(|e| BenchError::Task(e.to_string()))??);
            }
            let wall = start.elapsed().as_secs_f64();
            let ttft: Vec<f64> = timings.iter().map(|t| t.0).collect();
            let lat: Vec<f64> = timings.iter().map(|t| t.1).collect();
            let tokens: usize = timings.iter().map(|t| t.2).sum();
            rows.push(ServeRow {
                streams: n,
                mode,
                requests_per_s: timings.len() as f64 / wall,
                tokens_per_s: tokens as f64 / wall,
                ttft_p50_ms: quantile(&ttft, 0.5),
                ttft_p99_ms: quantile(&ttft, 0.99),
                latency_p50_ms: quantile(&lat, 0.5),
            });
        }
    }
    handle.stop(true).await;
    runtime.shutdown().await?;
    Ok(rows)
}

/// A turn in a session of its own, as the front runs a request that names no session.
async fn one_in_process(runtime: &Runtime, prompt: Vec<u32>, tokens: usize) -> Result<Timing> {
    let start = Instant::now();
    let session = runtime.spawn_session(SessionConfig::default()).await?;
    let mut stream = session.generate(prompt, GenerateParams::greedy(tokens))?;
    let mut first = None;
    let mut got = 0;
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Tokens { ids, .. } => {
                first.get_or_insert(start.elapsed());
                got += ids.len();
            }
            Event::Error(e) => return Err(e.into()),
            _ => {}
        }
    }
    let t = timing(start, first, got);
    session.close().await?;
    Ok(t)
}

/// A streamed completion over HTTP: the time to its first text and to `[DONE]`.
async fn one_over_http(addr: SocketAddr, prompt: &[u32], tokens: usize) -> Result<Timing> {
    let start = Instant::now();
    let body = json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let io = |source| BenchError::Io {
        what: "requesting",
        path: "/v1/completions".into(),
        source,
    };
    let mut o = client::open(addr, "POST", "/v1/completions", &[], &body.to_string())
        .await
        .map_err(io)?;
    if o.status != 200 {
        return Err(BenchError::Task(format!(
            "the server answered {}",
            o.status
        )));
    }
    let (mut first, mut got) = (None, 0);
    while let Some(data) = client::next_event(&mut o.reader).await.map_err(io)? {
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&data)?;
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            got = u as usize;
        } else if v["choices"][0]["finish_reason"].is_null() {
            first.get_or_insert(start.elapsed());
        }
    }
    Ok(timing(start, first, got))
}

fn timing(start: Instant, first: Option<Duration>, tokens: usize) -> Timing {
    let all = start.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(first.unwrap_or(all)), ms(all), tokens)
}

fn table(plan: &ServePlan, rows: &[ServeRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.streams.to_string(),
                r.mode.to_string(),
                fmt(r.requests_per_s),
                fmt(r.tokens_per_s),
                fmt(r.ttft_p50_ms),
                fmt(r.ttft_p99_ms),
                fmt(r.latency_p50_ms),
            ]
        })
        .collect();
    let headers = [
        "streams",
        "mode",
        "requests/s",
        "tokens/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "latency p50 ms",
    ];
    format!(
        "Serving: {} requests per client of {} prompt tokens and {} new tokens on the shipped \
         verifier; over HTTP (streamed completions, a connection each) and in process (a \
         session each), one runtime.\n\n{}",
        plan.requests,
        plan.prompt_len,
        plan.new_tokens,
        markdown(&headers, &body)
    )
}

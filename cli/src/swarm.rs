//! `troupe swarm`: N personas in one room, each reply produced by that persona's own session actor
//! through the shared verifier with speculative decoding, then a table of latencies and throughput.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use troupe::actors::scripted::{ScriptedDrafter, ScriptedModel};
use troupe::actors::{quantile, DrafterFactory, SchedulerStats, VerifierFactory};
use troupe::engine::{
    load_model_drafter, load_verifier, DeviceKind, ModelSource, NgramDrafter, Tokenizer, WarmUp,
};
use troupe::{
    ActorKind, FaultPlan, GenerateParams, Persona, RuntimeBuilder, SchedulerConfig, SessionConfig,
    WindowSpec,
};

/// Arguments of `troupe swarm`.
#[derive(clap::Args)]
pub struct SwarmArgs {
    /// Personas in the room.
    #[arg(long, default_value_t = 6)]
    personas: usize,
    /// Turns each persona speaks.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Verifier model directory.
    #[arg(long, default_value = "models/verifier")]
    model: PathBuf,
    /// Drafter: a model directory, `ngram`, or `none`.
    #[arg(long, default_value = "models/drafter")]
    drafter: String,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The width the verifier's weights are kept in: f32, bf16, f16, stored (the checkpoint's
    /// own, the default) or int8 (CPU only).
    #[arg(long, value_parser = crate::bench::parse_weights)]
    weights: Option<troupe::engine::WeightDtype>,
    /// Longest reply, in tokens (a reply also ends at a newline).
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Replace the models with the scripted model and this delay per verify step, to measure the
    /// runtime alone.
    #[arg(long)]
    inject_delay_ms: Option<u64>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Print one JSON object instead of the conversation and table.
    #[arg(long)]
    json: bool,
    /// Skip the start-up warm-up that tunes and compiles a GPU backend's kernels for the step
    /// shapes of this many personas before the first turn.
    #[arg(long)]
    no_warm_up: bool,
}

const NAMES: &[(&str, &str)] = &[
    (
        "Ferris",
        "You are Ferris, a cheerful crab who explains ownership.",
    ),
    (
        "Borrowck",
        "You are the borrow checker: strict, precise, fond of lifetimes.",
    ),
    (
        "Cargo",
        "You are Cargo, who thinks every problem is a dependency problem.",
    ),
    (
        "Clippy",
        "You are Clippy, who suggests a more idiomatic way to write everything.",
    ),
    (
        "Miri",
        "You are Miri, who hunts undefined behaviour in unsafe code.",
    ),
    (
        "Rustdoc",
        "You are Rustdoc, who answers with documentation comments.",
    ),
    ("Tokio", "You are Tokio, who makes everything asynchronous."),
    ("Serde", "You are Serde, who serializes every thought."),
];

const TOPICS: &[&str] = &[
    "What is the difference between a reference and a smart pointer?",
    "When should a function take ownership of its argument?",
    "How do traits compare with interfaces in other languages?",
    "Why does Rust not have null?",
    "What does the `?` operator do with an error?",
    "How do iterators stay zero-cost?",
];

#[derive(Serialize, Default, Clone)]
struct PersonaRow {
    name: String,
    turns: usize,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    tokens: usize,
    drafted: usize,
    accepted: usize,
    kv_bytes: u64,
}

#[derive(Serialize)]
struct SwarmReport {
    personas: Vec<PersonaRow>,
    tokens_per_s: f64,
    wall_s: f64,
    overhead_mean_ms: f64,
    overhead_p99_ms: f64,
    model_step_ms: f64,
    scheduler: SchedulerStats,
    conversation: Vec<(String, String)>,
}

fn factories(
    a: &SwarmArgs,
) -> Result<(VerifierFactory, Option<DrafterFactory>, Option<Tokenizer>)> {
    if a.inject_delay_ms.is_some() {
        let v: VerifierFactory = Arc::new(|| Ok(Box::new(ScriptedModel::new(Duration::ZERO)) as _));
        let d: DrafterFactory =
            Arc::new(|| Ok(Box::new(ScriptedDrafter::new(150, Duration::ZERO)) as _));
        let tok = Tokenizer::from_json(&troupe::engine::tokenizer::byte_level_tokenizer_json())?;
        return Ok((v, Some(d), Some(tok)));
    }
    let device: DeviceKind = a.device.parse()?;
    let dir = a.model.clone();
    if !dir.join("config.json").exists() {
        anyhow::bail!(
            "no model in {} (train one with `troupe train`, or pass --inject-delay-ms)",
            dir.display()
        );
    }
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))
        .context("the verifier needs tokenizer.json")?;
    let weights = a.weights;
    let v: VerifierFactory =
        Arc::new(move || load_verifier(&ModelSource::Dir(&dir), device, weights));
    let d: Option<DrafterFactory> = match a.drafter.as_str() {
        "none" => None,
        "ngram" => Some(Arc::new(|| Ok(Box::new(NgramDrafter::default()) as _))),
        path => {
            let p = PathBuf::from(path);
            Some(Arc::new(move || {
                load_model_drafter(&ModelSource::Dir(Path::new(&p)), device, None)
            }))
        }
    };
    Ok((v, d, Some(tok)))
}

/// Runs `troupe swarm`.
pub fn run(a: SwarmArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(swarm(a))
}

async fn swarm(a: SwarmArgs) -> Result<()> {
    let (verifier, drafter, tokenizer) = factories(&a)?;
    let window = WindowSpec::new(4, 508)?;
    let mut builder = RuntimeBuilder::new(move || verifier()).default_window(window);
    if let Some(d) = drafter {
        builder = builder.drafter(move || d());
    }
    if let Some(t) = tokenizer {
        builder = builder.tokenizer(t);
    }
    if let Some(ms) = a.inject_delay_ms {
        builder = builder.faults(FaultPlan::default().delay(
            ActorKind::Verifier,
            "step",
            Duration::from_millis(ms),
        ));
    }
    let gpu = a.device != "cpu" && a.inject_delay_ms.is_none();
    let mut bar = None;
    if gpu && !a.no_warm_up {
        let config = SchedulerConfig::default();
        let plan = WarmUp::up_to(a.personas, config.max_draft_len, config.prefill_chunk)
            .with_window(window);
        let shown = ProgressBar::new(plan.steps() as u64).with_style(
            ProgressStyle::with_template("warm-up {bar:30} {pos}/{len} {msg}")
                .expect("a valid template"),
        );
        bar = Some(shown.clone());
        builder = builder.warm_up(
            plan,
            Arc::new(move |p| {
                shown.set_position(p.done as u64);
                shown.set_message(format!("{} × {}", p.what, p.batch));
            }),
        );
    }
    let rt = builder.build().await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    converse(a, rt).await
}

/// The personas' turns on a running troupe, then the report.
async fn converse(a: SwarmArgs, rt: troupe::Runtime) -> Result<()> {
    let mut sessions = Vec::new();
    for i in 0..a.personas {
        let (name, system) = NAMES[i % NAMES.len()];
        let name = if i < NAMES.len() {
            name.to_string()
        } else {
            format!("{name}{}", i / NAMES.len())
        };
        let config = SessionConfig::persona(Persona::new(name.clone(), system)).with_seed(i as u64);
        sessions.push((name, rt.spawn_session(config).await?));
    }
    // A reply ends at the newline after its first words: a newline before them (the model's
    // line break after the speaker's tag) is part of the reply, so no persona answers with nothing.
    let params = GenerateParams::greedy(a.max_new_tokens)
        .with_sampling(a.temperature, 1.0)
        .with_stop_tokens([b'\n' as u32])
        .with_stop_after_content(true);
    let mut rows: Vec<PersonaRow> = sessions
        .iter()
        .map(|(n, _)| PersonaRow {
            name: n.clone(),
            ..Default::default()
        })
        .collect();
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    let mut turn_times = Vec::new();
    let mut conversation = Vec::new();
    let mut last_reply = String::from("Welcome, everyone.");
    let start = Instant::now();
    for turn in 0..a.turns {
        let topic = TOPICS[turn % TOPICS.len()];
        // Everyone answers the topic and the last thing said, at the same time.
        let asks = sessions.iter().map(|(_, s)| {
            let prompt = format!("{last_reply}\nHost: {topic}");
            let params = params.clone();
            async move { s.generate(prompt, params)?.collect().await }
        });
        if !a.json {
            println!("Host: {topic}");
        }
        let results = join_all(asks).await;
        for (i, r) in results.into_iter().enumerate() {
            let (tokens, stats) = r?;
            let text = stats.text.clone().unwrap_or_default().trim().to_string();
            if !a.json {
                println!(
                    "  {}: {}  [{:.0} ms, model {:.0} ms]",
                    rows[i].name, text, stats.latency_ms, stats.model_ms
                );
            }
            rows[i].turns += 1;
            rows[i].tokens += tokens.len();
            rows[i].drafted += stats.drafted;
            rows[i].accepted += stats.accepted;
            latencies[i].push(stats.latency_ms);
            turn_times.push((stats.latency_ms, stats.model_ms));
            conversation.push((rows[i].name.clone(), text.clone()));
            if !text.is_empty() {
                last_reply = format!("{}: {}", rows[i].name, text);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let stats = rt.stats().await?;
    for (row, (_, s)) in rows.iter_mut().zip(&sessions) {
        row.kv_bytes = s.info().await?.kv_bytes_bound;
    }
    for (row, lat) in rows.iter_mut().zip(&latencies) {
        row.mean_ms = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
        row.p50_ms = quantile(lat, 0.5);
        row.p99_ms = quantile(lat, 0.99);
        row.max_ms = quantile(lat, 1.0);
    }
    // The runtime's share of a turn: its latency minus the model time of the steps it was part of.
    let step_ms = match a.inject_delay_ms {
        Some(ms) => ms as f64,
        None => stats.forward_time.as_secs_f64() * 1e3 / stats.steps.max(1) as f64,
    };
    let overheads: Vec<f64> = turn_times
        .iter()
        .map(|(latency, model)| (latency - model).max(0.0))
        .collect();
    let total_tokens: usize = rows.iter().map(|r| r.tokens).sum();
    let report = SwarmReport {
        tokens_per_s: total_tokens as f64 / wall,
        wall_s: wall,
        overhead_mean_ms: overheads.iter().sum::<f64>() / overheads.len().max(1) as f64,
        overhead_p99_ms: quantile(&overheads, 0.99),
        model_step_ms: step_ms,
        scheduler: stats,
        personas: rows,
        conversation,
    };
    rt.shutdown().await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!();
    println!("| persona | turns | mean ms | p50 ms | p99 ms | max ms | tokens | accepted/drafted | KV bytes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &report.personas {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {}/{} | {} |",
            r.name,
            r.turns,
            r.mean_ms,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.tokens,
            r.accepted,
            r.drafted,
            r.kv_bytes
        );
    }
    let s = &report.scheduler;
    println!();
    println!(
        "{} tokens in {:.1} s: {:.1} tokens/s; {} verify steps, mean {:.1} sequences per step (max {}); model {:.1} ms per step",
        total_tokens,
        report.wall_s,
        report.tokens_per_s,
        s.steps,
        s.total_step_seqs as f64 / s.steps.max(1) as f64,
        s.max_step_seqs,
        report.model_step_ms
    );
    println!(
        "runtime overhead per turn (latency minus verifier time of its steps; drafting included): mean {:.1} ms, p99 {:.1} ms",
        report.overhead_mean_ms, report.overhead_p99_ms
    );
    Ok(())
}

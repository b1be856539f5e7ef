//! troupe's benchmark cases, the measured figures the README quotes: `troupe bench <case>` runs
//! them, and `tests/bench_quick.rs` runs each case's quick plan in-process. Each case prints a
//! markdown table, writes `DIR/<case>.json` (with the machine and the commit) and plots its curve
//! to `DIR/<case>.svg`.

use std::path::PathBuf;
use std::str::FromStr;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use troupe::engine::{DeviceKind, WeightDtype};

pub mod batching;
pub mod capacity;
pub mod capacity_agents;
pub mod capacity_over;
pub mod decode;
pub mod demo;
pub mod error;
pub mod kernels;
pub mod kernels_accept;
pub mod kernels_attention;
pub mod models;
pub mod persona;
pub mod plot;
pub mod rtt;
pub mod serve;
pub mod server_process;
pub mod soak;
pub mod spec;
pub mod spec_costs;
pub mod step;

pub use error::{BenchError, Result};
pub use models::ModelChoice;

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// The engine alone: verify-step time against batch size and draft length, then the decoding
    /// speed of one session with and without drafting.
    Step,
    /// The whole runtime on a small random model: throughput, per-token latency and step size
    /// against the number of concurrent sessions, plain and speculative.
    Batching,
    /// N personas × M messages on the scripted model with a 50 ms injected model delay: the
    /// runtime's own overhead per turn.
    PersonaStress,
    /// Up to 10,000 concurrent clients, each with its own session, light and heavy prompts, on the
    /// demo verifier, in process or over HTTP or gRPC to a `troupe serve` child: errors, create
    /// and turn latency, memory.
    AgentCapacity,
    /// One session with the demo models while each draft block pays an injected
    /// proposer↔verifier round trip, pipelined and serial: speedup and break-even.
    RttSweep,
    /// Speedup over plain decoding of each drafter and draft length, and of the adaptive policy,
    /// on the demo models over held-out corpus prompts.
    SpecSpeedup,
    /// Each kernel (skinny matmul, its epilogues, greedy acceptance) against Burn's own ops and the
    /// bandwidth floor, and a 28-layer Qwen3-1.7B-shaped projection chain.
    Kernels,
    /// Sessions opening, taking turns (some cancelled), closing and reopening on the shipped
    /// verifier for minutes: memory, tasks, reserved bytes and errors over time.
    Soak,
    /// Completions through the HTTP front against in-process turns on the shipped verifier:
    /// requests per second and time to the first token at 1, 16 and 256 concurrent streams.
    Serve,
}

impl Case {
    /// Every case, in the order `troupe bench --help` lists them.
    pub const ALL: [Case; 9] = [
        Case::Step,
        Case::Batching,
        Case::PersonaStress,
        Case::AgentCapacity,
        Case::RttSweep,
        Case::SpecSpeedup,
        Case::Kernels,
        Case::Soak,
        Case::Serve,
    ];

    /// The name used on the command line and for the output files.
    pub fn name(self) -> &'static str {
        match self {
            Case::Step => "step",
            Case::Batching => "batching",
            Case::PersonaStress => "persona-stress",
            Case::AgentCapacity => "agent-capacity",
            Case::RttSweep => "rtt-sweep",
            Case::SpecSpeedup => "spec-speedup",
            Case::Kernels => "kernels",
            Case::Soak => "soak",
            Case::Serve => "serve",
        }
    }
}

impl FromStr for Case {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        Case::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
                BenchError::Invalid(format!("unknown case {s:?}; one of {}", names.join(", ")))
            })
    }
}

/// Where a case writes its results, and what it computes on.
#[derive(Debug, Clone)]
pub struct Env {
    /// Output directory (created if needed).
    pub out: PathBuf,
    /// Device of the cases that run a real model.
    pub device: DeviceKind,
    /// The device as the user named it, recorded in the JSON.
    pub device_name: String,
    /// The verifier of the cases that run a model.
    pub model: ModelChoice,
    /// The width its weights are kept in; `None`: the device's default (the checkpoint's own).
    pub weights: Option<WeightDtype>,
    /// The draft model of the cases that speculate with one; `None`: the shipped one.
    pub drafter: Option<PathBuf>,
    /// The soak's minutes and sessions, when not its defaults.
    pub soak: Option<(f64, usize)>,
    /// agent-capacity's wire and ramps, when not its defaults.
    pub capacity: capacity::CapacityFlags,
    /// `persona-stress --sessions N`: measure N personas only (5 turns each).
    pub personas: Option<usize>,
    /// Appended to the output files' names (`<case>-<suffix>.json`), so that runs of a case
    /// under different setups sit side by side.
    pub suffix: Option<String>,
}

impl Env {
    /// An environment writing to `out` and computing on `device` (`cpu`, `wgpu`, `cuda`).
    pub fn new(out: impl Into<PathBuf>, device: &str) -> Result<Self> {
        Ok(Self {
            out: out.into(),
            device: device.parse()?,
            device_name: device.to_owned(),
            model: ModelChoice::Default,
            weights: None,
            drafter: None,
            soak: None,
            personas: None,
            capacity: capacity::CapacityFlags::default(),
            suffix: None,
        })
    }

    /// The same environment, naming its output files `<case>-<suffix>.<ext>`.
    pub fn with_suffix(mut self, suffix: Option<String>) -> Self {
        self.suffix = suffix;
        self
    }

    /// The same environment, drafting with the model in `drafter` in the cases that speculate.
    pub fn with_drafter(mut self, drafter: Option<PathBuf>) -> Self {
        self.drafter = drafter;
        self
    }

    /// The verifier, draft model and width the demo-model cases run: the shipped models unless
    /// `--model`/`--preset` and `--drafter` name others.
    pub fn demo_models(&self) -> Result<demo::DemoModels> {
        let mut models = demo::DemoModels::default();
        if let Some(dir) = self.model.dir()? {
            models.verifier = dir;
        }
        if let Some(dir) = &self.drafter {
            if troupe::engine::block::is_block_drafter(dir)? {
                models.block_drafter = dir.clone();
            } else {
                models.drafter = dir.clone();
            }
        }
        models.weights = self.weights;
        Ok(models)
    }

    /// The same environment, keeping the verifier's weights in `weights`.
    pub fn with_weights(mut self, weights: Option<WeightDtype>) -> Self {
        self.weights = weights;
        self
    }

    /// The same environment, running `model` in the cases that run one.
    pub fn with_model(mut self, model: ModelChoice) -> Self {
        self.model = model;
        self
    }

    /// `DIR/<case>.<ext>` (or `DIR/<case>-<suffix>.<ext>`), creating `DIR` if needed.
    pub fn out_file(&self, case: Case, ext: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.out).map_err(|source| BenchError::Io {
            what: "creating",
            path: self.out.clone(),
            source,
        })?;
        let stem = match &self.suffix {
            Some(suffix) => format!("{}-{suffix}", case.name()),
            None => case.name().to_owned(),
        };
        Ok(self.out.join(format!("{stem}.{ext}")))
    }
}

/// Runs `case` with its full plan, or its quick one.
pub fn run(case: Case, quick: bool, env: &Env) -> Result<Value> {
    match case {
        Case::Step if !env.model.is_default() => {
            let model = env.model.config(&step::bench_model())?;
            step::run(&step::StepPlan::for_model(quick, model), env)
        }
        Case::Step => step::run(&step::StepPlan::new(quick), env),
        Case::Batching if !env.model.is_default() => {
            let model = env.model.config(&step::bench_model())?;
            batching::run(&batching::BatchingPlan::for_model(quick, model), env)
        }
        Case::Batching => batching::run(&batching::BatchingPlan::new(quick), env),
        Case::PersonaStress => {
            let mut plan = persona::PersonaPlan::new(quick);
            if let Some(n) = env.personas {
                plan.sizes = vec![(n, 5)];
            }
            persona::run(&plan, env)
        }
        Case::AgentCapacity => {
            let plan = capacity::CapacityPlan::new(quick)?.with_flags(&env.capacity);
            let models = env.demo_models()?;
            capacity::run(&capacity::CapacityPlan { models, ..plan }, env)
        }
        Case::RttSweep => {
            let models = env.demo_models()?;
            // The round trip is paid per block by the drafter `--drafter` names (the draft
            // model's by default).
            let drafter = match &env.drafter {
                Some(dir) if troupe::engine::block::is_block_drafter(dir)? => {
                    demo::DrafterKind::Block
                }
                _ => demo::DrafterKind::Model,
            };
            rtt::run(
                &rtt::RttPlan {
                    models,
                    drafter,
                    ..rtt::RttPlan::new(quick)
                },
                env,
            )
        }
        Case::SpecSpeedup => {
            let models = env.demo_models()?;
            spec::run(
                &spec::SpecPlan {
                    models,
                    ..spec::SpecPlan::new(quick)
                },
                env,
            )
        }
        Case::Kernels => kernels::run(&kernels::KernelsPlan::new(quick), env),
        Case::Soak => {
            let plan = match env.soak {
                Some((minutes, sessions)) => soak::SoakPlan::with(minutes, sessions)?,
                None => soak::SoakPlan::new(quick)?,
            };
            let models = env.demo_models()?;
            soak::run(&soak::SoakPlan { models, ..plan }, env)
        }
        Case::Serve => {
            let models = env.demo_models()?;
            serve::run(
                &serve::ServePlan {
                    models,
                    ..serve::ServePlan::new(quick)
                },
                env,
            )
        }
    }
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `git rev-parse --short HEAD`, or `"unknown"` outside a repository.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Adds the machine and the commit to a case's report, writes `DIR/<case>.json` (with the
/// environment's suffix), prints `table` to stdout and returns the report as written.
pub fn finish(env: &Env, case: Case, mut report: Value, table: &str) -> Result<Value> {
    report["machine"] = json!({ "cores": cores(), "device": env.device_name });
    report["model_choice"] = json!(env.model.name());
    report["peak_rss_bytes"] = json!(models::peak_rss_bytes());
    report["commit"] = json!(commit());
    let path = env.out_file(case, "json")?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n").map_err(|source| {
        BenchError::Io {
            what: "writing",
            path: path.clone(),
            source,
        }
    })?;
    println!("{table}");
    eprintln!("wrote {}", path.display());
    Ok(report)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:32}] {pos}/{len} {elapsed_precise}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// A markdown table.
pub fn markdown(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|", headers.join(" | "));
    for _ in headers {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    troupe::actors::events::quantile(values, 0.5)
}

/// The mean of `values` (0 when empty).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// A number for a table: one decimal, or none past 1000.
pub fn fmt(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

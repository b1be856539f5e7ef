//! `troupe bench <case>`: runs one of the benchmark cases of `troupe-bench`.

use std::path::PathBuf;

use anyhow::Result;
use troupe::engine::WeightDtype;
use troupe_bench::capacity::{CapacityFlags, Over};
use troupe_bench::{Case, Env, ModelChoice};

/// Arguments of `troupe bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// The case to run: step, batching, persona-stress, agent-capacity, rtt-sweep, spec-speedup,
    /// kernels, soak or serve.
    #[arg(value_parser = parse_case)]
    case: Case,
    /// A smaller sweep: about a minute per case on 2 CPU cores.
    #[arg(long)]
    quick: bool,
    /// Directory for `<case>.json` and `<case>.svg`.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// cpu, wgpu or cuda (persona-stress runs the scripted model and only records it).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The cases that run a model (all but persona-stress and kernels): run this Hugging Face
    /// model directory as the verifier instead of the case's own.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// The cases that run a model: run random weights of a named real shape (qwen3-0.6b,
    /// qwen3-1.7b, qwen3-4b, llama-3.2-1b), written once in bf16 to $TROUPE_CACHE (default
    /// ~/.cache/troupe).
    #[arg(long)]
    preset: Option<String>,
    /// The cases that speculate with a drafter model: spec-speedup and rtt-sweep draft with this
    /// directory instead of models/drafter (or models/block-drafter, when it holds a block
    /// drafter); batching speculates with it instead of prompt lookup.
    #[arg(long)]
    drafter: Option<PathBuf>,
    /// The cases that run a model: the width the verifier's weights are kept in: f32, bf16, f16,
    /// stored (the checkpoint's own, the default) or int8 (quantized at load, CPU only).
    #[arg(long, value_parser = parse_weights)]
    weights: Option<WeightDtype>,
    /// soak: how many minutes the clients run (default 30; 1 with --quick).
    #[arg(long)]
    minutes: Option<f64>,
    /// soak: the session cap, with a twentieth more clients (default 1,000; 64 with --quick).
    /// persona-stress: measure this many personas only, 5 turns each.
    #[arg(long)]
    sessions: Option<usize>,
    /// agent-capacity: how the clients reach the runtime: inproc (tasks of this process), http or
    /// grpc (a connection each to a `troupe serve` this starts on loopback; writes
    /// agent-capacity-http.json or -grpc.json).
    #[arg(long, value_parser = parse_over)]
    over: Option<Over>,
    /// agent-capacity: the light clients of each measurement, as `1,16,256` (instead of the
    /// case's ramp).
    #[arg(long, value_delimiter = ',')]
    light: Option<Vec<usize>>,
    /// agent-capacity: the heavy clients of each measurement, as `1,4,16`.
    #[arg(long, value_delimiter = ',')]
    heavy: Option<Vec<usize>>,
}

/// Parses `--weights`.
pub fn parse_weights(s: &str) -> Result<WeightDtype, String> {
    s.parse()
        .map_err(|e: troupe::engine::EngineError| e.to_string())
}

fn parse_over(s: &str) -> Result<Over, String> {
    s.parse()
        .map_err(|e: troupe_bench::BenchError| e.to_string())
}

fn parse_case(s: &str) -> Result<Case, String> {
    s.parse()
        .map_err(|e: troupe_bench::BenchError| e.to_string())
}

/// Runs `troupe bench`.
pub fn run(mut a: BenchArgs) -> Result<()> {
    let model = ModelChoice::from_args(a.model, a.preset)?;
    let runs_model = !matches!(a.case, Case::PersonaStress | Case::Kernels);
    if !runs_model && (!model.is_default() || a.weights.is_some()) {
        anyhow::bail!("--model, --preset and --weights apply to the cases that run a model");
    }
    if a.drafter.is_some() && !matches!(a.case, Case::SpecSpeedup | Case::RttSweep | Case::Batching)
    {
        anyhow::bail!("--drafter applies to spec-speedup, rtt-sweep and batching");
    }
    let personas = match a.case {
        Case::PersonaStress => a.sessions.take(),
        _ => None,
    };
    if personas == Some(0) {
        anyhow::bail!("--sessions must be at least 1");
    }
    let soak = match (a.minutes, a.sessions) {
        _ if a.case != Case::Soak => {
            if a.minutes.is_some() || a.sessions.is_some() {
                anyhow::bail!("--minutes applies to soak; --sessions to soak and persona-stress");
            }
            None
        }
        (None, None) => None,
        (m, n) => {
            let quick = troupe_bench::soak::SoakPlan::new(a.quick)?;
            Some((
                m.unwrap_or(quick.duration.as_secs_f64() / 60.0),
                n.unwrap_or(quick.sessions),
            ))
        }
    };
    let capacity = CapacityFlags {
        over: a.over.unwrap_or_default(),
        light: a.light,
        heavy: a.heavy,
    };
    if a.case != Case::AgentCapacity
        && (a.over.is_some() || capacity.light.is_some() || capacity.heavy.is_some())
    {
        anyhow::bail!("--over, --light and --heavy apply to agent-capacity");
    }
    let mut env = Env::new(a.out, &a.device)?
        .with_model(model)
        .with_weights(a.weights)
        .with_drafter(a.drafter);
    env.soak = soak;
    env.personas = personas;
    env.capacity = capacity;
    troupe_bench::run(a.case, a.quick, &env)?;
    Ok(())
}

//! `troupe bench <case>`: runs one of the benchmark cases of `troupe-bench`.

use std::path::PathBuf;

use anyhow::Result;
use troupe::engine::WeightDtype;
use troupe_bench::{Case, Env, ModelChoice};

/// Arguments of `troupe bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// The case to run: step, batching, persona-stress, agent-capacity, rtt-sweep, spec-speedup
    /// or kernels.
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
    /// `step` and `batching`: run this Hugging Face model directory instead of the case's own
    /// small random model.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// `step` and `batching`: run random weights of a named real shape (qwen3-0.6b, qwen3-1.7b,
    /// qwen3-4b, llama-3.2-1b), written once in bf16 to $TROUPE_CACHE (default ~/.cache/troupe).
    #[arg(long)]
    preset: Option<String>,
    /// `step` and `batching`: the width the verifier's weights are kept in: f32, bf16, f16 or
    /// stored (the checkpoint's own, the default).
    #[arg(long, value_parser = parse_weights)]
    weights: Option<WeightDtype>,
}

/// Parses `--weights`.
pub fn parse_weights(s: &str) -> Result<WeightDtype, String> {
    s.parse()
        .map_err(|e: troupe::engine::EngineError| e.to_string())
}

fn parse_case(s: &str) -> Result<Case, String> {
    s.parse()
        .map_err(|e: troupe_bench::BenchError| e.to_string())
}

/// Runs `troupe bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let model = ModelChoice::from_args(a.model, a.preset)?;
    if !model.is_default() && !matches!(a.case, Case::Step | Case::Batching) {
        anyhow::bail!("--model and --preset apply to the step and batching cases");
    }
    if a.weights.is_some() && !matches!(a.case, Case::Step | Case::Batching) {
        anyhow::bail!("--weights applies to the step and batching cases");
    }
    let env = Env::new(a.out, &a.device)?
        .with_model(model)
        .with_weights(a.weights);
    troupe_bench::run(a.case, a.quick, &env)?;
    Ok(())
}

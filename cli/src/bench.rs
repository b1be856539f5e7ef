//! `troupe bench <case>`: runs one of the benchmark cases of `troupe-bench`.

use std::path::PathBuf;

use anyhow::Result;
use troupe_bench::{Case, Env};

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
}

fn parse_case(s: &str) -> Result<Case, String> {
    s.parse()
        .map_err(|e: troupe_bench::BenchError| e.to_string())
}

/// Runs `troupe bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let env = Env::new(a.out, &a.device)?;
    troupe_bench::run(a.case, a.quick, &env)?;
    Ok(())
}

//! The `troupe` command line.

mod bench;
mod generate;
mod serve;
mod swarm;
mod train;
mod train_block;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// troupe: many LLM sessions, one shared model.
#[derive(Parser)]
#[command(name = "troupe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt, optionally with speculative decoding.
    Generate(generate::GenerateArgs),
    /// Train the byte-level demo models on the corpus.
    Train(train::TrainArgs),
    /// Run a room of personas, each its own session, through the shared model.
    Swarm(swarm::SwarmArgs),
    /// Measure the engine and the runtime; writes results/<case>.json and .svg.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP: OpenAI-compatible chat and completions, and sessions.
    Serve(serve::ServeArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // TROUPE_PROBES=FILE writes every stage of every turn as JSON lines (docs/probes.md).
    troupe::actors::probes::init_from_env();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Swarm(args) => swarm::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

//! Spawn one session programmatically and stream a reply.
//!
//! `cargo run --release -p troupe --example quickstart` (uses models/verifier and models/drafter).

use std::path::PathBuf;

use futures::StreamExt;
use troupe::engine::{load_model_drafter, load_verifier, DeviceKind, ModelSource, Tokenizer};
use troupe::{Event, GenerateParams, RuntimeBuilder, SessionConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = PathBuf::from("models/verifier");
    let drafter = PathBuf::from("models/drafter");
    let tokenizer = Tokenizer::from_file(&model.join("tokenizer.json"))?;
    let runtime = RuntimeBuilder::new(move || {
        load_verifier(&ModelSource::Dir(&model), DeviceKind::Cpu, None)
    })
    .drafter(move || load_model_drafter(&ModelSource::Dir(&drafter), DeviceKind::Cpu, None))
    .tokenizer(tokenizer)
    .build()
    .await?;

    let session = runtime.spawn_session(SessionConfig::default()).await?;
    let mut stream = session.generate("Ownership in Rust means", GenerateParams::greedy(80))?;
    while let Some(event) = stream.next().await {
        match event {
            Event::Tokens { text, .. } => print!("{}", text.unwrap_or_default()),
            Event::Done(stats) => println!(
                "\n[{} tokens in {:.0} ms, {}/{} drafts accepted]",
                stats.tokens, stats.latency_ms, stats.accepted, stats.drafted
            ),
            Event::Error(e) => eprintln!("\nerror: {e}"),
            _ => {}
        }
    }
    println!("{:?}", session.info().await?);
    runtime.shutdown().await?;
    Ok(())
}

//! A room of personas through the library API: each persona is its own session actor, and every
//! round they all answer at once, so the scheduler batches their steps for the shared verifier.
//!
//! `cargo run --release -p troupe --example persona_swarm`

use std::path::PathBuf;

use futures::future::join_all;
use troupe::engine::{load_verifier, DeviceKind, ModelSource, NgramDrafter, Tokenizer};
use troupe::{GenerateParams, Persona, RuntimeBuilder, SessionConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = PathBuf::from("models/verifier");
    let dir = model.clone();
    let runtime =
        RuntimeBuilder::new(move || load_verifier(&ModelSource::Dir(&dir), DeviceKind::Cpu, None))
            .drafter(|| Ok(NgramDrafter::default()))
            .tokenizer(Tokenizer::from_file(&model.join("tokenizer.json"))?)
            .build()
            .await?;

    let names = ["Ferris", "Clippy", "Miri", "Cargo"];
    let mut room = Vec::new();
    for name in names {
        let persona = Persona::new(
            name,
            format!("You are {name}, a member of the Rust community."),
        );
        room.push(
            runtime
                .spawn_session(SessionConfig::persona(persona))
                .await?,
        );
    }
    // A reply ends at a newline once it has something to say.
    let params = GenerateParams::greedy(40)
        .with_stop_tokens([b'\n' as u32])
        .with_stop_after_content(true);
    let mut said = String::from("Host: What is a trait?");
    for round in 0..3 {
        println!("-- round {round}: {said}");
        let replies = join_all(room.iter().map(|s| {
            let prompt = said.clone();
            let params = params.clone();
            async move { s.generate(prompt, params)?.collect().await }
        }))
        .await;
        for (name, reply) in names.iter().zip(replies) {
            let (_, stats) = reply?;
            let text = stats.text.unwrap_or_default();
            println!("{name}: {}  [{:.0} ms]", text.trim(), stats.latency_ms);
            said = format!("{name}: {}", text.trim());
        }
    }
    println!("{:?}", runtime.stats().await?);
    runtime.shutdown().await?;
    Ok(())
}

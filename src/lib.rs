//! troupe: an actor-system runtime for serving many concurrent LLM agent sessions and personas from
//! one shared model, with batched, pipelined speculative decoding.
//!
//! Most users need only [`RuntimeBuilder`], [`Runtime`] and [`SessionHandle`]: build a runtime
//! around a verifier (and, optionally, a drafter), spawn a session per agent or persona, and
//! stream each turn's [`Event`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use troupe::engine::{load_verifier, DeviceKind, ModelSource, NgramDrafter, Tokenizer};
//! use troupe::{GenerateParams, Persona, RuntimeBuilder, SessionConfig};
//!
//! let dir = std::path::PathBuf::from("models/verifier");
//! let model = dir.clone();
//! let runtime = RuntimeBuilder::new(move || load_verifier(&ModelSource::Dir(&model), DeviceKind::Cpu, None))
//!     .drafter(|| Ok(NgramDrafter::default()))
//!     .tokenizer(Tokenizer::from_file(&dir.join("tokenizer.json"))?)
//!     .build()
//!     .await?;
//! let ferris = Persona::new("Ferris", "You are a friendly crab.");
//! let session = runtime.spawn_session(SessionConfig::persona(ferris)).await?;
//! let (_tokens, stats) = session.generate("What is a trait?", GenerateParams::greedy(48))?.collect().await?;
//! println!("{}", stats.text.unwrap_or_default());
//! runtime.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The layers underneath are re-exported whole for those who need them: [`actors`] (the
//! runtime), [`engine`] (models, windows, the batched step, drafters) and [`kernels`].
//!
//! Features: `cpu` (default, Burn's Flex backend), `wgpu`, `cuda`. A service author who wants
//! nothing but the runtime depends on `troupe = { version = "0.1", default-features = false,
//! features = ["cpu"] }`; no command-line, plotting or progress-bar crate is compiled then.

pub use troupe_actors as actors;
pub use troupe_engine as engine;
pub use troupe_kernels as kernels;

pub use troupe_actors::{
    ActorKind, BudgetInfo, Event, FaultAction, FaultPlan, FaultRule, GenerateParams, Health, Limit,
    Persona, Prompt, Runtime, RuntimeBuilder, RuntimeError, SchedulerConfig, SchedulerStats,
    SessionConfig, SessionHandle, SessionId, SessionInfo, TurnStats, TurnStream, WarmUpReport,
};
pub use troupe_engine::{
    DeviceKind, Drafter, EngineError, ModelConfig, Tokenizer, Verifier, WarmUp, WarmUpProgress,
    WindowSpec,
};

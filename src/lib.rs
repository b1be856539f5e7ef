//! troupe: an actor-system runtime for serving many concurrent LLM agent sessions and personas from
//! one shared model, with batched, pipelined speculative decoding.
//!
//! This crate re-exports the runtime ([`actors`]) and the numeric core ([`engine`]); most users need
//! only [`RuntimeBuilder`], [`Runtime`] and [`SessionHandle`].

pub use troupe_actors as actors;
pub use troupe_engine as engine;
pub use troupe_kernels as kernels;

pub use troupe_actors::{
    ActorKind, Event, FaultPlan, GenerateParams, Persona, Prompt, Runtime, RuntimeBuilder,
    RuntimeError, SchedulerConfig, SessionConfig, SessionHandle, SessionInfo, TurnStats,
};
pub use troupe_engine::{DeviceKind, ModelConfig, Tokenizer, WindowSpec};

//! troupe's actor runtime: every session is an actor with its own bounded KV window; a scheduler
//! actor batches the verify steps of all sessions for one shared verifier actor (on its own OS
//! thread); a proposer actor pipelines draft blocks to it. Built on ractor and tokio.
//!
//! Start with [`RuntimeBuilder`], then [`Runtime::spawn_session`] and [`SessionHandle::generate`].
//! `docs/runtime-semantics.md` states the guarantees.

pub mod config;
mod cost;
mod detokenize;
pub mod error;
pub mod events;
pub mod faults;
mod health;
mod manager;
mod phase;
mod policy;
pub mod probes;
mod proposer;
mod protocol;
mod runtime;
mod scheduler;
pub mod scripted;
mod session;
mod supervisor;
mod verifier_actor;
mod worker;

/// Identifies a session (and its sequence in the verifier).
pub type SessionId = u64;

pub use config::{GenerateParams, Persona, Prompt, SchedulerConfig, SessionConfig};
pub use error::{Limit, RuntimeError};
pub use events::{quantile, Event, SessionInfo, TurnStats, TurnStream};
pub use faults::{ActorKind, FaultAction, FaultPlan, FaultRule};
pub use health::Health;
pub use manager::BudgetInfo;
pub use policy::{Histogram, SchedulerStats, MAX_ORDERS_IN_FLIGHT};
pub use runtime::{
    DrafterFactory, Runtime, RuntimeBuilder, SessionHandle, VerifierFactory, WarmUpReport,
};

//! troupe's actor runtime: every session is an actor with its own bounded KV window; a scheduler
//! actor batches the verify steps of all sessions for one shared verifier actor (on its own OS
//! thread); a proposer actor pipelines draft blocks to it. Built on ractor and tokio.
//!
//! Start with [`RuntimeBuilder`], then [`Runtime::spawn_session`] and [`SessionHandle::generate`].
//! `docs/runtime-semantics.md` states the guarantees.

pub mod cost;
pub mod error;
pub mod events;
pub mod faults;
pub mod manager;
pub mod policy;
pub mod probes;
pub mod proposer;
pub mod runtime;
pub mod scheduler;
pub mod scripted;
pub mod session;
pub mod verifier_actor;
pub mod worker;

/// Identifies a session (and its sequence in the verifier).
pub type SessionId = u64;

pub use error::{Limit, RuntimeError};
pub use events::{quantile, Event, SessionInfo, TurnStats, TurnStream};
pub use faults::{ActorKind, FaultAction, FaultPlan, FaultRule};
pub use manager::BudgetInfo;
pub use policy::{SchedulerConfig, SchedulerStats};
pub use runtime::{Runtime, RuntimeBuilder, SessionHandle, WarmUpReport};
pub use scheduler::{DrafterFactory, VerifierFactory};
pub use session::{GenerateParams, Persona, Prompt, SessionConfig};

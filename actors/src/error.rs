//! The runtime's error type.

use std::sync::Arc;

use troupe_engine::EngineError;

use crate::SessionId;

/// Which admission limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Limit {
    /// The cap on concurrent sessions.
    Sessions,
    /// The node's KV budget in bytes.
    KvBytes,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Sessions => write!(f, "session cap"),
            Limit::KvBytes => write!(f, "KV budget (bytes)"),
        }
    }
}

/// Everything the runtime can refuse or fail with.
///
/// Errors of the request come first (admission, unknown or closed sessions, a bad prompt), then
/// the engine's own refusals, then failures of the runtime itself (its actors and its verifier).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    // The request.
    /// Admission control refused a new session: `requested` would exceed `limit` by `over`.
    #[error(
        "admission refused by the {limit}: needs {requested}, {available} available ({over} over)"
    )]
    AdmissionRefused {
        /// The limit that refused.
        limit: Limit,
        /// What the session needs (1 session, or its window's bytes).
        requested: u64,
        /// What is left under the limit.
        available: u64,
        /// By how much the limit would be exceeded.
        over: u64,
    },
    /// No session with that id is open.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// The session was closed (or failed) and takes no more requests.
    #[error("session {0} is closed")]
    SessionClosed(SessionId),
    /// The prompt of a turn is longer than the runtime accepts.
    #[error("prompt of {tokens} tokens is over the limit of {limit}")]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// The first turn of a session has no tokens to start from.
    #[error("the first turn of a session needs a prompt")]
    EmptyPrompt,
    /// A turn was submitted while the session's previous one is still running (turns of one
    /// session are queued by its actor, so this is a bug in a caller of the scheduler).
    #[error("session {0} already has a turn in progress")]
    TurnInProgress(SessionId),
    /// A configuration the runtime cannot use (a session's template, a window, a limit).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The turn was cancelled: its stream was dropped or its session's turns were cancelled. The
    /// tokens it had emitted stay in the session's context.
    #[error("the turn of session {0} was cancelled")]
    Cancelled(SessionId),
    /// Text was given but the runtime has no tokenizer.
    #[error("this runtime has no tokenizer; pass token ids")]
    NoTokenizer,

    // The engine.
    /// The engine refused the request or the step (a bad token, bad parameters, a failed
    /// forward); the turns of a failed step fail with it and their windows are rebuilt.
    #[error("engine: {0}")]
    Engine(Arc<EngineError>),

    // The runtime itself.
    /// The runtime is shutting down and takes no new work.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// No verifier is running, and none is coming back: the last one failed and could not be
    /// replaced.
    #[error("no verifier is running")]
    NoVerifier,
    /// The verifier failed more often than the runtime's restart limit allows.
    #[error("the verifier failed {restarts} times and was not restarted")]
    TooManyRestarts {
        /// Restarts so far.
        restarts: u64,
    },
    /// A replacement verifier could not be built after a failure.
    #[error("the verifier could not be rebuilt: {0}")]
    RebuildFailed(String),
    /// A part of the runtime every turn needs (the scheduler, the manager, the verifier past its
    /// restart limit) has failed; the runtime serves nothing more (see `Runtime::health`).
    #[error("the runtime has failed: {0}")]
    RuntimeFailed(String),
    /// An actor the request needed has stopped.
    #[error("actor unavailable: {0}")]
    ActorUnavailable(String),
    /// A component did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl From<EngineError> for RuntimeError {
    fn from(e: EngineError) -> Self {
        RuntimeError::Engine(Arc::new(e))
    }
}

impl From<Arc<EngineError>> for RuntimeError {
    fn from(e: Arc<EngineError>) -> Self {
        RuntimeError::Engine(e)
    }
}

impl<T> From<ractor::MessagingErr<T>> for RuntimeError {
    fn from(e: ractor::MessagingErr<T>) -> Self {
        RuntimeError::ActorUnavailable(e.to_string())
    }
}

impl From<ractor::SpawnErr> for RuntimeError {
    fn from(e: ractor::SpawnErr) -> Self {
        RuntimeError::ActorUnavailable(e.to_string())
    }
}

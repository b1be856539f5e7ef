//! The runtime's error type.

use troupe_engine::EngineError;

use crate::SessionId;

/// Which admission limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
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
    /// Text was given but the runtime has no tokenizer.
    #[error("this runtime has no tokenizer; pass token ids")]
    NoTokenizer,
    /// The engine refused the request (bad token, bad parameters, ...).
    #[error("engine: {0}")]
    Engine(String),
    /// The runtime is shutting down and takes no new work.
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// An actor the request needed has stopped.
    #[error("actor unavailable: {0}")]
    ActorUnavailable(String),
    /// A component did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl From<EngineError> for RuntimeError {
    fn from(e: EngineError) -> Self {
        RuntimeError::Engine(e.to_string())
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

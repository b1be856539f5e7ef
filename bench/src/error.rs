//! The benchmarks' error type.

use std::path::PathBuf;

use troupe::engine::EngineError;
use troupe::RuntimeError;

/// What a benchmark case can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The engine refused or failed (a model, a step, a device).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The runtime refused or failed (a session, a turn).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Reading or writing a file.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "creating", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The async runtime the case drives its sessions on could not start.
    #[error("starting the async runtime: {0}")]
    AsyncRuntime(std::io::Error),
    /// A temporary directory could not be made.
    #[error("a temporary directory: {0}")]
    TempDir(std::io::Error),
    /// A report could not be serialised.
    #[error("serialising a report: {0}")]
    Json(#[from] serde_json::Error),
    /// A plot could not be drawn.
    #[error("plotting {}: {message}", path.display())]
    Plot {
        /// The plot's file.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
    /// A task of the case failed or panicked.
    #[error("a task failed: {0}")]
    Task(String),
    /// A plan or its inputs are not valid.
    #[error("{0}")]
    Invalid(String),
}

/// A benchmark result.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Fails with [`BenchError::Invalid`] unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::error::BenchError::Invalid(format!($($arg)+)));
        }
    };
}
pub(crate) use ensure;

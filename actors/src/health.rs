//! Whether the runtime can serve: one shared cell its supervisor, its scheduler and its handles
//! read and write, so a caller (an HTTP front answering 503) learns of a failure without asking an
//! actor that may be gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The runtime's state as a whole, from [`Runtime::health`](crate::Runtime::health).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Health {
    /// Every part is up: turns are served.
    Serving,
    /// `shutdown` was called or the last `Runtime` dropped: no new work is taken.
    ShuttingDown,
    /// A part every turn needs has failed; nothing more is served.
    Failed {
        /// What failed, and why.
        reason: String,
    },
}

impl Health {
    /// Whether turns are served.
    pub fn is_serving(&self) -> bool {
        matches!(self, Health::Serving)
    }
}

/// The shared cell behind [`Health`]. The first failure is kept: later ones follow from it.
#[derive(Debug, Clone)]
pub(crate) struct HealthCell(Arc<Mutex<Health>>, Arc<AtomicBool>);

impl HealthCell {
    /// A runtime that serves.
    pub(crate) fn new() -> Self {
        Self(
            Arc::new(Mutex::new(Health::Serving)),
            Arc::new(AtomicBool::new(false)),
        )
    }

    /// Whether `shutdown` has begun (failed or not): nothing is restarted any more.
    pub(crate) fn stopping(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }

    /// The state now.
    pub(crate) fn get(&self) -> Health {
        self.0
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Records a failure, unless the runtime already failed or is shutting down (actors stopping
    /// then is expected).
    pub(crate) fn fail(&self, reason: impl Into<String>) {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *h == Health::Serving {
            let reason = reason.into();
            tracing::error!(%reason, "the runtime has failed");
            *h = Health::Failed { reason };
        }
    }

    /// Records that the runtime is shutting down (a failure already recorded stays).
    pub(crate) fn shutting_down(&self) {
        self.1.store(true, Ordering::Release);
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *h == Health::Serving {
            *h = Health::ShuttingDown;
        }
    }
}

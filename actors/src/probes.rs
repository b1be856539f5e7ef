//! Probes: every stage of a turn is a `tracing` span or event (see docs/probes.md). Setting
//! `TROUPE_PROBES=FILE` (or calling [`init_json`]) writes them as JSON lines.

use std::path::Path;

use tracing_subscriber::fmt::format::FmtSpan;

/// Writes every span close (with its busy and idle time) and event as one JSON line to `path`.
/// Returns false if a global subscriber was already set or the file cannot be created.
pub fn init_json(path: &Path) -> bool {
    let Ok(file) = std::fs::File::create(path) else {
        return false;
    };
    tracing_subscriber::fmt()
        .json()
        .with_span_events(FmtSpan::CLOSE)
        .with_current_span(true)
        .with_writer(std::sync::Mutex::new(file))
        .with_max_level(tracing::Level::INFO)
        .try_init()
        .is_ok()
}

/// Calls [`init_json`] with `$TROUPE_PROBES` if it is set.
pub fn init_from_env() -> bool {
    match std::env::var_os("TROUPE_PROBES") {
        Some(p) => init_json(Path::new(&p)),
        None => false,
    }
}

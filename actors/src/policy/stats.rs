//! The scheduler's counters, as [`crate::Runtime`] reports them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Counters of the scheduler.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SchedulerStats {
    /// Steps run.
    pub steps: u64,
    /// Largest number of sequences in one step.
    pub max_step_seqs: usize,
    /// Sum of sequences over steps (for the mean).
    pub total_step_seqs: u64,
    /// Tokens fed to the verifier.
    pub tokens: u64,
    /// Tokens emitted.
    pub emitted: u64,
    /// Drafted tokens verified.
    pub drafted: u64,
    /// Of which accepted.
    pub accepted: u64,
    /// Times the verifier was restarted.
    pub verifier_restarts: u64,
    /// Times the proposer was restarted.
    pub proposer_restarts: u64,
    /// Time the verifier spent in forward passes (`forward_seconds` when serialized).
    #[serde(rename = "forward_seconds", with = "seconds")]
    pub forward_time: Duration,
}

/// A duration as a number of seconds, as the JSON reports have always written it.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

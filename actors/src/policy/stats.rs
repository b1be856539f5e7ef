//! The scheduler's counters, as [`crate::Runtime`] reports them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Counters of the scheduler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Draft blocks verified (each of one or more drafted tokens).
    #[serde(default)]
    pub drafts: u64,
    /// Sequences per step.
    #[serde(default = "Histogram::step_sequences")]
    pub step_seqs: Histogram,
    /// Seconds from a turn's submission to the first step that holds it.
    #[serde(default = "Histogram::seconds")]
    pub queue_wait: Histogram,
    /// Tokens evicted from windows (sessions closed and open), as the scheduler counts the tokens
    /// in each window.
    #[serde(default)]
    pub window_evictions: u64,
}

impl Default for SchedulerStats {
    fn default() -> Self {
        Self {
            steps: 0,
            max_step_seqs: 0,
            total_step_seqs: 0,
            tokens: 0,
            emitted: 0,
            drafted: 0,
            accepted: 0,
            verifier_restarts: 0,
            proposer_restarts: 0,
            forward_time: Duration::ZERO,
            drafts: 0,
            step_seqs: Histogram::step_sequences(),
            queue_wait: Histogram::seconds(),
            window_evictions: 0,
        }
    }
}

/// Counts of observations at or below each of a set of bounds (Prometheus's cumulative
/// histogram, kept per bucket), with their sum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, rising; a last bucket takes everything above.
    pub bounds: Vec<f64>,
    /// Observations per bucket (one more than `bounds`).
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds`.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Buckets for sequences per step: powers of two to 1,024.
    pub fn step_sequences() -> Self {
        Self::new(&[
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ])
    }

    /// Buckets for latencies in seconds (vLLM's for time to first token).
    pub fn seconds() -> Self {
        Self::new(&[
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
        ])
    }

    /// Counts `v`.
    pub fn observe(&mut self, v: f64) {
        let at = self.bounds.partition_point(|&b| b < v);
        self.counts[at] += 1;
        self.sum += v;
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
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

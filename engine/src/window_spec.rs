//! The shape of a session's window (sink tokens plus a sliding window) and its exact bytes, shared
//! by the windows and the pools that hold them.

use burn::tensor::DType;

use crate::error::{EngineError, Result};

/// The shape of a session's window: sink tokens kept forever, plus a sliding window of recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct WindowSpec {
    /// Tokens at the start of the sequence that are never evicted.
    pub sink: usize,
    /// Most recent tokens kept besides the sinks.
    pub window: usize,
}

impl WindowSpec {
    /// A window of `sink + window` slots.
    pub fn new(sink: usize, window: usize) -> Result<Self> {
        if window == 0 {
            return Err(EngineError::InvalidWindow(
                "the sliding window must hold at least one token".into(),
            ));
        }
        Ok(Self { sink, window })
    }

    /// Slots in the window.
    pub fn capacity(&self) -> usize {
        self.sink + self.window
    }

    /// Physical slot of the stream token at index `t`.
    pub fn slot_of(&self, t: u64) -> usize {
        if (t as usize) < self.sink {
            t as usize
        } else {
            self.sink + ((t - self.sink as u64) % self.window as u64) as usize
        }
    }
}

impl Default for WindowSpec {
    fn default() -> Self {
        Self {
            sink: 4,
            window: 1020,
        }
    }
}

/// Bytes of one session's window: `2 × layers × kv_heads × head_dim × (sink + window) × bytes/element`.
pub fn window_bytes(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    spec: WindowSpec,
    dtype: DType,
) -> u64 {
    2 * (layers * kv_heads * head_dim * spec.capacity()) as u64 * dtype.size() as u64
}

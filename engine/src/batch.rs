//! One sequence's share of a batched forward, shared by the model, the pooled step and the engine.

use burn::prelude::*;

use crate::window::KvWindow;

/// One sequence's share of a batched forward: its window and how many of the batch's tokens are its.
pub struct SeqInput<'a, B: Backend> {
    /// The sequence's window; the step's keys and values land in its scratch.
    pub window: &'a mut KvWindow<B>,
    /// Tokens of this sequence in the batch, consecutive.
    pub len: usize,
}

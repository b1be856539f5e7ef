//! What callers receive: the events of a turn, its stats, and a session's info.

use std::pin::Pin;
use std::task::{Context, Poll};

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::RuntimeError;
use crate::session::SessionMsg;
use crate::SessionId;

/// Statistics of one finished turn.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TurnStats {
    /// Tokens generated.
    pub tokens: usize,
    /// Tokens drafted for this turn.
    pub drafted: usize,
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// Verify steps this turn took part in (prefill included).
    pub steps: usize,
    /// From the call to the last token, in milliseconds.
    pub latency_ms: f64,
    /// From the call to the first token, in milliseconds.
    pub first_token_ms: f64,
    /// Verifier time of the steps the turn took part in, in milliseconds; `latency_ms` minus this is
    /// what the runtime (queueing, scheduling, drafting, messaging) added.
    pub model_ms: f64,
    /// The generated text, when the runtime has a tokenizer.
    pub text: Option<String>,
}

/// One event of a turn's stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// New tokens, with the text they complete (empty while a UTF-8 character is incomplete).
    Tokens {
        /// Token ids.
        ids: Vec<u32>,
        /// Their text, if the runtime has a tokenizer.
        text: Option<String>,
    },
    /// The turn finished.
    Done(TurnStats),
    /// The turn failed; nothing more follows.
    Error(RuntimeError),
}

/// The stream of a turn's events. Ends after `Done` or `Error`.
///
/// Dropping it before the end cancels the turn (see [`TurnStream::cancel`]).
pub struct TurnStream {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Where to send the cancellation, and the turn it names.
    session: Option<(ActorRef<SessionMsg>, TurnId)>,
    ended: bool,
}

/// Names one turn among all of a process's turns, so a late cancellation never reaches the next.
pub(crate) type TurnId = u64;

impl TurnStream {
    pub(crate) fn new(
        rx: mpsc::UnboundedReceiver<Event>,
        session: ActorRef<SessionMsg>,
        turn: TurnId,
    ) -> Self {
        Self {
            rx,
            session: Some((session, turn)),
            ended: false,
        }
    }

    /// Cancels the turn: a queued turn never starts; a running one stops within one verify step,
    /// gives back its place in the batch, and keeps the tokens it emitted in the session's
    /// context. The stream then ends with [`RuntimeError::Cancelled`] (unless the turn had ended
    /// before the session received the cancellation). Dropping the stream does the same.
    pub fn cancel(&self) {
        if let Some((actor, turn)) = &self.session {
            let _ = actor.cast(SessionMsg::Cancel(Some(*turn)));
        }
    }

    /// Waits for the whole turn: every token id, then the stats.
    pub async fn collect(mut self) -> Result<(Vec<u32>, TurnStats), RuntimeError> {
        let mut ids = Vec::new();
        while let Some(ev) = self.next_event().await {
            match ev {
                Event::Tokens { ids: t, .. } => ids.extend(t),
                Event::Done(stats) => return Ok((ids, stats)),
                Event::Error(e) => return Err(e),
            }
        }
        Err(RuntimeError::ActorUnavailable(
            "the session stopped mid-turn".into(),
        ))
    }

    /// The next event; `None` after the last.
    pub async fn next_event(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let ev = std::task::ready!(self.rx.poll_recv(cx));
        if !matches!(ev, Some(Event::Tokens { .. })) {
            self.ended = true;
        }
        Poll::Ready(ev)
    }
}

impl Drop for TurnStream {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel();
        }
    }
}

impl futures::Stream for TurnStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.poll_event(cx)
    }
}

/// The session's end of a turn's stream. Whatever ends the turn (its last token, a failure, a
/// cancellation, or the session actor stopping or being killed with the turn pending), the stream
/// gets exactly one last event: dropped unfinished, it sends `Error(SessionClosed)`.
pub(crate) struct TurnSink {
    tx: mpsc::UnboundedSender<Event>,
    session: SessionId,
    ended: bool,
}

impl TurnSink {
    /// A sink for session `session`'s turn.
    pub(crate) fn new(tx: mpsc::UnboundedSender<Event>, session: SessionId) -> Self {
        Self {
            tx,
            session,
            ended: false,
        }
    }

    /// Sends tokens.
    pub(crate) fn tokens(&self, ids: Vec<u32>, text: Option<String>) {
        let _ = self.tx.send(Event::Tokens { ids, text });
    }

    /// Sends the last event.
    pub(crate) fn end(mut self, last: Result<TurnStats, RuntimeError>) {
        self.ended = true;
        let _ = self.tx.send(match last {
            Ok(stats) => Event::Done(stats),
            Err(e) => Event::Error(e),
        });
    }
}

impl Drop for TurnSink {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self
                .tx
                .send(Event::Error(RuntimeError::SessionClosed(self.session)));
        }
    }
}

/// What a session reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    /// Session id.
    pub id: SessionId,
    /// Persona name.
    pub name: String,
    /// Tokens that have entered the session's context (prompts and generated).
    pub tokens_seen: u64,
    /// Tokens currently held in its KV window.
    pub window_fill: usize,
    /// Slots of its window (sink + window).
    pub window_capacity: usize,
    /// Bytes of the filled part of the window.
    pub kv_bytes_used: u64,
    /// Bytes reserved for the window (its bound).
    pub kv_bytes_bound: u64,
    /// Tokens drafted.
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    /// Turns finished.
    pub turns: u64,
    /// Median turn latency, ms.
    pub latency_p50_ms: f64,
    /// 90th percentile turn latency, ms.
    pub latency_p90_ms: f64,
    /// 99th percentile turn latency, ms.
    pub latency_p99_ms: f64,
}

/// The `q`-quantile (0..=1) of `values`, by nearest rank; 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

//! A turn as the `Generate` call's response stream: a `Tokens` message per event, then `stats`.
//! The stream owns the turn's [`TurnStream`], so a client that cancels the call or goes away, which
//! makes the server drop the response, cancels the turn in the runtime.

use std::pin::Pin;

use futures::Stream;
use tonic::Status;
use troupe::{Event, RuntimeError, SessionId, TurnStats, TurnStream};

use super::pb::{self, generate_response};
use super::status::status;
use crate::metrics::Timings;
use crate::state::{AppState, Seat};

/// The response stream of `Generate`.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

/// A turn being streamed to its client.
pub struct Turn {
    /// `None` once the turn has ended.
    turn: Option<TurnStream>,
    session: SessionId,
    max_tokens: usize,
    tokens: usize,
    state: AppState,
    /// Held while the turn runs: its place among `max_queued_turns`.
    _seat: Seat,
    /// Its clock, for the latency metrics.
    timings: Timings,
}

impl Turn {
    /// The stream of `turn`, a turn of `session` of at most `max_tokens` tokens.
    pub fn new(
        turn: TurnStream,
        session: SessionId,
        max_tokens: usize,
        state: AppState,
        seat: Seat,
    ) -> Self {
        Self {
            turn: Some(turn),
            session,
            max_tokens,
            tokens: 0,
            timings: Timings::start(state.counters.clone()),
            state,
            _seat: seat,
        }
    }

    /// The response stream: it ends after the stats or an error.
    pub fn into_stream(self) -> GenerateStream {
        Box::pin(futures::stream::unfold(self, |mut t| async move {
            let next = t.next().await?;
            Some((next, t))
        }))
    }

    async fn next(&mut self) -> Option<Result<pb::GenerateResponse, Status>> {
        loop {
            let ev = self.turn.as_mut()?.next_event().await;
            let end = |t: &mut Self, reason: &str| {
                t.turn = None;
                t.state.counters.finish(reason, t.tokens);
            };
            let event = match ev {
                Some(Event::Tokens { ids, text }) => {
                    self.tokens += ids.len();
                    self.timings.tokens(ids.len());
                    generate_response::Event::Tokens(pb::Tokens {
                        ids,
                        text: text.unwrap_or_default(),
                    })
                }
                Some(Event::Done(stats)) => {
                    self.timings.finish();
                    let reason = if self.tokens >= self.max_tokens {
                        "length"
                    } else {
                        "stop"
                    };
                    end(self, reason);
                    generate_response::Event::Stats(stats.into())
                }
                Some(Event::Error(e)) => {
                    end(self, "abort");
                    return Some(Err(status(&e)));
                }
                None => {
                    // The stream ended without its last event: the session went away.
                    end(self, "abort");
                    return Some(Err(status(&RuntimeError::SessionClosed(self.session))));
                }
                Some(_) => continue,
            };
            return Some(Ok(pb::GenerateResponse { event: Some(event) }));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.turn.is_some() {
            // Dropped before its end: the client went away, and dropping the turn's stream
            // cancels the turn.
            self.state.counters.finish("abort", self.tokens);
        }
    }
}

impl From<TurnStats> for pb::TurnStats {
    fn from(s: TurnStats) -> Self {
        Self {
            tokens: s.tokens as u64,
            drafted: s.drafted as u64,
            accepted: s.accepted as u64,
            steps: s.steps as u64,
            latency_ms: s.latency_ms,
            first_token_ms: s.first_token_ms,
            model_ms: s.model_ms,
        }
    }
}

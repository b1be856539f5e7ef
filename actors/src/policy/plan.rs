//! Planning a step: which sequences go in (round robin, decoders first, a seat and a share of the
//! budget kept for a waiting prompt), how much of each prompt is fed (prefill chunks), and how much
//! of each ready draft the token budget and the turn's stop tokens leave.

use troupe_engine::{SeqId, VerifyWork};

use super::outcomes::ending_stop;
use super::{Chosen, InFlight, SchedulerState};
use crate::protocol::Turn;

/// A step on its way to the verifier.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// Step number.
    pub id: u64,
    /// One work per sequence.
    pub works: Vec<VerifyWork>,
    /// Tokens in the step.
    pub tokens: usize,
}

/// The stop tokens `draft` opens with while they are ordinary tokens there: those before the
/// turn's first token that is not a stop token, when [`Turn::stop_after_content`] is set and the
/// turn has no such token yet (`content` false).
fn leading_stops<'a>(turn: &Turn, content: bool, draft: &'a [u32]) -> &'a [u32] {
    if content || !turn.stop_after_content {
        return &[];
    }
    let n = draft.iter().take_while(|t| turn.stop.contains(t)).count();
    &draft[..n]
}

/// The stop tokens a work tells the verifier, which cuts the block after the first of them it
/// emits: the turn's, less those the draft opens with as ordinary tokens (see [`leading_stops`]).
/// The verifier's own token comes last whatever it is, so it needs no cut of its own.
fn work_stop(turn: &Turn, content: bool, draft: &[u32]) -> Vec<u32> {
    let leading = leading_stops(turn, content, draft);
    turn.stop
        .iter()
        .copied()
        .filter(|s| !leading.contains(s))
        .collect()
}

/// How many tokens of `draft` a step verifies so that the verifier cuts the block where the turn
/// ends: all of them, unless the drafted stop token that ends the turn is also one the draft opens
/// with as an ordinary token; then the verifier cannot be told to cut at the one and not at the
/// other, and the draft is cut just before the ending one (the verifier's own token decides there).
fn verifiable_len(turn: &Turn, content: bool, draft: &[u32]) -> usize {
    let leading = leading_stops(turn, content, draft);
    match ending_stop(turn, content, draft) {
        Some(p) if leading.contains(&draft[p]) => p,
        _ => draft.len(),
    }
}

impl SchedulerState {
    /// Plans the next step; `None` when a step is in flight or nothing waits. Each sequence with a
    /// turn is looked up once to choose, and each chosen one once more to build its work.
    pub(super) fn plan_step(&mut self) -> Option<PlannedStep> {
        if self.in_flight.is_some() {
            return None;
        }
        // (sequence, tokens it has left to feed) of each one not in a step, in id order.
        let ready: Vec<(SeqId, usize)> = self
            .turns
            .iter()
            .filter_map(|id| {
                let e = &self.seqs[id];
                (!e.in_step).then(|| (*id, e.pending()))
            })
            .collect();
        if ready.is_empty() {
            return None;
        }
        // Round robin: start after the sequence that started last time, so none starves.
        let start = ready.iter().position(|&(id, _)| id >= self.rr).unwrap_or(0);
        let order = || ready[start..].iter().chain(&ready[..start]).copied();
        let cfg = &self.config;
        let mut budget = cfg.max_step_tokens.max(1);
        let mut chosen: Vec<Chosen> = Vec::new();

        let prefill_waiting = ready.iter().any(|&(_, pending)| pending > 1);
        let reserve = if prefill_waiting {
            cfg.prefill_chunk.min(budget / 4).max(1)
        } else {
            0
        };
        // A waiting prompt also keeps one seat, or decoders filling `max_step_seqs` would starve it.
        let seat = usize::from(prefill_waiting && cfg.max_step_seqs > 1);
        // Decoding sequences first: one token each.
        for (seq, pending) in order() {
            if pending == 1 && chosen.len() + seat < cfg.max_step_seqs && budget > reserve {
                chosen.push(Chosen {
                    seq,
                    fed: 1,
                    draft: Vec::new(),
                });
                budget -= 1;
            }
        }
        let decoders = chosen.len();
        let decoders_left_out =
            ready.iter().filter(|&&(_, pending)| pending == 1).count() > decoders;
        // Then prefill chunks with what is left.
        for (seq, pending) in order() {
            if pending > 1 && chosen.len() < cfg.max_step_seqs && budget > 0 {
                let fed = pending.min(cfg.prefill_chunk).min(budget);
                chosen.push(Chosen {
                    seq,
                    fed,
                    draft: Vec::new(),
                });
                budget -= fed;
            }
        }
        if chosen.is_empty() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        // When decoders were left out, the next step starts after the last one served (round
        // robin); otherwise after the first, which rotates who gets draft budget first.
        let last = if decoders_left_out && decoders > 0 {
            chosen.get(decoders - 1)
        } else {
            chosen.first()
        };
        self.rr = last.map(|c| c.seq + 1).unwrap_or(0);
        let mut works = Vec::with_capacity(chosen.len());
        let mut tokens = 0;
        for c in &mut chosen {
            let e = self.seqs.get_mut(&c.seq).expect("chosen from the map");
            let turn = e
                .turn
                .as_ref()
                .expect("only sequences with a turn are chosen");
            // Drafts fill the rest of the budget, in the order of the step, each truncated to
            // what is left. Only a chunk that reaches the end of the history samples, so only it
            // can carry a draft.
            let sample = e.committed + c.fed == e.history.len();
            if c.fed == 1 && sample {
                if let Some(r) = e.ready.as_ref().filter(|r| r.at == e.history.len()) {
                    let n = r
                        .tokens
                        .len()
                        .min(budget)
                        .min(turn.remaining.saturating_sub(1));
                    let n = verifiable_len(turn, e.content, &r.tokens[..n]);
                    c.draft = r.tokens[..n].to_vec();
                    budget -= n;
                }
            }
            e.in_step = true;
            let fed_tokens = e.history[e.committed..e.committed + c.fed].to_vec();
            let probs = e
                .ready
                .take()
                .and_then(|r| r.probs)
                .map(|p| p[..c.draft.len()].to_vec());
            tokens += c.fed + c.draft.len();
            works.push(VerifyWork {
                seq: c.seq,
                fed: fed_tokens,
                draft: c.draft.clone(),
                draft_probs: if c.draft.is_empty() { None } else { probs },
                sample,
                params: turn.params,
                stop: work_stop(turn, e.content, &c.draft),
            });
        }
        self.in_flight = Some(InFlight { id, chosen });
        Some(PlannedStep { id, works, tokens })
    }
}

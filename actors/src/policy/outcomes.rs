//! What a finished step means for each turn: the tokens each sequence emitted and committed, its
//! acceptance, the counters, and where a turn ends (its token budget, or its stop tokens).

use std::time::Duration;

use troupe_engine::VerifyOutcome;

use super::{Chosen, SchedulerState};
use crate::protocol::{Emission, Turn};

/// The index of the first of `tokens` that ends `turn` at a stop token, when they are emitted in
/// order by a turn that has already emitted a token that is not a stop token if `content`. A stop
/// token ends the turn unless [`Turn::stop_after_content`] makes it an ordinary token because no
/// other token came before it in the turn.
pub(super) fn ending_stop(turn: &Turn, content: bool, tokens: &[u32]) -> Option<usize> {
    let mut content = content || !turn.stop_after_content;
    for (i, t) in tokens.iter().enumerate() {
        if !turn.stop.contains(t) {
            content = true;
        } else if content {
            return Some(i);
        }
    }
    None
}

impl SchedulerState {
    /// Takes the step in flight if it is step `id`; any other step (one from before a verifier
    /// restart) leaves it in flight.
    pub(super) fn take_in_flight(&mut self, id: u64) -> Option<Vec<Chosen>> {
        if self.in_flight.as_ref()?.id != id {
            return None;
        }
        self.in_flight.take().map(|f| f.chosen)
    }

    /// Applies the outcomes of a finished step of `chosen` that took `elapsed`: commits what each
    /// sequence accepted, records the tokens it emitted, and ends the turns that are done.
    pub(super) fn apply_outcomes(
        &mut self,
        chosen: &[Chosen],
        outcomes: &[VerifyOutcome],
        elapsed: Duration,
    ) -> Vec<Emission> {
        let step_tokens: usize = chosen.iter().map(|c| c.fed + c.draft.len()).sum();
        let seconds = elapsed.as_secs_f64();
        self.cost.observe(step_tokens, seconds);
        self.observe_step_time(seconds);
        self.stats.steps += 1;
        self.stats.forward_time += elapsed;
        self.stats.max_step_seqs = self.stats.max_step_seqs.max(chosen.len());
        self.stats.total_step_seqs += chosen.len() as u64;
        self.stats.step_seqs.observe(chosen.len() as f64);
        self.stats.tokens += step_tokens as u64;
        let mut emissions = Vec::new();
        for (o, c) in outcomes.iter().zip(chosen) {
            let Some(e) = self.seqs.get_mut(&c.seq) else {
                continue;
            };
            e.in_step = false;
            debug_assert_eq!(o.seq, c.seq);
            let drafted = c.draft.len();
            let accepted = o.accepted.min(drafted);
            e.committed += c.fed + accepted;
            e.history.extend_from_slice(&o.tokens);
            if drafted > 0 {
                e.acceptance.observe(accepted, drafted);
                e.alpha = e.acceptance.alpha();
            }
            self.stats.drafted += drafted as u64;
            self.stats.drafts += u64::from(drafted > 0);
            self.stats.accepted += accepted as u64;
            self.stats.emitted += o.tokens.len() as u64;
            let mut finished = false;
            if let Some(t) = e.turn.as_mut() {
                t.remaining = t.remaining.saturating_sub(o.tokens.len());
                // The verifier was told the stop tokens that can end the turn in this block (see
                // `plan`) and cut the block after the first, so a stop token that ends the turn
                // is the last one emitted.
                let stopped = ending_stop(t, e.content, &o.tokens).is_some();
                e.content |= o.tokens.iter().any(|x| !t.stop.contains(x));
                if t.remaining == 0 || stopped {
                    finished = true;
                    e.turn = None;
                }
            }
            if finished {
                self.turns.remove(&c.seq);
            }
            emissions.push(Emission {
                seq: c.seq,
                tokens: o.tokens.clone(),
                drafted,
                accepted,
                finished,
                step_time: elapsed,
            });
        }
        // Sequences of the step that returned nothing (should not happen) are freed too.
        for c in chosen {
            if let Some(e) = self.seqs.get_mut(&c.seq) {
                e.in_step = false;
            }
        }
        emissions
    }
}

//! A scripted batched run whose every logit row the kernel and reference paths must agree on.

use troupe_engine::engine::{logits_to_host, StepItem};
use troupe_engine::{Engine, Verifier, WindowSpec};
use troupe_kernels::KernelBackend;

use super::random_tokens;

/// Logits of every row of a scripted run, all batched: sessions whose prompts overflow a window
/// of 2 sinks + 6 and one with a window of 5 and no sinks (two pools, two launches per layer),
/// decode steps, a verify step of which only the first token is kept (the rest rolls back), a
/// session closed and three opened mid-run (a reused slot, and a shape whose pool gains chunks,
/// the last of two slots, while it holds keys: sessions in five chunks attend in one step), more
/// decode steps, the last over one session's scratch from the step before.
pub fn scripted_run<B: KernelBackend>(engine: &mut Engine<B>, vocab: usize) -> Vec<Vec<f32>>
where
    Engine<B>: Verifier,
{
    let (a, b) = (
        WindowSpec::new(2, 6).unwrap(),
        WindowSpec::new(0, 5).unwrap(),
    );
    let mut live: Vec<(u64, Vec<u32>)> = Vec::new();
    let open = |engine: &mut Engine<B>, seq: u64, spec, len| {
        engine.open(seq, spec, 0).unwrap();
        (seq, random_tokens(40 + seq, len, vocab))
    };
    for (seq, spec, len) in [(0, a, 3), (1, a, 11), (2, a, 20), (3, b, 9)] {
        live.push(open(engine, seq, spec, len));
    }
    let mut rows = Vec::new();
    let mut asked = 0;
    for round in 0..8u64 {
        if round == 3 {
            engine.close(1).unwrap();
            live.retain(|(s, _)| *s != 1);
            for (seq, len) in [(4, 7), (5, 2), (6, 13)] {
                live.push(open(engine, seq, a, len));
            }
        }
        let verify = round == 5;
        let items: Vec<StepItem> = live
            .iter()
            .map(|(seq, prompt)| {
                let tokens = if !prompt.is_empty() {
                    prompt.clone()
                } else {
                    random_tokens(90 + 7 * round + seq, if verify { 3 } else { 1 }, vocab)
                };
                StepItem {
                    seq: *seq,
                    logit_rows: tokens.len(),
                    tokens,
                }
            })
            .collect();
        asked += items.iter().map(|i| i.logit_rows).sum::<usize>();
        let out = engine.step(&items).unwrap();
        rows.extend(logits_to_host(out.logits.clone().unwrap()).unwrap());
        let keeps: Vec<usize> = items
            .iter()
            .zip(&live)
            .map(|(item, (_, prompt))| match (round, item.seq) {
                _ if verify && prompt.is_empty() => 1,
                // Session 0 keeps round 6's token in its scratch into round 7.
                (7, 0) => 2,
                _ => item.tokens.len(),
            })
            .collect();
        // Commits batched per window shape, except in two rounds, window by window; in round 6
        // session 0 commits nothing, so round 7 attends over its scratch from an earlier step.
        if round == 2 || round == 6 {
            for (item, &keep) in items.iter().zip(&keeps) {
                if (round, item.seq) != (6, 0) {
                    engine.resolve(item.seq, keep).unwrap();
                }
            }
        } else {
            engine.resolve_step(&out.kv, &items, &keeps).unwrap();
        }
        live.iter_mut().for_each(|(_, prompt)| prompt.clear());
    }
    assert_eq!(rows.len(), asked);
    rows
}

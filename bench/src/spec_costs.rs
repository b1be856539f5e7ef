//! What one speculative step costs on the shipped models, measured apart from the runtime: a
//! verify step of `1 + k` tokens against one of a single token, and each drafter's time for a
//! block of `k` over a held-out context. Together with the acceptance `spec-speedup` measures,
//! they say what speculation can gain on this machine.

use std::time::Instant;

use serde::Serialize;
use troupe::engine::{
    load_verifier, DeviceKind, DraftRequest, Drafter, ModelSource, SamplingParams, Verifier,
    WindowSpec,
};

use crate::demo::{DemoModels, DrafterKind};
use crate::error::Result;
use crate::median;
use crate::step::work;

/// Repetitions timed per figure (after as many to warm up).
const REPEATS: usize = 200;

/// The cost of one draft length.
#[derive(Debug, Clone, Serialize)]
pub struct StepCost {
    /// Drafted tokens per block.
    pub draft_len: usize,
    /// A verify step of `1 + draft_len` tokens, ms (median).
    pub verify_ms: f64,
    /// Over a verify step of one token.
    pub verify_vs_one: f64,
    /// Each drafter's block of `draft_len` tokens, ms (median): (drafter, ms).
    pub draft_ms: Vec<(String, f64)>,
}

fn ms(f: impl FnMut()) -> f64 {
    let mut f = f;
    for _ in 0..REPEATS / 4 {
        f();
    }
    let times: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&times)
}

/// Verify and draft costs at each of `lens` after the context `context` (a held-out prompt).
pub fn step_costs(
    models: &DemoModels,
    device: DeviceKind,
    drafters: &[DrafterKind],
    lens: &[usize],
    context: &[u32],
) -> Result<Vec<StepCost>> {
    let spec = WindowSpec::default();
    let mut verifier = load_verifier(&ModelSource::Dir(&models.verifier), device, models.weights)?;
    let mut built: Vec<(String, Box<dyn Drafter>)> = Vec::new();
    for &kind in drafters {
        built.push((
            kind.name().to_owned(),
            models.drafter_factory(kind, device)?()?,
        ));
    }
    let layers: Vec<usize> = built.iter().flat_map(|(_, d)| d.hidden_layers()).collect();
    verifier.set_hidden_layers(layers);
    // The drafters' context: the prompt and the verifier's states of it. The verifier's next
    // token comes as assumed with every order, so a draft model, whose window keeps only true
    // tokens, has a token to start each block from.
    verifier.open(1, spec, 0)?;
    let out = verifier.verify(&[work(1, context.to_vec(), Vec::new())])?;
    let next = out[0].tokens[0];
    for (_, d) in &mut built {
        d.open(1, spec, 0)?;
        d.observe(1, context)?;
        if !d.hidden_layers().is_empty() {
            d.observe_hidden(1, 0, &out[0].hidden)?;
        }
    }
    verifier.set_hidden_layers(Vec::new());
    // A verify step: a sequence holding the context, fed its next token and `k` drafts; opened
    // afresh each time, so every step sees the same window.
    let mut seq = 10;
    let mut verify = |k: usize| -> Result<f64> {
        let mut err = None;
        let t = ms(|| {
            seq += 1;
            let r = verifier
                .fork(1, seq, 0)
                .and_then(|()| verifier.verify(&[work(seq, vec![next], vec![next; k])]))
                .and_then(|_| verifier.close(seq));
            if let Err(e) = r {
                err = Some(e);
            }
        });
        err.map_or(Ok(()), Err)?;
        Ok(t)
    };
    let one = verify(0)?;
    let mut rows = Vec::new();
    for &k in lens {
        let verify_ms = verify(k)?;
        let mut draft_ms = Vec::new();
        for (name, d) in &mut built {
            let req = DraftRequest {
                seq: 1,
                assumed: vec![next],
                k,
                params: SamplingParams::greedy(),
            };
            let mut err = None;
            let t = ms(|| {
                if let Err(e) = d.draft(std::slice::from_ref(&req)) {
                    err = Some(e);
                }
            });
            err.map_or(Ok(()), Err)?;
            draft_ms.push((name.clone(), t));
        }
        rows.push(StepCost {
            draft_len: k,
            verify_ms,
            verify_vs_one: verify_ms / one.max(1e-9),
            draft_ms,
        });
    }
    Ok(rows)
}

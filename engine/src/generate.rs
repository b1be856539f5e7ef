//! One sequence, start to finish: chunked prefill, then draft-and-verify steps. The CLI's `generate`
//! and the tests' "run alone" reference both use it.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::drafter::{DraftRequest, Drafter};
use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;
use crate::verifier::{SeqId, Verifier, VerifyOutcome, VerifyWork};
use crate::window::WindowSpec;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Tokens drafted per verify step (0: plain decoding).
    pub draft_len: usize,
    /// Sampling.
    pub params: SamplingParams,
    /// Seed of the sequence's sampling.
    pub seed: u64,
    /// The sequence's window.
    pub window: WindowSpec,
    /// Stop after emitting any of these tokens.
    pub stop_tokens: Vec<u32>,
    /// Largest prefill chunk.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            draft_len: 4,
            params: SamplingParams::greedy(),
            seed: 0,
            window: WindowSpec::default(),
            stop_tokens: Vec::new(),
            prefill_chunk: 256,
        }
    }
}

/// Counters of one generation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationStats {
    /// Decode/verify steps after the prefill.
    pub verify_steps: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// Tokens emitted per verify step, on average.
    pub mean_accepted_per_step: f64,
    /// Emitted tokens per second of wall time, prefill included.
    pub tokens_per_s: f64,
    /// Bytes of the sequence's window.
    pub kv_bytes_per_session: u64,
}

/// Generated tokens and counters.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// Counters.
    pub stats: GenerationStats,
}

/// Generates for one prompt on sequence id 0 of `verifier`, drafting with `drafter` when given.
pub fn generate<'d>(
    verifier: &mut dyn Verifier,
    mut drafter: Option<&mut (dyn Drafter + 'd)>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidStep("the prompt is empty".into()));
    }
    crate::engine::check_params(&opts.params)?;
    let seq = 0;
    let start = Instant::now();
    verifier.open(seq, opts.window, opts.seed)?;
    if let Some(d) = drafter.as_deref_mut() {
        d.open(seq, opts.window, opts.seed)?;
        verifier.set_hidden_layers(d.hidden_layers());
    }
    let result = run(verifier, drafter.as_deref_mut(), prompt, opts);
    let _ = verifier.close(seq);
    if let Some(d) = drafter {
        d.close(seq);
    }
    let (tokens, mut stats) = result?;
    stats.kv_bytes_per_session = verifier.kv_bytes(opts.window);
    stats.tokens_per_s = tokens.len() as f64 / start.elapsed().as_secs_f64().max(1e-9);
    stats.mean_accepted_per_step = if stats.verify_steps > 0 {
        stats.accepted as f64 / stats.verify_steps as f64
    } else {
        0.0
    };
    Ok(Generation { tokens, stats })
}

fn run<'d>(
    verifier: &mut dyn Verifier,
    mut drafter: Option<&mut (dyn Drafter + 'd)>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<(Vec<u32>, GenerationStats)> {
    let seq = 0;
    let mut stats = GenerationStats::default();
    let mut out = Vec::new();
    if opts.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let chunk = opts.prefill_chunk.max(1);
    let chunks: Vec<&[u32]> = prompt.chunks(chunk).collect();
    let mut last = None;
    // Positions the verifier's window holds: where the hidden states of the next step begin.
    let mut committed = 0;
    for (i, c) in chunks.iter().enumerate() {
        let is_last = i + 1 == chunks.len();
        let o = verifier.verify(&[VerifyWork {
            seq,
            fed: c.to_vec(),
            draft: vec![],
            draft_probs: None,
            sample: is_last,
            params: opts.params,
            stop: opts.stop_tokens.clone(),
        }])?;
        if is_last {
            last = o[0].tokens.first().copied();
        }
        if let Some(d) = drafter.as_deref_mut() {
            observe_hidden(d, seq, committed, &o[0])?;
        }
        committed += c.len();
    }
    let mut last = last.ok_or_else(|| EngineError::Backend("prefill emitted no token".into()))?;
    out.push(last);
    if let Some(d) = drafter.as_deref_mut() {
        d.observe(seq, prompt)?;
        d.observe(seq, &[last])?;
    }
    while out.len() < opts.max_new_tokens && !opts.stop_tokens.contains(&last) {
        let remaining = opts.max_new_tokens - out.len();
        let k = opts.draft_len.min(remaining.saturating_sub(1));
        let draft = match drafter.as_deref_mut() {
            Some(d) if k > 0 => d
                .draft(&[DraftRequest {
                    seq,
                    assumed: vec![],
                    k,
                    params: opts.params,
                }])?
                .pop()
                .unwrap_or_default(),
            _ => Default::default(),
        };
        stats.drafted += draft.tokens.len();
        let o = verifier
            .verify(&[VerifyWork {
                seq,
                fed: vec![last],
                draft: draft.tokens,
                draft_probs: draft.probs,
                sample: true,
                params: opts.params,
                stop: opts.stop_tokens.clone(),
            }])?
            .pop()
            .ok_or_else(|| EngineError::Backend("verify returned nothing".into()))?;
        stats.verify_steps += 1;
        stats.accepted += o.accepted;
        if let Some(d) = drafter.as_deref_mut() {
            observe_hidden(d, seq, committed, &o)?;
        }
        committed += 1 + o.accepted;
        let mut emitted = o.tokens;
        emitted.truncate(remaining);
        if let Some(p) = emitted.iter().position(|t| opts.stop_tokens.contains(t)) {
            emitted.truncate(p + 1);
        }
        last = *emitted
            .last()
            .ok_or_else(|| EngineError::Backend("verify emitted no token".into()))?;
        if let Some(d) = drafter.as_deref_mut() {
            d.observe(seq, &emitted)?;
        }
        out.extend(emitted);
    }
    Ok((out, stats))
}

/// Hands the drafter the verifier's states of the positions a step committed, if it asked for any.
fn observe_hidden(
    d: &mut (dyn Drafter + '_),
    seq: SeqId,
    from: usize,
    outcome: &VerifyOutcome,
) -> Result<()> {
    if outcome.hidden.is_empty() {
        return Ok(());
    }
    d.observe_hidden(seq, from, &outcome.hidden)
}

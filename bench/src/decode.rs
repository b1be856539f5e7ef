//! The decoding half of the `step` case: one session decoding greedily, plain and with each
//! drafter (prompt-lookup n-grams, a random 1-layer draft model) at each draft length.

use std::collections::HashSet;

use crate::error::Result;
use serde::Serialize;
use troupe::engine::{
    generate, load_model_drafter, Drafter, GenerateOptions, ModelSource, NgramDrafter, Verifier,
};

use crate::step::StepPlan;
use crate::{fmt, markdown, Env};

/// One session's decoding with one drafter.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    /// "none", "ngram" or "model".
    pub drafter: String,
    /// Tokens drafted per step.
    pub draft_len: usize,
    /// Generated tokens per second, the prompt's prefill included.
    pub tokens_per_s: f64,
    /// Drafted tokens accepted per verify step.
    pub mean_accepted_per_step: f64,
    /// Whether the output equals plain greedy decoding (it must).
    pub matches_plain: bool,
    /// Distinct tokens in the output: a random model's greedy output is very repetitive.
    pub distinct_tokens: usize,
}

/// One session decoding a repetitive prompt: plain, then with each drafter and draft length.
pub fn decode_rows(
    plan: &StepPlan,
    v: &mut dyn Verifier,
    env: &Env,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<DecodeRow>> {
    let vocab = plan.model.vocab_size as u32;
    let prompt: Vec<u32> = (0..plan.context as u32)
        .map(|i| (32 + (i % 11) * 7) % vocab)
        .collect();
    let mut draft_model = plan.model.clone();
    draft_model.num_layers = 1;
    let mut model_drafter =
        load_model_drafter(&ModelSource::Random(draft_model, 2), env.device, None)?;
    let mut ngram = NgramDrafter::default();
    let opts = |k: usize, tokens: usize| GenerateOptions {
        max_new_tokens: tokens,
        draft_len: k,
        ..Default::default()
    };
    // Warm both models up on the shapes decoding uses.
    generate(v, Some(model_drafter.as_mut()), &prompt, &opts(4, 16))?;
    let plain = generate(v, None, &prompt, &opts(0, plan.decode_tokens))?;
    bar.inc(1);
    let mut rows = vec![DecodeRow {
        drafter: "none".into(),
        draft_len: 0,
        tokens_per_s: plain.stats.tokens_per_s,
        mean_accepted_per_step: 0.0,
        matches_plain: true,
        distinct_tokens: distinct(&plain.tokens),
    }];
    for &k in &plan.decode_draft_lens {
        let drafters: [&mut dyn Drafter; 2] = [&mut ngram, model_drafter.as_mut()];
        for d in drafters {
            let name = d.name().to_owned();
            let g = generate(v, Some(d), &prompt, &opts(k, plan.decode_tokens))?;
            rows.push(DecodeRow {
                drafter: name,
                draft_len: k,
                tokens_per_s: g.stats.tokens_per_s,
                mean_accepted_per_step: g.stats.mean_accepted_per_step,
                matches_plain: g.tokens == plain.tokens,
                distinct_tokens: distinct(&g.tokens),
            });
            bar.inc(1);
        }
    }
    Ok(rows)
}

fn distinct(tokens: &[u32]) -> usize {
    tokens.iter().collect::<HashSet<_>>().len()
}

/// The decoding comparison as a markdown table.
pub fn decode_table(plan: &StepPlan, decode: &[DecodeRow]) -> String {
    let plain = decode.first().map_or(1.0, |r| r.tokens_per_s);
    let rows: Vec<Vec<String>> = decode
        .iter()
        .map(|r| {
            vec![
                r.drafter.clone(),
                r.draft_len.to_string(),
                fmt(r.tokens_per_s),
                format!("{:.2}x", r.tokens_per_s / plain.max(1e-12)),
                format!("{:.2}", r.mean_accepted_per_step),
                r.matches_plain.to_string(),
                r.distinct_tokens.to_string(),
            ]
        })
        .collect();
    let headers = [
        "drafter",
        "k",
        "tok/s",
        "vs plain",
        "accepted/step",
        "= plain",
        "distinct tokens",
    ];
    format!(
        "One session, greedy, {} new tokens from a repetitive {}-token prompt (prefill \
         included; model = a random 1-layer drafter):\n\n{}",
        plan.decode_tokens,
        plan.context,
        markdown(&headers, &rows)
    )
}

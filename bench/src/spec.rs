//! The `spec-speedup` case: one session decodes held-out corpus prompts with the shipped demo
//! models, plainly and with each drafter at each draft length, and with the adaptive policy that
//! picks the length from acceptance and load. Every output must equal plain decoding's.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use troupe::{FaultPlan, GenerateParams, SchedulerConfig};

use crate::demo::{DemoModels, DrafterKind, Setup, StreamRun};
use crate::error::{BenchError, Result};
use crate::plot::{lines, Axes, Series};
use crate::spec_costs::{step_costs, StepCost};
use crate::{finish, fmt, markdown, mean, progress, Case, Env};

/// What the `spec-speedup` case measures.
#[derive(Debug, Clone)]
pub struct SpecPlan {
    /// The served models and the corpus prompts come from.
    pub models: DemoModels,
    /// Drafters to compare.
    pub drafters: Vec<DrafterKind>,
    /// Fixed draft lengths; the adaptive policy runs as well, up to the longest.
    pub draft_lens: Vec<usize>,
    /// Held-out prompts decoded one after another.
    pub prompts: usize,
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per prompt.
    pub new_tokens: usize,
}

impl SpecPlan {
    /// The full comparison, or a short one.
    pub fn new(quick: bool) -> Self {
        Self {
            models: DemoModels::default(),
            drafters: vec![DrafterKind::Ngram, DrafterKind::Model, DrafterKind::Block],
            draft_lens: if quick {
                vec![2, 4, 8]
            } else {
                vec![2, 4, 8, 16]
            },
            prompts: if quick { 2 } else { 8 },
            prompt_len: 64,
            new_tokens: if quick { 32 } else { 128 },
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct SpecRow {
    /// "ngram", "model" or "block".
    pub drafter: String,
    /// Tokens drafted per block, or "adaptive".
    pub draft_len: Value,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// `tokens_per_s` over plain decoding's.
    pub speedup_vs_ar: f64,
    /// Drafted tokens accepted per verify step.
    pub mean_accepted_per_step: f64,
    /// Drafted tokens verified.
    pub drafted: usize,
    /// Of which accepted.
    pub accepted: usize,
    /// Whether every output equals plain decoding's (it must).
    pub matches_ar: bool,
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &SpecPlan, env: &Env) -> Result<Value> {
    let runs = 2 + plan.drafters.len() * (plan.draft_lens.len() + 1);
    let bar = progress(runs as u64, "spec-speedup");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let (ar_runs, rows) = rt.block_on(measure(plan, env, &bar))?;
    let ar = mean(&ar_runs);
    bar.finish_and_clear();
    let context = plan.models.held_out_prompts(1, plan.prompt_len)?.remove(0);
    let costs = step_costs(
        &plan.models,
        env.device,
        &plan.drafters,
        &plan.draft_lens,
        &context,
    )?;

    let report = json!({
        "case": "spec-speedup",
        "prompts": plan.prompts,
        "prompt_len": plan.prompt_len,
        "new_tokens": plan.new_tokens,
        "ar_tokens_per_s": ar,
        "ar_runs_tokens_per_s": ar_runs,
        "rows": rows,
        "step_costs": costs,
    });
    let series: Vec<Series> = plan
        .drafters
        .iter()
        .map(|d| {
            let pts = rows
                .iter()
                .filter(|r| r.drafter == d.name())
                .filter_map(|r| Some((r.draft_len.as_f64()?, r.speedup_vs_ar)))
                .collect();
            (d.name().to_owned(), pts)
        })
        .chain(std::iter::once((
            "plain decoding".to_owned(),
            plan.draft_lens.iter().map(|&k| (k as f64, 1.0)).collect(),
        )))
        .collect();
    let axes = Axes {
        title: "speculative speedup on the demo models",
        x: "draft length",
        y: "speedup over plain decoding",
        log_x: true,
    };
    lines(&env.out_file(Case::SpecSpeedup, "svg")?, &axes, &series)?;
    let table = format!("{}\n\n{}", table(plan, ar, &rows), cost_table(&costs));
    finish(env, Case::SpecSpeedup, report, &table)
}

/// Plain decoding's tokens/s in a run before the drafters and one after (their mean is the
/// baseline, so drift of a shared machine spreads evenly), and a row per drafter and length.
async fn measure(
    plan: &SpecPlan,
    env: &Env,
    bar: &indicatif::ProgressBar,
) -> Result<([f64; 2], Vec<SpecRow>)> {
    let prompts = plan
        .models
        .held_out_prompts(plan.prompts, plan.prompt_len)?;
    let params = GenerateParams::greedy(plan.new_tokens);
    let plain = || async {
        let run = plan
            .models
            .decode(env.device, Setup::plain(), &prompts, params.clone())
            .await?;
        bar.inc(1);
        Ok::<_, BenchError>(run)
    };
    let first = plain().await?;
    let mut runs: Vec<(DrafterKind, Option<usize>, StreamRun)> = Vec::new();
    let longest = plan.draft_lens.iter().copied().max().unwrap_or(4);
    for &d in &plan.drafters {
        let lens = plan.draft_lens.iter().map(|&k| Some(k)).chain([None]);
        for k in lens {
            let config = match k {
                // A fixed length: no adaptation, and every step waits for its draft.
                Some(k) => SchedulerConfig::default()
                    .with_max_draft_len(k)
                    .with_adaptive(false)
                    .with_draft_wait(Some(Duration::from_secs(600))),
                None => SchedulerConfig::default().with_max_draft_len(longest),
            };
            let setup = Setup {
                drafter: Some(d),
                config,
                faults: FaultPlan::default(),
            };
            let run = plan
                .models
                .decode(env.device, setup, &prompts, params.clone())
                .await?;
            bar.inc(1);
            runs.push((d, k, run));
        }
    }
    let last = plain().await?;
    let ar_runs = [first.tokens_per_s(), last.tokens_per_s()];
    let ar = mean(&ar_runs);
    let rows = runs
        .into_iter()
        .map(|(d, k, run)| SpecRow {
            drafter: d.name().into(),
            draft_len: k.map_or(json!("adaptive"), |k| json!(k)),
            tokens_per_s: run.tokens_per_s(),
            speedup_vs_ar: run.tokens_per_s() / ar.max(1e-9),
            mean_accepted_per_step: run.accepted_per_step(),
            drafted: run.drafted,
            accepted: run.accepted,
            matches_ar: run.outputs == first.outputs && run.outputs == last.outputs,
        })
        .collect();
    Ok((ar_runs, rows))
}

fn table(plan: &SpecPlan, ar: f64, rows: &[SpecRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.drafter.clone(),
                match &r.draft_len {
                    Value::String(s) => s.clone(),
                    k => k.to_string(),
                },
                fmt(r.tokens_per_s),
                format!("{:.2}x", r.speedup_vs_ar),
                format!("{:.2}", r.mean_accepted_per_step),
                format!("{:.2}", r.accepted as f64 / (r.drafted as f64).max(1.0)),
                r.matches_ar.to_string(),
            ]
        })
        .collect();
    let headers = [
        "drafter",
        "draft len",
        "tok/s",
        "vs plain",
        "accepted/step",
        "acceptance",
        "= plain",
    ];
    format!(
        "One session, greedy, {} held-out corpus prompts of {} tokens, {} new tokens each; plain \
         decoding {} tok/s:\n\n{}",
        plan.prompts,
        plan.prompt_len,
        plan.new_tokens,
        fmt(ar),
        markdown(&headers, &body)
    )
}

fn cost_table(costs: &[StepCost]) -> String {
    let names: Vec<String> = costs
        .first()
        .map(|c| c.draft_ms.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let body: Vec<Vec<String>> = costs
        .iter()
        .map(|c| {
            let mut row = vec![
                c.draft_len.to_string(),
                format!("{:.3}", c.verify_ms),
                format!("{:.2}x", c.verify_vs_one),
            ];
            row.extend(c.draft_ms.iter().map(|(_, ms)| format!("{ms:.3}")));
            row
        })
        .collect();
    let mut headers = vec![
        "draft len".to_owned(),
        "verify 1 + k, ms".to_owned(),
        "vs 1 token".to_owned(),
    ];
    headers.extend(names.iter().map(|n| format!("{n} draft, ms")));
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    format!(
        "Step costs (medians, the engine alone, one session):\n\n{}",
        markdown(&headers, &body)
    )
}

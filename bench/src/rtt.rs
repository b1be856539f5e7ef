//! The `rtt-sweep` case, after the seed report's cross-host sweep: one session decodes held-out corpus
//! prompts with the shipped demo models while every draft block pays an injected
//! proposer↔verifier round trip, with pipelined drafting on and off. The scheduler waits for every
//! draft (the raw curve the seed measured); the adaptive policy, which stops waiting when drafts
//! stop paying, is measured beside it.

use crate::error::{BenchError, Result};
use serde::Serialize;
use serde_json::json;
use std::time::Duration;
use troupe::{FaultPlan, GenerateParams, SchedulerConfig};

use crate::demo::{DemoModels, DrafterKind, Setup};
use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, median, progress, Case, Env};

/// The seed report on an H200 (Gemma-4-26B verifier, DFlash drafter): (round trip ms, speedup over AR).
const SEED: &[(f64, f64)] = &[(0.0, 2.20), (100.0, 1.0), (150.0, 0.77)];

/// What the `rtt-sweep` case measures.
#[derive(Debug, Clone)]
pub struct RttPlan {
    /// The served models and the corpus prompts come from.
    pub models: DemoModels,
    /// The drafter whose blocks pay the round trip.
    pub drafter: DrafterKind,
    /// Injected round trips per block, in ms.
    pub rtts_ms: Vec<u64>,
    /// Held-out prompts decoded one after another.
    pub prompts: usize,
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per prompt.
    pub new_tokens: usize,
    /// Tokens drafted per block.
    pub draft_len: usize,
}

impl RttPlan {
    /// The seed's sweep, or a short one.
    pub fn new(quick: bool) -> Self {
        Self {
            models: DemoModels::default(),
            drafter: DrafterKind::Model,
            rtts_ms: if quick {
                vec![0, 15, 50]
            } else {
                vec![0, 5, 15, 30, 50, 100, 150, 250]
            },
            prompts: if quick { 2 } else { 4 },
            prompt_len: 64,
            new_tokens: if quick { 32 } else { 96 },
            draft_len: 4,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct RttRow {
    /// Injected round trip per draft block.
    pub rtt_ms: u64,
    /// Whether block n+1 was drafted while block n was verified.
    pub pipelined: bool,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// `tokens_per_s` over plain decoding's, measured beside it.
    pub speedup_vs_ar: f64,
    /// Drafted tokens accepted per verify step.
    pub mean_accepted_per_block: f64,
    /// Whether every output equals plain decoding's (it must).
    pub matches_ar: bool,
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &RttPlan, env: &Env) -> Result<serde_json::Value> {
    let bar = progress(3 * plan.rtts_ms.len() as u64, "rtt-sweep");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::AsyncRuntime)?;
    let (ar_runs, rows, adaptive) = rt.block_on(measure(plan, env, &bar))?;
    bar.finish_and_clear();

    let ar_tps = median(&ar_runs);
    let ar_step_ms = 1e3 / ar_tps.max(1e-9);
    let curve = |pipelined: bool| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.pipelined == pipelined)
            .map(|r| (r.rtt_ms as f64, r.speedup_vs_ar))
            .collect()
    };
    let (pipe_be, pipe_how) = break_even(&curve(true));
    let (serial_be, serial_how) = break_even(&curve(false));
    let report = json!({
        "case": "rtt-sweep",
        "drafter": plan.drafter.name(),
        "draft_len": plan.draft_len,
        "new_tokens": plan.new_tokens,
        "ar_tokens_per_s": ar_tps,
        "ar_runs_tokens_per_s": ar_runs,
        "ar_step_ms": ar_step_ms,
        "rows": rows,
        "adaptive_rows": adaptive,
        "break_even_rtt_ms": {"pipelined": pipe_be, "serial": serial_be},
        "break_even_in_ar_steps": {
            "pipelined": pipe_be / ar_step_ms,
            "serial": serial_be / ar_step_ms,
        },
        "break_even_method": {"pipelined": pipe_how, "serial": serial_how},
        "seed": {"speedup_at_rtt_ms": SEED, "break_even_rtt_ms": 100.0},
    });
    let series: Vec<Series> = vec![
        ("pipelined".into(), curve(true)),
        ("serial".into(), curve(false)),
        (
            "adaptive (pipelined)".into(),
            adaptive
                .iter()
                .map(|r| (r.rtt_ms as f64, r.speedup_vs_ar))
                .collect(),
        ),
        ("seed (H200, 26B + DFlash)".into(), SEED.to_vec()),
        (
            "plain decoding".into(),
            plan.rtts_ms.iter().map(|&r| (r as f64, 1.0)).collect(),
        ),
    ];
    let axes = Axes {
        title: "speculative speedup against proposer-verifier round trip",
        x: "round trip per draft block (ms)",
        y: "speedup over plain decoding",
        log_x: false,
    };
    lines(&env.out_file(Case::RttSweep, "svg")?, &axes, &series)?;
    let table = table(
        plan,
        ar_tps,
        &rows,
        &adaptive,
        [pipe_be, serial_be],
        ar_step_ms,
    );
    finish(env, Case::RttSweep, report, &table)
}

/// Plain decoding is measured again right before each run, and each row's speedup is over that
/// neighbour, so drift of a shared machine cancels. Returns the plain runs' tokens/s, the rows that
/// wait for every draft, and the adaptive rows.
async fn measure(
    plan: &RttPlan,
    env: &Env,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<f64>, Vec<RttRow>, Vec<RttRow>)> {
    let prompts = plan
        .models
        .held_out_prompts(plan.prompts, plan.prompt_len)?;
    let params = GenerateParams::greedy(plan.new_tokens);
    let mut ar_runs = Vec::new();
    let mut rows = Vec::new();
    let mut adaptive = Vec::new();
    for &rtt in &plan.rtts_ms {
        let faults = FaultPlan::default().proposer_rtt(Duration::from_millis(rtt));
        for (pipelined, waits) in [(true, true), (false, true), (true, false)] {
            let ar = plan
                .models
                .decode(env.device, Setup::plain(), &prompts, params.clone())
                .await?;
            ar_runs.push(ar.tokens_per_s());
            let config = SchedulerConfig::default()
                .with_max_draft_len(plan.draft_len)
                .with_pipelined(pipelined)
                .with_adaptive(!waits)
                // The raw curve: every step waits for its draft, however late.
                .with_draft_wait(waits.then_some(Duration::from_secs(600)));
            let setup = Setup {
                drafter: Some(plan.drafter),
                config,
                faults: faults.clone(),
            };
            let run = plan
                .models
                .decode(env.device, setup, &prompts, params.clone())
                .await?;
            bar.inc(1);
            let row = RttRow {
                rtt_ms: rtt,
                pipelined,
                tokens_per_s: run.tokens_per_s(),
                speedup_vs_ar: run.tokens_per_s() / ar.tokens_per_s().max(1e-9),
                mean_accepted_per_block: run.accepted_per_step(),
                matches_ar: run.outputs == ar.outputs,
            };
            if waits {
                rows.push(row);
            } else {
                adaptive.push(row);
            }
        }
    }
    Ok((ar_runs, rows, adaptive))
}

/// Where a speedup curve `(rtt, speedup)` crosses 1: interpolated between the two points around
/// the crossing, or extrapolated from the last two points (1/speedup grows linearly with the round
/// trip once it is no longer hidden) when the sweep never reaches it. Returns the round trip and
/// how it was found.
pub fn break_even(curve: &[(f64, f64)]) -> (f64, &'static str) {
    let mut pts = curve.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    match pts.first() {
        None => return (0.0, "no data"),
        Some(&(r, s)) if s < 1.0 => return (r, "slower at every round trip"),
        _ => {}
    }
    for w in pts.windows(2) {
        let ((r1, s1), (r2, s2)) = (w[0], w[1]);
        if s1 >= 1.0 && s2 < 1.0 {
            return (r1 + (s1 - 1.0) / (s1 - s2) * (r2 - r1), "interpolated");
        }
    }
    if let [.., (r1, s1), (r2, s2)] = pts[..] {
        let (i1, i2) = (1.0 / s1.max(1e-9), 1.0 / s2.max(1e-9));
        if i2 > i1 && r2 > r1 {
            return (r2 + (1.0 - i2) / (i2 - i1) * (r2 - r1), "extrapolated");
        }
    }
    let last = pts.last().map_or(0.0, |p| p.0);
    (last, "at least (no slowdown seen)")
}

fn table(
    plan: &RttPlan,
    ar_tps: f64,
    rows: &[RttRow],
    adaptive: &[RttRow],
    be: [f64; 2],
    ar_step_ms: f64,
) -> String {
    let find = |set: &[RttRow], rtt: u64, p: bool| {
        set.iter()
            .find(|r| r.rtt_ms == rtt && r.pipelined == p)
            .map_or("-".into(), |r| format!("{:.2}x", r.speedup_vs_ar))
    };
    let seed = |rtt: u64| {
        SEED.iter()
            .find(|s| s.0 == rtt as f64)
            .map_or("-".into(), |s| format!("{:.2}x", s.1))
    };
    let body: Vec<Vec<String>> = plan
        .rtts_ms
        .iter()
        .map(|&rtt| {
            let acc = rows
                .iter()
                .find(|r| r.rtt_ms == rtt && r.pipelined)
                .map_or("-".into(), |r| format!("{:.2}", r.mean_accepted_per_block));
            vec![
                rtt.to_string(),
                format!("{:.1}", rtt as f64 / ar_step_ms),
                find(rows, rtt, true),
                find(rows, rtt, false),
                find(adaptive, rtt, true),
                acc,
                seed(rtt),
            ]
        })
        .collect();
    let headers = [
        "rtt ms",
        "rtt in AR steps",
        "pipelined",
        "serial",
        "adaptive",
        "accepted/block",
        "seed",
    ];
    format!(
        "One session, {} held-out prompts × {} tokens, {} drafter, {} tokens per block; plain \
         decoding {} tok/s ({:.2} ms per token):\n\n{}\n\
         Break-even round trip: pipelined {:.1} ms ({:.1} AR steps), serial {:.1} ms ({:.1} AR \
         steps). The seed report (H200): 2.20x co-located, break-even near 100 ms, 0.77x at 150 ms.\n",
        plan.prompts,
        plan.new_tokens,
        plan.drafter.name(),
        plan.draft_len,
        fmt(ar_tps),
        ar_step_ms,
        markdown(&headers, &body),
        be[0],
        be[0] / ar_step_ms,
        be[1],
        be[1] / ar_step_ms,
    )
}

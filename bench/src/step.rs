//! The `step` case: the engine alone. The time of one batched verify step against the number of
//! sequences and the draft length, each sequence's window already full; then the greedy decoding
//! speed of one session, plain and with an n-gram or a small-model drafter.

use std::time::Instant;

use crate::error::{ensure, BenchError, Result};
use serde::Serialize;
use serde_json::json;
use troupe::engine::{
    load_verifier, ModelConfig, SamplingParams, Verifier, VerifyWork, WindowSpec,
};

use crate::decode::{decode_rows, decode_table, DecodeRow};
use crate::plot::{lines, Axes, Series};
use crate::{finish, fmt, markdown, median, progress, Case, Env};

/// What the `step` case measures.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// Shape of the verifier (random weights).
    pub model: ModelConfig,
    /// Sequences per step.
    pub batches: Vec<usize>,
    /// Drafted tokens per sequence per step.
    pub draft_lens: Vec<usize>,
    /// Tokens in each sequence's window when timing starts.
    pub context: usize,
    /// Slots of each window, each measured in turn; a window of exactly `context` slots stays
    /// full, so its context is the same however many steps run.
    pub capacities: Vec<usize>,
    /// Untimed steps before each measurement.
    pub warmup: usize,
    /// Timed steps per measurement; the median is reported.
    pub reps: usize,
    /// Tokens one session decodes in the decoding comparison.
    pub decode_tokens: usize,
    /// Draft lengths of the decoding comparison (each with both drafters).
    pub decode_draft_lens: Vec<usize>,
    /// Tokens of one sequence's prompt run in one step into a fresh window, as
    /// `llama-bench -p` measures prompt speed (0: not measured).
    pub prompt: usize,
}

impl StepPlan {
    /// The full sweep, or the quick one.
    pub fn new(quick: bool) -> Self {
        Self {
            model: bench_model(),
            batches: vec![1, 2, 4, 8, 16, 32, 64],
            draft_lens: vec![0, 4, 8],
            context: 128,
            capacities: vec![128],
            warmup: if quick { 2 } else { 3 },
            reps: if quick { 5 } else { 15 },
            decode_tokens: if quick { 128 } else { 512 },
            decode_draft_lens: vec![4, 8],
            prompt: 0,
        }
    }

    /// The sweep for a real shape (`--model`, `--preset`), whose steps take a thousand times
    /// longer: decode and verify at 1, 8 (and 64) sequences, and no drafted decoding.
    pub fn for_model(quick: bool, model: ModelConfig) -> Self {
        Self {
            model,
            batches: if quick { vec![1, 8] } else { vec![1, 8, 64] },
            draft_lens: vec![0, 4],
            context: 128,
            // Equal fill, two capacities: what a step costs must not depend on the second.
            capacities: vec![128, 1024],
            warmup: 1,
            reps: if quick { 3 } else { 5 },
            decode_tokens: 0,
            decode_draft_lens: Vec::new(),
            prompt: 256,
        }
    }
}

/// The benchmark model: the `tiny` preset widened to hidden 256, intermediate 768, 4 layers, 8
/// heads, 4 KV heads of 32, byte vocabulary. Its output head is not tied to the embedding: with
/// tied random weights greedy decoding emits one token forever, and every drafter looks perfect.
pub fn bench_model() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").expect("the tiny preset exists");
    c.tie_word_embeddings = false;
    c.hidden_size = 256;
    c.intermediate_size = 768;
    c.num_layers = 4;
    c.num_heads = 8;
    c.num_kv_heads = 4;
    c.head_dim = 32;
    c.vocab_size = 256;
    c
}

/// One measured step shape.
#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    /// Slots of each window.
    pub capacity: usize,
    /// Sequences in the step.
    pub batch: usize,
    /// Drafted tokens per sequence.
    pub draft_len: usize,
    /// Median wall time of one step.
    pub ms_per_step: f64,
    /// Query tokens through the verifier per second: batch × (1 + draft_len) / step time.
    pub tokens_per_s: f64,
}

/// How fast the windows were filled: prefill steps of up to 8 sequences × `context` tokens.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillRow {
    /// Sequences per prefill step.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Median wall time of one prefill step.
    pub ms_per_step: f64,
    /// Prompt tokens per second.
    pub tokens_per_s: f64,
}

/// A deterministic pseudo-random token.
fn token(i: u64, vocab: usize) -> u32 {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    (x % vocab as u64) as u32
}

/// A greedy verify work: `fed`, then `draft` to verify.
pub(crate) fn work(seq: u64, fed: Vec<u32>, draft: Vec<u32>) -> VerifyWork {
    VerifyWork {
        seq,
        fed,
        draft,
        draft_probs: None,
        sample: true,
        params: SamplingParams::greedy(),
        stop: Vec::new(),
    }
}

/// Runs the case; returns the report it wrote.
pub fn run(plan: &StepPlan, env: &Env) -> Result<serde_json::Value> {
    ensure!(
        plan.context > 4,
        "the context must exceed the 4 sink tokens"
    );
    let source = env.model.source(&plan.model)?;
    let plan = &StepPlan {
        model: env.model.config(&plan.model)?,
        ..plan.clone()
    };
    let loading = Instant::now();
    let mut v = load_verifier(&source.as_model_source(), env.device, env.weights)?;
    let load_ms = loading.elapsed().as_secs_f64() * 1e3;
    let decoding = plan.decode_tokens > 0 && !plan.decode_draft_lens.is_empty();
    let bar = progress(
        (plan.capacities.len() * plan.batches.len() * plan.draft_lens.len()
            + if decoding {
                1 + 2 * plan.decode_draft_lens.len()
            } else {
                0
            }) as u64,
        "step",
    );
    let mut rows = Vec::new();
    let mut prefill = None;
    for &capacity in &plan.capacities {
        let (p, r) = step_rows(plan, capacity, v.as_mut(), &bar)?;
        prefill.get_or_insert(p);
        rows.extend(r);
    }
    let prefill = prefill.ok_or_else(|| BenchError::Invalid("no capacity to measure".into()))?;
    let prompt = prompt_row(plan, v.as_mut())?;
    let decode = if decoding {
        decode_rows(plan, v.as_mut(), env, &bar)?
    } else {
        Vec::new()
    };
    bar.finish_and_clear();

    let report = json!({
        "case": "step",
        "model": {
            "hidden": plan.model.hidden_size, "intermediate": plan.model.intermediate_size,
            "layers": plan.model.num_layers, "heads": plan.model.num_heads,
            "kv_heads": plan.model.num_kv_heads, "head_dim": plan.model.head_dim,
            "vocab": plan.model.vocab_size,
        },
        "context": plan.context,
        "load_ms": load_ms,
        "prefill": prefill,
        "prompt": prompt,
        "reps": plan.reps,
        "decode_tokens": plan.decode_tokens,
        "rows": rows,
        "decode": decode,
    });
    let series: Vec<Series> = plan
        .capacities
        .iter()
        .flat_map(|&c| plan.draft_lens.iter().map(move |&k| (c, k)))
        .map(|(c, k)| {
            let pts = rows.iter().filter(|r| r.draft_len == k && r.capacity == c);
            (
                format!("draft {k}, {c} slots"),
                pts.map(|r| (r.batch as f64, r.ms_per_step)).collect(),
            )
        })
        .collect();
    let axes = Axes {
        title: &format!("verify step time, context {}", plan.context),
        x: "sequences per step",
        y: "ms per step",
        log_x: true,
    };
    lines(&env.out_file(Case::Step, "svg")?, &axes, &series)?;
    finish(
        env,
        Case::Step,
        report,
        &tables(plan, &prefill, prompt.as_ref(), &rows, &decode),
    )
}

/// One sequence's prompt of `plan.prompt` tokens in one step into a fresh window (the median
/// of `plan.reps` after one untimed), as `llama-bench -p` measures prompt speed.
fn prompt_row(plan: &StepPlan, v: &mut dyn Verifier) -> Result<Option<PrefillRow>> {
    if plan.prompt == 0 {
        return Ok(None);
    }
    let spec = WindowSpec::new(4, plan.prompt + 4)?;
    let mut times = Vec::with_capacity(plan.reps);
    for rep in 0..=plan.reps {
        let seq = 1 << 40 | rep as u64;
        v.open(seq, spec, 0)?;
        let fed = (0..plan.prompt as u64).map(|i| token(seq + i, plan.model.vocab_size));
        let t = Instant::now();
        let done = v.verify(&[work(seq, fed.collect(), Vec::new())]);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        v.close(seq)?;
        done?;
        if rep > 0 {
            times.push(ms);
        }
    }
    let ms = median(&times);
    Ok(Some(PrefillRow {
        batch: 1,
        tokens: plan.prompt,
        ms_per_step: ms,
        tokens_per_s: plan.prompt as f64 / (ms / 1e3).max(1e-12),
    }))
}

/// Times the verify step for every batch size and draft length.
fn step_rows(
    plan: &StepPlan,
    capacity: usize,
    v: &mut dyn Verifier,
    bar: &indicatif::ProgressBar,
) -> Result<(PrefillRow, Vec<StepRow>)> {
    let vocab = plan.model.vocab_size;
    ensure!(
        capacity >= plan.context,
        "a window of {capacity} slots cannot hold the {} context tokens",
        plan.context
    );
    let spec = WindowSpec::new(4, capacity - 4)?;
    let n = plan.batches.iter().copied().max().unwrap_or(1) as u64;
    for s in 0..n {
        v.open(s, spec, s)?;
    }
    // Fill every window, a few sequences per step; keep each one's last emitted token.
    let mut last = vec![0u32; n as usize];
    let seqs: Vec<u64> = (0..n).collect();
    let mut fills = Vec::new();
    for group in seqs.chunks(8) {
        let works: Vec<VerifyWork> = group
            .iter()
            .map(|&s| {
                let fed = (0..plan.context as u64).map(|i| token(s * 100_003 + i, vocab));
                work(s, fed.collect(), Vec::new())
            })
            .collect();
        let t = Instant::now();
        let out = v.verify(&works)?;
        fills.push((group.len(), t.elapsed().as_secs_f64() * 1e3));
        for o in out {
            last[o.seq as usize] = *o.tokens.last().unwrap_or(&0);
        }
    }
    let batch = fills.first().map_or(0, |f| f.0);
    let full: Vec<f64> = fills.iter().filter(|f| f.0 == batch).map(|f| f.1).collect();
    let ms = median(&full);
    let prefill = PrefillRow {
        batch,
        tokens: plan.context,
        ms_per_step: ms,
        tokens_per_s: (batch * plan.context) as f64 / (ms / 1e3).max(1e-12),
    };
    let mut rows = Vec::new();
    let mut salt = 0u64;
    for &batch in &plan.batches {
        for &k in &plan.draft_lens {
            let mut times = Vec::with_capacity(plan.reps);
            for rep in 0..plan.warmup + plan.reps {
                let works: Vec<VerifyWork> = (0..batch as u64)
                    .map(|s| {
                        salt += 1;
                        let draft = (0..k as u64).map(|i| token(salt * 31 + i, vocab));
                        work(s, vec![last[s as usize]], draft.collect())
                    })
                    .collect();
                let t = Instant::now();
                let out = v.verify(&works)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                for o in out {
                    last[o.seq as usize] = *o.tokens.last().unwrap_or(&0);
                }
                if rep >= plan.warmup {
                    times.push(ms);
                }
            }
            let ms = median(&times);
            rows.push(StepRow {
                capacity,
                batch,
                draft_len: k,
                ms_per_step: ms,
                tokens_per_s: (batch * (1 + k)) as f64 / (ms / 1e3).max(1e-12),
            });
            bar.inc(1);
        }
    }
    for s in 0..n {
        v.close(s)?;
    }
    Ok((prefill, rows))
}

fn tables(
    plan: &StepPlan,
    prefill: &PrefillRow,
    prompt: Option<&PrefillRow>,
    rows: &[StepRow],
    decode: &[DecodeRow],
) -> String {
    let mut headers = vec!["slots".to_owned(), "batch".to_owned()];
    for k in &plan.draft_lens {
        headers.push(format!("k={k} ms/step"));
        headers.push(format!("k={k} tok/s"));
    }
    let mut body: Vec<Vec<String>> = Vec::new();
    for &capacity in &plan.capacities {
        for &b in &plan.batches {
            let mut r = vec![capacity.to_string(), b.to_string()];
            for row in rows
                .iter()
                .filter(|r| r.batch == b && r.capacity == capacity)
            {
                r.push(format!("{:.2}", row.ms_per_step));
                r.push(fmt(row.tokens_per_s));
            }
            body.push(r);
        }
    }
    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
    let decode = if decode.is_empty() {
        String::new()
    } else {
        decode_table(plan, decode)
    };
    let prompt = prompt.map_or(String::new(), |p| {
        format!(
            "Prompt: 1 sequence × {} tokens in one step, {:.1} ms ({} tokens/s)\n\n",
            p.tokens,
            p.ms_per_step,
            fmt(p.tokens_per_s)
        )
    });
    format!(
        "Verify step, {} context tokens per sequence (slots = window capacity; k = drafted tokens \
         per sequence; tok/s = query tokens through the verifier):\n\n{}\nPrefill: {} sequences \
         × {} tokens in {:.1} ms ({} tokens/s)\n\n{}{}",
        plan.context,
        markdown(&h, &body),
        prefill.batch,
        prefill.tokens,
        prefill.ms_per_step,
        fmt(prefill.tokens_per_s),
        prompt,
        decode
    )
}

//! `GET /metrics`: Prometheus text with vLLM's metric names, histogram buckets and `model_name`
//! label under a `troupe:` prefix (a dashboard made for vLLM needs only its prefix changed), plus
//! troupe's own: sessions, KV bytes, window evictions, verifier restarts and sequences per step.
//!
//! The request histograms are the server's ([`Timings`], one per request, feeds them); queue
//! time, sequences per step, drafts and evictions are the runtime's.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::{web, HttpResponse};
use troupe::actors::Histogram;

use crate::error::ApiError;
use crate::state::{AppState, Counters};

/// vLLM's buckets for inter-token latency and time per output token, in seconds.
const TOKEN_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's buckets for whole-request latencies, in seconds.
const REQUEST_SECONDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The latency histograms of the requests served.
#[derive(Debug)]
pub struct RequestHistograms {
    /// Arrival to first token.
    pub ttft: Mutex<Histogram>,
    /// Between tokens.
    pub inter_token: Mutex<Histogram>,
    /// Decode time over the tokens after the first.
    pub per_output_token: Mutex<Histogram>,
    /// Arrival to the last token.
    pub e2e: Mutex<Histogram>,
}

impl Default for RequestHistograms {
    fn default() -> Self {
        Self {
            ttft: Mutex::new(Histogram::seconds()),
            inter_token: Mutex::new(Histogram::new(TOKEN_SECONDS)),
            per_output_token: Mutex::new(Histogram::new(TOKEN_SECONDS)),
            e2e: Mutex::new(Histogram::new(REQUEST_SECONDS)),
        }
    }
}

fn observe(h: &Mutex<Histogram>, v: f64) {
    if let Ok(mut h) = h.lock() {
        h.observe(v);
    }
}

/// One request's clock: it counts the request as waiting until its first token, and feeds the
/// latency histograms as tokens come and when it finishes.
pub struct Timings {
    counters: Arc<Counters>,
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Timings {
    /// A request that arrived now, waiting for its first token.
    pub fn start(counters: Arc<Counters>) -> Self {
        counters.waiting.fetch_add(1, Ordering::Relaxed);
        Self {
            counters,
            arrived: Instant::now(),
            first: None,
            last: None,
            tokens: 0,
        }
    }

    /// `n` tokens came at once.
    pub fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let h = &self.counters.histograms;
        match self.last {
            None => {
                self.first = Some(now);
                self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
                observe(&h.ttft, (now - self.arrived).as_secs_f64());
            }
            // A block of several tokens (speculation) shares the gap since the last one.
            Some(last) => {
                let gap = (now - last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    observe(&h.inter_token, gap);
                }
            }
        }
        self.last = Some(now);
        self.tokens += n;
    }

    /// The request is done: its whole latency, and its time per token after the first.
    pub fn finish(&self) {
        let h = &self.counters.histograms;
        let now = Instant::now();
        observe(&h.e2e, (now - self.arrived).as_secs_f64());
        if let (Some(first), true) = (self.first, self.tokens > 1) {
            let per = (now - first).as_secs_f64() / (self.tokens - 1) as f64;
            observe(&h.per_output_token, per);
        }
    }
}

impl Drop for Timings {
    fn drop(&mut self) {
        if self.first.is_none() {
            self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a metric family holds.
enum Samples {
    /// One value per extra label set (`""` for none).
    Values(Vec<(&'static str, f64)>),
    /// A histogram.
    Histogram(Histogram),
}

/// Renders one family under the `troupe:` prefix.
fn family(out: &mut String, model: &str, name: &str, kind: &str, help: &str, samples: Samples) {
    let _ = writeln!(
        out,
        "# HELP troupe:{name} {help}\n# TYPE troupe:{name} {kind}"
    );
    match samples {
        Samples::Values(values) => {
            for (labels, v) in values {
                let _ = writeln!(out, "troupe:{name}{{model_name=\"{model}\"{labels}}} {v}");
            }
        }
        Samples::Histogram(h) => {
            let mut seen = 0;
            for (bound, count) in h.bounds.iter().zip(&h.counts) {
                seen += count;
                let _ = writeln!(
                    out,
                    "troupe:{name}_bucket{{model_name=\"{model}\",le=\"{bound}\"}} {seen}"
                );
            }
            let total = h.count();
            let _ = writeln!(
                out,
                "troupe:{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {total}\n\
                 troupe:{name}_sum{{model_name=\"{model}\"}} {}\n\
                 troupe:{name}_count{{model_name=\"{model}\"}} {total}",
                h.sum
            );
        }
    }
}

fn snapshot(h: &Mutex<Histogram>) -> Histogram {
    h.lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone())
}

/// `GET /metrics`.
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let c = &state.counters;
    let budget = state.runtime.budget().await?;
    let stats = state.runtime.stats().await?;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let one = |v: f64| Samples::Values(vec![("", v)]);
    let waiting = c.waiting.load(Ordering::Relaxed);
    let running = c.running.load(Ordering::Relaxed).saturating_sub(waiting);
    let kv_perc = budget.used_bytes as f64 / budget.budget_bytes.max(1) as f64;
    let h = &c.histograms;
    let families = [
        (
            "num_requests_running",
            "gauge",
            "Requests generating (past their first token).",
            one(running as f64),
        ),
        (
            "num_requests_waiting",
            "gauge",
            "Requests admitted and waiting for their first token.",
            one(waiting as f64),
        ),
        (
            "kv_cache_usage_perc",
            "gauge",
            "KV bytes reserved over the budget.",
            one(kv_perc),
        ),
        (
            "prompt_tokens_total",
            "counter",
            "Prompt tokens sent to the runtime.",
            one(load(&c.prompt_tokens)),
        ),
        (
            "generation_tokens_total",
            "counter",
            "Tokens generated.",
            one(load(&c.generation_tokens)),
        ),
        (
            "request_success_total",
            "counter",
            "Requests finished, by reason.",
            Samples::Values(vec![
                (",finished_reason=\"stop\"", load(&c.finished_stop)),
                (",finished_reason=\"length\"", load(&c.finished_length)),
                (",finished_reason=\"abort\"", load(&c.finished_abort)),
            ]),
        ),
        (
            "time_to_first_token_seconds",
            "histogram",
            "Arrival to first token.",
            Samples::Histogram(snapshot(&h.ttft)),
        ),
        (
            "inter_token_latency_seconds",
            "histogram",
            "Time between tokens.",
            Samples::Histogram(snapshot(&h.inter_token)),
        ),
        (
            "request_time_per_output_token_seconds",
            "histogram",
            "Time per token after the first.",
            Samples::Histogram(snapshot(&h.per_output_token)),
        ),
        (
            "e2e_request_latency_seconds",
            "histogram",
            "Arrival to last token.",
            Samples::Histogram(snapshot(&h.e2e)),
        ),
        (
            "request_queue_time_seconds",
            "histogram",
            "A turn's submission to the first step that holds it.",
            Samples::Histogram(stats.queue_wait.clone()),
        ),
        (
            "spec_decode_num_drafts_total",
            "counter",
            "Draft blocks verified.",
            one(stats.drafts as f64),
        ),
        (
            "spec_decode_num_draft_tokens_total",
            "counter",
            "Drafted tokens verified.",
            one(stats.drafted as f64),
        ),
        (
            "spec_decode_num_accepted_tokens_total",
            "counter",
            "Drafted tokens accepted.",
            one(stats.accepted as f64),
        ),
        (
            "sessions_open",
            "gauge",
            "Sessions open.",
            one(budget.sessions as f64),
        ),
        (
            "kv_bytes_reserved",
            "gauge",
            "KV bytes reserved by open sessions.",
            one(budget.used_bytes as f64),
        ),
        (
            "kv_budget_bytes",
            "gauge",
            "The KV budget.",
            one(budget.budget_bytes as f64),
        ),
        (
            "window_evictions_total",
            "counter",
            "Tokens evicted from session windows.",
            one(stats.window_evictions as f64),
        ),
        (
            "verifier_restarts_total",
            "counter",
            "Verifier restarts.",
            one(stats.verifier_restarts as f64),
        ),
        (
            "step_sequences",
            "histogram",
            "Sequences per verify step.",
            Samples::Histogram(stats.step_seqs),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, samples) in families {
        family(
            &mut out,
            &state.config.model_name,
            name,
            kind,
            help,
            samples,
        );
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}

//! What every handler shares: the runtime's handles, the served model's name, the limits, and the
//! counters `/metrics` reports. Cheap to clone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use troupe::{Runtime, Tokenizer};

use crate::chat::ChatTemplate;
use crate::error::ApiError;
use crate::metrics::RequestHistograms;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Turns running or waiting at once, past which a request is a 429.
    pub max_queued_turns: usize,
    /// Tokens a reply generates when the request names no limit.
    pub default_max_tokens: usize,
    /// The model's end-of-text tokens: a reply stops at them unless the request says `ignore_eos`.
    pub eos_tokens: Vec<u32>,
    /// The model's chat template (from its `tokenizer_config.json`); `None` renders chats as
    /// `Role: text` lines.
    pub chat_template: Option<Arc<ChatTemplate>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "troupe".into(),
            api_key: None,
            max_queued_turns: 1024,
            default_max_tokens: 256,
            eos_tokens: Vec::new(),
            chat_template: None,
        }
    }
}

/// Counters since the server started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Turns running or waiting.
    pub running: AtomicUsize,
    /// Of which waiting for their first token.
    pub waiting: AtomicUsize,
    /// Latencies of the requests served.
    pub histograms: RequestHistograms,
    /// Prompt tokens sent to the runtime.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Requests that finished at a stop (string, token or end of text).
    pub finished_stop: AtomicU64,
    /// Requests that finished at their token limit.
    pub finished_length: AtomicU64,
    /// Requests cancelled by their client or failed mid-way.
    pub finished_abort: AtomicU64,
}

impl Counters {
    /// Counts a finished request: its `tokens` generated, and its reason (`stop`, `length`, or
    /// anything else for an abort).
    pub fn finish(&self, reason: &str, tokens: usize) {
        self.generation_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        match reason {
            "stop" => &self.finished_stop,
            "length" => &self.finished_length,
            _ => &self.finished_abort,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// The shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The runtime.
    pub runtime: Runtime,
    /// Setup.
    pub config: Arc<ServerConfig>,
    /// Counters.
    pub counters: Arc<Counters>,
}

impl AppState {
    /// The state of a server over `runtime`.
    pub fn new(runtime: Runtime, config: ServerConfig) -> Self {
        Self {
            runtime,
            config: Arc::new(config),
            counters: Arc::default(),
        }
    }

    /// The runtime's tokenizer, which the chat and completion endpoints need.
    pub fn tokenizer(&self) -> Result<&Tokenizer, ApiError> {
        self.runtime.tokenizer().ok_or_else(|| {
            ApiError::bad_request(
                "this server's runtime has no tokenizer: send token ids",
                None,
            )
        })
    }

    /// A seat for one turn, or a 429 when `max_queued_turns` are running or waiting.
    pub fn seat(&self) -> Result<Seat, ApiError> {
        let c = &self.counters.running;
        let max = self.config.max_queued_turns;
        let mut now = c.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return Err(ApiError::overloaded(
                    format!("{now} turns are running or waiting, the most this server takes"),
                    "turn_queue_full",
                ));
            }
            match c.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(Seat(self.counters.clone())),
                Err(seen) => now = seen,
            }
        }
    }
}

/// One turn's place among the running ones; given back when dropped.
pub struct Seat(Arc<Counters>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

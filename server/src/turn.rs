//! One chat or completion request as a turn of a session: the session it continues (named by the
//! request, or a new one closed with the request), its prompt and parameters, and its reply, whole
//! or as server-sent events. Stop strings are applied to the reply's text here; a reply that meets
//! one, or whose client goes away, drops its stream, which cancels the turn in the runtime.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use futures::Stream;
use serde_json::{json, Value};
use troupe::{Event, GenerateParams, RuntimeError, SessionConfig, SessionHandle, TurnStream};

use crate::error::ApiError;
use crate::metrics::Timings;
use crate::openai::Sampling;
use crate::state::{AppState, Seat};
use crate::stops::StopScanner;

/// Stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// The longest stop string, in bytes.
const MAX_STOP_BYTES: usize = 256;

/// Which endpoint a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// A session made for one request, closed when the request is done with it.
struct Ephemeral(SessionHandle);

impl Drop for Ephemeral {
    fn drop(&mut self) {
        let h = self.0.clone();
        // Requests are answered on the server's workers, inside a tokio runtime.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = h.close().await;
            });
        }
    }
}

/// A request made ready to run.
pub struct Prepared {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    session: SessionHandle,
    prompt: Vec<u32>,
    params: GenerateParams,
    stops: Vec<String>,
    /// Tokens the session held before the turn.
    cached: usize,
    include_usage: bool,
    state: AppState,
    /// Held while the turn runs: its place among `max_queued_turns`.
    _seat: Seat,
    /// Its clock, for the latency metrics.
    timings: Timings,
    ephemeral: Option<Ephemeral>,
}

/// Sampling parameters a request may give, as both wires check them: `temperature` in [0, 2],
/// `top_p` in (0, 1]. An error names the field.
pub(crate) fn check_sampling(temperature: f32, top_p: f32) -> Result<(), (String, &'static str)> {
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err((
            format!("`temperature` must be in [0, 2], got {temperature}"),
            "temperature",
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err((format!("`top_p` must be in (0, 1], got {top_p}"), "top_p"));
    }
    Ok(())
}

/// Reads the session a request names: `session` in the body, else the `X-Session-Id` header.
fn session_id(sampling: &Sampling, header: Option<&str>) -> Result<Option<u64>, ApiError> {
    match sampling.session.as_deref().or(header) {
        Some(raw) => parse_session_id(raw, Some("session")).map(Some),
        None => Ok(None),
    }
}

/// A session id as clients write it (the number `POST /v1/sessions` returns); anything else is
/// a 404, as an id no session has.
pub(crate) fn parse_session_id(raw: &str, param: Option<&str>) -> Result<u64, ApiError> {
    raw.trim().parse().map_err(|_| ApiError {
        status: actix_web::http::StatusCode::NOT_FOUND,
        message: format!(
            "no session {raw:?}: session ids are the numbers `POST /v1/sessions` returns"
        ),
        kind: "invalid_request_error",
        code: Some("session_not_found"),
        param: param.map(str::to_owned),
    })
}

impl Prepared {
    /// Checks a request, takes a seat, and finds or opens its session.
    pub async fn new(
        state: &AppState,
        kind: Kind,
        sampling: &Sampling,
        prompt: Vec<u32>,
        session_header: Option<&str>,
    ) -> Result<Self, ApiError> {
        if sampling.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only `n: 1` is supported", Some("n")));
        }
        let temperature = sampling.temperature.unwrap_or(1.0);
        let top_p = sampling.top_p.unwrap_or(1.0);
        check_sampling(temperature, top_p)
            .map_err(|(message, field)| ApiError::bad_request(message, Some(field)))?;
        let stops = sampling
            .stop
            .as_ref()
            .map(|s| s.strings())
            .unwrap_or_default();
        if stops.len() > MAX_STOPS || stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_request(
                format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes each"),
                Some("stop"),
            ));
        }
        let max_tokens = sampling
            .max_completion_tokens
            .or(sampling.max_tokens)
            .unwrap_or(state.config.default_max_tokens);
        let seat = state.seat()?;
        let (session, ephemeral, cached) = match session_id(sampling, session_header)? {
            Some(id) => {
                let s = state.runtime.session(id).await?;
                let held = s.info().await?.window_fill;
                (s, None, held)
            }
            None => {
                let s = state
                    .runtime
                    .spawn_session(SessionConfig::default())
                    .await?;
                (s.clone(), Some(Ephemeral(s)), 0)
            }
        };
        let stop_tokens = if sampling.ignore_eos {
            Vec::new()
        } else {
            state.config.eos_tokens.clone()
        };
        let mut params = GenerateParams::greedy(max_tokens)
            .with_sampling(temperature, top_p)
            .with_stop_tokens(stop_tokens);
        if let Some(seed) = sampling.seed {
            params = params.with_seed(seed);
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        };
        Ok(Self {
            kind,
            id: format!("{prefix}-{}-{}", session.id(), created),
            created,
            model: state.config.model_name.clone(),
            session,
            prompt,
            params,
            stops: sampling
                .stop
                .as_ref()
                .map(|s| s.strings())
                .unwrap_or_default(),
            cached,
            include_usage: sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            state: state.clone(),
            _seat: seat,
            timings: Timings::start(state.counters.clone()),
            ephemeral,
        })
    }

    fn start(&self) -> Result<TurnStream, ApiError> {
        let prompt_tokens = self.prompt.len() as u64;
        self.state
            .counters
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        Ok(self
            .session
            .generate(self.prompt.clone(), self.params.clone())?)
    }

    /// Runs the turn to its end and answers with the whole reply.
    pub async fn whole(mut self) -> Result<Value, ApiError> {
        let mut turn = self.start()?;
        let mut scan = StopScanner::new(self.stops.clone());
        let (mut text, mut tokens) = (String::new(), 0usize);
        loop {
            let Some(ev) = turn.next_event().await else {
                // The stream ended without its last event: the session went away.
                self.count_finish("abort", 0);
                return Err(RuntimeError::SessionClosed(self.session.id()).into());
            };
            match ev {
                Event::Tokens { ids, text: delta } => {
                    tokens += ids.len();
                    self.timings.tokens(ids.len());
                    text.push_str(&scan.push(delta.as_deref().unwrap_or_default()));
                    if scan.stopped() {
                        break; // dropping the stream below cancels the rest of the turn
                    }
                }
                Event::Done(_) => break,
                Event::Error(e) => {
                    self.count_finish("abort", 0);
                    return Err(e.into());
                }
                _ => {}
            }
        }
        drop(turn);
        self.timings.finish();
        text.push_str(&scan.finish());
        let reason = self.finish_reason(&scan, tokens);
        self.count_finish(reason, tokens);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": null,
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "finish_reason": reason, "logprobs": null,
            }),
        };
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        Ok(json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(tokens),
            "session": self.ephemeral.is_none().then(|| self.session.id().to_string()),
        }))
    }

    /// Runs the turn as server-sent events: a `data: {chunk}` event per piece of text, a last chunk
    /// with the finish reason, `usage` when asked for, then `data: [DONE]`; an error after the
    /// start is a `data: {"error": ...}` event that ends the stream.
    pub fn events(self) -> Result<impl Stream<Item = Result<Bytes, actix_web::Error>>, ApiError> {
        let turn = self.start()?;
        let scan = StopScanner::new(self.stops.clone());
        // A chat stream opens with the assistant's role, as OpenAI's does.
        let mut queue = Vec::new();
        if self.kind == Kind::Chat {
            let mut first = self.chunk_json(Some(""), None);
            first["choices"][0]["delta"]["role"] = json!("assistant");
            queue.push(event(&first));
        }
        let sse = Sse {
            turn: Some(turn),
            scan,
            tokens: 0,
            queue,
            ended: false,
            reply: self,
        };
        Ok(futures::stream::unfold(sse, |mut sse| async move {
            let chunk = sse.next().await?;
            Some((Ok(chunk), sse))
        }))
    }

    fn finish_reason(&self, scan: &StopScanner, tokens: usize) -> &'static str {
        if !scan.stopped() && tokens >= self.params.max_new_tokens {
            "length"
        } else {
            "stop"
        }
    }

    fn count_finish(&self, reason: &str, tokens: usize) {
        self.state.counters.finish(reason, tokens);
    }

    fn usage(&self, tokens: usize) -> Value {
        let prompt = self.prompt.len();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": tokens,
            "total_tokens": prompt + tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }

    /// A chunk carrying `text` (or none) and `finish_reason`.
    fn chunk_json(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "delta": text.map_or(json!({}), |t| json!({"content": t})),
                "finish_reason": finish,
                "logprobs": null,
            }),
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null,
            }),
        };
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        if !self.ended {
            // The client went away mid-stream: the turn is cancelled as its stream drops.
            self.reply.count_finish("abort", self.tokens);
        }
    }
}

/// `data: {json}\n\n`.
fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The state of a streamed reply.
struct Sse {
    /// `None` once the turn is over (or cancelled by a stop string).
    turn: Option<TurnStream>,
    scan: StopScanner,
    tokens: usize,
    /// Events ready to send, in reverse order.
    queue: Vec<Bytes>,
    ended: bool,
    reply: Prepared,
}

impl Sse {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.queue.pop() {
                return Some(b);
            }
            if self.ended {
                return None;
            }
            let ev = match self.turn.as_mut() {
                Some(t) => t.next_event().await,
                None => None,
            };
            match ev {
                Some(Event::Tokens { ids, text }) => {
                    self.tokens += ids.len();
                    self.reply.timings.tokens(ids.len());
                    let out = self.scan.push(text.as_deref().unwrap_or_default());
                    if self.scan.stopped() {
                        self.turn = None; // cancels the rest of the turn
                        self.finish(out);
                    } else if !out.is_empty() {
                        return Some(event(&self.reply.chunk_json(Some(&out), None)));
                    }
                }
                Some(Event::Error(e)) => {
                    self.turn = None;
                    self.ended = true;
                    self.reply.count_finish("abort", 0);
                    return Some(event(&ApiError::from(e).to_json()));
                }
                Some(Event::Done(_)) => {
                    self.turn = None;
                    let rest = self.scan.finish();
                    self.finish(rest);
                }
                None if self.turn.is_some() => {
                    // The stream ended without its last event: the session went away.
                    self.turn = None;
                    self.ended = true;
                    self.reply.count_finish("abort", 0);
                    let gone = RuntimeError::SessionClosed(self.reply.session.id());
                    return Some(event(&ApiError::from(gone).to_json()));
                }
                None => {
                    let rest = self.scan.finish();
                    self.finish(rest);
                }
                Some(_) => {}
            }
        }
    }

    /// Queues the held-back text, the last chunk, usage when asked for, and `[DONE]`.
    fn finish(&mut self, rest: String) {
        self.reply.timings.finish();
        let reason = self.reply.finish_reason(&self.scan, self.tokens);
        self.reply.count_finish(reason, self.tokens);
        let mut out = Vec::new();
        if !rest.is_empty() {
            out.push(event(&self.reply.chunk_json(Some(&rest), None)));
        }
        out.push(event(&self.reply.chunk_json(None, Some(reason))));
        if self.reply.include_usage {
            let mut usage = self.reply.chunk_json(None, None);
            usage["choices"] = json!([]);
            usage["usage"] = self.reply.usage(self.tokens);
            out.push(event(&usage));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out.reverse();
        self.queue = out;
        self.ended = true;
    }
}

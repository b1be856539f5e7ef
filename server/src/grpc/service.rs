//! `troupe.v1.RuntimeService` over the server's [`AppState`]: each call checks its request, asks
//! the runtime, and answers its result or the error's status.

use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};
use troupe::{GenerateParams, Persona, Prompt, SessionConfig, SessionHandle, WindowSpec};

use super::pb::{self, generate_request};
use super::status::status;
use super::stream::{GenerateStream, Turn};
use crate::state::AppState;
use crate::turn::check_sampling;

/// The service: the runtime and the server's limits and counters.
#[derive(Clone)]
pub struct Service {
    state: AppState,
}

impl Service {
    /// The service over `state`.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn session(&self, id: u64) -> Result<SessionHandle, Status> {
        self.state.runtime.session(id).await.map_err(|e| status(&e))
    }
}

fn session_message(s: &SessionHandle) -> pb::Session {
    let w = s.window();
    pb::Session {
        id: s.id(),
        sink: w.sink as u32,
        window: w.window as u32,
    }
}

/// The session a `CreateSession` asks for.
fn session_config(r: pb::CreateSessionRequest) -> Result<SessionConfig, Status> {
    let mut config = SessionConfig::default();
    if !r.name.is_empty() || !r.system_prompt.is_empty() {
        config = config.with_persona(Persona::new(r.name, r.system_prompt));
    }
    if r.sink.is_some() || r.window.is_some() {
        let sink = r.sink.unwrap_or(0) as usize;
        let window = WindowSpec::new(sink, r.window.unwrap_or(0) as usize)
            .map_err(|e| Status::invalid_argument(format!("window: {e}")))?;
        config = config.with_window(window);
    }
    if let Some(seed) = r.seed {
        config = config.with_seed(seed);
    }
    Ok(config)
}

/// A turn's prompt and parameters, checked as the HTTP front checks them.
fn turn_of(state: &AppState, r: pb::GenerateRequest) -> Result<(Prompt, GenerateParams), Status> {
    let prompt = match r.prompt {
        Some(generate_request::Prompt::Text(t)) => Prompt::from(t),
        Some(generate_request::Prompt::Tokens(t)) => Prompt::from(t.ids),
        None => {
            return Err(Status::invalid_argument(
                "a prompt is required: `text` or `tokens`",
            ))
        }
    };
    let (temperature, top_p) = (r.temperature, r.top_p.unwrap_or(1.0));
    check_sampling(temperature, top_p).map_err(|(message, _)| Status::invalid_argument(message))?;
    let max_tokens = r
        .max_tokens
        .map_or(state.config.default_max_tokens, |n| n as usize);
    let mut stops = r.stop_token_ids;
    if !r.ignore_eos {
        stops.extend(&state.config.eos_tokens);
    }
    let mut params = GenerateParams::greedy(max_tokens)
        .with_sampling(temperature, top_p)
        .with_stop_tokens(stops);
    if let Some(seed) = r.seed {
        params = params.with_seed(seed);
    }
    Ok((prompt, params))
}

#[tonic::async_trait]
impl pb::runtime_service_server::RuntimeService for Service {
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let config = session_config(req.into_inner())?;
        let session = self
            .state
            .runtime
            .spawn_session(config)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(session_message(&session)))
    }

    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let r = req.into_inner();
        let id = r.session_id;
        let (prompt, params) = turn_of(&self.state, r)?;
        let seat = self
            .state
            .seat()
            .map_err(|e| Status::resource_exhausted(e.message))?;
        let session = self.session(id).await?;
        if let Prompt::Tokens(t) = &prompt {
            // A text prompt's tokens are known only once the session has rendered it.
            self.state
                .counters
                .prompt_tokens
                .fetch_add(t.len() as u64, Ordering::Relaxed);
        }
        let max_tokens = params.max_new_tokens;
        let turn = session.generate(prompt, params).map_err(|e| status(&e))?;
        let stream = Turn::new(turn, id, max_tokens, self.state.clone(), seat);
        Ok(Response::new(stream.into_stream()))
    }

    async fn get_session_info(
        &self,
        req: Request<pb::GetSessionInfoRequest>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let session = self.session(req.into_inner().session_id).await?;
        let i = session.info().await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::SessionInfo {
            id: i.id,
            name: i.name,
            tokens_seen: i.tokens_seen,
            window_fill: i.window_fill as u64,
            window_capacity: i.window_capacity as u64,
            kv_bytes_used: i.kv_bytes_used,
            kv_bytes_bound: i.kv_bytes_bound,
            drafted: i.drafted,
            accepted: i.accepted,
            turns: i.turns,
            latency_p50_ms: i.latency_p50_ms,
            latency_p90_ms: i.latency_p90_ms,
            latency_p99_ms: i.latency_p99_ms,
        }))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let session = self.session(req.into_inner().session_id).await?;
        session.close().await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::CloseSessionResponse {}))
    }

    async fn fork_session(
        &self,
        req: Request<pb::ForkSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let session = self.session(req.into_inner().session_id).await?;
        let fork = session.fork().await.map_err(|e| status(&e))?;
        Ok(Response::new(session_message(&fork)))
    }
}

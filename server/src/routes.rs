//! The endpoints: OpenAI's chat and completions, models, health and metrics, and sessions.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;
use troupe::{Health, Persona, SessionConfig, WindowSpec};

use crate::error::ApiError;
use crate::openai::{
    parse, parse_request, ChatRequest, CompletionRequest, Message, PromptInput, SessionRequest,
};
use crate::state::AppState;
use crate::turn::{parse_session_id, Kind, Prepared};

/// Registers every endpoint.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/models", web::get().to(models))
        .route("/v1/chat/completions", web::post().to(chat))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/sessions", web::post().to(create_session))
        .route("/v1/sessions/{id}", web::get().to(get_session))
        .route("/v1/sessions/{id}", web::delete().to(delete_session));
}

/// Refuses a request without the server's key, when it has one.
fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(key) = &state.config.api_key else {
        return Ok(());
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

fn session_header(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A chat as the text the model continues: each message on its own lines after its role, then
/// the assistant's turn. (A session continues from what it holds, so a request naming a session
/// sends only its new messages.)
pub fn render_chat(messages: &[Message]) -> Result<String, ApiError> {
    let mut out = String::new();
    for m in messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(ApiError::bad_request(
                    format!("unknown message role `{other}`"),
                    Some("messages"),
                ))
            }
        };
        let _ = writeln!(out, "{role}: {}", m.content.text()?);
    }
    out.push_str("Assistant:");
    Ok(out)
}

async fn respond(prepared: Prepared, stream: bool) -> Result<HttpResponse, ApiError> {
    if stream {
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(prepared.events()?))
    } else {
        Ok(HttpResponse::Ok().json(prepared.whole().await?))
    }
}

async fn chat(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let (r, sampling): (ChatRequest, _) = parse_request(&body)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` is empty",
            Some("messages"),
        ));
    }
    let prompt = state
        .tokenizer()?
        .encode(&render_chat(&r.messages)?)
        .map_err(|e| {
            ApiError::bad_request(
                format!("the messages do not tokenize: {e}"),
                Some("messages"),
            )
        })?;
    let header = session_header(&req);
    let prepared = Prepared::new(&state, Kind::Chat, &sampling, prompt, header.as_deref()).await?;
    respond(prepared, sampling.stream).await
}

async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let (r, sampling): (CompletionRequest, _) = parse_request(&body)?;
    let prompt = match r.prompt {
        PromptInput::Tokens(ids) => ids,
        PromptInput::Text(t) => encode(&state, &t)?,
        PromptInput::Texts(v) if v.len() == 1 => encode(&state, &v[0])?,
        PromptInput::Texts(_) => {
            return Err(ApiError::bad_request(
                "a batch of prompts is not supported: send one",
                Some("prompt"),
            ))
        }
    };
    let header = session_header(&req);
    let prepared = Prepared::new(
        &state,
        Kind::Completion,
        &sampling,
        prompt,
        header.as_deref(),
    )
    .await?;
    respond(prepared, sampling.stream).await
}

fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state.tokenizer()?.encode(text).map_err(|e| {
        ApiError::bad_request(format!("the prompt does not tokenize: {e}"), Some("prompt"))
    })
}

async fn models(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "troupe",
        }],
    })))
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let h = state.runtime.health();
    let status = match h {
        Health::Serving => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    HttpResponse::build(status).json(h)
}

/// A metric family: name, type, help, and its samples (extra labels, value).
type Family = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, f64)>,
);

async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let c = &state.counters;
    let budget = state.runtime.budget().await?;
    let stats = state.runtime.stats().await?;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let kv_perc = budget.used_bytes as f64 / budget.budget_bytes.max(1) as f64;
    let families: [Family; 11] = [
        (
            "num_requests_running",
            "gauge",
            "Turns running or waiting.",
            vec![("", c.running.load(Ordering::Relaxed) as f64)],
        ),
        (
            "prompt_tokens_total",
            "counter",
            "Prompt tokens sent to the runtime.",
            vec![("", load(&c.prompt_tokens))],
        ),
        (
            "generation_tokens_total",
            "counter",
            "Tokens generated.",
            vec![("", load(&c.generation_tokens))],
        ),
        (
            "request_success_total",
            "counter",
            "Requests finished, by reason.",
            vec![
                (",finished_reason=\"stop\"", load(&c.finished_stop)),
                (",finished_reason=\"length\"", load(&c.finished_length)),
                (",finished_reason=\"abort\"", load(&c.finished_abort)),
            ],
        ),
        (
            "kv_cache_usage_perc",
            "gauge",
            "KV bytes reserved over the budget.",
            vec![("", kv_perc)],
        ),
        (
            "sessions_open",
            "gauge",
            "Sessions open.",
            vec![("", budget.sessions as f64)],
        ),
        (
            "kv_bytes_reserved",
            "gauge",
            "KV bytes reserved by open sessions.",
            vec![("", budget.used_bytes as f64)],
        ),
        (
            "kv_budget_bytes",
            "gauge",
            "The KV budget.",
            vec![("", budget.budget_bytes as f64)],
        ),
        (
            "verifier_restarts_total",
            "counter",
            "Verifier restarts.",
            vec![("", stats.verifier_restarts as f64)],
        ),
        (
            "spec_decode_num_draft_tokens_total",
            "counter",
            "Drafted tokens verified.",
            vec![("", stats.drafted as f64)],
        ),
        (
            "spec_decode_num_accepted_tokens_total",
            "counter",
            "Drafted tokens accepted.",
            vec![("", stats.accepted as f64)],
        ),
    ];
    let m = &state.config.model_name;
    let mut out = String::new();
    for (name, kind, help, samples) in families {
        let _ = writeln!(
            out,
            "# HELP troupe:{name} {help}\n# TYPE troupe:{name} {kind}"
        );
        for (labels, v) in samples {
            let _ = writeln!(out, "troupe:{name}{{model_name=\"{m}\"{labels}}} {v}");
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}

async fn create_session(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let r: SessionRequest = if body.is_empty() {
        SessionRequest::default()
    } else {
        parse(&body)?
    };
    let mut config = SessionConfig::default();
    if r.name.is_some() || r.system_prompt.is_some() {
        let persona = Persona::new(
            r.name.clone().unwrap_or_default(),
            r.system_prompt.clone().unwrap_or_default(),
        );
        config = config.with_persona(persona);
    }
    if r.sink.is_some() || r.window.is_some() {
        let window = WindowSpec::new(r.sink.unwrap_or(0), r.window.unwrap_or(0))
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("window")))?;
        config = config.with_window(window);
    }
    if let Some(seed) = r.seed {
        config = config.with_seed(seed);
    }
    let session = state.runtime.spawn_session(config).await?;
    // The system prompt starts the session's context, so its first turn needs no prompt of it.
    // A session that cannot take it is closed again, not left holding its bytes.
    if let Some(system) = r.system_prompt.filter(|s| !s.is_empty()) {
        let added = async {
            let tokens = state
                .tokenizer()?
                .encode(&format!("System: {system}\n"))
                .map_err(|e| {
                    ApiError::bad_request(format!("the system prompt does not tokenize: {e}"), None)
                })?;
            let prefill = session.generate(tokens, troupe::GenerateParams::greedy(0))?;
            prefill.collect().await?;
            Ok::<_, ApiError>(())
        };
        if let Err(e) = added.await {
            let _ = session.close().await;
            return Err(e);
        }
    }
    let w = session.window();
    Ok(HttpResponse::Ok().json(json!({
        "id": session.id().to_string(),
        "object": "session",
        "name": r.name,
        "window": {"sink": w.sink, "window": w.window},
    })))
}

async fn get_session(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let s = state.runtime.session(parse_session_id(&id, None)?).await?;
    Ok(HttpResponse::Ok().json(s.info().await?))
}

async fn delete_session(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = parse_session_id(&id, None)?;
    state.runtime.session(id).await?.close().await?;
    Ok(
        HttpResponse::Ok()
            .json(json!({"id": id.to_string(), "object": "session", "deleted": true})),
    )
}

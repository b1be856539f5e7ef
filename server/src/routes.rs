//! The endpoints: OpenAI's chat and completions, models, health and metrics, and sessions.

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;
use troupe::{Health, Persona, SessionConfig, WindowSpec};

use crate::chat::render_chat;
use crate::error::ApiError;
use crate::openai::{
    parse, parse_request, ChatRequest, CompletionRequest, Content, Message, PromptInput,
    SessionRequest,
};
use crate::state::AppState;
use crate::turn::{parse_session_id, Kind, Prepared};

/// Registers every endpoint.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(crate::metrics::metrics))
        .route("/v1/models", web::get().to(models))
        .route("/v1/chat/completions", web::post().to(chat))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/sessions", web::post().to(create_session))
        .route("/v1/sessions/{id}", web::get().to(get_session))
        .route("/v1/sessions/{id}", web::delete().to(delete_session))
        .route("/v1/sessions/{id}/fork", web::post().to(fork_session));
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
    let header = session_header(&req);
    // A request naming a session sends only its new messages.
    let continuing = sampling.session.is_some() || header.is_some();
    let prompt = state
        .tokenizer()?
        .encode(&render_chat(
            state.config.chat_template.as_deref(),
            &r.messages,
            true,
            continuing,
        )?)
        .map_err(|e| {
            ApiError::bad_request(
                format!("the messages do not tokenize: {e}"),
                Some("messages"),
            )
        })?;
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
            let message = Message {
                role: "system".into(),
                content: Content::Text(system),
            };
            let text = render_chat(
                state.config.chat_template.as_deref(),
                &[message],
                false,
                false,
            )?;
            let tokens = state.tokenizer()?.encode(&text).map_err(|e| {
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

/// `POST /v1/sessions/{id}/fork`: a new session whose context is a copy of this one's, once the
/// turns asked of it before are done; it is admitted as any new session is (a 429 past the cap or
/// the budget).
async fn fork_session(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let source = state.runtime.session(parse_session_id(&id, None)?).await?;
    let fork = source.fork().await?;
    let w = fork.window();
    Ok(HttpResponse::Ok().json(json!({
        "id": fork.id().to_string(),
        "object": "session",
        "forked_from": source.id().to_string(),
        "window": {"sink": w.sink, "window": w.window},
    })))
}

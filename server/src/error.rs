//! Errors in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, with the status
//! each deserves: a bad request is a 400 naming the field, an unknown session a 404, a bad key a
//! 401, a full runtime a 429 with `Retry-After`, a failed runtime a 503.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use troupe::engine::EngineError;
use troupe::RuntimeError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `rate_limit_error`, ...).
    pub kind: &'static str,
    /// A machine-readable code (`context_length_exceeded`, `session_not_found`, ...).
    pub code: Option<&'static str>,
    /// The request field at fault.
    pub param: Option<String>,
}

/// The body of an error response.
#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: Option<&'a str>,
    param: Option<&'a str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_owned),
        }
    }

    /// The same error with `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A 401.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid API key is required: `Authorization: Bearer <key>`".into(),
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            param: None,
        }
    }

    /// A 429: the server is full for now.
    pub fn overloaded(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            code: Some(code),
            param: None,
        }
    }

    /// The error as a JSON value, for an error sent inside a stream that has started.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }

    fn body(&self) -> Body<'_> {
        Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                code: self.code,
                param: self.param.as_deref(),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.insert_header(("Retry-After", "1"));
        }
        r.json(self.body())
    }
}

/// What a runtime error is to a client, whatever the wire: the HTTP front and gRPC answer each
/// class with their own status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server is full: past the KV budget, the session cap or the turn queue.
    Overloaded,
    /// No such session (or it closed).
    NotFound,
    /// The request cannot be taken as it is; `param` names the field at fault, and `too_long`
    /// says it asks for more context than the model or server allows.
    BadInput {
        /// The field at fault.
        param: Option<&'static str>,
        /// Past the context a model or server allows.
        too_long: bool,
    },
    /// The runtime is stopping, has failed or did not answer.
    Unavailable,
    /// The turn was cancelled.
    Cancelled,
    /// Anything else.
    Internal,
}

/// The class of `e`.
pub fn classify(e: &RuntimeError) -> ErrorClass {
    let bad = |param, too_long| ErrorClass::BadInput { param, too_long };
    match e {
        RuntimeError::AdmissionRefused { .. } => ErrorClass::Overloaded,
        RuntimeError::UnknownSession(_) | RuntimeError::SessionClosed(_) => ErrorClass::NotFound,
        RuntimeError::PromptTooLong { .. } => bad(Some("messages"), true),
        RuntimeError::EmptyPrompt | RuntimeError::InvalidConfig(_) | RuntimeError::NoTokenizer => {
            bad(None, false)
        }
        RuntimeError::Engine(inner) => match inner.as_ref() {
            EngineError::WindowPastPositions { .. } => bad(Some("window"), true),
            EngineError::InvalidWindow(_) => bad(Some("window"), false),
            EngineError::TokenOutOfRange { .. } => bad(Some("prompt"), false),
            _ => ErrorClass::Internal,
        },
        RuntimeError::ShuttingDown
        | RuntimeError::ActorUnavailable(_)
        | RuntimeError::Timeout(_)
        | RuntimeError::RuntimeFailed(_)
        | RuntimeError::NoVerifier
        | RuntimeError::TooManyRestarts { .. }
        | RuntimeError::RebuildFailed(_) => ErrorClass::Unavailable,
        RuntimeError::Cancelled(_) => ErrorClass::Cancelled,
        _ => ErrorClass::Internal,
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let message = e.to_string();
        let status = |status, code| ApiError {
            status,
            message: message.clone(),
            kind: "server_error",
            code,
            param: None,
        };
        match classify(&e) {
            ErrorClass::Overloaded => ApiError::overloaded(message.clone(), "admission_refused"),
            ErrorClass::NotFound => ApiError {
                kind: "invalid_request_error",
                ..status(StatusCode::NOT_FOUND, Some("session_not_found"))
            },
            ErrorClass::BadInput { param, too_long } => {
                let r = ApiError::bad_request(message.clone(), param);
                if too_long {
                    r.with_code("context_length_exceeded")
                } else {
                    r
                }
            }
            ErrorClass::Unavailable => status(StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
            ErrorClass::Cancelled => status(StatusCode::INTERNAL_SERVER_ERROR, Some("cancelled")),
            ErrorClass::Internal => status(StatusCode::INTERNAL_SERVER_ERROR, None),
        }
    }
}

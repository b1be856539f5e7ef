//! The request bodies of the OpenAI-compatible endpoints, and how they are read: a body that is not
//! JSON, a field of the wrong type, `n` other than 1, and the fields this server does not
//! implement (tools, logprobs, response formats, logit bias, penalties) are 400s naming the field;
//! other unknown fields are ignored, as OpenAI's own server does.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Fields that change what a model must return and that this server does not implement: silently
/// ignoring them would mislead an agent.
const UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "response_format",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
];

/// Reads a request body as `T`, with the errors above.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    typed(&checked(body)?)
}

/// Reads a request body as the endpoint's own fields `T` and the [`Sampling`] fields every
/// generating endpoint shares (each read on its own, so an error names its field).
pub fn parse_request<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), ApiError> {
    let value = checked(body)?;
    Ok((typed(&value)?, typed(&value)?))
}

/// The body as a JSON object holding no field this server refuses.
fn checked(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}"), None))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object",
            None,
        ));
    };
    if let Some(field) = UNSUPPORTED.iter().find(|f| {
        map.get(**f)
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    }) {
        return Err(ApiError::bad_request(
            format!("`{field}` is not supported by this server"),
            Some(field),
        )
        .with_code("unsupported_parameter"));
    }
    Ok(value)
}

/// `value` as `T`; a field of the wrong type is a 400 naming it.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(
            format!("`{path}`: {}", e.inner()),
            Some(path.as_str()).filter(|p| *p != "."),
        )
    })
}

/// One message of a chat.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `developer`, read as `system`).
    pub role: String,
    /// The text, or a list of parts of which the text parts are read.
    pub content: Content,
}

/// A message's content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts (`{"type": "text", "text": ...}`).
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// The part's type; only `text` is read.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text.
    #[serde(default)]
    pub text: String,
}

impl Content {
    /// The text of the content.
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p.kind.as_str() {
                    "text" => Ok(p.text.as_str()),
                    other => Err(ApiError::bad_request(
                        format!("content parts of type `{other}` are not supported"),
                        Some("messages"),
                    )),
                })
                .collect(),
        }
    }
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings, empty ones left out.
    pub fn strings(&self) -> Vec<String> {
        let all = match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        };
        all.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and completion requests share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// The model asked for (only this server's is served; any name is accepted).
    pub model: Option<String>,
    /// Tokens to generate at most.
    pub max_tokens: Option<usize>,
    /// The same, under its newer name (it wins when both are given).
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature (default 1; 0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    pub top_p: Option<f32>,
    /// Sampling seed of the request's session (for a new session only).
    pub seed: Option<u64>,
    /// Strings that end the reply; the reply stops before the first of them.
    pub stop: Option<Stop>,
    /// Choices to generate: only 1.
    pub n: Option<u32>,
    /// Stream the reply as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past the model's end-of-text token.
    #[serde(default)]
    pub ignore_eos: bool,
    /// The session to continue (also `X-Session-Id`).
    pub session: Option<String>,
}

/// `POST /v1/chat/completions`'s own fields (the rest are [`Sampling`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The messages (for a named session: only the new ones).
    pub messages: Vec<Message>,
}

/// `POST /v1/completions`'s prompt.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts: only one is accepted.
    Texts(Vec<String>),
}

/// `POST /v1/completions`'s own fields (the rest are [`Sampling`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptInput,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionRequest {
    /// A persona's name.
    pub name: Option<String>,
    /// Its system prompt, the start of the session's context.
    pub system_prompt: Option<String>,
    /// Attention-sink slots of its window.
    pub sink: Option<usize>,
    /// Recent slots of its window.
    pub window: Option<usize>,
    /// Sampling seed.
    pub seed: Option<u64>,
}

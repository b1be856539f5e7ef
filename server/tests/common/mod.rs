//! A server on 127.0.0.1 over the scripted model, and a small HTTP/1.1 client over real sockets.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;
use troupe::actors::scripted::ScriptedModel;
use troupe::engine::tokenizer::byte_level_tokenizer_json;
use troupe::{Runtime, RuntimeBuilder, Tokenizer};
use troupe_server::{AppState, ServerConfig};

/// A running server and its runtime.
pub struct Served {
    pub addr: SocketAddr,
    pub runtime: Runtime,
    handle: actix_web::dev::ServerHandle,
}

impl Served {
    /// Stops the server.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        self.runtime.shutdown().await.unwrap();
    }
}

/// Serves the scripted model (a `step` per verify step) with `config`, the runtime built by
/// `builder` from a scripted-model builder.
pub async fn serve_with(
    step: Duration,
    config: ServerConfig,
    builder: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder,
) -> Served {
    let base = RuntimeBuilder::new(move || Ok(ScriptedModel::new(step)))
        .tokenizer(Tokenizer::from_json(&byte_level_tokenizer_json()).unwrap());
    let runtime = builder(base).build().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = troupe_server::server(AppState::new(runtime.clone(), config), listener).unwrap();
    let handle = server.handle();
    tokio::spawn(server);
    Served {
        addr,
        runtime,
        handle,
    }
}

/// Serves the scripted model with the default setup.
pub async fn serve() -> Served {
    serve_with(Duration::from_millis(1), ServerConfig::default(), |b| b).await
}

pub use troupe_server::client::{events, Response};

/// The body as JSON.
pub fn json(r: &Response) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// `response.json()`, for the tests.
pub trait JsonBody {
    /// The body as JSON.
    fn json(&self) -> Value;
}

impl JsonBody for Response {
    fn json(&self) -> Value {
        json(self)
    }
}

/// A whole request and response.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    troupe_server::client::request(addr, method, path, headers, body)
        .await
        .unwrap()
}

/// POSTs JSON.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    call(addr, "POST", path, &[], &body.to_string()).await
}

/// The value of a metric (first sample) in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(&format!("troupe:{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

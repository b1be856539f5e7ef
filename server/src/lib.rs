//! troupe on the network: an OpenAI-compatible HTTP front (actix-web) over a [`troupe::Runtime`],
//! with sessions as first-class resources.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: whole or streamed (server-sent events),
//!   as OpenAI's clients parse them. A request that names a session (`"session": "<id>"` in the
//!   body, or `X-Session-Id`) continues it, sending only its new messages; one that names none
//!   runs in a session of its own, closed after it.
//! - `POST /v1/sessions`, `GET` and `DELETE /v1/sessions/{id}`: open, inspect and close sessions.
//! - `GET /v1/models`, `GET /health` (503 once the runtime has failed), `GET /metrics`
//!   (Prometheus text, vLLM's names under a `troupe:` prefix).
//!
//! Errors come in OpenAI's shape, with the status each deserves ([`ApiError`]). A client that goes
//! away mid-stream cancels its turn: the response stream owns the turn's stream, and dropping it
//! cancels the turn in the runtime.
//!
//! The same runtime is served over gRPC too ([`grpc`], started by [`grpc_server`]):
//! `troupe.v1.RuntimeService` with `CreateSession`, `Generate` (the turn's tokens streamed, then
//! its stats), `GetSessionInfo`, `CloseSession` and `ForkSession`, under the same key, limits and
//! counters. Its errors carry gRPC's codes, and a cancelled `Generate` cancels its turn.
//!
//! [`sockets`] binds listeners with an accept queue for thousands of clients connecting at once,
//! and raises the open-file limit a server of that many connections needs.

pub mod chat;
pub mod client;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod sockets;
pub mod state;
pub mod stops;
pub mod turn;

use std::net::TcpListener;

use actix_web::{web, App, HttpServer};

pub use error::ApiError;
pub use grpc::{grpc_server, RuntimeServiceClient};
pub use state::{AppState, ServerConfig};

/// Bodies larger than this are refused (a prompt of about a million characters).
const MAX_BODY_BYTES: usize = 4 << 20;

/// Serves `state` on `listener` until the server is stopped (SIGINT or SIGTERM, or the returned
/// server's handle), then lets requests in flight finish.
pub fn server(state: AppState, listener: TcpListener) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .configure(routes::configure)
    })
    // Streamed tokens go out one small chunk at a time: with Nagle's algorithm each waited for
    // the client's delayed ACK of the one before, about 40 ms.
    .tcp_nodelay(true)
    .listen(listener)?
    .run())
}

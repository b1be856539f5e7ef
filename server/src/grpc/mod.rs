//! troupe over gRPC: `troupe.v1.RuntimeService` (tonic), beside the HTTP front and over the same
//! [`AppState`]. `CreateSession`, `GetSessionInfo`, `CloseSession` and `ForkSession` manage
//! sessions; `Generate` streams a turn's tokens, then its stats. A client that cancels a
//! `Generate` call, or goes away, cancels its turn. The protocol is `proto/troupe/v1/runtime.proto`,
//! compiled by the build script in pure Rust.

mod auth;
mod service;
mod status;
mod stream;

use std::future::Future;
use std::net::TcpListener;

use futures::StreamExt;

pub use auth::ApiKey;
pub use service::Service;
pub use status::status;
pub use stream::GenerateStream;

use crate::state::AppState;

/// The messages and the client and server stubs generated from `runtime.proto`.
pub mod pb {
    tonic::include_proto!("troupe.v1");
}

/// A client of `troupe.v1.RuntimeService`: `RuntimeServiceClient::connect("http://host:port")`.
pub type RuntimeServiceClient =
    pb::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

/// Serves `troupe.v1.RuntimeService` over `state` on `listener` (asking for the server's API key
/// when it has one) until `shutdown` completes, then waits for the calls in flight to end. Call it
/// inside a tokio runtime, and run or spawn the future it returns.
pub fn grpc_server(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<impl Future<Output = Result<(), tonic::transport::Error>> + Send> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    // Tokens go out one small message at a time: no waiting to fill a packet.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.and_then(|c| {
            c.set_nodelay(true)?;
            Ok(c)
        })
    });
    let key = ApiKey::new(state.config.api_key.as_deref());
    let service = pb::runtime_service_server::RuntimeServiceServer::with_interceptor(
        Service::new(state),
        key,
    );
    Ok(tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown))
}

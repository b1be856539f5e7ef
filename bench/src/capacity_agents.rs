//! One client of the `agent-capacity` case, as it reaches the runtime: in process (a task holding
//! a session handle), over HTTP (a kept-alive connection of its own: `POST /v1/sessions`, then a
//! streamed `POST /v1/completions` naming the session), or over gRPC (a channel of its own:
//! `CreateSession`, then `Generate`). Each reports its create, first-token and turn latencies,
//! or the kind of error that stopped it, and keeps its session open until the measurement closes
//! it. A connection refused or reset is tried again after a pause, a few times, and counted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::time::timeout;
use tonic::transport::Endpoint;
use troupe::{
    Event, GenerateParams, Runtime, RuntimeError, SessionConfig, SessionHandle, WindowSpec,
};
use troupe_server::client::{self, KeepAlive};
use troupe_server::grpc::pb::{self, generate_request, generate_response};
use troupe_server::RuntimeServiceClient;

use crate::error::{BenchError, Result};

/// Times a client's connection is tried again after it was refused or reset.
const MAX_RETRIES: usize = 6;
/// The pause before the first retry; each next one waits twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Where the clients reach the runtime.
#[derive(Clone)]
pub enum Target {
    /// The runtime itself, in this process.
    Local(Runtime),
    /// `troupe serve`'s HTTP front.
    Http(SocketAddr),
    /// `troupe serve`'s gRPC service.
    Grpc(SocketAddr),
}

/// What one client asks for.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Its index, which seeds its session.
    pub index: usize,
    /// Its turn's prompt.
    pub prompt: Vec<u32>,
    /// Its session's window.
    pub window: WindowSpec,
    /// Tokens its turn generates.
    pub new_tokens: usize,
    /// How long its connection and session, and then its turn, may each take.
    pub timeout: Duration,
}

/// A client's latencies, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// From asking for a session to having it (the connection not included).
    pub create_ms: f64,
    /// From asking for the turn to its first tokens.
    pub first_token_ms: f64,
    /// From asking for the turn to its end.
    pub turn_ms: f64,
}

/// Why a client failed: a kind to count it under ("refused", "http 500", "timeout", ...) and the
/// message it got.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What the case counts it as.
    pub kind: String,
    /// What the runtime or the wire said.
    pub message: String,
}

fn failure(kind: impl Into<String>, message: impl ToString) -> Failure {
    Failure {
        kind: kind.into(),
        message: message.to_string(),
    }
}

/// What one client saw.
pub struct Outcome {
    /// Its latencies, or why it failed.
    pub result: std::result::Result<Latencies, Failure>,
    /// Connection attempts refused or reset before one held.
    pub retries: usize,
    /// Its session, open until the measurement is done with it.
    pub session: Option<Session>,
}

/// A client's open session and the way to it.
pub enum Session {
    /// A handle in this process.
    Local(SessionHandle),
    /// A session of the HTTP front, and the client's connection while it is usable.
    Http {
        /// The server.
        addr: SocketAddr,
        /// The client's kept-alive connection (gone after a timeout left it mid-response).
        conn: Option<KeepAlive>,
        /// The session's id.
        id: String,
    },
    /// A session of the gRPC service, over the client's channel.
    Grpc(RuntimeServiceClient, u64),
}

impl Target {
    /// Runs one client: its session, then its turn.
    pub async fn client(&self, a: &Agent) -> Outcome {
        let (mut retries, mut session) = (0, None);
        let result = match self {
            Target::Local(rt) => local(rt, a, &mut session).await,
            Target::Http(addr) => http(*addr, a, &mut retries, &mut session).await,
            Target::Grpc(addr) => grpc(*addr, a, &mut retries, &mut session).await,
        };
        Outcome {
            result,
            retries,
            session,
        }
    }
}

impl Session {
    /// The KV bytes the session's window reserves.
    pub async fn kv_bytes(&mut self) -> Result<u64> {
        Ok(match self {
            Session::Local(s) => s.info().await?.kv_bytes_bound,
            Session::Http { addr, id, .. } => {
                let path = format!("/v1/sessions/{id}");
                let r = client::request(*addr, "GET", &path, &[], "")
                    .await
                    .map_err(|e| wire("GET", e))?;
                let v: Value = serde_json::from_str(&r.body)?;
                v["kv_bytes_bound"]
                    .as_u64()
                    .ok_or_else(|| BenchError::Task(format!("{path} answered {}", r.body)))?
            }
            Session::Grpc(c, id) => {
                let req = pb::GetSessionInfoRequest { session_id: *id };
                let info = c.get_session_info(req).await.map_err(|e| wire("GET", e))?;
                info.into_inner().kv_bytes_bound
            }
        })
    }

    /// Closes the session: over the client's own connection, or a new one when the server has
    /// closed that (an idle kept-alive connection does not outlive the server's keep-alive).
    pub async fn close(self) -> Result<()> {
        match self {
            Session::Local(s) => s.close().await?,
            Session::Http { addr, conn, id } => {
                let path = format!("/v1/sessions/{id}");
                let kept = match conn {
                    Some(mut c) => c.request("DELETE", &path, &[], "").await.ok(),
                    None => None,
                };
                let r = match kept {
                    Some(r) => r,
                    None => client::request(addr, "DELETE", &path, &[], "")
                        .await
                        .map_err(|e| wire("DELETE", e))?,
                };
                if r.status != 200 {
                    return Err(BenchError::Task(format!(
                        "DELETE {path} answered {}: {}",
                        r.status, r.body
                    )));
                }
            }
            Session::Grpc(mut c, id) => {
                let req = pb::CloseSessionRequest { session_id: id };
                c.close_session(req)
                    .await
                    .map_err(|e| wire("CloseSession", e))?;
            }
        }
        Ok(())
    }
}

fn wire(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Task(format!("{what}: {e}"))
}

/// `f`'s result within `limit`, or a timeout.
async fn within<T>(
    limit: Duration,
    f: impl Future<Output = std::result::Result<T, Failure>>,
) -> std::result::Result<T, Failure> {
    timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(failure("timeout", format!("no answer in {limit:?}"))))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

async fn local(
    rt: &Runtime,
    a: &Agent,
    session: &mut Option<Session>,
) -> std::result::Result<Latencies, Failure> {
    let t = Instant::now();
    let config = SessionConfig::default()
        .with_seed(a.index as u64)
        .with_window(a.window);
    let s = within(a.timeout, async {
        rt.spawn_session(config).await.map_err(runtime_failure)
    })
    .await?;
    let create_ms = ms(t);
    *session = Some(Session::Local(s.clone()));
    let t = Instant::now();
    let params = GenerateParams::greedy(a.new_tokens);
    within(a.timeout, async {
        let mut turn = s
            .generate(a.prompt.clone(), params)
            .map_err(runtime_failure)?;
        let (mut first, mut got) = (None, 0);
        while let Some(ev) = turn.next_event().await {
            match ev {
                Event::Tokens { ids, .. } => {
                    first.get_or_insert_with(|| ms(t));
                    got += ids.len();
                }
                Event::Error(e) => return Err(runtime_failure(e)),
                _ => {}
            }
        }
        tokens_check(got, a.new_tokens)?;
        Ok(Latencies {
            create_ms,
            first_token_ms: first.unwrap_or_else(|| ms(t)),
            turn_ms: ms(t),
        })
    })
    .await
}

fn runtime_failure(e: RuntimeError) -> Failure {
    let kind = match e {
        RuntimeError::AdmissionRefused { .. } => "refused",
        _ => "runtime error",
    };
    failure(kind, e)
}

fn tokens_check(got: usize, want: usize) -> std::result::Result<(), Failure> {
    if got == want {
        Ok(())
    } else {
        Err(failure(
            "short turn",
            format!("{got} tokens of the {want} asked for"),
        ))
    }
}

/// Tries `connect` again while it is refused or reset, up to [`MAX_RETRIES`] times, counting
/// each retry.
async fn with_retries<T, E, F, Fut>(
    retries: &mut usize,
    mut connect: F,
) -> std::result::Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let mut pause = FIRST_BACKOFF;
    loop {
        match connect().await {
            Err(e) if *retries < MAX_RETRIES && retryable(&e) => {
                *retries += 1;
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            r => return r,
        }
    }
}

/// The I/O error at the root of `e`, if any.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

fn retryable(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        io_kind(e),
        Some(
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        )
    )
}

fn io_failure(what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let kind = match io_kind(e) {
        Some(k) => format!("{what} ({k:?})"),
        None => what.to_string(),
    };
    failure(kind, e)
}

/// What an HTTP status other than 200 counts as.
fn status_failure(status: u16, body: &str) -> Failure {
    let kind = if status == 429 {
        "refused".to_string()
    } else {
        format!("http {status}")
    };
    failure(kind, body)
}

async fn http(
    addr: SocketAddr,
    a: &Agent,
    retries: &mut usize,
    session: &mut Option<Session>,
) -> std::result::Result<Latencies, Failure> {
    let (mut conn, create_ms, id) = within(a.timeout, async {
        let mut conn = with_retries(retries, || KeepAlive::connect(addr))
            .await
            .map_err(|e| io_failure("connect", &e))?;
        let t = Instant::now();
        let body = json!({"sink": a.window.sink, "window": a.window.window, "seed": a.index});
        let r = conn
            .request("POST", "/v1/sessions", &[], &body.to_string())
            .await
            .map_err(|e| io_failure("io", &e))?;
        if r.status != 200 {
            return Err(status_failure(r.status, &r.body));
        }
        let v: Value = serde_json::from_str(&r.body).map_err(|e| failure("bad reply", e))?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        Ok((conn, ms(t), id))
    })
    .await?;
    let body = json!({
        "session": id, "prompt": a.prompt, "max_tokens": a.new_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let t = Instant::now();
    let turn = timeout(a.timeout, async {
        let (status, headers) = conn
            .send("POST", "/v1/completions", &[], &body)
            .await
            .map_err(|e| io_failure("io", &e))?;
        if status != 200 {
            let text = conn.body(&headers).await.unwrap_or_default();
            return Err(status_failure(status, &text));
        }
        let (mut first, mut raw) = (None, Vec::new());
        while let Some(chunk) = conn.next_chunk().await.map_err(|e| io_failure("io", &e))? {
            first.get_or_insert_with(|| ms(t));
            raw.extend(chunk);
        }
        let mut got = 0;
        for data in client::events(&String::from_utf8_lossy(&raw)) {
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(&data).map_err(|e| failure("bad reply", e))?;
            if v.get("error").is_some() {
                return Err(failure("turn error", v["error"]["message"].clone()));
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                got = n as usize;
            }
        }
        tokens_check(got, a.new_tokens)?;
        Ok(Latencies {
            create_ms,
            first_token_ms: first.unwrap_or_else(|| ms(t)),
            turn_ms: ms(t),
        })
    })
    .await;
    let (conn, result) = match turn {
        Ok(r) => (Some(conn), r),
        // Timed out mid-response, the connection is no use for the close.
        Err(_) => (
            None,
            Err(failure("timeout", format!("no answer in {:?}", a.timeout))),
        ),
    };
    *session = Some(Session::Http { addr, conn, id });
    result
}

fn grpc_failure(s: tonic::Status) -> Failure {
    let kind = match s.code() {
        tonic::Code::ResourceExhausted => "refused".to_string(),
        code => format!("grpc {code:?}"),
    };
    failure(kind, s.message())
}

async fn grpc(
    addr: SocketAddr,
    a: &Agent,
    retries: &mut usize,
    session: &mut Option<Session>,
) -> std::result::Result<Latencies, Failure> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| failure("connect", e))?
        .tcp_nodelay(true);
    let (mut c, create_ms, id) = within(a.timeout, async {
        let channel = with_retries(retries, || endpoint.connect())
            .await
            .map_err(|e| io_failure("connect", &e))?;
        let mut c = RuntimeServiceClient::new(channel);
        let t = Instant::now();
        let req = pb::CreateSessionRequest {
            sink: Some(a.window.sink as u32),
            window: Some(a.window.window as u32),
            seed: Some(a.index as u64),
            ..Default::default()
        };
        let s = c.create_session(req).await.map_err(grpc_failure)?;
        Ok((c, ms(t), s.into_inner().id))
    })
    .await?;
    *session = Some(Session::Grpc(c.clone(), id));
    let req = pb::GenerateRequest {
        session_id: id,
        prompt: Some(generate_request::Prompt::Tokens(pb::TokenIds {
            ids: a.prompt.clone(),
        })),
        max_tokens: Some(a.new_tokens as u32),
        ignore_eos: true,
        ..Default::default()
    };
    let t = Instant::now();
    within(a.timeout, async {
        let mut stream = c.generate(req).await.map_err(grpc_failure)?.into_inner();
        let (mut first, mut got) = (None, 0);
        while let Some(m) = stream.message().await.map_err(grpc_failure)? {
            if let Some(generate_response::Event::Tokens(tokens)) = m.event {
                first.get_or_insert_with(|| ms(t));
                got += tokens.ids.len();
            }
        }
        tokens_check(got, a.new_tokens)?;
        Ok(Latencies {
            create_ms,
            first_token_ms: first.unwrap_or_else(|| ms(t)),
            turn_ms: ms(t),
        })
    })
    .await
}

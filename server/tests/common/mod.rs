//! A server on 127.0.0.1 over the scripted model, and a small HTTP/1.1 client over real sockets.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
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

/// A response: status, headers (lower-case names) and body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a request and opens the response: the status line and headers are read, the body is left
/// on the returned reader.
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut hs = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        hs.push((n.trim().to_lowercase(), v.trim().to_string()));
    }
    (status, hs, r)
}

/// A whole request and response. Chunked bodies are joined.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let (status, headers, mut r) = open(addr, method, path, headers, body).await;
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Response {
        status,
        headers,
        body,
    }
}

/// The body of a chunked transfer.
pub fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// POSTs JSON.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    call(addr, "POST", path, &[], &body.to_string()).await
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// The value of a metric (first sample) in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(&format!("troupe:{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

//! A minimal HTTP/1.1 client over real sockets, for this crate's tests and the benchmarks: one
//! request per connection (`Connection: close`), server-sent events read as they come, or a
//! [`KeepAlive`] connection that carries one request after another.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A whole response: status, headers (lower-case names) and body (chunked bodies joined).
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response whose body is still on the wire.
pub struct Open {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The connection, at the start of the body.
    pub reader: BufReader<TcpStream>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Sends a request and reads the status line and headers.
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Open> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = request_text(addr, method, path, headers, body, "close");
    s.write_all(req.as_bytes()).await?;
    let mut reader = BufReader::new(s);
    let (status, headers) = read_head(&mut reader).await?;
    Ok(Open {
        status,
        headers,
        reader,
    })
}

/// A request's head and body as they go on the wire.
fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    connection: &str,
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

/// Reads a response's status line and headers (names in lower case).
async fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(bad("the headers did not end"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').ok_or_else(|| bad("a malformed header"))?;
        headers.push((n.trim().to_lowercase(), v.trim().to_string()));
    }
    Ok((status, headers))
}

/// Sends a request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Response> {
    let Open {
        status,
        headers,
        mut reader,
    } = open(addr, method, path, headers, body).await?;
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The body of a chunked transfer.
pub fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// The next server-sent event's `data:` payload on an open response; `None` at the end.
pub async fn next_event(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return Ok(Some(data.to_string()));
        }
    }
}

/// The `data:` payloads of a whole server-sent-events body, in order.
pub fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// One connection that carries one request after another (`Connection: keep-alive`), as a client
/// holding a session keeps one: each response is read to its end, by its `Content-Length` or
/// chunk by chunk, which leaves the connection at the next response.
pub struct KeepAlive {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    /// The current response is chunked and its last chunk is not read yet.
    in_chunks: bool,
}

impl KeepAlive {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            addr,
            reader: BufReader::new(s),
            in_chunks: false,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a request and reads its status and headers; the body is next, read by
    /// [`KeepAlive::body`] or [`KeepAlive::next_chunk`].
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> io::Result<(u16, Vec<(String, String)>)> {
        let req = request_text(self.addr, method, path, headers, body, "keep-alive");
        self.reader.get_mut().write_all(req.as_bytes()).await?;
        let (status, headers) = read_head(&mut self.reader).await?;
        self.in_chunks = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        Ok((status, headers))
    }

    /// The next chunk of a chunked body; `None` after the last (or for a body that is not
    /// chunked).
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if !self.in_chunks {
            return Ok(None);
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(bad("the chunked body did not end"));
        }
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("a malformed chunk"))?;
        if n == 0 {
            // Trailers, if any, up to the empty line that ends the response.
            loop {
                line.clear();
                if self.reader.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                    break;
                }
            }
            self.in_chunks = false;
            return Ok(None);
        }
        let mut chunk = vec![0; n + 2];
        self.reader.read_exact(&mut chunk).await?;
        chunk.truncate(n);
        Ok(Some(chunk))
    }

    /// Reads the body of the response whose head `send` returned.
    pub async fn body(&mut self, headers: &[(String, String)]) -> io::Result<String> {
        let mut raw = Vec::new();
        if self.in_chunks {
            while let Some(c) = self.next_chunk().await? {
                raw.extend(c);
            }
        } else {
            let len = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .ok_or_else(|| bad("a kept-alive response needs a length"))?;
            raw.resize(len, 0);
            self.reader.read_exact(&mut raw).await?;
        }
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> io::Result<Response> {
        let (status, headers) = self.send(method, path, headers, body).await?;
        let body = self.body(&headers).await?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

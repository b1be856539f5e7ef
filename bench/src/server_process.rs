//! `troupe serve` as a child process on loopback, for the cases that measure the runtime over a
//! real wire: started on free ports, ready once it prints where it listens, its memory read from
//! `/proc`, and killed when dropped, on every way out of the case.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{BenchError, Result};
use crate::models::process_memory;

/// How to start the server: `PROGRAM serve ARGS --host 127.0.0.1 --port 0 [--grpc-port 0]`.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The `troupe` binary; `None`: this executable (`troupe bench` starting its own `serve`).
    pub program: Option<PathBuf>,
    /// The arguments after `serve` (model, limits, device).
    pub args: Vec<String>,
    /// Also serve gRPC, on a port of its own.
    pub grpc: bool,
    /// How long the server may take to load its model and listen.
    pub ready_timeout: Duration,
}

/// A running `troupe serve`; killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// Where it serves HTTP.
    pub http: SocketAddr,
    /// Where it serves gRPC, when asked to.
    pub grpc: Option<SocketAddr>,
}

impl ServerProcess {
    /// Starts the server and waits for its ready line (on stderr); its later lines are copied to
    /// this process's stderr.
    pub fn start(cmd: &ServerCommand) -> Result<Self> {
        let program = match &cmd.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|source| BenchError::Io {
                what: "finding",
                path: "the current executable".into(),
                source,
            })?,
        };
        let mut c = Command::new(&program);
        c.arg("serve")
            .args(&cmd.args)
            .args(["--host", "127.0.0.1", "--port", "0"]);
        if cmd.grpc {
            c.args(["--grpc-port", "0"]);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::Io {
                what: "starting",
                path: program.clone(),
                source,
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut waiting = true;
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if waiting {
                    let addrs = ready_addrs(&line);
                    waiting = addrs.is_none();
                    let _ = tx.send((line, addrs));
                } else {
                    eprintln!("{line}");
                }
            }
        });
        // Killed on the way out from here on, the early returns below included.
        let mut server = Self {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc: None,
        };
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(cmd.ready_timeout) {
                Ok((_, Some((http, grpc)))) => {
                    if cmd.grpc && grpc.is_none() {
                        return Err(BenchError::Task(
                            "`troupe serve` did not say where it serves gRPC".into(),
                        ));
                    }
                    server.http = http;
                    server.grpc = grpc;
                    return Ok(server);
                }
                Ok((line, None)) => said.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(BenchError::Task(format!(
                        "`troupe serve` was not ready after {:?}: {}",
                        cmd.ready_timeout,
                        said.join(" / ")
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.child.wait().map_err(BenchError::AsyncRuntime)?;
                    return Err(BenchError::Task(format!(
                        "`troupe serve` exited ({status}) before it was ready: {}",
                        said.join(" / ")
                    )));
                }
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now and its high-water mark, in bytes (0 off Linux).
    pub fn memory(&self) -> (u64, u64) {
        process_memory(&format!("/proc/{}/status", self.pid()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The addresses in `troupe serve`'s ready line: `... on http://ADDR (...)[, gRPC on ADDR (...)]`.
fn ready_addrs(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let rest = line.strip_prefix("troupe serve: ")?;
    let after = |marker: &str| -> Option<SocketAddr> {
        let (_, tail) = rest.split_once(marker)?;
        tail.split_whitespace().next()?.parse().ok()
    };
    Some((after(" on http://")?, after("gRPC on ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_names_both_ports() {
        let line = "troupe serve: verifier on http://127.0.0.1:4100 (OpenAI-compatible: \
                    /v1/chat/completions), gRPC on 127.0.0.1:4101 (troupe.v1.RuntimeService)";
        let (http, grpc) = ready_addrs(line).unwrap();
        assert_eq!(http.port(), 4100);
        assert_eq!(grpc.unwrap().port(), 4101);
        let http_only = "troupe serve: v on http://127.0.0.1:9 (OpenAI-compatible: /x)";
        assert_eq!(ready_addrs(http_only).unwrap().1, None);
        assert!(ready_addrs("troupe serve: stopped").is_none());
    }
}

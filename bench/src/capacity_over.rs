//! How the `agent-capacity` clients reach the runtime (`--over`): in process, or over HTTP or gRPC
//! to a `troupe serve` child process started as the in-process case builds its runtime, with the
//! open files a socket per client needs.

use std::str::FromStr;
use std::time::Duration;

use troupe::engine::WeightDtype;
use troupe_server::sockets;

use crate::capacity::CapacityPlan;
use crate::error::{ensure, BenchError, Result};
use crate::server_process::ServerCommand;
use crate::Env;

/// Open files a process needs besides its clients' sockets (its model, its runtime, its stdio).
const FILE_MARGIN: u64 = 256;

/// How the clients reach the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Over {
    /// Tasks of this process calling the runtime (`inproc`).
    #[default]
    InProcess,
    /// `troupe serve`'s HTTP front, in a child process on loopback (`http`).
    Http,
    /// `troupe serve`'s gRPC service, in a child process on loopback (`grpc`).
    Grpc,
}

impl Over {
    /// The name on the command line and in the reports.
    pub fn name(self) -> &'static str {
        match self {
            Over::InProcess => "inproc",
            Over::Http => "http",
            Over::Grpc => "grpc",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Over::InProcess => "in process",
            Over::Http => {
                "over HTTP to a `troupe serve` child process on loopback (a kept-alive \
                 connection per client: `POST /v1/sessions`, then a streamed completion)"
            }
            Over::Grpc => {
                "over gRPC to a `troupe serve` child process on loopback (a channel per client: \
                 `CreateSession`, then `Generate`)"
            }
        }
    }
}

impl FromStr for Over {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        [Over::InProcess, Over::Http, Over::Grpc]
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| {
                BenchError::Invalid(format!("--over is inproc, http or grpc, not {s:?}"))
            })
    }
}

/// What `troupe bench agent-capacity` may change of the case's plan.
#[derive(Debug, Clone, Default)]
pub struct CapacityFlags {
    /// How the clients reach the runtime.
    pub over: Over,
    /// The light ramp, instead of the plan's.
    pub light: Option<Vec<usize>>,
    /// The heavy ramp, instead of the plan's.
    pub heavy: Option<Vec<usize>>,
}

impl CapacityPlan {
    /// `troupe serve` as the in-process case builds its runtime: the verifier, plain decoding,
    /// the KV budget, and room for every client's session and turn. Each client names its window.
    pub(crate) fn server_command(&self, env: &Env) -> ServerCommand {
        let most = self.most().max(1).to_string();
        let mut args: Vec<String> = vec![
            "--model".into(),
            self.models.verifier.display().to_string(),
            "--drafter".into(),
            "none".into(),
            "--kv-budget".into(),
            self.kv_budget_bytes.to_string(),
            "--max-sessions".into(),
            most.clone(),
            "--max-queued-turns".into(),
            most,
            "--device".into(),
            env.device_name.clone(),
        ];
        if let Some(w) = self.models.weights {
            args.extend(["--weights".into(), weights_flag(w).into()]);
        }
        ServerCommand {
            program: self.serve_program.clone(),
            args,
            grpc: self.over == Over::Grpc,
            ready_timeout: Duration::from_secs(300),
        }
    }
}

/// `--weights` as the command line spells it.
fn weights_flag(w: WeightDtype) -> &'static str {
    match w {
        WeightDtype::F32 => "f32",
        WeightDtype::Bf16 => "bf16",
        WeightDtype::F16 => "f16",
        WeightDtype::AsStored => "stored",
        WeightDtype::Int8 => "int8",
    }
}

/// Raises this process's open-file limit as far as it goes (the server it starts inherits it),
/// and refuses a ramp that cannot fit under it: each side holds a socket per client.
pub(crate) fn check_open_files(clients: usize, over: Over) -> Result<()> {
    let limit = sockets::raise_open_file_limit()
        .or_else(|_| sockets::open_file_limit().map(|(soft, _)| soft));
    // Where the limit cannot be read, the clients find out.
    let Ok(soft) = limit else {
        return Ok(());
    };
    let need = clients as u64 + FILE_MARGIN;
    ensure!(
        need <= soft,
        "{clients} clients over {} need about {need} open files on each side (a socket each, and \
         the process's own files), but a process here may open {soft} (its hard limit): raise the \
         hard limit (`ulimit -Hn`) or ramp to fewer clients",
        over.name()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_is_one_of_three_names() {
        for over in [Over::InProcess, Over::Http, Over::Grpc] {
            assert_eq!(over.name().parse::<Over>().unwrap(), over);
        }
        assert!("tcp".parse::<Over>().is_err());
    }

    #[test]
    fn a_ramp_past_the_open_file_limit_is_refused_up_front() {
        check_open_files(16, Over::Http).unwrap();
        let e = check_open_files(10_000_000, Over::Grpc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10000000 clients over grpc need about"), "{e}");
    }
}

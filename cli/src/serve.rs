//! `troupe serve`: the runtime behind an OpenAI-compatible HTTP front, with sessions, and with
//! `--grpc-port` the gRPC `troupe.v1.RuntimeService` beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use troupe::engine::{
    load_model_drafter, load_verifier, DeviceKind, ModelConfig, ModelSource, NgramDrafter,
};
use troupe::{RuntimeBuilder, Tokenizer, WindowSpec};
use troupe_server::chat::ChatTemplate;
use troupe_server::sockets::listen;
use troupe_server::{AppState, ServerConfig};

/// Arguments of `troupe serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The verifier: a Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, default_value = "models/verifier")]
    model: PathBuf,
    /// The drafter: a model directory, `ngram`, or `none` (plain decoding).
    #[arg(long, default_value = "none")]
    drafter: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed when ready).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Also serve gRPC (`troupe.v1.RuntimeService`) on this port of `--host` (0: any free port).
    #[arg(long)]
    grpc_port: Option<u16>,
    /// The node's KV budget in bytes.
    #[arg(long, default_value_t = 8 << 30)]
    kv_budget: u64,
    /// Most sessions open at once.
    #[arg(long, default_value_t = 4096)]
    max_sessions: usize,
    /// Most turns running or waiting at once; past it a request is a 429.
    #[arg(long, default_value_t = 1024)]
    max_queued_turns: usize,
    /// Attention-sink and recent slots of a session's window, as `SINK,WINDOW`.
    #[arg(long, default_value = "4,508")]
    window: String,
    /// Requests must carry `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The width the verifier's weights are kept in: f32, bf16, f16, stored or int8 (CPU only).
    #[arg(long, value_parser = crate::bench::parse_weights)]
    weights: Option<troupe::engine::WeightDtype>,
}

/// Runs `troupe serve` until SIGINT or SIGTERM.
pub fn run(a: ServeArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(a))
}

fn window(s: &str) -> Result<WindowSpec> {
    let (sink, recent) = s
        .split_once(',')
        .context("--window is SINK,WINDOW, for example 4,508")?;
    Ok(WindowSpec::new(
        sink.trim().parse()?,
        recent.trim().parse()?,
    )?)
}

async fn serve(a: ServeArgs) -> Result<()> {
    // A socket per client: thousands of clients need more files than a usual soft limit of 1,024.
    if let Err(e) = troupe_server::sockets::raise_open_file_limit() {
        eprintln!(
            "troupe serve: could not raise the open-file limit ({e}); clients past it are refused"
        );
    }
    let dir = a.model.clone();
    let config = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("no model in {}", dir.display()))?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))
        .context("the server needs the model's tokenizer.json")?;
    let device: DeviceKind = a.device.parse()?;
    let weights = a.weights;
    let model_dir = dir.clone();
    let mut builder =
        RuntimeBuilder::new(move || load_verifier(&ModelSource::Dir(&model_dir), device, weights))
            .tokenizer(tokenizer)
            .kv_budget_bytes(a.kv_budget)
            .max_sessions(a.max_sessions)
            .default_window(window(&a.window)?);
    match a.drafter.as_str() {
        "none" => {}
        "ngram" => builder = builder.drafter(|| Ok(NgramDrafter::default())),
        path => {
            let p = PathBuf::from(path);
            let d: Arc<dyn Fn() -> _ + Send + Sync> = Arc::new(move || {
                load_model_drafter(&ModelSource::Dir(Path::new(&p)), device, None)
            });
            builder = builder.drafter(move || d());
        }
    }
    let runtime = builder.build().await?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "troupe".into());
    let listener = listen((a.host.as_str(), a.port))
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    let addr = listener.local_addr()?;
    let grpc_listener = match a.grpc_port {
        Some(port) => Some(
            listen((a.host.as_str(), port))
                .with_context(|| format!("binding {}:{port} for gRPC", a.host))?,
        ),
        None => None,
    };
    let state = AppState::new(
        runtime.clone(),
        ServerConfig {
            model_name: name.clone(),
            api_key: a.api_key,
            max_queued_turns: a.max_queued_turns,
            eos_tokens: config.eos_token_id.into_iter().collect(),
            chat_template: ChatTemplate::from_model_dir(&dir)?.map(Arc::new),
            ..ServerConfig::default()
        },
    );
    let server = troupe_server::server(state.clone(), listener)?;
    let http = server.handle();
    let mut ready =
        format!("troupe serve: {name} on http://{addr} (OpenAI-compatible: /v1/chat/completions)");
    // gRPC stops when HTTP does: `stop` is sent once the HTTP server has stopped.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc = match grpc_listener {
        Some(l) => {
            ready += &format!(", gRPC on {} (troupe.v1.RuntimeService)", l.local_addr()?);
            let signal = async {
                let _ = stopped.await;
            };
            Some(tokio::spawn(troupe_server::grpc_server(state, l, signal)?))
        }
        None => None,
    };
    eprintln!("{ready}");
    // The HTTP server stops on SIGINT or SIGTERM, once the requests in flight are answered; a
    // gRPC server that fails stops it too.
    let mut http_done = tokio::spawn(server);
    match grpc {
        None => http_done.await??,
        Some(mut grpc) => {
            tokio::select! {
                done = &mut http_done => done??,
                failed = &mut grpc => {
                    http.stop(true).await;
                    failed??;
                    anyhow::bail!("the gRPC server stopped on its own");
                }
            }
            let _ = stop.send(());
            if tokio::time::timeout(GRPC_DRAIN, grpc).await.is_err() {
                eprintln!("troupe serve: gRPC calls still open after {GRPC_DRAIN:?}; stopping");
            }
        }
    }
    runtime.shutdown().await?;
    eprintln!("troupe serve: stopped");
    Ok(())
}

/// How long gRPC calls in flight may run on once the server is stopping (actix-web's own limit).
const GRPC_DRAIN: Duration = Duration::from_secs(30);

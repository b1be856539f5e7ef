//! The gRPC service end to end, over real sockets on 127.0.0.1 and the scripted model: sessions
//! opened, described, forked and closed; a turn streamed as its tokens then its stats, the same
//! tokens as in-process; each error's code; the API key; a dropped stream cancelling its turn.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Code, Request, Status};
use troupe::actors::scripted::ScriptedModel;
use troupe::engine::tokenizer::byte_level_tokenizer_json;
use troupe::{GenerateParams, RuntimeBuilder, SessionConfig, Tokenizer};
use troupe_server::grpc::pb::{self, generate_request, generate_response};
use troupe_server::{grpc_server, AppState, RuntimeServiceClient, ServerConfig};

/// A gRPC server on 127.0.0.1 over the scripted model, and a client of it.
struct Served {
    client: RuntimeServiceClient,
    state: AppState,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    /// Stops the server, which must end within 30 s, then the runtime.
    async fn stop(self) {
        drop(self.client);
        let _ = self.stop.send(());
        let ended = tokio::time::timeout(Duration::from_secs(30), self.server).await;
        ended
            .expect("the gRPC server did not stop")
            .unwrap()
            .unwrap();
        self.state.runtime.shutdown().await.unwrap();
    }
}

/// Serves the scripted model (a `step` per verify step) with `config`.
async fn serve_with(step: Duration, config: ServerConfig) -> Served {
    let runtime = RuntimeBuilder::new(move || Ok(ScriptedModel::new(step)))
        .tokenizer(Tokenizer::from_json(&byte_level_tokenizer_json()).unwrap())
        .build()
        .await
        .unwrap();
    let state = AppState::new(runtime, config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = grpc_server(state.clone(), listener, async {
        let _ = stopped.await;
    })
    .unwrap();
    let server = tokio::spawn(server);
    let client = RuntimeServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        client,
        state,
        stop,
        server,
    }
}

async fn serve() -> Served {
    serve_with(Duration::from_millis(1), ServerConfig::default()).await
}

/// A greedy turn of `prompt` on `session`.
fn turn(session: u64, prompt: generate_request::Prompt, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: session,
        prompt: Some(prompt),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

fn text(t: &str) -> generate_request::Prompt {
    generate_request::Prompt::Text(t.into())
}

fn tokens(ids: &[u32]) -> generate_request::Prompt {
    generate_request::Prompt::Tokens(pb::TokenIds { ids: ids.to_vec() })
}

/// A whole turn: its token ids, its text, and its stats, which must come last and once.
async fn run(
    client: &mut RuntimeServiceClient,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, pb::TurnStats), Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ids, mut text, mut stats) = (Vec::new(), String::new(), None);
    while let Some(m) = stream.message().await? {
        assert!(stats.is_none(), "a message after the stats: {m:?}");
        match m.event.expect("a message with no event") {
            generate_response::Event::Tokens(t) => {
                ids.extend(t.ids);
                text.push_str(&t.text);
            }
            generate_response::Event::Stats(s) => stats = Some(s),
        }
    }
    Ok((ids, text, stats.expect("the stream ended without stats")))
}

/// The status a turn fails with, at the call or in its stream.
async fn failure(client: &mut RuntimeServiceClient, req: pb::GenerateRequest) -> Status {
    match run(client, req).await {
        Ok(done) => panic!("the turn succeeded: {done:?}"),
        Err(s) => s,
    }
}

async fn create(client: &mut RuntimeServiceClient) -> pb::Session {
    client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn info(client: &mut RuntimeServiceClient, id: u64) -> Result<pb::SessionInfo, Status> {
    let req = pb::GetSessionInfoRequest { session_id: id };
    Ok(client.get_session_info(req).await?.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_streams_the_tokens_it_gives_in_process_then_its_stats() {
    let mut s = serve().await;
    let session = create(&mut s.client).await;
    assert!(session.window > 0, "{session:?}");
    let (ids, streamed_text, stats) = run(&mut s.client, turn(session.id, text("hello there"), 12))
        .await
        .unwrap();
    assert_eq!(ids.len(), 12);
    assert_eq!(stats.tokens, 12);
    assert!(stats.steps > 0 && stats.latency_ms > 0.0, "{stats:?}");

    // The same prompt on a fresh session in-process, greedy.
    let local = s
        .state
        .runtime
        .spawn_session(SessionConfig::default())
        .await
        .unwrap();
    let (local_ids, local_stats) = local
        .generate("hello there", GenerateParams::greedy(12))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(ids, local_ids);
    assert_eq!(Some(streamed_text), local_stats.text);

    // The session's info counts what it has seen, as the in-process session's does.
    let i = info(&mut s.client, session.id).await.unwrap();
    let l = local.info().await.unwrap();
    assert_eq!(i.id, session.id);
    assert_eq!(i.turns, 1);
    assert_eq!(i.tokens_seen, l.tokens_seen);
    assert!(i.tokens_seen >= ("hello there".len() + 12) as u64, "{i:?}");
    assert_eq!(i.window_capacity, u64::from(session.sink + session.window));

    // A turn of token ids continues the session.
    let (more, _, _) = run(&mut s.client, turn(session.id, tokens(&[72, 105]), 3))
        .await
        .unwrap();
    assert_eq!(more.len(), 3);
    let after = info(&mut s.client, session.id).await.unwrap();
    assert_eq!(after.tokens_seen, i.tokens_seen + 2 + 3);
    assert_eq!(after.turns, 2);
    assert_eq!(
        s.state.counters.generation_tokens.load(Ordering::Relaxed),
        15
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_seed_makes_sampling_repeatable() {
    let mut s = serve().await;
    let sampled = |session: u64, seed: u64| pb::GenerateRequest {
        temperature: 1.0,
        seed: Some(seed),
        ..turn(session, text("roll the dice"), 24)
    };
    let (a, b) = (create(&mut s.client).await, create(&mut s.client).await);
    let first = run(&mut s.client, sampled(a.id, 7)).await.unwrap().0;
    let second = run(&mut s.client, sampled(b.id, 7)).await.unwrap().0;
    assert_eq!(first, second, "the same seed sampled differently");
    let c = create(&mut s.client).await;
    let other = run(&mut s.client, sampled(c.id, 8)).await.unwrap().0;
    assert_ne!(first, other, "another seed sampled the same 24 tokens");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_continues_the_same_history() {
    let mut s = serve().await;
    let source = create(&mut s.client).await;
    run(&mut s.client, turn(source.id, text("once upon a time"), 9))
        .await
        .unwrap();
    let fork = s
        .client
        .fork_session(pb::ForkSessionRequest {
            session_id: source.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fork.id, source.id);
    assert_eq!((fork.sink, fork.window), (source.sink, source.window));
    let (si, fi) = (
        info(&mut s.client, source.id).await.unwrap(),
        info(&mut s.client, fork.id).await.unwrap(),
    );
    assert_eq!(fi.tokens_seen, si.tokens_seen);
    assert_eq!(fi.window_fill, si.window_fill);

    // One token of prompt: what follows depends on the history before it.
    let from_source = run(&mut s.client, turn(source.id, tokens(&[65]), 10))
        .await
        .unwrap()
        .0;
    let from_fork = run(&mut s.client, turn(fork.id, tokens(&[65]), 10))
        .await
        .unwrap()
        .0;
    assert_eq!(from_fork, from_source);
    let fresh = create(&mut s.client).await;
    run(&mut s.client, turn(fresh.id, text("a different start"), 9))
        .await
        .unwrap();
    let from_fresh = run(&mut s.client, turn(fresh.id, tokens(&[65]), 10))
        .await
        .unwrap()
        .0;
    assert_ne!(from_fresh, from_source, "the history made no difference");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_unknown_sessions_are_not_found() {
    let mut s = serve().await;
    let session = create(&mut s.client).await;
    s.client
        .close_session(pb::CloseSessionRequest {
            session_id: session.id,
        })
        .await
        .unwrap();
    let e = info(&mut s.client, session.id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&session.id.to_string()), "{e:?}");
    let e = failure(&mut s.client, turn(session.id, text("hi"), 2)).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let unknown = 987_654;
    assert_eq!(
        info(&mut s.client, unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let e = s
        .client
        .fork_session(pb::ForkSessionRequest {
            session_id: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = s
        .client
        .close_session(pb::CloseSessionRequest {
            session_id: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_arguments() {
    let mut s = serve().await;
    let e = s
        .client
        .create_session(pb::CreateSessionRequest {
            sink: Some(4),
            window: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("window"), "{e:?}");

    let session = create(&mut s.client).await;
    let no_prompt = pb::GenerateRequest {
        prompt: None,
        ..turn(session.id, text(""), 2)
    };
    let too_hot = pb::GenerateRequest {
        temperature: 3.0,
        ..turn(session.id, text("hi"), 2)
    };
    let no_mass = pb::GenerateRequest {
        top_p: Some(0.0),
        ..turn(session.id, text("hi"), 2)
    };
    let out_of_range = turn(session.id, tokens(&[72, 100_000]), 2);
    for req in [no_prompt, too_hot, no_mass, out_of_range] {
        let e = failure(&mut s.client, req.clone()).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {e:?}");
    }
    // None of them reached the session, which still serves.
    let (ids, _, _) = run(&mut s.client, turn(session.id, text("hi"), 2))
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_the_servers_key() {
    let config = ServerConfig {
        api_key: Some("sesame".into()),
        ..ServerConfig::default()
    };
    let mut s = serve_with(Duration::from_millis(1), config).await;
    let with = |key: Option<&str>| {
        let mut req = Request::new(pb::CreateSessionRequest::default());
        if let Some(k) = key {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        req
    };
    for key in [None, Some("guess")] {
        let e = s.client.create_session(with(key)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{key:?}: {e:?}");
    }
    let session = s
        .client
        .create_session(with(Some("sesame")))
        .await
        .unwrap()
        .into_inner();
    let e = failure(&mut s.client, turn(session.id, text("hi"), 2)).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_its_turn() {
    let config = ServerConfig {
        max_queued_turns: 1,
        ..ServerConfig::default()
    };
    let mut s = serve_with(Duration::from_millis(20), config).await;
    let session = create(&mut s.client).await;
    let mut stream = s
        .client
        .generate(turn(session.id, text("go on forever"), 10_000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("no first message");
    assert!(
        matches!(first.event, Some(generate_response::Event::Tokens(_))),
        "{first:?}"
    );
    // The turn holds the server's only seat.
    let e = failure(&mut s.client, turn(session.id, text("me too"), 1)).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(s.state.counters.running.load(Ordering::Relaxed), 1);

    drop(stream);
    let c = &s.state.counters;
    let released = async {
        while c.running.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), released)
        .await
        .expect("the server still holds the turn 30 s after its client left");
    assert_eq!(c.finished_abort.load(Ordering::Relaxed), 1);

    // Turns of a session run one after another: the next one ends only once the dropped one has.
    // Left running, the dropped turn would take 10,000 steps of 20 ms.
    let next = run(&mut s.client, turn(session.id, text("and now"), 1));
    let (ids, _, _) = tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("the dropped turn still runs 30 s after its client left")
        .unwrap();
    assert_eq!(ids.len(), 1);
    let i = info(&mut s.client, session.id).await.unwrap();
    assert!(i.tokens_seen < 5_000, "the dropped turn ran on: {i:?}");
    let stats = s.state.runtime.stats().await.unwrap();
    assert!(stats.emitted < 5_000, "the dropped turn ran on: {stats:?}");
    s.stop().await;
}

//! Lifecycle: a dropped stream cancels its turn and frees its seat, `SessionHandle::cancel` ends a
//! session's turns and keeps the session, dropping the runtime stops its actors, `shutdown` waits
//! for the model threads, and the death of the scheduler or the manager ends every pending turn
//! with a typed error and marks the runtime failed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use troupe::actors::scripted::ScriptedModel;
use troupe::engine::{Result as EngineResult, SeqId, Verifier, VerifyOutcome, VerifyWork};
use troupe::{
    ActorKind, Event, FaultPlan, GenerateParams, Health, Runtime, RuntimeBuilder, RuntimeError,
    SchedulerConfig, SessionConfig, SessionHandle, TurnStream, WindowSpec,
};

/// The scripted model, counting the live copies of itself.
struct Tracked {
    inner: ScriptedModel,
    live: Arc<AtomicUsize>,
}

impl Tracked {
    fn new(delay: Duration, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self {
            inner: ScriptedModel::new(delay),
            live,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Verifier for Tracked {
    fn open(&mut self, seq: SeqId, spec: WindowSpec, seed: u64) -> EngineResult<()> {
        self.inner.open(seq, spec, seed)
    }
    fn close(&mut self, seq: SeqId) -> EngineResult<()> {
        self.inner.close(seq)
    }
    fn fork(&mut self, from: SeqId, seq: SeqId, seed: u64) -> EngineResult<()> {
        self.inner.fork(from, seq, seed)
    }
    fn reseed(&mut self, seq: SeqId, seed: u64) -> EngineResult<()> {
        self.inner.reseed(seq, seed)
    }
    fn verify(&mut self, works: &[VerifyWork]) -> EngineResult<Vec<VerifyOutcome>> {
        self.inner.verify(works)
    }
    fn kv_bytes(&self, spec: WindowSpec) -> u64 {
        self.inner.kv_bytes(spec)
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn window_fill(&self, seq: SeqId) -> Option<(u64, usize)> {
        self.inner.window_fill(seq)
    }
}

const STEP: Duration = Duration::from_millis(5);

async fn scripted(config: SchedulerConfig, faults: FaultPlan) -> Runtime {
    RuntimeBuilder::new(|| Ok(ScriptedModel::new(STEP)))
        .scheduler(config)
        .faults(faults)
        .build()
        .await
        .unwrap()
}

/// Reads the stream up to its first tokens.
async fn first_tokens(stream: &mut TurnStream) -> usize {
    match stream.next().await {
        Some(Event::Tokens { ids, .. }) => ids.len(),
        other => panic!("expected tokens, got {other:?}"),
    }
}

/// The event that ends the stream.
async fn last_event(stream: &mut TurnStream) -> Event {
    let mut last = None;
    while let Some(ev) = stream.next().await {
        last = Some(ev);
    }
    last.expect("a stream always ends with an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_its_turn_and_frees_its_seat() {
    // One seat a step: while A's turn runs, B's cannot.
    let rt = scripted(
        SchedulerConfig::default().with_max_step_seqs(1),
        FaultPlan::default(),
    )
    .await;
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let b = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let mut long = a
        .generate(vec![1, 2, 3], GenerateParams::greedy(100_000))
        .unwrap();
    let mut got = first_tokens(&mut long).await;
    got += first_tokens(&mut long).await;
    drop(long);
    let (tokens, _) = b
        .generate(vec![4, 5], GenerateParams::greedy(8))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(tokens.len(), 8);
    // A kept what it emitted, and stopped soon after its stream was dropped (the policy's tests
    // pin "within one step"; here the messages may queue on a loaded machine).
    let info = a.info().await.unwrap();
    let emitted = info.tokens_seen as usize - 3;
    assert!(
        (got..got + 100).contains(&emitted),
        "A emitted {emitted} tokens after {got} were read"
    );
    // ... and stays usable, continuing from them.
    let (more, _) = a
        .generate(vec![6], GenerateParams::greedy(4))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(more.len(), 4);
    assert_eq!(
        a.info().await.unwrap().tokens_seen as usize,
        3 + emitted + 1 + 4
    );
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_the_running_and_queued_turns_and_keeps_the_session() {
    let rt = scripted(SchedulerConfig::default(), FaultPlan::default()).await;
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let mut running = s
        .generate(vec![1, 2], GenerateParams::greedy(100_000))
        .unwrap();
    let mut queued = s
        .generate(vec![3], GenerateParams::greedy(100_000))
        .unwrap();
    first_tokens(&mut running).await;
    s.cancel().unwrap();
    for stream in [&mut running, &mut queued] {
        match last_event(stream).await {
            Event::Error(RuntimeError::Cancelled(id)) => assert_eq!(id, s.id()),
            other => panic!("expected a cancellation, got {other:?}"),
        }
    }
    // An explicit cancel of one stream ends only that turn.
    let mut one = s
        .generate(vec![4], GenerateParams::greedy(100_000))
        .unwrap();
    let after = s.generate(vec![5], GenerateParams::greedy(3)).unwrap();
    first_tokens(&mut one).await;
    one.cancel();
    assert!(matches!(
        last_event(&mut one).await,
        Event::Error(RuntimeError::Cancelled(_))
    ));
    assert_eq!(after.collect().await.unwrap().0.len(), 3);
    let stats = rt.stats().await.unwrap();
    assert!(stats.emitted < 1000, "cancelled turns ran on: {stats:?}");
    rt.shutdown().await.unwrap();
}

/// Waits (a bounded number of times) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_runtime_stops_its_actors_and_ends_pending_turns() {
    let live = Arc::new(AtomicUsize::new(0));
    let model = live.clone();
    let rt = RuntimeBuilder::new(move || Ok(Tracked::new(STEP, model.clone())))
        .build()
        .await
        .unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let mut turn = s
        .generate(vec![1, 2], GenerateParams::greedy(100_000))
        .unwrap();
    first_tokens(&mut turn).await;
    assert_eq!(live.load(Ordering::SeqCst), 1);
    drop(rt);
    assert!(matches!(
        last_event(&mut turn).await,
        Event::Error(RuntimeError::SessionClosed(_))
    ));
    eventually("the model is dropped", || live.load(Ordering::SeqCst) == 0).await;
    // A handle kept past the runtime answers with an error, never a hang.
    let late = s.generate(vec![3], GenerateParams::greedy(2));
    match late {
        Err(RuntimeError::SessionClosed(_)) => {}
        Ok(stream) => assert!(stream.collect().await.is_err()),
        Err(other) => panic!("unexpected {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_model_and_reports_itself() {
    let live = Arc::new(AtomicUsize::new(0));
    let model = live.clone();
    let rt = RuntimeBuilder::new(move || Ok(Tracked::new(STEP, model.clone())))
        .build()
        .await
        .unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let turn = s.generate(vec![1, 2], GenerateParams::greedy(20)).unwrap();
    assert_eq!(rt.health(), Health::Serving);
    rt.shutdown().await.unwrap();
    // The turn in flight was let finish, and the model is gone once shutdown returns.
    assert_eq!(turn.collect().await.unwrap().0.len(), 20);
    assert_eq!(live.load(Ordering::SeqCst), 0);
    assert_eq!(rt.health(), Health::ShuttingDown);
    assert!(rt.spawn_session(SessionConfig::default()).await.is_err());
}

async fn two_sessions(rt: &Runtime) -> (SessionHandle, SessionHandle) {
    (
        rt.spawn_session(SessionConfig::default()).await.unwrap(),
        rt.spawn_session(SessionConfig::default()).await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_failure_ends_every_turn_and_marks_the_runtime_failed() {
    // The second submit kills the scheduler while the first turn runs.
    let faults = FaultPlan::default().panic_after(ActorKind::Scheduler, "submit", 2);
    let rt = scripted(SchedulerConfig::default(), faults).await;
    let (a, b) = two_sessions(&rt).await;
    let mut running = a
        .generate(vec![1, 2], GenerateParams::greedy(100_000))
        .unwrap();
    first_tokens(&mut running).await;
    let mut killer = b.generate(vec![3], GenerateParams::greedy(4)).unwrap();
    for stream in [&mut running, &mut killer] {
        match last_event(stream).await {
            Event::Error(RuntimeError::RuntimeFailed(why)) => {
                assert!(why.contains("scheduler"), "{why}")
            }
            other => panic!("expected the runtime's failure, got {other:?}"),
        }
    }
    assert!(matches!(rt.health(), Health::Failed { reason } if reason.contains("scheduler")));
    // Later turns and sessions are refused with the same error.
    let later = a.generate(vec![4], GenerateParams::greedy(2)).unwrap();
    assert!(matches!(
        later.collect().await,
        Err(RuntimeError::RuntimeFailed(_))
    ));
    assert!(matches!(
        rt.spawn_session(SessionConfig::default()).await,
        Err(RuntimeError::RuntimeFailed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_failure_ends_every_turn_and_marks_the_runtime_failed() {
    // The third spawn kills the manager (and the sessions under it).
    let faults = FaultPlan::default().panic_after(ActorKind::Manager, "spawn", 3);
    let rt = scripted(SchedulerConfig::default(), faults).await;
    let (a, _b) = two_sessions(&rt).await;
    let mut running = a
        .generate(vec![1, 2], GenerateParams::greedy(100_000))
        .unwrap();
    first_tokens(&mut running).await;
    assert!(rt.spawn_session(SessionConfig::default()).await.is_err());
    assert!(matches!(
        last_event(&mut running).await,
        Event::Error(RuntimeError::SessionClosed(_))
    ));
    // The sessions stop with the manager, before the root hears of its failure.
    eventually(
        "the runtime reports the manager's failure",
        || matches!(rt.health(), Health::Failed { reason } if reason.contains("manager")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_past_its_restarts_marks_the_runtime_failed() {
    let faults = FaultPlan::default().panic_after(ActorKind::Verifier, "step", 1);
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(STEP)))
        .faults(faults)
        .max_restarts(0)
        .build()
        .await
        .unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let err = s
        .generate(vec![1, 2], GenerateParams::greedy(4))
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::TooManyRestarts { .. }), "{err}");
    assert!(matches!(rt.health(), Health::Failed { reason } if reason.contains("restarted")));
}

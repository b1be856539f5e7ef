//! The public face of the runtime: a builder, the `Runtime`, and cloneable `SessionHandle`s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), troupe_actors::RuntimeError> {
//! use std::time::Duration;
//! use troupe_actors::{GenerateParams, RuntimeBuilder, SessionConfig, scripted::ScriptedModel};
//! let runtime = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO)))
//!     .build()
//!     .await?;
//! let session = runtime.spawn_session(SessionConfig::default()).await?;
//! let (tokens, stats) = session.generate(vec![1, 2, 3], GenerateParams::default())?.collect().await?;
//! runtime.shutdown().await?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;
use troupe_engine::{
    warm_up, Drafter, EngineError, Tokenizer, Verifier, WarmUp, WarmUpProgress, WindowSpec,
};

use crate::config::{GenerateParams, Prompt, SchedulerConfig, SessionConfig};
use crate::error::RuntimeError;
use crate::events::{SessionInfo, TurnSink, TurnStream};
use crate::faults::FaultPlan;
use crate::health::{Health, HealthCell};
use crate::manager::{BudgetInfo, ManagerActor, ManagerArgs, ManagerMsg, Spawned};
use crate::policy::SchedulerStats;
use crate::scheduler::{SchedulerActor, SchedulerArgs, SchedulerMsg};
use crate::session::SessionMsg;
use crate::supervisor::{SupervisorActor, SupervisorMsg};
use crate::SessionId;

/// A shared factory of verifiers, for a caller that picks the model at run time:
/// `RuntimeBuilder::new(move || factory())`.
pub type VerifierFactory = Arc<dyn Fn() -> Result<Box<dyn Verifier>, EngineError> + Send + Sync>;
/// A shared factory of drafters, for a caller that picks the drafter at run time.
pub type DrafterFactory = Arc<dyn Fn() -> Result<Box<dyn Drafter>, EngineError> + Send + Sync>;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    verifier: VerifierFactory,
    drafter: Option<DrafterFactory>,
    tokenizer: Option<Arc<Tokenizer>>,
    scheduler: SchedulerConfig,
    kv_budget_bytes: u64,
    max_sessions: usize,
    default_window: WindowSpec,
    max_prompt_tokens: usize,
    faults: FaultPlan,
    step_timeout: Duration,
    max_restarts: u64,
    warm_up: Option<(WarmUp, WarmUpReport)>,
}

/// Called after each step of a start-up warm-up.
pub type WarmUpReport = Arc<dyn Fn(WarmUpProgress) + Send + Sync>;

impl RuntimeBuilder {
    /// A runtime whose verifier `verifier` builds (called once by [`Self::build`], and again
    /// after each failure of the verifier).
    pub fn new<F, V>(verifier: F) -> Self
    where
        F: Fn() -> Result<V, EngineError> + Send + Sync + 'static,
        V: Verifier + 'static,
    {
        let verifier: VerifierFactory =
            Arc::new(move || verifier().map(|v| Box::new(v) as Box<dyn Verifier>));
        Self {
            verifier,
            drafter: None,
            tokenizer: None,
            scheduler: SchedulerConfig::default(),
            kv_budget_bytes: 8 << 30,
            max_sessions: 4096,
            default_window: WindowSpec::default(),
            max_prompt_tokens: 32_768,
            faults: FaultPlan::default(),
            step_timeout: Duration::from_secs(120),
            max_restarts: 8,
            warm_up: None,
        }
    }

    /// Drafts with what `drafter` builds (called once by [`Self::build`], and again after each
    /// failure of the proposer); without one, decoding is plain.
    pub fn drafter<F, D>(mut self, drafter: F) -> Self
    where
        F: Fn() -> Result<D, EngineError> + Send + Sync + 'static,
        D: Drafter + 'static,
    {
        self.drafter = Some(Arc::new(move || {
            drafter().map(|d| Box::new(d) as Box<dyn Drafter>)
        }));
        self
    }

    /// Tokenizes text prompts and decodes streamed text.
    pub fn tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.tokenizer = Some(Arc::new(tokenizer));
        self
    }

    /// Scheduler limits and speculation policy.
    pub fn scheduler(mut self, config: SchedulerConfig) -> Self {
        self.scheduler = config;
        self
    }

    /// The node's KV budget in bytes: the sum of all open sessions' windows stays under it.
    pub fn kv_budget_bytes(mut self, bytes: u64) -> Self {
        self.kv_budget_bytes = bytes;
        self
    }

    /// Most sessions open at once.
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = n;
        self
    }

    /// The window of sessions that do not choose one.
    pub fn default_window(mut self, spec: WindowSpec) -> Self {
        self.default_window = spec;
        self
    }

    /// Longest prompt a turn accepts, in tokens.
    pub fn max_prompt_tokens(mut self, n: usize) -> Self {
        self.max_prompt_tokens = n;
        self
    }

    /// Injected faults and delays.
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.faults = plan;
        self
    }

    /// How long a verify step may take before the verifier is presumed lost and restarted.
    pub fn step_timeout(mut self, t: Duration) -> Self {
        self.step_timeout = t;
        self
    }

    /// Restarts allowed per component.
    pub fn max_restarts(mut self, n: u64) -> Self {
        self.max_restarts = n;
        self
    }

    /// Runs `plan` on the verifier before [`Self::build`] returns, so a GPU backend tunes and
    /// compiles the step shapes at start-up, not on the first request; `report` hears each step
    /// (each also goes to `tracing` at info level). See [`troupe_engine::warm_up`].
    pub fn warm_up(mut self, plan: WarmUp, report: WarmUpReport) -> Self {
        self.warm_up = Some((plan, report));
        self
    }

    /// Builds the verifier (and drafter), warms it up if asked, and starts the actors on the
    /// current tokio runtime.
    pub async fn build(self) -> Result<Runtime, RuntimeError> {
        self.scheduler.validate()?;
        let vf = self.verifier.clone();
        let warm = self.warm_up.clone();
        let verifier = tokio::task::spawn_blocking(move || {
            let mut verifier = vf()?;
            if let Some((plan, report)) = warm {
                let started = std::time::Instant::now();
                warm_up(verifier.as_mut(), &plan, &mut |p| {
                    tracing::info!(
                        step = p.done,
                        of = p.total,
                        batch = p.batch,
                        what = p.what,
                        "warm-up"
                    );
                    report(p);
                })?;
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "warm-up done");
            }
            Ok::<_, troupe_engine::EngineError>(verifier)
        })
        .await
        .map_err(|e| RuntimeError::ActorUnavailable(e.to_string()))??;
        let drafter = match &self.drafter {
            Some(f) => {
                let f = f.clone();
                Some(
                    tokio::task::spawn_blocking(move || f())
                        .await
                        .map_err(|e| RuntimeError::ActorUnavailable(e.to_string()))??,
                )
            }
            None => None,
        };
        // A session reserves its verifier window and the drafter's state for it.
        let one = WindowSpec { sink: 0, window: 1 };
        let drafting = drafter
            .as_ref()
            .filter(|_| self.scheduler.max_draft_len > 0);
        let slot_bytes = verifier.kv_bytes(one) + drafting.map_or(0, |d| d.kv_bytes(one));
        crate::manager::window_bytes(self.default_window, slot_bytes)?;
        let max_positions = verifier.max_positions();
        crate::manager::window_fits(self.default_window, max_positions)?;
        let vocab_size = verifier.vocab_size();
        if let Some(theirs) = drafter.as_ref().and_then(|d| d.vocab_size()) {
            if theirs != vocab_size {
                return Err(RuntimeError::InvalidConfig(format!(
                    "the drafter's vocabulary has {theirs} tokens, the verifier's {vocab_size}: \
                     its drafts could not be verified"
                )));
            }
        }
        let health = HealthCell::new();
        let (root, _) = Actor::spawn(None, SupervisorActor, health.clone()).await?;
        let (scheduler, _) = Actor::spawn_linked(
            None,
            SchedulerActor,
            SchedulerArgs {
                config: self.scheduler,
                verifier,
                verifier_factory: self.verifier,
                drafter,
                drafter_factory: self.drafter,
                faults: self.faults.clone(),
                step_timeout: self.step_timeout,
                max_restarts: self.max_restarts,
                health: health.clone(),
            },
            root.get_cell(),
        )
        .await?;
        let (manager, _) = Actor::spawn_linked(
            None,
            ManagerActor,
            ManagerArgs {
                scheduler: scheduler.get_derived(),
                max_sessions: self.max_sessions,
                budget_bytes: self.kv_budget_bytes,
                slot_bytes,
                default_window: self.default_window,
                max_prompt_tokens: self.max_prompt_tokens,
                vocab_size,
                max_positions,
                tokenizer: self.tokenizer.clone(),
                faults: self.faults,
            },
            root.get_cell(),
        )
        .await?;
        root.cast(SupervisorMsg::Watch {
            manager: manager.clone(),
            scheduler: scheduler.clone(),
        })?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                root,
                manager,
                scheduler,
                health,
                slot_bytes,
                tokenizer: self.tokenizer,
            }),
        })
    }
}

struct Inner {
    root: ActorRef<SupervisorMsg>,
    manager: ActorRef<ManagerMsg>,
    scheduler: ActorRef<SchedulerMsg>,
    health: HealthCell,
    slot_bytes: u64,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Drop for Inner {
    /// The last `Runtime` is gone: stop every actor (those under the root stop with it). Pending
    /// turns end with `SessionClosed`; the model threads finish the step they hold and exit.
    fn drop(&mut self) {
        self.health.shutting_down();
        self.root.stop(Some("the runtime was dropped".into()));
    }
}

/// A running troupe: one shared verifier serving many sessions. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

async fn ask<M, T>(
    actor: &ActorRef<M>,
    what: &str,
    build: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
) -> Result<T, RuntimeError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, Some(CALL_TIMEOUT)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(RuntimeError::Timeout(what.into())),
        Ok(CallResult::SenderError) | Err(_) => Err(RuntimeError::ActorUnavailable(what.into())),
    }
}

impl Runtime {
    /// Admits and starts a session. Refused with [`RuntimeError::AdmissionRefused`] past the
    /// session cap or the KV budget.
    pub async fn spawn_session(
        &self,
        config: SessionConfig,
    ) -> Result<SessionHandle, RuntimeError> {
        let Spawned { id, actor, window } = ask(&self.inner.manager, "manager", |reply| {
            ManagerMsg::Spawn { config, reply }
        })
        .await??;
        Ok(SessionHandle {
            id,
            window,
            actor,
            manager: self.inner.manager.clone(),
        })
    }

    /// The handle of an open session.
    pub async fn session(&self, id: SessionId) -> Result<SessionHandle, RuntimeError> {
        let Spawned { id, actor, window } = ask(&self.inner.manager, "manager", |reply| {
            ManagerMsg::Lookup { id, reply }
        })
        .await??;
        Ok(SessionHandle {
            id,
            window,
            actor,
            manager: self.inner.manager.clone(),
        })
    }

    /// Bytes a session with `window` reserves.
    pub fn kv_bytes_per_session(&self, window: WindowSpec) -> u64 {
        self.inner.slot_bytes * window.capacity() as u64
    }

    /// Sessions open and bytes reserved.
    pub async fn budget(&self) -> Result<BudgetInfo, RuntimeError> {
        ask(&self.inner.manager, "manager", ManagerMsg::Budget).await
    }

    /// The scheduler's counters (steps, batch sizes, drafts, restarts).
    pub async fn stats(&self) -> Result<SchedulerStats, RuntimeError> {
        ask(&self.inner.scheduler, "scheduler", SchedulerMsg::Stats).await
    }

    /// The tokenizer, if the runtime has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.inner.tokenizer.as_deref()
    }

    /// Whether the runtime serves: [`Health::Failed`] once the scheduler or the session manager
    /// has died or the verifier has failed past its restart limit (a server answers 503 then).
    /// Answered from shared state, without asking an actor.
    pub fn health(&self) -> Health {
        self.inner.health.get()
    }

    /// Stops admitting sessions, lets every active turn finish (within `SHUTDOWN_DRAIN`), then
    /// stops every actor and waits for them, the model threads included. An error says what did
    /// not end in time; the actors are stopped all the same.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        inner.health.shutting_down();
        let mut first_err = None;
        if let Err(e) = ask(&inner.manager, "manager", ManagerMsg::StopAdmitting).await {
            first_err.get_or_insert(e);
        }
        // Every turn asked for so far, queued behind another or on its way to the scheduler,
        // is let finish: each session answers once it has none.
        let sessions = ask(&inner.manager, "manager", ManagerMsg::Sessions)
            .await
            .unwrap_or_default();
        let drained = futures::future::join_all(
            sessions
                .iter()
                .map(|s| s.call(SessionMsg::Drain, Some(SHUTDOWN_DRAIN))),
        )
        .await;
        if drained.iter().any(|d| matches!(d, Ok(CallResult::Timeout))) {
            first_err.get_or_insert(RuntimeError::Timeout("turns to drain".into()));
        }
        // Sessions first (nothing new reaches the scheduler), then the scheduler's children (the
        // model threads), then the rest.
        let stop = Some("shutdown".to_string());
        let wait = Some(SHUTDOWN_STOP);
        inner
            .manager
            .stop_children_and_wait(stop.clone(), wait)
            .await;
        inner
            .scheduler
            .stop_children_and_wait(stop.clone(), wait)
            .await;
        for cell in [inner.manager.get_cell(), inner.scheduler.get_cell()] {
            if cell.stop_and_wait(stop.clone(), wait).await.is_err() {
                first_err.get_or_insert(RuntimeError::Timeout("actors to stop".into()));
            }
        }
        let _ = inner.root.stop_and_wait(stop, wait).await;
        first_err.map_or(Ok(()), Err)
    }
}

/// A fork not yet handed to its caller: closed when dropped.
struct Unclaimed(Option<SessionHandle>);

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(fork) = self.0.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = fork.close().await;
            });
        }
    }
}

/// How long `shutdown` lets active turns finish.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(600);
/// How long `shutdown` waits for each group of actors to stop.
const SHUTDOWN_STOP: Duration = Duration::from_secs(60);

/// Names turns across the process, so a cancellation names exactly one.
static NEXT_TURN: AtomicU64 = AtomicU64::new(1);

/// A handle on one session. Clone it freely and send it anywhere.
#[derive(Clone)]
pub struct SessionHandle {
    id: SessionId,
    window: WindowSpec,
    actor: ActorRef<SessionMsg>,
    manager: ActorRef<ManagerMsg>,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The session's window.
    pub fn window(&self) -> WindowSpec {
        self.window
    }

    /// Starts a turn (queued behind the session's earlier turns) and returns its event stream.
    pub fn generate(
        &self,
        prompt: impl Into<Prompt>,
        params: GenerateParams,
    ) -> Result<TurnStream, RuntimeError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let turn = NEXT_TURN.fetch_add(1, Ordering::Relaxed);
        self.actor
            .cast(SessionMsg::Generate {
                turn,
                prompt: prompt.into(),
                params,
                // Made here, so a message the session never handles (it stopped first) still
                // ends the stream with an error as it is dropped.
                sink: TurnSink::new(tx, self.id),
            })
            .map_err(|_| RuntimeError::SessionClosed(self.id))?;
        Ok(TurnStream::new(rx, self.actor.clone(), turn))
    }

    /// Cancels every turn of the session, the running one and those queued behind it; each of
    /// their streams ends with [`RuntimeError::Cancelled`]. The session stays open, with the
    /// tokens already emitted in its context.
    pub fn cancel(&self) -> Result<(), RuntimeError> {
        self.actor
            .cast(SessionMsg::Cancel(None))
            .map_err(|_| RuntimeError::SessionClosed(self.id))
    }

    /// A new session whose context is a copy of this one's: its window, what it has seen and its
    /// configuration (persona, template, stop tokens, window shape), with a seed of its own. For
    /// agents that branch a conversation: each branch then continues on its own, and neither
    /// sees the other's later turns. The copy is taken once the turns asked of this session
    /// before the fork are done (it waits for them); the fork is admitted against the session cap
    /// and the KV budget as any new session is.
    pub async fn fork(&self) -> Result<SessionHandle, RuntimeError> {
        let from = self.id;
        let (spawned, seed) = ask(&self.manager, "manager", |reply| ManagerMsg::Fork {
            from,
            reply,
        })
        .await??;
        // Closed again unless handed back: on an error, and when the caller goes away while the
        // copy waits (a client that disconnects), so no fork is left holding its bytes unseen.
        let (into, actor) = (spawned.id, spawned.actor.clone());
        let mut pending = Unclaimed(Some(SessionHandle {
            id: spawned.id,
            window: spawned.window,
            actor: spawned.actor,
            manager: self.manager.clone(),
        }));
        // No deadline: the copy waits for this session's earlier turns, however long they run.
        let copied = match self
            .actor
            .call(
                |reply| SessionMsg::Fork {
                    into,
                    actor: actor.clone(),
                    seed,
                    reply,
                },
                None,
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(RuntimeError::SessionClosed(from)),
        };
        let tokens_seen = copied?;
        // The scheduler holds the copy: the fork's turns may start.
        actor
            .cast(SessionMsg::Adopt { tokens_seen })
            .map_err(|_| RuntimeError::SessionClosed(into))?;
        Ok(pending.0.take().expect("held until here"))
    }

    /// The session's counters and window.
    pub async fn info(&self) -> Result<SessionInfo, RuntimeError> {
        ask(&self.actor, "session", SessionMsg::Info)
            .await
            .map_err(|_| RuntimeError::SessionClosed(self.id))
    }

    /// Closes the session and returns its bytes to the budget.
    pub async fn close(&self) -> Result<(), RuntimeError> {
        let id = self.id;
        ask(&self.manager, "manager", |reply| ManagerMsg::Close {
            id,
            reply,
        })
        .await?
    }
}

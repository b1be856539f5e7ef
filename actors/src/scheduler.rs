//! The SchedulerActor: gathers the work of all sessions into one verify step at a time, routes each
//! outcome to its session and the proposer, and supervises the verifier and proposer actors. The
//! decisions live in [`SchedulerState`](crate::policy::SchedulerState); this is the dispatcher.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort, SupervisionEvent,
};
use troupe_engine::drafter::Drafter;
use troupe_engine::{SeqId, Verifier, VerifyOutcome, WindowSpec};

use crate::config::SchedulerConfig;
use crate::error::RuntimeError;
use crate::faults::{ActorKind, FaultPlan};
use crate::health::HealthCell;
use crate::phase::Phase;
use crate::policy::{Cancel, Completion, Dispatch, SchedulerState, SchedulerStats};
use crate::proposer::{ProposerActor, ProposerArgs, ProposerMsg};
use crate::protocol::{DraftOrder, DraftReply, Drafts, Emission, SeqRequest, StepDone, TurnUpdate};
use crate::runtime::{DrafterFactory, VerifierFactory};
use crate::verifier_actor::{VerifierArgs, VerifierLink};

/// Messages of the scheduler. Peers never hold this type: each holds a `DerivedActorRef` of
/// the one message it may send ([`SeqRequest`], [`StepDone`], [`Drafts`]); the rest are the
/// scheduler's own timers and the runtime's queries.
pub enum SchedulerMsg {
    /// A session's request about its sequence.
    Seq(SeqRequest),
    /// A step finished on the verifier thread.
    StepDone(StepDone),
    /// Drafts from the proposer.
    Drafts(Drafts),
    /// Re-check whether to dispatch (turns arrived).
    Tick,
    /// A draft wait ran out: dispatch if the drafts have not come.
    WaitOver,
    /// A step's answer is overdue.
    StepTimeout(u64),
    /// Counters.
    Stats(RpcReplyPort<SchedulerStats>),
}

/// Lets `DerivedActorRef<$peer>` reach the scheduler: the conversion both ways that ractor
/// needs, so a peer can send its one message and get it back if the scheduler is gone.
macro_rules! peer_message {
    ($peer:ident) => {
        impl From<$peer> for SchedulerMsg {
            fn from(m: $peer) -> Self {
                SchedulerMsg::$peer(m)
            }
        }

        impl TryFrom<SchedulerMsg> for $peer {
            type Error = ();

            fn try_from(m: SchedulerMsg) -> Result<Self, ()> {
                match m {
                    SchedulerMsg::$peer(m) => Ok(m),
                    _ => Err(()),
                }
            }
        }
    };
}

/// What the session side sends, under the name the scheduler's variant has.
type Seq = SeqRequest;
peer_message!(Seq);
peer_message!(StepDone);
peer_message!(Drafts);

/// Start-up arguments of the scheduler.
pub struct SchedulerArgs {
    /// Policy configuration.
    pub config: SchedulerConfig,
    /// The first verifier.
    pub verifier: Box<dyn Verifier>,
    /// Builds replacements.
    pub verifier_factory: VerifierFactory,
    /// The first drafter, if speculating.
    pub drafter: Option<Box<dyn Drafter>>,
    /// Builds replacements.
    pub drafter_factory: Option<DrafterFactory>,
    /// Injected faults.
    pub faults: FaultPlan,
    /// How long a step may take before the verifier is presumed lost.
    pub step_timeout: Duration,
    /// Restarts allowed per component before giving up.
    pub max_restarts: u64,
    /// Where a verifier lost for good is reported.
    pub health: HealthCell,
}

struct SeqInfo {
    spec: WindowSpec,
    seed: u64,
    session: DerivedActorRef<TurnUpdate>,
    /// Evictions a fork's count starts from: its source's, which its own window never held.
    evicted_before: u64,
    /// Tokens evicted from its window as counted so far (a verifier restart replays a window
    /// from nothing, so the count never goes down).
    evicted: u64,
}

/// Opens `seq` at the proposer and tells it the history the scheduler holds for it (none for a
/// new session; a fork's or, after the proposer's restart, every sequence's).
fn open_in_proposer(
    p: &ActorRef<ProposerMsg>,
    policy: &SchedulerState,
    seq: SeqId,
    spec: WindowSpec,
    seed: u64,
) {
    let _ = p.cast(ProposerMsg::Open { seq, spec, seed });
    let history = policy.seq(seq).map(|e| e.history.clone());
    if let Some(tokens) = history.filter(|h| !h.is_empty()) {
        let _ = p.cast(ProposerMsg::Observe { seq, tokens });
    }
}

/// The scheduler's state: the policy plus the actor wiring.
pub struct SchedulerActorState {
    policy: SchedulerState,
    verifier: Option<VerifierLink>,
    proposer: Option<ActorRef<ProposerMsg>>,
    verifier_factory: VerifierFactory,
    drafter_factory: Option<DrafterFactory>,
    faults: FaultPlan,
    seqs: FxHashMap<SeqId, SeqInfo>,
    step_timeout: Duration,
    max_restarts: u64,
    awaiting_since: Option<Instant>,
    /// The clocks of the waits that keep sessions in phase.
    phase: Phase,
    tick_pending: bool,
    /// When the `WaitOver` timer set last fires; kept apart from `tick_pending`, so turns that
    /// arrive during a long draft wait are still dispatched at once when the wait is moot.
    wait_timer: Option<Instant>,
    /// When the latest fresh and pipelined order of each sequence went out.
    orders_sent: HashMap<(SeqId, bool), Instant>,
    submitted_at: FxHashMap<SeqId, Instant>,
    /// Tokens evicted from the windows of closed sequences.
    evicted_closed: u64,
    /// The verifier's vocabulary: a draft naming a token past it is cut there, not sent.
    vocab_size: usize,
    /// Verifier layers whose states the drafter reads (set on every verifier built).
    hidden_layers: Vec<usize>,
    /// Where a verifier lost for good is reported.
    health: HealthCell,
    /// The timer of the step in flight: aborted when the step comes back, so at most one sleeps.
    step_deadline: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SchedulerMsg>>>>,
}

/// The scheduler actor.
pub struct SchedulerActor;

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerActorState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let vocab_size = args.verifier.vocab_size();
        // A drafter conditioned on the verifier's states says which layers it reads; each step
        // then reports them for the positions it commits.
        let hidden_layers = match &args.drafter {
            Some(d) if args.config.max_draft_len > 0 => d.hidden_layers(),
            _ => Vec::new(),
        };
        let draft_cost = args
            .drafter
            .as_ref()
            .map(|d| d.draft_cost())
            .unwrap_or_default();
        let mut model = args.verifier;
        model.set_hidden_layers(hidden_layers.clone());
        let verifier = VerifierLink::spawn(
            VerifierArgs {
                model,
                scheduler: myself.get_derived(),
                faults: args.faults.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        let proposer = match args.drafter {
            Some(d) if args.config.max_draft_len > 0 => Some(
                Actor::spawn_linked(
                    None,
                    ProposerActor,
                    ProposerArgs {
                        drafter: d,
                        scheduler: myself.get_derived(),
                        faults: args.faults.clone(),
                    },
                    myself.get_cell(),
                )
                .await?
                .0,
            ),
            _ => None,
        };
        let mut config = args.config;
        if proposer.is_none() {
            // Nothing drafts: no sequence is ever planned a draft or waits for one.
            config.max_draft_len = 0;
        }
        let mut policy = SchedulerState::new(config);
        policy.set_draft_cost(draft_cost);
        Ok(SchedulerActorState {
            policy,
            verifier: Some(verifier),
            proposer,
            verifier_factory: args.verifier_factory,
            drafter_factory: args.drafter_factory,
            faults: args.faults,
            seqs: FxHashMap::default(),
            step_timeout: args.step_timeout,
            max_restarts: args.max_restarts,
            awaiting_since: None,
            phase: Phase::default(),
            tick_pending: false,
            wait_timer: None,
            orders_sent: HashMap::new(),
            submitted_at: FxHashMap::default(),
            evicted_closed: 0,
            vocab_size,
            hidden_layers,
            health: args.health,
            step_deadline: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Seq(SeqRequest::Open {
                seq,
                spec,
                seed,
                session,
            }) => {
                st.policy.open(seq);
                if let Some(v) = &st.verifier {
                    v.open(seq, spec, seed);
                }
                st.register(seq, None, spec, seed, session);
            }
            SchedulerMsg::Seq(SeqRequest::Fork {
                from,
                seq,
                seed,
                session,
                reply,
            }) => {
                let forked = st
                    .seqs
                    .get(&from)
                    .map(|info| info.spec)
                    .ok_or(RuntimeError::UnknownSession(from))
                    .and_then(|spec| st.policy.fork(from, seq).map(|()| spec));
                match forked {
                    Ok(spec) => {
                        if let Some(v) = &st.verifier {
                            v.fork(from, seq, seed);
                        }
                        st.register(seq, Some(from), spec, seed, session);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SchedulerMsg::Seq(SeqRequest::Reseed { seq, seed }) => {
                if let Some(info) = st.seqs.get_mut(&seq) {
                    // A verifier rebuilt later opens the sequence with its latest seed.
                    info.seed = seed;
                    if let Some(v) = &st.verifier {
                        v.reseed(seq, seed);
                    }
                    if let Some(p) = &st.proposer {
                        let _ = p.cast(ProposerMsg::Reseed { seq, seed });
                    }
                }
            }
            SchedulerMsg::Seq(SeqRequest::Submit { seq, tokens, turn }) => {
                let verdict = st.faults.check(ActorKind::Scheduler, "submit");
                if verdict.drop {
                    return Ok(());
                }
                if verdict.panic {
                    return Err(format!("injected scheduler failure on a submit of {seq}").into());
                }
                let since_step = st.phase.arrival(Instant::now());
                st.policy.observe_turnaround(seq, since_step);
                match st.policy.submit(seq, &tokens, turn) {
                    Ok(()) => {
                        st.submitted_at.insert(seq, Instant::now());
                        if let Some(p) = &st.proposer {
                            let _ = p.cast(ProposerMsg::Observe { seq, tokens });
                        }
                    }
                    Err(e) => {
                        if let Some(info) = st.seqs.get(&seq) {
                            let _ = info.session.send_message(TurnUpdate::Failed(e));
                        }
                    }
                }
                // Dispatch after the messages already queued, so a burst of turns shares a step.
                if !st.tick_pending {
                    st.tick_pending = true;
                    let _ = myself.cast(SchedulerMsg::Tick);
                }
            }
            SchedulerMsg::Seq(SeqRequest::Cancel { seq }) => {
                match st.policy.cancel(seq) {
                    // Let go now; the session may start its next turn.
                    Cancel::Now => {
                        st.submitted_at.remove(&seq);
                        if let Some(info) = st.seqs.get(&seq) {
                            let _ = info.session.send_message(TurnUpdate::Cancelled);
                        }
                    }
                    // Its step's emission, marked finished, says so when the step returns.
                    Cancel::AfterStep | Cancel::NoTurn => {}
                }
                st.pump(&myself);
            }
            SchedulerMsg::Seq(SeqRequest::Close { seq }) => {
                st.evicted_closed += st.count_evictions(seq);
                st.seqs.remove(&seq);
                st.policy.close(seq);
                st.submitted_at.remove(&seq);
                st.orders_sent.retain(|k, _| k.0 != seq);
                if let Some(v) = &st.verifier {
                    v.close(seq);
                }
                if let Some(p) = &st.proposer {
                    let _ = p.cast(ProposerMsg::Close { seq });
                }
                st.pump(&myself);
            }
            SchedulerMsg::StepDone(done) => {
                let verdict = st.faults.check(ActorKind::Scheduler, "step_done");
                if !verdict.delay.is_zero() {
                    tokio::time::sleep(verdict.delay).await;
                }
                st.step_done(&myself, done);
            }
            SchedulerMsg::Drafts(Drafts(mut replies)) => {
                for r in replies.iter_mut() {
                    keep_verifiable(r, st.vocab_size);
                }
                for r in &replies {
                    if let Some(t) = st.orders_sent.remove(&(r.order.seq, r.order.pipelined)) {
                        st.policy
                            .observe_draft(t.elapsed().as_secs_f64(), r.order.k);
                    }
                }
                st.policy.on_drafts(replies);
                st.pump(&myself);
            }
            SchedulerMsg::Tick => {
                st.tick_pending = false;
                st.pump(&myself);
            }
            SchedulerMsg::WaitOver => {
                if st.wait_timer.is_some_and(|t| t <= Instant::now()) {
                    st.wait_timer = None;
                }
                st.pump(&myself);
            }
            SchedulerMsg::StepTimeout(id) => {
                if st.policy.in_flight_id() == Some(id) {
                    tracing::error!(step = id, "verify step overdue; restarting the verifier");
                    if let Some(v) = st.verifier.take() {
                        v.actor.kill();
                    }
                    if st.health.stopping() {
                        st.fail_all(RuntimeError::ShuttingDown);
                    } else {
                        st.restart_verifier(&myself).await?;
                    }
                }
            }
            SchedulerMsg::Stats(reply) => {
                let mut stats = st.policy.stats.clone();
                let open: Vec<SeqId> = st.seqs.keys().copied().collect();
                stats.window_evictions = st.evicted_closed
                    + open
                        .into_iter()
                        .map(|seq| st.count_evictions(seq))
                        .sum::<u64>();
                let _ = reply.send(stats);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if st.health.stopping() {
            // Stopped by `shutdown` (or lost during one): nothing is restarted, and a turn that
            // still waited on the verifier ends now rather than holding up the drain.
            if st.verifier.as_ref().is_some_and(|v| v.actor.get_id() == id) {
                st.verifier = None;
                st.fail_all(RuntimeError::ShuttingDown);
            } else if st.proposer.as_ref().is_some_and(|p| p.get_id() == id) {
                st.proposer = None;
            }
            return Ok(());
        }
        if st.verifier.as_ref().is_some_and(|v| v.actor.get_id() == id) {
            tracing::error!(reason = %why, "verifier failed; restarting it and replaying in-flight work");
            st.verifier = None;
            st.restart_verifier(&myself).await?;
        } else if st.proposer.as_ref().is_some_and(|p| p.get_id() == id) {
            tracing::error!(reason = %why, "proposer failed; restarting it");
            st.proposer = None;
            st.restart_proposer(&myself).await?;
        }
        Ok(())
    }
}

impl SchedulerActorState {
    /// Dispatches the next step if the verifier is free, there is work, and no draft is worth
    /// waiting for any longer.
    fn pump(&mut self, myself: &ActorRef<SchedulerMsg>) {
        if self.verifier.is_none() {
            // Restarts happen inside one message, so no verifier here means none is coming back.
            self.fail_all(RuntimeError::NoVerifier);
            return;
        }
        if self.policy.busy() || !self.policy.has_work() {
            return;
        }
        let now = Instant::now();
        if self.proposer.is_some() && self.policy.awaiting_drafts() {
            let since = *self.awaiting_since.get_or_insert(now);
            let due = since + Duration::from_secs_f64(self.policy.draft_wait());
            if now < due {
                self.wake_at(myself, due, now);
                return;
            }
        }
        self.awaiting_since = None;
        if let Some(due) = self.phase.hold(&mut self.policy, now) {
            self.wake_at(myself, due, now);
            return;
        }
        let span = tracing::info_span!("schedule", active = self.policy.active());
        let dispatch = {
            let _enter = span.enter();
            self.policy.dispatch()
        };
        let Some(Dispatch { step, orders }) = dispatch else {
            return;
        };
        for w in &step.works {
            if let Some(t) = self.submitted_at.remove(&w.seq) {
                let wait = t.elapsed().as_secs_f64();
                self.policy.stats.queue_wait.observe(wait);
                tracing::info!(
                    target: "troupe::probe",
                    stage = "queue_wait",
                    seq = w.seq,
                    ms = wait * 1e3
                );
            }
        }
        tracing::debug!(
            step = step.id,
            seqs = step.works.len(),
            tokens = step.tokens,
            "dispatch"
        );
        let id = step.id;
        if let Some(v) = &self.verifier {
            v.step(id, step.works);
        }
        let deadline = myself.send_after(self.step_timeout, move || SchedulerMsg::StepTimeout(id));
        if let Some(stale) = self.step_deadline.replace(deadline) {
            stale.abort();
        }
        self.send_orders(orders);
    }

    /// Pumps again at `due` (a wait runs out), unless a timer set earlier fires before it.
    fn wake_at(&mut self, myself: &ActorRef<SchedulerMsg>, due: Instant, now: Instant) {
        if self.wait_timer.is_none_or(|t| t > due || t < now) {
            self.wait_timer = Some(due);
            myself.send_after(due - now, || SchedulerMsg::WaitOver);
        }
    }

    fn send_orders(&mut self, orders: Vec<DraftOrder>) {
        if orders.is_empty() {
            return;
        }
        let now = Instant::now();
        for o in &orders {
            self.orders_sent.insert((o.seq, o.pipelined), now);
        }
        if let Some(p) = &self.proposer {
            let _ = p.cast(ProposerMsg::Draft(orders));
        }
    }

    /// Hands the proposer the verifier's states of the positions each outcome committed, which
    /// start where the sequence's window ended before the step.
    fn forward_hidden(&mut self, outcomes: &mut [VerifyOutcome]) {
        let Some(p) = &self.proposer else {
            return;
        };
        let states: Vec<_> = outcomes
            .iter_mut()
            .filter(|o| !o.hidden.is_empty())
            .filter_map(|o| {
                let from = self.policy.seq(o.seq)?.committed;
                Some((o.seq, from, std::mem::take(&mut o.hidden)))
            })
            .collect();
        if !states.is_empty() {
            let _ = p.cast(ProposerMsg::Hidden(states));
        }
    }

    fn step_done(&mut self, myself: &ActorRef<SchedulerMsg>, done: StepDone) {
        let StepDone {
            id,
            result,
            elapsed,
        } = done;
        if self.policy.in_flight_id() != Some(id) {
            return; // a step from before a restart
        }
        if let Some(deadline) = self.step_deadline.take() {
            deadline.abort();
        }
        let mut outcomes = match result {
            Ok(o) => o,
            Err(e) => {
                // The engine refused the step: fail the turns in it, and rebuild their windows.
                tracing::error!(step = id, error = %e, "verify step failed");
                for seq in self.policy.in_flight_seqs() {
                    self.policy.abort_turn(seq);
                    if let Some(info) = self.seqs.get(&seq) {
                        let failed = TurnUpdate::Failed(RuntimeError::Engine(e.clone()));
                        let _ = info.session.send_message(failed);
                    }
                }
                // Stopping it makes the supervisor event restart it and rebuild every window.
                if let Some(v) = &self.verifier {
                    v.actor.stop(Some("step failed".into()));
                }
                return;
            }
        };
        let span = tracing::info_span!("accept", step = id, seqs = outcomes.len());
        let _enter = span.enter();
        self.forward_hidden(&mut outcomes);
        let Completion { emissions, orders } = self.policy.complete(id, &outcomes, elapsed);
        self.phase.step_ended(Instant::now());
        if let Some(p) = &self.proposer {
            for e in emissions.iter().filter(|e| !e.tokens.is_empty()) {
                let _ = p.cast(ProposerMsg::Observe {
                    seq: e.seq,
                    tokens: e.tokens.clone(),
                });
            }
        }
        drop(_enter);
        self.send_orders(orders);
        if self.verifier.is_some() {
            // The next step goes out before the sessions hear of this one, so the verifier
            // computes while they stream: telling a thousand sessions takes about a millisecond.
            self.pump(myself);
            self.deliver(emissions);
        } else {
            // Without a verifier `pump` fails every turn: what this step emitted comes first.
            self.deliver(emissions);
            self.pump(myself);
        }
    }

    /// Tells each session what the step emitted for it.
    fn deliver(&self, emissions: Vec<Emission>) {
        for e in emissions {
            if let Some(info) = self.seqs.get(&e.seq) {
                let _ = info.session.send_message(TurnUpdate::Emitted(e));
            }
        }
    }

    /// Registers an opened (or forked) sequence: with the proposer, told its history, and in
    /// `seqs`, its evictions counted from those its history already holds (a fork's source's).
    fn register(
        &mut self,
        seq: SeqId,
        forked_from: Option<SeqId>,
        spec: WindowSpec,
        seed: u64,
        session: DerivedActorRef<TurnUpdate>,
    ) {
        if let Some(p) = &self.proposer {
            match forked_from {
                // A drafter with state of its own (a block drafter's context) copies it.
                Some(from) => {
                    let history = self
                        .policy
                        .seq(seq)
                        .map(|e| e.history.clone())
                        .unwrap_or_default();
                    let _ = p.cast(ProposerMsg::Fork {
                        from,
                        seq,
                        spec,
                        seed,
                        history,
                    });
                }
                None => open_in_proposer(p, &self.policy, seq, spec, seed),
            }
        }
        let evicted_before = self.evicted(seq, spec);
        let info = SeqInfo {
            spec,
            seed,
            session,
            evicted_before,
            evicted: 0,
        };
        self.seqs.insert(seq, info);
    }

    /// Tokens evicted from the window of `seq` since it opened (a fork's since it was made), its
    /// count brought up to date.
    fn count_evictions(&mut self, seq: SeqId) -> u64 {
        let Some(spec) = self.seqs.get(&seq).map(|i| i.spec) else {
            return 0;
        };
        let now = self.evicted(seq, spec);
        let info = self.seqs.get_mut(&seq).expect("looked up above");
        info.evicted = info.evicted.max(now.saturating_sub(info.evicted_before));
        info.evicted
    }

    /// Tokens evicted from the window of `seq` (of shape `spec`) so far: those committed past
    /// its capacity.
    fn evicted(&self, seq: SeqId, spec: WindowSpec) -> u64 {
        self.policy
            .seq(seq)
            .map_or(0, |e| e.committed.saturating_sub(spec.capacity()) as u64)
    }

    async fn restart_verifier(
        &mut self,
        myself: &ActorRef<SchedulerMsg>,
    ) -> Result<(), ActorProcessingErr> {
        if self.policy.stats.verifier_restarts >= self.max_restarts {
            self.policy.verifier_restarted();
            let why = RuntimeError::TooManyRestarts {
                restarts: self.max_restarts,
            };
            self.health.fail(why.to_string());
            self.fail_all(why);
            return Ok(());
        }
        self.policy.verifier_restarted();
        let factory = self.verifier_factory.clone();
        let model = match tokio::task::spawn_blocking(move || factory()).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut model = match model {
            Ok(m) => m,
            Err(e) => {
                let why = RuntimeError::RebuildFailed(e);
                self.health.fail(why.to_string());
                self.fail_all(why);
                return Ok(());
            }
        };
        model.set_hidden_layers(self.hidden_layers.clone());
        let v = VerifierLink::spawn(
            VerifierArgs {
                model,
                scheduler: myself.get_derived(),
                faults: self.faults.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        for (&seq, info) in &self.seqs {
            v.open(seq, info.spec, info.seed);
        }
        self.verifier = Some(v);
        self.pump(myself);
        Ok(())
    }

    async fn restart_proposer(
        &mut self,
        myself: &ActorRef<SchedulerMsg>,
    ) -> Result<(), ActorProcessingErr> {
        self.policy.proposer_restarted();
        self.orders_sent.clear();
        let Some(factory) = self.drafter_factory.clone() else {
            return Ok(());
        };
        if self.policy.stats.proposer_restarts > self.max_restarts {
            tracing::error!("the proposer failed too often; sessions decode without drafts");
            self.pump(myself);
            return Ok(());
        }
        let drafter = match tokio::task::spawn_blocking(move || factory()).await {
            Ok(Ok(d)) => d,
            _ => {
                tracing::error!("the drafter could not be rebuilt; sessions decode without drafts");
                self.pump(myself);
                return Ok(());
            }
        };
        let (p, _) = Actor::spawn_linked(
            None,
            ProposerActor,
            ProposerArgs {
                drafter,
                scheduler: myself.get_derived(),
                faults: self.faults.clone(),
            },
            myself.get_cell(),
        )
        .await?;
        for (&seq, info) in &self.seqs {
            open_in_proposer(&p, &self.policy, seq, info.spec, info.seed);
        }
        self.proposer = Some(p);
        let orders = self.policy.orders_after_proposer_restart();
        self.send_orders(orders);
        self.pump(myself);
        Ok(())
    }

    fn fail_all(&mut self, why: RuntimeError) {
        if self.policy.active() > 0 {
            tracing::error!(reason = %why, "failing every active turn");
        }
        for seq in self.policy.turn_ids() {
            if let Some(info) = self.seqs.get(&seq) {
                let _ = info.session.send_message(TurnUpdate::Failed(why.clone()));
            }
            self.policy.abort_turn(seq);
        }
    }
}

/// Cuts a draft at its first token past the verifier's vocabulary, and drops its distributions
/// when any row is not over that vocabulary: what is left can be verified, and one drafter's
/// bad output never fails a step that carries other sessions' work.
fn keep_verifiable(r: &mut DraftReply, vocab: usize) {
    let d = &mut r.draft;
    if let Some(bad) = d.tokens.iter().position(|&t| t as usize >= vocab) {
        tracing::warn!(
            seq = r.order.seq,
            token = d.tokens[bad],
            vocab,
            "a draft names a token past the vocabulary; cut there"
        );
        d.tokens.truncate(bad);
    }
    if let Some(probs) = &mut d.probs {
        if probs.len() < d.tokens.len() || probs.iter().any(|p| p.len() != vocab) {
            tracing::warn!(
                seq = r.order.seq,
                vocab,
                "draft distributions of the wrong shape; draft dropped"
            );
            d.tokens.clear();
            d.probs = None;
        } else {
            probs.truncate(d.tokens.len());
        }
    }
}

//! The SessionActor: one per agent session or persona. It keeps the conversation, tokenizes each
//! turn, hands it to the scheduler, and streams the tokens the scheduler routes back. Turns of one
//! session run one after another, in the order they were asked for.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};

use troupe_engine::{SamplingParams, Tokenizer, WindowSpec};

use crate::config::{GenerateParams, Prompt, SessionConfig};
use crate::detokenize::TextStream;
use crate::error::RuntimeError;
use crate::events::{quantile, SessionInfo, TurnId, TurnSink, TurnStats};
use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::{Emission, SeqRequest, Turn, TurnUpdate};
use crate::SessionId;

/// Messages of a session actor.
pub enum SessionMsg {
    /// Start (or queue) a turn.
    Generate {
        /// The turn's name, for a later cancellation.
        turn: TurnId,
        /// Input.
        prompt: Prompt,
        /// Parameters.
        params: GenerateParams,
        /// Where the turn's events go.
        sink: TurnSink,
    },
    /// The scheduler's word on the current turn.
    Update(TurnUpdate),
    /// Cancel one turn (its stream was dropped), or every turn of the session (`None`).
    Cancel(Option<TurnId>),
    /// The scheduler is gone: fail every turn, now and later, with this error.
    Fail(RuntimeError),
    /// Copy the session, as it stands once the turns asked for before are done, into the new
    /// session `into` (spawned for it, not yet open at the scheduler).
    Fork {
        /// The new session.
        into: SessionId,
        /// Its actor.
        actor: ActorRef<SessionMsg>,
        /// Its sampling seed.
        seed: u64,
        /// The tokens the source had seen, once the scheduler holds the copy; or why not.
        reply: RpcReplyPort<Result<u64, RuntimeError>>,
    },
    /// This session is a fork of one that had seen `tokens_seen` tokens, and the scheduler holds
    /// its copy: its turns may start.
    Adopt {
        /// Tokens the source had seen.
        tokens_seen: u64,
    },
    /// Report.
    Info(RpcReplyPort<SessionInfo>),
    /// Answer once no turn runs or waits (for `shutdown`).
    Drain(RpcReplyPort<()>),
}

impl From<TurnUpdate> for SessionMsg {
    fn from(u: TurnUpdate) -> Self {
        SessionMsg::Update(u)
    }
}

impl TryFrom<SessionMsg> for TurnUpdate {
    type Error = ();

    fn try_from(m: SessionMsg) -> Result<Self, ()> {
        match m {
            SessionMsg::Update(u) => Ok(u),
            _ => Err(()),
        }
    }
}

/// Start-up arguments of a session actor.
pub struct SessionArgs {
    /// Id (also the sequence id).
    pub id: SessionId,
    /// Configuration.
    pub config: SessionConfig,
    /// Its window.
    pub window: WindowSpec,
    /// Bytes of its window.
    pub kv_bytes: u64,
    /// Longest prompt accepted.
    pub max_prompt_tokens: usize,
    /// Vocabulary size of the verifier.
    pub vocab_size: usize,
    /// Tokenizer for text prompts.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The scheduler, which a session can only ask about its own sequence.
    pub scheduler: DerivedActorRef<SeqRequest>,
    /// Injected faults.
    pub faults: FaultPlan,
    /// Opened by the session it forks (which copies its sequence at the scheduler), not by
    /// itself.
    pub forked: bool,
}

/// What a session was asked and has not yet started: a turn, or a fork.
enum Pending {
    Turn(Queued),
    Fork {
        into: SessionId,
        actor: ActorRef<SessionMsg>,
        seed: u64,
        reply: RpcReplyPort<Result<u64, RuntimeError>>,
    },
}

/// A turn asked for and not yet started.
struct Queued {
    turn: TurnId,
    prompt: Prompt,
    params: GenerateParams,
    sink: TurnSink,
}

/// The turn the scheduler is running.
struct Active {
    turn: TurnId,
    sink: TurnSink,
    /// Cancelled, and waiting for the scheduler's word that it let go of the turn.
    cancelled: bool,
    started: Instant,
    first_token: Option<f64>,
    ids: Vec<u32>,
    text: Option<TextStream>,
    drafted: usize,
    accepted: usize,
    steps: usize,
    model_ms: f64,
}

/// The session's state.
pub struct SessionState {
    args: SessionArgs,
    queue: VecDeque<Pending>,
    active: Option<Active>,
    /// Set when the scheduler is gone: every turn fails with it.
    failed: Option<RuntimeError>,
    /// Who waits for the session to be idle.
    drains: Vec<RpcReplyPort<()>>,
    turns: u64,
    tokens_seen: u64,
    /// False for a fork until its copy is made: its turns wait until then.
    adopted: bool,
    drafted: u64,
    accepted: u64,
    latencies: VecDeque<f64>,
}

/// The session actor.
pub struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if !args.forked {
            args.scheduler.send_message(SeqRequest::Open {
                seq: args.id,
                spec: args.window,
                seed: args.config.seed_for(args.id),
                session: myself.get_derived(),
            })?;
        }
        let adopted = !args.forked;
        Ok(SessionState {
            args,
            queue: VecDeque::new(),
            active: None,
            failed: None,
            drains: Vec::new(),
            turns: 0,
            adopted,
            tokens_seen: 0,
            drafted: 0,
            accepted: 0,
            latencies: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let name = match &msg {
            SessionMsg::Generate { .. } => "generate",
            SessionMsg::Update(TurnUpdate::Emitted(_)) => "tokens",
            SessionMsg::Update(TurnUpdate::Failed(_)) => "failed",
            SessionMsg::Update(TurnUpdate::Cancelled) => "cancelled",
            SessionMsg::Cancel(_) => "cancel",
            SessionMsg::Fail(_) => "fail",
            SessionMsg::Fork { .. } => "fork",
            SessionMsg::Adopt { .. } => "adopt",
            SessionMsg::Info(_) => "info",
            SessionMsg::Drain(_) => "drain",
        };
        let verdict = st.args.faults.check(ActorKind::Session, name);
        if verdict.drop {
            return Ok(());
        }
        if !verdict.delay.is_zero() {
            tokio::time::sleep(verdict.delay).await;
        }
        if verdict.panic {
            return Err(format!("injected session failure on {name}").into());
        }
        match msg {
            SessionMsg::Generate {
                turn,
                prompt,
                params,
                sink,
            } => {
                if let Some(why) = &st.failed {
                    sink.end(Err(why.clone()));
                    return Ok(());
                }
                st.queue.push_back(Pending::Turn(Queued {
                    turn,
                    prompt,
                    params,
                    sink,
                }));
                st.start_next();
            }
            SessionMsg::Fork {
                into,
                actor,
                seed,
                reply,
            } => {
                if let Some(why) = &st.failed {
                    let _ = reply.send(Err(why.clone()));
                    return Ok(());
                }
                st.queue.push_back(Pending::Fork {
                    into,
                    actor,
                    seed,
                    reply,
                });
                st.start_next();
            }
            SessionMsg::Adopt { tokens_seen } => {
                st.tokens_seen = tokens_seen;
                st.adopted = true;
                st.start_next();
            }
            SessionMsg::Update(TurnUpdate::Emitted(e)) => st.emitted(e),
            SessionMsg::Update(TurnUpdate::Failed(why)) => st.end_active(Err(why)),
            SessionMsg::Update(TurnUpdate::Cancelled) => {
                st.end_active(Err(RuntimeError::Cancelled(st.args.id)))
            }
            SessionMsg::Cancel(turn) => st.cancel(turn),
            SessionMsg::Fail(why) => {
                for q in st.queue.drain(..) {
                    match q {
                        Pending::Turn(q) => q.sink.end(Err(why.clone())),
                        Pending::Fork { reply, .. } => {
                            let _ = reply.send(Err(why.clone()));
                        }
                    }
                }
                if let Some(a) = st.active.take() {
                    a.sink.end(Err(why.clone()));
                }
                st.failed = Some(why);
                st.answer_drains();
            }
            SessionMsg::Info(reply) => {
                let _ = reply.send(st.info());
            }
            SessionMsg::Drain(reply) => {
                st.drains.push(reply);
                st.answer_drains();
            }
        }
        Ok(())
    }
}

impl SessionState {
    fn tokens_of(&self, prompt: Prompt) -> Result<Vec<u32>, RuntimeError> {
        let text = match prompt {
            Prompt::Tokens(t) => return Ok(t),
            Prompt::Text(t) => t,
        };
        let tok = self
            .args
            .tokenizer
            .as_ref()
            .ok_or(RuntimeError::NoTokenizer)?;
        let full = self.args.config.render(&text, self.tokens_seen == 0);
        Ok(tok.encode(&full)?)
    }

    /// Answers those waiting for the session to be idle, if it is.
    fn answer_drains(&mut self) {
        if self.active.is_none() && self.queue.is_empty() {
            for r in self.drains.drain(..) {
                let _ = r.send(());
            }
        }
    }

    /// Copies this session into `into`: the scheduler opens its sequence as a copy of this
    /// one's, in order with this session's turns (so it copies the context as it stands now), and
    /// `reply` gets the tokens this session has seen once the scheduler holds the copy.
    fn fork(
        &self,
        into: SessionId,
        actor: ActorRef<SessionMsg>,
        seed: u64,
        reply: RpcReplyPort<Result<u64, RuntimeError>>,
    ) {
        let (tx, rx) = ractor::concurrency::oneshot();
        let sent = self.args.scheduler.send_message(SeqRequest::Fork {
            from: self.args.id,
            seq: into,
            seed,
            session: actor.get_derived(),
            reply: tx.into(),
        });
        if sent.is_err() {
            let _ = reply.send(Err(RuntimeError::ActorUnavailable("scheduler".into())));
            return;
        }
        let seen = self.tokens_seen;
        // This session goes on with its next turns meanwhile: they reach the scheduler after
        // the fork.
        tokio::spawn(async move {
            let done = match rx.await {
                Ok(r) => r.map(|()| seen),
                Err(_) => Err(RuntimeError::ActorUnavailable("scheduler".into())),
            };
            let _ = reply.send(done);
        });
    }

    fn start_next(&mut self) {
        // A fork's turns wait for its copy.
        while self.active.is_none() && self.adopted {
            let (turn, prompt, params, sink) = match self.queue.pop_front() {
                None => {
                    self.answer_drains();
                    return;
                }
                Some(Pending::Fork {
                    into,
                    actor,
                    seed,
                    reply,
                }) => {
                    self.fork(into, actor, seed, reply);
                    continue;
                }
                Some(Pending::Turn(Queued {
                    turn,
                    prompt,
                    params,
                    sink,
                })) => (turn, prompt, params, sink),
            };
            let started = Instant::now();
            let checked = self.tokens_of(prompt).and_then(|tokens| {
                let sampling = SamplingParams {
                    temperature: params.temperature,
                    top_p: params.top_p,
                };
                troupe_engine::engine::check_params(&sampling)?;
                if tokens.len() > self.args.max_prompt_tokens {
                    return Err(RuntimeError::PromptTooLong {
                        tokens: tokens.len(),
                        limit: self.args.max_prompt_tokens,
                    });
                }
                let vocab = self.args.vocab_size;
                if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(
                        troupe_engine::EngineError::TokenOutOfRange { token: t, vocab }.into(),
                    );
                }
                if tokens.is_empty() && self.tokens_seen == 0 {
                    return Err(RuntimeError::EmptyPrompt);
                }
                Ok((tokens, sampling))
            });
            let (tokens, sampling) = match checked {
                Ok(x) => x,
                Err(e) => {
                    sink.end(Err(e));
                    continue;
                }
            };
            self.tokens_seen += tokens.len() as u64;
            let mut stop = self.args.config.stop_tokens.clone();
            for &t in &params.stop_tokens {
                if !stop.contains(&t) {
                    stop.push(t);
                }
            }
            if let Some(seed) = params.seed {
                let _ = self.args.scheduler.send_message(SeqRequest::Reseed {
                    seq: self.args.id,
                    seed,
                });
            }
            // A turn of no tokens only adds its prompt to the context: the scheduler appends it to
            // the history without starting a turn, to be fed with the next one.
            let reply = params.max_new_tokens > 0;
            let sent = (reply || !tokens.is_empty()).then(|| {
                self.args.scheduler.send_message(SeqRequest::Submit {
                    seq: self.args.id,
                    tokens,
                    turn: Turn {
                        remaining: params.max_new_tokens,
                        params: sampling,
                        stop,
                        stop_after_content: params.stop_after_content,
                    },
                })
            });
            if sent.is_some_and(|s| s.is_err()) {
                sink.end(Err(RuntimeError::ActorUnavailable("scheduler".into())));
                continue;
            }
            if !reply {
                sink.end(Ok(TurnStats::default()));
                continue;
            }
            self.active = Some(Active {
                turn,
                sink,
                cancelled: false,
                started,
                first_token: None,
                ids: Vec::new(),
                text: self.args.tokenizer.clone().map(TextStream::new),
                drafted: 0,
                accepted: 0,
                steps: 0,
                model_ms: 0.0,
            });
        }
    }

    fn emitted(&mut self, e: Emission) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let span = tracing::info_span!("stream", seq = e.seq, tokens = e.tokens.len());
        let _enter = span.enter();
        a.steps += 1;
        a.model_ms += e.step_time.as_secs_f64() * 1e3;
        a.drafted += e.drafted;
        a.accepted += e.accepted;
        self.drafted += e.drafted as u64;
        self.accepted += e.accepted as u64;
        if !e.tokens.is_empty() {
            self.tokens_seen += e.tokens.len() as u64;
            if a.first_token.is_none() {
                a.first_token = Some(a.started.elapsed().as_secs_f64() * 1e3);
            }
            a.ids.extend_from_slice(&e.tokens);
            if !a.cancelled {
                let text = a.text.as_mut().map(|t| t.push(&e.tokens));
                a.sink.tokens(e.tokens, text);
            }
        }
        if e.finished {
            let a = self.active.take().expect("checked above");
            if a.cancelled {
                a.sink.end(Err(RuntimeError::Cancelled(self.args.id)));
                self.start_next();
                return;
            }
            let latency = a.started.elapsed().as_secs_f64() * 1e3;
            if self.latencies.len() == 4096 {
                self.latencies.pop_front();
            }
            self.latencies.push_back(latency);
            self.turns += 1;
            let text = self
                .args
                .tokenizer
                .as_ref()
                .and_then(|t| t.decode(&a.ids).ok());
            a.sink.end(Ok(TurnStats {
                tokens: a.ids.len(),
                drafted: a.drafted,
                accepted: a.accepted,
                steps: a.steps,
                latency_ms: latency,
                first_token_ms: a.first_token.unwrap_or(latency),
                model_ms: a.model_ms,
                text,
            }));
            self.start_next();
        }
    }

    /// Ends the running turn with `last` (a failure, or the scheduler's word that a cancelled turn
    /// is let go) and starts the next.
    fn end_active(&mut self, last: Result<TurnStats, RuntimeError>) {
        if let Some(a) = self.active.take() {
            let last = match last {
                Err(_) if a.cancelled => Err(RuntimeError::Cancelled(self.args.id)),
                other => other,
            };
            a.sink.end(last);
        }
        self.start_next();
    }

    /// Cancels turn `turn` (every turn when `None`): a queued one ends now; the running one once
    /// the scheduler lets go of it, since the next may not start before.
    fn cancel(&mut self, turn: Option<TurnId>) {
        let id = self.args.id;
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for q in self.queue.drain(..) {
            match q {
                Pending::Turn(q) if turn.is_none_or(|t| t == q.turn) => {
                    q.sink.end(Err(RuntimeError::Cancelled(id)));
                }
                other => kept.push_back(other),
            }
        }
        self.queue = kept;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.cancelled || turn.is_some_and(|t| t != a.turn) {
            return;
        }
        a.cancelled = true;
        let asked = self
            .args
            .scheduler
            .send_message(SeqRequest::Cancel { seq: id });
        if asked.is_err() {
            self.end_active(Err(RuntimeError::Cancelled(id)));
        }
    }

    fn info(&self) -> SessionInfo {
        let lat: Vec<f64> = self.latencies.iter().copied().collect();
        let cap = self.args.window.capacity();
        // The last emitted token is not in the window until the next step feeds it.
        let held = (self.tokens_seen.saturating_sub(1) as usize).min(cap);
        let slot = self.args.kv_bytes / cap.max(1) as u64;
        SessionInfo {
            id: self.args.id,
            name: self
                .args
                .config
                .persona
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            tokens_seen: self.tokens_seen,
            window_fill: held,
            window_capacity: cap,
            kv_bytes_used: slot * held as u64,
            kv_bytes_bound: self.args.kv_bytes,
            drafted: self.drafted,
            accepted: self.accepted,
            turns: self.turns,
            latency_p50_ms: quantile(&lat, 0.5),
            latency_p90_ms: quantile(&lat, 0.9),
            latency_p99_ms: quantile(&lat, 0.99),
        }
    }
}

//! The SessionActor: one per agent session or persona. It keeps the conversation, tokenizes each
//! turn, hands it to the scheduler, and streams the tokens the scheduler routes back. Turns of one
//! session run one after another, in the order they were asked for.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use troupe_engine::{SamplingParams, Tokenizer, WindowSpec};

use crate::config::{GenerateParams, Prompt, SessionConfig};
use crate::error::RuntimeError;
use crate::events::{quantile, Event, SessionInfo, TurnStats};
use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::{Emission, SeqRequest, Turn, TurnUpdate};
use crate::SessionId;

/// Messages of a session actor.
pub enum SessionMsg {
    /// Start (or queue) a turn.
    Generate {
        /// Input.
        prompt: Prompt,
        /// Parameters.
        params: GenerateParams,
        /// Where the turn's events go.
        events: mpsc::UnboundedSender<Event>,
    },
    /// The scheduler's word on the current turn.
    Update(TurnUpdate),
    /// Report.
    Info(RpcReplyPort<SessionInfo>),
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
}

struct Active {
    events: mpsc::UnboundedSender<Event>,
    started: Instant,
    first_token: Option<f64>,
    ids: Vec<u32>,
    text_sent: usize,
    drafted: usize,
    accepted: usize,
    steps: usize,
    model_ms: f64,
}

/// The session's state.
pub struct SessionState {
    args: SessionArgs,
    queue: VecDeque<(Prompt, GenerateParams, mpsc::UnboundedSender<Event>)>,
    active: Option<Active>,
    turns: u64,
    tokens_seen: u64,
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
        args.scheduler.send_message(SeqRequest::Open {
            seq: args.id,
            spec: args.window,
            seed: args.config.seed_for(args.id),
            session: myself.get_derived(),
        })?;
        Ok(SessionState {
            args,
            queue: VecDeque::new(),
            active: None,
            turns: 0,
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
            SessionMsg::Info(_) => "info",
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
                prompt,
                params,
                events,
            } => {
                st.queue.push_back((prompt, params, events));
                st.start_next();
            }
            SessionMsg::Update(TurnUpdate::Emitted(e)) => st.emitted(e),
            SessionMsg::Update(TurnUpdate::Failed(why)) => {
                if let Some(a) = st.active.take() {
                    let _ = a.events.send(Event::Error(why));
                }
                st.start_next();
            }
            SessionMsg::Info(reply) => {
                let _ = reply.send(st.info());
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

    fn start_next(&mut self) {
        while self.active.is_none() {
            let Some((prompt, params, events)) = self.queue.pop_front() else {
                return;
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
                    let _ = events.send(Event::Error(e));
                    continue;
                }
            };
            if params.max_new_tokens == 0 {
                let _ = events.send(Event::Done(TurnStats::default()));
                continue;
            }
            self.tokens_seen += tokens.len() as u64;
            let mut stop = self.args.config.stop_tokens.clone();
            for &t in &params.stop_tokens {
                if !stop.contains(&t) {
                    stop.push(t);
                }
            }
            let sent = self.args.scheduler.send_message(SeqRequest::Submit {
                seq: self.args.id,
                tokens,
                turn: Turn {
                    remaining: params.max_new_tokens,
                    params: sampling,
                    stop,
                    stop_after_content: params.stop_after_content,
                },
            });
            if sent.is_err() {
                let _ = events.send(Event::Error(RuntimeError::ActorUnavailable(
                    "scheduler".into(),
                )));
                continue;
            }
            self.active = Some(Active {
                events,
                started,
                first_token: None,
                ids: Vec::new(),
                text_sent: 0,
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
            let text = self.args.tokenizer.as_ref().and_then(|t| {
                let full = t.decode(&a.ids).ok()?;
                if full.ends_with('\u{FFFD}') || full.len() < a.text_sent {
                    return Some(String::new());
                }
                let delta = full[a.text_sent..].to_string();
                a.text_sent = full.len();
                Some(delta)
            });
            let _ = a.events.send(Event::Tokens {
                ids: e.tokens,
                text,
            });
        }
        if e.finished {
            let a = self.active.take().expect("checked above");
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
            let _ = a.events.send(Event::Done(TurnStats {
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

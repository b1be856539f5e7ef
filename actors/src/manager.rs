//! The ManagerActor: spawns and closes session actors, keeps the registry, and enforces admission
//! (the session cap and the node's KV budget). It supervises the sessions, so a session that fails
//! gives its bytes back and takes nothing else down.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::{Deserialize, Serialize};
use troupe_engine::{EngineError, Tokenizer, WindowSpec};

use crate::config::SessionConfig;
use crate::error::{Limit, RuntimeError};
use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::SeqRequest;
use crate::session::{SessionActor, SessionArgs, SessionMsg};
use crate::SessionId;

/// The node's KV budget as it stands.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct BudgetInfo {
    /// Open sessions.
    pub sessions: usize,
    /// Session cap.
    pub max_sessions: usize,
    /// Bytes reserved by open sessions' windows.
    pub used_bytes: u64,
    /// The node's KV budget.
    pub budget_bytes: u64,
}

/// A session the manager has just started.
pub struct Spawned {
    /// Its id.
    pub id: SessionId,
    /// Its actor.
    pub actor: ActorRef<SessionMsg>,
    /// Its window.
    pub window: WindowSpec,
}

/// Messages of the manager.
pub enum ManagerMsg {
    /// Admit and spawn a session.
    Spawn {
        /// Its configuration.
        config: SessionConfig,
        /// The new session.
        reply: RpcReplyPort<Result<Spawned, RuntimeError>>,
    },
    /// Admit and spawn a session to become a copy of session `from` (with its configuration, a
    /// seed of its own, and its window's shape); the source then copies itself into it
    /// ([`SessionMsg::Fork`]).
    Fork {
        /// The session copied.
        from: SessionId,
        /// The new session, and its seed.
        reply: RpcReplyPort<Result<(Spawned, u64), RuntimeError>>,
    },
    /// Close a session and return its bytes.
    Close {
        /// Session.
        id: SessionId,
        /// Done.
        reply: RpcReplyPort<Result<(), RuntimeError>>,
    },
    /// Find a session.
    Lookup {
        /// Session.
        id: SessionId,
        /// Its actor and window.
        reply: RpcReplyPort<Result<Spawned, RuntimeError>>,
    },
    /// The budget.
    Budget(RpcReplyPort<BudgetInfo>),
    /// Refuse new sessions from now on.
    StopAdmitting(RpcReplyPort<()>),
    /// The open sessions' actors.
    Sessions(RpcReplyPort<Vec<ActorRef<SessionMsg>>>),
    /// The scheduler is gone: fail every session's turns with this error, and refuse new
    /// sessions with it.
    Fail(RuntimeError),
}

/// Start-up arguments of the manager.
pub struct ManagerArgs {
    /// The scheduler sessions talk to (the manager closes their sequences there).
    pub scheduler: DerivedActorRef<SeqRequest>,
    /// Session cap.
    pub max_sessions: usize,
    /// KV budget in bytes.
    pub budget_bytes: u64,
    /// Bytes of one window slot with the verifier's model.
    pub slot_bytes: u64,
    /// Window of sessions that do not choose one.
    pub default_window: WindowSpec,
    /// Longest prompt.
    pub max_prompt_tokens: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The most positions a window may hold (the verifier's model); `None`: any.
    pub max_positions: Option<usize>,
    /// Tokenizer for text prompts.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Injected faults.
    pub faults: FaultPlan,
}

/// One open session, as the manager keeps it.
struct Open {
    /// Its actor.
    actor: ActorRef<SessionMsg>,
    /// Bytes its window reserves in the budget.
    bytes: u64,
    /// Its window.
    window: WindowSpec,
    /// Its configuration, for its forks.
    config: SessionConfig,
}

/// The manager's state.
pub struct ManagerState {
    args: ManagerArgs,
    next_id: SessionId,
    /// Open sessions: each one's actor, the bytes its window reserves, and the window.
    sessions: HashMap<SessionId, Open>,
    /// Each open session's id by its actor's, for supervision events.
    by_actor: HashMap<ActorId, SessionId>,
    used: u64,
    admitting: bool,
    /// Why the runtime failed, once it has: new sessions are refused with it.
    failed: Option<RuntimeError>,
}

impl ManagerState {
    /// Checks admission for a session of `bytes`.
    pub fn admit(&self, bytes: u64) -> Result<(), RuntimeError> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if !self.admitting {
            return Err(RuntimeError::ShuttingDown);
        }
        let n = self.sessions.len() as u64;
        let cap = self.args.max_sessions as u64;
        if n + 1 > cap {
            return Err(RuntimeError::AdmissionRefused {
                limit: Limit::Sessions,
                requested: 1,
                available: cap.saturating_sub(n),
                over: n + 1 - cap,
            });
        }
        let available = self.args.budget_bytes.saturating_sub(self.used);
        if bytes > available {
            return Err(RuntimeError::AdmissionRefused {
                limit: Limit::KvBytes,
                requested: bytes,
                available,
                over: bytes - available,
            });
        }
        Ok(())
    }

    /// Admits and spawns a session of `config` (one that a fork opens at the scheduler when
    /// `forked`).
    async fn spawn(
        &mut self,
        myself: &ActorRef<ManagerMsg>,
        config: SessionConfig,
        forked: bool,
    ) -> Result<Spawned, RuntimeError> {
        let window = config.window.unwrap_or(self.args.default_window);
        config.validate()?;
        window_fits(window, self.args.max_positions)?;
        let bytes = window_bytes(window, self.args.slot_bytes)?;
        self.admit(bytes)?;
        let id = self.next_id;
        self.next_id += 1;
        let args = SessionArgs {
            id,
            config: config.clone(),
            window,
            kv_bytes: bytes,
            max_prompt_tokens: self.args.max_prompt_tokens,
            vocab_size: self.args.vocab_size,
            tokenizer: self.args.tokenizer.clone(),
            scheduler: self.args.scheduler.clone(),
            faults: self.args.faults.clone(),
            forked,
        };
        let (actor, _) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await?;
        let open = Open {
            actor: actor.clone(),
            bytes,
            window,
            config,
        };
        self.sessions.insert(id, open);
        self.by_actor.insert(actor.get_id(), id);
        self.used += bytes;
        Ok(Spawned { id, actor, window })
    }

    fn release(&mut self, id: SessionId) -> bool {
        match self.sessions.remove(&id) {
            Some(open) => {
                self.by_actor.remove(&open.actor.get_id());
                self.used -= open.bytes;
                let _ = self
                    .args
                    .scheduler
                    .send_message(SeqRequest::Close { seq: id });
                true
            }
            None => false,
        }
    }
}

/// The manager actor.
pub struct ManagerActor;

impl Actor for ManagerActor {
    type Msg = ManagerMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ManagerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ManagerState {
            args,
            next_id: 1,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            used: 0,
            admitting: true,
            failed: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let name = match &msg {
            ManagerMsg::Spawn { .. } => "spawn",
            ManagerMsg::Fork { .. } => "fork",
            ManagerMsg::Close { .. } => "close",
            ManagerMsg::Lookup { .. } => "lookup",
            ManagerMsg::Budget(_) => "budget",
            ManagerMsg::StopAdmitting(_) => "stop_admitting",
            ManagerMsg::Sessions(_) => "sessions",
            ManagerMsg::Fail(_) => "fail",
        };
        let verdict = st.args.faults.check(ActorKind::Manager, name);
        if !verdict.delay.is_zero() {
            tokio::time::sleep(verdict.delay).await;
        }
        if verdict.panic {
            return Err(format!("injected manager failure on {name}").into());
        }
        match msg {
            ManagerMsg::Spawn { config, reply } => {
                let _ = reply.send(st.spawn(&myself, config, false).await);
            }
            ManagerMsg::Fork { from, reply } => {
                let result = match st.sessions.get(&from) {
                    None => Err(RuntimeError::UnknownSession(from)),
                    Some(source) => {
                        let mut config = source.config.clone();
                        config.window = Some(source.window);
                        // Each fork samples on its own: an explicit seed is mixed with the
                        // fork's id (and kept in its configuration, for its own forks), and none
                        // derives one from the id as for any session.
                        let explicit = config.seed;
                        st.spawn(&myself, config, true).await.map(|s| {
                            let seed = SessionConfig::default().seed_for(s.id);
                            (s, explicit.map_or(seed, |e| e ^ seed))
                        })
                    }
                };
                let _ = reply.send(result);
            }
            ManagerMsg::Close { id, reply } => {
                let actor = st.sessions.get(&id).map(|s| s.actor.clone());
                let result = match actor {
                    Some(a) => {
                        st.release(id);
                        a.stop(Some("closed".into()));
                        Ok(())
                    }
                    None => Err(RuntimeError::UnknownSession(id)),
                };
                let _ = reply.send(result);
            }
            ManagerMsg::Lookup { id, reply } => {
                let r = st
                    .sessions
                    .get(&id)
                    .map(|s| Spawned {
                        id,
                        actor: s.actor.clone(),
                        window: s.window,
                    })
                    .ok_or(RuntimeError::UnknownSession(id));
                let _ = reply.send(r);
            }
            ManagerMsg::Budget(reply) => {
                let _ = reply.send(BudgetInfo {
                    sessions: st.sessions.len(),
                    max_sessions: st.args.max_sessions,
                    used_bytes: st.used,
                    budget_bytes: st.args.budget_bytes,
                });
            }
            ManagerMsg::StopAdmitting(reply) => {
                st.admitting = false;
                let _ = reply.send(());
            }
            ManagerMsg::Sessions(reply) => {
                let _ = reply.send(st.sessions.values().map(|s| s.actor.clone()).collect());
            }
            ManagerMsg::Fail(why) => {
                for open in st.sessions.values() {
                    let _ = open.actor.cast(SessionMsg::Fail(why.clone()));
                }
                st.failed = Some(why);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::warn!(error = %err, "a session failed; its window is released");
                cell
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => cell,
            _ => return Ok(()),
        };
        if let Some(&id) = st.by_actor.get(&cell.get_id()) {
            st.release(id);
        }
        Ok(())
    }
}

/// The bytes a window of `window`'s shape reserves at `slot_bytes` a slot, or a typed error for a
/// window that holds no recent token or whose size does not fit in a `u64` (its fields are
/// public, so `WindowSpec::new`'s check can be skipped).
pub(crate) fn window_bytes(window: WindowSpec, slot_bytes: u64) -> Result<u64, RuntimeError> {
    if window.window == 0 {
        return Err(RuntimeError::InvalidConfig(format!(
            "a window must hold at least one recent token; got {} sink + 0",
            window.sink
        )));
    }
    window
        .sink
        .checked_add(window.window)
        .and_then(|slots| (slots as u64).checked_mul(slot_bytes))
        .ok_or_else(|| {
            RuntimeError::InvalidConfig(format!(
                "a window of {} sink + {} slots at {slot_bytes} bytes a slot overflows",
                window.sink, window.window
            ))
        })
}

/// Whether a window of `window`'s shape stays within the model's positions: a typed error with
/// both numbers when it does not, before anything is reserved.
pub(crate) fn window_fits(
    window: WindowSpec,
    max_positions: Option<usize>,
) -> Result<(), RuntimeError> {
    let capacity = window.sink.saturating_add(window.window);
    match max_positions {
        Some(positions) if capacity > positions => Err(RuntimeError::Engine(Arc::new(
            EngineError::WindowPastPositions {
                capacity,
                positions,
            },
        ))),
        _ => Ok(()),
    }
}

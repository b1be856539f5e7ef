//! The VerifierActor: owns the shared verifier model on one dedicated OS thread and runs the
//! scheduler's batched steps there. A panic on that thread fails the actor, which its supervisor
//! (the scheduler) sees and answers with a restart.

use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use troupe_engine::{SeqId, Verifier, VerifyWork, WindowSpec};

use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::StepDone;
use crate::worker::Worker;

/// Messages of the verifier actor.
pub enum VerifierMsg {
    /// Open a sequence's window.
    Open {
        /// Sequence.
        seq: SeqId,
        /// Window shape.
        spec: WindowSpec,
        /// Sampling seed.
        seed: u64,
    },
    /// Close a sequence's window.
    Close {
        /// Sequence.
        seq: SeqId,
    },
    /// Run one batched step; the outcome goes to the scheduler as `StepDone`.
    Step {
        /// Step number.
        id: u64,
        /// One work per sequence.
        works: Vec<VerifyWork>,
    },
    /// The model thread panicked.
    ThreadFailed(String),
}

/// Start-up arguments of the verifier actor.
pub struct VerifierArgs {
    /// The model, moved onto the actor's thread.
    pub model: Box<dyn Verifier>,
    /// Where outcomes go: the scheduler, which this actor can only tell that a step is done.
    pub scheduler: DerivedActorRef<StepDone>,
    /// Injected faults and delays.
    pub faults: FaultPlan,
}

/// Work for the actor's thread.
pub enum Job {
    /// Open a sequence.
    Open(SeqId, WindowSpec, u64),
    /// Close a sequence.
    Close(SeqId),
    /// Run a step.
    Step(u64, Vec<VerifyWork>),
}

/// The verifier actor.
pub struct VerifierActor;

impl Actor for VerifierActor {
    type Msg = VerifierMsg;
    type State = Worker<Job>;
    type Arguments = VerifierArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: VerifierArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let VerifierArgs {
            model,
            scheduler,
            faults,
        } = args;
        let me = myself.clone();
        let worker = Worker::spawn(
            "troupe-verifier",
            model,
            move |model: &mut Box<dyn Verifier>, job: Job| match job {
                Job::Open(seq, spec, seed) => {
                    if let Err(e) = model.open(seq, spec, seed) {
                        tracing::warn!(seq, error = %e, "verifier could not open a sequence");
                    }
                }
                Job::Close(seq) => {
                    let _ = model.close(seq);
                }
                Job::Step(id, works) => {
                    let verdict = faults.check(ActorKind::Verifier, "step");
                    if verdict.drop {
                        return;
                    }
                    // Injected delay counts as model time, as a slow model's would.
                    let start = Instant::now();
                    if !verdict.delay.is_zero() {
                        std::thread::sleep(verdict.delay);
                    }
                    if verdict.panic {
                        panic!("injected verifier panic at step {id}");
                    }
                    let tokens: usize = works.iter().map(|w| w.fed.len() + w.draft.len()).sum();
                    let span = tracing::info_span!("verify", step = id, seqs = works.len(), tokens);
                    let _enter = span.enter();
                    let result = model.verify(&works).map_err(Arc::new);
                    let _ = scheduler.send_message(StepDone {
                        id,
                        result,
                        elapsed: start.elapsed(),
                    });
                }
            },
            move |msg| {
                let _ = me.cast(VerifierMsg::ThreadFailed(msg));
            },
        )?;
        Ok(worker)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        worker: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped (not killed): the thread finishes the step it holds, then the actor is gone, so
        // a shutdown returns with the model released.
        if let Some(thread) = worker.stop() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        worker: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let job = match msg {
            VerifierMsg::Open { seq, spec, seed } => Job::Open(seq, spec, seed),
            VerifierMsg::Close { seq } => Job::Close(seq),
            VerifierMsg::Step { id, works } => Job::Step(id, works),
            VerifierMsg::ThreadFailed(why) => {
                return Err(format!("verifier thread panicked: {why}").into())
            }
        };
        if !worker.send(job) {
            return Err("verifier thread has stopped".into());
        }
        Ok(())
    }
}

//! The VerifierActor: owns the shared verifier model on one dedicated OS thread and runs the
//! scheduler's batched steps there. A panic on that thread fails the actor, which its supervisor
//! (the scheduler) sees and answers with a restart.

use std::sync::Arc;
use std::time::Instant;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use troupe_engine::{SeqId, Verifier, VerifyWork, WindowSpec};

use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::StepDone;
use crate::worker::{JobSender, Worker};

/// Messages of the verifier actor. Jobs do not pass through it: the scheduler queues them on the
/// thread itself (see [`VerifierLink`]); the actor owns the thread and turns its panic into a
/// failure its supervisor sees.
pub enum VerifierMsg {
    /// The thread's queue, for the scheduler.
    Jobs(RpcReplyPort<JobSender<Job>>),
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
    /// Open a sequence (the second) as a copy of another (the first), sampling with a seed.
    Fork(SeqId, SeqId, u64),
    /// Reseed a sequence's sampling.
    Reseed(SeqId, u64),
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
        let fork_failed = myself.clone();
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
                Job::Fork(from, seq, seed) => {
                    if let Err(e) = model.fork(from, seq, seed) {
                        // The scheduler counts the fork's window as copied: a failed copy fails
                        // the verifier, whose restart replays every window from its history.
                        let why = format!("could not fork sequence {seq} from {from}: {e}");
                        let _ = fork_failed.cast(VerifierMsg::ThreadFailed(why));
                    }
                }
                Job::Reseed(seq, seed) => {
                    if let Err(e) = model.reseed(seq, seed) {
                        tracing::warn!(seq, error = %e, "verifier could not reseed a sequence");
                    }
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
        match msg {
            VerifierMsg::Jobs(reply) => {
                let _ = reply.send(worker.sender());
                Ok(())
            }
            VerifierMsg::ThreadFailed(why) => {
                Err(format!("verifier thread panicked: {why}").into())
            }
        }
    }
}

/// The scheduler's line to the verifier: the actor it supervises, and the queue of the actor's
/// thread, on which it puts jobs directly (one hop less per step than through the actor).
pub struct VerifierLink {
    /// The actor.
    pub actor: ActorRef<VerifierMsg>,
    jobs: JobSender<Job>,
}

impl VerifierLink {
    /// Spawns a verifier actor under `supervisor` and takes its thread's queue.
    pub async fn spawn(
        args: VerifierArgs,
        supervisor: ActorCell,
    ) -> Result<Self, ActorProcessingErr> {
        let (actor, _) = Actor::spawn_linked(None, VerifierActor, args, supervisor).await?;
        match actor.call(VerifierMsg::Jobs, None).await? {
            CallResult::Success(jobs) => Ok(Self { actor, jobs }),
            _ => Err("the verifier actor did not hand over its queue".into()),
        }
    }

    /// Opens a sequence's window.
    pub fn open(&self, seq: SeqId, spec: WindowSpec, seed: u64) {
        self.jobs.send(Job::Open(seq, spec, seed));
    }

    /// Closes a sequence's window.
    pub fn close(&self, seq: SeqId) {
        self.jobs.send(Job::Close(seq));
    }

    /// Opens `seq` as a copy of `from`'s window.
    pub fn fork(&self, from: SeqId, seq: SeqId, seed: u64) {
        self.jobs.send(Job::Fork(from, seq, seed));
    }

    /// Restarts a sequence's sampling from `seed`.
    pub fn reseed(&self, seq: SeqId, seed: u64) {
        self.jobs.send(Job::Reseed(seq, seed));
    }

    /// Runs a step; its outcome comes back as `StepDone`. (A thread that is gone has told its
    /// actor, whose failure restarts it; the step deadline covers the rest.)
    pub fn step(&self, id: u64, works: Vec<VerifyWork>) {
        self.jobs.send(Job::Step(id, works));
    }
}

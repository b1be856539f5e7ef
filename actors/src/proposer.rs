//! The ProposerActor: owns the drafter on its own OS thread and drafts for many sessions at once.
//! The scheduler orders block n+1 while block n is verified (pipelining); a draft that no longer
//! applies is dropped by the scheduler. An injected proposer↔verifier round trip is a link in
//! front of the thread: every message reaches it that much later, in order, with any number in
//! flight at once (as on a network), so pipelined orders overlap their round trips.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use tokio::sync::mpsc;
use tokio::time::Instant;
use troupe_engine::drafter::{DraftRequest, Drafter, HiddenStates};
use troupe_engine::{SeqId, WindowSpec};

use crate::faults::{ActorKind, FaultPlan};
use crate::protocol::{DraftOrder, DraftReply, Drafts};
use crate::worker::Worker;

/// One sequence's share of a step's verifier states: the sequence, the position of its first row,
/// and per layer the drafter asked for, `[rows][hidden]`.
pub type StepStates = (SeqId, usize, Vec<Vec<Vec<f32>>>);

/// Messages of the proposer actor.
pub enum ProposerMsg {
    /// Start tracking a sequence.
    Open {
        /// Sequence.
        seq: SeqId,
        /// Window shape (a draft model keeps its own bounded window).
        spec: WindowSpec,
        /// Sampling seed.
        seed: u64,
    },
    /// Start tracking a sequence as a copy of another.
    Fork {
        /// The source.
        from: SeqId,
        /// The copy.
        seq: SeqId,
        /// Window shape.
        spec: WindowSpec,
        /// Sampling seed.
        seed: u64,
        /// The source's tokens so far.
        history: Vec<u32>,
    },
    /// Stop tracking a sequence.
    Close {
        /// Sequence.
        seq: SeqId,
    },
    /// Restart the sampling of a sequence's drafts from a turn's seed.
    Reseed {
        /// Sequence.
        seq: SeqId,
        /// Seed.
        seed: u64,
    },
    /// Tokens now known to be in the sequence.
    Observe {
        /// Sequence.
        seq: SeqId,
        /// Tokens.
        tokens: Vec<u32>,
    },
    /// The verifier's states of the positions one step committed, for a drafter that reads
    /// them: per sequence, the position of the first row and, per layer the drafter asked for,
    /// `[rows][hidden]`.
    Hidden(Vec<StepStates>),
    /// Draft these blocks; the replies go to the scheduler as `Drafts`.
    Draft(Vec<DraftOrder>),
    /// The drafting thread panicked.
    ThreadFailed(String),
}

/// Start-up arguments of the proposer actor.
pub struct ProposerArgs {
    /// The drafter, moved onto the actor's thread.
    pub drafter: Box<dyn Drafter>,
    /// Where drafts go: the scheduler, which this actor can only send drafts.
    pub scheduler: DerivedActorRef<Drafts>,
    /// Injected faults, delays and round trip.
    pub faults: FaultPlan,
}

/// Work for the actor's thread.
pub enum Job {
    /// Open a sequence.
    Open(SeqId, WindowSpec, u64),
    /// Open a sequence as a copy of another: source, copy, window, seed, history.
    Fork(SeqId, SeqId, WindowSpec, u64, Vec<u32>),
    /// Close a sequence.
    Close(SeqId),
    /// Reseed a sequence's sampling.
    Reseed(SeqId, u64),
    /// Observe tokens.
    Observe(SeqId, Vec<u32>),
    /// Observe the verifier's states of one step (see [`ProposerMsg::Hidden`]).
    Hidden(Vec<StepStates>),
    /// Draft blocks.
    Draft(Vec<DraftOrder>),
}

/// The proposer actor.
pub struct ProposerActor;

/// The proposer's state: its drafting thread, and the link in front of it when a round trip is
/// injected.
pub struct ProposerState {
    worker: Worker<Job>,
    link: Option<mpsc::UnboundedSender<(Instant, Job)>>,
    rtt: Duration,
    /// Cleared when the actor stops, so the link drops what is still on its way.
    open: Arc<AtomicBool>,
}

impl Drop for ProposerState {
    fn drop(&mut self) {
        self.open.store(false, Ordering::Release);
    }
}

impl ProposerState {
    /// Hands a job to the thread, through the link if there is one; false if the thread is gone.
    fn send(&self, job: Job) -> bool {
        match &self.link {
            Some(link) => {
                link.send((Instant::now() + self.rtt, job)).is_ok() && self.worker.is_alive()
            }
            None => self.worker.send(job),
        }
    }
}

/// Delivers each job at its due time, in the order sent, to `thread` (false: the thread is gone).
/// Due times grow with the order, so waiting for each in turn delays every job by exactly the
/// round trip.
async fn run_link(
    mut rx: mpsc::UnboundedReceiver<(Instant, Job)>,
    thread: impl Fn(Job) -> bool,
    open: Arc<AtomicBool>,
) {
    while let Some((due, job)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if !open.load(Ordering::Acquire) || !thread(job) {
            return;
        }
    }
}

impl Actor for ProposerActor {
    type Msg = ProposerMsg;
    type State = ProposerState;
    type Arguments = ProposerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ProposerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ProposerArgs {
            drafter,
            scheduler,
            faults,
        } = args;
        let me = myself.clone();
        let rtt = faults.rtt();
        let worker = Worker::spawn(
            "troupe-proposer",
            drafter,
            move |drafter: &mut Box<dyn Drafter>, job: Job| match job {
                Job::Open(seq, spec, seed) => {
                    let _ = drafter.open(seq, spec, seed);
                }
                Job::Fork(from, seq, spec, seed, history) => {
                    let _ = drafter.fork(from, seq, spec, seed, &history);
                }
                Job::Close(seq) => drafter.close(seq),
                Job::Reseed(seq, seed) => drafter.reseed(seq, seed),
                Job::Observe(seq, tokens) => {
                    let _ = drafter.observe(seq, &tokens);
                }
                Job::Hidden(states) => {
                    let views: Vec<HiddenStates<'_>> = states
                        .iter()
                        .map(|(seq, from, hidden)| HiddenStates {
                            seq: *seq,
                            from: *from,
                            hidden,
                        })
                        .collect();
                    if let Err(e) = drafter.observe_hidden_many(&views) {
                        tracing::warn!(error = %e, "the drafter refused the verifier's states");
                    }
                }
                Job::Draft(orders) => {
                    let verdict = faults.check(ActorKind::Proposer, "draft");
                    if verdict.drop {
                        return;
                    }
                    if !verdict.delay.is_zero() {
                        std::thread::sleep(verdict.delay);
                    }
                    if verdict.panic {
                        panic!("injected proposer panic");
                    }
                    let span = tracing::info_span!("draft", seqs = orders.len());
                    let _enter = span.enter();
                    let requests: Vec<DraftRequest> = orders
                        .iter()
                        .map(|o| DraftRequest {
                            seq: o.seq,
                            assumed: o.assumed.clone(),
                            k: o.k,
                            params: o.params,
                        })
                        .collect();
                    match drafter.draft(&requests) {
                        Ok(drafts) => {
                            let replies = orders
                                .into_iter()
                                .zip(drafts)
                                .map(|(order, draft)| DraftReply { order, draft })
                                .collect();
                            let _ = scheduler.send_message(Drafts(replies));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "drafting failed; sequences decode plainly")
                        }
                    }
                }
            },
            move |msg| {
                let _ = me.cast(ProposerMsg::ThreadFailed(msg));
            },
        )?;
        let open = Arc::new(AtomicBool::new(true));
        let link = (!rtt.is_zero()).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let thread = worker.sender();
            tokio::spawn(run_link(rx, move |job| thread.send(job), open.clone()));
            tx
        });
        Ok(ProposerState {
            worker,
            link,
            rtt,
            open,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped (not killed): wait for the drafting thread, so a shutdown ends with it.
        st.open.store(false, Ordering::Release);
        st.link = None;
        if let Some(thread) = st.worker.stop() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let job = match msg {
            ProposerMsg::Open { seq, spec, seed } => Job::Open(seq, spec, seed),
            ProposerMsg::Fork {
                from,
                seq,
                spec,
                seed,
                history,
            } => Job::Fork(from, seq, spec, seed, history),
            ProposerMsg::Close { seq } => Job::Close(seq),
            ProposerMsg::Reseed { seq, seed } => Job::Reseed(seq, seed),
            ProposerMsg::Observe { seq, tokens } => Job::Observe(seq, tokens),
            ProposerMsg::Hidden(states) => Job::Hidden(states),
            ProposerMsg::Draft(orders) => Job::Draft(orders),
            ProposerMsg::ThreadFailed(why) => {
                return Err(format!("proposer thread panicked: {why}").into())
            }
        };
        if !state.send(job) {
            return Err("proposer thread has stopped".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(rx: &crossbeam_channel::Receiver<Job>) -> Vec<u32> {
        rx.try_iter()
            .map(|j| match j {
                Job::Observe(_, t) => t[0],
                _ => unreachable!("only observations are sent"),
            })
            .collect()
    }

    /// On paused time: every message arrives exactly one round trip after it was sent, in order,
    /// and messages sent together travel together (a link, not a queue that pays per message).
    #[tokio::test(start_paused = true)]
    async fn the_link_delays_each_message_by_the_round_trip_in_order_and_at_once() {
        let (thread_tx, thread_rx) = crossbeam_channel::unbounded();
        let (tx, rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicBool::new(true));
        tokio::spawn(run_link(
            rx,
            move |job| thread_tx.send(job).is_ok(),
            open.clone(),
        ));
        let rtt = Duration::from_millis(50);
        let t0 = Instant::now();
        for i in 0..3 {
            tx.send((t0 + rtt, Job::Observe(1, vec![i]))).unwrap();
        }
        tx.send((t0 + 2 * rtt, Job::Observe(1, vec![3]))).unwrap();
        tokio::time::sleep(rtt - Duration::from_millis(1)).await;
        assert!(
            observed(&thread_rx).is_empty(),
            "nothing before the round trip"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            observed(&thread_rx),
            vec![0, 1, 2],
            "all three, in order, after one round trip"
        );
        tokio::time::sleep(rtt).await;
        tokio::task::yield_now().await;
        assert_eq!(observed(&thread_rx), vec![3]);
        // Once the actor is gone, what is still on its way is dropped.
        tx.send((Instant::now() + rtt, Job::Observe(1, vec![4])))
            .unwrap();
        open.store(false, Ordering::Release);
        tokio::time::sleep(2 * rtt).await;
        tokio::task::yield_now().await;
        assert!(observed(&thread_rx).is_empty());
    }
}

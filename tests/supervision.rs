//! Failures: the verifier panics mid-run, or a step is lost, or the proposer panics; the runtime
//! restarts the part, replays what was in flight, and every session's output equals the no-fault run.

mod common;

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use troupe::{
    ActorKind, Drafter, EngineError, FaultPlan, GenerateParams, Runtime, RuntimeBuilder,
    SchedulerConfig, SchedulerStats, SessionConfig, WindowSpec,
};

const NEW_TOKENS: usize = 30;

fn window() -> WindowSpec {
    WindowSpec::new(4, 32).unwrap()
}

async fn start<D: Drafter + 'static>(
    dir: &Path,
    drafter: impl Fn() -> Result<D, EngineError> + Send + Sync + 'static,
    plan: FaultPlan,
    step_timeout: Duration,
) -> Runtime {
    RuntimeBuilder::new(common::verifier_factory(dir))
        .drafter(drafter)
        .default_window(window())
        .scheduler(
            SchedulerConfig::default()
                .with_max_draft_len(3)
                .with_adaptive(false)
                // Wait for drafts however loaded the machine is, so speculation surely happens.
                .with_draft_wait(Some(Duration::from_secs(10))),
        )
        .faults(plan)
        .step_timeout(step_timeout)
        .build()
        .await
        .unwrap()
}

/// One turn in each of eight fresh sessions, all at once; every output must equal its prompt run
/// alone with plain greedy decoding.
async fn round(rt: &Runtime, dir: &Path) {
    let prompts = common::repetitive_prompts(8);
    let mut sessions = Vec::new();
    for _ in &prompts {
        sessions.push(rt.spawn_session(SessionConfig::default()).await.unwrap());
    }
    let params = GenerateParams::greedy(NEW_TOKENS);
    let turns = sessions
        .iter()
        .zip(&prompts)
        .map(|(s, p)| s.generate(p.clone(), params.clone()).unwrap().collect());
    let outputs = join_all(turns).await;
    for (i, (out, p)) in outputs.into_iter().zip(&prompts).enumerate() {
        let out = out.expect("every session finishes").0;
        assert_eq!(
            out,
            common::run_alone(dir, p, NEW_TOKENS, window()),
            "session {i}"
        );
    }
    for s in sessions {
        s.close().await.unwrap();
    }
}

/// Stats once `restarted` holds; a restart is reported asynchronously (a panicking thread may
/// still be printing its backtrace when the turns end).
async fn stats_after_restart(
    rt: &Runtime,
    restarted: impl Fn(&SchedulerStats) -> bool,
) -> SchedulerStats {
    let mut stats = rt.stats().await.unwrap();
    for _ in 0..500 {
        if restarted(&stats) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = rt.stats().await.unwrap();
    }
    stats
}

/// One round of turns on the n-gram drafter under `plan`; returns the stats once the verifier has
/// been restarted.
async fn verifier_fault_round(plan: FaultPlan, step_timeout: Duration) -> SchedulerStats {
    let dir = common::tiny_model(5, 2);
    let rt = start(dir.path(), common::ngram_factory(), plan, step_timeout).await;
    round(&rt, dir.path()).await;
    let stats = stats_after_restart(&rt, |s| s.verifier_restarts > 0).await;
    rt.shutdown().await.unwrap();
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_panic_is_restarted_and_outputs_are_unchanged() {
    let plan = FaultPlan::default().panic_after(ActorKind::Verifier, "step", 7);
    let stats = verifier_fault_round(plan, Duration::from_secs(60)).await;
    assert_eq!(stats.verifier_restarts, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_times_out_and_is_replayed() {
    let plan = FaultPlan::default().drop_every(ActorKind::Verifier, "step", 9);
    let stats = verifier_fault_round(plan, Duration::from_millis(400)).await;
    assert!(stats.verifier_restarts >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_panic_is_restarted_and_speculation_resumes() {
    let dir = common::tiny_model(5, 2);
    let plan = FaultPlan::default().panic_after(ActorKind::Proposer, "draft", 3);
    // The draft model is the verifier itself, so its greedy drafts are nearly always accepted.
    let drafter = common::model_drafter_factory(dir.path());
    let rt = start(dir.path(), drafter, plan, Duration::from_secs(60)).await;
    // While the proposer is down the sessions decode plainly, and lose nothing.
    round(&rt, dir.path()).await;
    let before = stats_after_restart(&rt, |s| s.proposer_restarts > 0).await;
    assert_eq!(before.proposer_restarts, 1, "{before:?}");
    // The restarted proposer drafts for new turns, and its drafts are accepted.
    round(&rt, dir.path()).await;
    let after = rt.stats().await.unwrap();
    assert_eq!(after.proposer_restarts, 1, "{after:?}");
    let accepted = after.accepted - before.accepted;
    assert!(accepted >= NEW_TOKENS as u64, "{before:?} then {after:?}");
    rt.shutdown().await.unwrap();
}

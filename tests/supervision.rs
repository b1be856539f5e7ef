//! Failures: the verifier panics mid-run, or a step is lost, or the proposer panics; the runtime
//! restarts the part, replays what was in flight, and every session's output equals the no-fault run.

mod common;

use std::time::Duration;

use futures::future::join_all;
use troupe::{
    ActorKind, FaultPlan, GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig,
    WindowSpec,
};

async fn run_with(
    plan: FaultPlan,
    step_timeout: Duration,
) -> (
    Vec<Vec<u32>>,
    troupe::actors::SchedulerStats,
    Vec<Vec<u32>>,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let dir = common::tiny_model(5, 2);
    let window = WindowSpec::new(4, 32).unwrap();
    let rt = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .drafter(common::ngram_factory())
        .default_window(window)
        .scheduler(SchedulerConfig {
            max_draft_len: 3,
            adaptive: false,
            // Wait for drafts however loaded the machine is, so speculation surely happens.
            draft_wait_s: Some(10.0),
            ..Default::default()
        })
        .faults(plan)
        .step_timeout(step_timeout)
        .build()
        .await
        .unwrap();
    let prompts = common::repetitive_prompts(8);
    let mut sessions = Vec::new();
    for _ in &prompts {
        sessions.push(rt.spawn_session(SessionConfig::default()).await.unwrap());
    }
    let params = GenerateParams {
        max_new_tokens: 30,
        ..Default::default()
    };
    let turns = sessions
        .iter()
        .zip(&prompts)
        .map(|(s, p)| s.generate(p.clone(), params).unwrap().collect());
    let outputs = join_all(turns)
        .await
        .into_iter()
        .map(|r| r.expect("every session finishes").0)
        .collect();
    // A restart is reported asynchronously; give it a moment to land after the last turn.
    let mut stats = rt.stats().await.unwrap();
    for _ in 0..50 {
        if stats.verifier_restarts + stats.proposer_restarts > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = rt.stats().await.unwrap();
    }
    rt.shutdown().await;
    let path = dir.path().to_path_buf();
    (outputs, stats, prompts, path, dir)
}

fn check_against_alone(outputs: &[Vec<u32>], prompts: &[Vec<u32>], dir: &std::path::Path) {
    let window = WindowSpec::new(4, 32).unwrap();
    for (i, (out, p)) in outputs.iter().zip(prompts).enumerate() {
        assert_eq!(out, &common::run_alone(dir, p, 30, window), "session {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_panic_is_restarted_and_outputs_are_unchanged() {
    let plan = FaultPlan::default().panic_after(ActorKind::Verifier, "step", 7);
    let (outputs, stats, prompts, path, _dir) = run_with(plan, Duration::from_secs(60)).await;
    assert_eq!(stats.verifier_restarts, 1, "{stats:?}");
    check_against_alone(&outputs, &prompts, &path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_times_out_and_is_replayed() {
    let plan = FaultPlan::default().drop_every(ActorKind::Verifier, "step", 9);
    let (outputs, stats, prompts, path, _dir) = run_with(plan, Duration::from_millis(400)).await;
    assert!(stats.verifier_restarts >= 1, "{stats:?}");
    check_against_alone(&outputs, &prompts, &path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_panic_is_restarted_and_outputs_are_unchanged() {
    let plan = FaultPlan::default().panic_after(ActorKind::Proposer, "draft", 3);
    let (outputs, stats, prompts, path, _dir) = run_with(plan, Duration::from_secs(60)).await;
    assert_eq!(stats.proposer_restarts, 1, "{stats:?}");
    assert!(stats.accepted > 0);
    check_against_alone(&outputs, &prompts, &path);
}

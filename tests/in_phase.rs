//! Sessions that answer at once stay in one step: two sessions taking turns back to back share
//! nearly every step, where without the turn-around and gather waits each would go out alone, a
//! step behind the other, and every turn would wait a whole step for the other's.

use std::time::Duration;

use troupe::actors::scripted::ScriptedModel;
use troupe::{GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_taking_turns_back_to_back_share_their_steps() {
    // A fixed wait (the cap and the quiet gap both 50 ms) keeps the test free of timing luck:
    // a follow-up turn takes microseconds, the wait ends as soon as it comes.
    let config = SchedulerConfig::default().with_turnaround_wait(Some(Duration::from_millis(50)));
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::from_millis(10))))
        .scheduler(config)
        .build()
        .await
        .unwrap();
    let mut loops = Vec::new();
    for i in 0..2u32 {
        let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
        loops.push(tokio::spawn(async move {
            for t in 0..6u32 {
                let prompt = vec![1 + i, 2 + t];
                let stream = s.generate(prompt, GenerateParams::greedy(3)).unwrap();
                assert_eq!(stream.collect().await.unwrap().0.len(), 3);
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
    let stats = rt.stats().await.unwrap();
    let per_step = stats.total_step_seqs as f64 / stats.steps as f64;
    // 6 turns × 3 tokens (a prefill step and two decode steps each): 18 steps if the two
    // sessions always share, 36 if they never do.
    assert!(
        per_step >= 1.8,
        "{per_step:.2} sessions a step over {} steps",
        stats.steps
    );
    rt.shutdown().await.unwrap();
}

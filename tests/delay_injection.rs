//! 64 concurrent sessions against the scripted model with an injected 50 ms verifier delay: all
//! complete, each within the steps its tokens need, and steps really batch. What the runtime adds
//! to a turn beyond model time is a figure, measured by `troupe bench persona-stress`, not asserted
//! here.

use std::time::Duration;

use futures::future::join_all;
use troupe::actors::scripted::{ScriptedDrafter, ScriptedModel};
use troupe::{
    ActorKind, FaultPlan, GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig,
};

const DELAY_MS: f64 = 50.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_sessions_with_a_50ms_verifier_all_complete_and_batch() {
    let plan = FaultPlan::default().delay(
        ActorKind::Verifier,
        "step",
        Duration::from_millis(DELAY_MS as u64),
    );
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO)))
        .drafter(|| Ok(ScriptedDrafter::new(150, Duration::ZERO)))
        .faults(plan)
        // The scripted model has no cost per token: let every prefill fit in one step.
        .scheduler(SchedulerConfig::default().with_max_step_tokens(8192))
        .build()
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..64 {
        sessions.push(rt.spawn_session(SessionConfig::default()).await.unwrap());
    }
    let params = GenerateParams::greedy(12);
    for round in 0..2 {
        let turns = sessions.iter().enumerate().map(|(i, s)| {
            let prompt: Vec<u32> = format!("persona {i} says hello in round {round}")
                .bytes()
                .map(u32::from)
                .collect();
            s.generate(prompt, params.clone()).unwrap().collect()
        });
        let results: Vec<_> = join_all(turns).await;
        for r in results {
            let (tokens, stats) = r.expect("every turn completes");
            assert_eq!(tokens.len(), 12);
            // The prompt fits one step, which emits the first token; each later step emits at
            // least one more.
            assert!(
                (1..=12).contains(&stats.steps),
                "a turn of 12 tokens took part in {} steps",
                stats.steps
            );
        }
    }
    let stats = rt.stats().await.unwrap();
    assert!(
        stats.max_step_seqs >= 48,
        "largest step had {} sequences",
        stats.max_step_seqs
    );
    assert!(stats.accepted > 0);
    rt.shutdown().await.unwrap();
}

//! Greedy output of every one of 64 concurrent sessions (a real small model, speculative decoding,
//! pipelined drafts, eviction in the window) is token-exact to that session run alone.

mod common;

use std::time::Duration;

use futures::future::join_all;
use troupe::{
    ActorKind, FaultPlan, GenerateParams, RuntimeBuilder, SchedulerConfig, SessionConfig,
    WindowSpec,
};

async fn run_concurrent(config: SchedulerConfig, faults: FaultPlan, n: usize, new_tokens: usize) {
    let dir = common::tiny_model(11, 2);
    let window = WindowSpec::new(4, 40).unwrap();
    let rt = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .drafter(common::ngram_factory())
        .default_window(window)
        .scheduler(config)
        .faults(faults)
        .build()
        .await
        .unwrap();
    let prompts = common::repetitive_prompts(n);
    let mut sessions = Vec::new();
    for _ in 0..n {
        sessions.push(rt.spawn_session(SessionConfig::default()).await.unwrap());
    }
    let params = GenerateParams::greedy(new_tokens);
    let turns = sessions
        .iter()
        .zip(&prompts)
        .map(|(s, p)| s.generate(p.clone(), params.clone()).unwrap().collect());
    let outputs: Vec<_> = join_all(turns)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let stats = rt.stats().await.unwrap();
    for (i, ((tokens, turn), prompt)) in outputs.iter().zip(&prompts).enumerate() {
        let alone = common::run_alone(dir.path(), prompt, new_tokens, window);
        assert_eq!(tokens, &alone, "session {i} differs from its run alone");
        assert_eq!(turn.tokens, new_tokens);
    }
    assert!(
        stats.max_step_seqs > n / 2,
        "steps did not batch: {stats:?}"
    );
    assert!(
        stats.drafted > 0 && stats.accepted > 0,
        "no speculation happened: {stats:?}"
    );
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_sessions_pipelined_speculation_is_lossless() {
    let config = SchedulerConfig::default()
        .with_max_draft_len(4)
        .with_adaptive(false)
        .with_pipelined(true)
        // Wait for drafts however loaded the machine is, so speculation surely happens.
        .with_draft_wait(Some(Duration::from_secs(10)));
    run_concurrent(config, FaultPlan::default(), 64, 24).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_speculation_under_a_tight_token_budget_is_lossless() {
    let config = SchedulerConfig::default()
        .with_max_step_tokens(48)
        .with_prefill_chunk(16)
        .with_max_draft_len(6)
        .with_adaptive(true)
        .with_pipelined(true)
        // Wait for drafts however loaded the machine is, so speculation surely happens.
        .with_draft_wait(Some(Duration::from_secs(10)));
    // The adaptive policy drafts when a step costs about the same whatever its tokens, as a large
    // model's weight-bound steps do; the tiny model's CPU steps grow with their tokens, and the
    // policy may rightly decline to draft at all. A fixed 20 ms of injected model time per step
    // makes the step cost flat, so speculation happens and its losslessness is what is tested.
    let faults = FaultPlan::default().delay(ActorKind::Verifier, "step", Duration::from_millis(20));
    run_concurrent(config, faults, 24, 20).await;
}

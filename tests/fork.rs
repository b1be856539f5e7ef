//! Forking a session (a real small model): the fork holds an exact copy of its source's context,
//! each then continues on its own, and neither sees the other's later turns. Per-turn seeds.

mod common;

use std::path::Path;

use troupe::actors::scripted::ScriptedModel;
use troupe::{
    GenerateParams, Limit, Runtime, RuntimeBuilder, RuntimeError, SessionConfig, SessionHandle,
    WindowSpec,
};

/// A window small enough that the turns below evict from it.
fn window() -> WindowSpec {
    WindowSpec::new(4, 24).unwrap()
}

async fn runtime(dir: &Path, max_sessions: usize) -> Runtime {
    RuntimeBuilder::new(common::verifier_factory(dir))
        .drafter(common::ngram_factory())
        .default_window(window())
        .max_sessions(max_sessions)
        .build()
        .await
        .unwrap()
}

async fn turn(s: &SessionHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    let (tokens, stats) = s
        .generate(prompt.to_vec(), GenerateParams::greedy(n))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(stats.tokens, n);
    tokens
}

/// The turns `turns` of a session opened afresh: what a session with that history must produce.
async fn replayed(rt: &Runtime, turns: &[(&[u32], usize)]) -> Vec<Vec<u32>> {
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let mut out = Vec::new();
    for (prompt, n) in turns {
        out.push(turn(&s, prompt, *n).await);
    }
    s.close().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_continues_exactly_as_its_source_would_and_each_keeps_to_itself() {
    let dir = common::tiny_model(21, 2);
    let rt = runtime(dir.path(), 16).await;
    let prompts = common::repetitive_prompts(3);
    let (p, qa, qb) = (&prompts[0][..], &prompts[1][..], &prompts[2][..]);
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let first = turn(&a, p, 14).await;
    let b = a.fork().await.unwrap();
    assert_ne!(a.id(), b.id());
    assert_eq!(b.window(), a.window());
    let (ia, ib) = (a.info().await.unwrap(), b.info().await.unwrap());
    assert_eq!(
        ib.tokens_seen, ia.tokens_seen,
        "the fork has seen what its source had"
    );
    assert_eq!(ib.window_fill, ia.window_fill);
    assert_eq!(ib.turns, 0, "the fork has taken no turn of its own");

    // Both continue at once, each with its own prompt: two histories that share a prefix.
    let (ta, tb) = tokio::join!(turn(&a, qa, 10), turn(&b, qb, 10));
    let want_a = replayed(&rt, &[(p, 14), (qa, 10)]).await;
    let want_b = replayed(&rt, &[(p, 14), (qb, 10)]).await;
    assert_eq!(want_a[0], first);
    assert_eq!(
        ta, want_a[1],
        "the source continues as if it had never been forked"
    );
    assert_eq!(
        tb, want_b[1],
        "the fork continues its source's context exactly"
    );
    assert_ne!(ta, tb, "different prompts after the fork lead apart");

    // A later turn of each still sees only its own history.
    let (ta2, tb2) = tokio::join!(turn(&a, qb, 6), turn(&b, qb, 6));
    let want_a2 = replayed(&rt, &[(p, 14), (qa, 10), (qb, 6)]).await;
    let want_b2 = replayed(&rt, &[(p, 14), (qb, 10), (qb, 6)]).await;
    assert_eq!(ta2, want_a2[2]);
    assert_eq!(tb2, want_b2[2]);
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_copies_the_context_after_the_turns_asked_before_it() {
    let dir = common::tiny_model(22, 2);
    let rt = runtime(dir.path(), 16).await;
    let prompts = common::repetitive_prompts(2);
    let (p, q) = (&prompts[0][..], &prompts[1][..]);
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    // Asked for and not awaited: the fork must wait for it.
    let running = a.generate(p.to_vec(), GenerateParams::greedy(16)).unwrap();
    let b = a.fork().await.unwrap();
    let (first, _) = running.collect().await.unwrap();
    let tb = turn(&b, q, 8).await;
    let want = replayed(&rt, &[(p, 16), (q, 8)]).await;
    assert_eq!(first, want[0]);
    assert_eq!(tb, want[1], "the fork holds the whole turn asked before it");
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_is_admitted_as_any_session_and_a_closed_source_is_refused() {
    let dir = common::tiny_model(23, 1);
    let rt = runtime(dir.path(), 2).await;
    let p = common::repetitive_prompts(1).remove(0);
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    turn(&a, &p, 4).await;
    let b = a.fork().await.unwrap();
    match a.fork().await {
        Err(RuntimeError::AdmissionRefused {
            limit: Limit::Sessions,
            ..
        }) => {}
        Err(e) => panic!("a third session past a cap of two: {e}"),
        Ok(_) => panic!("a third session past a cap of two was admitted"),
    }
    assert_eq!(rt.budget().await.unwrap().sessions, 2, "nothing leaked");
    // The source is untouched by the refused fork.
    turn(&a, &p, 4).await;
    b.close().await.unwrap();
    match b.fork().await {
        Err(RuntimeError::UnknownSession(id)) => assert_eq!(id, b.id()),
        Err(e) => panic!("forking a closed session: {e}"),
        Ok(_) => panic!("a closed session was forked"),
    }
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_seed_makes_a_sampled_reply_repeatable() {
    let dir = common::tiny_model(24, 1);
    // No drafter: with speculation, a seed fixes the distribution of a reply, while which
    // tokens are drawn also depends on the drafts each step happened to verify.
    let rt = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .default_window(window())
        .build()
        .await
        .unwrap();
    let p = common::repetitive_prompts(1).remove(0);
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    turn(&a, &p, 4).await;
    let sampled = |seed: u64| {
        GenerateParams::greedy(24)
            .with_sampling(1.0, 1.0)
            .with_seed(seed)
    };
    let reply = |s: SessionHandle, params: GenerateParams| async move {
        s.generate(vec![40, 41], params)
            .unwrap()
            .collect()
            .await
            .unwrap()
            .0
    };
    let unseeded = || GenerateParams::greedy(24).with_sampling(1.0, 1.0);
    let (b, c) = (a.fork().await.unwrap(), a.fork().await.unwrap());
    let (rb, rc) = tokio::join!(reply(b, unseeded()), reply(c, unseeded()));
    assert_ne!(rb, rc, "forks sample with seeds of their own");
    let (d, e, f) = (
        a.fork().await.unwrap(),
        a.fork().await.unwrap(),
        a.fork().await.unwrap(),
    );
    let (rd, re, rf) = tokio::join!(
        reply(d, sampled(7)),
        reply(e, sampled(7)),
        reply(f, sampled(8)),
    );
    assert_eq!(
        rd, re,
        "the same seed on the same context gives the same reply"
    );
    assert_ne!(rd, rf, "another seed draws another reply");
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_whose_caller_goes_away_is_closed_again() {
    use std::time::Duration;
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::from_millis(5))))
        .max_sessions(4)
        .build()
        .await
        .unwrap();
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    // A long turn the fork must wait for; its caller gives up first.
    let running = a
        .generate(vec![1, 2, 3], GenerateParams::greedy(40))
        .unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(30), a.fork()).await;
    assert!(
        gave_up.is_err(),
        "the fork came before the turn it waits for ended"
    );
    running.collect().await.unwrap();
    // The unclaimed fork is closed: its slot and bytes come back.
    let mut open = usize::MAX;
    for _ in 0..300 {
        open = rt.budget().await.unwrap().sessions;
        if open == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open, 1, "a fork nobody holds kept its session");
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_are_counted_once_across_forks_closes_and_a_verifier_restart() {
    use std::time::Duration;
    use troupe::{ActorKind, FaultPlan};
    // Each turn's tokens overflow the 4 + 8 window; the verifier panics at its 20th step and is
    // rebuilt, replaying every window from nothing.
    let rt = RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO)))
        .default_window(WindowSpec::new(4, 8).unwrap())
        .faults(FaultPlan::default().panic_after(ActorKind::Verifier, "step", 20))
        .build()
        .await
        .unwrap();
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    turn(&a, &[1, 2, 3, 4], 16).await;
    let before = rt.stats().await.unwrap().window_evictions;
    // 19 in the window (the last token emitted is fed with the next step), 12 slots.
    assert_eq!(before, 19 - 12);
    let b = a.fork().await.unwrap();
    assert_eq!(
        rt.stats().await.unwrap().window_evictions,
        before,
        "a fork has evicted nothing of its own"
    );
    // Past the restart: the fork, idle, holds nothing in the rebuilt verifier yet.
    turn(&a, &[5], 16).await;
    assert!(rt.stats().await.unwrap().verifier_restarts >= 1);
    let after = rt.stats().await.unwrap().window_evictions;
    assert!(after >= before + 16, "{after} after {before}");
    b.close().await.unwrap();
    let closed = rt.stats().await.unwrap().window_evictions;
    assert!(
        closed >= after,
        "the count went down: {closed} after {after}"
    );
    assert_eq!(rt.health(), troupe::Health::Serving);
    rt.shutdown().await.unwrap();
}

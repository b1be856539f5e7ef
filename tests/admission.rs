//! Admission and bad input: the KV budget and session cap refuse with typed errors that say by how
//! much; closing returns bytes; unknown and closed sessions answer with errors, never a hang.

mod common;

use std::time::Duration;

use troupe::actors::scripted::ScriptedModel;
use troupe::engine::EngineError;
use troupe::{
    Event, GenerateParams, Limit, RuntimeBuilder, RuntimeError, SessionConfig, WindowSpec,
};

fn scripted() -> RuntimeBuilder {
    RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO).with_slot_bytes(1000)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_budget_refuses_with_the_shortfall_and_closing_returns_bytes() {
    let window = WindowSpec::new(4, 96).unwrap(); // 100 slots x 1000 bytes
    let rt = scripted()
        .default_window(window)
        .kv_budget_bytes(250_000)
        .build()
        .await
        .unwrap();
    assert_eq!(rt.kv_bytes_per_session(window), 100_000);
    let a = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let _b = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let err = rt
        .spawn_session(SessionConfig::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            RuntimeError::AdmissionRefused {
                limit: Limit::KvBytes,
                requested: 100_000,
                available: 50_000,
                over: 50_000
            }
        ),
        "{err}"
    );
    assert_eq!(rt.budget().await.unwrap().used_bytes, 200_000);
    a.close().await.unwrap();
    assert_eq!(rt.budget().await.unwrap().used_bytes, 100_000);
    rt.spawn_session(SessionConfig::default()).await.unwrap();
    // A smaller window fits in what is left.
    let small = SessionConfig::default().with_window(WindowSpec::new(0, 50).unwrap());
    rt.spawn_session(small).await.unwrap();
    assert_eq!(rt.budget().await.unwrap().used_bytes, 250_000);
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_refuses_the_next_session() {
    let rt = scripted().max_sessions(2).build().await.unwrap();
    rt.spawn_session(SessionConfig::default()).await.unwrap();
    rt.spawn_session(SessionConfig::default()).await.unwrap();
    match rt.spawn_session(SessionConfig::default()).await {
        Err(RuntimeError::AdmissionRefused {
            limit: Limit::Sessions,
            over: 1,
            ..
        }) => {}
        other => panic!("expected the session cap, got {:?}", other.map(|s| s.id())),
    }
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_closed_sessions_answer_with_errors() {
    let rt = scripted().build().await.unwrap();
    assert!(matches!(
        rt.session(999).await.err(),
        Some(RuntimeError::UnknownSession(999))
    ));
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let id = s.id();
    assert!(rt.session(id).await.is_ok());
    s.close().await.unwrap();
    assert!(matches!(
        s.close().await.err(),
        Some(RuntimeError::UnknownSession(i)) if i == id
    ));
    assert!(matches!(
        rt.session(id).await.err(),
        Some(RuntimeError::UnknownSession(i)) if i == id
    ));
    // The actor is gone: generate and info fail fast instead of hanging.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let turn = tokio::time::timeout(Duration::from_secs(5), async {
        match s.generate(vec![1, 2, 3], GenerateParams::default()) {
            Err(e) => Err(e),
            Ok(stream) => stream.collect().await.map(|_| ()),
        }
    })
    .await
    .expect("no hang");
    assert!(turn.is_err());
    let info = tokio::time::timeout(Duration::from_secs(5), s.info())
        .await
        .expect("no hang");
    assert!(matches!(info, Err(RuntimeError::SessionClosed(i)) if i == id));
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompts_fail_the_turn_and_the_session_lives_on() {
    let rt = scripted().max_prompt_tokens(8).build().await.unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let long: Vec<u32> = (0..9).map(|i| 40 + i).collect();
    let err = s
        .generate(long, GenerateParams::default())
        .unwrap()
        .collect()
        .await
        .err();
    assert!(matches!(
        err,
        Some(RuntimeError::PromptTooLong {
            tokens: 9,
            limit: 8
        })
    ));
    let err = s
        .generate(vec![300], GenerateParams::default())
        .unwrap()
        .collect()
        .await
        .err();
    assert!(matches!(
        err.as_ref().map(|e| match e {
            RuntimeError::Engine(e) => Some(&**e),
            _ => None,
        }),
        Some(Some(EngineError::TokenOutOfRange { token: 300, .. }))
    ));
    let err = s
        .generate("text", GenerateParams::default())
        .unwrap()
        .collect()
        .await
        .err();
    assert!(matches!(err, Some(RuntimeError::NoTokenizer)));
    let bad = GenerateParams::default().with_sampling(-1.0, 1.0);
    assert!(s.generate(vec![40], bad).unwrap().collect().await.is_err());
    // The session still works, and a turn streams tokens before its stats.
    let params = GenerateParams::greedy(5);
    let mut stream = s.generate(vec![40, 41, 42], params).unwrap();
    use futures::StreamExt;
    let mut tokens = 0;
    let mut done = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Tokens { ids, .. } => tokens += ids.len(),
            Event::Done(stats) => {
                assert_eq!(stats.tokens, 5);
                done = true;
            }
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    assert!(done && tokens == 5);
    let info = s.info().await.unwrap();
    assert_eq!(info.turns, 1);
    assert_eq!(
        info.kv_bytes_bound,
        rt.kv_bytes_per_session(WindowSpec::default())
    );
    rt.shutdown().await.unwrap();
}

/// A drafter that always proposes token 300, past the scripted model's 256, and says its
/// vocabulary is `vocab` (`None`: it claims to fit any verifier).
struct PastTheVocabulary {
    vocab: Option<usize>,
}

impl troupe::engine::Drafter for PastTheVocabulary {
    fn name(&self) -> &str {
        "past the vocabulary"
    }
    fn open(&mut self, _: u64, _: WindowSpec, _: u64) -> troupe::engine::Result<()> {
        Ok(())
    }
    fn close(&mut self, _: u64) {}
    fn observe(&mut self, _: u64, _: &[u32]) -> troupe::engine::Result<()> {
        Ok(())
    }
    fn draft(
        &mut self,
        r: &[troupe::engine::DraftRequest],
    ) -> troupe::engine::Result<Vec<troupe::engine::Draft>> {
        Ok(r.iter()
            .map(|_| troupe::engine::Draft {
                tokens: vec![300, 1],
                probs: None,
            })
            .collect())
    }
    fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }
}

/// A drafter over another vocabulary than the verifier's: refused when the runtime is built, with
/// both sizes, rather than panicking the verifier on its first drafts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafter_over_another_vocabulary_is_refused_at_build() {
    let err = scripted()
        .drafter(|| Ok(PastTheVocabulary { vocab: Some(301) }))
        .build()
        .await
        .err()
        .expect("a drafter over 301 tokens cannot serve a 256-token verifier");
    match err {
        RuntimeError::InvalidConfig(why) => {
            assert!(why.contains("301") && why.contains("256"), "{why}")
        }
        other => panic!("wrong error {other}"),
    }
}

/// A window with no recent slot, or one whose bytes overflow, is refused with a typed error when
/// the session spawns (the spec's fields are public, so its constructor can be skipped), and when
/// the runtime is built for a default window; nothing is reserved and the runtime stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_without_room_or_past_u64_are_refused() {
    let rt = scripted().build().await.unwrap();
    for bad in [
        WindowSpec { sink: 4, window: 0 },
        WindowSpec {
            sink: usize::MAX,
            window: 2,
        },
        WindowSpec {
            sink: 0,
            window: usize::MAX / 2,
        },
    ] {
        let err = rt
            .spawn_session(SessionConfig::default().with_window(bad))
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was admitted"));
        assert!(
            matches!(err, RuntimeError::InvalidConfig(_)),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(rt.budget().await.unwrap().used_bytes, 0);
    rt.spawn_session(SessionConfig::default()).await.unwrap();
    rt.shutdown().await.unwrap();

    let err = scripted()
        .default_window(WindowSpec { sink: 1, window: 0 })
        .build()
        .await
        .err()
        .expect("a default window with no recent slot");
    assert!(matches!(err, RuntimeError::InvalidConfig(_)), "{err}");
}

/// A draft naming a token past the vocabulary is cut there by the scheduler: the turn decodes
/// what plain decoding gives, instead of the whole step failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_past_the_vocabulary_is_cut_not_fatal() {
    let plain = scripted().build().await.unwrap();
    let s = plain.spawn_session(SessionConfig::default()).await.unwrap();
    let want = s
        .generate(vec![40, 41, 42], GenerateParams::greedy(12))
        .unwrap()
        .collect()
        .await
        .unwrap()
        .0;
    plain.shutdown().await.unwrap();

    let rt = scripted()
        .drafter(|| Ok(PastTheVocabulary { vocab: None }))
        .build()
        .await
        .unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let (got, _) = tokio::time::timeout(
        Duration::from_secs(10),
        s.generate(vec![40, 41, 42], GenerateParams::greedy(12))
            .unwrap()
            .collect(),
    )
    .await
    .expect("no hang")
    .expect("the turn survives a bad draft");
    assert_eq!(got, want);
    rt.shutdown().await.unwrap();
}

/// A step's timeout timer ends with its step: hundreds of steps leave no sleeping timer tasks
/// behind (each used to sleep out the whole step timeout, two minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_timers_end_with_their_steps() {
    let rt = scripted().build().await.unwrap();
    let s = rt.spawn_session(SessionConfig::default()).await.unwrap();
    s.generate(vec![40], GenerateParams::greedy(4))
        .unwrap()
        .collect()
        .await
        .unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let steps = 300;
    let (ids, _) = s
        .generate(vec![41], GenerateParams::greedy(steps))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(ids.len(), steps);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = metrics.num_alive_tasks();
    assert!(
        after < before + 20,
        "{} tasks alive after {steps} steps, {before} before",
        after
    );
    rt.shutdown().await.unwrap();
}

/// Sessions left to their default seed sample differently from the same prompt; the same explicit
/// seed samples the same tokens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_seeds_differ_between_sessions() {
    let rt = scripted().build().await.unwrap();
    let params = GenerateParams::greedy(48).with_sampling(1.5, 1.0);
    let mut outputs = Vec::new();
    for config in [
        SessionConfig::default(),
        SessionConfig::default(),
        SessionConfig::default().with_seed(7),
        SessionConfig::default().with_seed(7),
    ] {
        let s = rt.spawn_session(config).await.unwrap();
        let (ids, _) = s
            .generate(vec![40, 41], params.clone())
            .unwrap()
            .collect()
            .await
            .unwrap();
        outputs.push(ids);
    }
    assert_ne!(
        outputs[0], outputs[1],
        "two default seeds drew the same 48 tokens"
    );
    assert_eq!(
        outputs[2], outputs[3],
        "one explicit seed drew different tokens"
    );
    rt.shutdown().await.unwrap();
}

/// A window past the model's positions is refused at spawn, with both numbers, before anything is
/// reserved; the runtime's default window is checked the same way when it is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_past_the_models_positions_are_refused_at_spawn() {
    let dir = common::tiny_model(5, 1);
    let positions = troupe::engine::ModelConfig::from_file(&dir.path().join("config.json"))
        .unwrap()
        .max_position_embeddings;
    let rt = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .build()
        .await
        .unwrap();
    let past = WindowSpec::new(4, positions - 3).unwrap();
    let err = rt
        .spawn_session(SessionConfig::default().with_window(past))
        .await
        .err()
        .expect("a window past the model's positions");
    match err {
        RuntimeError::Engine(e) => assert!(
            matches!(
                *e,
                EngineError::WindowPastPositions { capacity, positions: p }
                    if capacity == positions + 1 && p == positions
            ),
            "{e}"
        ),
        other => panic!("wrong error {other}"),
    }
    assert_eq!(rt.budget().await.unwrap().used_bytes, 0);
    let fits = WindowSpec::new(4, positions - 4).unwrap();
    rt.spawn_session(SessionConfig::default().with_window(fits))
        .await
        .unwrap();
    rt.shutdown().await.unwrap();

    let err = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .default_window(past)
        .build()
        .await
        .err()
        .expect("a default window past the model's positions");
    assert!(matches!(err, RuntimeError::Engine(_)), "{err}");
}

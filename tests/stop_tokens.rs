//! How a turn ends, through the whole runtime: at the first of a set of stop tokens (the
//! session's and the turn's together), and, with `stop_after_content`, not at stop tokens that
//! open the reply. The scripted model's greedy continuation is the reference.

use std::time::Duration;

use troupe::actors::scripted::ScriptedModel;
use troupe::{GenerateParams, Runtime, RuntimeBuilder, SessionConfig};

const NEW_TOKENS: usize = 24;

async fn runtime() -> Runtime {
    RuntimeBuilder::new(|| Ok(ScriptedModel::new(Duration::ZERO)))
        .build()
        .await
        .unwrap()
}

async fn turn(
    rt: &Runtime,
    config: SessionConfig,
    prompt: &[u32],
    params: GenerateParams,
) -> Vec<u32> {
    let s = rt.spawn_session(config).await.unwrap();
    let (tokens, _) = s
        .generate(prompt.to_vec(), params)
        .unwrap()
        .collect()
        .await
        .unwrap();
    s.close().await.unwrap();
    tokens
}

/// The greedy continuation of `prompt` with no stop token.
async fn unstopped(rt: &Runtime, prompt: &[u32]) -> Vec<u32> {
    let params = GenerateParams::greedy(NEW_TOKENS);
    turn(rt, SessionConfig::default(), prompt, params).await
}

/// The continuation up to and including the first token that `ends` says ends it.
fn cut(full: &[u32], ends: impl Fn(usize, u32) -> bool) -> Vec<u32> {
    match full.iter().enumerate().position(|(i, &t)| ends(i, t)) {
        Some(p) => full[..=p].to_vec(),
        None => full.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_ends_at_the_first_of_the_session_and_turn_stop_tokens() {
    let rt = runtime().await;
    let prompt = [40, 41, 42];
    let full = unstopped(&rt, &prompt).await;
    assert_eq!(full.len(), NEW_TOKENS);
    // Two tokens from the middle of the continuation, one set by the session, one by the turn.
    let (a, b) = (full[9], full[5]);
    let config = SessionConfig::default().with_stop_tokens([a]);
    let params = GenerateParams::greedy(NEW_TOKENS).with_stop_tokens([b]);
    let stopped = turn(&rt, config, &prompt, params).await;
    assert_eq!(stopped, cut(&full, |_, t| t == a || t == b));
    assert!(stopped.len() <= 6, "{stopped:?} from {full:?}");
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stop_after_content_a_reply_that_opens_with_a_stop_token_goes_on() {
    let rt = runtime().await;
    let prompt = [50, 51, 52, 53];
    let full = unstopped(&rt, &prompt).await;
    let opener = full[0];
    // Plain stop tokens: the reply is its first token and nothing more.
    let params = GenerateParams::greedy(NEW_TOKENS).with_stop_tokens([opener]);
    let empty = turn(&rt, SessionConfig::default(), &prompt, params.clone()).await;
    assert_eq!(empty, vec![opener]);
    // After content: the opener is an ordinary token, and the turn ends at the first stop token
    // after the first token that is not one (or runs to its limit).
    let params = params.with_stop_after_content(true);
    let reply = turn(&rt, SessionConfig::default(), &prompt, params).await;
    let first_content = full.iter().position(|&t| t != opener);
    let expected = cut(&full, |i, t| {
        t == opener && first_content.is_some_and(|c| i > c)
    });
    assert_eq!(reply, expected);
    assert!(reply.len() > 1, "{reply:?} from {full:?}");
    rt.shutdown().await.unwrap();
}

//! A runtime built with a warm-up runs it on the verifier before it serves, reports every step,
//! and then serves exactly what it would have served cold.

mod common;

use std::sync::{Arc, Mutex};

use troupe::engine::{WarmUp, WarmUpProgress};
use troupe::{GenerateParams, RuntimeBuilder, SessionConfig, WindowSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_up_runtime_reports_each_step_and_serves_the_same_tokens() {
    let dir = common::tiny_model(61, 2);
    let window = WindowSpec::new(4, 32).unwrap();
    let plan = WarmUp::up_to(3, 2, 8).with_window(window);
    let seen: Arc<Mutex<Vec<WarmUpProgress>>> = Arc::default();
    let sink = seen.clone();
    let rt = RuntimeBuilder::new(common::verifier_factory(dir.path()))
        .default_window(window)
        .warm_up(
            plan.clone(),
            Arc::new(move |p| sink.lock().unwrap().push(p)),
        )
        .build()
        .await
        .unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), plan.steps(), "{seen:?}");
        assert!(seen.iter().enumerate().all(|(i, p)| p.done == i + 1));
    }
    let prompt = common::repetitive_prompts(1).remove(0);
    let session = rt.spawn_session(SessionConfig::default()).await.unwrap();
    let params = GenerateParams::greedy(12);
    let (tokens, _) = session
        .generate(prompt.clone(), params)
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(tokens, common::run_alone(dir.path(), &prompt, 12, window));
    rt.shutdown().await.unwrap();
}

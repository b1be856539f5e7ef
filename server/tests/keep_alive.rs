//! One kept-alive connection carries a session's whole life: created, a streamed turn read chunk
//! by chunk, a whole turn, its info, and its close, one response after another.

mod common;

use common::*;
use serde_json::{json, Value};
use troupe_server::client::KeepAlive;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_a_session_from_creation_to_close() {
    let s = serve().await;
    let mut c = KeepAlive::connect(s.addr).await.unwrap();
    let created = c
        .request("POST", "/v1/sessions", &[], r#"{"sink": 4, "window": 60}"#)
        .await
        .unwrap();
    assert_eq!(created.status, 200, "{}", created.body);
    let created = json(&created);
    assert_eq!(created["window"], json!({"sink": 4, "window": 60}));
    let id = created["id"].as_str().unwrap().to_string();

    let body = json!({"session": id, "prompt": [104, 105], "max_tokens": 5, "temperature": 0,
                      "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (status, _) = c
        .send("POST", "/v1/completions", &[], &body.to_string())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut raw = Vec::new();
    while let Some(chunk) = c.next_chunk().await.unwrap() {
        assert!(!chunk.is_empty());
        raw.extend(chunk);
    }
    let sse = events(&String::from_utf8(raw).unwrap());
    assert_eq!(sse.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&sse[sse.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let r = c
        .request("POST", "/v1/completions", &[], &whole.to_string())
        .await
        .unwrap();
    assert_eq!(json(&r)["usage"]["completion_tokens"], 5);
    let path = format!("/v1/sessions/{id}");
    let info = json(&c.request("GET", &path, &[], "").await.unwrap());
    assert_eq!(info["turns"], 2);
    assert_eq!(info["tokens_seen"], 2 + 5 + 2 + 5);
    let del = c.request("DELETE", &path, &[], "").await.unwrap();
    assert_eq!(json(&del)["deleted"], true);
    s.stop().await;
}

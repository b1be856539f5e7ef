//! The HTTP front over real sockets on 127.0.0.1: each endpoint, the exact SSE framing, usage on
//! and off, the errors with their statuses and codes, sessions (continued, isolated, closed),
//! stop strings, and a client that goes away cancelling its turn.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use troupe_server::ServerConfig;

fn chat(content: &str, max_tokens: usize) -> serde_json::Value {
    json!({
        "model": "troupe",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_and_metrics_answer() {
    let s = serve().await;
    let h = call(s.addr, "GET", "/health", &[], "").await;
    assert_eq!(
        (h.status, json(&h)["status"].clone()),
        (200, json!("serving"))
    );
    let m = json(&call(s.addr, "GET", "/v1/models", &[], "").await);
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "troupe");
    let metrics = call(s.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(metric(&metrics.body, "num_requests_running"), 0.0);
    assert!(metrics
        .body
        .contains("troupe:kv_budget_bytes{model_name=\"troupe\"}"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_chat_reply_has_its_length_and_usage() {
    let s = serve().await;
    let r = post(s.addr, "/v1/chat/completions", &chat("hello there", 7)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json(&r);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let prompt = "User: hello there\nAssistant:".len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], prompt + 7);
    // Greedy: the same request gives the same reply.
    let again = post(s.addr, "/v1/chat/completions", &chat("hello there", 7))
        .await
        .json();
    assert_eq!(again["choices"][0]["message"], v["choices"][0]["message"]);
    // A completion with token ids.
    let c = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": [72, 105], "max_tokens": 3, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["prompt_tokens"], 2);
    assert_eq!(c["usage"]["completion_tokens"], 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_framed_as_openai_clients_parse_it() {
    let s = serve().await;
    let mut body = chat("stream me", 5);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = events(&r.body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(c["created"].is_u64() && c["model"] == "troupe", "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let text: String = chunks[1..chunks.len() - 2]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    // The streamed text is the whole reply's.
    let whole = post(s.addr, "/v1/chat/completions", &chat("stream me", 5))
        .await
        .json();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!(null);
    let plain = events(&post(s.addr, "/v1/chat/completions", &body).await.body);
    assert!(plain.iter().all(|e| !e.contains("\"usage\"")));
    assert_eq!(plain.last().unwrap(), "[DONE]");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400s_naming_the_field() {
    let s = serve().await;
    let cases = [
        ("{not json", None, None),
        (
            r#"{"messages": [], "tools": [{}]}"#,
            Some("tools"),
            Some("unsupported_parameter"),
        ),
        (
            r#"{"messages": [{"role":"user","content":"x"}], "n": 2}"#,
            Some("n"),
            None,
        ),
        (
            r#"{"messages": [{"role":"user","content":"x"}], "max_tokens": "many"}"#,
            Some("max_tokens"),
            None,
        ),
        (
            r#"{"messages": [{"role":"user","content":"x"}], "temperature": 9}"#,
            Some("temperature"),
            None,
        ),
        (
            r#"{"messages": [{"role":"robot","content":"x"}]}"#,
            Some("messages"),
            None,
        ),
        (
            r#"{"messages": [{"role":"user","content":"x"}], "stop": ["a","b","c","d","e"]}"#,
            Some("stop"),
            None,
        ),
    ];
    for (body, param, code) in cases {
        let r = call(s.addr, "POST", "/v1/chat/completions", &[], body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = &json(&r)["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}: {e}");
        }
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{body}: {e}");
        }
    }
    // An unknown field is ignored.
    let mut body = chat("x", 2);
    body["user"] = json!("someone");
    assert_eq!(
        post(s.addr, "/v1/chat/completions", &body).await.status,
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_limits_and_unknown_sessions_have_their_statuses() {
    let config = ServerConfig {
        api_key: Some("sekrit".into()),
        ..ServerConfig::default()
    };
    let s = serve_with(Duration::from_millis(1), config, |b| {
        b.max_sessions(1).max_prompt_tokens(64)
    })
    .await;
    let auth = [("Authorization", "Bearer sekrit")];
    let no_key = call(s.addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(no_key.status, 401);
    assert_eq!(json(&no_key)["error"]["code"], "invalid_api_key");
    let bad_key = call(
        s.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer no")],
        "",
    )
    .await;
    assert_eq!(bad_key.status, 401);
    // Past the session cap: a 429 with Retry-After.
    let first = call(s.addr, "POST", "/v1/sessions", &auth, "{}").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second = call(s.addr, "POST", "/v1/sessions", &auth, "{}").await;
    assert_eq!(second.status, 429, "{}", second.body);
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(json(&second)["error"]["type"], "rate_limit_error");
    // A prompt over the limit, in the session the cap left room for.
    let id = json(&first)["id"].as_str().unwrap().to_string();
    let mut long = chat(&"y".repeat(100), 2);
    long["session"] = json!(id);
    let r = call(
        s.addr,
        "POST",
        "/v1/chat/completions",
        &auth,
        &long.to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(json(&r)["error"]["code"], "context_length_exceeded");
    // Unknown sessions.
    for path in ["/v1/sessions/999", "/v1/sessions/nope"] {
        let r = call(s.addr, "GET", path, &auth, "").await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(json(&r)["error"]["code"], "session_not_found");
    }
    let mut body = chat("x", 2);
    body["session"] = json!("999");
    let r = call(
        s.addr,
        "POST",
        "/v1/chat/completions",
        &auth,
        &body.to_string(),
    )
    .await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_context_apart_and_close() {
    let s = serve().await;
    let open = |name: &str| json!({"name": name, "system_prompt": format!("You are {name}.")});
    let a = json(&post(s.addr, "/v1/sessions", &open("A")).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = json(&post(s.addr, "/v1/sessions", &open("B")).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = json(&post(s.addr, "/v1/sessions", &open("A")).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let turn = |session: &str, content: &str| {
        let mut body = chat(content, 6);
        body["session"] = json!(session);
        body
    };
    // A and C hold the same history; B another, interleaved with them.
    let a1 = post(s.addr, "/v1/chat/completions", &turn(&a, "first"))
        .await
        .json();
    post(
        s.addr,
        "/v1/chat/completions",
        &turn(&b, "something else entirely"),
    )
    .await;
    let c1 = post(s.addr, "/v1/chat/completions", &turn(&c, "first"))
        .await
        .json();
    assert_eq!(a1["choices"][0]["message"], c1["choices"][0]["message"]);
    assert_eq!(a1["session"], a);
    // The X-Session-Id header names a session too; a continued session reports what it held.
    let body = chat("second", 6).to_string();
    let a2 = call(
        s.addr,
        "POST",
        "/v1/chat/completions",
        &[("X-Session-Id", &a)],
        &body,
    )
    .await
    .json();
    let c2 = post(s.addr, "/v1/chat/completions", &turn(&c, "second"))
        .await
        .json();
    assert_eq!(a2["choices"][0]["message"], c2["choices"][0]["message"]);
    assert!(
        a2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let info = call(s.addr, "GET", &format!("/v1/sessions/{a}"), &[], "")
        .await
        .json();
    let system = "System: You are A.\n".len() as u64;
    let first = "User: first\nAssistant:".len() as u64;
    let second = "User: second\nAssistant:".len() as u64;
    assert_eq!(info["tokens_seen"], system + first + 6 + second + 6);
    assert_eq!(info["turns"], 2);
    // Closed, the session is gone.
    let del = call(s.addr, "DELETE", &format!("/v1/sessions/{a}"), &[], "").await;
    assert_eq!(
        (del.status, json(&del)["deleted"].clone()),
        (200, json!(true))
    );
    assert_eq!(
        call(s.addr, "GET", &format!("/v1/sessions/{a}"), &[], "")
            .await
            .status,
        404
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_reply_before_it() {
    let s = serve().await;
    let body = json!({"prompt": "abc", "max_tokens": 40, "temperature": 0});
    let whole = json(&post(s.addr, "/v1/completions", &body).await);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the reply (its first occurrence there).
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[10..12].iter().collect();
    let at = text.find(&stop).unwrap();
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop.clone()]);
        b["stream"] = json!(stream);
        let r = post(s.addr, "/v1/completions", &b).await;
        let (got, reason) = if stream {
            let ev = events(&r.body);
            let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let t: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (
                t,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let v = json(&r);
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(got, text[..at], "stream: {stream}");
        assert_eq!(reason, "stop");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_away_cancel_their_turns() {
    let s = serve_with(Duration::from_millis(5), ServerConfig::default(), |b| b).await;
    let mut body = chat("go on forever", 1_000_000);
    body["stream"] = json!(true);
    let mut open_streams = Vec::new();
    for _ in 0..32 {
        let mut o = troupe_server::client::open(
            s.addr,
            "POST",
            "/v1/chat/completions",
            &[],
            &body.to_string(),
        )
        .await
        .unwrap();
        assert_eq!(o.status, 200);
        // Read until the first event has come.
        let first = troupe_server::client::next_event(&mut o.reader)
            .await
            .unwrap();
        assert!(first.is_some());
        open_streams.push(o);
    }
    let metrics = call(s.addr, "GET", "/metrics", &[], "").await.body;
    let in_flight = |m: &str| metric(m, "num_requests_running") + metric(m, "num_requests_waiting");
    assert_eq!(in_flight(&metrics), 32.0);
    drop(open_streams);
    let mut running = 32.0;
    for _ in 0..3000 {
        let m = call(s.addr, "GET", "/metrics", &[], "").await.body;
        running = in_flight(&m);
        if running == 0.0 && metric(&m, "sessions_open") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        running, 0.0,
        "turns still running 30 s after their clients left"
    );
    let stats = s.runtime.stats().await.unwrap();
    assert!(stats.emitted < 32 * 10_000, "the turns ran on: {stats:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_session_continues_its_source_and_seeds_repeat_samples() {
    let s = serve().await;
    let a = json(&post(s.addr, "/v1/sessions", &json!({"name": "A"})).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let turn = |session: &str, content: &str| {
        let mut body = chat(content, 6);
        body["session"] = json!(session);
        body
    };
    post(s.addr, "/v1/chat/completions", &turn(&a, "first")).await;
    let fork = |id: &str| {
        let path = format!("/v1/sessions/{id}/fork");
        async move { call(s.addr, "POST", &path, &[], "").await }
    };
    let f = fork(&a).await;
    assert_eq!(f.status, 200, "{}", f.body);
    let b = json(&f)["id"].as_str().unwrap().to_string();
    assert_ne!(b, a);
    assert_eq!(json(&f)["forked_from"], a);
    let info = |id: String| {
        let path = format!("/v1/sessions/{id}");
        async move { call(s.addr, "GET", &path, &[], "").await.json() }
    };
    let (ia, ib) = (info(a.clone()).await, info(b.clone()).await);
    assert_eq!(ib["tokens_seen"], ia["tokens_seen"]);
    // Both continue the same context with the same message: the same reply.
    let ra = post(s.addr, "/v1/chat/completions", &turn(&a, "second"))
        .await
        .json();
    let rb = post(s.addr, "/v1/chat/completions", &turn(&b, "second"))
        .await
        .json();
    assert_eq!(ra["choices"][0]["message"], rb["choices"][0]["message"]);
    assert_eq!(
        ra["usage"]["prompt_tokens_details"]["cached_tokens"],
        rb["usage"]["prompt_tokens_details"]["cached_tokens"],
        "the fork holds what its source held"
    );
    // A seed repeats a sampled reply on the same context; forks without one draw their own.
    let sampled = |session: &str, seed: Option<u64>| {
        let mut body = turn(session, "pick");
        body["temperature"] = json!(1.0);
        body["max_tokens"] = json!(24);
        if let Some(seed) = seed {
            body["seed"] = json!(seed);
        }
        body
    };
    let mut replies = Vec::new();
    for seed in [Some(5), Some(5), Some(6), None, None] {
        let id = json(&fork(&a).await)["id"].as_str().unwrap().to_string();
        let r = post(s.addr, "/v1/chat/completions", &sampled(&id, seed))
            .await
            .json();
        replies.push(r["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(replies[0], replies[1], "the same seed, the same reply");
    assert_ne!(replies[0], replies[2], "another seed, another reply");
    assert_ne!(replies[3], replies[4], "forks sample on their own");
    // An unknown session has no fork.
    assert_eq!(fork("424242").await.status, 404);

    // Every request so far is in the latency histograms, and the runtime's own figures are there.
    let m = call(s.addr, "GET", "/metrics", &[], "").await.body;
    let requests = 1 + 2 + 5;
    for h in [
        "time_to_first_token_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_time_per_output_token_seconds_count",
    ] {
        assert_eq!(metric(&m, h), requests as f64, "{h}");
    }
    assert!(metric(&m, "inter_token_latency_seconds_count") >= (requests * 5) as f64 / 2.0);
    assert!(metric(&m, "request_queue_time_seconds_count") >= requests as f64);
    assert!(metric(&m, "step_sequences_count") > 0.0);
    assert_eq!(metric(&m, "num_requests_waiting"), 0.0);
    assert!(m.contains("troupe:step_sequences_bucket{model_name=\"troupe\",le=\"+Inf\"}"));
    for name in ["spec_decode_num_drafts_total", "window_evictions_total"] {
        assert!(metric(&m, name) >= 0.0);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_are_rendered_with_the_models_chat_template() {
    let config = serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content.strip() + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    });
    let template = troupe_server::chat::ChatTemplate::from_tokenizer_config(&config.to_string())
        .unwrap()
        .unwrap();
    let server_config = ServerConfig {
        chat_template: Some(std::sync::Arc::new(template)),
        ..ServerConfig::default()
    };
    let s = serve_with(Duration::from_millis(1), server_config, |b| b).await;
    let body = json!({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " hi "},
        ],
        "max_tokens": 3,
    });
    let r = post(s.addr, "/v1/chat/completions", &body).await.json();
    // The byte-level tokenizer makes a token of each byte.
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(r["usage"]["prompt_tokens"], rendered.len());
    // A session's system prompt is rendered by the template too, without an assistant turn.
    let session = post(
        s.addr,
        "/v1/sessions",
        &json!({"name": "A", "system_prompt": "Be brief."}),
    )
    .await
    .json();
    let id = session["id"].as_str().unwrap();
    let info = call(s.addr, "GET", &format!("/v1/sessions/{id}"), &[], "")
        .await
        .json();
    assert_eq!(
        info["tokens_seen"],
        "<|im_start|>system\nBe brief.<|im_end|>\n".len()
    );
    s.stop().await;
}

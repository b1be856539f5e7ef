//! The request-body parsers under random input: any bytes, and mutations of valid bodies (fields
//! dropped, retyped, set to extreme values), parse to a request or to a 400 naming what is wrong;
//! never a panic. (The same bodies as the fuzz targets of the hardening work, as a bounded test.)

use proptest::prelude::*;
use serde_json::{json, Value};
use troupe_server::openai::{
    parse, parse_request, ChatRequest, CompletionRequest, Sampling, SessionRequest,
};

fn valid_bodies() -> Vec<Value> {
    vec![
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
               "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "stream": true,
               "stream_options": {"include_usage": true}, "seed": 3, "session": "1"}),
        json!({"prompt": "once", "max_tokens": 3, "n": 1, "ignore_eos": true}),
        json!({"prompt": [1, 2, 3], "stop": "x"}),
        json!({"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}]}]}),
        json!({"name": "Ferris", "system_prompt": "crab", "sink": 4, "window": 60, "seed": 1}),
    ]
}

/// Values of every JSON type, extremes included.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|x| json!(x)),
        Just(json!(1e308)),
        Just(json!(-1)),
        ".{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!([1, "a", null])),
        Just(json!({})),
        Just(json!({"content": 1})),
    ]
}

/// Every parser a request body meets; errors must be 400s with a message.
fn parse_all(body: &[u8]) {
    let results = [
        parse_request::<ChatRequest>(body).err(),
        parse_request::<CompletionRequest>(body).err(),
        parse::<Sampling>(body).err(),
        parse::<SessionRequest>(body).err(),
    ];
    for e in results.into_iter().flatten() {
        assert_eq!(e.status.as_u16(), 400, "{e}");
        assert!(!e.message.is_empty());
    }
    if let Ok((chat, _)) = parse_request::<ChatRequest>(body) {
        for m in &chat.messages {
            let _ = m.content.text();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        parse_all(&bytes);
    }

    #[test]
    fn valid_bodies_with_a_field_changed_parse_or_are_refused(
        which in 0usize..5,
        field in "[a-z_]{1,20}",
        pick in any::<prop::sample::Index>(),
        value in odd_value(),
        drop_one in any::<bool>(),
    ) {
        let mut body = valid_bodies()[which].clone();
        let map = body.as_object_mut().unwrap();
        let keys: Vec<String> = map.keys().cloned().collect();
        let key = if drop_one || keys.is_empty() { field } else { keys[pick.index(keys.len())].clone() };
        if drop_one {
            map.remove(&key);
        } else {
            map.insert(key, value);
        }
        parse_all(body.to_string().as_bytes());
    }

    #[test]
    fn truncated_valid_bodies_are_refused_cleanly(which in 0usize..5, cut in any::<prop::sample::Index>()) {
        let text = valid_bodies()[which].to_string();
        let at = cut.index(text.len());
        parse_all(&text.as_bytes()[..at]);
    }
}

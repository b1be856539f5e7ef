//! Each `troupe bench` case, run in-process on a tiny plan into a temp dir: the JSON it writes has
//! every field, with sane values. How fast anything runs is not checked here.

#[allow(dead_code)]
#[path = "../src/cli/bench.rs"]
mod bench;

use std::path::Path;
use std::time::Duration;

use bench::{batching, persona, step, Case, Env};
use serde_json::Value;
use troupe::engine::ModelConfig;

fn tiny() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").expect("preset");
    c.tie_word_embeddings = false;
    c
}

/// The JSON and the plot the case wrote, after checking the fields every case shares.
fn written(dir: &Path, case: Case) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{}.json", case.name()))).expect("json");
    let v: Value = serde_json::from_str(&text).expect("valid json");
    assert_eq!(v["case"], case.name());
    assert!(v["machine"]["cores"].as_u64().expect("cores") >= 1);
    assert_eq!(v["machine"]["device"], "cpu");
    assert!(!v["commit"].as_str().expect("commit").is_empty());
    let svg = std::fs::read_to_string(dir.join(format!("{}.svg", case.name()))).expect("svg");
    assert!(svg.starts_with("<svg"));
    v
}

fn num(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {row}"))
}

fn positive(row: &Value, key: &str) -> f64 {
    let x = num(row, key);
    assert!(x > 0.0 && x.is_finite(), "{key} = {x} in {row}");
    x
}

#[test]
fn step_case_reports_every_batch_and_draft_length() {
    let dir = tempfile::tempdir().unwrap();
    let plan = step::StepPlan {
        model: tiny(),
        batches: vec![1, 3],
        draft_lens: vec![0, 2],
        context: 16,
        warmup: 1,
        reps: 2,
        decode_tokens: 12,
        decode_draft_lens: vec![2],
    };
    step::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Step);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for (row, (b, k)) in rows.iter().zip([(1, 0), (1, 2), (3, 0), (3, 2)]) {
        assert_eq!(row["batch"], b);
        assert_eq!(row["draft_len"], k);
        positive(row, "ms_per_step");
        positive(row, "tokens_per_s");
    }
    let decode = v["decode"].as_array().expect("decode");
    let drafters: Vec<&str> = decode
        .iter()
        .map(|r| r["drafter"].as_str().unwrap())
        .collect();
    assert_eq!(drafters, ["none", "ngram", "model"]);
    for row in decode {
        positive(row, "tokens_per_s");
        assert!(num(row, "mean_accepted_per_step") >= 0.0);
        assert!(row["draft_len"].as_u64().is_some());
        assert_eq!(
            row["matches_plain"], true,
            "speculation changed the output: {row}"
        );
    }
}

#[test]
fn batching_case_reports_each_session_count_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = batching::BatchingPlan {
        model: tiny(),
        sessions: vec![1, 3],
        new_tokens: 6,
        prompt_len: 12,
        speculative: vec![false, true],
    };
    batching::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Batching);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for (row, (spec, n)) in rows
        .iter()
        .zip([(false, 1), (false, 3), (true, 1), (true, 3)])
    {
        assert_eq!(row["sessions"], n);
        assert_eq!(row["speculative"], spec);
        positive(row, "tokens_per_s");
        positive(row, "mean_token_latency_ms");
        let seqs = positive(row, "mean_step_sequences");
        assert!(
            seqs <= n as f64,
            "{seqs} sequences per step with {n} sessions"
        );
    }
}

#[test]
fn persona_case_reports_every_size_with_the_model_time_subtracted() {
    let dir = tempfile::tempdir().unwrap();
    let plan = persona::PersonaPlan {
        sizes: vec![(2, 2), (3, 1)],
        new_tokens: 3,
        delay: Duration::from_millis(20),
    };
    persona::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::PersonaStress);
    assert_eq!(v["delay_ms"], 20);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for (row, (n, m)) in rows.iter().zip([(2, 2), (3, 1)]) {
        assert_eq!(row["personas"], n);
        assert_eq!(row["messages"], m);
        assert!(num(row, "materialize_ms") >= 0.0);
        positive(row, "serve_wall_ms");
        let mean = positive(row, "mean_turn_ms");
        // Each of a turn's steps sleeps the injected delay, so a turn takes at least that long.
        assert!(mean >= 3.0 * 20.0, "{row}");
        assert!(num(row, "p99_turn_ms") <= num(row, "max_turn_ms"));
        assert!(num(row, "max_turn_ms") >= mean);
        for key in ["overhead_mean_ms", "overhead_p99_ms"] {
            let x = num(row, key);
            assert!((0.0..mean).contains(&x), "{key} = {x} in {row}");
        }
        assert_eq!(num(row, "mean_steps_per_turn"), 3.0);
    }
}

//! Each `troupe bench` case, run in-process on a tiny plan into a temp dir: the JSON it writes has
//! every field, with sane values. How fast anything runs is not checked here.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use troupe::engine::ModelConfig;
use troupe_bench::models::{preset_dir, ModelChoice};
use troupe_bench::{batching, capacity, kernels, persona, rtt, serve, soak, spec, step, Case, Env};

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
        capacities: vec![16, 40],
        warmup: 1,
        reps: 2,
        decode_tokens: 12,
        decode_draft_lens: vec![2],
        prompt: 24,
    };
    step::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Step);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 8);
    let shapes = [16, 40]
        .into_iter()
        .flat_map(|c| [(c, 1, 0), (c, 1, 2), (c, 3, 0), (c, 3, 2)]);
    for (row, (c, b, k)) in rows.iter().zip(shapes) {
        assert_eq!(row["capacity"], c);
        assert_eq!(row["batch"], b);
        assert_eq!(row["draft_len"], k);
        positive(row, "ms_per_step");
        positive(row, "tokens_per_s");
    }
    positive(&v["prefill"], "tokens_per_s");
    assert_eq!(v["prefill"]["tokens"], 16);
    positive(&v["prompt"], "tokens_per_s");
    assert_eq!(v["prompt"]["tokens"], 24);
    assert!(num(&v, "peak_rss_bytes") > 1e6);
    assert_eq!(v["model_choice"], "default");
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
        positive(row, "runtime_us_per_session_step");
    }
}

#[test]
fn soak_samples_memory_and_comes_back_to_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = soak::SoakPlan::with(0.05, 6).unwrap();
    plan.sample_every = Duration::from_millis(750);
    soak::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Soak);
    assert_eq!(v["sessions"], 6);
    assert_eq!(v["clients"], 7); // a twentieth more than the cap, rounded up
    let samples = v["samples"].as_array().expect("samples");
    assert!(samples.len() >= 4, "{v}");
    assert!(samples.iter().all(|s| num(s, "rss_bytes") > 0.0));
    assert!(num(&v, "turns") > 0.0, "{v}");
    assert_eq!(num(&v, "unexpected_errors"), 0.0, "{}", v["errors"]);
    // Seven clients for six seats: some were refused, and tried again.
    assert!(
        num(&v["errors"], "AdmissionRefused") > 0.0,
        "{}",
        v["errors"]
    );
    assert_eq!(v["kv_back_to_baseline"], true, "{v}");
    assert_eq!(v["tasks_back_to_baseline"], true, "{v}");
}

#[test]
fn agent_capacity_counts_the_clients_admission_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = capacity::CapacityPlan::new(true).unwrap();
    plan.light = vec![1, 3];
    plan.heavy = vec![1, 2];
    plan.light_prompt = 8;
    plan.heavy_prompt = 200;
    plan.new_tokens = 3;
    plan.heavy_window = troupe::WindowSpec::new(4, 252).unwrap();
    plan.light_window = troupe::WindowSpec::new(4, 124).unwrap();
    // Keys and values of every layer in f32 on the CPU, for 128 and 256 slots.
    let c = ModelConfig::from_file(&plan.models.verifier.join("config.json")).unwrap();
    let per_light = (2 * c.num_layers * c.num_kv_heads * c.head_dim * 128 * 4) as u64;
    // Room for exactly two light sessions, or one heavy one (twice the slots).
    plan.kv_budget_bytes = 2 * per_light + per_light / 2;
    capacity::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::AgentCapacity);
    let rows = v["rows"].as_array().expect("rows");
    let expect = [
        ("light", 1, 0),
        ("light", 3, 1),
        ("heavy", 1, 0),
        ("heavy", 2, 1),
    ];
    assert_eq!(rows.len(), expect.len());
    for (row, (mode, n, errors)) in rows.iter().zip(expect) {
        assert_eq!(row["mode"], mode, "{row}");
        assert_eq!(row["sessions"], n, "{row}");
        assert_eq!(row["errors"], errors, "{row}");
        assert_eq!(row["over"], "inproc");
        let kinds = if errors > 0 {
            json!({"refused": errors})
        } else {
            json!({})
        };
        assert_eq!(row["error_kinds"], kinds, "{row}");
        for key in [
            "create_ms_p50",
            "create_ms_p99",
            "first_token_ms_p50",
            "generate_ms_p50",
            "generate_ms_p99",
        ] {
            positive(row, key);
        }
        assert!(num(row, "create_ms_p50") <= num(row, "create_ms_p99"));
        assert!(num(row, "generate_ms_p50") <= num(row, "generate_ms_p99"));
        assert!(num(row, "rss_bytes") > 1e6, "{row}");
        let per = num(row, "kv_bytes_per_session");
        let slots = if mode == "light" { 1 } else { 2 };
        assert_eq!(per, (slots * per_light) as f64);
        assert_eq!(num(row, "node_kv_bound_bytes"), per * n as f64);
    }
    assert_eq!(v["max_sessions_zero_errors"]["light"], 1);
    assert_eq!(v["max_sessions_zero_errors"]["heavy"], 1);
}

#[test]
fn rtt_sweep_reports_both_modes_at_every_round_trip_and_stays_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = rtt::RttPlan::new(true);
    plan.rtts_ms = vec![0, 20];
    plan.prompts = 1;
    plan.new_tokens = 16;
    rtt::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::RttSweep);
    positive(&v, "ar_tokens_per_s");
    let ar_runs = v["ar_runs_tokens_per_s"].as_array().expect("plain runs");
    assert_eq!(
        ar_runs.len(),
        6,
        "plain decoding before each of the three runs per round trip"
    );
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for (i, (row, (rtt, pipelined))) in rows
        .iter()
        .zip([(0, true), (0, false), (20, true), (20, false)])
        .enumerate()
    {
        assert_eq!(row["rtt_ms"], rtt);
        assert_eq!(row["pipelined"], pipelined);
        let tps = positive(row, "tokens_per_s");
        let speedup = positive(row, "speedup_vs_ar");
        // Over the plain run measured right before it (three runs per round trip: pipelined,
        // serial, adaptive).
        let ar = ar_runs[3 * (i / 2) + i % 2]
            .as_f64()
            .expect("plain tokens/s");
        assert!(
            (speedup - tps / ar).abs() < 1e-9 * speedup.max(1.0),
            "{row}"
        );
        assert!(num(row, "mean_accepted_per_block") >= 0.0);
        assert_eq!(row["matches_ar"], true, "{row}");
    }
    // With a 20 ms round trip per block and every step waiting for its draft, 16 tokens take at
    // least three blocks after the prefill (five tokens at most each): 60 ms or more.
    let serial_20 = num(&rows[3], "tokens_per_s");
    assert!(serial_20 <= 16.0 / (3.0 * 0.020), "{serial_20}");
    assert_eq!(
        v["adaptive_rows"].as_array().expect("adaptive rows").len(),
        2
    );
    for mode in ["pipelined", "serial"] {
        let rtt = num(&v["break_even_rtt_ms"], mode);
        assert!(rtt >= 0.0 && rtt.is_finite(), "{mode}: {rtt}");
        let steps = num(&v["break_even_in_ar_steps"], mode);
        assert!(
            (steps - rtt / num(&v, "ar_step_ms")).abs() < 1e-6,
            "{mode}: {steps}"
        );
    }
}

#[test]
fn break_even_is_interpolated_or_extrapolated_where_speedup_crosses_one() {
    let (r, how) = rtt::break_even(&[(0.0, 2.0), (10.0, 1.5), (30.0, 0.5)]);
    assert_eq!(how, "interpolated");
    assert!((r - 20.0).abs() < 1e-9, "{r}");
    // Never below 1 within the sweep: 1/speedup is linear in the round trip past the knee.
    let (r, how) = rtt::break_even(&[(0.0, 2.0), (10.0, 2.0), (20.0, 1.25)]);
    assert_eq!(how, "extrapolated");
    // 1/s goes 0.5 -> 0.8 over 10 ms: it reaches 1 after 20/3 ms more.
    assert!((r - (20.0 + 20.0 / 3.0)).abs() < 1e-9, "{r}");
    assert_eq!(
        rtt::break_even(&[(0.0, 0.9), (5.0, 0.5)]),
        (0.0, "slower at every round trip")
    );
}

#[test]
fn spec_speedup_reports_each_drafter_and_length_with_plain_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = spec::SpecPlan::new(true);
    plan.prompts = 1;
    plan.new_tokens = 16;
    spec::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::SpecSpeedup);
    let ar = positive(&v, "ar_tokens_per_s");
    let rows = v["rows"].as_array().expect("rows");
    let mut expect = Vec::new();
    for d in ["ngram", "model", "block"] {
        for k in [json!(2), json!(4), json!(8), json!("adaptive")] {
            expect.push((d, k));
        }
    }
    assert_eq!(rows.len(), expect.len());
    for (row, (d, k)) in rows.iter().zip(expect) {
        assert_eq!(row["drafter"], d);
        assert_eq!(row["draft_len"], k);
        let tps = positive(row, "tokens_per_s");
        assert!((num(row, "speedup_vs_ar") - tps / ar).abs() < 1e-9 * tps.max(1.0));
        let per_step = num(row, "mean_accepted_per_step");
        let cap = k.as_f64().unwrap_or(8.0);
        assert!((0.0..=cap).contains(&per_step), "{row}");
        assert!(num(row, "accepted") <= num(row, "drafted"));
        assert_eq!(row["matches_ar"], true, "{row}");
    }
    // The draft model was trained on the same text as the verifier, the block drafter on the
    // verifier's own continuations of it: both get drafts accepted.
    for d in ["model", "block"] {
        let accepted: f64 = rows
            .iter()
            .filter(|r| r["drafter"] == d)
            .map(|r| num(r, "accepted"))
            .sum();
        assert!(accepted > 0.0, "{d}");
    }
    // The step costs: a verify step and each drafter's block at every draft length.
    let costs = v["step_costs"].as_array().expect("step_costs");
    assert_eq!(costs.len(), 3);
    for c in costs {
        assert!(num(c, "verify_ms") > 0.0, "{c}");
        let drafts = c["draft_ms"].as_array().expect("draft_ms");
        let names: Vec<&str> = drafts.iter().map(|d| d[0].as_str().unwrap()).collect();
        assert_eq!(names, ["ngram", "model", "block"]);
        // Models draft in measurable time.
        assert!(
            drafts[1][1].as_f64().unwrap() > 0.0 && drafts[2][1].as_f64().unwrap() > 0.0,
            "{c}"
        );
    }
}

#[test]
fn kernels_case_reports_every_kernel_and_shape_beside_burn() {
    let dir = tempfile::tempdir().unwrap();
    let plan = kernels::KernelsPlan::new(true);
    kernels::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Kernels);
    positive(&v, "copy_gb_s");
    let rows = v["rows"].as_array().expect("rows");
    // The CPU has an attention kernel: its rows come too, then greedy and sampled acceptance.
    assert_eq!(
        rows.len(),
        3 * plan.rows.len() + plan.chain_rows.len() + plan.attention_queries.len() + 2
    );
    for r in rows {
        for key in ["ms", "gb_s", "burn_ms", "floor_ms"] {
            positive(r, key);
        }
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["dtype"], "f32");
        // GB/s is the bytes over the kernel's time, and the floor is the same bytes at copy speed.
        let ratio = num(r, "gb_s") * num(r, "ms") / (num(&v, "copy_gb_s") * num(r, "floor_ms"));
        assert!((ratio - 1.0).abs() < 1e-6, "gb_s and floor disagree in {r}");
    }
    let kinds: Vec<&str> = rows.iter().map(|r| r["kernel"].as_str().unwrap()).collect();
    for k in [
        "linear",
        "linear+residual",
        "swiglu",
        "chain2",
        "pooled_attention",
        "greedy_accept",
        "sampled_accept",
    ] {
        assert!(kinds.contains(&k), "{k} missing");
    }
    let a = plan.accept;
    let accept = format!("{}x{}x{}", a.blocks, a.drafts + 1, a.vocab);
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["greedy_accept", "sampled_accept"]
    );
    assert!(rows[rows.len() - 2..].iter().all(|r| r["shape"] == accept));
    for (r, m) in rows.iter().zip(plan.rows.iter().flat_map(|&m| [m; 3])) {
        assert_eq!(
            r["shape"],
            format!("{m}x{}x{}", plan.product.0, plan.product.1)
        );
    }
}

/// `--model DIR`: the step case runs the directory's model, with the plan for real shapes, and
/// says so in its report.
#[test]
fn step_case_runs_a_model_directory() {
    let (model, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache = model.path().join("cache");
    let dir = preset_dir("tiny", &cache).unwrap();
    let choice = ModelChoice::from_args(Some(dir.clone()), None).unwrap();
    let config = choice.config(&step::bench_model()).unwrap();
    assert_eq!(
        config.hidden_size,
        ModelConfig::preset("tiny").unwrap().hidden_size
    );
    let mut plan = step::StepPlan::for_model(true, config);
    plan.capacities = vec![128, 160];
    plan.reps = 1;
    step::run(
        &plan,
        &Env::new(out.path(), "cpu").unwrap().with_model(choice),
    )
    .unwrap();
    let v = written(out.path(), Case::Step);
    assert_eq!(v["model_choice"], dir.display().to_string());
    assert_eq!(v["model"]["hidden"], 64);
    assert_eq!(v["rows"].as_array().expect("rows").len(), 8);
    assert!(v["decode"].as_array().expect("decode").is_empty());
}

/// A preset is written once, complete, and found again; unknown presets and two models at once
/// are refused.
#[test]
fn presets_are_written_once_to_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let dir = preset_dir("tiny", cache.path()).unwrap();
    let weights = dir.join("model.safetensors");
    let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(config.vocab_size, 256);
    assert_eq!(preset_dir("tiny", cache.path()).unwrap(), dir);
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        written
    );
    let leftovers = std::fs::read_dir(dir.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no partial directory is left behind");
    assert!(ModelChoice::from_args(None, Some("qwen9-70b".into())).is_err());
    assert!(ModelChoice::from_args(Some(dir), Some("tiny".into())).is_err());
}

#[test]
fn serve_case_measures_the_front_beside_in_process_turns() {
    let dir = tempfile::tempdir().unwrap();
    let plan = serve::ServePlan {
        streams: vec![1, 3],
        requests: 2,
        ..serve::ServePlan::new(true)
    };
    serve::run(&plan, &Env::new(dir.path(), "cpu").unwrap()).unwrap();
    let v = written(dir.path(), Case::Serve);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "both modes at each stream count");
    for row in rows {
        assert!(["http", "in-process"].contains(&row["mode"].as_str().unwrap()));
        positive(row, "requests_per_s");
        let p50 = positive(row, "ttft_p50_ms");
        assert!(num(row, "ttft_p99_ms") >= p50, "{row}");
        assert!(num(row, "latency_p50_ms") >= p50, "{row}");
        // Every request generated its tokens: 16 each.
        let per_request = num(row, "tokens_per_s") / num(row, "requests_per_s");
        assert!((per_request - 16.0).abs() < 0.01, "{row}");
    }
}

//! `troupe bench agent-capacity --over http|grpc` end to end on the shipped demo verifier: the
//! binary starts its own `troupe serve` on loopback, every client gets its session and its turn
//! over a connection of its own, and the report is written beside the in-process one, not over it.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs a small ramp over `over` and returns the report it wrote.
fn bench_over(over: &str) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(&root)
        .args(["bench", "agent-capacity", "--quick", "--over", over])
        .args(["--light", "1,16", "--heavy", "1", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!out.path().join("agent-capacity.json").exists());
    let name = format!("agent-capacity-{over}");
    assert!(out.path().join(format!("{name}.svg")).exists());
    let text = std::fs::read_to_string(out.path().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn num(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {row}"))
}

fn check(v: &Value, over: &str) {
    assert_eq!(v["over"], over);
    let rows = v["rows"].as_array().unwrap();
    let shape: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r["mode"].as_str().unwrap(), r["sessions"].as_u64().unwrap()))
        .collect();
    assert_eq!(shape, [("light", 1), ("light", 16), ("heavy", 1)]);
    for row in rows {
        assert_eq!(row["over"], over);
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["error_kinds"], serde_json::json!({}), "{row}");
        let create = num(row, "create_ms_p50");
        let first = num(row, "first_token_ms_p50");
        assert!(create > 0.0 && first > 0.0, "{row}");
        assert!(num(row, "generate_ms_p50") >= first, "{row}");
        assert!(num(row, "generate_ms_p99") >= num(row, "generate_ms_p50"));
        // The server is a process of its own, with the model in it.
        assert!(num(row, "server_rss_bytes") > 1e6, "{row}");
        assert!(num(row, "server_peak_rss_bytes") >= num(row, "server_rss_bytes"));
        assert!(num(row, "kv_bytes_per_session") > 0.0, "{row}");
    }
    // A heavy session's window is bigger than a light one's.
    assert!(num(&rows[2], "kv_bytes_per_session") > num(&rows[0], "kv_bytes_per_session"));
    assert_eq!(v["max_sessions_zero_errors"]["light"], 16);
}

#[test]
fn agent_capacity_over_http_serves_every_client() {
    check(&bench_over("http"), "http");
}

#[test]
fn agent_capacity_over_grpc_serves_every_client() {
    check(&bench_over("grpc"), "grpc");
}

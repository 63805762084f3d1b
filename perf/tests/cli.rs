//! The harness runs end to end and its JSON lines have exactly the keys the
//! goal checker and the issue name.

use std::collections::BTreeSet;
use std::process::Command;

const PERF: &str = env!("CARGO_BIN_EXE_nefele-perf");

/// What a successful run of `nefele-perf args` printed.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(PERF)
        .args(args)
        .output()
        .expect("run nefele-perf");
    assert!(
        out.status.success(),
        "nefele-perf {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn run(args: &[&str]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    stdout_of(args)
        .lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("not a JSON object line: {l:?} ({other:?})"),
        })
        .collect()
}

fn keys(m: &serde_json::Map<String, serde_json::Value>) -> BTreeSet<&str> {
    m.keys().map(String::as_str).collect()
}

#[test]
fn latency_json_lines_have_exactly_the_documented_keys() {
    let rows = run(&[
        "latency",
        "--quick",
        "--json",
        "--sizes",
        "64",
        "--transports",
        "floor,fabric-shm,fabric-inproc,tcp,uds",
    ]);
    let want: BTreeSet<&str> = [
        "bench",
        "transport",
        "size",
        "placement",
        "p50_ns",
        "p99_ns",
        "p999_ns",
        "n",
    ]
    .into();
    // floor, fabric-shm, fabric-inproc: cross-core; tcp and uds: both placements.
    assert_eq!(rows.len(), 7, "{rows:?}");
    for r in &rows {
        assert_eq!(keys(r), want);
        assert_eq!(r["bench"], "latency");
        assert_eq!(r["size"], 64);
        let (p50, p99, p999) = (
            r["p50_ns"].as_u64().unwrap(),
            r["p99_ns"].as_u64().unwrap(),
            r["p999_ns"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p99 && p99 <= p999, "{r:?}");
        assert!(r["n"].as_u64().unwrap() >= 1000);
    }
    let placements: BTreeSet<_> = rows
        .iter()
        .map(|r| {
            (
                r["transport"].as_str().unwrap(),
                r["placement"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        placements.contains(&("tcp", "same-core"))
            && placements.contains(&("fabric-shm", "cross-core"))
    );
}

#[test]
fn throughput_json_lines_have_exactly_the_documented_keys() {
    let rows = run(&[
        "throughput",
        "--quick",
        "--json",
        "--sizes",
        "4096",
        "--transports",
        "fabric-shm,uds",
    ]);
    let want: BTreeSet<&str> = [
        "bench",
        "transport",
        "size",
        "placement",
        "msgs_per_sec",
        "bytes_per_sec",
        "n",
    ]
    .into();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert_eq!(keys(r), want);
        let (m, b) = (
            r["msgs_per_sec"].as_f64().unwrap(),
            r["bytes_per_sec"].as_f64().unwrap(),
        );
        assert!(m > 0.0);
        assert!(
            (b / m - 4096.0).abs() < 1e-6 * b,
            "bytes/s must be msgs/s × size"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let out = Command::new(PERF)
        .args(["latency", "--sizes", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sizes must be between 1"));
    let out = Command::new(PERF)
        .args(["latency", "--transports", "carrier-pigeon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
}

#[test]
fn the_table_shows_the_spread_of_the_rounds_around_the_result() {
    let table = stdout_of(&[
        "latency",
        "--quick",
        "--transports",
        "floor",
        "--sizes",
        "64",
        "--rounds",
        "3",
    ]);
    let row = table
        .lines()
        .find(|l| l.starts_with("floor"))
        .unwrap_or_else(|| panic!("no floor row in {table:?}"));
    // "... p50 120 ns ... rounds' p50 110-130 ns"
    let cols: Vec<&str> = row.split_whitespace().collect();
    let after = |word: &str| {
        let i = cols.iter().position(|c| *c == word).expect(word);
        cols[i + 1]
    };
    let p50: u64 = after("p50").parse().expect("p50");
    let (lo, hi) = cols[cols.len() - 2].split_once('-').expect("lo-hi");
    let (lo, hi): (u64, u64) = (lo.parse().expect("lo"), hi.parse().expect("hi"));
    assert!(
        cols[cols.len() - 3] == "p50" && lo <= p50 && p50 <= hi,
        "the merged p50 lies within its rounds' p50s: {row}"
    );
}

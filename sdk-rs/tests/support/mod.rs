//! Shared by the SDKs' integration tests (sdk-c's include it by path).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};

/// A child process that is killed and reaped even if the test fails.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a Monte Carlo sample's main program under `nefele run` (the
/// workspace's CLI, next to the test binaries in `target/<profile>`) with
/// 32 workers × 200,000 points, 4 in flight, and checks its estimate of pi
/// (within 0.01) and that the printer counted every worker.
pub fn run_pi_sample(nefele: &Path, main: &[&std::ffi::OsStr]) {
    assert!(
        nefele.exists(),
        "{} is missing: run `cargo test --workspace` (it builds the nefele CLI)",
        nefele.display()
    );
    let out = Command::new(nefele)
        .arg("run")
        .args(main)
        .args(["32", "200000", "4"])
        .output()
        .expect("nefele run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("pi ~= "))
        .unwrap_or_else(|| panic!("no estimate in: {stdout}"));
    let pi: f64 = line["pi ~= ".len()..]
        .split_whitespace()
        .next()
        .expect("a number")
        .parse()
        .expect("a number");
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "{line}");
    assert!(line.contains("from 6400000 points in 32 workers"), "{line}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("printer: "))
            .count(),
        32,
        "the printer saw every worker's count"
    );
}

//! The seed's Monte Carlo sample on the Rust SDK, under `nefele run` (an
//! embedded single node). Uses the workspace's `nefele` CLI, built beside
//! this test by `cargo test --workspace`.

use std::process::Command;

#[test]
fn the_rust_sample_estimates_pi_on_one_node() {
    let sample = env!("CARGO_BIN_EXE_nefele-montecarlo");
    let nefele = std::path::Path::new(sample).with_file_name("nefele");
    assert!(
        nefele.exists(),
        "{} is missing: run `cargo test --workspace` (it builds the nefele CLI)",
        nefele.display()
    );
    let out = Command::new(&nefele)
        .args(["run", sample, "main", "32", "200000", "4"])
        .output()
        .unwrap();
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
        .unwrap()
        .parse()
        .unwrap();
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "{line}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("printer: "))
            .count(),
        32
    );
}

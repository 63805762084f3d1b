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

/// A test cluster from `ci/cluster.sh up N` (network namespaces; needs
/// root), torn down when dropped, also when the test fails.
pub struct Cluster {
    pub nefele: std::path::PathBuf,
    /// How long the nodes took to see each other, as the script reported.
    pub formed_ms: u64,
}

pub const CLUSTER_STATE: &str = "/run/nefele-cluster";

impl Cluster {
    pub fn up(n: u32, nefele: &Path) -> Cluster {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the test cluster needs root (network namespaces); CI runs as root"
        );
        assert!(
            nefele.exists(),
            "{} is missing: build the workspace first (ci/test.sh does)",
            nefele.display()
        );
        let mut c = Cluster {
            nefele: nefele.to_path_buf(),
            formed_ms: 0,
        };
        let up = c.script(&["up", &n.to_string()]);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        assert!(up.status.success(), "cluster.sh up {n}: {out}");
        c.formed_ms = out
            .split("formed in ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no formation time in: {out}"));
        c
    }

    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/cluster.sh"))
            .args(args)
            .env("NEFELE_BIN", &self.nefele)
            .output()
            .expect("bash")
    }

    /// `program ARGS` as a process of node `i`: in its network and mount
    /// namespaces (so it sees the node's private files), talking to its
    /// fabricd. `program` is an absolute path.
    pub fn on_node_of(i: u32, program: &Path) -> Command {
        assert!(program.is_absolute(), "{}", program.display());
        let mut c = Command::new("nsenter");
        c.args(["-t", &Self::pid_of(i).to_string(), "-n", "-m", "--"])
            .arg(program)
            .env(
                "NEFELE_FABRICD_SOCKET",
                format!("{CLUSTER_STATE}/n{i}/fabricd.sock"),
            )
            .stdin(std::process::Stdio::null());
        c
    }

    /// Copies `program` into node `i`'s private directory (a tmpfs only
    /// that node's daemons see) and returns its path there.
    pub fn put_on_node(&self, i: u32, program: &Path) -> std::path::PathBuf {
        let name = program.file_name().expect("a file name");
        let inside = Path::new(CLUSTER_STATE).join("local").join(name);
        let via = format!("/proc/{}/root{}", Self::pid_of(i), inside.display());
        std::fs::copy(program, &via).unwrap_or_else(|e| panic!("{via}: {e}"));
        inside
    }

    /// The pid of node `i`'s daemon process.
    pub fn daemon_pid(&self, i: u32) -> i32 {
        Self::pid_of(i)
    }

    fn pid_of(i: u32) -> i32 {
        std::fs::read_to_string(format!("{CLUSTER_STATE}/n{i}/pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

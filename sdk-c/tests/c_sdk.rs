//! libnefele from C: its error paths, and the seed's Monte Carlo sample
//! on an embedded single node. Needs a C compiler and make (ci/setup.sh
//! installs them) and the workspace's `nefele` binary, built beside this
//! test by `cargo test --workspace`.

use std::path::PathBuf;
use std::process::Command;

#[path = "../../sdk-rs/tests/support/mod.rs"]
mod support;

/// `target/<profile>`, where libnefele.so and the nefele CLI are.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

fn nefele() -> PathBuf {
    let p = target_dir().join("nefele");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (it builds the nefele CLI)",
        p.display()
    );
    p
}

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// `target/<profile>/libnefele.so`, which `cargo test` alone does not build.
fn lib_dir() -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libnefele.so").exists(),
        "{} is missing: run `cargo build --workspace` with the tests' profile first (ci/test.sh does: --profile ci)",
        lib.join("libnefele.so").display()
    );
    lib
}

fn compile(source: &str, out: &std::path::Path) {
    let lib = lib_dir();
    let st = Command::new("cc")
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
        ])
        .arg(include_dir())
        .arg("-o")
        .arg(out)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(source))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lnefele")
        .status()
        .expect("cc");
    assert!(st.success(), "compiling {source} failed");
}

#[test]
fn null_and_malformed_arguments_are_errors_offline_and_online() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("api_errors");
    compile("tests/c/api_errors.c", &exe);
    let off = Command::new(&exe)
        .env("NEFELE_FABRICD_SOCKET", dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(
        off.status.success(),
        "offline: {}{}",
        String::from_utf8_lossy(&off.stdout),
        String::from_utf8_lossy(&off.stderr)
    );
    let on = Command::new(nefele())
        .arg("run")
        .arg(&exe)
        .arg("online")
        .output()
        .unwrap();
    assert!(
        on.status.success(),
        "online: {}{}",
        String::from_utf8_lossy(&on.stdout),
        String::from_utf8_lossy(&on.stderr)
    );
    assert!(String::from_utf8_lossy(&on.stdout).contains("ok (online)"));
}

/// Builds the C sample into a fresh directory.
fn build_sample() -> tempfile::TempDir {
    let build = tempfile::tempdir().unwrap();
    let st = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/montecarlo"))
        .arg(format!("NEFELE_LIB={}", lib_dir().display()))
        .arg(format!("NEFELE_INCLUDE={}", include_dir().display()))
        .arg(format!("BUILD={}", build.path().display()))
        .status()
        .expect("make");
    assert!(st.success(), "building the sample failed");
    build
}

#[test]
fn the_seeds_monte_carlo_sample_estimates_pi_on_one_node() {
    let build = build_sample();
    support::run_pi_sample(
        &nefele(),
        &[build.path().join("montecarlo_main").as_os_str()],
    );
}

/// `tests/c/node_lost.c` on node 1 of the running 3-node cluster: its
/// processes on node 3 end with `NEFELE_WNODELOST` once node 3's daemon
/// is killed (SIGKILL), those elsewhere are killed with `nefele_kill`.
fn a_lost_node_is_reported_to_c(cluster: &support::Cluster) {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("node_lost");
    compile("tests/c/node_lost.c", &exe);
    let mut child = support::Cluster::on_node_of(1, &exe)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node_lost");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("spawned "), "{line:?}");
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cluster.daemon_pid(3)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Bounded: the failure-detection bound is a few seconds.
    let deadline = t0 + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("node_lost still waiting 60 s after node 3 was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    eprintln!(
        "node 3 killed; C saw its processes lost after {:?}",
        t0.elapsed()
    );
    assert!(status.success(), "{line}{rest}");
    assert_eq!(rest.trim(), "ok");
}

/// The C sample on a 3-node namespace cluster (`ci/cluster.sh`; needs
/// root): main runs on node 1, the printer wherever placement puts it, the
/// workers spread over all three nodes — read back from the global pids
/// `nefele_n_spawn` returned, which main prints per node — and the
/// estimate is within 0.01. The sample's programs exist on node 1 only
/// (its private directory): the other nodes get them by binary shipping.
/// (libnefele.so itself is found on the filesystem the nodes share.)
/// Then node 3 is lost under a C program waiting for processes there.
#[test]
fn the_seeds_monte_carlo_sample_runs_on_three_nodes() {
    let build = build_sample();
    let cluster = support::Cluster::up(3, &nefele());
    let programs: Vec<PathBuf> = ["montecarlo_main", "montecarlo_printer", "montecarlo_worker"]
        .iter()
        .map(|p| cluster.put_on_node(1, &build.path().join(p)))
        .collect();
    for p in &programs {
        assert!(!p.exists(), "{} is visible outside node 1", p.display());
    }
    let t0 = std::time::Instant::now();
    let out = support::Cluster::on_node_of(1, &programs[0])
        .args(["32", "200000", "4"])
        .output()
        .expect("montecarlo_main");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("3-node pi in {:?}: {stdout}", t0.elapsed());
    let pi: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pi ~= "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no estimate in: {stdout}"));
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "{stdout}");
    let placement = stdout
        .lines()
        .find_map(|l| l.strip_prefix("workers per node:"))
        .unwrap_or_else(|| panic!("no placement in: {stdout}"));
    let per_node: Vec<(u32, u32)> = placement
        .split_whitespace()
        .map(|kv| {
            let (n, k) = kv.split_once(':').expect("node:count");
            (n.parse().expect("node"), k.parse().expect("count"))
        })
        .collect();
    for node in 1..=3 {
        assert!(
            per_node.iter().any(|&(n, k)| n == node && k > 0),
            "no worker ran on node {node}: {placement}"
        );
    }
    assert_eq!(
        per_node.iter().map(|(_, k)| k).sum::<u32>(),
        32,
        "{placement}"
    );
    // Nodes 2 and 3 ran the worker from their caches.
    let worker = std::fs::read(build.path().join("montecarlo_worker")).unwrap();
    for node in 2..=3 {
        let cache = format!("{}/n{node}/cache", support::CLUSTER_STATE);
        let shipped = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{cache}: {e}"))
            .any(|e| std::fs::read(e.unwrap().path()).is_ok_and(|b| b == worker));
        assert!(
            shipped,
            "node {node} has no shipped copy of the worker in {cache}"
        );
    }
    a_lost_node_is_reported_to_c(&cluster);
    drop(cluster);
}

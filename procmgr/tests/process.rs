//! procmgrd on an embedded single node, driven through its client.

use std::time::{Duration, Instant};

use procmgr::client::{ProcClient, ProcError};
use procmgr::pid::GlobalPid;

struct Node {
    daemon: fabric::daemon::Daemon,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fabric::daemon::Config {
        socket_path: dir.path().join("fabricd.sock"),
        ..Default::default()
    };
    let daemon = fabric::daemon::Daemon::start(cfg).unwrap();
    procmgr::daemon::ProcMgr::open(daemon.socket_path())
        .unwrap()
        .spawn_thread()
        .unwrap();
    Node { daemon, _dir: dir }
}

fn client(n: &Node) -> ProcClient {
    ProcClient::open_at(n.daemon.socket_path()).unwrap()
}

fn sh(c: &mut ProcClient, script: &str) -> GlobalPid {
    c.spawn(
        "/bin/sh",
        &["sh".into(), "-c".into(), script.into()],
        &[],
        1,
    )
    .unwrap()[0]
}

#[test]
fn waitpid_returns_exit_codes_and_signals() {
    let n = node();
    let mut c = client(&n);
    let p = sh(&mut c, "exit 7");
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert_eq!(e.pid, p);
    assert!(
        libc::WIFEXITED(e.status) && libc::WEXITSTATUS(e.status) == 7,
        "{:#x}",
        e.status
    );

    let p = sh(&mut c, "kill -SEGV $$");
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert!(
        libc::WIFSIGNALED(e.status) && libc::WTERMSIG(e.status) == libc::SIGSEGV,
        "{:#x}",
        e.status
    );
}

#[test]
fn kill_delivers_the_signal() {
    let n = node();
    let mut c = client(&n);
    let p = sh(&mut c, "sleep 30");
    assert_eq!(
        c.wait(Some(p), true).unwrap(),
        None,
        "WNOHANG on a running process"
    );
    let t0 = Instant::now();
    c.kill(p, libc::SIGTERM).unwrap();
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert!(
        libc::WIFSIGNALED(e.status) && libc::WTERMSIG(e.status) == libc::SIGTERM,
        "{:#x}",
        e.status
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(c.kill(p, libc::SIGKILL), Err(ProcError::NoProcess(_))),
        "a reaped pid is gone"
    );
    assert!(matches!(
        c.kill(GlobalPid(12345), 9),
        Err(ProcError::NoProcess(_))
    ));
}

#[test]
fn waitpid_any_child_and_nothing_to_wait_for() {
    let n = node();
    let mut c = client(&n);
    assert!(matches!(c.wait(None, false), Err(ProcError::NoChild(_))));
    let pids = c
        .spawn(
            "/bin/sh",
            &["sh".into(), "-c".into(), "exit 3".into()],
            &[],
            5,
        )
        .unwrap();
    assert_eq!(pids.len(), 5);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let e = c.wait(None, false).unwrap().unwrap();
        assert_eq!(libc::WEXITSTATUS(e.status), 3);
        seen.push(e.pid);
    }
    seen.sort();
    let mut want = pids.clone();
    want.sort();
    assert_eq!(seen, want, "each child is reported exactly once");
    assert!(matches!(c.wait(None, true), Err(ProcError::NoChild(_))));
}

#[test]
fn children_of_one_caller_are_not_anothers() {
    let n = node();
    let mut a = client(&n);
    let mut b = client(&n);
    let p = sh(&mut a, "exit 0");
    assert!(matches!(b.wait(None, false), Err(ProcError::NoChild(_))));
    assert_eq!(a.wait(None, false).unwrap().unwrap().pid, p);
}

#[test]
fn a_missing_binary_is_a_clear_error() {
    let n = node();
    let mut c = client(&n);
    let e = c.spawn("/nonexistent/program", &[], &[], 1).unwrap_err();
    assert!(
        matches!(e, ProcError::SpawnFailed(ref m) if m.contains("/nonexistent/program")),
        "{e}"
    );
    let e = c.spawn("", &[], &[], 1).unwrap_err();
    assert!(e.to_string().contains("needs a path"), "{e}");
    let e = c
        .spawn("/bin/true", &[], &["NOEQUALS".into()], 1)
        .unwrap_err();
    assert!(e.to_string().contains("has no '='"), "{e}");
}

#[test]
fn the_childs_environment_names_its_pid_and_its_fabricd() {
    let n = node();
    let mut c = client(&n);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env");
    let script = format!(
        "echo \"$NEFELE_PID $NEFELE_FABRICD_SOCKET $EXTRA\" > {}",
        out.display()
    );
    let p = c
        .spawn(
            "/bin/sh",
            &["sh".into(), "-c".into(), script],
            &["EXTRA=yes".into()],
            1,
        )
        .unwrap()[0];
    c.wait(Some(p), false).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text.trim(),
        format!("{} {} yes", p.0, n.daemon.socket_path().display())
    );
    assert_eq!(p.node(), 1);
}

#[test]
fn children_of_an_exited_process_are_killed() {
    let n = node();
    let mut c = client(&n);
    // The parent starts a child that would sleep for a minute, records it
    // with `nefele ps`, then exits.
    let nefele = env!("CARGO_BIN_EXE_nefele");
    let dir = tempfile::tempdir().unwrap();
    let ps = dir.path().join("ps.json");
    let script = format!(
        "{nefele} spawn /bin/sleep 60 > /dev/null && {nefele} ps --json > {}",
        ps.display()
    );
    let parent = sh(&mut c, &script);
    let e = c.wait(Some(parent), false).unwrap().unwrap();
    assert_eq!(libc::WEXITSTATUS(e.status), 0, "the parent's script failed");
    let listed = std::fs::read_to_string(&ps).unwrap();
    let sleeper: serde_json::Value = listed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["path"].as_str().is_some_and(|p| p.ends_with("/sleep")))
        .unwrap_or_else(|| panic!("the orphan never started: {listed}"));
    assert_eq!(sleeper["state"], "running");
    let os_pid = sleeper["os_pid"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{os_pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "orphan {os_pid} still alive after its parent exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn output_is_captured_and_readable_after_exit() {
    let n = node();
    let mut c = client(&n);
    let p = sh(
        &mut c,
        "echo out-line; echo err-line >&2; printf 'x%.0s' $(seq 1 300)",
    );
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert!(libc::WIFEXITED(e.status));
    // The capture thread may finish a moment after the exit.
    let read_all = |c: &mut ProcClient, stream: u32| -> Vec<u8> {
        let t0 = Instant::now();
        let mut data = Vec::new();
        loop {
            let chunk = c.logs(p, stream, data.len() as u64).unwrap();
            assert_eq!(chunk.offset, data.len() as u64, "nothing was dropped");
            let empty = chunk.data.is_empty();
            data.extend_from_slice(&chunk.data);
            if empty && chunk.closed {
                return data;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the stream never closed"
            );
            if empty {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let out = read_all(&mut c, 1);
    let mut expected = b"out-line\n".to_vec();
    expected.extend(std::iter::repeat_n(b'x', 300));
    assert_eq!(out, expected);
    assert_eq!(read_all(&mut c, 2), b"err-line\n");
    assert!(matches!(c.logs(p, 3, 0), Err(ProcError::Refused(_))));
    assert!(matches!(
        c.logs(GlobalPid(p.0 + 1_000_000), 1, 0),
        Err(ProcError::NoProcess(_))
    ));
}

fn sh_limited(
    c: &mut ProcClient,
    script: &str,
    limits: procmgr::proto::Limits,
) -> Result<GlobalPid, ProcError> {
    c.spawn_limited(
        "/bin/sh",
        &["sh".into(), "-c".into(), script.into()],
        &[],
        1,
        procmgr::client::Placement::Local,
        Some(limits),
    )
    .map(|p| p[0])
}

#[test]
fn limits_are_applied_through_cgroups_and_enforced() {
    let n = node();
    let mut c = client(&n);
    // The process runs in its own memory and pids groups with the limits.
    let limits = procmgr::proto::Limits {
        memory_bytes: 64 << 20,
        pids: 16,
        cpu_shares: 0,
    };
    let p = sh_limited(
        &mut c,
        "g=$(grep ':memory:' /proc/self/cgroup | cut -d: -f3); cat /sys/fs/cgroup/memory$g/memory.limit_in_bytes; \
         g=$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); cat /sys/fs/cgroup/pids$g/pids.max",
        limits,
    )
    .unwrap();
    assert!(libc::WIFEXITED(
        c.wait(Some(p), false).unwrap().unwrap().status
    ));
    let t0 = Instant::now();
    let out = loop {
        let chunk = c.logs(p, 1, 0).unwrap();
        if chunk.closed {
            break String::from_utf8(chunk.data).unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(out, format!("{}\n16\n", 64u64 << 20));
    // And the kernel enforces it: 200 MiB under a 64 MiB limit (no swap
    // here) is killed.
    let p = sh_limited(
        &mut c,
        "exec dd if=/dev/zero of=/dev/null bs=200M count=1",
        limits,
    )
    .unwrap();
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert!(
        libc::WIFSIGNALED(e.status) && libc::WTERMSIG(e.status) == libc::SIGKILL,
        "a process over its memory limit ended {:#x}",
        e.status
    );
    // Without a limit the same runs.
    let p = sh(
        &mut c,
        "exec dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null",
    );
    let e = c.wait(Some(p), false).unwrap().unwrap();
    assert!(
        libc::WIFEXITED(e.status) && libc::WEXITSTATUS(e.status) == 0,
        "{:#x}",
        e.status
    );
}

#[test]
fn a_limit_that_cannot_be_applied_fails_the_spawn_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fabric::daemon::Config {
        socket_path: dir.path().join("fabricd.sock"),
        ebpf: false,
        ..Default::default()
    };
    let daemon = fabric::daemon::Daemon::start(cfg).unwrap();
    procmgr::daemon::ProcMgr::open(daemon.socket_path())
        .unwrap()
        .cgroup_root(dir.path().join("no-cgroups-here"))
        .spawn_thread()
        .unwrap();
    let mut c = ProcClient::open_at(daemon.socket_path()).unwrap();
    let limits = procmgr::proto::Limits {
        memory_bytes: 64 << 20,
        ..Default::default()
    };
    let err = sh_limited(&mut c, "true", limits).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("memory limit") && msg.contains("no cgroup v1 memory controller"),
        "{msg}"
    );
    let tiny = procmgr::proto::Limits {
        memory_bytes: 4096,
        ..Default::default()
    };
    assert!(sh_limited(&mut c, "true", tiny)
        .unwrap_err()
        .to_string()
        .contains("below"));
    // Unlimited spawns are unaffected.
    let p = sh(&mut c, "exit 3");
    assert_eq!(
        libc::WEXITSTATUS(c.wait(Some(p), false).unwrap().unwrap().status),
        3
    );
}

/// `--json` is accepted by every command, before or after it: `run` ends
/// with its program's status as JSON (stdout stays the program's) and
/// exits with the program's code; errors become `{"error": …}`.
#[test]
fn the_cli_speaks_json_everywhere() {
    let nefele = env!("CARGO_BIN_EXE_nefele");
    let out = std::process::Command::new(nefele)
        .args(["--json", "run", "/bin/sh", "-c", "echo hi; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let end: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(end["status"], 3 << 8);
    assert_eq!(end["state"], "exited 3");

    let dir = tempfile::tempdir().unwrap();
    for args in [["kill", "--json", "1.1.1"], ["--json", "ps", "--local"]] {
        let out = std::process::Command::new(nefele)
            .args(args)
            .env("NEFELE_FABRICD_SOCKET", dir.path().join("none.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains("no fabricd is listening"), "{msg}");
    }
}

#[test]
fn nefele_down_stops_the_node_cleanly() {
    // `nefele up` in the background, `nefele down` against it: the node
    // exits with status 0 and takes its socket file with it (a SIGTERM
    // that killed the process outright used to leave the file behind).
    let nefele = env!("CARGO_BIN_EXE_nefele");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fabricd.sock");
    let mut up = std::process::Command::new(nefele)
        .arg("up")
        .arg("--no-ebpf")
        .env("NEFELE_FABRICD_SOCKET", &socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fabric::ctlsock::connect(&socket).is_err() {
        if Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!("nefele up did not serve {} within 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = std::process::Command::new(nefele)
        .arg("down")
        .env("NEFELE_FABRICD_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "nefele down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!("nefele up still running 10 s after nefele down");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "nefele up ended with {status}");
    assert!(!socket.exists(), "the socket file was left behind");
}

//! `ci/cluster.sh` builds a 3-node test cluster in network namespaces and
//! removes it again, even when the test fails. Needs root (CI runs as root).

use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/cluster.sh");
const NEFELE: &str = env!("CARGO_BIN_EXE_nefele");

fn cluster(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .env("NEFELE_BIN", NEFELE)
        .output()
        .expect("bash")
}

/// Tears the cluster down whatever happens to the test.
struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = cluster(&["down"]);
    }
}

fn namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned()
}

/// `nefele ARGS` against node 1; its stdout, trimmed (asserting success).
fn from_node1(args: &[&str]) -> String {
    let out = Command::new(NEFELE)
        .args(args)
        .env(
            "NEFELE_FABRICD_SOCKET",
            "/run/nefele-cluster/n1/fabricd.sock",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nefele {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `nefele ARGS` run inside node 1 (its network and mount namespaces, so
/// it sees node 1's private files); its stdout, trimmed.
fn inside_node1(args: &[&str]) -> String {
    let daemon = std::fs::read_to_string("/run/nefele-cluster/n1/pid").unwrap();
    let out = Command::new("nsenter")
        .args(["-t", daemon.trim(), "-n", "-m", "--", NEFELE])
        .args(args)
        .env(
            "NEFELE_FABRICD_SOCKET",
            "/run/nefele-cluster/n1/fabricd.sock",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nefele {args:?} in node 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A program that exists on node 1 only (in its private directory) runs
/// on nodes 2 and 3: each fetches it once into its content-addressed cache.
fn missing_binaries_are_shipped() {
    let daemon = std::fs::read_to_string("/run/nefele-cluster/n1/pid").unwrap();
    let program = "/run/nefele-cluster/local/shipped-echo";
    std::fs::copy(
        "/bin/echo",
        format!("/proc/{}/root{program}", daemon.trim()),
    )
    .unwrap();
    assert!(
        !Path::new(program).exists(),
        "node 1's private directory leaks"
    );
    for node in ["3", "2", "3"] {
        let pid = inside_node1(&["spawn", "--node", node, program, "shipped", "to", node]);
        assert!(pid.starts_with(&format!("{node}.")), "{pid}");
        assert_eq!(inside_node1(&["wait", &pid]), format!("{pid} exited 0"));
        assert_eq!(
            from_node1(&["logs", "--follow", &pid]),
            format!("shipped to {node}")
        );
    }
    let echo = std::fs::read("/bin/echo").unwrap();
    for node in [2, 3] {
        let cache = format!("/run/nefele-cluster/n{node}/cache");
        let files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap_or_else(|e| panic!("{cache}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(std::fs::read(&files[0]).unwrap(), echo);
        let log = std::fs::read_to_string(format!("/run/nefele-cluster/n{node}/log")).unwrap();
        assert!(
            log.contains(&format!("{program} from node 1 is {}", files[0].display())),
            "{log}"
        );
    }
    // A program the spawning node lacks too cannot be shipped, and says so.
    let mut client =
        procmgr::client::ProcClient::open_at(Path::new("/run/nefele-cluster/n1/fabricd.sock"))
            .unwrap();
    let missing = "/run/nefele-cluster/local/nothing";
    let err = client
        .spawn_placed(missing, &[], &[], 1, procmgr::client::Placement::Node(2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{missing} is not on node 2 and could not be shipped from node 1: {missing} is not here either"
        )),
        "{err}"
    );
}

/// From node 1: waitpid of processes on nodes 2 and 3 gives their exit
/// codes and signals, their output can be read, kill reaches them, spread placement uses every
/// node, and a process whose node dies ends "node lost".
fn processes_across_nodes() {
    let pid = from_node1(&["spawn", "--node", "3", "/bin/sh", "-c", "exit 7"]);
    assert!(pid.starts_with("3."), "placed on node 3: {pid}");
    assert_eq!(from_node1(&["wait", &pid]), format!("{pid} exited 7"));

    // Output of a process on node 3, read from node 1 (after it exits,
    // and followed until the stream closes).
    let pid = from_node1(&[
        "spawn",
        "--node",
        "3",
        "/bin/sh",
        "-c",
        "echo hello from $(hostname -I 2>/dev/null | cut -d' ' -f1); echo oops >&2",
    ]);
    assert_eq!(from_node1(&["wait", &pid]), format!("{pid} exited 0"));
    assert_eq!(
        from_node1(&["logs", "--follow", &pid]),
        "hello from 10.77.0.3",
        "the output of the process on node 3 (its namespace's address)"
    );
    assert_eq!(from_node1(&["logs", "--stderr", "--follow", &pid]), "oops");

    let pid = from_node1(&["spawn", "--node", "2", "/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        from_node1(&["wait", &pid]),
        format!("{pid} killed by signal 15")
    );

    let pid = from_node1(&["spawn", "--node", "2", "/bin/sleep", "30"]);
    // `ps` from node 1 lists it once, as node 2 runs it (with its OS pid).
    let ps = from_node1(&["ps"]);
    let rows: Vec<&str> = ps
        .lines()
        .filter(|l| l.starts_with(&format!("{pid} ")))
        .collect();
    assert_eq!(rows.len(), 1, "{ps}");
    let cols: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(cols[1], "2", "node column: {ps}");
    assert!(cols[2].parse::<u32>().is_ok_and(|p| p > 0), "OS pid: {ps}");
    assert_eq!(cols[3], "running", "{ps}");
    from_node1(&["kill", "--signal", "9", &pid]);
    assert_eq!(
        from_node1(&["wait", &pid]),
        format!("{pid} killed by signal 9")
    );

    let pids = from_node1(&["spawn", "-n", "6", "/bin/true"]);
    for node in 1..=3 {
        assert!(
            pids.lines().any(|p| p.starts_with(&format!("{node}."))),
            "spread placement skipped node {node}: {pids}"
        );
    }
    // One `wait` for all six, each status on its own line, in order.
    let mut args = vec!["wait"];
    args.extend(pids.lines());
    let expected: Vec<String> = pids.lines().map(|p| format!("{p} exited 0")).collect();
    assert_eq!(from_node1(&args), expected.join("\n"));

    let pid = from_node1(&["spawn", "--node", "3", "/bin/sleep", "30"]);
    let daemon: i32 = std::fs::read_to_string("/run/nefele-cluster/n3/pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let waited = from_node1(&["wait", "--json", &pid]);
    eprintln!(
        "node 3 killed; its process reported lost after {:?}: {waited}",
        t0.elapsed()
    );
    assert!(waited.contains("\"state\":\"node lost\""), "{waited}");
    let status = procmgr::pid::NODE_LOST.to_string();
    assert!(waited.contains(&format!("\"status\":{status}")), "{waited}");

    // The replicated name table as node 1 sees it: node 2's procmgrd is
    // there (a port of node 2, root's tenant 0), node 3's was withdrawn
    // with its node.
    let names = from_node1(&["names"]);
    assert!(
        names.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() == 4
                && cols[0] == "procmgr@{1000,2,2}"
                && cols[1].starts_with("2:")
                && cols[2..] == ["tenant", "0"]
        }),
        "{names}"
    );
    assert!(!names.contains("procmgr@{1000,3,3}"), "{names}");

    // `nefele down` stops node 2's daemon.
    let down = Command::new(NEFELE)
        .arg("down")
        .env(
            "NEFELE_FABRICD_SOCKET",
            "/run/nefele-cluster/n2/fabricd.sock",
        )
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let status = String::from_utf8_lossy(&cluster(&["status"]).stdout).into_owned();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("node 2:") && l.contains("daemons stopped")),
        "{status}"
    );
}

#[test]
fn three_nodes_come_up_reach_each_other_and_go_away() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "ci/cluster.sh needs root (network namespaces); CI runs as root"
    );
    let _down = Down;
    let up = cluster(&["up", "3"]);
    assert!(
        up.status.success(),
        "{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let out = String::from_utf8_lossy(&up.stdout);
    for i in 1..=3 {
        assert!(out.contains(&format!("node {i}: 10.77.0.{i}")), "{out}");
        // Each node's procmgrd answers on its own socket, with its node id.
        let socket = format!("/run/nefele-cluster/n{i}/fabricd.sock");
        assert!(Path::new(&socket).exists());
        let spawned = Command::new(NEFELE)
            .args(["spawn", "--placement", "local", "/bin/true"])
            .env("NEFELE_FABRICD_SOCKET", &socket)
            .output()
            .unwrap();
        assert!(
            spawned.status.success(),
            "{}",
            String::from_utf8_lossy(&spawned.stderr)
        );
        assert!(
            String::from_utf8_lossy(&spawned.stdout).starts_with(&format!("{i}.")),
            "pid of node {i}: {}",
            String::from_utf8_lossy(&spawned.stdout)
        );
    }
    // Node 1 reaches node 3 over the namespaces' network.
    let listen = Command::new("ip")
        .args(["netns", "exec", "nefele-n3", "python3", "-c"])
        .arg("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.77.0.3', 7700)); s.listen(1); s.settimeout(10); c,_=s.accept(); c.sendall(b'node3')")
        .spawn()
        .unwrap();
    let reply = Command::new("ip")
        .args(["netns", "exec", "nefele-n1", "python3", "-c"])
        .arg("import socket, time\nfor _ in range(100):\n  try:\n    s=socket.create_connection(('10.77.0.3', 7700), timeout=2); break\n  except OSError: time.sleep(0.05)\nprint(s.recv(10).decode())")
        .output()
        .unwrap();
    let mut listen = listen;
    let _ = listen.wait();
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "node3",
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );
    let status = cluster(&["status"]);
    assert_eq!(
        String::from_utf8_lossy(&status.stdout)
            .matches("daemons running")
            .count(),
        3
    );

    missing_binaries_are_shipped();
    processes_across_nodes();

    let down = cluster(&["down"]);
    assert!(down.status.success());
    assert!(
        !namespaces().contains("nefele-"),
        "namespaces left behind: {}",
        namespaces()
    );
    assert!(!Path::new("/run/nefele-cluster").exists());
}

//! The fabric across a real 3-node cluster: `ci/cluster.sh up 3` (network
//! namespaces, one `nefele up` each, found by broadcast), then, with
//! `nefele-demo` roles as the programs on the nodes:
//!
//! - the cluster forms within 5 s;
//! - a process on node 1 sends to `printer@{8080,1,1}` bound on node 3 and
//!   gets its reply;
//! - 100,000 numbered messages from node 1 to node 2 all arrive in order,
//!   none twice, although node 2's link is cut for 200 ms meanwhile;
//! - SIGKILL of node 3's daemon makes `service_exists` false on node 1
//!   within the failure-detection bound, and a sender blocked on node 3
//!   fails with a clear error instead of hanging.
//!
//! Needs root (CI runs as root); the cluster is removed even on failure.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{ChildGuard, Cluster};

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

/// The failure-detection bound `fabric::cluster` documents for the default
/// gossip interval, and a second for the processes here to notice.
fn bound() -> Duration {
    let cc = fabric::cluster::ClusterConfig::new("x", "10.0.0.1:1".parse().unwrap());
    cc.failure_detection_bound() + Duration::from_secs(1)
}

/// `nefele-demo ROLE ARGS` as a process of node `i`.
fn on_node(i: u32, args: &[&str]) -> Command {
    let mut c = Cluster::on_node_of(i, Path::new(DEMO));
    c.args(args);
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts a role that prints "ready" once bound, and waits for that.
fn start_bound(i: u32, args: &[&str]) -> ChildGuard {
    use std::io::BufRead;
    let mut child = on_node(i, args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "{args:?} did not come up");
    ChildGuard(child)
}

/// Waits at most `limit` for `child` to exit; its output, or `None` (and
/// the child killed by its guard) if it did not.
fn finish(mut child: ChildGuard, limit: Duration) -> Option<(bool, String)> {
    use std::io::Read;
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = String::new();
            if let Some(mut o) = child.0.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            return Some((status.success(), out));
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `addr` exists as seen from node `i`, waiting at most `wait_ms`.
fn exists_on(i: u32, addr: &str, wait_ms: u64) -> bool {
    on_node(
        i,
        &["exists", "--to", addr, "--timeout-ms", &wait_ms.to_string()],
    )
    .status()
    .unwrap()
    .success()
}

/// How long after `since` node `i` stopped seeing `addr`, if within the
/// bound. Bounded by the loop count as well as by time.
fn gone_within(i: u32, addr: &str, since: Instant) -> Option<Duration> {
    for _ in 0..500 {
        if !exists_on(i, addr, 0) {
            return Some(since.elapsed());
        }
        if since.elapsed() > bound() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn three_namespace_nodes_form_route_survive_a_cut_and_lose_a_node() {
    let cluster = Cluster::up(3, &Path::new(DEMO).with_file_name("nefele"));
    eprintln!("cluster formed in {} ms", cluster.formed_ms);
    assert!(cluster.formed_ms < 5000);

    // Node 1 asks the printer on node 3 and gets its reply.
    let _printer = {
        let c = on_node(3, &["echo", "--bind", "printer@{8080,1,1}"])
            .spawn()
            .unwrap();
        ChildGuard(c)
    };
    let ask = on_node(
        1,
        &["ask", "--to", "printer@{8080,1,1}", "--message", "pi?"],
    )
    .output()
    .unwrap();
    assert!(ask.status.success(), "{}", text(&ask));
    let reply = String::from_utf8_lossy(&ask.stdout);
    assert!(
        reply.starts_with("3:") && reply.trim_end().ends_with(" pi?"),
        "the reply comes from a port of node 3: {reply}"
    );

    // A reliable stream from node 1 to node 2 across a 200 ms cut of node
    // 2's veth: all 100,000 arrive, in order, none twice. Once over a
    // direct link, once through the daemons' node link.
    let cut = |state: &str| {
        let s = Command::new("ip")
            .args(["-n", "nefele-hub", "link", "set", "nvh2", state])
            .status()
            .unwrap();
        assert!(s.success(), "ip link set nvh2 {state}");
    };
    for (addr, direct) in [("count@{8100,1,1}", "1"), ("count@{8101,1,1}", "0")] {
        let mut counter = start_bound(2, &["count", "--bind", addr, "--count", "100000"]);
        let stream = ChildGuard(
            on_node(1, &["stream", "--to", addr, "--count", "100000"])
                .env("NEFELE_DIRECT_LINKS", direct)
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            counter.0.try_wait().unwrap().is_none(),
            "the stream is still under way when the link is cut (direct links: {direct})"
        );
        cut("down");
        std::thread::sleep(Duration::from_millis(200));
        cut("up");
        let limit = Duration::from_secs(60);
        let (sent, _) = finish(stream, limit).expect("the stream's sender finishes");
        assert!(sent, "the stream's sender failed (direct links: {direct})");
        let (counted, said) = finish(counter, limit).expect("the counter finishes");
        assert!(
            counted && said.contains("all 100000 in order"),
            "direct links {direct}: {said}"
        );
    }

    // Node 3's daemon dies while node 1 is blocked sending to a mailbox
    // there that never reads.
    let _sink = start_bound(3, &["sink", "--bind", "sink@{8090,1,1}"]);
    assert!(exists_on(1, "sink@{8090,1,1}", 5000));
    let flood = ChildGuard(
        on_node(1, &["flood", "--to", "sink@{8090,1,1}"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = cluster.daemon_pid(3);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let withdrawn = gone_within(1, "sink@{8090,1,1}", killed).unwrap_or_else(|| {
        panic!(
            "sink@{{8090,1,1}} still exists on node 1 {:?} after node 3 died",
            bound()
        )
    });
    let (_, said) = finish(flood, bound())
        .unwrap_or_else(|| panic!("the blocked sender hung for {:?}", bound()));
    let failed = killed.elapsed();
    eprintln!("node 3 killed: binding gone on node 1 after {withdrawn:?}, blocked sender failed by {failed:?}: {said}");
    assert!(failed < bound(), "the blocked sender hung for {failed:?}");
    assert!(
        said.contains("failed after") && said.contains("is gone"),
        "{said}"
    );
    assert!(
        gone_within(2, "sink@{8090,1,1}", killed).is_some(),
        "node 2 withdraws it too"
    );
}

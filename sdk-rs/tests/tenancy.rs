//! Tenants: each mailbox is the tenant of its process's uid (or one root
//! chooses for it), and the tenant policy keeps tenants apart on every
//! local path: the kernel drops a first message on the eBPF path, and
//! fabricd refuses the ring a sender asks for. A node daemon run by root
//! serves every local user. Needs root (CI runs as root).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use fabric::daemon::Daemon;
use nefele::{Mailbox, SendError, SendMode};

mod streams;
use streams::{embedded_with_ebpf, per_sender, receive, run_stream, spawn_count, stream};

/// The uid of `nobody`, a user other than root.
const NOBODY: u32 = 65534;

#[test]
fn the_tenant_policy_refuses_a_ring_as_it_refuses_the_kernel_path_until_allowed() {
    let node = embedded_with_ebpf();
    let mut rx = node
        .mailbox()
        .expect("mailbox")
        .bound("{7100,2}")
        .expect("bind");
    // The sender runs as root (tenant 0); by default tenant 0 may not
    // reach tenant 7: its first message is dropped in the kernel, and the
    // ring it then asks for is refused, so the send fails and nothing
    // arrives by either path.
    rx.join_tenant(7).expect("tenant 7");
    refused_both_ways(node.socket_path(), None, "{7100,2}", &mut rx);
    assert_eq!(rx.early_received(), 0);
    // Each refused sender counted once (its first message: the kernel
    // leaves an early frame to fabricd, which refuses the ring).
    assert_eq!(denied(&node.stats()), vec![(0, 2)]);

    let mut admin = node.mailbox().expect("mailbox");
    admin.set_tenant_policy(0, 7, true).expect("allow 0 -> 7");
    stream(&node, "{7100,2}", 100, 64);
    let got = receive(&mut rx, 100);
    assert_eq!(per_sender(&got), vec![(0..100).collect::<Vec<u64>>()]);
    assert_eq!(
        rx.early_received(),
        1,
        "the first message went through the kernel"
    );
    assert_eq!(rx.try_recv().expect("recv"), None, "nothing twice");
}

/// Streams (as `uid`, if given) to `to`, whose mailbox `rx` is, with the
/// first message on the eBPF path and without: both are refused with the
/// reason, and nothing arrives.
fn refused_both_ways(socket: &std::path::Path, uid: Option<u32>, to: &str, rx: &mut Mailbox) {
    for early in [true, false] {
        let out = run_stream(socket, uid, to, 20, 64, early);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a stream crossed tenants (early: {early})"
        );
        assert!(said.contains("tenant policy"), "early: {early}: {said}");
    }
    let got = rx.recv_timeout(Duration::from_millis(200)).expect("recv");
    assert_eq!(got.map(|m| m.from), None, "a message crossed tenants");
}

/// Messages the tenant policy refused, per source tenant.
fn denied(stats: &fabric::proto::Stats) -> Vec<(u32, u64)> {
    stats
        .ebpf_denied
        .iter()
        .map(|c| (c.tenant, c.count))
        .collect()
}

/// A node daemon configured as `fabricd` configures it, stopped even if
/// the test fails (its directory goes with the tempdir).
fn node_daemon(dir: &tempfile::TempDir) -> Daemon {
    let args = fabric::cli::NodeArgs::default();
    Daemon::start(args.daemon_config(dir.path().join("fabricd.sock"))).expect("fabricd")
}

#[test]
fn a_root_fabricd_serves_every_user_each_in_its_own_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = node_daemon(&dir);
    let socket = d.socket_path().to_path_buf();
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "a root fabricd's socket is for every user"
    );

    // Root's mailbox (tenant 0); nobody's stream (tenant 65534) to it is
    // refused on both paths, with the reason.
    let mut rx = Mailbox::open_at(&socket)
        .expect("mailbox")
        .bound("{7200,1}")
        .expect("bind");
    refused_both_ways(&socket, Some(NOBODY), "{7200,1}", &mut rx);
    assert_eq!(denied(&d.stats()), vec![(NOBODY, 2)]);

    // Allowed by root, nobody's messages arrive, all and in order.
    rx.set_tenant_policy(NOBODY, 0, true)
        .expect("allow nobody -> root");
    let out = run_stream(&socket, Some(NOBODY), "{7200,1}", 100, 64, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = receive(&mut rx, 100);
    assert_eq!(per_sender(&got), vec![(0..100).collect::<Vec<u64>>()]);
}

#[test]
fn a_socket_mode_given_is_applied_and_a_bad_one_refused() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        node: fabric::cli::NodeArgs,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let args = Cli::try_parse_from(["fabricd", "--socket-mode", "0600"])
        .expect("parse")
        .node;
    let d = Daemon::start(args.daemon_config(dir.path().join("fabricd.sock"))).expect("fabricd");
    let mode = std::fs::metadata(d.socket_path())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = Cli::try_parse_from(["fabricd", "--socket-mode", "999"])
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not an octal mode"), "{err}");
}

#[test]
fn a_revoke_closes_the_rings_made_before_it_to_new_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = node_daemon(&dir);
    let socket = d.socket_path().to_path_buf();
    // nobody's receiver expects 0..10 in order, none twice; root sends.
    let rx = spawn_count(&socket, Some(NOBODY), "{7300,1}", 10, 20_000);
    let mut tx = Mailbox::open_at(&socket).expect("mailbox");
    tx.set_tenant_policy(0, NOBODY, true).expect("allow");
    let to = tx.lookup("{7300,1}").expect("lookup")[0];
    let send = |tx: &mut Mailbox, i: u64| tx.send_to_port(to, &i.to_le_bytes(), SendMode::RELIABLE);
    for i in 0..5 {
        send(&mut tx, i).expect("allowed");
    }
    tx.set_tenant_policy(0, NOBODY, false).expect("revoke");
    for _ in 0..2 {
        let err = send(&mut tx, 5).expect_err("sent on a revoked ring");
        assert_eq!(err.send_error(), Some(&SendError::Denied), "{err}");
    }
    assert_eq!(
        denied(&d.stats()),
        vec![(0, 2)],
        "each refused message counted once"
    );
    tx.set_tenant_policy(0, NOBODY, true).expect("allow again");
    for i in 5..10 {
        send(&mut tx, i).expect("allowed again");
    }
    rx.expect_all_in_order(10);
}

#[test]
fn a_mailbox_that_moves_to_another_tenant_loses_the_rings_its_new_tenant_may_not_use() {
    let node = embedded_with_ebpf();
    // Both root (tenant 0): the ring is made, five messages go.
    let rx = spawn_count(node.socket_path(), None, "{7400,1}", 10, 20_000);
    let mut tx = node.mailbox().expect("mailbox");
    let to = tx.lookup("{7400,1}").expect("lookup")[0];
    let send = |tx: &mut Mailbox, i: u64| tx.send_to_port(to, &i.to_le_bytes(), SendMode::RELIABLE);
    for i in 0..5 {
        send(&mut tx, i).expect("same tenant");
    }
    // In tenant 9, which may not reach tenant 0, its ring is closed.
    tx.join_tenant(9).expect("tenant 9");
    let err = send(&mut tx, 5).expect_err("sent across tenants on an old ring");
    assert_eq!(err.send_error(), Some(&SendError::Denied), "{err}");
    assert!(
        err.to_string()
            .contains("tenant 9 may not reach tenant 0 (root lets it with `fabricd allow 9 0`)"),
        "the refusal names the tenants and the way through: {err}"
    );
    tx.set_tenant_policy(9, 0, true).expect("allow 9 -> 0");
    for i in 5..10 {
        send(&mut tx, i).expect("allowed");
    }
    rx.expect_all_in_order(10);
}

#[test]
fn symbolic_names_resolve_within_the_callers_tenant() {
    let node = embedded_with_ebpf();
    let in_tenant = |t: u32| {
        let mut m = node.mailbox().expect("mailbox");
        m.join_tenant(t).expect("join");
        m
    };
    let mut seven = in_tenant(7);
    seven.bind("printer@{7500,1,1}").expect("bind");
    let mut eight = in_tenant(8);
    eight.bind("printer@{7500,2,2}").expect("bind");
    // Root's mailbox is in tenant 0, whose names every tenant resolves
    // (where system services such as procmgrd bind).
    let system = node
        .mailbox()
        .expect("mailbox")
        .bound("spooler@{7501,1,1}")
        .expect("bind");

    let mut asker = in_tenant(7);
    assert_eq!(asker.lookup("printer").expect("lookup"), vec![seven.port()]);
    assert_eq!(
        asker.lookup("printer@{7500,0,9}").expect("lookup"),
        vec![seven.port()]
    );
    let mut both = vec![seven.port(), eight.port()];
    both.sort_unstable();
    assert_eq!(
        asker.lookup("{7500,0,9}").expect("lookup"),
        both,
        "service numbers are cluster-wide"
    );
    assert_eq!(
        asker.lookup("spooler").expect("lookup"),
        vec![system.port()]
    );

    // A tenant with no printer of its own sees none, until a mailbox
    // with one moves in: its subscription hears of it.
    let mut nine = in_tenant(9);
    assert!(!nine
        .service_exists("printer", Duration::from_millis(100))
        .expect("exists"));
    assert!(nine.lookup("printer").expect("lookup").is_empty());
    eight.join_tenant(9).expect("move to 9");
    assert!(nine
        .service_exists("printer", Duration::from_secs(5))
        .expect("exists"));
    assert_eq!(nine.lookup("printer").expect("lookup"), vec![eight.port()]);
    assert_eq!(
        asker.lookup("printer@{7500,0,9}").expect("lookup"),
        vec![seven.port()],
        "tenant 7 still sees its own printer only"
    );

    // A sender that moves forgets what it resolved in its old tenant:
    // "printer" is seven's in tenant 7 and eight's in tenant 9.
    let mut mover = in_tenant(7);
    mover.send("printer", b"in 7").expect("send in 7");
    let got = seven.recv_timeout(Duration::from_secs(5)).expect("recv");
    assert_eq!(got.map(|m| m.data), Some(b"in 7".to_vec()));
    mover.join_tenant(9).expect("move to 9");
    mover.send("printer", b"in 9").expect("send in 9");
    let got = eight.recv_timeout(Duration::from_secs(5)).expect("recv");
    assert_eq!(got.map(|m| m.data), Some(b"in 9".to_vec()));
}

#[test]
fn mailboxes_of_one_process_in_different_tenants_are_kept_apart_by_the_policy() {
    let node = embedded_with_ebpf();
    let mut a = node.mailbox().expect("mailbox");
    let mut b = node.mailbox().expect("mailbox");
    let to_b = b.port();
    let send = |a: &mut Mailbox, i: u64| a.send_to_port(to_b, &i.to_le_bytes(), SendMode::RELIABLE);
    // One tenant (root's): they share memory without the daemon.
    send(&mut a, 0).expect("same tenant");
    // b moves to tenant 8, which tenant 0 may not reach: a's ring to it
    // is closed and the ring a asks for instead is refused.
    b.join_tenant(8).expect("tenant 8");
    let err = send(&mut a, 1).expect_err("crossed tenants within a process");
    assert_eq!(err.send_error(), Some(&SendError::Denied), "{err}");
    // a in tenant 7 as well: still apart until root allows 7 -> 8.
    a.join_tenant(7).expect("tenant 7");
    let err = send(&mut a, 2).expect_err("crossed tenants within a process");
    assert_eq!(err.send_error(), Some(&SendError::Denied), "{err}");
    a.set_tenant_policy(7, 8, true).expect("allow 7 -> 8");
    send(&mut a, 3).expect("allowed");
    let got: Vec<u64> = (0..2)
        .map(|_| {
            let m = b
                .recv_timeout(Duration::from_secs(5))
                .expect("recv")
                .expect("a message");
            u64::from_le_bytes(m.data.try_into().expect("8 bytes"))
        })
        .collect();
    assert_eq!(
        got,
        vec![0, 3],
        "what was sent before the move, then what was allowed"
    );
    assert!(
        b.try_recv().expect("recv").is_none(),
        "nothing refused arrived"
    );
}

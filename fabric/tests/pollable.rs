//! Pollable mailboxes: `fabricd` loads the eBPF path, a pollable mailbox
//! receives on its socket (readable for epoll), senders are steered to the
//! eBPF path by the daemon, the tenant policy holds between clients, and
//! the daemon's stats show it all. Needs root (CI runs as root).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use fabric::addr::Address;
use fabric::client::{Error, Mailbox};
use fabric::daemon::{Config, Daemon};
use fabric::ring::SendError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

fn daemon(dir: &tempfile::TempDir) -> Daemon {
    Daemon::start(Config {
        socket_path: dir.path().join("fabricd.sock"),
        ..Config::default()
    })
    .expect("daemon")
}

fn readable_within(fd: std::os::fd::RawFd, ms: u16) -> bool {
    // SAFETY: the mailbox owning `fd` outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).expect("poll") == 1
}

#[test]
fn a_pollable_mailbox_receives_on_its_socket_through_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir);
    assert_eq!(
        d.stats().ebpf,
        "available",
        "fabricd did not load the eBPF path"
    );
    let mut rx = Mailbox::open_pollable_at(d.socket_path()).expect("pollable mailbox");
    let printer: Address = "printer@{8080,1,1}".parse().expect("address");
    rx.bind(&printer).expect("bind");
    let fd = rx.pollable_fd().expect("a pollable fd");
    let mut tx = Mailbox::open_at(d.socket_path()).expect("sender");
    let rings_before = d.stats().rings;

    assert!(!readable_within(fd, 0), "readable before anything was sent");
    tx.send(&printer, b"hello").expect("send");
    assert!(
        readable_within(fd, 1000),
        "the socket did not become readable"
    );
    let mut out = Vec::new();
    let from = rx
        .try_recv_into(&mut out)
        .expect("recv")
        .expect("a message");
    assert_eq!((out.as_slice(), from), (&b"hello"[..], tx.port()));
    assert_eq!(rx.try_recv_into(&mut out).expect("recv"), None);
    assert!(
        !readable_within(fd, 50),
        "readable with nothing waiting (the armed doorbell watch fired)"
    );
    assert_eq!(
        d.stats().rings,
        rings_before,
        "the daemon made a ring to a pollable mailbox"
    );

    // A blocking receive parks (io_uring: socket and doorbell together) and
    // wakes for a message sent while it sleeps.
    let waiter = std::thread::spawn(move || {
        let mut out = Vec::new();
        let t0 = Instant::now();
        let from = rx
            .recv_into(&mut out, Some(Instant::now() + Duration::from_secs(10)))
            .expect("recv");
        (from, out, t0.elapsed(), rx)
    });
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..1000u32 {
        tx.send(&printer, &i.to_le_bytes()).expect("send");
    }
    let (from, mut out, waited, mut rx) = waiter.join().expect("waiter");
    assert_eq!(from, Some(tx.port()));
    assert_eq!(out, 0u32.to_le_bytes());
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    // The rest in order.
    for i in 1..1000u32 {
        let from = rx
            .recv_into(&mut out, Some(Instant::now() + Duration::from_secs(5)))
            .expect("recv");
        assert_eq!(
            (from, out.as_slice()),
            (Some(tx.port()), &i.to_le_bytes()[..])
        );
    }
    // Replies go back on the ordinary path.
    rx.send_to_port(tx.port(), b"ack", fabric::ring::SendMode::RELIABLE)
        .expect("reply");
    let from = tx
        .recv_into(&mut out, Some(Instant::now() + Duration::from_secs(5)))
        .expect("recv");
    assert_eq!((from, out.as_slice()), (Some(rx.port()), &b"ack"[..]));
    assert!(d.stats().ebpf_mailboxes >= 3, "{:?}", d.stats());
}

#[test]
fn the_tenant_policy_holds_between_clients_and_the_daemon_counts_denials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir);
    let mut rx = Mailbox::open_pollable_in(d.socket_path(), Some(5)).expect("pollable");
    assert_eq!(rx.tenant(), Some(5));
    let mut same = Mailbox::open_at(d.socket_path()).expect("sender");
    same.join_tenant(5).expect("tenant 5");
    let mut other = Mailbox::open_at(d.socket_path()).expect("sender");
    other.join_tenant(6).expect("tenant 6");
    let to = rx.port();
    same.send_to_port(to, b"friend", fabric::ring::SendMode::RELIABLE)
        .expect("same tenant");
    let t0 = Instant::now();
    let err = loop {
        match other.send_to_port(to, b"stranger", fabric::ring::SendMode::RELIABLE) {
            Ok(()) => assert!(t0.elapsed() < Duration::from_secs(2), "never refused"),
            Err(e) => break e,
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        matches!(
            err,
            Error::Send {
                reason: SendError::Denied,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("tenant policy"), "{err}");
    let mut out = Vec::new();
    let from = rx
        .recv_into(&mut out, Some(Instant::now() + Duration::from_secs(5)))
        .expect("recv");
    assert_eq!((from, out.as_slice()), (Some(same.port()), &b"friend"[..]));
    assert_eq!(
        rx.recv_into(&mut out, Some(Instant::now() + Duration::from_millis(50)))
            .expect("recv"),
        None,
        "a message of another tenant arrived"
    );
    let stats = d.stats();
    let denied = stats
        .ebpf_denied
        .iter()
        .find(|c| c.tenant == 6)
        .map_or(0, |c| c.count);
    assert!(
        denied >= 1,
        "the daemon's stats do not count the denial: {stats:?}"
    );
}

/// Sends `msg` to `to` until the tenant policy refuses it; panics if
/// that takes more than 2 s.
fn send_until_refused(tx: &mut Mailbox, to: fabric::addr::PortId, msg: &[u8]) {
    let t0 = Instant::now();
    loop {
        match tx.send_to_port(to, msg, fabric::ring::SendMode::RELIABLE) {
            Ok(()) => assert!(t0.elapsed() < Duration::from_secs(2), "never refused"),
            Err(Error::Send {
                reason: SendError::Denied,
                ..
            }) => return,
            Err(e) => panic!("refused for another reason: {e}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `fabricd allow|revoke SRC DST` against `socket`, as `uid`.
fn fabricd_policy(socket: &std::path::Path, verb: &str, uid: Option<u32>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fabricd"));
    cmd.arg("--socket").arg(socket).args([verb, "6", "5"]);
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    cmd.output().expect("run fabricd")
}

#[test]
fn fabricd_allow_and_revoke_change_the_tenant_policy_for_root_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir);
    let mut rx = Mailbox::open_pollable_in(d.socket_path(), Some(5)).expect("pollable");
    let mut other = Mailbox::open_at(d.socket_path()).expect("sender");
    other.join_tenant(6).expect("tenant 6");
    let to = rx.port();
    send_until_refused(&mut other, to, b"stranger");

    // Anyone but root is turned away, with the reason. (The socket and its
    // directory are opened up so that the daemon, not the file system,
    // answers.)
    use std::os::unix::fs::PermissionsExt;
    let open_up = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open_up(dir.path(), 0o755);
    open_up(d.socket_path(), 0o777);
    let nobody = fabricd_policy(d.socket_path(), "allow", Some(65534));
    let said = String::from_utf8_lossy(&nobody.stderr);
    assert!(!nobody.status.success(), "nobody changed the policy");
    assert!(
        said.contains("only root may change the tenant policy"),
        "{said}"
    );

    let root = fabricd_policy(d.socket_path(), "allow", None);
    assert!(
        root.status.success(),
        "{}",
        String::from_utf8_lossy(&root.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&root.stdout).trim(),
        "tenant 6 may now send to tenant 5"
    );
    // The refusal of an earlier message may still be reported once.
    let sent = (0..3).any(|_| {
        other
            .send_to_port(to, b"let in", fabric::ring::SendMode::RELIABLE)
            .is_ok()
    });
    assert!(sent, "still refused after fabricd allow");
    let mut out = Vec::new();
    let from = rx
        .recv_into(&mut out, Some(Instant::now() + Duration::from_secs(5)))
        .expect("recv");
    assert_eq!((from, out.as_slice()), (Some(other.port()), &b"let in"[..]));

    let revoked = fabricd_policy(d.socket_path(), "revoke", None);
    assert!(revoked.status.success(), "{revoked:?}");
    send_until_refused(&mut other, to, b"stranger again");
    assert_eq!(
        rx.recv_into(&mut out, Some(Instant::now() + Duration::from_millis(50)))
            .expect("recv"),
        None,
        "a message of another tenant arrived after revoke"
    );
}

#[test]
fn without_the_ebpf_path_a_pollable_mailbox_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start(Config {
        socket_path: dir.path().join("fabricd.sock"),
        ebpf: false,
        ..Config::default()
    })
    .expect("daemon");
    assert_eq!(d.stats().ebpf, "disabled");
    let err = match Mailbox::open_pollable_at(d.socket_path()) {
        Ok(_) => panic!("a pollable mailbox without the eBPF path"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("eBPF path is not available"),
        "{err}"
    );
}

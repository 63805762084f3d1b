//! The eBPF path's guarantees beyond the conformance suite: the kernel
//! stamps the true source and tenant, enforces the tenant policy (and counts
//! what it denies), and sends frames for unknown ports to the hub, which
//! answers "no such mailbox". Needs root (CI runs as root).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use fabric::ebpf::{EbpfFabric, EbpfTransport, Endpoint, DEFAULT_WINDOW_BYTES};
use fabric::ring::{SendError, SendMode};
use fabric::wire::{WireHeader, WirePort, FLAG_RELIABLE};
use zerocopy::IntoBytes;

fn fabric() -> &'static EbpfFabric {
    EbpfTransport::fabric()
}

fn endpoint(tenant: u32) -> Endpoint {
    fabric()
        .endpoint(EbpfTransport::fresh_port(), tenant, DEFAULT_WINDOW_BYTES)
        .expect("endpoint")
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(5))
}

fn write_raw(e: &Endpoint, bytes: &[u8]) -> nix::Result<usize> {
    // SAFETY: the endpoint outlives this call, so its fd stays open.
    let fd = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
    nix::unistd::write(fd, bytes)
}

#[test]
fn a_forged_source_and_tenant_are_overwritten_by_the_kernel() {
    let tx = endpoint(70);
    let mut rx = endpoint(70);
    let victim = endpoint(70);
    // Written straight to the socket, as a hostile process could: the
    // header claims another mailbox and another tenant.
    let mut frame = WireHeader::new(victim.port(), rx.port(), 99, 5, FLAG_RELIABLE, 0)
        .as_bytes()
        .to_vec();
    frame.extend_from_slice(b"hello");
    assert_eq!(write_raw(&tx, &frame), Ok(frame.len()));
    let mut out = Vec::new();
    let d = rx
        .recv(&mut out, soon())
        .expect("socket")
        .expect("the message arrives");
    assert_eq!(out, b"hello");
    assert_eq!(
        d.src,
        tx.port(),
        "the source was not stamped from the socket"
    );
    assert_ne!(d.src, victim.port());
    assert_eq!(d.tenant, 70, "the tenant was not stamped from the socket");
}

/// Sends to `dst` until a send reports the refusal of an earlier one
/// (bounded: 2 s); returns the error and how many messages left.
fn send_until_refused(tx: &mut Endpoint, dst: WirePort, msg: &[u8]) -> (SendError, u64) {
    let t0 = Instant::now();
    let mut sent = 0;
    loop {
        match tx.send(dst, msg, SendMode::RELIABLE, soon()) {
            Ok(()) => sent += 1,
            Err(e) => return (e, sent),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "no refusal within 2 s ({sent} sent)"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_cross_tenant_send_is_refused_with_a_clear_error_and_counted() {
    let (from, to) = (71, 72);
    let mut tx = endpoint(from);
    let mut rx = endpoint(to);
    let same_tenant = endpoint(from);
    let before = count(from);
    // The kernel diverts each denied message to the hub, which tells the
    // sender; the next send to that mailbox reports it.
    let (err, sent) = send_until_refused(&mut tx, rx.port(), b"secret");
    assert_eq!(err, SendError::Denied);
    assert!(err.to_string().contains("tenant policy"), "{err}");
    assert!(sent >= 1);
    assert_eq!(
        count(from),
        before + sent,
        "every denied message is counted"
    );
    let mut out = Vec::new();
    assert_eq!(
        rx.recv(&mut out, Some(Instant::now() + Duration::from_millis(50)))
            .expect("socket"),
        None,
        "a denied message arrived"
    );
    // The sender's socket still works for what is allowed.
    tx.send(same_tenant.port(), b"fine", SendMode::RELIABLE, soon())
        .expect("same-tenant send after a denial");
    // An allow entry opens that one direction.
    fabric().allow(from, to).expect("allow");
    tx.send(rx.port(), b"allowed", SendMode::RELIABLE, soon())
        .expect("allowed send");
    let d = rx.recv(&mut out, soon()).expect("socket").expect("arrives");
    assert_eq!((out.as_slice(), d.tenant), (&b"allowed"[..], from));
    let (back, back_sent) = send_until_refused(&mut rx, tx.port(), b"back");
    assert_eq!(
        back,
        SendError::Denied,
        "allowing 71→72 must not allow 72→71"
    );
    assert_eq!(count(to), back_sent);
    fabric().revoke(from, to).expect("revoke");
    let (again, again_sent) = send_until_refused(&mut tx, rx.port(), b"again");
    assert_eq!(again, SendError::Denied);
    assert_eq!(count(from), before + sent + again_sent);
}

fn count(tenant: u32) -> u64 {
    fabric()
        .denied()
        .into_iter()
        .find(|&(t, _)| t == tenant)
        .map_or(0, |(_, n)| n)
}

#[test]
fn a_message_to_an_unknown_mailbox_reaches_the_hub_and_the_sender_hears_no_such_mailbox() {
    let mut tx = endpoint(73);
    let nobody = WirePort {
        node: 1,
        port: 0xdead_0001,
    };
    // The first send cannot know yet: it is one sendmsg, and the kernel
    // hands it to the hub instead of failing with a bare EACCES.
    tx.send(nobody, b"anyone?", SendMode::RELIABLE, soon())
        .expect("first send");
    let t0 = Instant::now();
    let err = loop {
        match tx.send(nobody, b"anyone?", SendMode::RELIABLE, soon()) {
            Ok(()) => assert!(
                t0.elapsed() < Duration::from_secs(2),
                "no answer from the hub within 2 s"
            ),
            Err(e) => break e,
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(err, SendError::NoSuchMailbox);
    assert!(err.to_string().starts_with("no such mailbox"), "{err}");
}

#[test]
fn a_malformed_frame_is_dropped_in_the_kernel() {
    let tx = endpoint(74);
    let mut rx = endpoint(74);
    // The header claims 100 payload bytes; 5 follow.
    let mut frame = WireHeader::new(tx.port(), rx.port(), 74, 100, FLAG_RELIABLE, 0)
        .as_bytes()
        .to_vec();
    frame.extend_from_slice(b"short");
    assert_eq!(write_raw(&tx, &frame), Err(nix::errno::Errno::EACCES));
    assert_eq!(write_raw(&tx, b"no header"), Err(nix::errno::Errno::EACCES));
    let mut out = Vec::new();
    assert_eq!(
        rx.recv(&mut out, Some(Instant::now() + Duration::from_millis(50)))
            .expect("socket"),
        None
    );
}

#[test]
fn a_closed_mailbox_is_forgotten_and_its_watchers_told() {
    let mut watcher = endpoint(75);
    let mut peer = endpoint(75);
    let peer_port = peer.port();
    watcher
        .send(peer_port, b"hi", SendMode::RELIABLE, soon())
        .expect("send");
    let mut out = Vec::new();
    peer.recv(&mut out, soon()).expect("socket").expect("hi");
    drop(peer);
    // The hub sees the socket close; sends find no mailbox behind the port.
    let t0 = Instant::now();
    loop {
        match watcher.send(peer_port, b"still there?", SendMode::RELIABLE, soon()) {
            Err(e) => {
                assert!(
                    matches!(e, SendError::NoSuchMailbox | SendError::PeerGone),
                    "{e}"
                );
                break;
            }
            Ok(()) => assert!(t0.elapsed() < Duration::from_secs(2), "no error within 2 s"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

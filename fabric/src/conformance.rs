//! The conformance suite: what every [`Transport`] must do.
//!
//! Each check is a plain function generic over the transport; the
//! [`conformance_suite!`](crate::conformance_suite) macro turns them into one
//! `#[test]` each for a backend. A new transport is done when the whole
//! suite passes on it. Every loop here is bounded in count and time.

use std::thread;
use std::time::{Duration, Instant};

use crate::ring::{SendError, SendMode, MAX_MESSAGE_BYTES};
use crate::transport::{LinkRx, LinkTx, RecvError, Transport};

/// How long any single wait in the suite may take before the check fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

fn deadline() -> Option<Instant> {
    Some(Instant::now() + STEP_TIMEOUT)
}

/// A message whose content is derived from its number, of a size that
/// varies with it, so reordering, loss, duplication or corruption all show.
fn numbered(i: u64, max_len: usize) -> Vec<u8> {
    let len = 8 + (i as usize * 7919) % max_len.saturating_sub(8).max(1);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&i.to_le_bytes());
    m.extend((8..len).map(|k| (i as usize ^ k) as u8));
    m
}

fn recv_one<R: LinkRx>(rx: &mut R, out: &mut Vec<u8>) {
    assert!(
        rx.recv(out, deadline()).expect("sender alive"),
        "no message within {STEP_TIMEOUT:?}"
    );
}

/// Reliable messages arrive in order, none lost, none twice, intact, while
/// the ring wraps many times.
pub fn ordered_no_loss_no_duplicates<T: Transport>(t: &T) {
    const N: u64 = 100_000;
    let (mut tx, mut rx) = t.link(16 << 10).expect("link");
    let sender = thread::spawn(move || {
        for i in 0..N {
            tx.send(&numbered(i, 600), SendMode::RELIABLE, deadline())
                .expect("send");
        }
        tx
    });
    let mut buf = Vec::new();
    for i in 0..N {
        recv_one(&mut rx, &mut buf);
        assert_eq!(buf, numbered(i, 600), "message {i} wrong or out of order");
    }
    let _tx = sender.join().expect("sender thread");
    assert!(
        !rx.recv(&mut buf, Some(Instant::now() + Duration::from_millis(20)))
            .expect("alive"),
        "a duplicate or extra message arrived"
    );
}

/// A full receiver pushes back: non-blocking sends fail with `WouldBlock`
/// and send nothing; a blocking sender waits until the receiver drains.
pub fn backpressure<T: Transport>(t: &T) {
    let (mut tx, mut rx) = t.link(4096).expect("link");
    let msg = [7u8; 100];
    let mut accepted = 0u64;
    // Until it refuses, and still refuses after a pause: a transport that
    // is a pipeline (the remote path: ring, node link, ring) drains its
    // first stage into the next meanwhile.
    let mut refused_at_once = false;
    loop {
        match tx.send(&msg, SendMode::RELIABLE_NONBLOCKING, None) {
            Ok(()) => {
                accepted += 1;
                refused_at_once = false;
            }
            Err(SendError::WouldBlock) if refused_at_once => break,
            Err(SendError::WouldBlock) => {
                refused_at_once = true;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            accepted < 4096,
            "a 4 KiB ring accepted {accepted} messages of 100 bytes without pushing back"
        );
    }
    assert!(accepted > 0);
    assert_eq!(
        tx.send(&msg, SendMode::RELIABLE_NONBLOCKING, None),
        Err(SendError::WouldBlock)
    );
    // A blocking sender with a short deadline times out while nobody reads.
    let t0 = Instant::now();
    assert_eq!(
        tx.send(
            &msg,
            SendMode::RELIABLE,
            Some(t0 + Duration::from_millis(50))
        ),
        Err(SendError::Timeout)
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    // A blocking sender of more than the ring holds finishes once we drain.
    let extra = 3 * accepted;
    let sender = thread::spawn(move || {
        for i in 0..extra {
            let mut m = msg;
            m[..8].copy_from_slice(&i.to_le_bytes());
            tx.send(&m, SendMode::RELIABLE, deadline())
                .expect("blocking send");
        }
        tx
    });
    thread::sleep(Duration::from_millis(30));
    assert!(
        !sender.is_finished(),
        "the blocking sender did not wait for the full ring"
    );
    let mut buf = Vec::new();
    for _ in 0..accepted {
        recv_one(&mut rx, &mut buf);
        assert_eq!(buf, msg);
    }
    for i in 0..extra {
        recv_one(&mut rx, &mut buf);
        assert_eq!(buf[..8], i.to_le_bytes());
    }
    sender.join().expect("sender thread");
}

/// Large messages arrive intact, up to [`MAX_MESSAGE_BYTES`], through a
/// ring much smaller than they are; larger ones are refused.
pub fn large_messages<T: Transport>(t: &T) {
    let (mut tx, mut rx) = t.link(1 << 20).expect("link");
    let sizes = [
        0usize,
        1,
        47,
        48,
        49,
        65_520,
        65_536,
        262_128,
        262_129,
        1 << 20,
        10 << 20,
        MAX_MESSAGE_BYTES,
    ];
    let make = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|k| (k as u32).wrapping_mul(2654435761).rotate_right(13) as u8)
            .collect()
    };
    let sender = thread::spawn(move || {
        for &n in &sizes {
            tx.send(&make(n), SendMode::RELIABLE, deadline())
                .expect("send large");
        }
        let too_big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            tx.send(&too_big, SendMode::RELIABLE, None),
            Err(SendError::TooLarge {
                len: MAX_MESSAGE_BYTES + 1,
                max: MAX_MESSAGE_BYTES
            })
        );
        assert!(matches!(
            tx.send(&[0u8; 300_000], SendMode::UNRELIABLE, None),
            Err(SendError::TooLarge { .. })
        ));
        tx
    });
    let mut buf = Vec::new();
    for &n in &sizes {
        recv_one(&mut rx, &mut buf);
        assert_eq!(buf.len(), n);
        assert!(buf == make(n), "message of {n} bytes corrupted");
    }
    sender.join().expect("sender thread");
}

/// A receiver that goes away wakes a sender blocked on its full ring with
/// `PeerGone` promptly, and later sends fail the same way.
pub fn receiver_death<T: Transport>(t: &T) {
    let (mut tx, rx) = t.link(4096).expect("link");
    let sender = thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0u64;
        loop {
            match tx.send(&[1u8; 200], SendMode::RELIABLE, deadline()) {
                Ok(()) => n += 1,
                Err(e) => return (e, start.elapsed(), n, tx),
            }
            assert!(n < 100_000, "sender never blocked");
        }
    });
    thread::sleep(Duration::from_millis(50));
    let dropped_at = Instant::now();
    drop(rx);
    let (err, _, n, mut tx) = sender.join().expect("sender thread");
    assert_eq!(err, SendError::PeerGone);
    assert!(
        dropped_at.elapsed() < Duration::from_secs(1),
        "sender noticed after {:?}",
        dropped_at.elapsed()
    );
    assert!(n > 0);
    assert_eq!(
        tx.send(b"x", SendMode::RELIABLE, None),
        Err(SendError::PeerGone)
    );
    assert_eq!(
        tx.send(b"x", SendMode::UNRELIABLE, None),
        Err(SendError::PeerGone)
    );
}

/// A sender that goes away leaves what it sent to be received, then the
/// receiver learns it is gone (instead of waiting forever).
pub fn sender_death<T: Transport>(t: &T) {
    let (mut tx, mut rx) = t.link(1 << 16).expect("link");
    for i in 0..10u64 {
        tx.send(&i.to_le_bytes(), SendMode::RELIABLE, None)
            .expect("send");
    }
    let waiter = thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..10u64 {
            recv_one(&mut rx, &mut buf);
            assert_eq!(buf, i.to_le_bytes());
        }
        let t0 = Instant::now();
        (rx.recv(&mut buf, deadline()), t0.elapsed())
    });
    thread::sleep(Duration::from_millis(20));
    drop(tx);
    let (last, waited) = waiter.join().expect("receiver thread");
    assert_eq!(last, Err(RecvError::PeerGone));
    assert!(
        waited < Duration::from_secs(1),
        "receiver noticed after {waited:?}"
    );
}

/// Unreliable sends never block: when the ring is full they are dropped and
/// counted; what does arrive is in order and intact.
pub fn unreliable_drops_are_counted<T: Transport>(t: &T) {
    const N: u64 = 1000;
    let (mut tx, mut rx) = t.link(4096).expect("link");
    let t0 = Instant::now();
    for i in 0..N {
        tx.send(&i.to_le_bytes(), SendMode::UNRELIABLE, None)
            .expect("unreliable send");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "unreliable sends blocked"
    );
    let dropped = tx.dropped();
    assert!(
        dropped > 0,
        "a 4 KiB ring took {N} messages without dropping"
    );
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while rx
        .recv(&mut buf, Some(Instant::now() + Duration::from_millis(20)))
        .expect("alive")
    {
        got.push(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")));
        assert!(got.len() as u64 <= N);
    }
    assert_eq!(
        got.len() as u64 + dropped,
        N,
        "received + dropped must equal sent"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "unreliable messages reordered or duplicated"
    );
}

/// Receiving with a deadline on an empty link times out, without error.
pub fn recv_timeout_on_empty<T: Transport>(t: &T) {
    let (_tx, mut rx) = t.link(4096).expect("link");
    let t0 = Instant::now();
    assert_eq!(
        rx.recv(&mut Vec::new(), Some(t0 + Duration::from_millis(30))),
        Ok(false)
    );
    assert!(t0.elapsed() >= Duration::from_millis(30));
}

/// Generates one `#[test]` per conformance check for a transport:
/// `conformance_suite!(shm, fabric::transport::ShmTransport::default());`
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $transport:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_suite!(@tests $transport;
                ordered_no_loss_no_duplicates, backpressure, large_messages, receiver_death,
                sender_death, unreliable_drops_are_counted, recv_timeout_on_empty);
        }
    };
    (@tests $transport:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::$check(&$transport);
            }
        )*
    };
}

//! The SDK against a real (embedded) fabricd, with child processes from
//! `nefele-demo` for the cross-process cases.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nefele::{Error, Mailbox, Node, SendError, SendMode};

mod support;
use support::ChildGuard;

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

fn spawn_role(node: &Node, args: &[&str]) -> ChildGuard {
    let (k, v) = node.env();
    ChildGuard(
        Command::new(DEMO)
            .args(args)
            .env(k, v)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nefele-demo"),
    )
}

#[test]
fn seed_address_works_in_process() {
    let node = Node::embedded().unwrap();
    let mut printer = node.mailbox().unwrap().bound("printer@{8080,1,1}").unwrap();
    let mut worker = node.mailbox().unwrap();
    assert!(worker
        .service_exists("printer@{8080,1,1}", Duration::from_secs(5))
        .unwrap());
    worker
        .send("printer@{8080,1,1}", b"{inside, total}")
        .unwrap();
    let m = printer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("message");
    assert_eq!(m.data, b"{inside, total}");
    assert_eq!(m.from, worker.port());
    // The reply goes to the sender's port id.
    printer.send(m.from, b"ack").unwrap();
    assert_eq!(
        worker
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .data,
        b"ack"
    );
}

#[test]
fn service_exists_returns_when_the_binding_appears_and_times_out_otherwise() {
    let node = Node::embedded().unwrap();
    let mut waiter = node.mailbox().unwrap();
    let t = std::thread::spawn(move || {
        let t0 = Instant::now();
        let found = waiter
            .service_exists("{77,5}", Duration::from_secs(10))
            .unwrap();
        (found, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let _binder = node.mailbox().unwrap().bound("{77,0,9}").unwrap();
    let (found, waited) = t.join().unwrap();
    assert!(found);
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );

    let mut other = node.mailbox().unwrap();
    let t0 = Instant::now();
    assert!(!other
        .service_exists("{77,10}", Duration::from_millis(150))
        .unwrap());
    assert!(t0.elapsed() >= Duration::from_millis(150));
}

#[test]
fn without_a_daemon_the_error_says_how_to_start_one() {
    let err = Mailbox::open_at("/nonexistent/nefele/fabricd.sock")
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(
        text.contains("fabricd --socket /nonexistent/nefele/fabricd.sock"),
        "{text}"
    );
    assert!(text.contains("NEFELE_FABRICD_SOCKET"), "{text}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let node = Node::embedded().unwrap();
    let mut mb = node.mailbox().unwrap();
    let e = mb.send("{1234,1}", b"x").unwrap_err();
    assert!(
        matches!(e, Error::NoSuchMailbox(ref a) if a == "{1234,1}"),
        "{e}"
    );
    let e = mb.send("printer@{8080;1,1}", b"x").unwrap_err();
    assert!(e.to_string().contains("at byte 13"), "{e}");
    let e = mb.bind("1:2").unwrap_err();
    assert!(e.to_string().contains("cannot be bound"), "{e}");
    mb.bind("x@{1,1}").unwrap();
    assert!(mb
        .bind("x@{1,1}")
        .unwrap_err()
        .to_string()
        .contains("already bound"));
    assert!(mb
        .unbind("y")
        .unwrap_err()
        .to_string()
        .contains("not bound"));
    let e = mb
        .send(
            nefele::PortId {
                node: 1,
                port: 12345,
            },
            b"x",
        )
        .unwrap_err();
    assert!(matches!(e, Error::NoSuchMailbox(_)), "{e}");
}

#[test]
fn multicast_reaches_every_binder_anycast_one() {
    let node = Node::embedded().unwrap();
    let mut a = node.mailbox().unwrap().bound("{5,0,9}").unwrap();
    let mut b = node.mailbox().unwrap().bound("{5,5,15}").unwrap();
    let mut s = node.mailbox().unwrap();
    s.send("{5,0,100}", b"all").unwrap();
    assert_eq!(
        a.recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .data,
        b"all"
    );
    assert_eq!(
        b.recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .data,
        b"all"
    );
    for _ in 0..10 {
        s.send("{5,7}", b"one").unwrap();
    }
    let mut got = 0;
    for mb in [&mut a, &mut b] {
        while mb
            .recv_timeout(Duration::from_millis(50))
            .unwrap()
            .is_some()
        {
            got += 1;
        }
    }
    assert_eq!(got, 10, "each anycast message reaches exactly one binder");
}

#[test]
fn a_cached_resolution_follows_rebinding() {
    let node = Node::embedded().unwrap();
    let mut first = node.mailbox().unwrap().bound("svc@{9,1}").unwrap();
    let mut sender = node.mailbox().unwrap();
    sender.send("svc@{9,1}", b"1").unwrap();
    assert_eq!(
        first
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .data,
        b"1"
    );
    first.unbind("svc@{9,1}").unwrap();
    let mut second = node.mailbox().unwrap().bound("svc@{9,1}").unwrap();
    // The withdrawal reaches the sender as an event; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        sender.send("svc@{9,1}", b"2").unwrap();
        if second
            .recv_timeout(Duration::from_millis(20))
            .unwrap()
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sends kept going to the old binder"
        );
    }
}

#[test]
fn unreliable_sends_drop_and_count_when_the_receiver_is_full() {
    let node = Node::embedded_with(4096).unwrap();
    let mut rx = node.mailbox().unwrap().bound("{3,3}").unwrap();
    let mut tx = node.mailbox().unwrap();
    for i in 0..1000u32 {
        tx.send_with("{3,3}", &i.to_le_bytes(), SendMode::UNRELIABLE)
            .unwrap();
    }
    let mut got = 0u64;
    while rx
        .recv_timeout(Duration::from_millis(50))
        .unwrap()
        .is_some()
    {
        got += 1;
    }
    assert!(tx.dropped() > 0);
    assert_eq!(got + tx.dropped(), 1000);
    // Reliable non-blocking sends push back instead.
    let mut pushed_back = false;
    for _ in 0..1000 {
        match tx.try_send("{3,3}", &[0u8; 100]) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e.send_error(), Some(&SendError::WouldBlock), "{e}");
                pushed_back = true;
                break;
            }
        }
    }
    assert!(pushed_back);
}

#[test]
fn cross_process_messages_of_every_size_echo_intact() {
    let node = Node::embedded().unwrap();
    let _echo = spawn_role(&node, &["echo", "--bind", "echo@{9000,1,1}"]);
    let mut mb = node.mailbox().unwrap();
    assert!(mb
        .service_exists("echo@{9000,1,1}", Duration::from_secs(10))
        .unwrap());
    for (i, size) in [0usize, 1, 63, 64, 4096, 65_536, 1 << 20, 8 << 20]
        .into_iter()
        .cycle()
        .take(64)
        .enumerate()
    {
        let msg: Vec<u8> = (0..size).map(|k| (k ^ i) as u8).collect();
        mb.send("echo@{9000,1,1}", &msg).unwrap();
        let back = mb
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("echo");
        assert!(
            back.data == msg,
            "message {i} of {size} bytes came back different"
        );
    }
    assert!(
        node.stats().rings >= 2,
        "a process pair exchanges through daemon-made rings"
    );
    mb.send("echo@{9000,1,1}", b"quit").unwrap();
}

#[test]
fn a_dead_senders_messages_are_still_delivered_then_its_ring_goes() {
    let node = Node::embedded().unwrap();
    let mut rx = node.mailbox().unwrap().bound("{42,1}").unwrap();
    let base = node.stats();
    let mut tx = node.mailbox().unwrap();
    for i in 0..100u32 {
        tx.send("{42,1}", &i.to_le_bytes()).unwrap();
    }
    drop(tx);
    for i in 0..100u32 {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .data,
            i.to_le_bytes()
        );
    }
    assert!(rx
        .recv_timeout(Duration::from_millis(50))
        .unwrap()
        .is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.stats().shm_segments != base.shm_segments {
        assert!(
            Instant::now() < deadline,
            "ring of the closed sender not freed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn async_mailbox_sends_and_receives() {
    let node = Node::embedded().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a: nefele::r#async::AsyncMailbox = node.mailbox().unwrap().into();
    let b: nefele::r#async::AsyncMailbox = node.mailbox().unwrap().into();
    rt.block_on(async {
        a.bind("async@{11,1}").await.unwrap();
        assert!(b
            .service_exists("async@{11,1}", Duration::from_secs(5))
            .await
            .unwrap());
        let receiver = tokio::spawn({
            let a = a.clone();
            async move { a.recv_timeout(Duration::from_secs(5)).await }
        });
        b.send("async@{11,1}", b"hello".to_vec()).await.unwrap();
        let m = receiver.await.unwrap().unwrap().expect("message");
        assert_eq!(m.data, b"hello");
        assert_eq!(m.from, b.port().await.unwrap());
    });
}

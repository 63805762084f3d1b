//! A remote link survives cuts: a proxy between sender and receiver severs
//! every connection (and refuses new ones for a while) several times during
//! a reliable stream of 100,000 numbered messages; all arrive, in order,
//! none twice. Loopback only; every loop is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::remote::{RemoteRx, RemoteTx};
use fabric::ring::SendMode;
use fabric::transport::{LinkRx, LinkTx};

/// Forwards connections from its own port to `target`; can cut them all.
struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let p = Proxy {
            addr: listener.local_addr().unwrap(),
            down: Arc::default(),
            live: Arc::default(),
            accepted: Arc::default(),
            stop: Arc::default(),
        };
        let (down, live, accepted, stop) = (
            p.down.clone(),
            p.live.clone(),
            p.accepted.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                if down.load(Ordering::SeqCst) {
                    continue; // refused while the link is down
                }
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ];
                live.lock().unwrap().extend([client, server]);
                for (mut from, mut to) in pairs {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        p
    }

    /// Severs every connection and refuses new ones for `outage`.
    fn cut(&self, outage: Duration) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        std::thread::sleep(outage);
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_reliable_stream_survives_cut_and_restored_links() {
    const N: u64 = 100_000;
    const CUTS: u64 = 3;
    let mut rx = RemoteRx::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let proxy = Proxy::start(rx.local_addr().unwrap());
    let proxy_addr = proxy.addr;
    let received = Arc::new(AtomicU64::new(0));

    let sender = std::thread::spawn(move || {
        let mut tx = RemoteTx::connect(proxy_addr, 64 << 10).unwrap();
        for i in 0..N {
            let mut m = i.to_le_bytes().to_vec();
            m.resize(8 + (i % 200) as usize, i as u8);
            tx.send(
                &m,
                SendMode::RELIABLE,
                Some(Instant::now() + Duration::from_secs(30)),
            )
            .unwrap();
        }
        tx
    });
    let cutter = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut cut_at = Vec::new();
            for k in 1..=CUTS {
                // Cut at about k/(CUTS+1) of the stream (bounded wait).
                let deadline = Instant::now() + Duration::from_secs(30);
                while received.load(Ordering::SeqCst) < k * N / (CUTS + 1)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                cut_at.push(received.load(Ordering::SeqCst));
                proxy.cut(Duration::from_millis(100));
            }
            (cut_at, proxy)
        })
    };

    let mut buf = Vec::new();
    for i in 0..N {
        assert!(
            rx.recv(&mut buf, Some(Instant::now() + Duration::from_secs(30)))
                .unwrap(),
            "message {i} did not arrive"
        );
        assert_eq!(
            u64::from_le_bytes(buf[..8].try_into().unwrap()),
            i,
            "out of order or duplicated"
        );
        assert_eq!(buf.len(), 8 + (i % 200) as usize);
        assert!(
            buf[8..].iter().all(|&b| b == i as u8),
            "message {i} corrupted"
        );
        received.store(i + 1, Ordering::SeqCst);
    }
    let (cut_at, proxy) = cutter.join().unwrap();
    let tx = sender.join().unwrap();
    assert!(
        cut_at.iter().all(|&c| c > 0 && c < N),
        "every cut fell mid-stream: {cut_at:?}"
    );
    assert!(
        proxy.accepted.load(Ordering::SeqCst) > CUTS,
        "the sender reconnected after each cut"
    );
    assert!(
        !rx.recv(&mut buf, Some(Instant::now() + Duration::from_millis(50)))
            .unwrap(),
        "an extra message arrived"
    );
    drop(tx);
    assert!(
        rx.recv(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
            .is_err(),
        "the closed sender is reported"
    );
}

/// A sender that sends and closes at once (a process that exits right
/// after its last send) still delivers everything: its close waits until
/// the receiver has read it, instead of resetting the connection with
/// acknowledgements unread (which made Linux discard the last frames).
#[test]
fn the_last_messages_before_a_senders_close_arrive() {
    for round in 0..20 {
        let mut rx = RemoteRx::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = rx.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match rx.recv(&mut buf, Some(deadline)) {
                    Ok(true) => got.push((buf[0], buf.len())),
                    Ok(false) => panic!("round {round}: timed out after {} messages", got.len()),
                    Err(_) => return got,
                }
            }
        });
        let mut tx = RemoteTx::connect(addr, 256 << 10).unwrap();
        for i in 0..6u8 {
            tx.send(&vec![i; 64 << 10], SendMode::RELIABLE, None)
                .unwrap();
        }
        drop(tx);
        let got = reader.join().unwrap();
        assert_eq!(
            got,
            (0..6u8).map(|i| (i, 64 << 10)).collect::<Vec<_>>(),
            "round {round}"
        );
    }
}

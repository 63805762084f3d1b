//! What a send and a receive cost in instructions alone: one thread passes
//! a 64-byte message back and forth between two mailboxes (and, for
//! comparison, over two bare ring links), so no cache line ever moves
//! between cores and no receive waits. The difference between the two
//! loops is the mailbox layer's own work:
//! `cargo run --release -p nefele-fabric --example send_recv_cost`.
use std::time::Instant;

mod common;

use fabric::client::Mailbox;
use fabric::ring::SendMode;
use fabric::transport::{LinkRx, LinkTx, ShmTransport, Transport};

/// Loop iterations per round (each: two sends and two receives).
const ITERATIONS: u32 = 2_000_000;
const ROUNDS: usize = 5;

fn main() {
    let (_dir, _daemon, path) = common::temp_daemon();
    let mut a = Mailbox::open_at(&path).unwrap();
    let mut b = Mailbox::open_at(&path).unwrap();
    let (a_port, b_port) = (a.port(), b.port());
    let msg = vec![1u8; 64];
    let (mut buf, mut back) = (Vec::new(), Vec::new());
    // The first message each way makes the rings.
    a.send_to_port(b_port, &msg, SendMode::RELIABLE).unwrap();
    b.recv_into(&mut buf, None).unwrap();
    b.send_to_port(a_port, &msg, SendMode::RELIABLE).unwrap();
    a.recv_into(&mut buf, None).unwrap();
    let (mut atx, mut brx) = ShmTransport.link(1 << 18).unwrap();
    let (mut btx, mut arx) = ShmTransport.link(1 << 18).unwrap();
    for round in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..ITERATIONS {
            a.send_to_port(b_port, &msg, SendMode::RELIABLE).unwrap();
            let from = b.recv_into(&mut buf, None).unwrap().unwrap();
            b.send_to_port(from, &buf, SendMode::RELIABLE).unwrap();
            a.recv_into(&mut back, None).unwrap();
        }
        let mailboxes = t.elapsed().as_nanos() as f64 / f64::from(ITERATIONS);
        let t = Instant::now();
        for _ in 0..ITERATIONS {
            atx.send(&msg, SendMode::RELIABLE, None).unwrap();
            brx.recv(&mut buf, None).unwrap();
            btx.send(&buf, SendMode::RELIABLE, None).unwrap();
            arx.recv(&mut back, None).unwrap();
        }
        let links = t.elapsed().as_nanos() as f64 / f64::from(ITERATIONS);
        println!(
            "round {round}: two sends and two receives: mailboxes {mailboxes:.1} ns, bare ring links {links:.1} ns"
        );
    }
}

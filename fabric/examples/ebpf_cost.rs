//! What the eBPF path costs the kernel and us per message, apart from the
//! scheduler (needs root):
//! `cargo run --release -p nefele-fabric --example ebpf_cost [switches]`.
//!
//! Without arguments, one thread on one core runs exchanges (a send and a
//! receive each way) between two mailbox sockets of the eBPF path, and the
//! same over a TCP loopback pair with `TCP_NODELAY`, in alternating rounds:
//! nobody ever waits, so this is the system-call, socket and program cost
//! alone. A same-core ping-pong (`nefele-perf`'s `same-core`) adds two
//! context switches per round trip on top.
//!
//! With `switches`, two threads pinned to core 0 ping-pong on the eBPF path
//! (receives block at once) and report, per run, the round trip and how
//! often each thread left the core voluntarily (it blocked) or was
//! preempted by the peer it woke.
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use fabric::ebpf::{EbpfFabric, Endpoint, DEFAULT_WINDOW_BYTES};
use fabric::ring::SendMode;
use fabric::wire::WirePort;

const EXCHANGES: u32 = 200_000;
const ROUNDS: u32 = 5;
const ROUND_TRIPS: u32 = 50_000;
const RUNS: u32 = 10;
const MESSAGE: [u8; 64] = [7; 64];

fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(core).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn port(k: u32) -> WirePort {
    WirePort {
        node: 1,
        port: 0x5000_0000 + k,
    }
}

fn pair(fabric: &EbpfFabric, first: u32) -> (Endpoint, Endpoint) {
    let a = fabric
        .endpoint(port(first), 0, DEFAULT_WINDOW_BYTES)
        .unwrap();
    let b = fabric
        .endpoint(port(first + 1), 0, DEFAULT_WINDOW_BYTES)
        .unwrap();
    (a, b)
}

fn per_exchange(start: Instant) -> f64 {
    start.elapsed().as_nanos() as f64 / EXCHANGES as f64
}

fn ebpf_round(a: &mut Endpoint, b: &mut Endpoint) -> f64 {
    let (pa, pb) = (a.port(), b.port());
    let mut buf = Vec::new();
    let start = Instant::now();
    for _ in 0..EXCHANGES {
        a.send(pb, &MESSAGE, SendMode::RELIABLE, None).unwrap();
        b.recv_from_peer(pa, &mut buf, None).unwrap();
        b.send(pa, &buf, SendMode::RELIABLE, None).unwrap();
        a.recv_from_peer(pb, &mut buf, None).unwrap();
    }
    per_exchange(start)
}

fn tcp_round(a: &mut std::net::TcpStream, b: &mut std::net::TcpStream) -> f64 {
    let mut buf = [0u8; MESSAGE.len()];
    let start = Instant::now();
    for _ in 0..EXCHANGES {
        a.write_all(&MESSAGE).unwrap();
        b.read_exact(&mut buf).unwrap();
        b.write_all(&buf).unwrap();
        a.read_exact(&mut buf).unwrap();
    }
    per_exchange(start)
}

fn exchange_cost(fabric: &EbpfFabric) {
    pin(0);
    let (mut a, mut b) = pair(fabric, 0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ta = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut tb, _) = listener.accept().unwrap();
    ta.set_nodelay(true).unwrap();
    tb.set_nodelay(true).unwrap();
    println!("ns per 64 B exchange (two sends, two receives), one thread, nobody waits");
    for round in 0..ROUNDS {
        let ebpf = ebpf_round(&mut a, &mut b);
        let tcp = tcp_round(&mut ta, &mut tb);
        println!(
            "round {round}: ebpf {ebpf:.0}  tcp {tcp:.0}  ebpf/tcp {:.2}",
            ebpf / tcp
        );
    }
}

/// Voluntary and involuntary context switches of this thread so far.
fn switches() -> (i64, i64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    (u.ru_nvcsw, u.ru_nivcsw)
}

fn switch_runs(fabric: &EbpfFabric) {
    pin(0);
    println!("same-core ping-pong, receives block at once");
    for run in 0..RUNS {
        let (mut a, mut b) = pair(fabric, 2 + 2 * run);
        a.set_spin(Duration::ZERO);
        b.set_spin(Duration::ZERO);
        let (pa, pb) = (a.port(), b.port());
        let echo = std::thread::spawn(move || {
            pin(0);
            let before = switches();
            let mut buf = Vec::new();
            for _ in 0..ROUND_TRIPS {
                b.recv_from_peer(pa, &mut buf, None).unwrap();
                b.send(pa, &buf, SendMode::RELIABLE, None).unwrap();
            }
            let after = switches();
            (after.0 - before.0, after.1 - before.1)
        });
        let mut buf = Vec::new();
        let before = switches();
        let start = Instant::now();
        for _ in 0..ROUND_TRIPS {
            a.send(pb, &MESSAGE, SendMode::RELIABLE, None).unwrap();
            a.recv_from_peer(pb, &mut buf, None).unwrap();
        }
        let rtt = start.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64;
        let after = switches();
        let (echo_vol, echo_invol) = echo.join().unwrap();
        println!(
            "run {run}: {rtt:.0} ns per round trip; switches per round trip: \
             sender {:.2} blocked / {:.2} preempted, echo {:.2} / {:.2}",
            (after.0 - before.0) as f64 / ROUND_TRIPS as f64,
            (after.1 - before.1) as f64 / ROUND_TRIPS as f64,
            echo_vol as f64 / ROUND_TRIPS as f64,
            echo_invol as f64 / ROUND_TRIPS as f64,
        );
    }
}

fn main() {
    let fabric = EbpfFabric::load().expect("the eBPF path (run as root)");
    match std::env::args().nth(1).as_deref() {
        None => exchange_cost(&fabric),
        Some("switches") => switch_runs(&fabric),
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: ebpf_cost [switches]");
            std::process::exit(2);
        }
    }
}
